"""TorchTrainer glue for stage 1 (`run_train`) and stage 2 (`run_adapt`).

The driver reads the manifest splits, decodes each stage's rows once (Ray Data, then cached in
the object store or on disk: `urbancross.train.cache`), creates the MLflow run and the
`TorchTrainer`, and writes the result. Per-epoch work (shuffle, augmentation, curriculum
selection) happens in the workers on the cached arrays.

Resume (Train V2 has no `resume_from_checkpoint`): every fresh run gets a new name
`<stage>-<time>` under `<out_dir>/ray_results`, recorded in `<out_dir>/<stage>/run.json`;
`resume=True` re-runs with that same `RunConfig(name, storage_path)`, so the loop finds the
latest checkpoint through `ray.train.get_checkpoint()` and logs into the same MLflow run.
In-process runs (`train.num_workers: 0`) have no Train storage: they keep their latest
checkpoint in `<out_dir>/<stage>/checkpoints/`, and a resume starts from it.
Outputs: `<out_dir>/<stage>/model.pt` (plain state dict for `create_model(pretrained=...)`)
and `<out_dir>/<stage>/result.json`.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from urbancross import storage
from urbancross.config import Config, ConfigError, dump_config, local_absolute
from urbancross.data.ingest import caption_texts, read_split, sample_key
from urbancross.data.manifest import ManifestError, read_manifest
from urbancross.embedded import EMBEDDED
from urbancross.model.factory import announce_weights
from urbancross.model.inputs import ModelInputs
from urbancross.tracking import log_json_artifact, mlflow_run, retry
from urbancross.train.cache import fingerprint, use_disk, write_folder
from urbancross.train.curriculum import caption_complexity
from urbancross.train.loop import adapt_loop_per_worker, train_loop_per_worker
from urbancross.train.placement import releasing

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
OPTIONS = {"callbacks", "resume_from", "stop_epoch", "on_step"}
RESULT_FILE = "result.json"
MODEL_FILE = "model.pt"
CONFIG_FILE = "config.yaml"
CHECKPOINTS = "checkpoints"  # in-process runs only


# --------------------------------------------------------------------------- paths + run state


def absolute_paths(cfg: Config) -> Config:
    """`cfg` with every path absolute and the MLflow store pinned: Ray workers and actors
    run in other directories, and a later command must find the same store."""
    if not cfg.data.manifest:
        raise ConfigError("data.manifest is empty: set it to a manifest folder (or run `urbancross demo`)")
    paths = ("out_dir", "data.manifest", "data.root", "adapt.checkpoint", "model.pretrained")
    flat = cfg.flat()
    cfg = cfg.override({key: local_absolute(flat[key]) for key in paths if flat[key] != EMBEDDED}, where="absolute paths")
    return cfg.override({"mlflow.tracking_uri": cfg.tracking_uri()}, where="absolute paths")


def _write_json(uri: str, obj: Any) -> None:
    storage.write_json(uri, obj, indent=2, sort_keys=True, default=str)


def in_process_checkpoints(cfg: Config, stage: str) -> Path | None:
    """An in-process run's checkpoint folder (None with Train workers, whose checkpoints Ray stores).

    There is no Train storage to upload to in-process, so the folder must be on this machine.
    """
    if cfg.train.num_workers != 0:
        return None
    folder = storage.local_path(storage.join(cfg.out_dir, stage, CHECKPOINTS))
    if folder is None:
        raise ConfigError(f"out_dir {cfg.out_dir} is remote: in-process runs (train.num_workers 0) keep checkpoints locally; use Train workers")
    return Path(folder)


def latest_local_checkpoint(folder: Path | None) -> str | None:
    """The newest `epoch_*` checkpoint an in-process run left in `folder`, if any."""
    epochs = sorted(folder.glob("epoch_*")) if folder is not None else []
    return str(epochs[-1]) if epochs else None


def run_state(cfg: Config, stage: str, resume: bool) -> dict:
    """Name (and MLflow run id) of this stage's run: the recorded one to resume, else a new one."""
    path = storage.join(cfg.out_dir, stage, RUN_FILE)
    if resume:
        if not storage.exists(path):
            raise FileNotFoundError(f"{path}: no {stage} run to resume (run without --resume first)")
        return storage.read_json(path)
    return {"name": f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}", "mlflow_run_id": None}


# --------------------------------------------------------------------------- data


