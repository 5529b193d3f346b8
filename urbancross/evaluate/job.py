"""Cross-domain evaluation: embed each test domain with each model, score retrieval, report.

Embedding is one function, `embed_batch` (manifest rows -> image and caption vectors),
used two ways: `embed_table` runs it in-process (tests, promotion) and `embed_dataset`
runs it in a Ray Data actor pool (`Embedder` loads the model once per actor), so both
paths give the same numbers. Scoring (`domain_metrics`) is pure numpy/torch on the
collected vectors, one gallery per test domain.

Models to evaluate: `models` maps a name to `{"path", "trained_on", "adapted_to"}` (or just
a path). Without it, `<out_dir>/train/model.pt` (`source`) and `<out_dir>/adapt/model.pt`
(`adapted`) are used where they exist; their metadata comes from a `model.json` beside
the weights when present, else from `cfg.data.source_domain` / `target_domain`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from urbancross.config import Config, EvaluateConfig, local_absolute

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- embedding


def embed_images(model, images, segments=None, segment_mask=None):
    """The retrieval embedding of images: fused with their segments when the model fuses.

    A model with fusion always fuses (an image without segments gets an all-masked set),
    exactly as in training, where ModelInputs gives every row a segment mask.
    """
    import torch

    image = model.encode_image(images)
    if getattr(model, "fusion", None) is None:
        return image
    if segments is None:
        segments = images.new_zeros(images.shape[0], 1, *images.shape[1:])
        segment_mask = torch.zeros(images.shape[0], 1, dtype=torch.bool)
    segment_mask = torch.as_tensor(segment_mask, dtype=torch.bool)
    return model.fuse(image, model.encode_segments(segments, segment_mask), segment_mask)


def embed_batch(model, inputs, batch: Mapping[str, np.ndarray], cfg: Config, texts: bool = True) -> dict[str, np.ndarray]:
    """Raw manifest rows -> `image_id`, `domain`, `image` [B,D], `text` [B,C,D], `num_captions` [B].

    `inputs` is an `ingest.ModelInputs(cfg, train=False, keep_ids=True)`. It gives C = 5
    captions per image (cycled when fewer); `num_captions` says how many are real, so
    repeats are not scored as extra queries. `texts=False`: images only (an index).
    """
    import torch

    from urbancross.data.ingest import caption_texts

    x = inputs(batch)
    tokens = torch.as_tensor(x["tokens"])
    b, c, length = tokens.shape
    with torch.no_grad():
        segs = torch.as_tensor(x["segments"]) if "segments" in x else None
        mask = torch.as_tensor(x["segment_mask"]) if "segment_mask" in x else None
        image = embed_images(model, torch.as_tensor(x["images"]), segs, mask)
        out = {"image_id": x["image_id"], "domain": x["domain"], "image": image.float().numpy()}
        if not texts:
            return out
        out["text"] = model.encode_text(tokens.reshape(b * c, length)).reshape(b, c, -1).float().numpy()
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    out["num_captions"] = np.array([min(len(caption_texts(r, cfg)), c) for r in rows], dtype=np.int64)
    return out


class Embedder:
    """Ray Data actor: loads the model once (plain state dict), then embeds batches of rows."""

    def __init__(self, cfg: Config, weights: str):
        import torch

        from urbancross.data.ingest import ModelInputs
        from urbancross.model.factory import create_model

        torch.set_num_threads(max(1, int(cfg.evaluate.num_cpus)))
        self.cfg = cfg
        self.model = create_model(cfg.model, pretrained=weights).eval()
        self.inputs = ModelInputs(cfg, train=False, keep_ids=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return embed_batch(self.model, self.inputs, batch, self.cfg)


def numpy_batches(table: pa.Table, batch_size: int):
    """Arrow table -> dicts of 1-D object/number arrays, the shape Ray's numpy batches have."""
    for rb in table.to_batches(max_chunksize=batch_size):
        batch = {}
        for name, col in zip(rb.schema.names, rb.columns):
            values = col.to_pylist()
            arr = np.empty(len(values), dtype=object)
            arr[:] = values
            batch[name] = arr
        yield batch


def embed_table(model, table: pa.Table, cfg: Config) -> dict[str, np.ndarray]:
    """In-process embedding of manifest rows (no Ray): the reference path."""
    from urbancross.data.ingest import ModelInputs

    model.eval()
    inputs = ModelInputs(cfg, train=False, keep_ids=True)
    parts = [embed_batch(model, inputs, b, cfg) for b in numpy_batches(table, cfg.evaluate.batch_size)]
    return _sorted({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})


def embed_dataset(weights: str, table: pa.Table, cfg: Config) -> dict[str, np.ndarray]:
    """The same embedding as `embed_table`, as Ray Data batch inference over an actor pool."""
    parts = actor_map(table, Embedder, {"cfg": cfg, "weights": weights}, cfg)
    return _sorted({k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]})


