"""Manifest rows -> model-ready arrays, as a Ray Data stage.

Decoding and augmentation run here, in Ray Data workers, so the training processes only
see ready tensors. The same class serves training (augmented) and inference (not).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from urbancross.config import Config
from urbancross.data.ingest import CAPTIONS_PER_SAMPLE, caption_texts, label_id, sample_key
from urbancross.data.manifest import decode_image, image_bytes
from urbancross.model.factory import cache_transform, get_tokenizer, image_transform


class ModelInputs:
    """Ray Data `map_batches` callable (batch_format="numpy"): rows -> arrays.

    Output columns: `key` int64 [B] (`sample_key(image_id)`), `label` int64 [B] (the scene
    class, `label_id`: -1 where the row has none), `images` float32 [B,3,H,W],
    `tokens` int64 [B,C,L] (C = 5 captions per image, cycled when fewer; the training loop
    draws one per epoch), `num_captions` int64 [B] (how many of the C are real: validation and
    evaluation score only those), `segments` float32 [B,S,3,H,W] and `segment_mask` bool [B,S]
    (S = data.num_segments; True only for the row's `num_real_segments` real SAM segments: the
    grid fills preprocessing pads with are not segments, so they are neither decoded nor seen by
    the fusion or the segment losses), and with
    `keep_ids=True` also `image_id` and `domain` (strings, for inference). `cache=True`: images
    and segments uint8 in the evaluation geometry, tokens int32 (what training caches).
    """

    def __init__(self, cfg: Config, train: bool, keep_ids: bool = False, root: str = "", cache: bool = False):
        self.cfg = cfg
        self.keep_ids = keep_ids
        self.root = root or cfg.data.root or os.path.dirname(os.path.abspath(cfg.data.manifest or "."))
        self.dtype = np.uint8 if cache else np.float32
        if cache:  # decoded once per run: uint8, not augmented, tokens int32 (`urbancross.train.cache`)
            self.transform = self.segment_transform = cache_transform(cfg.model)
        else:
            self.transform = image_transform(cfg.model, train=train and cfg.data.augment)
            self.segment_transform = image_transform(cfg.model, train=False)
        self.tokens_dtype = np.int32 if cache else np.int64
        self.tokenize = get_tokenizer(cfg.model)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        images = np.stack([self._image(r) for r in rows])
        captions, counts = [], []
        for r in rows:
            caps = caption_texts(r, self.cfg)
            captions.extend(caps[i % len(caps)] for i in range(CAPTIONS_PER_SAMPLE))
            counts.append(min(len(caps), CAPTIONS_PER_SAMPLE))
        tokens = np.asarray(self.tokenize(captions), dtype=self.tokens_dtype)
        out = {
            "key": np.array([sample_key(str(r["image_id"])) for r in rows], dtype=np.int64),
            "label": np.array([label_id(r.get("label")) for r in rows], dtype=np.int64),
            "images": images,
            "tokens": tokens.reshape(len(rows), CAPTIONS_PER_SAMPLE, -1),
            "num_captions": np.array(counts, dtype=np.int64),
        }
        if self.cfg.model.uses_segments:
            out["segments"], out["segment_mask"] = self._segments(rows, images.shape[1:])
        if self.keep_ids:
            out["image_id"] = np.array([str(r["image_id"]) for r in rows], dtype=object)
            out["domain"] = np.array([str(r["domain"]) for r in rows], dtype=object)
        return out

    def _image(self, row: dict[str, Any]) -> np.ndarray:
        where = row.get("source") or str(row["image_id"])
        img = decode_image(image_bytes(row, self.root), where)
        return np.asarray(self.transform(img), dtype=self.dtype)

    def _segments(self, rows: list[dict[str, Any]], shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        s = self.cfg.data.num_segments
        segs = np.zeros((len(rows), s, *shape), dtype=self.dtype)
        mask = np.zeros((len(rows), s), dtype=bool)
        for i, r in enumerate(rows):
            stored = list(r.get("segments") if r.get("segments") is not None else [])
            real = r.get("num_real_segments")  # None, or NaN where Ray Data filled a missing column
            known = real is not None and real == real
            for j, data in enumerate(stored[: min(s, int(real) if known else len(stored))]):
                where = f"{r.get('source') or r['image_id']} segment {j}"
                segs[i, j] = np.asarray(self.segment_transform(decode_image(data, where)), dtype=self.dtype)
                mask[i, j] = True
        return segs, mask