def held_out(table: pa.Table, count: int, seed: int) -> tuple[pa.Table, pa.Table]:
    """(rest, slice): a seeded slice of `count` images, disjoint from the rest."""
    import numpy as np

    ids = table.column("image_id").to_pylist()
    order = np.argsort([sample_key(f"{seed}/{i}") for i in ids], kind="stable")
    chosen = np.zeros(len(ids), dtype=bool)
    chosen[order[:count]] = True
    return table.filter(pa.array(~chosen)), table.filter(pa.array(chosen))


def validation_slice(cfg: Config, table: pa.Table, domain: str | None) -> tuple[pa.Table, pa.Table | None]:
    """(training rows, validation rows): the val split when present, else held out of `table`."""
    if cfg.train.val_images == 0:
        return table, None
    try:
        val = read_split(cfg, cfg.data.val_split, domain)
    except ManifestError:
        count = min(cfg.train.val_images, table.num_rows // 5)
        if count == 0:
            return table, None
        return held_out(table, count, cfg.seed)
    return table, held_out(val, cfg.train.val_images, cfg.seed)[1] if val.num_rows > cfg.train.val_images else val


def check_disjoint(cfg: Config, *used: pa.Table | None) -> None:
    """A test image must never be trained, adapted or validated on."""
    table = read_manifest(cfg.data.manifest, columns=["image_id", "split"])
    test = set(table.filter(pc.equal(table.column("split"), cfg.data.test_split)).column("image_id").to_pylist())
    for t in used:
        if t is None:
            continue
        leak = test.intersection(t.column("image_id").to_pylist())
        if leak:
            raise ManifestError(f"{cfg.data.manifest}: {len(leak)} test image(s) also in training data, e.g. {sorted(leak)[:3]}")


def difficulty_scores(cfg: Config, table: pa.Table) -> dict[str, list]:
    """Cold-start difficulty (caption complexity), keyed like the loop's batches."""
    rows = table.select([c for c in ("image_id", "captions", "refined_captions") if c in table.column_names]).to_pylist()
    return {
        "keys": [sample_key(str(r["image_id"])) for r in rows],
        "values": [caption_complexity(caption_texts(r, cfg)) for r in rows],
    }


def note_missing_labels(cfg: Config, table: pa.Table, stage: str) -> bool:
    """Say once, in the driver, when CMPAGL's intra-class term is off because the training rows
    have no scene class (`label`; e.g. the UrbanCross release). True when it said so."""
    if cfg.loss.kind != "triplet" or cfg.loss.intra_class_weight == 0:
        return False
    if "label" in table.column_names and pc.sum(pc.greater(pc.utf8_length(table["label"]), 0)).as_py():
        return False
    log.info("%s: the training rows have no scene labels (manifest column `label`): the intra-class loss term is off", stage)
    return True


def model_inputs(cfg: Config, table: pa.Table, cache: bool = False):
    """Manifest rows -> Ray Dataset of decoded arrays (`ModelInputs`; `cache=True`: the compact
    uint8 form training caches).

    `train.ingest_actors` >= 1: a pool of `ModelInputs` actors (tokenizer built once per
    actor). 0: plain tasks (no actor start-up; best for tiny data on few CPUs).
    """
    import ray.data

    blocks = max(1, min(table.num_rows, 4 * max(1, cfg.train.num_workers)))
    step = math.ceil(table.num_rows / blocks)
    ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, table.num_rows, step)])
    common = {"batch_format": "numpy", "batch_size": max(cfg.train.batch_size, 64), "num_cpus": cfg.train.ingest_cpus}
    if cfg.train.ingest_actors == 0:
        return ds.map_batches(_decode_task, fn_kwargs={"cfg": cfg, "cache": cache}, **common)
    return ds.map_batches(
        ModelInputs,
        fn_constructor_kwargs={"cfg": cfg, "train": False, "cache": cache},
        compute=ray.data.ActorPoolStrategy(size=cfg.train.ingest_actors),
        **common,
    )


def training_cache(cfg: Config, table: pa.Table, stage: str) -> tuple[Any, str | None]:
    """Decode a stage's rows once for the whole run (see `urbancross.train.cache`):
    (materialized dataset, None) in memory, or (None, folder) on disk."""
    t0 = time.perf_counter()
    one = _decode_task({k: _column(v) for k, v in table.slice(0, 1).to_pydict().items()}, cfg, cache=True)
    per_row = sum(v.nbytes for v in one.values())
    total_mb = per_row * table.num_rows / 2**20
    if use_disk(cfg, table.num_rows, per_row):
        folder = Path(cfg.out_dir) / stage / "cache" / fingerprint(cfg, table)
        batches = model_inputs(cfg, table, cache=True).iter_batches(batch_size=256, batch_format="numpy")
        out = None, write_folder(batches, table.num_rows, folder)
    else:
        out = model_inputs(cfg, table, cache=True).materialize(), None
    where = f"disk ({out[1]})" if out[1] else "memory (object store; each worker keeps a copy)"
    log.info("%s: %d rows decoded once, %.1f MB, cached in %s in %.1fs", stage, table.num_rows, total_mb, where, time.perf_counter() - t0)
    return out


