"""retrieval_metrics: hand-worked values and agreement with clip_benchmark's recall_at_k."""

import pytest
import torch

from urbancross.evaluate import retrieval_metrics


def cb_recall_at_k(scores, positive_pairs, k):
    """clip_benchmark/metrics/zeroshot_retrieval.py `recall_at_k`, reimplemented from its source."""
    nb_texts, nb_images = scores.shape
    topk_indices = torch.topk(scores, k, dim=1)[1]
    nb_positive = positive_pairs.sum(dim=1)
    onehot = torch.nn.functional.one_hot(topk_indices, num_classes=nb_images)
    nb_true_positive = (onehot * positive_pairs.view(nb_texts, 1, nb_images)).sum(dim=(1, 2))
    return nb_true_positive / nb_positive


def cb_metrics(similarity, image_of_text, ks, batch_size=7):
    """clip_benchmark's `evaluate` tail: scores are [texts, images]; batchify over rows."""
    scores = similarity.T.contiguous()
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), image_of_text] = True

    def batchify(x, y, k):
        return torch.cat([cb_recall_at_k(x[s : s + batch_size], y[s : s + batch_size], k)
                          for s in range(0, len(x), batch_size)])

    out = {}
    for k in ks:
        out[f"t2i_r{k}"] = 100 * (batchify(scores, positive, k) > 0).float().mean().item()
        out[f"i2t_r{k}"] = 100 * (batchify(scores.T, positive.T, k) > 0).float().mean().item()
    return out


def test_hand_worked():
    # 2 images, 4 texts: texts 0,1 -> image 0; texts 2,3 -> image 1
    sim = torch.tensor([[0.9, 0.1, 0.8, 0.2],
                        [0.5, 0.3, 0.4, 0.7]])
    m = retrieval_metrics(sim, [0, 0, 1, 1], ks=(1, 2))
    # i2t: image0 top1 = text0 (hit); image1 top1 = text3 (hit) -> 100
    assert m["i2t_r1"] == 100.0 and m["i2t_r2"] == 100.0
    # t2i: t0 -> img0 ok, t1 -> img1 (0.3>0.1) miss, t2 -> img0 miss, t3 -> img1 ok
    assert m["t2i_r1"] == 50.0 and m["t2i_r2"] == 100.0
    assert m["mR"] == pytest.approx((100 + 100 + 50 + 100) / 4)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_clip_benchmark(seed, ties):
    g = torch.Generator().manual_seed(seed)
    n_img, per = 23, 5
    sim = torch.rand(n_img, n_img * per, generator=g)
    if ties:
        sim = (sim * 4).round() / 4  # 5 distinct values: ties cross every cut-off
    owner = torch.arange(n_img).repeat_interleave(per)[torch.randperm(n_img * per, generator=g)]
    ours = retrieval_metrics(sim, owner, ks=(1, 5, 10), chunk_size=4)
    ref = cb_metrics(sim, owner, (1, 5, 10))
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-4), key
    assert ours["mR"] == pytest.approx(sum(ref.values()) / 6, abs=1e-4)


def test_chunking_does_not_change_results():
    g = torch.Generator().manual_seed(3)
    sim = torch.randn(40, 90, generator=g)
    owner = torch.randint(0, 40, (90,), generator=g)
    assert retrieval_metrics(sim, owner, chunk_size=1) == retrieval_metrics(sim, owner, chunk_size=1000)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="image_of_text"):
        retrieval_metrics(torch.zeros(2, 3), [0, 1])
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        retrieval_metrics(torch.zeros(2, 3), [0, 1, 2])
