"""Learning-rate schedule of a training stage: linear warm-up to the peak, then cosine decay.

A pure function of the optimizer step, so a resumed run (DeepSpeed restores the scheduler's
step count) continues on the same curve. Train and adapt each have a `lr_schedule` section
(the same `LRScheduleConfig`, one set of defaults) and their own peak (`train.lr`,
`adapt.lr`, far lower: fine-tuning a trained model must not undo it).
"""

from __future__ import annotations

import math

from urbancross.config import LRScheduleConfig


def lr_factor(step: int, total: int, cfg: LRScheduleConfig) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based) of `total`.

    `cosine`: the first w = ceil(warmup * total) steps rise linearly to 1 (step w-1 is at 1),
    then 0.5 * (1 + cos(pi * p)) brings it from 1 down to `final` at the last step (p goes 0
    to 1 over the remaining steps); steps past `total` stay at `final`. `constant`: always 1.
    """
    if cfg.kind == "constant":
        return 1.0
    total = max(1, int(total))
    warm = math.ceil(cfg.warmup * total - 1e-9)
    if step < warm:
        return (step + 1) / warm
    p = min(1.0, (step - warm) / max(1, total - warm - 1)) if total - warm > 1 else 1.0
    return cfg.final + (1.0 - cfg.final) * 0.5 * (1.0 + math.cos(math.pi * p))