def _column(values: list):
    import numpy as np

    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


def validation_inputs(cfg: Config, table: pa.Table | None):
    """Validation rows decoded once, held in the object store (they are few and never augmented).

    Re-executing a small per-worker dataset every epoch next to the training split stalls the
    training epoch that follows it (Ray 2.60).
    """
    return None if table is None else model_inputs(cfg, table).materialize()


def _decode_task(batch: dict, cfg: Config, cache: bool = False) -> dict:
    return _inputs(cfg, cache)(batch)


@functools.lru_cache(maxsize=4)
def _inputs(cfg: Config, cache: bool) -> ModelInputs:
    """One `ModelInputs` (tokenizer, transforms) per Ray worker process and config, not per batch."""
    return ModelInputs(cfg, train=False, cache=cache)


# --------------------------------------------------------------------------- trainer


def _trainer(cfg: Config, loop: Callable, loop_config: dict, name: str, datasets: dict, split: list[str], callbacks=()):
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t = cfg.train
    scaling = ScalingConfig(
        num_workers=t.num_workers,
        use_gpu=t.use_gpu,
        resources_per_worker=None if t.num_workers == 0 else {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})},
    )
    run = RunConfig(
        name=name,
        storage_path=storage.join(cfg.out_dir, "ray_results"),  # a URI stays one (Ray writes s3:// itself)
        failure_config=FailureConfig(max_failures=t.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        callbacks=list(callbacks) or None,
    )
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=scaling,
        run_config=run,
        datasets={k: v for k, v in datasets.items() if v is not None},
        dataset_config=ray.train.DataConfig(datasets_to_split=split),
    )


def _fit(
    cfg: Config, stage: str, loop: Callable, loop_config: dict, datasets: dict, split: list[str], state: dict, options: dict, model_meta: dict
) -> dict:
    """Create/resume the MLflow run, fit, and record the result (the loop exports the model)."""
    import ray

    from urbancross.model.pyfunc import log_model  # imports mlflow: only the driver needs it, not the Train workers

    if not ray.is_initialized():
        ray.init()
    stage_dir = storage.join(cfg.out_dir, stage)
    local_checkpoints = in_process_checkpoints(cfg, stage)
    resume_from = options.get("resume_from")
    if state.get("mlflow_run_id"):  # a resumed run: its own checkpoint first, as in the loop's `restore`
        resume_from = latest_local_checkpoint(local_checkpoints) or resume_from
    else:
        with mlflow_run(cfg, state["name"], tags={"stage": stage}) as run:
            state["mlflow_run_id"] = run.info.run_id
    _write_json(storage.join(stage_dir, RUN_FILE), state)
    storage.write_text(storage.join(stage_dir, CONFIG_FILE), dump_config(cfg))  # what this stage ran with: later commands take it as is
    loop_config = {
        **loop_config,
        "cfg": cfg.to_dict(),
        "run_id": state["mlflow_run_id"],
        "model_path": storage.join(stage_dir, MODEL_FILE),
        "local_checkpoints": str(local_checkpoints) if local_checkpoints else None,
        "on_step": options.get("on_step"),
        "resume_from": resume_from,
        "stop_epoch": options.get("stop_epoch"),
    }
    with releasing(f"{stage} {state['name']}"):  # returned or raised: no placement group of this run left holding CPUs
        result = _trainer(cfg, loop, loop_config, state["name"], datasets, split, options.get("callbacks") or ()).fit()
    out = {
        "stage": stage,
        "run_name": state["name"],
        "mlflow_run_id": state["mlflow_run_id"],
        "model_path": storage.join(stage_dir, MODEL_FILE),
        "checkpoint_path": result.checkpoint.path if result.checkpoint else None,
        "metrics": dict(result.metrics or {}),
    }
    def log_result() -> str:
        with mlflow_run(cfg, state["name"], run_id=state["mlflow_run_id"]):
            log_json_artifact(out, f"{stage}_result.json")
            return log_model(out["model_path"], cfg)  # what `urbancross promote --run` registers

    # the model and checkpoints are saved: a tracking server that is away waits for a retry, and
    # if it stays away the error says so, and re-running the stage resumes and logs again
    out["model_uri"] = retry(log_result, f"{stage} {state['name']}: logging the trained model")
    _write_json(storage.join(stage_dir, "model.json"), model_meta)
    _write_json(storage.join(stage_dir, RESULT_FILE), out)
    return out


