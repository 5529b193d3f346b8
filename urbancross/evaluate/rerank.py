"""Retrieval as CMPAGL/ALBEF-style models do it: rank by the pre-aligned similarity, re-score the
top k with the matching (ITM) head, then SMR. Pure functions on [images, texts] matrices.

Each stage is ONE [images, texts] matrix, so `retrieval_metrics` (rows: image->text, columns:
text->image) and `smr_rerank` read every stage unchanged:

- `prealign`: S, the cosine similarity of the pre-aligned embeddings (the whole gallery);
- `itm`: every pair in either direction's top k of S (each image's k best texts and each
  text's k best images) gets the matching head's probability p, and

      R[i,t] = (1 - w) * p(i,t) + w * (S[i,t] + 1) / 2    for re-scored pairs   (in [0, 1])
      R[i,t] = (S[i,t] - 1) / 2                             for the others        (in [-1, 0])

  so re-scored candidates rank above all others, ordered by p (w = `sim_weight` lets S break
  near-ties, as ALBEF adds the contrastive similarity to the ITM score), the others keep S's
  order, and R stays a cosine-like matrix in [-1, 1] as SMR expects. A query may see a few more
  than k re-scored candidates: pairs that made the *other* direction's top k are scored too.
- `itm_smr`: SMR on R; `prealign_smr`: SMR on S (the ablation without the matching head).

Cost: the matching head runs on at most (images + texts) * k pairs, in batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import torch

from urbancross.config import SMRConfig
from urbancross.evaluate.metrics import retrieval_metrics
from urbancross.evaluate.smr import smr_rerank

STAGES = ("prealign", "prealign_smr", "itm", "itm_smr")


def candidate_pairs(similarity: torch.Tensor, k: int, chunk_size: int = 512) -> torch.Tensor:
    """[P,2] (image, text) index pairs, sorted and unique, in either direction's top k of `similarity`."""
    s = _matrix(similarity)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n_img, n_txt = s.shape
    keys = []
    for start in range(0, n_img, chunk_size):
        idx = s[start : start + chunk_size].topk(min(k, n_txt), dim=1).indices  # texts of each image
        rows = torch.arange(start, start + idx.shape[0])[:, None]
        keys.append((rows * n_txt + idx).reshape(-1))
    for start in range(0, n_txt, chunk_size):
        idx = s[:, start : start + chunk_size].topk(min(k, n_img), dim=0).indices  # images of each text
        cols = torch.arange(start, start + idx.shape[1])[None, :]
        keys.append((idx * n_txt + cols).reshape(-1))
    flat = torch.unique(torch.cat(keys)) if keys else torch.zeros(0, dtype=torch.long)
    return torch.stack([flat // n_txt, flat % n_txt], dim=1)


def itm_matrix(similarity: torch.Tensor, pairs: torch.Tensor, scores: torch.Tensor, sim_weight: float = 0.1) -> torch.Tensor:
    """The `itm` stage matrix R from S, the re-scored `pairs` [P,2] and their match probabilities [P]."""
    s = _matrix(similarity)
    scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
    if scores.shape[0] != pairs.shape[0]:
        raise ValueError(f"{pairs.shape[0]} pairs but {scores.shape[0]} scores")
    if scores.numel() and (float(scores.min()) < 0.0 or float(scores.max()) > 1.0):
        raise ValueError("scores must be match probabilities in [0, 1]")
    if not 0.0 <= sim_weight <= 1.0:
        raise ValueError(f"sim_weight must be in [0, 1], got {sim_weight}")
    out = (s - 1) / 2
    i, t = pairs[:, 0], pairs[:, 1]
    out[i, t] = (1 - sim_weight) * scores + sim_weight * (s[i, t] + 1) / 2
    return out


def rerank_stages(
    similarity: torch.Tensor | np.ndarray,
    score_pairs: Callable[[torch.Tensor], torch.Tensor],
    *,
    k: int,
    smr: SMRConfig,
    sim_weight: float = 0.1,
    batch_size: int = 256,
) -> dict[str, torch.Tensor]:
    """Every stage's matrix (`STAGES`), from S and `score_pairs`: [n,2] pairs -> [n] P(match).

    `score_pairs` is called on batches of at most `batch_size` candidate pairs, e.g.
    `CMPAGLModel.pair_scorer(image_tokens, tokens)`. SMR is applied with `smr` (its `enabled`
    flag is ignored here: both with and without SMR are returned).
    """
    s = _matrix(similarity)
    pairs = candidate_pairs(s, k)
    scores = [torch.as_tensor(score_pairs(pairs[b : b + batch_size])).float().reshape(-1).cpu()
              for b in range(0, pairs.shape[0], batch_size)]
    r = itm_matrix(s, pairs, torch.cat(scores) if scores else torch.zeros(0), sim_weight)
    on = dataclasses.replace(smr, enabled=True)
    return {"prealign": s, "prealign_smr": smr_rerank(s, on), "itm": r, "itm_smr": smr_rerank(r, on)}


def stage_metrics(
    stages: dict[str, torch.Tensor], image_of_text: Sequence[int] | np.ndarray | torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, dict[str, float]]:
    """R@K (both directions) and mR per stage, so each stage's gain is visible."""
    return {name: retrieval_metrics(matrix, image_of_text, ks) for name, matrix in stages.items()}


def _matrix(similarity) -> torch.Tensor:
    s = torch.as_tensor(similarity, dtype=torch.float32)
    if s.ndim != 2:
        raise ValueError(f"similarity must be 2-D [images, texts], got shape {tuple(s.shape)}")
    if s.numel() and (float(s.min()) < -1.0 - 1e-4 or float(s.max()) > 1.0 + 1e-4):
        raise ValueError("similarity must be cosine similarities in [-1, 1] (not logits)")
    return s
