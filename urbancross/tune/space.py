"""Search spaces as YAML data, turned into Ray Tune domains.

A space file (tune_spaces/*.yaml) has three top-level keys::

    stage: train                  # which run a trial is: train | adapt
    tune: {scheduler: asha}       # optional sweep settings (fields of `tune` in the config)
    params:                       # dotted config path -> one domain (or a fixed value)
      train.curriculum.pacing: {choice: [linear, root, geometric]}
      train.curriculum.start_fraction: {uniform: [0.1, 0.6]}
      adapt.disc_lr: {loguniform: [1.0e-4, 1.0e-2]}
      adapt.disc_depth: {randint: [1, 4], mutate: false}   # high is exclusive, as in Tune
      train.curriculum.difficulty: {grid: [similarity_margin, caption_complexity]}
      train.epochs: 4                                      # fixed for every trial

Tune has no YAML form for random distributions, hence this small mapping. Every value a
domain can produce (choices, grid values, range bounds) is checked by building a config
with it through `urbancross.config`, so the space obeys exactly the config's own rules.
`mutate: false` keeps a param out of PBT's mutations (e.g. an architecture size, which a
cloned checkpoint must match).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from urbancross.config import Config, ConfigError, TuneConfig, read_yaml_file

STAGES = ("train", "adapt")
KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
TOP_KEYS = ("stage", "tune", "params")


@dataclass(frozen=True)
class Param:
    """One searched (or fixed) config field: `kind` is one of KINDS, or `value` for a constant."""

    kind: str
    args: tuple
    mutate: bool = True

    def domain(self) -> Any:
        """The Ray Tune domain (or the constant) for this param."""
        from ray import tune

        if self.kind == "value":
            return self.args[0]
        if self.kind == "choice":
            return tune.choice(list(self.args))
        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        return getattr(tune, self.kind)(*self.args)


@dataclass
class Space:
    """A parsed, validated search space."""

    path: str
    stage: str
    params: dict[str, Param]
    tune: dict[str, Any] = field(default_factory=dict)

    def param_space(self) -> dict[str, Any]:
        """Tune's `param_space` values, keyed by dotted config path."""
        return {key: p.domain() for key, p in self.params.items()}

    def fixed(self) -> dict[str, Any]:
        """The params every trial shares (plain values, not domains)."""
        return {key: p.args[0] for key, p in self.params.items() if p.kind == "value"}

    def mutations(self) -> dict[str, Any]:
        """PBT `hyperparam_mutations`: random params that may change while a trial trains.

        A choice is given as a list: PBT shifts along a list, but would multiply a value
        drawn from a `tune.choice` domain by 1.2 (meaningless for strings).
        """
        return {
            key: list(p.args) if p.kind == "choice" else p.domain()
            for key, p in self.params.items()
            if p.mutate and p.kind in ("choice", "uniform", "loguniform", "randint")
        }

    def clip(self, config: dict) -> dict:
        """PBT `custom_explore_fn`: a perturbed value (x1.2 or x0.8) stays inside its range."""
        for key, p in self.params.items():
            if key in config and p.kind in ("uniform", "loguniform", "randint"):
                low, high = p.args
                config[key] = min(max(config[key], low), high - 1 if p.kind == "randint" else high)
        return config

    def sweep_config(self, cfg: Config) -> Config:
        """`cfg` with the space's `tune` hints filling in sweep settings left at their defaults."""
        defaults = TuneConfig()
        hints = {
            f"tune.{k}": v for k, v in self.tune.items() if getattr(cfg.tune, k) == getattr(defaults, k)
        }
        return cfg.override(hints, where=self.path)


def load_space(path: str | Path, base: Config | None = None) -> Space:
    """Read and validate a space file; `base` is the config the params are checked against."""
    return parse_space(read_yaml_file(path, "search space"), str(path), base or Config())


