"""Thin MLflow glue: one place that knows the tracking URI, experiment and what a run logs."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

from urbancross.config import Config, save_config

MAX_PARAM_LEN = 500  # MLflow rejects longer param values


def configure(cfg: Config) -> str:
    """Point MLflow at the run's store; a local SQLite file gets its folder created."""
    import mlflow

    uri = cfg.tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def use_experiment(cfg: Config) -> None:
    """Select the run's experiment, creating it with artifacts beside a local SQLite store.

    Left to MLflow, a SQLite store puts artifacts under `./mlruns` of whatever directory the
    process runs in (a Ray worker's, a test's), not with the database they belong to.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = configure(cfg)
    if uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(cfg.mlflow.experiment) is None:
        artifacts = Path(uri[len("sqlite:///") :]).parent / "mlartifacts"
        try:
            mlflow.create_experiment(cfg.mlflow.experiment, artifact_location=artifacts.resolve().as_uri())
        except MlflowException:
            pass  # created concurrently by another process: use theirs
    mlflow.set_experiment(cfg.mlflow.experiment)


def params_of(cfg: Config) -> dict[str, str]:
    """The flattened config as MLflow params (values stringified and clipped)."""
    return {k: str(v)[:MAX_PARAM_LEN] for k, v in cfg.flat().items()}


@contextlib.contextmanager
def mlflow_run(
    cfg: Config,
    run_name: str,
    *,
    nested: bool = False,
    run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[Any]:
    """Start (or, with `run_id`, resume) a run that logs the config as params and artifact."""
    import mlflow

    use_experiment(cfg)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, nested=nested, tags=dict(tags or {})) as run:
        if run_id is None:
            mlflow.log_params(params_of(cfg))
            with tempfile.TemporaryDirectory() as tmp:
                save_config(cfg, os.path.join(tmp, "config.yaml"))
                mlflow.log_artifact(os.path.join(tmp, "config.yaml"))
        yield run


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_json_artifact(obj: Any, name: str, artifact_path: str | None = None) -> None:
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        with open(path, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
        mlflow.log_artifact(path, artifact_path)
