"""Ray Tune sweep: each trial is a whole Ray Train (+ DeepSpeed) run of one stage.

The trial function is a Train *driver* (Ray's Tune-with-Train V2 pattern): it builds the
stage's `TorchTrainer` and fits it. Two ways to feed Tune, chosen per sweep:

- callback: one fit whose per-epoch reports reach Tune through `TuneReportCallback`
  (ASHA with real Train workers), all but the last: the trial reports that one itself once the
  fit has returned (`report_callback`). Resume = Train's own resume of the same run name.
- segments (PBT): the driver fits `perturbation_interval` epochs at a time, resuming from
  the previous segment's checkpoint, and reports each segment's checkpoint with
  `tune.report`; PBT exploits checkpoints, and the callback forwards metrics only.

Trials need real Train workers (`train.num_workers >= 1`): in a Tune trial, in-process
Train's `ray.train.report`/`get_checkpoint` raise (Ray 2.60).

MLflow: the driver opens a parent run for the sweep; each trial finds or creates its child
run (tag `mlflow.parentRunId`) and hands its id to the Train loop, so a trial restarted by
PBT or `Tuner.restore` keeps logging to the same run.

A scheduler stopping a trial is normal operation. Tune tears the trial actor down as soon as its
`stop()` returns, and with it the Train controller the trial started (not the controller's
placement group: the sweep removes the groups of dead controllers, `release_dead`). Hence the
last report waits for the fit (ASHA stops every trial at `max_t`, on that report), and a Train
error that follows a stop request ends the trial quietly (`_stop_requested`).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping

from urbancross.atomic import write_json
from urbancross.config import Config, ConfigError, config_from_dict, save_config
from urbancross.tracking import check_tracking_server, configure, log_json_artifact, mlflow_run, retry
from urbancross.train.placement import release, releasing
from urbancross.train.trainer import RUN_FILE, absolute_paths, run_adapt, run_train, stage1_model
from urbancross.tune.space import Space, load_space

log = logging.getLogger("urbancross.tune")

PARENT_FILE = "mlflow_parent.json"  # in the experiment folder: the sweep's parent run id
SEGMENT_FILE = "tune_segment.json"  # in a segment checkpoint: the epoch it ends at
BEST_FILE = "best_config.yaml"

# run_train / run_adapt: (cfg, resume, *, callbacks=(), resume_from=None, stop_epoch=None) -> result dict
Runner = Callable[..., dict]


# --------------------------------------------------------------------------- small pure helpers


def experiment_dir(cfg: Config) -> Path:
    """`<storage_path>/<name>`; storage_path empty = `<out_dir>/tune`."""
    storage = cfg.tune.storage_path or os.path.join(cfg.out_dir, "tune")
    return Path(storage).resolve() / cfg.tune.name


def stage_epochs(cfg: Config, stage: str) -> int:
    return cfg.adapt.epochs if stage == "adapt" else cfg.train.epochs


def uses_segments(cfg: Config) -> bool:
    """PBT exploits checkpoints, which `TuneReportCallback` does not forward: run segments."""
    return cfg.tune.scheduler == "pbt"


def check_sweepable(cfg: Config) -> None:
    """In-process Train (num_workers 0) cannot run in a trial: Ray Train's report and
    get_checkpoint raise inside a Tune session, so a trial needs real Train workers."""
    if cfg.train.num_workers < 1:
        raise ConfigError(
            "tune: train.num_workers must be >= 1 in a sweep (Ray Train's in-process mode does not run "
            "inside a Tune trial); set it in the config, with --set train.num_workers=1, or in the space's params"
        )


def segment_ends(done: int, total: int, interval: int) -> list[int]:
    """Epochs at which the segments after epoch `done` stop, e.g. (0, 5, 2) -> [2, 4, 5]."""
    return list(range(done + interval, total, interval)) + [total] if done < total else []


def trial_config(base: Mapping[str, Any], params: Mapping[str, Any], where: str) -> Config:
    """The trial's config: the sweep's base config with the sampled params set and checked.

    A `val_*` metric needs validation in every reported epoch (the schedulers compare trials
    at each report), so such a trial validates every epoch whatever `train.val_every` says.
    """
    cfg = config_from_dict(dict(base), where).override(params, where)
    if cfg.tune.metric.startswith("val_") and cfg.train.val_every != 1:
        cfg = cfg.override({"train.val_every": 1}, where)
    return cfg


def best_config(base: Config, params: Mapping[str, Any]) -> Config:
    """The base config with the best trial's params: what `urbancross train --config` takes."""
    return base.override(params, where="best trial")


