"""Adversarial fine-tuning pieces: reversal sign, schedules, kept share, weighting."""

from __future__ import annotations

import math

import pytest
import torch

from urbancross.train.adversarial import (
    DomainDiscriminator,
    adversarial_weight,
    domain_loss,
    grad_reverse,
    kept_share,
    select_and_weight,
    step_phase,
    take_rows,
    target_likeness,
)


def test_grad_reverse_is_identity_forward_and_flips_scaled_gradient():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = grad_reverse(x, 0.5)
    assert torch.equal(y, x.detach())
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert x.grad.tolist() == [-0.5, -1.0, -1.5]


def test_reversal_pushes_encoder_against_the_discriminator():
    torch.manual_seed(0)
    enc, disc = torch.nn.Linear(4, 6), DomainDiscriminator(6, depth=2)
    x, labels = torch.randn(8, 4), torch.tensor([0.0] * 4 + [1.0] * 4)
    grads = []
    for rev in (False, True):
        enc.zero_grad(), disc.zero_grad()
        f = enc(x)
        loss, _ = domain_loss(disc(grad_reverse(f, 0.3) if rev else f), labels)
        loss.backward()
        grads.append((enc.weight.grad.clone(), disc.net[0].weight.grad.clone()))
    assert torch.allclose(grads[1][0], -0.3 * grads[0][0])  # encoder: reversed and scaled
    assert torch.allclose(grads[1][1], grads[0][1])  # discriminator: unchanged


def test_discriminator_sized_from_embedding():
    d = DomainDiscriminator(12, hidden=0, depth=3)
    linears = [m for m in d.net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(12, 12), (12, 12), (12, 1)]
    assert d(torch.randn(5, 12)).shape == (5,)
    assert [(m.in_features, m.out_features) for m in DomainDiscriminator(12, 7, 1).net] == [(12, 1)]


@pytest.mark.parametrize(
    "schedule, p, expected",
    [
        ("constant", 0.0, 0.1),
        ("linear", 0.3, 0.03),
        ("dann", 0.0, 0.0),
        ("dann", 0.1, 0.1 * (2 / (1 + math.exp(-1)) - 1)),  # 0.0462117
        ("dann", 0.5, 0.1 * 0.9866142981514305),
        ("dann", 2.0, 0.1 * (2 / (1 + math.exp(-10)) - 1)),  # progress clipped to 1
    ],
)
def test_adversarial_weight_schedules(schedule, p, expected):
    assert adversarial_weight(p, schedule, 0.1, gamma=10.0) == pytest.approx(expected)


def test_step_phase_alternates_disc_then_encoder():
    assert [step_phase("alternating", s) for s in range(4)] == ["disc", "encoder", "disc", "encoder"]
    assert {step_phase("grl", s) for s in range(4)} == {"grl"}


def test_kept_share_grows_from_the_easiest_like_the_reference():
    """The reference keeps 0.2 + 0.2 * cycle of each source batch (capped at 1), easiest first:
    the share grows; it never slides away from the most target-like rows."""
    assert [kept_share(e, 0.2, 0.2) for e in range(7)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0])
    assert [kept_share(e, 0.5, 0.25) for e in range(3)] == pytest.approx([0.5, 0.75, 1.0])
    assert kept_share(4, 0.3, 0.2, enabled=False) == 0.3
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7])
    kept = [set(select_and_weight(scores, kept_share(e, 0.2, 0.2))[0].tolist()) for e in range(5)]
    assert kept == [{1}, {1, 4}, {1, 4, 2}, {1, 4, 2, 3}, {0, 1, 2, 3, 4}]  # nested: the easiest stay in


