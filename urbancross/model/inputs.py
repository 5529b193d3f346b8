"""Manifest rows -> model-ready arrays, as a Ray Data stage.

Decoding and augmentation run here, in Ray Data workers, so the training processes only
see ready tensors. The same class serves training (augmented) and inference (not).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from urbancross.config import Config
from urbancross.data.ingest import CAPTIONS_PER_SAMPLE, caption_texts, sample_key
from urbancross.data.manifest import decode_image, image_bytes
from urbancross.model.factory import get_tokenizer, image_transform


class ModelInputs:
    """Ray Data `map_batches` callable (batch_format="numpy"): rows -> arrays.

    Output columns: `key` int64 [B] (`sample_key(image_id)`), `images` float32 [B,3,H,W],
    `tokens` int64 [B,C,L] (C = 5 captions per image, cycled when fewer; the training loop
    draws one per epoch), `segments` float32 [B,S,3,H,W] and `segment_mask` bool [B,S]
    (S = data.num_segments, zeros/False where an image has fewer), and with
    `keep_ids=True` also `image_id` and `domain` (strings, for inference).
    """

    def __init__(self, cfg: Config, train: bool, keep_ids: bool = False, root: str = ""):
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
