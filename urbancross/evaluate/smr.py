"""SMR: similarity-matrix re-weighting (CMPAGL) after GaLR's multivariate re-ranking.

GaLR (xiaoyuan1996/GaLR, postprocessing/rerank.py, `i2t_rerank_optim`) re-scores each query's
top-K candidates by (a) the candidate's column-normalised similarity, (b) its forward rank and
(c) its rank in the reverse direction, zeroing everything else, and keeps one matrix per
direction. Here both directions share ONE matrix, so `retrieval_metrics` runs on it unchanged:

    R[i,t] = s[i,t]
           + [t in top-k texts of image i]  * ( a * (s[i,t]+1) / sum_i' (s[i',t]+1) + b * exp(-lam * (r_it + 1)) )
           + [i in top-k images of text t]  * ( a * (s[i,t]+1) / sum_t' (s[i,t']+1) + b * exp(-lam * (r_ti + 1)) )

with r_it the 0-based rank of t in image i's list, r_ti that of i in text t's list, and
a = score_weight, b = rank_weight, lam = decay (GaLR: exp(-0.05 * (rank + 1))). For an image
query, the second line is the reverse-direction term: a text that also ranks the image among
its own top k is promoted. Differences from GaLR, on purpose: one shared forward/reverse
weight (a symmetric matrix cannot weight them differently), the reverse term is the reverse
rank itself truncated at k (GaLR: the order of the candidates' full reverse ranks), pairs
outside both top-k lists keep s[i,t] instead of 0, and similarities are shifted by +1
(cosine in [-1, 1]) so the column/row normalisers are positive.

Cost: one top-k per query in each direction, chunked; memory: one output copy of the matrix.
"""

from __future__ import annotations

import numpy as np
import torch

from urbancross.config import SMRConfig


def smr_rerank(similarity: torch.Tensor | np.ndarray, cfg: SMRConfig, chunk_size: int = 512) -> torch.Tensor:
    """Re-weighted copy of an [images, texts] cosine-similarity matrix (see module docstring)."""
    s = torch.as_tensor(similarity, dtype=torch.float32)
    if s.ndim != 2:
        raise ValueError(f"similarity must be 2-D [images, texts], got shape {tuple(s.shape)}")
    if not cfg.enabled:
        return s
    if s.numel() and float(s.min()) < -1.0 - 1e-4:
        raise ValueError("smr_rerank expects cosine similarities in [-1, 1] (not logits)")
    n_img, n_txt = s.shape
    col_norm = s.sum(0) + n_img  # sum_i' (s[i',t] + 1), [T]
    row_norm = s.sum(1) + n_txt  # sum_t' (s[i,t'] + 1), [I]
    out = s.clone()
    flat = out.view(-1)

    k = min(cfg.k, n_txt)
    rank_bonus = cfg.rank_weight * torch.exp(-cfg.decay * torch.arange(1, k + 1, dtype=torch.float32))
    for start in range(0, n_img, chunk_size):
        vals, idx = s[start : start + chunk_size].topk(k, dim=1)  # [c,k]
        rows = torch.arange(start, start + vals.shape[0])[:, None]
        bonus = cfg.score_weight * (vals + 1) / col_norm[idx] + rank_bonus
        flat.index_add_(0, (rows * n_txt + idx).reshape(-1), bonus.reshape(-1))

    k = min(cfg.k, n_img)
    rank_bonus = cfg.rank_weight * torch.exp(-cfg.decay * torch.arange(1, k + 1, dtype=torch.float32))[:, None]
    for start in range(0, n_txt, chunk_size):
        vals, idx = s[:, start : start + chunk_size].topk(k, dim=0)  # [k,c]
        cols = torch.arange(start, start + vals.shape[1])[None, :]
        bonus = cfg.score_weight * (vals + 1) / row_norm[idx] + rank_bonus
        flat.index_add_(0, (idx * n_txt + cols).reshape(-1), bonus.reshape(-1))
    return out