# --------------------------------------------------------------------------- MLflow nesting


def child_run_id(cfg: Config, parent_run_id: str, trial_id: str, trial_name: str) -> str:
    """Find this trial's child run under the parent, or create it (logging the trial's config)."""
    import mlflow

    check_tracking_server(configure(cfg))  # a down server fails in milliseconds (then `retry` waits)
    client = mlflow.MlflowClient()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    query = f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`tune.trial_id` = '{trial_id}'"
    found = client.search_runs([experiment_id], filter_string=query, max_results=1)
    if found:
        return found[0].info.run_id
    tags = {"mlflow.parentRunId": parent_run_id, "tune.trial_id": trial_id}
    with mlflow_run(cfg, trial_name, tags=tags) as run:
        return run.info.run_id


def _parent_run_id(cfg: Config, exp_dir: Path, space: Space) -> str:
    """The sweep's parent run: reused from the experiment folder when the sweep resumes."""
    path = exp_dir / PARENT_FILE
    if path.exists():
        return json.loads(path.read_text())["run_id"]
    tags = {"tune.space": space.path, "tune.stage": space.stage, "tune.scheduler": cfg.tune.scheduler}
    with mlflow_run(cfg, f"tune-{cfg.tune.name}", tags=tags) as run:
        run_id = run.info.run_id
    write_json(path, {"run_id": run_id})
    return run_id


# --------------------------------------------------------------------------- the trial (Train driver)


def default_runner(stage: str) -> Runner:
    return run_adapt if stage == "adapt" else run_train


def _pin_run(cfg: Config, stage: str, name: str, mlflow_run_id: str) -> None:
    """Make the stage's `resume=True` use Train run `name` and log into the trial's MLflow run."""
    write_json(Path(cfg.out_dir) / stage / RUN_FILE, {"name": name, "mlflow_run_id": mlflow_run_id})