def parse_space(raw: Any, where: str, base: Config) -> Space:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a search space must be a mapping with keys {', '.join(TOP_KEYS)}")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]}; a search space accepts: {', '.join(TOP_KEYS)}")
    stage = raw.get("stage", "train")
    if stage not in STAGES:
        raise ConfigError(f"{where}: stage: must be one of {', '.join(STAGES)}, got {stage!r}")
    hints = raw.get("tune") or {}
    if not isinstance(hints, dict):
        raise ConfigError(f"{where}: tune: expected a mapping of sweep settings, got {hints!r}")
    base.override({f"tune.{k}": v for k, v in hints.items()}, where)
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{where}: params: expected a non-empty mapping of dotted config paths to domains")
    parsed = {str(key): parse_param(str(key), spec, where, base) for key, spec in params.items()}
    if not any(p.kind != "value" for p in parsed.values()):
        raise ConfigError(f"{where}: params: nothing to search, every param is a fixed value")
    return Space(path=where, stage=stage, params=parsed, tune=dict(hints))


def parse_param(key: str, spec: Any, where: str, base: Config) -> Param:
    """Check `key` names a config field and `spec` a well-formed domain of its values."""
    label = f"{where}: params.{key}"
    field_type = check_path(key, label)
    if not (isinstance(spec, dict) and set(spec) & set(KINDS)):
        _check_values(base, key, [spec], label)
        return Param("value", (spec,), mutate=False)
    extra = sorted(set(spec) - set(KINDS) - {"mutate"})
    kinds = [k for k in spec if k in KINDS]
    if extra or len(kinds) != 1:
        raise ConfigError(
            f"{label}: a domain is one of {', '.join(KINDS)} (plus optional mutate), got keys {', '.join(map(str, spec))}"
        )
    kind, args = kinds[0], spec[kinds[0]]
    mutate = spec.get("mutate", True)
    if not isinstance(mutate, bool):
        raise ConfigError(f"{label}: mutate: expected true or false, got {mutate!r}")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{label}: {kind}: expected a non-empty list, got {args!r}")
    if kind in ("uniform", "loguniform", "randint"):
        _check_range(kind, args, label)
    if kind in ("uniform", "loguniform") and field_type is int:
        raise ConfigError(f"{label}: {kind} samples floats but {key} is an integer; use randint")
    _check_values(base, key, args, label)
    return Param(kind, tuple(args), mutate)


def check_path(key: str, label: str) -> Any:
    """Walk the Config dataclasses along `key`; it must end on a value field, whose type is returned."""
    cls: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            section = ".".join(parts[:i]) or "config"
            raise ConfigError(f"{label}: unknown field {part!r}; {section} accepts: {', '.join(sorted(fields))}")
        tp = typing.get_type_hints(cls)[part]
        last = i == len(parts) - 1
        if dataclasses.is_dataclass(tp) and last:
            raise ConfigError(f"{label}: {key} is a section; name one of its fields, e.g. {key}.{dataclasses.fields(tp)[0].name}")
        if not dataclasses.is_dataclass(tp) and not last:
            raise ConfigError(f"{label}: {'.'.join(parts[: i + 1])} is a value, not a section")
        cls = tp
    if parts[0] == "tune":
        raise ConfigError(f"{label}: sweep settings cannot be searched; put them under the top-level `tune:`")
    return cls


def _check_range(kind: str, args: list, label: str) -> None:
    if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise ConfigError(f"{label}: {kind}: expected [low, high] numbers, got {args!r} (write 1e-4 as 1.0e-4 in YAML)")
    low, high = args
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ConfigError(f"{label}: {kind}: low must be < high, got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{label}: loguniform: low must be > 0, got {low}")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"{label}: randint: bounds must be integers, got {args!r}")


def _check_values(base: Config, key: str, values: list, label: str) -> None:
    """Every value the domain can produce must make a valid config (the config's own checks)."""
    for value in values:
        base.override({key: value}, where=label)