def run_train(cfg: Config, resume: bool = False, **options) -> dict:
    """Stage 1 -> {"model_path", "checkpoint_path", "metrics", "run_name", "mlflow_run_id", "stage"}.

    Options (for Tune and tests): `callbacks` (RunConfig callbacks, e.g. TuneReportCallback),
    `resume_from` (a checkpoint folder to start from when the run has none of its own, e.g.
    a PBT clone), `stop_epoch` (stop after this many epochs; the pacing still spans
    train.epochs), `on_step(rank=, epoch=, step=)` (called by every worker after each step:
    fault injection in tests).
    """
    unknown = set(options) - OPTIONS
    if unknown:
        raise TypeError(f"run_train: unknown options {sorted(unknown)}")
    cfg = absolute_paths(cfg)
    state = run_state(cfg, "train", resume)
    domain = {"": cfg.data.source_domain, "all": None}.get(cfg.train.domain, cfg.train.domain)
    table, val = validation_slice(cfg, read_split(cfg, cfg.data.train_split, domain), domain)
    check_disjoint(cfg, table, val)
    if cfg.model.pretrained:
        announce_weights(cfg.model, cfg.model.pretrained)  # once here; the workers load it quietly
    log.info("train: %d images (%s), validation %d", table.num_rows, domain or "all domains", 0 if val is None else val.num_rows)
    note_missing_labels(cfg, table, "train")
    train, train_dir = training_cache(cfg, table, "train")
    datasets = {"train": train, "val": validation_inputs(cfg, val)}
    loop_config = {"scores": difficulty_scores(cfg, table), "init_model": cfg.model.pretrained, "cache_dirs": {"train": train_dir}}
    meta = {"trained_on": domain or "all", "adapted_to": None}
    return _fit(cfg, "train", train_loop_per_worker, loop_config, datasets, [], state, options, meta)


def stage1_model(cfg: Config) -> str:
    """The weights adaptation starts from: adapt.checkpoint (file or folder), else stage 1's export."""
    path = cfg.adapt.checkpoint or storage.join(cfg.out_dir, "train")
    if not path.endswith(".pt"):
        path = storage.join(path, MODEL_FILE)
    if not storage.is_file(path):
        raise FileNotFoundError(f"adapt.checkpoint: {path} not found (run `urbancross train` first or set adapt.checkpoint)")
    return path


def run_adapt(cfg: Config, resume: bool = False, **options) -> dict:
    """Stage 2 (weighted adversarial fine-tuning) -> the same result dict and options as `run_train`."""
    unknown = set(options) - OPTIONS
    if unknown:
        raise TypeError(f"run_adapt: unknown options {sorted(unknown)}")
    cfg = absolute_paths(cfg)
    if cfg.adapt.mode == "alternating" and cfg.train.zero_stage == 3:
        raise ConfigError("adapt.mode=alternating needs full discriminator weights on each rank: use train.zero_stage <= 2")
    state = run_state(cfg, "adapt", resume)
    init_model = stage1_model(cfg)
    source = read_split(cfg, cfg.data.train_split, cfg.data.source_domain)
    target, val = validation_slice(cfg, read_split(cfg, cfg.data.train_split, cfg.data.target_domain), cfg.data.target_domain)
    check_disjoint(cfg, source, target, val)
    announce_weights(cfg.model, init_model)  # once here; the workers load it quietly
    log.info("adapt: source %d images (%s), target %d (%s)", source.num_rows, cfg.data.source_domain, target.num_rows, cfg.data.target_domain)
    note_missing_labels(cfg, source, "adapt")
    (source_ds, source_dir), (target_ds, target_dir) = training_cache(cfg, source, "adapt"), training_cache(cfg, target, "adapt")
    datasets = {"source": source_ds, "target": target_ds, "val": validation_inputs(cfg, val)}
    loop_config = {
        "init_model": init_model,
        "steps_per_epoch": math.ceil(source.num_rows / (cfg.train.batch_size * max(1, cfg.train.num_workers))),
        "cache_dirs": {"source": source_dir, "target": target_dir},
    }
    meta = {"trained_on": cfg.data.source_domain, "adapted_to": cfg.data.target_domain}
    return _fit(cfg, "adapt", adapt_loop_per_worker, loop_config, datasets, [], state, options, meta)
