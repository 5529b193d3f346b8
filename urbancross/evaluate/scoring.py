"""Scoring collected embeddings: one gallery per test domain, plain and SMR-re-ranked metrics,
and for a model that fuses segments also image-only scoring (the tile without its segments).

Pure numpy/torch on the vectors `urbancross.model.embed` returns (rows sorted by image id),
so in-process and Ray Data embeddings score identically.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from urbancross.config import Config, EvaluateConfig
from urbancross.data.ingest import read_split
from urbancross.evaluate.metrics import real_captions, retrieval_metrics
from urbancross.evaluate.smr import smr_rerank
from urbancross.model.embed import embed_table


def gallery(emb: Mapping[str, np.ndarray], domain: str, image_key: str = "image") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One domain's images [N,D] (`image_key`), its real captions [M,D] and each caption's image index [M]."""
    rows = np.flatnonzero(emb["domain"].astype(str) == domain)
    texts, owner = real_captions(emb["text"][rows], emb["num_captions"][rows])
    return emb[image_key][rows], texts.numpy(), owner.numpy()


def domain_metrics(emb: Mapping[str, np.ndarray], ecfg: EvaluateConfig) -> list[dict[str, Any]]:
    """Per test domain: `retrieval_metrics` plain, under `smr` after SMR re-ranking, and under
    `image_only` on the tiles' own embeddings when `emb` has them (a model that fuses segments)."""
    out = []
    for domain in sorted({str(d) for d in emb["domain"]}):
        images, texts, owner = gallery(emb, domain)
        sim = torch.as_tensor(images) @ torch.as_tensor(texts).T  # [images, texts]
        image_of_text = torch.as_tensor(owner)
        plain = retrieval_metrics(sim, image_of_text, ks=tuple(ecfg.ks))
        record = {"tested_on": domain, "images": len(images), "texts": len(texts), **_floats(plain)}
        if ecfg.smr.enabled:
            record["smr"] = _floats(retrieval_metrics(smr_rerank(sim, ecfg.smr), image_of_text, ks=tuple(ecfg.ks)))
        if "image_only" in emb:
            alone = torch.as_tensor(gallery(emb, domain, "image_only")[0]) @ torch.as_tensor(texts).T
            record["image_only"] = _floats(retrieval_metrics(alone, image_of_text, ks=tuple(ecfg.ks)))
        out.append(record)
    return out


def _floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def evaluate_model(model, cfg: Config, manifest: str, split: str) -> list[dict[str, Any]]:
    """In-process evaluation of one loaded model on one split of a manifest (all its domains)."""
    return domain_metrics(embed_table(model, read_split(cfg, split, manifest=manifest), cfg), cfg.evaluate)