def actor_map(table: pa.Table, fn_class: type, kwargs: dict[str, Any], cfg: Config) -> list[dict[str, np.ndarray]]:
    """Batch inference: `fn_class(**kwargs)` once per actor (evaluate.concurrency/num_cpus/num_gpus)."""
    import ray

    ds = ray.data.from_arrow(table).map_batches(
        fn_class,
        fn_constructor_kwargs=kwargs,
        batch_size=cfg.evaluate.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.evaluate.concurrency),
        num_cpus=cfg.evaluate.num_cpus,
        num_gpus=cfg.evaluate.num_gpus,
    )
    return list(ds.iter_batches(batch_size=None, batch_format="numpy"))


def _sorted(emb: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows ordered by image id: Ray returns blocks in any order; metrics must not depend on it."""
    order = np.argsort(emb["image_id"].astype(str), kind="stable")
    return {k: v[order] for k, v in emb.items()}


# --------------------------------------------------------------------------- scoring


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
    import torch

    from urbancross.evaluate import retrieval_metrics, smr_rerank

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
    from urbancross.data.ingest import read_split

    return domain_metrics(embed_table(model, read_split(cfg, split, manifest=manifest), cfg), cfg.evaluate)


# --------------------------------------------------------------------------- job


def model_entries(cfg: Config, models: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Normalise `models` (or find the run's own) to name -> {path, trained_on, adapted_to}."""
    if models is None:
        found = {name: Path(cfg.out_dir) / stage / "model.pt" for name, stage in (("source", "train"), ("adapted", "adapt"))}
        models = {name: str(p) for name, p in found.items() if p.is_file()}
        if not models:
            raise FileNotFoundError(f"no trained model under {cfg.out_dir}/train or {cfg.out_dir}/adapt; train first or pass models")
    entries = {}
    for name, spec in models.items():
        spec = {"path": spec} if isinstance(spec, (str, os.PathLike)) else dict(spec)
        path = str(spec["path"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model {name!r}: no weights file {path}")
        meta_file = Path(path).with_name("model.json")
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        default_target = cfg.data.target_domain if name == "adapted" else None
        entries[name] = {
            "path": path,
            "trained_on": spec.get("trained_on", meta.get("trained_on", cfg.data.source_domain)),
            "adapted_to": spec.get("adapted_to", meta.get("adapted_to", default_target)),
        }
    return entries


def run_evaluate(cfg: Config, models: Mapping[str, Any] | None = None, *, use_ray: bool = True) -> list[dict[str, Any]]:
    """Evaluate every model on every domain of the test split; write and log the report.

    Returns the records (one per model x test domain, the `report.py` format); the report
    files go to `cfg.evaluate.output` (default `<out_dir>/evaluate`) and to an MLflow run.
    """
    import mlflow

    from urbancross.data.ingest import read_split
    from urbancross.evaluate.report import to_markdown, write_report
    from urbancross.model.factory import create_model
    from urbancross.tracking import check_tracking_server, log_json_artifact, log_metrics, mlflow_run

    check_tracking_server(cfg.tracking_uri())  # before minutes of embedding, not after
    cfg = with_model(cfg, cfg, local_absolute(cfg.data.manifest))  # Ray workers may run elsewhere
    entries = model_entries(cfg, models)
    table = read_split(cfg, cfg.data.test_split)
    records = []
    for name, entry in entries.items():
        log.info("evaluate: embedding %d %s images with %s (%s)", table.num_rows, cfg.data.test_split, name, entry["path"])
        if use_ray:
            emb = embed_dataset(entry["path"], table, cfg)
        else:
            emb = embed_table(create_model(cfg.model, pretrained=entry["path"]), table, cfg)
        meta = {"model": name, "trained_on": entry["trained_on"], "adapted_to": entry["adapted_to"]}
        records += [{**meta, **r} for r in domain_metrics(emb, cfg.evaluate)]
    out_dir = cfg.evaluate.output or str(Path(cfg.out_dir) / "evaluate")
    paths = write_report(records, out_dir)
    with mlflow_run(cfg, "evaluate"):
        for r in records:
            prefix = f"{r['model']}.{r['tested_on']}."
            log_metrics({prefix + k: v for k, v in r.items() if isinstance(v, float)})
            log_metrics({prefix + "smr_" + k: v for k, v in r.get("smr", {}).items()})
        log_json_artifact(records, "cross_domain.json")
        for kind in ("md", "png"):
            mlflow.log_artifact(paths[kind])
    log.info("evaluate: cross-domain table\n%s", to_markdown(records))
    return records


def with_model(cfg: Config, model_cfg: Config, manifest: str | None = None) -> Config:
    """`cfg` running a model built by `model_cfg` (its towers/transforms) on this run's data.

    `manifest` replaces `data.manifest`, so relative image paths resolve against it.
    """
    changes = {"model": model_cfg.model, **({"data.manifest": manifest} if manifest else {})}
    return cfg.override(changes, where="model config")
