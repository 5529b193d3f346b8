"""Ray Train `train_loop_per_worker` functions: stage 1 (train) and stage 2 (adapt).

Both run unchanged on N CPU or GPU workers and in-process (`ScalingConfig(num_workers=0)`).
Each builds the model, wraps it in one DeepSpeed engine, restores `ray.train.get_checkpoint()`
when there is one, iterates its Ray Data shard (decoding happened in Ray Data), and per epoch
saves the DeepSpeed state on every rank and reports it with `ray.train.report`. Rank 0 logs
to MLflow and exports the final weights as a plain state dict (`save_model`).

Ranks must run the same number of engine steps (collectives), but curriculum filtering
leaves them different numbers of rows: `_synced` makes every step conditional on all ranks
having a batch, and ranks that run out early just drain their iterators.

Curriculum: each epoch trains on the easiest share of the samples (rows outside it are
dropped from the batches, then regrouped). With `similarity_margin` difficulty, a no-grad
pass over the shard after a rescoring epoch embeds every sample; embeddings are gathered
from all ranks and scored against each other, so every rank holds the same ranking. The
scores travel in the checkpoint, so a resumed run sees the same curriculum.

Loop config keys (built by `urbancross.train.trainer`): `cfg` (Config as dict, absolute
paths), `run_id` (MLflow run or None), `model_path` (where rank 0 exports the weights),
`init_model` (weights to start from), `local_checkpoints` (set only in-process: the folder that
keeps the run's checkpoints, as there is no Train storage to upload to), `scores` (cold-start
difficulty: {"keys", "values"}), `steps_per_epoch` (adapt: for the schedule's progress),
`resume_from` (checkpoint folder used when the run has none), `stop_epoch` (end early),
`on_step` (optional callable(rank=, epoch=, step=), a fault-injection hook for tests).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import os
import shutil
import socket
import tempfile
import time
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from urbancross.config import Config, config_from_dict
from urbancross.data.ingest import pick_caption
from urbancross.evaluate.metrics import retrieval_metrics
from urbancross.model.factory import create_model, save_model
from urbancross.tracking import log_metrics, mlflow_run
from urbancross.train.adversarial import AdaptObjective, AdaptSchedule
from urbancross.train.curriculum import Curriculum, keep_mask, margin_difficulty, update_scores
from urbancross.train.deepspeed_config import deepspeed_config, use_bf16
from urbancross.train.objective import RetrievalObjective, restore_scalars, vectorize_scalars

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


def _synced(w: Worker, batches: Iterable[dict]) -> Iterator[dict]:
    """Yield batches while every rank has one; then drain the rest without yielding."""
    it = iter(batches)
    for batch in it:
        if not w.all_min(1):
            for _ in it:
                pass
            return
        yield batch
    w.all_min(0)


def _rebatch(batches: Iterable[dict], keep: Callable[[torch.Tensor], np.ndarray], size: int) -> Iterator[dict]:
    """Keep the rows `keep(keys)` selects and regroup them into batches of `size` (last may be short)."""
    buffer: list[dict] = []
    held = 0
    for batch in batches:
        mask = torch.as_tensor(keep(batch["key"].cpu().numpy()))
        if not mask.any():
            continue
        rows = {k: v[mask] for k, v in batch.items()}
        buffer.append(rows)
        held += int(mask.sum())
        while held >= size:
            merged = {k: torch.cat([b[k] for b in buffer]) for k in buffer[0]}
            yield {k: v[:size] for k, v in merged.items()}
            rest = {k: v[size:] for k, v in merged.items()}
            held -= size
            buffer = [rest] if held else []
    if held:
        yield {k: torch.cat([b[k] for b in buffer]) for k in buffer[0]}


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


def _iter(shard, cfg: Config, epoch: int, rank: int, shuffle: bool = True):
    kwargs: dict[str, Any] = {"batch_size": cfg.train.batch_size}
    if shuffle:
        kwargs.update(local_shuffle_buffer_size=4 * cfg.train.batch_size, local_shuffle_seed=cfg.seed + 1000 * epoch + rank)
    return shard.iter_torch_batches(**kwargs)


# --------------------------------------------------------------------------- engine + checkpoints


def param_groups(module: nn.Module, lr: float, weight_decay: float, disc_lr: float | None = None) -> list[dict]:
    """AdamW groups: no decay on biases/norms/scales; the discriminator (`disc.`) at `disc_lr`."""
    groups: dict[tuple[str, bool], list] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        part = "disc" if name.startswith("disc.") and disc_lr is not None else "model"
        groups.setdefault((part, p.ndim >= 2), []).append(p)
    out = []
    for (part, decay), params in sorted(groups.items()):
        out.append({"params": params, "lr": disc_lr if part == "disc" else lr, "weight_decay": weight_decay if decay else 0.0})
    return out


def build_engine(module: nn.Module, groups: list[dict], cfg: Config, w: Worker):
    import deepspeed

    optimizer = torch.optim.AdamW(groups)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=deepspeed_config(cfg.train, w.world))
    return engine


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


def save_and_report(engine, w: Worker, metrics: dict, client: dict, curriculum: dict | None = None) -> None:
    """Every rank saves its DeepSpeed shard into one staging dir and reports it.

    Ray Train workers stage in the temp dir and Train uploads (then deletes) the folder. An
    in-process run has nothing to upload to: its `local_checkpoints/epoch_N` folder is the
    only copy, so it is written under a hidden name and renamed when complete, and the older
    epochs go only after that.
    """
    import ray.train
    from ray.train import Checkpoint

    if w.local_checkpoints is None:
        staging = os.path.join(tempfile.gettempdir(), "urbancross-ckpt", w.name, f"rank{w.rank}")
        _save(engine, staging, w, client, curriculum)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(staging), delete_local_checkpoint_after_upload=True)
        return
    name = f"epoch_{int(metrics['epoch']):06d}"
    partial, final = (os.path.join(w.local_checkpoints, n) for n in (f".{name}.partial", name))
    _save(engine, partial, w, client, curriculum)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(final), delete_local_checkpoint_after_upload=False)
    for old in os.listdir(w.local_checkpoints):
        if old != name:
            shutil.rmtree(os.path.join(w.local_checkpoints, old), ignore_errors=True)


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
    """Retrieval metrics (mR, R@k) on the validation slice; every rank runs it (ZeRO-3 safe)."""
    if shard is None:
        return {}
    engine.eval()
    images, texts = [], []
    for batch in shard.iter_torch_batches(batch_size=cfg.evaluate.batch_size):
        img, txt = engine(_prepare(batch, w, 0, cfg.seed, one_caption=False), embed=True)
        images.append(img.float().cpu())
        texts.append(txt.float().cpu())
    engine.train()
    if not images:
        return {}
    image, text = torch.cat(images), torch.cat(texts)
    per_image = text.shape[0] // image.shape[0]
    image_of_text = torch.arange(image.shape[0]).repeat_interleave(per_image)
    metrics = retrieval_metrics(image @ text.T, image_of_text, ks=tuple(cfg.evaluate.ks))
    return {f"val_{k}": float(v) for k, v in metrics.items()}


@contextlib.contextmanager
def tracking(cfg: Config, run_id: str | None, w: Worker):
    """Rank 0 resumes the MLflow run the driver created; other ranks log nothing."""
    if w.rank != 0 or not run_id:
        yield lambda metrics, step: None
        return
    with mlflow_run(cfg, "", run_id=run_id):
        yield log_metrics


def end_epoch(
    engine, w: Worker, cfg: Config, stage: str, epoch: int, epochs: int, values: dict, *, val, log_metrics,
    started: float, start: tuple[int, int], client: dict, curriculum: dict | None = None,
) -> dict:
    """An epoch's tail, the same for both stages: metrics (+ validation), MLflow, checkpoint, log line.

    `values`: the stage's own metrics; `started`: the epoch's `perf_counter()` start;
    `start`: (epoch, step) this fit started from. Returns the metrics reported to Ray Train.
    """
    metrics = {
        "epoch": epoch + 1,
        "step": int(engine.global_steps),
        **values,
        "epoch_seconds": time.perf_counter() - started,
        "start_epoch": start[0],
        "start_step": start[1],
        **validate(engine, val, cfg, w),
    }
    log_metrics({k: v for k, v in metrics.items() if k not in ("epoch", "start_epoch", "start_step")}, epoch + 1)
    save_and_report(engine, w, metrics, client, curriculum)
    if w.rank == 0:
        log.info("%s epoch %d/%d: %s", stage, epoch + 1, epochs, _fmt(metrics))
    return metrics


# --------------------------------------------------------------------------- stage 1


@torch.no_grad()
def rescore(engine, shard, cfg: Config, w: Worker, epoch: int, scores: dict[int, float]) -> dict[int, float]:
    """Similarity-margin difficulty of every training sample under the current model."""
    engine.eval()
    keys, images, texts = [], [], []
    for batch in _synced(w, _iter(shard, cfg, epoch, w.rank, shuffle=False)):
        b = _prepare(batch, w, epoch, cfg.seed)
        img, txt = engine(b, embed=True)
        keys.append(b["key"].cpu().numpy())
        images.append(img.float().cpu())
        texts.append(txt.float().cpu())
    engine.train()
    local = (np.concatenate(keys), torch.cat(images), torch.cat(texts)) if keys else None
    parts = [p for p in w.gather(local) if p is not None]
    if not parts:
        return scores
    k = np.concatenate([p[0] for p in parts])
    difficulty = margin_difficulty(torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]))
    return update_scores(scores, k, difficulty)


def train_loop_per_worker(config: dict) -> dict:
    """Stage 1: retrieval training with adaptive curriculum sampling."""
    import ray.train

    cfg = config_from_dict(config["cfg"], where="<train loop>")
    w = Worker(cfg, config.get("local_checkpoints"))
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, pretrained=config.get("init_model") or None)
    scalars = vectorize_scalars(model)
    module = RetrievalObjective(model, cfg.loss)
    engine = build_engine(module, param_groups(module, cfg.train.lr, cfg.train.weight_decay), cfg, w)
    client, cur_state = restore(engine, config.get("resume_from"))
    scores = Curriculum.scores_from_state(cur_state if cur_state is not None else config.get("scores") or {"keys": [], "values": []})
    curriculum = Curriculum(cfg.train.curriculum, cfg.train.epochs, scores)
    start_epoch, start_step = int(client.get("epoch", 0)), int(engine.global_steps)
    samples = int(client.get("samples", 0))
    shard = ray.train.get_dataset_shard("train")
    val = _optional_shard("val")
    on_step = config.get("on_step")
    metrics: dict[str, float] = {}
    with tracking(cfg, config.get("run_id"), w) as log_metrics:
        for epoch in range(start_epoch, _last_epoch(cfg.train.epochs, config)):
            t0 = time.perf_counter()
            allowed = curriculum.allowed(epoch)
            losses, rows = [], 0
            batches = _rebatch(_iter(shard, cfg, epoch, w.rank), lambda keys: keep_mask(keys, allowed), cfg.train.batch_size)
            for batch in _synced(w, batches):
                b = _prepare(batch, w, epoch, cfg.seed)
                loss, _ = engine(b)
                engine.backward(loss)
                engine.step()
                losses.append(float(loss.detach()))
                rows += b["images"].shape[0]
                if on_step is not None:
                    on_step(rank=w.rank, epoch=epoch, step=int(engine.global_steps))
            samples += int(w.all_mean(rows) * w.world)
            if curriculum.rescore_due(epoch):
                curriculum.scores = rescore(engine, shard, cfg, w, epoch, curriculum.scores)
            values = {
                "samples": samples,
                "loss": w.all_mean(float(np.mean(losses)) if losses else 0.0),
                "curriculum_fraction": curriculum.fraction(epoch),
            }
            metrics = end_epoch(
                engine, w, cfg, "train", epoch, cfg.train.epochs, values, val=val, log_metrics=log_metrics, started=t0,
                start=(start_epoch, start_step), client={"epoch": epoch + 1, "samples": samples}, curriculum=curriculum.state(),
            )
    export_model(engine, model, scalars, config["model_path"], w)
    w.close()
    return metrics


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


def _cycle(make: Callable[[], Iterable[dict]]) -> Iterator[dict]:
    """Endless batches: re-iterate this rank's target shard whenever it runs out.

    The target is split like the source (equal shards), so every rank starts a new pass at
    the same step; a per-rank full copy would be re-executed beside the source split every
    epoch.
    """
    for _ in itertools.count():
        empty = True
        for batch in make():
            empty = False
            yield batch
        if empty:
            raise RuntimeError("the target domain dataset is empty")


def adapt_loop_per_worker(config: dict) -> dict:
    """Stage 2: weighted adversarial fine-tuning, source batch + target batch per step."""
    import ray.train

    cfg = config_from_dict(config["cfg"], where="<adapt loop>")
    a = cfg.adapt
    w = Worker(cfg, config.get("local_checkpoints"))
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, pretrained=config.get("init_model") or None)
    scalars = vectorize_scalars(model)
    module = AdaptObjective(model, cfg.loss, a)
    groups = param_groups(module, a.lr, cfg.train.weight_decay, disc_lr=a.disc_lr)
    engine = build_engine(module, groups, cfg, w)
    client, _ = restore(engine, config.get("resume_from"))
    start_epoch, start_step = int(client.get("epoch", 0)), int(engine.global_steps)
    source, target = ray.train.get_dataset_shard("source"), ray.train.get_dataset_shard("target")
    val = _optional_shard("val")
    schedule = AdaptSchedule(a, int(config.get("steps_per_epoch") or 1))
    on_step = config.get("on_step")
    metrics: dict[str, float] = {}
    with tracking(cfg, config.get("run_id"), w) as log_metrics:
        for epoch in range(start_epoch, _last_epoch(a.epochs, config)):
            t0 = time.perf_counter()
            window = schedule.window(epoch)
            targets = _cycle(lambda: _iter(target, cfg, epoch, w.rank))
            sums: dict[str, float] = {}
            n = 0
            for i, batch in enumerate(_synced(w, _iter(source, cfg, epoch, w.rank))):
                weight = schedule.weight(epoch, i)
                src = _prepare(batch, w, epoch, cfg.seed)
                tgt = _prepare(next(targets), w, epoch, cfg.seed)
                loss, logs = engine(src, tgt, weight, window, schedule.phase(engine.global_steps))
                engine.backward(loss)
                engine.step()
                for k, v in {"loss": loss.detach(), "adv_weight": weight, **logs}.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                n += 1
                if on_step is not None:
                    on_step(rank=w.rank, epoch=epoch, step=int(engine.global_steps))
            values = {**{k: w.all_mean(v / max(n, 1)) for k, v in sums.items()}, "window_start": window[0]}
            metrics = end_epoch(
                engine, w, cfg, "adapt", epoch, a.epochs, values, val=val, log_metrics=log_metrics, started=t0,
                start=(start_epoch, start_step), client={"epoch": epoch + 1},
            )
    export_model(engine, model, scalars, config["model_path"], w)
    w.close()
    return metrics
