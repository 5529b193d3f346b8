"""Shared fixtures: one local Ray runtime per test session (starting Ray costs seconds)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_addoption(parser):
    parser.addoption("--realsize-device", choices=("cpu", "cuda"), default="cpu",
                     help="where the `realsize` tests run their models (bench/gpu_check.sh passes cuda)")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray runtime sized for a 2-core machine, shared by every Ray test."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
