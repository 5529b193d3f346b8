"""Remote-sensing retrieval recall (R@K both directions, mR), chunked for large galleries.

Protocol (RSICD/RSITMD, as in clip_benchmark): image->text R@K counts an image as a hit when
any of its ground-truth captions is among its top K texts; text->image R@K, per caption, when
its image is among the top K images. mR is the mean of all the recalls. Values are percent.
Only real captions are queries: the padding that fills 5 slots per image (`real_captions`
drops it) would count a repeated caption as another positive. Validation in `train/` and
test evaluation both score through `real_captions`, so they agree on the same split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _hits(scores: torch.Tensor, positive: torch.Tensor, k: int) -> int:
    """Rows of `scores` [Q,C] whose top-k column indices include their positive.

    `positive(idx)` maps top-k indices [Q,k] to a bool [Q,k]. Ties go exactly as torch.topk
    breaks them, i.e. as clip_benchmark's `recall_at_k` does.
    """
    idx = torch.topk(scores, min(k, scores.shape[1]), dim=1).indices
    return int(positive(idx).any(dim=1).sum())


def real_captions(
    text: torch.Tensor | np.ndarray, num_captions: torch.Tensor | np.ndarray | Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the real captions [M,D], the caption -> image index [M]) from per-image slots.

    `text` [N,C,D] holds C caption slots per image, of which the first `num_captions[i]` are
    real (the rest cycle them to fill C); captions come out image by image, in slot order.
    """
    t = torch.as_tensor(text)
    counts = torch.as_tensor(np.asarray(num_captions), dtype=torch.long).to(t.device)
    if t.ndim != 3 or counts.shape != (t.shape[0],):
        raise ValueError(f"text must be [N,C,D] and num_captions [N], got {tuple(t.shape)} and {tuple(counts.shape)}")
    keep = torch.arange(t.shape[1], device=t.device)[None, :] < counts[:, None]
    return t[keep], torch.arange(t.shape[0], device=t.device).repeat_interleave(keep.sum(1))


def retrieval_metrics(
    similarity: torch.Tensor | np.ndarray,
    image_of_text: torch.Tensor | np.ndarray | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 512,
) -> dict[str, float]:
    """R@K for image->text and text->image, and mR, from an [images, texts] similarity matrix.

    `image_of_text[t]` is the image index of caption t. The matrix is only read in blocks of
    `chunk_size` queries (a column block is copied once, to be contiguous), so a 10k x 50k
    gallery needs no full sort and no second full-size copy. An image without any caption can
    never be hit and still counts in the i2t denominator (as in clip_benchmark).
    Returns `i2t_r{k}`, `t2i_r{k}` for each k and `mR`.
    """
    sim = torch.as_tensor(similarity)
    if sim.ndim != 2:
        raise ValueError(f"similarity must be 2-D [images, texts], got shape {tuple(sim.shape)}")
    n_img, n_txt = sim.shape
    owner = torch.as_tensor(np.asarray(image_of_text), dtype=torch.long).to(sim.device)
    if owner.shape != (n_txt,):
        raise ValueError(f"image_of_text has shape {tuple(owner.shape)}, expected ({n_txt},): one image per text")
    if n_txt and (owner.min() < 0 or owner.max() >= n_img):
        raise ValueError(f"image_of_text values must be in [0, {n_img}), got [{int(owner.min())}, {int(owner.max())}]")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {list(ks)}")

    i2t = dict.fromkeys(ks, 0)
    for start in range(0, n_img, chunk_size):
        block = sim[start : start + chunk_size]
        rows = torch.arange(start, start + block.shape[0], device=sim.device)[:, None]
        for k in ks:
            i2t[k] += _hits(block, lambda idx: owner[idx] == rows, k)
    t2i = dict.fromkeys(ks, 0)
    for start in range(0, n_txt, chunk_size):
        block = sim[:, start : start + chunk_size].T.contiguous()
        own = owner[start : start + block.shape[0], None]
        for k in ks:
            t2i[k] += _hits(block, lambda idx: idx == own, k)

    out = {f"i2t_r{k}": 100.0 * i2t[k] / max(n_img, 1) for k in ks}
    out.update({f"t2i_r{k}": 100.0 * t2i[k] / max(n_txt, 1) for k in ks})
    out["mR"] = sum(out.values()) / len(out)
    return out