def report_callback(last_epoch: int):
    """A `TuneReportCallback` that forwards every epoch's report except the fit's last
    (`epoch` >= `last_epoch`).

    ASHA stops a trial on the report that reaches `max_t`, and Tune then ends the trial actor while
    Train is still finishing (validation log, model export, result.json): the trial reports
    that epoch itself after `fit()` returned, so such a stop finds nothing left to cut short.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class AllButLast(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if not metrics or metrics[0].get("epoch", 0) < last_epoch:
                super().after_report(run_context, metrics, checkpoint)

    return AllButLast()


def _stop_requested(session) -> bool:
    """Whether Tune asked this trial to stop (`FunctionTrainable.cleanup` sets the trial session's
    `stop_event`; the session is Ray's internal one, the object `TuneReportCallback` uses too)."""
    return session is not None and session.stop_event.is_set()


def run_trial(params: dict, *, base: dict, stage: str, parent_run_id: str, runner: Runner | None) -> None:
    """Tune function trainable: one Train run of `stage` with the sampled `params`.

    The trial's outputs (Train storage, exported model, result.json) go to its own folder:
    `out_dir` = the Tune trial folder. A restarted trial (Tuner.restore, a retry) resumes the
    same Train run and MLflow run.
    """
    from ray import tune
    from ray.train._internal.session import get_session

    run = runner or default_runner(stage)
    ctx = tune.get_context()
    session = get_session()  # kept: Tune's cleanup drops it when it stops the trial
    where = f"trial {ctx.get_trial_name()}"
    cfg = trial_config(base, params, where).override({"out_dir": str(Path(ctx.get_trial_dir()).resolve())}, where)
    run_id = retry(lambda: child_run_id(cfg, parent_run_id, ctx.get_trial_id(), ctx.get_trial_name()), f"{where}: its MLflow run")
    if not uses_segments(cfg):
        _pin_run(cfg, stage, stage, run_id)
        last = stage_epochs(cfg, stage)
        try:
            result = run(cfg, resume=True, callbacks=[report_callback(last)])
        except Exception as e:
            if not _stop_requested(session):
                raise
            log.info("%s: stopped by the scheduler; its Train run ended with %s", where, type(e).__name__)
            return
        if result["metrics"].get("epoch", 0) >= last:  # the report the callback kept back
            path = result["checkpoint_path"]
            tune.report({**result["metrics"], **({"checkpoint_path": path} if path else {})})
        return
    checkpoint = tune.get_checkpoint()  # PBT cloned a better trial, or the sweep resumed
    resume_from = checkpoint.path if checkpoint else None
    done = json.loads((Path(resume_from) / SEGMENT_FILE).read_text())["epoch"] if resume_from else 0
    _pin_run(cfg, stage, f"{stage}-{uuid.uuid4().hex[:8]}" if resume_from else stage, run_id)
    for stop in segment_ends(done, stage_epochs(cfg, stage), cfg.tune.perturbation_interval):
        result = run(cfg, resume=True, resume_from=resume_from, stop_epoch=stop)
        if not result.get("checkpoint_path"):
            raise RuntimeError(f"{stage} reported no checkpoint at epoch {stop}; a segment must end with one")
        path = Path(result["checkpoint_path"])
        write_json(path / SEGMENT_FILE, {"epoch": stop})
        tune.report({**result["metrics"], "epoch": stop}, checkpoint=tune.Checkpoint.from_directory(str(path)))
        resume_from = None  # later segments resume the same Train run from its own checkpoint


# --------------------------------------------------------------------------- the sweep


def _scheduler(cfg: Config, space: Space):
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    t = cfg.tune
    epochs = stage_epochs(cfg, space.stage)
    if t.scheduler == "pbt":
        mutations = space.mutations()
        if not mutations:
            raise ConfigError(f"{space.path}: PBT needs at least one param it may mutate (choice/uniform/loguniform/randint)")
        return PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=1,  # one report = one segment of t.perturbation_interval epochs
            hyperparam_mutations=mutations,
            custom_explore_fn=space.clip,
            synch=t.synch,
        )
    return ASHAScheduler(
        time_attr="training_iteration", max_t=epochs, grace_period=min(t.grace_period, epochs), reduction_factor=t.reduction_factor
    )


def release_dead(known: set[str], where: str, every_s: float = 5.0):
    """A Tune callback that, every `every_s` during the sweep, removes the placement groups of
    Train controllers that died with their stopped trial (`placement.release`), so that later
    trials get their CPUs; `known`: controllers that existed before the sweep."""
    import time

    from ray.tune import Callback

    class ReleaseDead(Callback):
        checked = 0.0

        def on_step_begin(self, iteration, trials, **info):
            if time.monotonic() - self.checked >= every_s:
                self.checked = time.monotonic()
                try:
                    release(known, where, wait_s=None)
                except Exception as e:  # a missed check is retried at the next one, never the sweep's end
                    log.warning("%s: could not check for placement groups left behind: %s", where, e)

    return ReleaseDead()


def _tuner(cfg: Config, space: Space, exp_dir: Path, parent_run_id: str, runner: Runner | None, known: set[str] | None):
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    t = cfg.tune
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg.to_dict(), stage=space.stage, parent_run_id=parent_run_id, runner=runner),
        {"CPU": t.cpus_per_trial, "GPU": t.gpus_per_trial},
    )
    if tune.Tuner.can_restore(str(exp_dir)):
        log.info("tune: resuming the sweep at %s", exp_dir)
        return tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_errored=True), True
    tune_config = tune.TuneConfig(
        metric=t.metric,
        mode=t.mode,
        scheduler=_scheduler(cfg, space),
        search_alg=BasicVariantGenerator(random_state=cfg.seed),
        num_samples=t.num_samples,
        max_concurrent_trials=t.max_concurrent_trials,
    )
    run_config = tune.RunConfig(
        name=exp_dir.name,
        storage_path=str(exp_dir.parent),
        failure_config=tune.FailureConfig(max_failures=t.max_failures),
        # PBT may clone a checkpoint several reports old: keep them all (ASHA reports none)
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
        callbacks=[] if known is None else [release_dead(known, f"tune {cfg.tune.name}")],
    )
    return tune.Tuner(trainable, param_space=space.param_space(), tune_config=tune_config, run_config=run_config), False


