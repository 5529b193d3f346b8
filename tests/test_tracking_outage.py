"""An MLflow outage during training: the epoch's checkpoint is saved first, tracking failures are
retried, buffered and reported, never fatal; metrics logged while the server was away arrive
when it is back. A real `mlflow server` on 127.0.0.1 is stopped and restarted on its port."""

from __future__ import annotations

import logging
import time
import types

import mlflow
import pytest

from servers import free_port, mlflow_server
from urbancross.tracking import MetricLog


def test_end_epoch_saves_the_checkpoint_before_tracking(monkeypatch):
    from urbancross.config import Config
    from urbancross.train import loop
    from urbancross.train.selection import Selection

    calls = []
    monkeypatch.setattr(loop, "save_and_report", lambda *a, **k: calls.append("checkpoint"))

    def tracking_down(metrics, step):
        calls.append("tracking")
        raise ConnectionError("tracking server gone")

    engine, w = types.SimpleNamespace(global_steps=3), types.SimpleNamespace(rank=1)
    with pytest.raises(ConnectionError):
        loop.end_epoch(engine, w, Config(), "train", 0, 1, {"loss": 1.0}, val=None, log_metrics=tracking_down,
                       started=time.perf_counter(), start=(0, 0), client={"epoch": 1},
                       selection=Selection.from_state({}, 0), export=lambda: calls.append("export"))
    assert calls == ["checkpoint", "tracking"]  # even a logger that raises cannot cost the epoch


def test_metric_log_never_raises_when_nothing_listens(caplog):
    slept = []
    metric_log = MetricLog(f"http://127.0.0.1:{free_port()}", "0" * 32, attempts=3, backoff=0.5, sleep=slept.append)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, "urbancross.tracking"):
        assert metric_log({"loss": 1.0}, step=1) is False
        assert metric_log({"loss": 0.5}, step=2) is False
        unlogged = metric_log.close()
    assert time.monotonic() - start < 20  # fails fast: /health first, not MLflow's minutes of retries
    assert slept == [0.5, 1.0] * 3  # backoff between the attempts of each try
    assert [(step, values) for step, values, _ in unlogged] == [(1, {"loss": 1.0}), (2, {"loss": 0.5})]
    assert "never logged" in caplog.text and "[1, 2]" in caplog.text


@pytest.mark.slow
def test_metrics_logged_during_an_outage_arrive_when_the_server_is_back(tmp_path):
    port = free_port()
    with mlflow_server(tmp_path, port=port) as uri:
        client = mlflow.MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("outage")).info.run_id
        metric_log = MetricLog(uri, run_id, attempts=2, backoff=0.1)
        assert metric_log({"loss": 3.0}, step=1) is True
    # the server is gone: training goes on, the epochs are kept
    assert metric_log({"loss": 2.0}, step=2) is False
    assert metric_log({"loss": 1.5}, step=3) is False
    with mlflow_server(tmp_path, port=port) as uri:  # back, same store
        assert metric_log({"loss": 1.0}, step=4) is True
        assert metric_log.close() == []
        history = mlflow.MlflowClient(uri).get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 3.0), (2, 2.0), (3, 1.5), (4, 1.0)]


def test_retry_rides_out_failures_then_names_what_failed():
    from urbancross.tracking import RegistryError, retry

    calls, slept = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("connection refused")
        return "run-id"

    assert retry(flaky, "trial t1: its MLflow run", sleep=slept.append) == "run-id"
    assert slept == [2.0, 4.0]
    slept.clear()
    with pytest.raises(RegistryError, match="trial t1: its MLflow run: MLflow still failing after 6 tries"):
        retry(lambda: 1 / 0, "trial t1: its MLflow run", sleep=slept.append)
    assert slept == [2.0, 4.0, 8.0, 16.0, 32.0]


@pytest.mark.slow
def test_a_trial_starting_while_the_server_restarts_gets_its_child_run(tmp_path):
    """A sweep's trial starts while the tracking server is away: it waits, then finds its run."""
    import threading

    from urbancross.config import load_config
    from urbancross.tracking import retry
    from urbancross.tune.sweep import child_run_id

    port = free_port()
    with mlflow_server(tmp_path, port=port) as uri:
        client = mlflow.MlflowClient(uri)
        parent = client.create_run(client.create_experiment("urbancross")).info.run_id
    cfg = load_config(None, [f"mlflow.tracking_uri={uri}", f"out_dir={tmp_path / 'out'}"])
    got: dict = {}
    trial = threading.Thread(target=lambda: got.update(
        run=retry(lambda: child_run_id(cfg, parent, "t1", "trial_1"), "trial_1: its MLflow run", backoff=1.0)))
    trial.start()
    time.sleep(2)  # the trial is retrying against a dead port
    assert trial.is_alive() and not got
    with mlflow_server(tmp_path, port=port):  # back, same store
        trial.join(timeout=120)
        run = mlflow.MlflowClient(uri).get_run(got["run"])
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["tune.trial_id"] == "t1"
