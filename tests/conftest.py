"""Shared fixtures: one local Ray runtime per test session (starting Ray costs seconds), and the
small two-country benchmark the training tests share."""

from __future__ import annotations

import os

import pytest

from urbancross.config import SynthConfig

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_addoption(parser):
    parser.addoption("--realsize-device", choices=("cpu", "cuda"), default="cpu",
                     help="where the `realsize` tests run their models (bench/gpu_check.sh passes cuda)")


RAY_INIT = {"num_cpus": 2, "include_dashboard": False, "log_to_driver": False, "configure_logging": False}


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray runtime sized for a 2-core machine, shared by every Ray test."""
    import ray

    if not ray.is_initialized():
        ray.init(**RAY_INIT)
    yield ray
    ray.shutdown()


@pytest.fixture
def placement_groups(ray_session):
    """() -> ids of the placement groups alive now (state != REMOVED), whoever created them."""
    return lambda: {i for i, g in ray_session.util.placement_group_table().items() if g["state"] != "REMOVED"}


@pytest.fixture
def fresh_ray(ray_session):
    """A Ray runtime of the test's own, started inside the environment the test's earlier fixtures
    set (Ray's workers read e.g. an S3 endpoint from it when they start: test_s3)."""
    ray_session.shutdown()
    ray_session.init(**RAY_INIT)
    yield ray_session
    ray_session.shutdown()
    ray_session.init(**RAY_INIT)


# Finland: 12 images -> 9 train (test_fraction 0.25), 1 held out for validation -> 8 train
SYNTH = SynthConfig(domains=["Finland", "Spain"], images_per_domain=12, seed=0, test_fraction=0.25, val_fraction=0.0)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """The benchmark above, synthesized once per test module (test_train, test_cmpagl_jobs)."""
    from urbancross.data.synth import synthesize

    out = str(tmp_path_factory.mktemp("data") / "manifest")
    synthesize(SYNTH, out)
    return out
