"""A real `mlflow server` process on 127.0.0.1 for tests (tests/ helper)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from urbancross.tracking import RegistryError, check_tracking_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(root: Path, *args: str, port: int | None = None, env: dict[str, str] | None = None) -> Iterator[str]:
    """`mlflow server` (SQLite backend and proxied artifacts under `root`, extra `args`) until the block ends.

    Yields its URI once /health answers; a `port` may be reused to bring a stopped server back.
    """
    port = port or free_port()
    uri = f"http://127.0.0.1:{port}"
    exe = str(Path(sys.executable).with_name("mlflow"))
    cmd = [exe, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts"), *args]
    log_path = root / f"server-{port}.log"
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                # no job runner: it is unused here, and its store is a /dev/shm folder nothing removes
                                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})})
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    check_tracking_server(uri, timeout=1.0)
                    break
                except RegistryError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"mlflow server did not start: {log_path.read_text()[-2000:]}") from None
                    time.sleep(0.5)
            yield uri
        finally:
            with contextlib.suppress(ProcessLookupError):  # it may have exited already (e.g. failed to start)
                os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its workers only
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
