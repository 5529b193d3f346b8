"""Scoring collected embeddings: one gallery per test domain, plain and SMR-re-ranked metrics.

Pure numpy/torch on the vectors `urbancross.model.embed` returns (rows sorted by image id),
so in-process and Ray Data embeddings score identically.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from urbancross.config import Config, EvaluateConfig
from urbancross.data.ingest import read_split
from urbancross.evaluate.metrics import retrieval_metrics
from urbancross.evaluate.smr import smr_rerank
from urbancross.model.embed import embed_table


def gallery(emb: Mapping[str, np.ndarray], domain: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One domain's images [N,D], its real captions [M,D] and each caption's image index [M]."""
    rows = np.flatnonzero(emb["domain"].astype(str) == domain)
    images = emb["image"][rows]
    texts, owner = [], []
    for i, r in enumerate(rows):
        n = int(emb["num_captions"][r])
        texts.append(emb["text"][r, :n])
        owner += [i] * n
    return images, np.concatenate(texts), np.asarray(owner, dtype=np.int64)


def domain_metrics(emb: Mapping[str, np.ndarray], ecfg: EvaluateConfig) -> list[dict[str, Any]]:
    """Per test domain: `retrieval_metrics` plain and, under `smr`, after SMR re-ranking."""
    out = []
    for domain in sorted({str(d) for d in emb["domain"]}):
        images, texts, owner = gallery(emb, domain)
        sim = torch.as_tensor(images) @ torch.as_tensor(texts).T  # [images, texts]
        image_of_text = torch.as_tensor(owner)
        plain = retrieval_metrics(sim, image_of_text, ks=tuple(ecfg.ks))
        record = {"tested_on": domain, "images": len(images), "texts": len(texts), **_floats(plain)}
        if ecfg.smr.enabled:
            record["smr"] = _floats(retrieval_metrics(smr_rerank(sim, ecfg.smr), image_of_text, ks=tuple(ecfg.ks)))
        out.append(record)
    return out


def _floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def evaluate_model(model, cfg: Config, manifest: str, split: str) -> list[dict[str, Any]]:
    """In-process evaluation of one loaded model on one split of a manifest (all its domains)."""
    return domain_metrics(embed_table(model, read_split(cfg, split, manifest=manifest), cfg), cfg.evaluate)
