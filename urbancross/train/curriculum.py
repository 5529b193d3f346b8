"""Adaptive curriculum sampling (UrbanCross): difficulty scores, pacing, easiest-first selection.

Each training sample (keyed by `sample_key(image_id)`) carries a difficulty score; higher is
harder. A pacing function maps the epoch to the share of the data the epoch draws from, and
the selection keeps that share of the samples, easiest first. Scores are either the caption
complexity (fixed; also the cold start) or the current model's image-text similarity margin,
recomputed every few epochs from embeddings gathered over all workers.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

_WORD = re.compile(r"[a-z0-9]+")


# --------------------------------------------------------------------------- difficulty


def caption_complexity(captions: Sequence[str]) -> float:
    """Mean number of distinct words per caption: longer, more varied captions are harder."""
    if not captions:
        return 0.0
    return float(np.mean([len(set(_WORD.findall(c.lower()))) for c in captions]))


def similarity_margin(image: torch.Tensor, text: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Per-pair margin: matched similarity minus the hardest negative, both directions.

    `image`, `text` [N,D] L2-normalised, row i of each is a matched pair. Returns [N]:
    `s_ii - max(max_{j!=i} s_ij, max_{j!=i} s_ji)`. Large = easy. Chunked so N x N
    never sits in memory at once.
    """
    n = image.shape[0]
    pos = (image * text).sum(-1)
    hardest = torch.full((n,), -math.inf, dtype=image.dtype, device=image.device)
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n), device=image.device)
        for a, b in ((image, text), (text, image)):
            sim = a[rows] @ b.T
            sim[torch.arange(len(rows)), rows] = -math.inf
            hardest[rows] = torch.maximum(hardest[rows], sim.max(dim=1).values)
    if n == 1:
        hardest.zero_()
    return pos - hardest


def margin_difficulty(image: torch.Tensor, text: torch.Tensor) -> np.ndarray:
    """Difficulty from the model's view: the negated similarity margin."""
    return (-similarity_margin(image.float(), text.float())).cpu().numpy()


# --------------------------------------------------------------------------- pacing


def pacing_fraction(epoch: int, epochs: int, pacing: str, start_fraction: float, length: float) -> float:
    """Share of the data (easiest first) that epoch `epoch` (0-based) of `epochs` draws from.

    The ramp spans the first n = ceil(length * epochs) epochs and its last epoch (n - 1) sees
    all the data, whatever `length` (with n = 1 there is no ramp). With progress
    t = min(1, epoch / (n - 1)) and start s0: linear s0 + (1 - s0) t; root
    sqrt(s0^2 + (1 - s0^2) t) (Platanios et al. 2019); geometric s0^(1 - t) (exponential
    growth from s0 to 1). All give s0 at t=0 and 1 at t=1.
    """
    ramp = max(1, math.ceil(length * epochs - 1e-9))
    t = min(1.0, epoch / (ramp - 1)) if ramp > 1 else 1.0
    s0 = start_fraction
    if pacing in ("linear", "root", "geometric") and t >= 1.0:
        return 1.0  # exactly: root's sqrt(s0^2 + (1 - s0^2)) can round just below 1
    if pacing == "linear":
        frac = s0 + (1.0 - s0) * t
    elif pacing == "root":
        frac = math.sqrt(s0 * s0 + (1.0 - s0 * s0) * t)
    elif pacing == "geometric":
        frac = s0 ** (1.0 - t)
    else:
        raise ValueError(f"unknown pacing {pacing!r}; expected linear, root or geometric")
    return min(1.0, frac)


# --------------------------------------------------------------------------- selection


def easiest_keys(scores: Mapping[int, float], fraction: float) -> np.ndarray:
    """Sorted keys of the easiest `ceil(fraction * N)` samples (ties broken by key)."""
    if not scores:
        return np.zeros(0, dtype=np.int64)
    keys = np.fromiter(scores.keys(), dtype=np.int64, count=len(scores))
    values = np.fromiter(scores.values(), dtype=np.float64, count=len(scores))
    count = max(1, math.ceil(fraction * len(keys) - 1e-9))
    order = np.lexsort((keys, values))  # by score, then key
    return np.sort(keys[order[:count]])


def keep_mask(keys: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    """Which rows of a batch the epoch trains on (`allowed` None = everything)."""
    keys = np.asarray(keys, dtype=np.int64)
    if allowed is None:
        return np.ones(len(keys), dtype=bool)
    return np.isin(keys, allowed, assume_unique=False)


def update_scores(scores: dict[int, float], keys: Iterable[int], values: Iterable[float]) -> dict[int, float]:
    """New scores win; samples not rescored keep their previous score."""
    out = dict(scores)
    out.update({int(k): float(v) for k, v in zip(keys, values)})
    return out


class Curriculum:
    """Which samples an epoch draws from, given config and the current difficulty scores."""

    def __init__(self, cfg, epochs: int, scores: Mapping[int, float]):
        self.cfg = cfg
        self.epochs = epochs
        self.scores = dict(scores)

    def fraction(self, epoch: int) -> float:
        if not self.cfg.enabled:
            return 1.0
        return pacing_fraction(epoch, self.epochs, self.cfg.pacing, self.cfg.start_fraction, self.cfg.length)

    def allowed(self, epoch: int) -> np.ndarray | None:
        """Sorted allowed keys for `epoch`, or None when the epoch uses everything."""
        frac = self.fraction(epoch)
        if frac >= 1.0 or not self.scores:
            return None
        return easiest_keys(self.scores, frac)

    def rescore_due(self, epoch: int) -> bool:
        """Collect embeddings during `epoch` to rescore after it (margin difficulty only)."""
        c = self.cfg
        return (
            c.enabled
            and c.difficulty == "similarity_margin"
            and (epoch + 1) % max(1, c.rescore_every) == 0
            and epoch + 1 < self.epochs
            and self.fraction(epoch + 1) < 1.0  # once all data is in, scores change nothing
        )

    def state(self) -> dict:
        return {"keys": np.fromiter(self.scores, dtype=np.int64), "values": np.fromiter(self.scores.values(), dtype=np.float64)}

    @staticmethod
    def scores_from_state(state: Mapping[str, np.ndarray]) -> dict[int, float]:
        return {int(k): float(v) for k, v in zip(state["keys"], state["values"])}
