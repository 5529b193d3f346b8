"""Ray Train `train_loop_per_worker` functions: stage 1 (train) and stage 2 (adapt).

Both run unchanged on N CPU or GPU workers and in-process (`ScalingConfig(num_workers=0)`).
Each builds the model, wraps it in one DeepSpeed engine, restores `ray.train.get_checkpoint()`
when there is one, trains on its stage's cached rows, and reports every epoch with
`ray.train.report` (every `train.checkpoint_every` epochs and at the end with the DeepSpeed
state every rank saved). Rank 0 logs to MLflow and exports the final weights as a plain
state dict (`save_model`).

Inputs are decoded once per run (`urbancross.train.cache`); every rank holds all rows and
deals itself its share of each step from one seeded permutation, so ranks always run the same
number of engine steps (collectives) without a per-step barrier.

Curriculum: each epoch trains on the easiest share of the samples, selected from the cache
before batching. With `similarity_margin` difficulty, a no-grad pass over the cache after
a rescoring epoch embeds every sample (each rank a share); embeddings are gathered
from all ranks and scored against each other, so every rank holds the same ranking. The
scores travel in the checkpoint, so a resumed run sees the same curriculum.

Loop config keys (built by `urbancross.train.trainer`): `cfg` (Config as dict, absolute
paths), `run_id` (MLflow run or None), `model_path` (where rank 0 exports the weights),
`init_model` (weights to start from), `local_checkpoints` (set only in-process: the folder that
keeps the run's checkpoints, as there is no Train storage to upload to), `scores` (cold-start
difficulty: {"keys", "values"}), `steps_per_epoch` (adapt: for the schedule's progress),
`resume_from` (checkpoint folder used when the run has none), `stop_epoch` (end early),
`cache_dirs` ({dataset name: disk cache folder or None (then the Train dataset of that name)}),
`on_step` (optional callable(rank=, epoch=, step=), a fault-injection hook for tests).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from urbancross.config import Config, LRScheduleConfig, config_from_dict
from urbancross.data.ingest import pick_caption
from urbancross.evaluate.metrics import real_captions, retrieval_metrics
from urbancross.model.factory import create_model, save_model
from urbancross.tracking import MetricLog
from urbancross.train.adversarial import AdaptObjective, AdaptSchedule
from urbancross.train.cache import Cache, epoch_batches, rank_rows, rng
from urbancross.train.checkpoint_io import load_weights_only
from urbancross.train.curriculum import Curriculum, keep_mask, margin_difficulty, update_scores
from urbancross.train.deepspeed_config import deepspeed_config, use_bf16
from urbancross.train.grad_sync import GradSync, shm_allreduce_env
from urbancross.train.lr_schedule import lr_factor
from urbancross.train.objective import RetrievalObjective, restore_scalars, vectorize_scalars
from urbancross.train.selection import Selection

log = logging.getLogger(__name__)

TAG = "ds"  # DeepSpeed checkpoint tag inside every reported checkpoint
CURRICULUM_FILE = "curriculum.npz"


# --------------------------------------------------------------------------- distributed helpers


class Worker:
    """This process's place in the run: rank, world, device, precision."""

    def __init__(self, cfg: Config, local_checkpoints: str | None):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.shm = shm_allreduce_env(self.world, ctx.get_local_world_size())
        self.local_rank = ctx.get_local_rank()
        self.name = ctx.get_experiment_name()
        self.local_checkpoints = local_checkpoints
        if cfg.train.use_gpu:
            import ray.train.torch

            self.device = ray.train.torch.get_device()
        else:
            self.device = torch.device("cpu")
        self.dtype = torch.bfloat16 if use_bf16(cfg.train) else torch.float32
        self.owns_group = _ensure_process_group(self)
        self.threads_before = torch.get_num_threads()
        self.threads = cfg.train.threads_per_worker
        torch.set_num_threads(self.threads)

    def all_min(self, value: int) -> int:
        if self.world == 1:
            return value
        t = torch.tensor([value], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def all_mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def gather(self, obj: Any) -> list:
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        torch.set_num_threads(self.threads_before)  # an in-process run shares the driver's process
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _ensure_process_group(w: Worker) -> bool:
    """DeepSpeed needs torch.distributed; Ray Train sets it up except in-process (world 1).

    In-process runs can follow one another in one Python process (tests, the demo), each
    with a fresh group, so DeepSpeed's cached groups are reset.
    """
    for key, value in (("RANK", w.rank), ("LOCAL_RANK", w.local_rank), ("WORLD_SIZE", w.world)):
        os.environ.setdefault(key, str(value))
    if dist.is_initialized():
        return False
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    from deepspeed.utils import groups  # its cached clone of a previous run's (destroyed) world group

    groups._WORLD_GROUP = None
    groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None
    return True


def _prepare(batch: dict, w: Worker, epoch: int, seed: int, one_caption: bool = True) -> dict:
    """Move to the device, cast floats to the engine's precision, pick this epoch's caption."""
    out = {}
    for k, v in batch.items():
        if not torch.is_tensor(v):
            continue
        v = v.to(w.device, non_blocking=True)
        out[k] = v.to(w.dtype) if v.is_floating_point() else v
    if one_caption:
        out["tokens"] = pick_caption(out["tokens"], out["key"], epoch, seed)
    return out


def _seed_torch(seed: int, epoch: int, rank: int) -> None:
    """Dropout and any other torch draw of an epoch: from (seed, epoch, rank), so a resumed or
    repeated run draws the same, and ranks draw differently."""
    torch.manual_seed(int(rng(seed, epoch, rank).integers(2**62)))


def load_cache(name: str, config: dict) -> Cache:
    """This stage's decoded rows `name`: a disk cache folder, else the materialized dataset."""
    import ray.train

    folder = (config.get("cache_dirs") or {}).get(name)
    return Cache.from_folder(folder) if folder else Cache.from_shard(ray.train.get_dataset_shard(name))


def _start(w: Worker, cfg: Config, stage: str, caches: dict[str, Cache], sync: GradSync) -> None:
    if w.rank == 0:
        sizes = ", ".join(f"{k} {len(c)} rows" for k, c in caches.items())
        log.info("%s: %d worker(s) x %d torch thread(s) (train.threads_per_worker), gradient all-reduce %s; cached %s",
                 stage, w.world, w.threads, sync.describe(), sizes)


# --------------------------------------------------------------------------- engine + checkpoints


def param_groups(module: nn.Module, lr: float, weight_decay: float, disc_lr: float | None = None) -> list[dict]:
    """AdamW groups: no decay on biases/norms/scales; the discriminator (`disc.`) at `disc_lr`
    (marked `disc`: it keeps its lr, the model's groups follow the stage's lr schedule)."""
    groups: dict[tuple[str, bool], list] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        part = "disc" if name.startswith("disc.") and disc_lr is not None else "model"
        groups.setdefault((part, p.ndim >= 2), []).append(p)
    out = []
    for (part, decay), params in sorted(groups.items()):
        group = {"params": params, "lr": disc_lr if part == "disc" else lr, "weight_decay": weight_decay if decay else 0.0}
        out.append({**group, "disc": part == "disc"})
    return out


def adamw(groups: list[dict]) -> torch.optim.AdamW:
    """The stages' optimizer. `foreach` on every device: torch's default for CPU tensors is a
    Python loop over the tensors, bit-identical and about twice as slow at the optimizer step."""
    return torch.optim.AdamW(groups, foreach=True)


def build_engine(module: nn.Module, groups: list[dict], cfg: Config, w: Worker, schedule: LRScheduleConfig, total_steps: int):
    """One DeepSpeed engine; its lr scheduler (stepped by DeepSpeed at each optimizer step, saved
    in its checkpoints) applies `lr_factor` to the model's groups over `total_steps`."""
    import deepspeed

    optimizer = adamw(groups)
    curve = functools.partial(_lr_curve, total=total_steps, cfg=schedule)
    lambdas = [_constant if g.get("disc") else curve for g in groups]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
    engine, *_ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg.train, w.world)
    )
    load_weights_only(engine)  # resume reads checkpoints as data (DeepSpeed's own load unpickles code)
    return engine


