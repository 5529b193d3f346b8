"""Cross-domain evaluation job: embed each test domain with each model, score retrieval, report.

Embedding is `urbancross.model.embed` (in-process, or Ray Data batch inference with
`use_ray`), scoring is `scoring.domain_metrics`, one gallery per test domain.

Models to evaluate: `models` maps a name to `{"path", "trained_on", "adapted_to"}` (or just
a path). Without it, `<out_dir>/train/model.pt` (`source`) and `<out_dir>/adapt/model.pt`
(`adapted`) are used where they exist; their metadata comes from a `model.json` beside
the weights when present, else from `cfg.data.source_domain` / `target_domain`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

from urbancross import storage
from urbancross.config import Config, local_absolute
from urbancross.data.ingest import read_split
from urbancross.evaluate.report import to_markdown, write_report
from urbancross.evaluate.rerank import domain_stages
from urbancross.evaluate.scoring import domain_metrics
from urbancross.model.embed import embed_dataset, embed_table
from urbancross.model.factory import create_model
from urbancross.tracking import check_tracking_server, log_json_artifact, log_metrics, mlflow_run

log = logging.getLogger(__name__)


def model_entries(cfg: Config, models: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Normalise `models` (or find the run's own) to name -> {path, trained_on, adapted_to}."""
    if models is None:
        found = {name: storage.join(cfg.out_dir, stage, "model.pt") for name, stage in (("source", "train"), ("adapted", "adapt"))}
        models = {name: p for name, p in found.items() if storage.is_file(p)}
        if not models:
            raise FileNotFoundError(f"no trained model under {cfg.out_dir}/train or {cfg.out_dir}/adapt; train first or pass models")
    entries = {}
    for name, spec in models.items():
        spec = {"path": spec} if isinstance(spec, (str, os.PathLike)) else dict(spec)
        path = str(spec["path"])
        if not storage.is_file(path):
            raise FileNotFoundError(f"model {name!r}: no weights file {path}")
        meta_file = storage.join(path.rsplit("/", 1)[0] if storage.is_remote(path) else os.path.dirname(path), "model.json")
        meta = storage.read_json(meta_file) if storage.is_file(meta_file) else {}
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
    import mlflow  # heavy: loaded when an evaluation runs, not when the module is imported

    check_tracking_server(cfg.tracking_uri())  # before minutes of embedding, not after
    cfg = cfg.override({"data.manifest": local_absolute(cfg.data.manifest)}, where="evaluate")  # Ray workers may run elsewhere
    entries = model_entries(cfg, models)
    table = read_split(cfg, cfg.data.test_split)
    records = []
    for name, entry in entries.items():
        log.info("evaluate: embedding %d %s images with %s (%s)", table.num_rows, cfg.data.test_split, name, entry["path"])
        model = None if use_ray else create_model(cfg.model, pretrained=entry["path"])
        emb = embed_dataset(entry["path"], table, cfg) if use_ray else embed_table(model, table, cfg)
        meta = {"model": name, "trained_on": entry["trained_on"], "adapted_to": entry["adapted_to"]}
        found = domain_metrics(emb, cfg.evaluate)
        if cfg.model.family == "cmpagl":  # + each retrieval stage: pre-aligned ranking, matching-head re-scoring, SMR
            stages = domain_stages(cfg, table, emb, weights=entry["path"], model=model)
            found = [{**r, "stages": stages[r["tested_on"]]} for r in found]
        records += [{**meta, "method": cfg.model.family, **r} for r in found]
    out_dir = cfg.evaluate.output or str(Path(cfg.out_dir) / "evaluate")
    paths = write_report(records, out_dir)
    with mlflow_run(cfg, "evaluate"):
        for r in records:
            prefix = f"{r['model']}.{r['tested_on']}."
            log_metrics({prefix + k: v for k, v in r.items() if isinstance(v, float)})
            log_metrics({prefix + "smr_" + k: v for k, v in r.get("smr", {}).items()})
            log_metrics({prefix + "image_only_" + k: v for k, v in r.get("image_only", {}).items()})
            log_metrics({f"{prefix}{stage}_{k}": v for stage, m in r.get("stages", {}).items() for k, v in m.items()})
        log_json_artifact(records, "cross_domain.json")
        for kind in ("md", "png"):
            mlflow.log_artifact(paths[kind])
    log.info("evaluate: cross-domain table\n%s", to_markdown(records))
    return records
