"""Losses on hand-worked 2x2 / 3x3 cases (values, not shapes)."""

from math import exp, log

import pytest
import torch

from urbancross.config import LossConfig
from urbancross.loss import (
    infonce,
    intra_class,
    pre_align_loss,
    retrieval_loss,
    segment_infonce,
    triplet_hardest,
    vse_hinge,
    weighted_mean,
)

SIM = torch.tensor([[0.9, 0.5], [0.8, 0.6]])


def test_vse_hinge_hand_worked():
    # image0: [0.2+0.5-0.9]+ = 0; text0 vs image1: [0.2+0.8-0.9]+ = 0.1 -> l0 = 0.1
    # image1 vs text0: [0.2+0.8-0.6]+ = 0.4; text1 vs image0: [0.2+0.5-0.6]+ = 0.1 -> l1 = 0.5
    assert vse_hinge(SIM, 0.2).item() == pytest.approx(0.3)
    assert vse_hinge(SIM, 0.2, torch.tensor([1.0, 3.0])).item() == pytest.approx((0.1 + 3 * 0.5) / 4)
    assert vse_hinge(SIM, 0.0).item() == pytest.approx((0.0 + 0.2) / 2)  # only 0.8 - 0.6 survives


def test_infonce_hand_worked():
    logits = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    l0 = (log(1 + exp(-2)) + log(1 + exp(-1))) / 2  # row 0 and column 0
    l1 = (log(2) + log(1 + exp(-1))) / 2
    assert infonce(logits).item() == pytest.approx((l0 + l1) / 2, abs=1e-6)
    assert infonce(logits, torch.tensor([0.0, 1.0])).item() == pytest.approx(l1, abs=1e-6)


def test_triplet_hardest_and_labels():
    sim = torch.tensor([[0.9, 0.7, 0.1], [0.3, 0.5, 0.6], [0.2, 0.4, 0.8]])
    # i0: hardest text 0.7 -> [0.2+0.7-0.9]=0 ; hardest image for text0: 0.3 -> 0 => 0
    # i1: hardest text 0.6 -> 0.3 ; hardest image for text1: 0.7 -> 0.4 => 0.7
    # i2: hardest text 0.4 -> 0   ; hardest image for text2: 0.6 -> 0   => 0
    assert triplet_hardest(sim, 0.2).item() == pytest.approx(0.7 / 3)
    # classes {0,1} same: pair (0,1) is no negative. i1: text2 0.6 -> 0.3; image2 for text1 0.4 -> 0.1
    assert triplet_hardest(sim, 0.2, labels=torch.tensor([0, 0, 1])).item() == pytest.approx(0.4 / 3)
    assert triplet_hardest(sim, 0.2, torch.tensor([0.0, 1.0, 0.0])).item() == pytest.approx(0.7)


def test_intra_class():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    text = torch.tensor([[0.6, 0.8], [0.0, 1.0], [0.8, 0.6]])
    # matched pairs: 1-0.6, 1-1, 1-0.8
    assert intra_class(image, text).item() == pytest.approx((0.4 + 0.0 + 0.2) / 3)
    # labels [0,1,0]: sample0 averages (1-0.6, 1-0.8), sample2 the same pair of texts
    per = torch.tensor([(0.4 + 0.2) / 2, 0.0, (0.4 + 0.2) / 2])
    assert intra_class(image, text, torch.tensor([0, 1, 0])).item() == pytest.approx(per.mean().item())


def test_segment_infonce_hand_worked():
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    segs = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]])
    mask = torch.tensor([[True, False], [True, True]])
    seg0 = log(1 + exp(-1))
    seg1 = (log(1 + exp(-1)) + log(1 + exp(1))) / 2
    q0 = log(2 * exp(1) + 1) - 1  # logits [1, 0, 1], own = {0}
    q1 = log(2 + exp(1)) - log(1 + exp(1))  # logits [0, 1, 0], own = {1, 2}
    expected = ((seg0 + q0) / 2 + (seg1 + q1) / 2) / 2
    assert segment_infonce(query, segs, mask, torch.tensor(1.0)).item() == pytest.approx(expected, abs=1e-6)
    # a sample with no segments is left out, and gradients stay finite
    q = query.clone().requires_grad_(True)
    mask2 = torch.tensor([[False, False], [True, True]])
    val = segment_infonce(q, segs, mask2, torch.tensor(1.0))
    val.backward()
    assert val.item() == pytest.approx(seg1 / 2, abs=1e-6)  # both segments are its own: query term 0
    assert torch.isfinite(q.grad).all()


