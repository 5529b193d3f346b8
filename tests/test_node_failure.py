"""A Ray node dies during training: the run finishes from its last checkpoint on a node that joins.

A real two-node cluster on 127.0.0.1 (`ray start --head` with no CPUs for work, a worker node
with 2), a driver process running `run_train` with two Train workers on that node; after the
first epoch's checkpoint the test kills the worker node's whole process group, starts another
node, and the run (FailureConfig max_failures=1) restarts its workers there from the
checkpoint. Opt-in (`pytest -m heavy`): a cluster start and a failover take minutes on 2 CPUs.
Only processes this test started are stopped, by process group (never `ray stop`). Every
process is given 127.0.0.1; Ray itself advertises the host's own interface address for it
(`services.resolve_ip_for_localhost`), so the traffic stays on this machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from servers import free_port

RAY = str(Path(sys.executable).with_name("ray"))

DRIVER = """
import json, sys
from urbancross.config import load_config
from urbancross.train import run_train
cfg = load_config(None, json.loads(sys.argv[1]))
result = run_train(cfg)
with open(sys.argv[2], "w") as f:
    json.dump(result["metrics"], f, default=str)
"""


def start(*args: str, log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args], stdout=log.open("w"), env=env,
                            stderr=subprocess.STDOUT, start_new_session=True)  # its own group: killed as one node


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def forget_cluster(port: int) -> None:
    """`ray start --head` records its address for later `ray.init()` calls to join; ours is gone."""
    from ray._private.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    if path.is_file() and path.read_text().strip().endswith(f":{port}"):
        path.unlink()


def wait_for(predicate, timeout: float, what: str, every: float = 1.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.mark.heavy
def test_a_killed_node_during_training_the_run_finishes_from_its_checkpoint(manifest, tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []
    out = tmp_path / "out"
    # Ray 2.59+ clusters want a token (PLATFORM_NOTES): one of the test's own, given to every process
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(16).hex(), "RAY_ADDRESS": address,
           "PYTHONPATH": os.pathsep.join(sys.path)}
    try:
        procs.append(start("--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=0",
                           "--include-dashboard=false", log=tmp_path / "head.log", env=env))
        node = start(f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=2", log=tmp_path / "node1.log", env=env)
        procs.append(node)
        overrides = [f"data.manifest={manifest}", f"out_dir={out}", "model.use_segments=false", "train.num_workers=2",
                     "train.cpus_per_worker=0.5", "train.ingest_actors=0", "train.batch_size=4", "train.epochs=4",
                     "train.max_failures=1", "train.checkpoint_every=1", "train.curriculum.enabled=false"]
        driver_log = tmp_path / "driver.log"
        driver = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(overrides), str(tmp_path / "metrics.json")], env=env,
                                  stdout=driver_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(driver)

        def first_checkpoint():
            found = list((out / "ray_results").glob("*/checkpoint_*"))
            return found or (driver.poll() is not None and pytest.fail(f"driver ended early:\n{driver_log.read_text()[-3000:]}"))

        wait_for(first_checkpoint, 600, "the first epoch's checkpoint")
        time.sleep(5)  # Train's controller registers a reported checkpoint when it next polls the workers
        stop(node, signal.SIGKILL)  # the node and every worker on it, at once
        procs.append(start(f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=2", log=tmp_path / "node2.log", env=env))
        code = driver.wait(timeout=900)
        assert code == 0, f"driver exit {code}:\n{driver_log.read_text()[-3000:]}"
    finally:
        for proc in reversed(procs):
            stop(proc)
        forget_cluster(port)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["epoch"] == 4  # finished
    assert metrics["start_epoch"] >= 1  # restarted from a checkpoint, not from scratch
    assert (out / "train" / "model.pt").is_file() and (out / "train" / "result.json").is_file()
