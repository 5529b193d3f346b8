"""Search spaces (pure), the Tune glue with a scripted runner, and real Train sweeps.

Marks: `ray` starts Ray; `slow` (PBT) pauses/restarts trials and takes minutes on 2 CPUs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from urbancross.config import Config, ConfigError, load_config
from urbancross.tune import run_tune
from urbancross.tune.space import load_space
from urbancross.tune.sweep import (
    best_config,
    check_sweepable,
    experiment_dir,
    pick_best,
    segment_ends,
    trial_config,
    uses_segments,
)

SPACES = Path(__file__).resolve().parents[1] / "tune_spaces"


def write_space(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


# --------------------------------------------------------------------------- the shipped spaces


@pytest.mark.parametrize("name", ["curriculum", "adversarial", "joint"])
def test_shipped_space_loads(name):
    space = load_space(SPACES / f"{name}.yaml")
    assert space.stage in ("train", "adapt")
    assert any(p.kind != "value" for p in space.params.values())


def test_curriculum_space_domains():
    from ray.tune.search.sample import Categorical, Float

    space = load_space(SPACES / "curriculum.yaml")
    assert space.stage == "train"
    domains = space.param_space()
    assert isinstance(domains["train.curriculum.pacing"], Categorical)
    assert domains["train.curriculum.pacing"].categories == ["linear", "root", "geometric"]
    start = domains["train.curriculum.start_fraction"]
    assert isinstance(start, Float) and (start.lower, start.upper) == (0.1, 0.6)
    assert domains["train.curriculum.difficulty"] == {"grid_search": ["similarity_margin", "caption_complexity"]}


def test_adversarial_space_mutations_for_pbt():
    from ray.tune.search.sample import Float, Integer

    space = load_space(SPACES / "adversarial.yaml")
    assert space.stage == "adapt" and space.tune["scheduler"] == "pbt"
    lr = space.param_space()["adapt.disc_lr"]
    assert isinstance(lr, Float) and (lr.lower, lr.upper) == (1e-4, 1e-2)
    depth = space.param_space()["adapt.disc_depth"]
    assert isinstance(depth, Integer) and (depth.lower, depth.upper) == (1, 4)
    mutations = space.mutations()
    assert "adapt.disc_depth" not in mutations  # mutate: false (an architecture size)
    assert mutations["adapt.schedule"] == ["constant", "linear", "dann"]  # a list: PBT shifts along it
    assert space.clip({"adapt.gamma": 36.0, "adapt.disc_lr": 5e-5, "adapt.disc_depth": 9}) == {
        "adapt.gamma": 30.0,
        "adapt.disc_lr": 1e-4,
        "adapt.disc_depth": 3,  # randint's high is exclusive
    }


def test_space_hints_fill_only_default_sweep_settings(tmp_path):
    path = write_space(
        tmp_path,
        {"tune": {"scheduler": "pbt", "num_samples": 6}, "params": {"train.lr": {"loguniform": [1.0e-4, 1.0e-2]}}},
    )
    space = load_space(path)
    cfg = Config().override({"tune.num_samples": 2})  # set by the user's config: the space's hint must not override it
    swept = space.sweep_config(cfg)
    assert (swept.tune.scheduler, swept.tune.num_samples) == ("pbt", 2)


# --------------------------------------------------------------------------- loader errors


@pytest.mark.parametrize(
    "params, message",
    [
        ({"train.curriculum.pace": {"choice": ["linear"]}}, "unknown field 'pace'; train.curriculum accepts: difficulty, enabled, length, pacing"),
        ({"train.curriculm.pacing": {"choice": ["linear"]}}, "unknown field 'curriculm'; train accepts:"),
        ({"train.curriculum": {"choice": [True]}}, "train.curriculum is a section"),
        ({"train.lr.x": {"choice": [1.0]}}, "train.lr is a value, not a section"),
        ({"train.lr": {"uniform": [0.1, 0.01]}}, "uniform: low must be < high, got [0.1, 0.01]"),
        ({"train.lr": {"uniform": [0.1, 0.1]}}, "low must be < high"),
        ({"train.lr": {"loguniform": [0.0, 0.1]}}, "loguniform: low must be > 0, got 0.0"),
        ({"train.lr": {"loguniform": ["1e-4", 0.1]}}, "expected [low, high] numbers"),
        ({"train.lr": {"uniform": [0.1]}}, "expected [low, high] numbers"),
        ({"train.curriculum.pacing": {"choice": []}}, "choice: expected a non-empty list"),
        ({"train.curriculum.pacing": {"choice": ["linear", "spiral"]}}, "must be one of 'linear', 'root', 'geometric', got 'spiral'"),
        ({"train.curriculum.start_fraction": {"uniform": [0.5, 1.5]}}, "start_fraction must be in (0, 1], got 1.5"),
        ({"train.epochs": {"uniform": [1, 4]}}, "uniform samples floats but train.epochs is an integer; use randint"),
        ({"adapt.disc_depth": {"randint": [1.0, 4.5]}}, "randint: bounds must be integers"),
        ({"train.lr": {"uniform": [0.1, 0.2], "grid": [0.1]}}, "a domain is one of"),
        ({"train.lr": {"uniform": [0.1, 0.2], "mutate": "no"}}, "mutate: expected true or false"),
        ({"train.epochs": "three"}, "train.epochs: expected an integer, got 'three'"),
        ({"tune.num_samples": {"randint": [1, 3]}}, "sweep settings cannot be searched"),
        ({"train.epochs": 3}, "nothing to search"),
    ],
)
def test_bad_param_names_file_and_key(tmp_path, params, message):
    path = write_space(tmp_path, {"stage": "train", "params": params})
    with pytest.raises(ConfigError) as e:
        load_space(path)
    text = str(e.value)
    assert text.startswith(str(path)), text
    assert message in text, text
    if "nothing to search" not in message:
        assert f"params.{next(iter(params))}" in text


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"stage": "train", "parms": {}}, "unknown key parms; a search space accepts: stage, tune, params"),
        ({"stage": "evaluate", "params": {"train.lr": {"choice": [0.1]}}}, "stage: must be one of train, adapt"),
        ({"params": {}}, "params: expected a non-empty mapping"),
        ({"tune": {"scheduler": "hyperband"}, "params": {"train.lr": {"choice": [0.1]}}}, "tune.scheduler: must be one of 'asha', 'pbt'"),
        ({"tune": {"grace": 2}, "params": {"train.lr": {"choice": [0.1]}}}, "unknown key tune.grace"),
        (["train.lr"], "a search space must be a mapping"),
    ],
)
def test_bad_space_file(tmp_path, doc, message):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as e:
        load_space(path)
    assert str(e.value).startswith(str(path)) and message in str(e.value), str(e.value)


def test_missing_space_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read search space"):
        load_space(tmp_path / "nope.yaml")


# --------------------------------------------------------------------------- sweep helpers (pure)


def test_segment_ends():
    assert segment_ends(0, 5, 2) == [2, 4, 5]
    assert segment_ends(0, 4, 2) == [2, 4]
    assert segment_ends(2, 5, 1) == [3, 4, 5]
    assert segment_ends(4, 4, 1) == []


def test_trial_and_best_config_round_trip(tmp_path):
    base = Config(out_dir=str(tmp_path))
    params = {"train.curriculum.pacing": "linear", "adapt.disc_depth": 3}
    cfg = trial_config(base.to_dict(), params, where="trial t1")
    assert (cfg.train.curriculum.pacing, cfg.adapt.disc_depth, cfg.out_dir) == ("linear", 3, str(tmp_path))
    with pytest.raises(ConfigError, match="trial t1: adapt.disc_depth: expected an integer"):
        trial_config(base.to_dict(), {"adapt.disc_depth": 2.5}, where="trial t1")
    from urbancross.config import save_config

    save_config(best_config(base, params), tmp_path / "best.yaml")
    assert load_config(tmp_path / "best.yaml") == cfg


def test_a_trial_scored_on_val_validates_every_epoch(tmp_path):
    base = Config(out_dir=str(tmp_path)).override({"train.val_every": 5})
    assert trial_config(base.to_dict(), {}, where="t").train.val_every == 1  # ASHA/PBT compare val_mR at every report
    other = base.override({"tune.metric": "loss", "tune.mode": "min"})
    assert trial_config(other.to_dict(), {}, where="t").train.val_every == 5


def test_experiment_dir_and_mode(tmp_path):
    cfg = Config(out_dir=str(tmp_path))
    assert experiment_dir(cfg) == (tmp_path / "tune" / "sweep").resolve()
    cfg = cfg.override({"tune.storage_path": str(tmp_path / "s"), "tune.name": "n"})
    assert experiment_dir(cfg) == (tmp_path / "s" / "n").resolve()
    assert not uses_segments(cfg)  # ASHA: one fit, metrics through TuneReportCallback
    cfg = cfg.override({"tune.scheduler": "pbt"})
    assert uses_segments(cfg)  # PBT exploits checkpoints: the driver reports them per segment
    cfg = cfg.override({"train.num_workers": 0})
    with pytest.raises(ConfigError, match="train.num_workers must be >= 1 in a sweep"):
        check_sweepable(cfg)


def test_pick_best():
    trials = [
        {"trial_id": "a", "metric": 0.2},
        {"trial_id": "b", "metric": None},  # never reported (errored before its first epoch)
        {"trial_id": "c", "metric": 0.5},
    ]
    assert pick_best(trials, "max")["trial_id"] == "c"
    assert pick_best(trials, "min")["trial_id"] == "a"
    assert pick_best([{"trial_id": "b", "metric": None}], "max") is None


# --------------------------------------------------------------------------- Tune glue (Ray, no Train)


def scripted_runner(fail_pacing: str | None):
    """A stand-in for run_train without Ray Train: val_mR = 10/20/30 by pacing + epochs done.

    ASHA mode (no stop_epoch): reports every epoch straight to Tune. PBT mode: runs epochs up
    to `stop_epoch` from its own last checkpoint, else `resume_from`, and returns a checkpoint.
    """

    def run(cfg, resume, *, callbacks=(), resume_from=None, stop_epoch=None):
        import json
        from pathlib import Path

        from ray import tune

        if cfg.train.curriculum.pacing == fail_pacing:
            raise RuntimeError("simulated interruption")
        score = {"linear": 10.0, "root": 20.0, "geometric": 30.0}[cfg.train.curriculum.pacing]
        if stop_epoch is None:
            for epoch in range(1, cfg.train.epochs + 1):
                tune.report({"val_mR": score + epoch, "epoch": epoch})
            return {"metrics": {"val_mR": score + cfg.train.epochs}, "checkpoint_path": None}
        own = Path(cfg.out_dir) / "ckpt"
        start = json.loads((own / "state.json").read_text())["epoch"] if own.exists() else 0
        if resume_from:
            start = json.loads((Path(resume_from) / "state.json").read_text())["epoch"]
        assert start < stop_epoch, (start, stop_epoch)
        out = own / f"epoch{stop_epoch}"
        out.mkdir(parents=True)
        (out / "state.json").write_text(json.dumps({"epoch": stop_epoch}))
        (own / "state.json").write_text(json.dumps({"epoch": stop_epoch}))
        return {"metrics": {"val_mR": score + stop_epoch}, "checkpoint_path": str(out)}

    return run


def scripted_config(tmp_path: Path) -> Config:
    return Config(out_dir=str(tmp_path / "run")).override({
        "mlflow.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",  # mlflow.set_tracking_uri leaks via the env
        "data.manifest": str(tmp_path / "bench"),  # not read by the scripted runner
        "train.num_workers": 1, "train.epochs": 2,
        "tune.num_samples": 1, "tune.max_concurrent_trials": 2, "tune.cpus_per_trial": 0.25,
    })


@pytest.mark.ray
def test_interrupted_sweep_resumes_with_the_same_parent_and_child_runs(ray_session, tmp_path):
    import mlflow

    space = write_space(tmp_path, {"params": {"train.curriculum.pacing": {"grid": ["linear", "geometric"]}}})
    cfg = scripted_config(tmp_path)

    first = run_tune(cfg, space, runner=scripted_runner(fail_pacing="geometric"))
    assert not first["restored"]
    assert (first["best_params"], first["best_metric"]) == ({"train.curriculum.pacing": "linear"}, 12.0)
    assert sorted(t["error"] is None for t in first["trials"]) == [False, True]

    second = run_tune(cfg, space, runner=scripted_runner(fail_pacing=None))
    assert second["restored"] and second["parent_run_id"] == first["parent_run_id"]
    assert (second["best_params"], second["best_metric"]) == ({"train.curriculum.pacing": "geometric"}, 32.0)
    assert load_config(second["best_config"]).train.curriculum.pacing == "geometric"

    mlflow.set_tracking_uri(cfg.tracking_uri())
    runs = mlflow.search_runs(experiment_names=[cfg.mlflow.experiment], output_format="list")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == first["parent_run_id"]]
    assert len(runs) == 3 and len(children) == 2  # the resumed trial logged into its first child run
    parent = mlflow.get_run(first["parent_run_id"])
    assert parent.data.metrics["best_val_mR"] == 32.0


@pytest.mark.ray
@pytest.mark.slow  # synchronous PBT pauses and restarts trials: about 2 min here
def test_pbt_runs_segments_and_clones_checkpoints(ray_session, tmp_path):
    space = write_space(
        tmp_path,
        {
            "tune": {"scheduler": "pbt"},
            "params": {
                "train.curriculum.pacing": {"grid": ["linear", "geometric"]},
                "train.curriculum.start_fraction": {"uniform": [0.2, 0.4]},
            },
        },
    )
    cfg = scripted_config(tmp_path).override({"train.epochs": 3, "tune.synch": True})
    summary = run_tune(cfg, space, runner=scripted_runner(fail_pacing=None))
    assert summary["scheduler"] == "pbt"
    # After epoch 1 (linear 11 < geometric 31) the linear trial clones the geometric one's
    # checkpoint and config, resumes at epoch 1 from the segment file and ends at 30 + 3.
    assert [t["error"] for t in summary["trials"]] == [None, None]
    assert [t["metric"] for t in summary["trials"]] == [33.0, 33.0]
    assert [t["params"]["train.curriculum.pacing"] for t in summary["trials"]] == ["geometric", "geometric"]
    assert (Path(summary["experiment"]) / "pbt_global.txt").is_file()  # PBT's log of the exploit


# --------------------------------------------------------------------------- a real sweep (Ray)


def tiny_config(tmp_path: Path) -> Config:
    """Two-domain benchmark of 8 images each and a 2-epoch, 1-worker tiny model."""
    from urbancross.config import SynthConfig
    from urbancross.data.synth import synthesize

    synth = SynthConfig(domains=["Finland", "Spain"], images_per_domain=8, test_fraction=0.25)
    synthesize(synth, str(tmp_path / "bench"))
    return Config(out_dir=str(tmp_path / "run"), synth=synth).override({
        "mlflow.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",  # mlflow.set_tracking_uri leaks via the env
        "data.manifest": str(tmp_path / "bench"),
        "model.use_segments": False,
        "train.epochs": 2, "train.batch_size": 4, "train.num_workers": 1,
        "train.val_images": 2, "train.ingest_cpus": 0.25,
        "tune.num_samples": 1, "tune.max_concurrent_trials": 1, "tune.cpus_per_trial": 0.25,
    })


@pytest.mark.ray
def test_asha_sweep_logs_child_runs_and_writes_a_best_config_that_trains(ray_session, placement_groups, tmp_path):
    """ASHA stops each trial: at max_t on its last report, or mid-fit at a rung. Either is normal
    operation: no trial errs, one that reached max_t finished its Train run (result.json), and no
    placement group is left holding CPUs for the retrain in the same Ray runtime."""
    import mlflow

    from urbancross.train import run_train

    before = placement_groups()

    space = write_space(
        tmp_path,
        {
            "stage": "train",
            "params": {
                "train.curriculum.pacing": {"grid": ["linear", "geometric"]},
                "train.curriculum.start_fraction": {"uniform": [0.3, 0.6]},
            },
        },
    )
    cfg = tiny_config(tmp_path)
    summary = run_tune(cfg, space)

    assert len(summary["trials"]) == 2
    assert {t["params"]["train.curriculum.pacing"] for t in summary["trials"]} == {"linear", "geometric"}
    scores = [t["metric"] for t in summary["trials"]]
    assert all(s is not None and 0.0 <= s <= 100.0 for s in scores)
    assert summary["best_metric"] == max(scores)
    assert [t["error"] for t in summary["trials"]] == [None, None]
    for t in summary["trials"]:
        if t["iterations"] == 2:  # stopped by ASHA at max_t, on its last report
            (trial_dir,) = Path(summary["experiment"]).glob(f"*{t['trial_id']}*")
            assert (trial_dir / "train" / "result.json").is_file(), t
    assert placement_groups() - before == set()

    mlflow.set_tracking_uri(cfg.tracking_uri())
    runs = mlflow.search_runs(experiment_names=[cfg.mlflow.experiment], output_format="list")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == summary["parent_run_id"]]
    assert len(children) == 2 and len(runs) == 3  # one parent + one child per trial, nothing else
    assert {r.data.tags["tune.trial_id"] for r in children} == {t["trial_id"] for t in summary["trials"]}
    for child in children:
        assert "val_mR" in child.data.metrics and child.data.params["train.epochs"] == "2"

    best = load_config(summary["best_config"])
    assert best.train.curriculum.pacing == summary["best_params"]["train.curriculum.pacing"]
    assert best.out_dir == str(Path(cfg.out_dir).resolve()) and best.mlflow.tracking_uri == cfg.mlflow.tracking_uri
    result = run_train(best.override({"out_dir": str(tmp_path / "retrain"), "train.epochs": 1}))
    assert result["metrics"]["epoch"] == 1 and Path(result["model_path"]).is_file()


@pytest.mark.ray
@pytest.mark.heavy  # 2 trials x 2 segments of real Train + DeepSpeed: 150-300 s alone on 2 CPUs; opt-in
def test_pbt_sweep_with_real_training(ray_session, tmp_path):
    import mlflow

    space = write_space(
        tmp_path,
        {
            "stage": "train",
            "tune": {"scheduler": "pbt", "synch": True},
            "params": {"train.curriculum.start_fraction": {"uniform": [0.3, 0.6]}, "train.lr": {"loguniform": [1.0e-4, 1.0e-3]}},
        },
    )
    cfg = tiny_config(tmp_path).override({"tune.num_samples": 2})
    summary = run_tune(cfg, space)
    assert [t["error"] for t in summary["trials"]] == [None, None]
    assert [t["iterations"] for t in summary["trials"]] == [2, 2]  # one report per 1-epoch segment
    mlflow.set_tracking_uri(cfg.tracking_uri())
    runs = mlflow.search_runs(experiment_names=[cfg.mlflow.experiment], output_format="list")
    assert sum(r.data.tags.get("mlflow.parentRunId") == summary["parent_run_id"] for r in runs) == 2
    assert load_config(summary["best_config"]).train.curriculum.start_fraction == pytest.approx(
        summary["best_params"]["train.curriculum.start_fraction"]
    )


def test_a_trial_is_scored_by_its_best_val_epoch():
    from types import SimpleNamespace

    from urbancross.tune.sweep import _trial_row

    space = SimpleNamespace(params={})
    result = SimpleNamespace(metrics={"val_mR": 20.0, "val_best_mR": 31.0, "loss": 1.5}, path="/x/t1", config={}, error=None)
    assert _trial_row(result, "val_mR", space)["metric"] == 31.0  # the exported model is the best epoch's
    assert _trial_row(result, "loss", space)["metric"] == 1.5
    result.metrics = {"val_mR": 20.0}  # a stage that never validated twice: the last report
    assert _trial_row(result, "val_mR", space)["metric"] == 20.0