def test_weighted_mean_and_pre_align():
    assert weighted_mean(torch.tensor([1.0, 3.0]), torch.tensor([3.0, 1.0])).item() == pytest.approx(1.5)
    eye = torch.eye(2)
    assert pre_align_loss(eye, eye, torch.tensor(2.0)).item() == pytest.approx(log(1 + exp(-2)), abs=1e-6)


def _out(seg=True):
    torch.manual_seed(0)
    norm = torch.nn.functional.normalize
    out = {
        "image": norm(torch.randn(3, 4), dim=-1),
        "text": norm(torch.randn(3, 4), dim=-1),
        "segments": norm(torch.randn(3, 2, 4), dim=-1) if seg else None,
        "segment_mask": torch.tensor([[True, True], [True, False], [False, False]]) if seg else None,
        "logit_scale": torch.tensor(10.0),
    }
    out["fused"] = out["image"]
    return out


def test_retrieval_loss_combines_weighted_parts():
    out = _out()
    cfg = LossConfig(kind="infonce", image_text_weight=1.0, segment_text_weight=0.5, image_segment_weight=0.25)
    total, parts = retrieval_loss(out, cfg)
    assert set(parts) == {"image_text", "segment_text", "image_segment"}
    assert parts["image_text"].item() == pytest.approx(infonce(10 * out["image"] @ out["text"].T).item())
    want = parts["image_text"] + 0.5 * parts["segment_text"] + 0.25 * parts["image_segment"]
    assert total.item() == pytest.approx(want.item())

    total, parts = retrieval_loss(out, LossConfig(kind="vse", margin=0.2))
    assert parts["image_text"].item() == pytest.approx(vse_hinge(out["image"] @ out["text"].T, 0.2).item())
    assert set(parts) == {"image_text", "segment_text"}

    labels = torch.tensor([0, 1, 0])
    total, parts = retrieval_loss(_out(seg=False), LossConfig(kind="triplet", intra_class_weight=0.1), labels=labels)
    assert set(parts) == {"image_text", "intra_class"}
    assert total.item() == pytest.approx((parts["image_text"] + 0.1 * parts["intra_class"]).item())


def test_intra_class_term_uses_scene_labels_and_is_off_without_them():
    """CMPAGL's intra-class term pulls same-class pairs together: it needs classes. Without any
    (labels None or all -1) it is off, not a second copy of the matched-pair term."""
    out, cfg = _out(seg=False), LossConfig(kind="triplet", intra_class_weight=0.1)
    image, text = out["fused"], out["text"]
    assert set(retrieval_loss(out, cfg)[1]) == {"image_text"}
    assert set(retrieval_loss(out, cfg, labels=torch.tensor([-1, -1, -1]))[1]) == {"image_text"}
    dist = 1 - image @ text.T
    parts = retrieval_loss(out, cfg, labels=torch.tensor([0, 1, 0]))[1]
    want = torch.stack([(dist[0, 0] + dist[0, 2]) / 2, dist[1, 1], (dist[2, 0] + dist[2, 2]) / 2]).mean()
    assert parts["intra_class"].item() == pytest.approx(want.item())
    # a sample without a class (-1) is left out, and is nobody's classmate
    parts = retrieval_loss(out, cfg, labels=torch.tensor([0, -1, 0]))[1]
    assert parts["intra_class"].item() == pytest.approx(((dist[0, 0] + dist[0, 2]) / 2 + (dist[2, 0] + dist[2, 2]) / 2).item() / 2)
    sim = image @ text.T
    assert triplet_hardest(sim, 0.2, labels=torch.tensor([-1, -1, -1])).item() == pytest.approx(triplet_hardest(sim, 0.2).item())


def test_weights_scale_per_sample_terms():
    out = _out(seg=False)
    w = torch.tensor([1.0, 0.0, 0.0])
    total, _ = retrieval_loss(out, LossConfig(kind="triplet", intra_class_weight=0.0), weights=w)
    sim = out["image"] @ out["text"].T
    only0 = triplet_hardest(sim, 0.2, torch.tensor([1.0, 0.0, 0.0]))
    assert total.item() == pytest.approx(only0.item())
