"""Curriculum: difficulty scores, pacing values, easiest-first selection (hand-worked numbers)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from urbancross.config import CurriculumConfig
from urbancross.train.curriculum import (
    Curriculum,
    caption_complexity,
    easiest_keys,
    keep_mask,
    margin_difficulty,
    pacing_fraction,
    similarity_margin,
    update_scores,
)


@pytest.mark.parametrize(
    "pacing, epoch, expected",
    [
        ("linear", 0, 0.25),
        ("root", 0, 0.25),
        ("geometric", 0, 0.25),
        ("linear", 2, 0.625),  # ramp of ceil(0.5 * 10) = 5 epochs: t = 2 / 4 = 0.5
        ("root", 2, math.sqrt(0.53125)),  # sqrt(0.0625 + 0.9375 * 0.5)
        ("geometric", 2, 0.25**0.5),
        ("linear", 3, 0.8125),
        ("linear", 4, 1.0),  # the ramp's last epoch sees everything
        ("root", 9, 1.0),
        ("geometric", 7, 1.0),
    ],
)
def test_pacing_documented_values(pacing, epoch, expected):
    assert pacing_fraction(epoch, 10, pacing, 0.25, 0.5) == pytest.approx(expected)


def test_pacing_is_monotone_and_rejects_unknown():
    for pacing in ("linear", "root", "geometric"):
        values = [pacing_fraction(e, 8, pacing, 0.3, 0.6) for e in range(8)]
        assert values == sorted(values) and values[-1] == 1.0
    with pytest.raises(ValueError, match="unknown pacing"):
        pacing_fraction(0, 4, "cubic", 0.3, 0.6)


def test_pacing_reaches_all_data_by_the_last_ramp_epoch_for_every_tune_value():
    """Every pacing, start and length the curriculum space can sample (its ranges, read from the
    file) and any epoch count: the ramp's last epoch, ceil(length * epochs) - 1, sees 100%."""
    from urbancross.tune.space import load_space

    space = load_space(Path(__file__).resolve().parents[1] / "tune_spaces" / "curriculum.yaml").params
    pacings = space["train.curriculum.pacing"].args
    s_lo, s_hi = space["train.curriculum.start_fraction"].args
    l_lo, l_hi = space["train.curriculum.length"].args
    assert pacing_fraction(5, 6, "root", 0.3, 1.0) == 1.0  # was 0.92
    for pacing in pacings:
        for s0 in np.linspace(s_lo, s_hi, 6):
            for length in np.linspace(l_lo, l_hi, 15):
                for epochs in range(1, 61):
                    last = max(1, math.ceil(length * epochs - 1e-9)) - 1
                    values = [pacing_fraction(e, epochs, pacing, float(s0), float(length)) for e in range(epochs)]
                    assert values[last] == 1.0 and values[-1] == 1.0, (pacing, s0, length, epochs)
                    assert values == sorted(values)
                    if last > 0:
                        assert values[0] == pytest.approx(s0) and values[last - 1] < 1.0


def test_similarity_margin_hand_worked():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # sim = [[1, .6], [0, .8]]: pair 0 hardest negative .6 (i2t), pair 1 hardest .6 (t2i)
    assert similarity_margin(image, text).tolist() == pytest.approx([0.4, 0.2])
    assert margin_difficulty(image, text).tolist() == pytest.approx([-0.4, -0.2])


def test_similarity_margin_chunked_equals_dense():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(37, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(37, 8, generator=g), dim=-1)
    sim = img @ txt.T
    eye = torch.eye(37, dtype=torch.bool)
    hardest = torch.maximum(sim.masked_fill(eye, -9).max(1).values, sim.T.masked_fill(eye, -9).max(1).values)
    assert torch.allclose(similarity_margin(img, txt, chunk=5), sim.diag() - hardest)


def test_caption_complexity_counts_distinct_words():
    assert caption_complexity(["a red roof, a red car", "Trees"]) == pytest.approx((4 + 1) / 2)
    assert caption_complexity([]) == 0.0


def test_easiest_keys_ties_by_key_and_rounds_up():
    scores = {10: 0.5, 20: -1.0, 30: 0.2, 40: 0.2}
    assert easiest_keys(scores, 0.5).tolist() == [20, 30]
    assert easiest_keys(scores, 0.6).tolist() == [20, 30, 40]  # ceil(2.4) = 3
    assert easiest_keys(scores, 0.01).tolist() == [20]  # never empty
    assert keep_mask(np.array([40, 20, 99]), easiest_keys(scores, 0.5)).tolist() == [False, True, False]
    assert keep_mask(np.array([1, 2]), None).tolist() == [True, True]


def test_curriculum_exposes_easiest_first_then_everything():
    scores = {k: float(k) for k in range(100)}  # key k has difficulty k
    cur = Curriculum(CurriculumConfig(pacing="linear", start_fraction=0.2, length=0.75), epochs=4, scores=scores)
    first = cur.allowed(0)
    assert first.tolist() == list(range(20))
    assert cur.allowed(1).tolist() == list(range(60))  # ramp of 3 epochs: 0.2 + 0.8 * 0.5
    assert cur.allowed(2) is None and cur.allowed(3) is None
    off = Curriculum(CurriculumConfig(enabled=False), epochs=4, scores=scores)
    assert off.allowed(0) is None and off.fraction(0) == 1.0


def test_rescore_schedule_and_state_roundtrip():
    cfg = CurriculumConfig(difficulty="similarity_margin", pacing="linear", start_fraction=0.2, length=1.0, rescore_every=2)
    cur = Curriculum(cfg, epochs=6, scores={1: 0.5, 2: -0.5})
    assert [e for e in range(6) if cur.rescore_due(e)] == [1, 3]  # not after the last epoch
    fixed = Curriculum(CurriculumConfig(difficulty="caption_complexity"), epochs=6, scores={})
    assert not any(fixed.rescore_due(e) for e in range(6))
    assert Curriculum.scores_from_state(cur.state()) == {1: 0.5, 2: -0.5}
    assert update_scores({1: 0.5, 2: -0.5}, [2, 3], [7.0, 8.0]) == {1: 0.5, 2: 7.0, 3: 8.0}
