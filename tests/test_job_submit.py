"""`ray job submit` of the tiny training job to a real local cluster (issue: running on a cluster).

The head runs in its own process group and temp dir, so stopping it never touches another
Ray runtime on the machine (`ray stop` would kill them all).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def local_cluster():
    """`ray start --head --block` on 127.0.0.1; yields the dashboard address.

    Every port is a spare one: the defaults (e.g. the job agent's 52365) clash with any other
    Ray runtime on the machine, and the job server then never finds an agent.
    """
    gcs, dash, agent, agent_grpc, metrics, runtime_env = (free_port() for _ in range(6))
    temp = tempfile.mkdtemp(prefix="ucj", dir="/tmp")  # short: Ray's socket paths have a length limit
    # PATH as in an activated venv: the job's `python` is this venv's python
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
         "--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", dash), timeout=1):
                    break
            except OSError:
                assert head.poll() is None, "ray start --head exited early"
                time.sleep(1)
        else:
            pytest.fail("the local Ray head did not open its dashboard port in 90 s")
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def test_submit_tiny_training_job(local_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    from urbancross.config import SynthConfig
    from urbancross.data.synth import synthesize

    address, env = local_cluster
    manifest = tmp_path / "bench"
    synthesize(SynthConfig(domains=["Finland"], images_per_domain=12, test_fraction=0.25), str(manifest))
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "out_dir": str(tmp_path / "out"),
        "data": {"manifest": str(manifest), "source_domain": "Finland"},
        "model": {"use_segments": False},
        "train": {"epochs": 1, "batch_size": 8, "num_workers": 1, "curriculum": {"enabled": False}},
        "mlflow": {"tracking_uri": tracking, "experiment": "job-submit"},
    }))
    # The project's own runtime_env example, pointed at this test's MLflow store, less its pip
    # list: with Ray itself in a virtualenv (this venv), a pip runtime_env clones that whole
    # venv (6.7 GB) into the session dir first. Everything on the list is installed here, and
    # tests/test_cluster_configs.py checks the list against pyproject.toml.
    runtime_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] = tracking
    assert runtime_env.pop("pip")
    env_file = tmp_path / "runtime_env.yaml"
    env_file.write_text(yaml.safe_dump(runtime_env))

    submit = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
              "--runtime-env", str(env_file), "--", "python", "jobs/train.py", "--config", str(config)]
    for _ in range(30):  # the dashboard answers before its job agent is up; no job exists until it is
        proc = subprocess.run(submit, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        if "No available agent" not in proc.stderr:
            break
        time.sleep(2)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in proc.stdout + proc.stderr

    client = MlflowClient(tracking_uri=tracking)
    experiment = client.get_experiment_by_name("job-submit")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "1"
    assert run.data.params["data.manifest"] == str(manifest)
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [1] and losses[0].value > 0
    val = client.get_metric_history(run.info.run_id, "val_mR")
    assert len(val) == 1 and 0.0 <= val[0].value <= 100.0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts
    result = json.loads((tmp_path / "out" / "train" / "result.json").read_text())
    assert result["metrics"]["epoch"] == 1
    assert result["mlflow_run_id"] == run.info.run_id
