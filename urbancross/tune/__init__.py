"""Hyperparameter sweeps: YAML search spaces (`space`) run by Ray Tune over Ray Train trials (`sweep`)."""

from urbancross.tune.space import Param, Space, load_space
from urbancross.tune.sweep import run_tune

__all__ = ["Param", "Space", "load_space", "run_tune"]
