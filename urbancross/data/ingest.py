"""Manifest rows -> model-ready arrays, as a Ray Data stage.

Decoding and augmentation run here, in Ray Data workers, so the training processes only
see ready tensors. The same class serves training (augmented) and inference (not).
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import numpy as np

from urbancross.config import Config
from urbancross.data.manifest import ManifestError, decode_image, filter_rows, image_bytes, read_manifest

log = logging.getLogger(__name__)

CAPTIONS_PER_SAMPLE = 5  # the releases' 5 captions per image; fewer are cycled to fill


def sample_key(image_id: str) -> int:
    """Stable 63-bit key of an image id: the same on every worker, epoch and run."""
    return int.from_bytes(hashlib.blake2b(image_id.encode(), digest_size=8).digest(), "little") >> 1


def caption_texts(row: dict[str, Any], cfg: Config) -> list[str]:
    """The captions a stage trains/evaluates on: refined ones when configured and present."""
    refined = row.get("refined_captions")
    if cfg.data.use_refined_captions and refined is not None and len(refined) > 0:
        caps = [str(c) for c in refined]
    else:
        caps = [str(c) for c in row["captions"]]
    if not caps:
        raise ManifestError(f"{row.get('source') or row.get('image_id')}: image has no captions")
    return caps


class ModelInputs:
    """Ray Data `map_batches` callable (batch_format="numpy"): rows -> arrays.

    Output columns: `key` int64 [B] (`sample_key(image_id)`), `images` float32 [B,3,H,W],
    `tokens` int64 [B,C,L] (C = 5 captions per image, cycled when fewer; the training loop
    draws one per epoch), `segments` float32 [B,S,3,H,W] and `segment_mask` bool [B,S]
    (S = data.num_segments, zeros/False where an image has fewer), and with
    `keep_ids=True` also `image_id` and `domain` (strings, for inference).
    """

    def __init__(self, cfg: Config, train: bool, keep_ids: bool = False, root: str = ""):
        from urbancross.model.factory import get_tokenizer, image_transform

        self.cfg = cfg
        self.keep_ids = keep_ids
        self.root = root or cfg.data.root or os.path.dirname(os.path.abspath(cfg.data.manifest or "."))
        self.transform = image_transform(cfg.model, train=train and cfg.data.augment)
        self.segment_transform = image_transform(cfg.model, train=False)
        self.tokenize = get_tokenizer(cfg.model)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        images = np.stack([self._image(r) for r in rows])
        captions = []
        for r in rows:
            caps = caption_texts(r, self.cfg)
            captions.extend(caps[i % len(caps)] for i in range(CAPTIONS_PER_SAMPLE))
        tokens = np.asarray(self.tokenize(captions), dtype=np.int64)
        out = {
            "key": np.array([sample_key(str(r["image_id"])) for r in rows], dtype=np.int64),
            "images": images,
            "tokens": tokens.reshape(len(rows), CAPTIONS_PER_SAMPLE, -1),
        }
        if self.cfg.model.use_segments:
            out["segments"], out["segment_mask"] = self._segments(rows, images.shape[1:])
        if self.keep_ids:
            out["image_id"] = np.array([str(r["image_id"]) for r in rows], dtype=object)
            out["domain"] = np.array([str(r["domain"]) for r in rows], dtype=object)
        return out

    def _image(self, row: dict[str, Any]) -> np.ndarray:
        where = row.get("source") or str(row["image_id"])
        img = decode_image(image_bytes(row, self.root), where)
        return np.asarray(self.transform(img), dtype=np.float32)

    def _segments(self, rows: list[dict[str, Any]], shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        s = self.cfg.data.num_segments
        segs = np.zeros((len(rows), s, *shape), dtype=np.float32)
        mask = np.zeros((len(rows), s), dtype=bool)
        for i, r in enumerate(rows):
            for j, data in enumerate(list(r.get("segments") if r.get("segments") is not None else [])[:s]):
                where = f"{r.get('source') or r['image_id']} segment {j}"
                segs[i, j] = np.asarray(self.segment_transform(decode_image(data, where)), dtype=np.float32)
                mask[i, j] = True
        return segs, mask


def read_split(cfg: Config, split: str, domain: str | None = None, manifest: str | None = None):
    """One split (and domain) of the manifest as an Arrow table; empty is an error.

    Images without any caption (kept by the importers, e.g. RSITMD's blank caption lines)
    can be neither trained on nor queried: they are left out here, and counted in the log.
    """
    import pyarrow.compute as pc

    table = filter_rows(read_manifest(manifest or cfg.data.manifest), split=split, domain=domain)
    has = pc.greater(pc.fill_null(pc.list_value_length(table["captions"]), 0), 0)
    if cfg.data.use_refined_captions:
        has = pc.or_(has, pc.greater(pc.fill_null(pc.list_value_length(table["refined_captions"]), 0), 0))
    if not pc.all(has).as_py():
        left_out = table.num_rows - pc.sum(has).as_py()
        log.info("%s: %d %s image(s) without captions left out", manifest or cfg.data.manifest, left_out, split)
        table = table.filter(has)
    if table.num_rows == 0:
        raise ManifestError(f"{manifest or cfg.data.manifest}: no {split} images with captions (domain={domain!r})")
    return table


def pick_caption(tokens, keys, epoch: int, seed: int):
    """One caption per sample for this epoch, seeded by (seed, epoch, sample key).

    `tokens` [B,C,L] (torch or numpy), `keys` [B] -> [B,L]. Deterministic, so a resumed
    run sees the same captions as an uninterrupted one.
    """
    import torch

    keys = torch.as_tensor(keys, dtype=torch.int64)
    c = tokens.shape[1]
    mixed = (keys ^ (seed * 1_000_003 + epoch * 7_919)) % 2_147_483_647
    idx = (mixed * 48_271 % 2_147_483_647) % c
    tokens = torch.as_tensor(tokens)
    return tokens[torch.arange(tokens.shape[0]), idx.to(tokens.device)]