def sweep_base(cfg: Config, space: Space) -> Config:
    """The config every trial starts from: space hints applied, paths absolute, the MLflow
    store pinned and (adapt) the stage-1 model resolved, since each trial gets its own out_dir."""
    cfg = absolute_paths(space.sweep_config(cfg))
    check_sweepable(cfg.override(space.fixed(), where=space.path))
    return cfg.override({"adapt.checkpoint": stage1_model(cfg)}) if space.stage == "adapt" else cfg


def run_tune(cfg: Config, space_path: str | os.PathLike, *, runner: Runner | None = None) -> dict:
    """Run (or resume) the sweep of `space_path` over `cfg`; write the best trial's config.

    Returns a JSON-able summary: the best config's path, metric and params, one row per
    trial, the MLflow parent run id and the experiment folder. `runner` replaces the
    stage's `run_train`/`run_adapt` (tests); Ray must be able to pickle it.
    """
    import ray

    space = load_space(space_path, cfg)
    cfg = sweep_base(cfg, space)
    exp_dir = experiment_dir(cfg)
    parent_run_id = _parent_run_id(cfg, exp_dir, space)
    if not ray.is_initialized():
        ray.init()  # what Tuner.fit would do; `releasing` reads the cluster's tables first
    with releasing(f"tune {cfg.tune.name}") as known:  # trials a scheduler stopped leave their Train groups
        tuner, restored = _tuner(cfg, space, exp_dir, parent_run_id, runner, known)
        log.info("tune: %s sweep of %s (stage %s) in %s", cfg.tune.scheduler, space.path, space.stage, exp_dir)
        grid = tuner.fit()
    trials = [_trial_row(r, cfg.tune.metric, space) for r in grid]
    best = pick_best(trials, cfg.tune.mode)
    if best is None:
        errors = [r["error"] for r in trials if r["error"]]
        raise RuntimeError(f"tune: no trial reported {cfg.tune.metric}; first error: {errors[0] if errors else 'none'}")
    best_path = exp_dir / BEST_FILE
    save_config(best_config(cfg, best["params"]), best_path)
    summary = {
        "experiment": str(exp_dir),
        "best_config": str(best_path),
        "best_trial": best["trial_id"],
        "best_metric": best["metric"],
        "best_params": best["params"],
        "metric": cfg.tune.metric,
        "mode": cfg.tune.mode,
        "scheduler": cfg.tune.scheduler,
        "stage": space.stage,
        "trials": trials,
        "parent_run_id": parent_run_id,
        "restored": restored,
    }
    _log_summary(cfg, parent_run_id, summary, best_path)
    return summary


def pick_best(trials: list[dict], mode: str) -> dict | None:
    """The trial with the best last-reported metric; None if no trial reported it."""
    scored = [t for t in trials if t["metric"] is not None]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda t: t["metric"])


def _log_summary(cfg: Config, parent_run_id: str, summary: dict, best_path: Path) -> None:
    import mlflow

    configure(cfg)
    with mlflow.start_run(run_id=parent_run_id):
        mlflow.log_metric(f"best_{summary['metric']}", summary["best_metric"])
        mlflow.log_artifact(str(best_path))
        log_json_artifact(summary, "tune_summary.json")


def _trial_row(result, metric: str, space: Space) -> dict:
    """One trial's summary from its last report (metric None if it never reported).

    For `val_mR` the trial's score is its best epoch's (`val_best_mR`): each stage exports its
    best val epoch, so that is the model the trial's params give.
    """
    last = result.metrics or {}
    value = last.get("val_best_mR") if metric == "val_mR" and last.get("val_best_mR") is not None else last.get(metric)
    return {
        "trial_id": last.get("trial_id") or Path(result.path).name,
        "metric": float(value) if value is not None else None,
        "params": {k: result.config[k] for k in space.params if k in result.config},
        "iterations": last.get("training_iteration", 0),  # continues from the clone after a PBT exploit
        "error": str(result.error) if result.error else None,
    }
