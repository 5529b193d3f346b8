"""SMR re-ranking: the documented formula on a hand-worked matrix, promotion, chunking."""

from math import exp

import pytest
import torch

from urbancross.config import SMRConfig
from urbancross.evaluate import retrieval_metrics, smr_rerank


def test_hand_worked_k1():
    s = torch.tensor([[0.8, 0.6], [0.7, 0.1]])
    r = smr_rerank(s, SMRConfig(k=1, score_weight=1.0, rank_weight=1.0, decay=0.05))
    e = exp(-0.05)
    # column sums of s+1: 3.5, 2.7; row sums: 3.4, 2.8
    # i2t top-1: image0 -> text0, image1 -> text0;  t2i top-1: text0 -> image0, text1 -> image0
    want = torch.tensor([
        [0.8 + (1.8 / 3.5 + e) + (1.8 / 3.4 + e), 0.6 + (1.6 / 3.4 + e)],
        [0.7 + (1.7 / 3.5 + e), 0.1],
    ])
    torch.testing.assert_close(r, want)


def test_reverse_direction_promotes_and_weights_scale():
    # image0: text0 (0.50) barely beats text1 (0.49); text1 ranks image0 first, text0 ranks it last.
    s = torch.tensor([[0.50, 0.49, 0.0], [0.90, 0.10, 0.2], [0.80, 0.10, 0.3]])
    r = smr_rerank(s, SMRConfig(k=2, score_weight=0.0, rank_weight=1.0, decay=0.05))
    assert r[0, 0].item() == pytest.approx(0.50 + exp(-0.05))  # forward rank 0 only
    assert r[0, 1].item() == pytest.approx(0.49 + exp(-0.10) + exp(-0.05))  # forward rank 1 + reverse rank 0
    owner = [1, 0, 2]
    assert retrieval_metrics(s, owner, ks=(1,))["i2t_r1"] == pytest.approx(100 / 3)
    assert retrieval_metrics(r, owner, ks=(1,))["i2t_r1"] == pytest.approx(200 / 3)
    torch.testing.assert_close(smr_rerank(s, SMRConfig(k=2, score_weight=0.0, rank_weight=0.0)), s)


def test_only_top_k_changes_and_chunking_is_exact():
    g = torch.Generator().manual_seed(0)
    s = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=-1) @ \
        torch.nn.functional.normalize(torch.randn(70, 8, generator=g), dim=-1).T
    cfg = SMRConfig(k=3)
    a = smr_rerank(s, cfg, chunk_size=1)
    torch.testing.assert_close(a, smr_rerank(s, cfg, chunk_size=4096))
    changed = (a != s).sum(1)
    assert int(changed.min()) >= 3  # each image's own top-3 at least
    assert int((a != s).sum()) <= 30 * 3 + 70 * 3
    torch.testing.assert_close(smr_rerank(s, SMRConfig(enabled=False)), s)


def test_rejects_logits():
    with pytest.raises(ValueError, match="cosine"):
        smr_rerank(torch.tensor([[5.0, -3.0]]), SMRConfig())
