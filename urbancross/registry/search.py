"""Text -> image search over an embedding index built with a registered model.

The index is one Parquet file (`image_id`, `domain`, `vector`), built by Ray Data batch
inference: each actor loads the logged model once (from `models:/NAME@alias`, `runs:/...`;
weights and config read as data, `pyfunc.load_urbancross`)
and embeds images exactly as evaluation does (`model.embed.embed_rows`). The file
records which model built it, and a query is refused if the dimensions disagree. A CMPAGL
model's index also holds each image's fusion-encoder tokens, and its search re-scores the
nearest `evaluate.rerank_k` images with the matching head (as evaluation's `itm` stage).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from urbancross.atomic import write_file
from urbancross.config import Config
from urbancross.data.manifest import filter_rows, read_manifest
from urbancross.model.embed import actor_map, embed_rows, numpy_batches
from urbancross.model.factory import get_tokenizer
from urbancross.model.inputs import ModelInputs
from urbancross.model.pyfunc import embed_texts, load_urbancross
from urbancross.tracking import configure

log = logging.getLogger(__name__)

MODEL_KEY = b"urbancross.model_uri"
MANIFEST_KEY = b"urbancross.manifest"  # the manifest whose images were embedded (lat/lon, thumbnails for `serve`)
TOKENS_KEY = b"urbancross.fusion_token_shape"  # CMPAGL indexes: each image's fusion-encoder tokens [N,W]
RERANK_WEIGHT = 0.1  # as `evaluate.rerank.itm_matrix`'s sim_weight: the similarity breaks near-ties of P(match)


def is_cmpagl(model) -> bool:
    return hasattr(model, "match_score")


class IndexEmbedder:
    """Ray Data actor: the pyfunc model, loaded once, -> `image_id`, `domain`, `image` vectors."""

    def __init__(self, model_uri: str, cfg: Config, manifest: str):
        configure(cfg)  # a Ray worker does not inherit the driver's tracking URI (models:/ needs it)
        self.model, model_cfg = load_urbancross(model_uri)
        self.cfg = cfg.override({"model": model_cfg.model, "data.manifest": manifest}, where=f"{model_uri} on {manifest}")
        self.inputs = ModelInputs(self.cfg, train=False, keep_ids=True)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = embed_rows(self.model, self.inputs, batch, self.cfg, texts=False)
        if is_cmpagl(self.model):  # what the matching head re-scores a query's top k with
            tokens = self.model.image_features(torch.as_tensor(self.inputs(batch)["images"]))[1]
            out["fusion_tokens"] = tokens.float().numpy()
        return out


def build_index(
    model_uri: str, manifest: str, out: str, cfg: Config, *, split: str | None = None, use_ray: bool = True
) -> dict[str, Any]:
    """Embed the images of `manifest` (one split or all) and write the index to `out` atomically."""
    table = read_manifest(manifest)
    if split:
        table = filter_rows(table, split=split)
    log.info("index: embedding %d images of %s with %s", table.num_rows, manifest, model_uri)
    if use_ray:
        parts = actor_map(table, IndexEmbedder, {"model_uri": model_uri, "cfg": cfg, "manifest": manifest}, cfg)
    else:
        embedder = IndexEmbedder(model_uri, cfg, manifest)
        parts = [embedder(b) for b in numpy_batches(table, cfg.evaluate.batch_size)]
    ids = np.concatenate([np.asarray(p["image_id"]).astype(str) for p in parts])
    order = np.argsort(ids, kind="stable")
    vectors = np.concatenate([np.asarray(p["image"], dtype=np.float32) for p in parts])[order]
    domains = np.concatenate([np.asarray(p["domain"]).astype(str) for p in parts])[order]
    tokens = np.concatenate([np.asarray(p["fusion_tokens"], dtype=np.float32) for p in parts])[order] if "fusion_tokens" in parts[0] else None
    write_index(ids[order], domains, vectors, out, model_uri, tokens, manifest=str(manifest))
    return {"index": str(out), "images": int(len(ids)), "embed_dim": int(vectors.shape[1]), "model": model_uri}


def write_index(
    ids, domains, vectors: np.ndarray, out: str, model_uri: str, tokens: np.ndarray | None = None, manifest: str = ""
) -> None:
    """One Parquet file, written beside `out` and renamed: a reader never sees half an index.
    `tokens` [N,T,W]: a CMPAGL model's fusion tokens per image (column `fusion_tokens`);
    `manifest`: the manifest whose images were embedded (lat/lon, thumbnails for `serve`)."""
    dim = vectors.shape[1]
    columns = {
        "image_id": pa.array(list(ids), pa.string()),
        "domain": pa.array(list(domains), pa.string()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim),
    }
    meta = {MODEL_KEY: model_uri.encode(), MANIFEST_KEY: manifest.encode()}
    if tokens is not None:
        per = int(np.prod(tokens.shape[1:]))
        columns["fusion_tokens"] = pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1), pa.float32()), per)
        meta[TOKENS_KEY] = json.dumps(list(tokens.shape[1:])).encode()
    table = pa.table(columns).replace_schema_metadata(meta)
    write_file(out, lambda tmp: pq.write_table(table, tmp))


def read_index(path: str) -> tuple[list[str], list[str], np.ndarray, str]:
    """-> (image ids, domains, vectors [N,D], the model URI that built it)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such index (build it with `urbancross index`)")
    table = pq.read_table(path)
    missing = {"image_id", "domain", "vector"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: not an UrbanCross index (missing columns {sorted(missing)})")
    vectors = np.asarray(table.column("vector").combine_chunks().flatten(), dtype=np.float32)
    vectors = vectors.reshape(table.num_rows, -1)
    uri = (table.schema.metadata or {}).get(MODEL_KEY, b"").decode()
    return table.column("image_id").to_pylist(), table.column("domain").to_pylist(), vectors, uri


def index_manifest(path: str) -> str:
    """The manifest an index was built from ("" for an index written before it was recorded)."""
    return (pq.read_schema(path).metadata or {}).get(MANIFEST_KEY, b"").decode()


def read_fusion_tokens(path: str) -> np.ndarray | None:
    """A CMPAGL index's fusion tokens [N,T,W], or None (an UrbanCross index)."""
    table = pq.read_table(path)
    shape = (table.schema.metadata or {}).get(TOKENS_KEY)
    if shape is None or "fusion_tokens" not in table.column_names:
        return None
    flat = np.asarray(table.column("fusion_tokens").combine_chunks().flatten(), dtype=np.float32)
    return flat.reshape(table.num_rows, *json.loads(shape))


def top_k(vectors: np.ndarray, query: np.ndarray, k: int, keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of the `k` rows of `vectors` [N,D] most similar (dot) to `query` [D]
    (only rows where the boolean mask `keep` [N] is true, when given)."""
    scores = vectors @ query
    rows = np.arange(len(scores)) if keep is None else np.flatnonzero(keep)
    order = rows[np.argsort(-scores[rows], kind="stable")[: max(k, 0)]]
    return order, scores[order]


def check_dims(index: str, vectors: np.ndarray, dim: int, model_uri: str, built_with: str) -> None:
    """Refuse a model whose embeddings cannot be compared with the index's; warn on another model."""
    if dim != vectors.shape[1]:
        raise ValueError(
            f"{index}: vectors have {vectors.shape[1]} dims but {model_uri} embeds into {dim} "
            f"(index built with {built_with or 'an unknown model'})"
        )
    if built_with and built_with != model_uri:
        log.warning("search: index %s was built with %s, querying with %s", index, built_with, model_uri)


def search(model_uri: str, index: str, query: str, top: int = 5) -> list[dict[str, Any]]:
    """The `top` images of `index` for a text query, best first: `image_id`, `domain`, `score`."""
    ids, domains, vectors, built_with = read_index(index)
    model, model_cfg = load_urbancross(model_uri)  # weights as data, never the pickled pyfunc
    qvec = embed_texts(model, get_tokenizer(model_cfg.model), [query])[0]
    check_dims(index, vectors, qvec.shape[0], model_uri, built_with)
    if is_cmpagl(model):
        order, scores = rescore(model, get_tokenizer(model_cfg.model), query, index, vectors, qvec, top, model_cfg.evaluate.rerank_k)
    else:
        order, scores = top_k(vectors, qvec, top)
    return [{"image_id": ids[i], "domain": domains[i], "score": float(s)} for i, s in zip(order, scores)]


@torch.no_grad()
def rescore(model, tokenize, query: str, index: str, vectors: np.ndarray, qvec: np.ndarray, top: int, k: int):
    """CMPAGL search: the `max(top, k)` nearest images by the pre-aligned similarity s, re-scored
    by the matching head p and ordered by 0.9 p + 0.1 (s + 1) / 2 (as evaluation's `itm` stage)."""
    tokens = read_fusion_tokens(index)
    if tokens is None:
        raise ValueError(f"{index}: built without fusion tokens; rebuild it with `urbancross index` for a CMPAGL model")
    order, sims = top_k(vectors, qvec, max(top, k))
    ids = torch.as_tensor(np.asarray(tokenize([query]))).expand(len(order), -1)
    p = model.match_score(torch.as_tensor(tokens[order]), ids).float().numpy()
    scores = (1 - RERANK_WEIGHT) * p + RERANK_WEIGHT * (sims + 1) / 2
    best = np.argsort(-scores, kind="stable")[:top]
    return order[best], scores[best]


def format_results(results: list[dict[str, Any]]) -> str:
    """One line per hit, as the CLI prints them."""
    return "\n".join(f"{r['score']:.4f}  {r['domain']:<12} {r['image_id']}" for r in results)


__all__ = ["build_index", "check_dims", "format_results", "index_manifest", "read_index", "search", "top_k", "write_index"]
