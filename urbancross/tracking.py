"""Thin MLflow glue: one place that knows the tracking URI, experiment and what a run logs.

Also the check that a tracking server answers, and `RegistryError` for when it does not:
every stage that talks to MLflow (training, evaluation, promotion, search) uses them.
`MetricLog` is training's per-epoch logger: an unreachable server never stops training.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

from urbancross.config import Config, save_config

log = logging.getLogger(__name__)

MAX_PARAM_LEN = 500  # MLflow rejects longer param values


class RegistryError(RuntimeError):
    """The tracking server or registry cannot serve the request."""


def check_tracking_server(uri: str, timeout: float = 5.0) -> str:
    """Fail fast, naming `uri`, when an HTTP tracking server does not answer /health.

    MLflow's own client retries for minutes before giving up; checking first makes a
    down server a one-line error and guarantees nothing was half-registered. Returns `uri`.
    """
    if not uri.startswith(("http://", "https://")):
        return uri
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            if resp.status == 200:
                return uri
            problem = f"HTTP {resp.status}"
    except (urllib.error.URLError, OSError) as e:
        problem = str(getattr(e, "reason", e))
    raise RegistryError(f"MLflow tracking server {uri} is not reachable ({problem}); start it or fix mlflow.tracking_uri")


T = TypeVar("T")


def retry(fn: Callable[[], T], what: str, *, attempts: int = 6, backoff: float = 2.0,
          sleep: Callable[[float], None] = time.sleep) -> T:
    """`fn()`, retried `attempts` times `backoff` * 2^i seconds apart (2 + 4 + ... + 32 s by default).

    For the tracking calls a trial cannot start without (finding or creating its MLflow run):
    a sweep rides out a tracking server's restart instead of failing every trial that starts
    meanwhile. The last failure is raised as a `RegistryError` naming `what`.
    """
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - any tracking failure is worth another try
            problem = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            if attempt == attempts - 1:
                raise RegistryError(f"{what}: MLflow still failing after {attempts} tries ({problem})") from e
            wait = backoff * 2**attempt
            log.warning("%s: MLflow failed (%s); retrying in %.0fs", what, problem, wait)
            sleep(wait)
    raise AssertionError("unreachable")


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


class MetricLog:
    """Per-epoch metrics of one run, logged so that tracking failures never end training.

    Each call queues the epoch's metrics (with their own timestamps) and tries to send the
    whole queue: `attempts` tries, `backoff` * 2^i seconds apart, each preceded by the
    /health check (a down server fails in milliseconds, not after MLflow's own minutes of
    retries, which are held to one). What cannot be sent stays queued for the next epoch's
    try; `close()` tries once more and returns (and logs) what never reached the server. The
    epoch's checkpoint is saved before this runs, so an outage costs at most MLflow's copy.
    """

    def __init__(self, tracking_uri: str, run_id: str, *, attempts: int = 3, backoff: float = 1.0,
                 sleep: Callable[[float], None] = time.sleep):
        self.uri, self.run_id = tracking_uri, run_id
        self.attempts, self.backoff, self.sleep = attempts, backoff, sleep
        self.pending: list[tuple[int | None, dict[str, float], int]] = []  # (step, metrics, ms timestamp)

    def __call__(self, metrics: Mapping[str, float], step: int | None = None) -> bool:
        """Queue and send; True when everything queued so far reached the server."""
        self.pending.append((step, {k: float(v) for k, v in metrics.items()}, int(time.time() * 1000)))
        return self.flush()

    def flush(self) -> bool:
        problem = None
        for attempt in range(self.attempts):
            if attempt:
                self.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                self._send()
                return True
            except Exception as e:  # noqa: BLE001 - any tracking failure is survivable here
                problem = e
        log.warning("MLflow %s: %d epoch(s) of metrics not logged yet, kept for the next try (%s)",
                    self.uri, len(self.pending), str(problem).splitlines()[0][:200] if str(problem) else type(problem).__name__)
        return False

    def close(self) -> list[tuple[int | None, dict[str, float], int]]:
        """Last try; returns the (step, metrics, timestamp) that were never logged (also logged as an error)."""
        if self.pending and not self.flush():
            log.error("MLflow %s unreachable: metrics of steps %s never logged to run %s (they are in the Ray Train "
                      "results and checkpoints): %s", self.uri, [p[0] for p in self.pending], self.run_id,
                      json.dumps(self.pending)[:2000])
        return list(self.pending)

    def _send(self) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        if not self.pending:
            return
        check_tracking_server(self.uri, timeout=5.0)
        metrics = [Metric(k, v, ts, step or 0) for step, values, ts in self.pending for k, v in values.items()]
        with _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_TIMEOUT="30"):
            client = MlflowClient(tracking_uri=self.uri)
            for i in range(0, len(metrics), 1000):  # MLflow's per-batch limit
                client.log_batch(self.run_id, metrics=metrics[i : i + 1000])
        self.pending.clear()


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