def _lr_curve(step: int, total: int, cfg: LRScheduleConfig) -> float:
    return lr_factor(step, total, cfg)


def _constant(step: int) -> float:
    return 1.0


def train_steps(curriculum: Curriculum, rows: int, cfg: Config, world: int) -> int:
    """Optimizer steps stage 1 takes over train.epochs: each epoch's curriculum share of the
    `rows` samples in global batches (the schedule's length; an estimate, as ranks stop together
    when one runs out)."""
    batch = cfg.train.batch_size * max(1, world)
    micro = sum(math.ceil(max(1, math.ceil(curriculum.fraction(e) * rows - 1e-9)) / batch) for e in range(cfg.train.epochs))
    return max(1, micro // cfg.train.grad_accum)


def restore(engine, resume_from: str | None = None) -> tuple[dict, dict | None]:
    """(client state, curriculum state) of the run's latest checkpoint, else of `resume_from`
    (a checkpoint folder of another run, e.g. a PBT clone), else ({}, None)."""
    import ray.train
    from ray.train import Checkpoint

    ckpt = ray.train.get_checkpoint() or (Checkpoint.from_directory(resume_from) if resume_from else None)
    if ckpt is None:
        return {}, None
    with ckpt.as_directory() as d:
        path, client = engine.load_checkpoint(d, tag=TAG)
        if path is None:
            raise RuntimeError(f"checkpoint {d} has no DeepSpeed state under tag {TAG!r}")
        cur = None
        if os.path.exists(os.path.join(d, CURRICULUM_FILE)):
            with np.load(os.path.join(d, CURRICULUM_FILE)) as z:
                cur = {k: z[k] for k in z.files}
    log.info("resumed from %s at epoch %s, step %s", ckpt.path, client.get("epoch"), engine.global_steps)
    return dict(client or {}), cur


def _save(engine, folder: str, w: Worker, client: dict, curriculum: dict | None) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    engine.save_checkpoint(folder, tag=TAG, client_state=client)
    if curriculum is not None and w.rank == 0:
        np.savez(os.path.join(folder, CURRICULUM_FILE), **curriculum)


def staging_dir(rank: int) -> str:
    """A new, empty folder for one rank's checkpoint shard before Ray uploads it.

    Unique per call: Tune trials on one node run Train runs with the same name (`train`), and
    a fixed `<name>/rank<r>` folder let one trial's save overwrite or delete another's.
    """
    root = os.path.join(tempfile.gettempdir(), "urbancross-ckpt")
    os.makedirs(root, exist_ok=True)
    return tempfile.mkdtemp(prefix=f"rank{rank}-", dir=root)


def save_and_report(engine, w: Worker, metrics: dict, client: dict, curriculum: dict | None = None, checkpoint: bool = True) -> None:
    """Report the epoch; with `checkpoint`, every rank first saves its DeepSpeed shard.

    Ray Train workers stage in the temp dir (one folder per epoch) and Train uploads it in the
    background (ASYNC), then deletes it. An in-process run has nothing to upload to: its
    `local_checkpoints/epoch_N` folder is the only copy, so it is written under a hidden name
    and renamed when complete, and the older epochs go only after that.
    """
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    if not checkpoint:
        ray.train.report(metrics)
        return
    name = f"epoch_{int(metrics['epoch']):06d}"
    if w.local_checkpoints is None:
        staging = staging_dir(w.rank)
        try:
            _save(engine, staging, w, client, curriculum)
            ray.train.report(
                metrics, checkpoint=Checkpoint.from_directory(staging), checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
                delete_local_checkpoint_after_upload=True,
            )
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # e.g. disk full: no half checkpoint left in /tmp
            raise
        return
    partial, final = (os.path.join(w.local_checkpoints, n) for n in (f".{name}.partial", name))
    try:
        _save(engine, partial, w, client, curriculum)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # the previous epoch's checkpoint stays the latest
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(final), delete_local_checkpoint_after_upload=False)
    for old in os.listdir(w.local_checkpoints):
        if old != name:
            shutil.rmtree(os.path.join(w.local_checkpoints, old), ignore_errors=True)