def test_select_and_weight_hand_worked():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3])
    # floor 0 = the reference's exact min-max: the least similar kept row gets 0
    idx, w = select_and_weight(scores, 0.5, floor=0.0)
    assert idx.tolist() == [1, 2] and w.tolist() == pytest.approx([2.0, 0.0])
    idx, w = select_and_weight(scores, 0.75, floor=0.0)
    assert idx.tolist() == [1, 2, 3] and w.tolist() == pytest.approx([2.25, 0.75, 0.0])
    # the default floor 0.5: min-max into [0.5, 1] then mean 1 -> no kept row is zeroed
    idx, w = select_and_weight(scores, 0.75)
    assert idx.tolist() == [1, 2, 3] and w.tolist() == pytest.approx([18 / 13, 12 / 13, 9 / 13])  # [1, 2/3, 1/2] * 3 / (13/6)
    assert float(w.min()) > 0 and float(w.mean()) == pytest.approx(1.0)
    assert select_and_weight(scores, 1.0, floor=1.0)[1].tolist() == [1.0] * 4  # floor 1: uniform
    assert select_and_weight(scores, 0.1)[0].tolist() == [1]  # at least one row
    idx, w = select_and_weight(torch.ones(4), 0.5)
    assert w.tolist() == [1.0, 1.0]
    s = torch.tensor([0.2, 0.4], requires_grad=True)
    assert not select_and_weight(s * 2, 1.0)[1].requires_grad


def test_domain_loss_weights_source_rows_and_balances_domains():
    """Per-row weights scale each source row's BCE term (the reference's W * log p); the two
    domains count equally whatever share of the source is kept."""
    import torch.nn.functional as F

    logits = torch.tensor([0.5, -1.0, 2.0, 0.3, -0.2])
    labels = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0])
    w = torch.tensor([2.0, 1.0, 0.0, 1.0, 1.0])
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    expected = ((2 * bce[0] + bce[1]) / 3 + bce[3:].mean()) / 2
    assert domain_loss(logits, labels, w)[0].item() == pytest.approx(expected.item())
    assert domain_loss(logits, labels)[0].item() == pytest.approx(((bce[:3].mean() + bce[3:].mean()) / 2).item())


def test_target_likeness_and_take_rows():
    src = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert target_likeness(src, torch.tensor([[1.0, 0.0], [3.0, 0.0]])).tolist() == pytest.approx([1.0, 0.0])
    assert target_likeness(src, torch.tensor([[1.0, 0.0], [0.0, 1.0]])).tolist() == pytest.approx([0.5, 0.5])
    out = {"image": torch.arange(6).view(3, 2), "logit_scale": torch.tensor(2.0), "extra": {"t": torch.arange(3)}}
    got = take_rows(out, torch.tensor([2, 0]), 3)
    assert got["image"].tolist() == [[4, 5], [0, 1]] and got["extra"]["t"].tolist() == [2, 0]
    assert got["logit_scale"].item() == 2.0


def test_adapt_schedule_is_the_stage_2_schedule_at_each_step():
    """The one schedule both adapt loops use: weight by progress through the passes, kept share
    by pass, phase by optimizer step; progress within a pass is capped at its step count."""
    from urbancross.config import AdaptConfig
    from urbancross.train.adversarial import AdaptSchedule

    a = AdaptConfig(epochs=4, schedule="dann", max_weight=0.1, gamma=10.0, mode="alternating")
    s = AdaptSchedule(a, steps_per_epoch=10)
    assert s.weight(0, 0) == 0.0
    assert s.weight(1, 5) == pytest.approx(0.1 * (2 / (1 + math.exp(-10 * 1.5 / 4)) - 1))
    assert s.weight(3, 10) == s.weight(3, 99) == pytest.approx(0.1 * (2 / (1 + math.exp(-10.0)) - 1))  # end of the last pass
    assert [s.share(e) for e in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])  # the defaults: the reference's pacing
    assert AdaptSchedule(AdaptConfig(), 1).share(AdaptConfig().epochs - 1) == pytest.approx(1.0)  # default passes reach 100%
    assert [s.phase(g) for g in (0, 1, 2, 7)] == ["disc", "encoder", "disc", "encoder"]
    linear = AdaptSchedule(AdaptConfig(epochs=2, schedule="linear", max_weight=1.0, curriculum=False, select_fraction=0.5), 0)
    assert linear.steps_per_epoch == 1 and linear.weight(0, 1) == pytest.approx(0.5) and linear.share(1) == 0.5
    assert linear.phase(5) == "grl"
