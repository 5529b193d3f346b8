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


def _shm() -> dict[str, int]:
    """/dev/shm's entries and their sizes: it is RAM, and Ray's memory monitor counts it."""
    root = "/dev/shm"
    out = {}
    for name in os.listdir(root) if os.path.isdir(root) else ():
        try:
            out[name] = os.stat(os.path.join(root, name)).st_size
        except OSError:
            pass
    return out


def pytest_sessionstart(session):
    session.config.shm_before = _shm()


def pytest_terminal_summary(terminalreporter, config):
    """Say what the suite left in /dev/shm, and what was there before it: files nothing removes
    there once filled this machine's memory and Ray killed the workers of later tests."""
    before, after = getattr(config, "shm_before", {}), _shm()
    left = {k: v for k, v in after.items() if k not in before}
    mib = lambda d: sum(d.values()) / 2**20  # noqa: E731
    if left or mib(before) > 512:
        terminalreporter.write_line(f"/dev/shm: {mib(before):.0f} MiB before the tests; they left {len(left)} entries, "
                                    f"{mib(left):.0f} MiB: {sorted(left)[:5]}")


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