def due(every: int, epoch: int, last: int) -> bool:
    """Whether 0-based `epoch` ends a period of `every` epochs or is the fit's `last` (1-based count)."""
    return (epoch + 1) % every == 0 or epoch + 1 >= last


def export_model(engine, model: nn.Module, scalars: list[str], path: str, w: Worker) -> None:
    """Rank 0 writes the plain fp32 state dict of a fresh-model layout (ZeRO-3: gathered first)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        if w.rank == 0:
            plain = restore_scalars(copy.deepcopy(model), scalars).float()
            save_model(plain, path)
    if w.world > 1:
        dist.barrier()


# --------------------------------------------------------------------------- validation + tracking


@torch.no_grad()
def validate(engine, shard, cfg: Config, w: Worker) -> dict[str, float]:
    """Retrieval metrics (mR, R@k) on the validation slice, the same dict on every rank.

    Scored as test evaluation scores: each image's real captions only (`real_captions`).
    Rank 0 computes them on its full copy of the weights (ZeRO 0-2) and shares the result;
    under ZeRO-3 every rank runs the forward passes, which gather the sharded parameters.
    """
    if shard is None:
        return {}
    sharded = cfg.train.zero_stage == 3
    metrics: dict[str, float] = {}
    if sharded or w.rank == 0:
        net = engine if sharded else engine.module
        net.eval()
        images, texts, counts = [], [], []
        for batch in shard.iter_torch_batches(batch_size=cfg.evaluate.batch_size):
            b = _prepare(batch, w, 0, cfg.seed, one_caption=False)
            img, txt = net(b, embed=True)
            images.append(img.float().cpu())
            texts.append(txt.float().cpu().reshape(*b["tokens"].shape[:2], -1))
            counts.append(b["num_captions"].cpu())
        net.train()
        if images:
            text, image_of_text = real_captions(torch.cat(texts), torch.cat(counts))
            found = retrieval_metrics(torch.cat(images) @ text.T, image_of_text, ks=tuple(cfg.evaluate.ks))
            metrics = {f"val_{k}": float(v) for k, v in found.items()}
    if w.world > 1 and not sharded:
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics


@contextlib.contextmanager
def tracking(cfg: Config, run_id: str | None, w: Worker):
    """Rank 0 logs into the MLflow run the driver created (a `MetricLog`: an outage never ends
    training; the driver closes the run); other ranks log nothing."""
    if w.rank != 0 or not run_id:
        yield lambda metrics, step: None
        return
    metric_log = MetricLog(cfg.tracking_uri(), run_id)
    try:
        yield metric_log
    finally:
        metric_log.close()


def end_epoch(
    engine, w: Worker, cfg: Config, stage: str, epoch: int, epochs: int, values: dict, *, val, log_metrics,
    started: float, start: tuple[int, int], client: dict, curriculum: dict | None = None, last: int | None = None,
    selection: Selection, export: Callable[[], None], counts: bool = True,
) -> dict:
    """An epoch's tail, the same for both stages: metrics (+ validation), model choice, MLflow,
    checkpoint, log line.

    `values`: the stage's own metrics; `started`: the epoch's `perf_counter()` start;
    `start`: (epoch, step) this fit started from; `last`: the epoch this fit ends at (default
    `epochs`). Validation runs every `train.val_every` and checkpoints are written every
    `train.checkpoint_every` epochs, and both at `last` (and a checkpoint when early stopping ends
    the fit). `export()` writes the model, called when val mR is a new best (`selection`;
    `counts`: whether this epoch counts toward its patience). Returns the metrics reported to Ray Train.
    """
    last = epochs if last is None else last
    epoch_seconds = time.perf_counter() - started
    t0 = time.perf_counter()
    found = validate(engine, val, cfg, w) if due(cfg.train.val_every, epoch, last) else {}
    metrics = {
        "epoch": epoch + 1,
        "step": int(engine.global_steps),
        **values,
        "epoch_seconds": epoch_seconds,
        "validation_seconds": time.perf_counter() - t0,
        "start_epoch": start[0],
        "start_step": start[1],
        **found,
    }
    if "val_mR" in metrics:  # every rank takes the same decision: the mean is all-reduced
        if selection.update(epoch + 1, w.all_mean(metrics["val_mR"]), counts):
            export()
        metrics.update(selection.metrics())
        client = {**client, **selection.state()}
    t0 = time.perf_counter()
    checkpoint = due(cfg.train.checkpoint_every, epoch, last) or selection.stopped
    save_and_report(engine, w, metrics, client, curriculum, checkpoint=checkpoint)  # first: a tracking outage must not cost the epoch
    metrics["report_seconds"] = time.perf_counter() - t0  # checkpoint + report: known only after reporting
    log_metrics({k: v for k, v in metrics.items() if k not in ("epoch", "start_epoch", "start_step")}, epoch + 1)
    if w.rank == 0:
        log.info("%s epoch %d/%d: %s", stage, epoch + 1, epochs, _fmt(metrics))
    return metrics


# --------------------------------------------------------------------------- stage 1


@torch.no_grad()
def rescore(engine, cache: Cache, cfg: Config, w: Worker, epoch: int, scores: dict[int, float]) -> dict[int, float]:
    """Similarity-margin difficulty of every training sample under the current model.

    Each rank embeds an equal share of the cached rows (not augmented), so under ZeRO-3 every
    rank runs the same number of forward passes; the shares are gathered and scored together.
    """
    engine.eval()
    mine, real = rank_rows(np.arange(len(cache)), w.world, w.rank)
    images, texts = [], []
    for part in np.array_split(mine, max(1, math.ceil(len(mine) / cfg.evaluate.batch_size))) if len(mine) else []:
        b = _prepare(cache.batch(part, epoch, cfg.seed, cfg, w.device, train=False), w, epoch, cfg.seed)
        img, txt = engine(b, embed=True)
        images.append(img.float().cpu())
        texts.append(txt.float().cpu())
    engine.train()
    local = (cache.keys[mine[:real]], torch.cat(images)[:real], torch.cat(texts)[:real]) if real else None
    parts = [p for p in w.gather(local) if p is not None]
    if not parts:
        return scores
    k = np.concatenate([p[0] for p in parts])
    difficulty = margin_difficulty(torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]))
    return update_scores(scores, k, difficulty)


class StepClock:
    """Per-step wall time by phase (data, forward, backward, step), and a progress line on rank 0
    every `train.progress_seconds` (one line, not a redrawn bar: logs stay small).

    CPU times are exact; on GPU, kernels run asynchronously, so the phases blur (the sum holds).
    """

    PHASES = ("data", "forward", "backward", "step")

    def __init__(self, w: Worker, cfg: Config, stage: str, epoch: int, epochs: int, rows: int):
        self.w, self.stage, self.epoch, self.epochs, self.rows = w, stage, epoch, epochs, rows
        self.every = cfg.train.progress_seconds
        self.sums = dict.fromkeys(self.PHASES, 0.0)
        self.steps = self.done = 0
        self.start = self.said = self.t = time.perf_counter()

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.sums[phase] += now - self.t
        self.t = now

    def stepped(self, rows: int) -> None:
        self.mark("step")
        self.steps += 1
        self.done += rows * self.w.world
        if self.w.rank == 0 and self.t - self.said >= self.every:
            rate = self.done / max(self.t - self.start, 1e-9)
            eta = (self.rows - self.done) / max(rate, 1e-9)
            done = min(self.done, self.rows)
            log.info("%s epoch %d/%d: %d/%d rows, %.1f rows/s, epoch ETA %.0fs", self.stage, self.epoch + 1, self.epochs, done, self.rows, rate, eta)
            self.said = self.t

    def metrics(self) -> dict[str, float]:
        """Mean ms per step of each phase, and the steps this rank ran."""
        return {"steps": self.steps, **{f"ms_{k}": 1000 * v / max(self.steps, 1) for k, v in self.sums.items()}}


def used_rows(rows: int, batch_size: int, world: int) -> int:
    """Rows an epoch of `epoch_batches` trains on over all ranks (a tail shorter than the world is left out)."""
    tail = rows % (batch_size * world)
    return rows - tail if 0 < tail < world else rows


def train_loop_per_worker(config: dict) -> dict:
    """Stage 1: retrieval training with adaptive curriculum sampling."""
    began = time.perf_counter()
    cfg = config_from_dict(config["cfg"], where="<train loop>")
    w = Worker(cfg, config.get("local_checkpoints"))
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, pretrained=config.get("init_model") or None)
    scalars = vectorize_scalars(model)
    module = RetrievalObjective(model, cfg.loss)
    cold = config.get("scores") or {"keys": [], "values": []}  # one score per training sample
    steps = train_steps(Curriculum(cfg.train.curriculum, cfg.train.epochs, {}), len(cold["keys"]), cfg, w.world)
    groups = param_groups(module, cfg.train.lr, cfg.train.weight_decay)
    engine = build_engine(module, groups, cfg, w, cfg.train.lr_schedule, steps)
    sync = GradSync(engine, w.world, w.shm)
    startup = {"startup_engine_seconds": time.perf_counter() - began}
    client, cur_state = restore(engine, config.get("resume_from"))
    scores = Curriculum.scores_from_state(cur_state if cur_state is not None else cold)
    curriculum = Curriculum(cfg.train.curriculum, cfg.train.epochs, scores)
    start_epoch, start_step = int(client.get("epoch", 0)), int(engine.global_steps)
    samples = int(client.get("samples", 0))
    t0 = time.perf_counter()
    cache = load_cache("train", config)
    startup["startup_cache_seconds"] = time.perf_counter() - t0
    _start(w, cfg, "train", {"train": cache}, sync)
    val = _optional_shard("val")
    selection = Selection.from_state(client, cfg.train.patience)
    export = lambda: export_model(engine, model, scalars, config["model_path"], w)  # noqa: E731
    on_step = config.get("on_step")
    last = _last_epoch(cfg.train.epochs, config)
    metrics: dict[str, float] = {}
    with tracking(cfg, config.get("run_id"), w) as log_metrics:
        for epoch in range(start_epoch, last):
            if selection.stopped:
                break
            t0 = time.perf_counter()
            _seed_torch(cfg.seed, epoch, w.rank)
            rows = np.flatnonzero(keep_mask(cache.keys, curriculum.allowed(epoch)))  # the curriculum selects from the cache
            used = used_rows(len(rows), cfg.train.batch_size, w.world)
            clock = StepClock(w, cfg, "train", epoch, cfg.train.epochs, used)
            losses = []
            for idx in epoch_batches(rows, cfg.train.batch_size, w.world, w.rank, cfg.seed, epoch):
                b = _prepare(cache.batch(idx, epoch, cfg.seed, cfg, w.device, train=True), w, epoch, cfg.seed)
                clock.mark("data")
                loss, _ = engine(b)
                clock.mark("forward")
                engine.backward(loss)
                clock.mark("backward")
                sync()
                engine.step()
                losses.append(float(loss.detach()))
                clock.stepped(len(idx))
                if on_step is not None:
                    on_step(rank=w.rank, epoch=epoch, step=int(engine.global_steps))
            samples += used
            if curriculum.rescore_due(epoch):
                curriculum.scores = rescore(engine, cache, cfg, w, epoch, curriculum.scores)
            values = {
                "samples": samples,
                "loss": w.all_mean(float(np.mean(losses)) if losses else 0.0),
                "curriculum_fraction": curriculum.fraction(epoch),
                **clock.metrics(),
                **startup,
            }
            metrics = end_epoch(
                engine, w, cfg, "train", epoch, cfg.train.epochs, values, val=val, log_metrics=log_metrics, started=t0,
                start=(start_epoch, start_step), client={"epoch": epoch + 1, "samples": samples}, curriculum=curriculum.state(),
                last=last, selection=selection, export=export, counts=curriculum.fraction(epoch) >= 1.0,
            )
    _final_export(selection, export, config["model_path"], w)
    w.close()
    return metrics


def _final_export(selection: Selection, export: Callable[[], None], path: str, w: Worker) -> None:
    """Without validation the last epoch is the model; with it, the best val epoch, already
    written (again now if rank 0 lacks the file, e.g. a PBT clone that started from another
    trial's checkpoint). Every rank takes rank 0's view: exporting is collective."""
    written = w.all_min(1 if w.rank != 0 or os.path.exists(path) else 0)
    if selection.best_epoch == 0 or not written:
        export()


def _last_epoch(epochs: int, config: dict) -> int:
    """Where this fit stops: `stop_epoch` (a Tune segment) or the configured epochs."""
    stop = config.get("stop_epoch")
    return min(epochs, int(stop)) if stop else epochs


def _optional_shard(name: str):
    import ray.train

    try:
        return ray.train.get_dataset_shard(name)
    except (KeyError, AssertionError):
        return None


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


# --------------------------------------------------------------------------- stage 2


def _target_batches(cache: Cache, cfg: Config, w: Worker, epoch: int) -> Iterator[np.ndarray]:
    """Endless target batches for an epoch: seeded passes over the target rows, one after another."""
    for n in itertools.count():
        batches = epoch_batches(np.arange(len(cache)), cfg.train.batch_size, w.world, w.rank, cfg.seed, epoch, 1, n)
        if not batches:
            raise RuntimeError(f"the target domain has {len(cache)} rows, fewer than the {w.world} workers")
        yield from batches


def adapt_loop_per_worker(config: dict) -> dict:
    """Stage 2: weighted adversarial fine-tuning, source batch + target batch per step."""
    cfg = config_from_dict(config["cfg"], where="<adapt loop>")
    a = cfg.adapt
    w = Worker(cfg, config.get("local_checkpoints"))
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, pretrained=config.get("init_model") or None)
    scalars = vectorize_scalars(model)
    module = AdaptObjective(model, cfg.loss, a)
    groups = param_groups(module, a.lr, cfg.train.weight_decay, disc_lr=a.disc_lr)
    steps = max(1, int(config.get("steps_per_epoch") or 1) * a.epochs // cfg.train.grad_accum)
    engine = build_engine(module, groups, cfg, w, a.lr_schedule, steps)
    sync = GradSync(engine, w.world, w.shm)
    client, _ = restore(engine, config.get("resume_from"))
    start_epoch, start_step = int(client.get("epoch", 0)), int(engine.global_steps)
    source, target = load_cache("source", config), load_cache("target", config)
    _start(w, cfg, "adapt", {"source": source, "target": target}, sync)
    val = _optional_shard("val")
    selection = Selection.from_state(client, cfg.train.patience)
    export = lambda: export_model(engine, model, scalars, config["model_path"], w)  # noqa: E731
    schedule = AdaptSchedule(a, int(config.get("steps_per_epoch") or 1))
    on_step = config.get("on_step")
    last = _last_epoch(a.epochs, config)
    metrics: dict[str, float] = {}
    with tracking(cfg, config.get("run_id"), w) as log_metrics:
        for epoch in range(start_epoch, last):
            if selection.stopped:
                break
            t0 = time.perf_counter()
            _seed_torch(cfg.seed, epoch, w.rank)
            share = schedule.share(epoch)
            targets = _target_batches(target, cfg, w, epoch)
            rows = np.arange(len(source))
            clock = StepClock(w, cfg, "adapt", epoch, a.epochs, used_rows(len(rows), cfg.train.batch_size, w.world))
            sums: dict[str, float] = {}
            n = 0
            for i, idx in enumerate(epoch_batches(rows, cfg.train.batch_size, w.world, w.rank, cfg.seed, epoch, 0)):
                weight = schedule.weight(epoch, i)
                src = _prepare(source.batch(idx, epoch, cfg.seed, cfg, w.device, train=True), w, epoch, cfg.seed)
                tgt = _prepare(target.batch(next(targets), epoch, cfg.seed, cfg, w.device, train=True), w, epoch, cfg.seed)
                clock.mark("data")
                loss, logs = engine(src, tgt, weight, share, schedule.phase(engine.global_steps))
                clock.mark("forward")
                engine.backward(loss)
                clock.mark("backward")
                sync()
                engine.step()
                for k, v in {"loss": loss.detach(), "adv_weight": weight, **logs}.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                n += 1
                clock.stepped(len(idx))
                if on_step is not None:
                    on_step(rank=w.rank, epoch=epoch, step=int(engine.global_steps))
            values = {**{k: w.all_mean(v / max(n, 1)) for k, v in sums.items()}, "kept_share": share, **clock.metrics()}
            metrics = end_epoch(
                engine, w, cfg, "adapt", epoch, a.epochs, values, val=val, log_metrics=log_metrics, started=t0,
                start=(start_epoch, start_step), client={"epoch": epoch + 1}, last=last, selection=selection,
                export=export,
            )
    _final_export(selection, export, config["model_path"], w)
    w.close()
    return metrics
