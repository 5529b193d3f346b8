"""Single-process stage loops for the bench scripts: stage 1 (train) and stage 2 (adapt), no Ray.

bench/adapt_controls.py, bench/domain_gap.py and bench/evidence.py train many small variants in
minutes; a Ray Train fit per variant would cost more in start-up than in training. These loops
run the Ray loops' own pieces in the driver process, so a variant here trains as
`urbancross train` / `urbancross adapt` do:

- inputs decoded once into the training `Cache` (uint8 rows) and each epoch's batches drawn
  from it by `epoch_batches` (seeded permutation, augmentation from (seed, epoch, key)), one
  caption per image per epoch (`pick_caption`);
- the `train.num_workers` ranks of a Ray fit emulated in turn: each step deals every rank its
  `train.batch_size` rows of the same permutation, each rank's loss is computed on its own
  rows (in-batch negatives per rank, as on a worker) and the step takes their mean, as data
  parallelism averages the ranks' gradients (`train.num_workers: 1` = one plain process);
- stage 1 through `RetrievalObjective` (segments and their losses when the model fuses them),
  with the curriculum (`Curriculum`, cold-start caption complexity, similarity-margin
  rescoring by the loop's `rescore`); stage 2 through `AdaptObjective` with `AdaptSchedule`,
  a source and a target batch per step;
- the loops' AdamW parameter groups (`param_groups`: no decay on biases and norms; the
  discriminator at `adapt.disc_lr`), each stage's lr curve (`lr_factor`), gradient clipping
  at `train.grad_clip` (DeepSpeed's `gradient_clipping`);
- model choice on val (`Selection`): with a `val` table the returned model is the epoch with
  the best val mR (stage 1: the source's val split; stage 2: the target's, as `run_adapt`).
  Without one, the last epoch (what bench/adapt_controls.py has always reported).

Test rows never enter here: the callers pass train and val tables, and only `test_mr` reads test.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from urbancross.config import Config
from urbancross.evaluate.scoring import domain_metrics
from urbancross.model.embed import embed_table, numpy_batches
from urbancross.model.factory import create_model
from urbancross.model.inputs import ModelInputs
from urbancross.train.adversarial import AdaptObjective, AdaptSchedule
from urbancross.train.cache import Cache, epoch_batches
from urbancross.train.curriculum import Curriculum, keep_mask
from urbancross.train.loop import _prepare, _seed_torch, _target_batches, adamw, param_groups, rescore, train_steps
from urbancross.train.lr_schedule import lr_factor
from urbancross.train.objective import RetrievalObjective
from urbancross.train.selection import Selection
from urbancross.train.trainer import difficulty_scores


@dataclass
class Solo:
    """The loops' `Worker` as seen from one process: rank `rank` of `world`, on the CPU, in fp32."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    def gather(self, obj):
        return [obj]


def ranks(cfg: Config) -> list[Solo]:
    """The `train.num_workers` ranks a Ray fit of `cfg` would run (at least one), emulated in turn."""
    world = max(1, cfg.train.num_workers)
    return [Solo(rank=r, world=world) for r in range(world)]


def decode(cfg: Config, table: pa.Table) -> Cache:
    """The rows decoded once, as a training stage caches them (`ModelInputs(cache=True)`)."""
    inputs = ModelInputs(cfg, train=False, cache=True)
    parts = [inputs(b) for b in numpy_batches(table, 64)]
    return Cache({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})


def test_mr(cfg: Config, model, table: pa.Table, smr: bool = False) -> dict[str, float]:
    """mR per domain of `table` (each domain its own gallery), plain or SMR-re-ranked."""
    records = domain_metrics(embed_table(model.eval(), table, cfg), cfg.evaluate)
    return {r["tested_on"]: (r["smr"]["mR"] if smr else r["mR"]) for r in records}


def scores(cfg: Config, model, table: pa.Table) -> dict[str, dict[str, float]]:
    """Per domain of `table`: {"mR": plain, "smr_mR": after SMR re-ranking} (one embedding pass)."""
    records = domain_metrics(embed_table(model.eval(), table, cfg), cfg.evaluate)
    return {r["tested_on"]: {"mR": r["mR"], **({"smr_mR": r["smr"]["mR"]} if "smr" in r else {})} for r in records}


class _Chooser:
    """Best-val-epoch weights (a copy in memory), as `end_epoch` + `export_model` keep them."""

    def __init__(self, cfg: Config, val: pa.Table | None):
        self.cfg, self.val = cfg, val
        self.selection = Selection(patience=cfg.train.patience)
        self.best: dict | None = None
        self.history: list[float] = []

    def end_epoch(self, model, epoch: int, last: bool, counts: bool = True) -> None:
        if self.val is None:
            return
        if not ((epoch + 1) % self.cfg.train.val_every == 0 or last):
            return
        value = float(np.mean(list(test_mr(self.cfg, model, self.val).values())))
        model.train()
        self.history.append(value)
        if self.selection.update(epoch + 1, value, counts):
            self.best = copy.deepcopy(model.state_dict())

    def chosen(self, model) -> dict:
        if self.best is not None:
            model.load_state_dict(self.best)
        return {"best_epoch": self.selection.best_epoch, "val_mR": self.selection.best if self.best is not None else None,
                "val_history": self.history}


def _optimizer(groups: list[dict], total: int, schedule) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    opt = adamw(groups)
    curve = lambda step: lr_factor(step, total, schedule)  # noqa: E731
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, [(lambda step: 1.0) if g.get("disc") else curve for g in groups])


def _step(module, opt, sched, loss, clip: float) -> None:
    opt.zero_grad()
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
    opt.step()
    sched.step()


def train_source(cfg: Config, table: pa.Table, val: pa.Table | None = None, cache: Cache | None = None):
    """Stage 1 on `table` (train rows) from `model.pretrained`: (model, info).

    `info`: best_epoch and val_mR (None without `val`: then the last epoch), val_history,
    epochs_run, seconds.
    """
    t0 = time.perf_counter()
    w, workers = Solo(), ranks(cfg)
    cache = cache if cache is not None else decode(cfg, table)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model)
    module = RetrievalObjective(model, cfg.loss)
    cold = difficulty_scores(cfg, table)
    curriculum = Curriculum(cfg.train.curriculum, cfg.train.epochs, {int(k): float(v) for k, v in zip(cold["keys"], cold["values"])})
    total = train_steps(Curriculum(cfg.train.curriculum, cfg.train.epochs, {}), len(cache), cfg, len(workers))
    opt, sched = _optimizer(param_groups(module, cfg.train.lr, cfg.train.weight_decay), total, cfg.train.lr_schedule)
    chooser = _Chooser(cfg, val)
    module.train()
    epoch = -1
    for epoch in range(cfg.train.epochs):
        if chooser.selection.stopped:
            break
        _seed_torch(cfg.seed, epoch, 0)
        rows = np.flatnonzero(keep_mask(cache.keys, curriculum.allowed(epoch)))
        shares = [epoch_batches(rows, cfg.train.batch_size, r.world, r.rank, cfg.seed, epoch) for r in workers]
        for step_rows in zip(*shares):  # one optimizer step: the mean of the ranks' losses, as data parallelism averages gradients
            losses = [module(_prepare(cache.batch(idx, epoch, cfg.seed, cfg, w.device, train=True), w, epoch, cfg.seed))[0] for idx in step_rows]
            _step(module, opt, sched, torch.stack(losses).mean(), cfg.train.grad_clip)
        if curriculum.rescore_due(epoch):
            curriculum.scores = rescore(module, cache, cfg, w, epoch, curriculum.scores)
        chooser.end_epoch(model, epoch, epoch + 1 == cfg.train.epochs, counts=curriculum.fraction(epoch) >= 1.0)
    info = chooser.chosen(model)
    return model.eval(), {**info, "epochs_run": epoch + 1, "seconds": time.perf_counter() - t0}


def adapt(cfg: Config, model, source: pa.Table, target: pa.Table, val: pa.Table | None = None,
          caches: tuple[Cache, Cache] | None = None):
    """Stage 2 as `adapt_loop_per_worker` runs it, from a copy of `model`: (adapted model, info).

    `info`: as `train_source`'s, plus disc_acc, the discriminator's mean accuracy over the last
    pass (0.5 = the encoders fool it).
    """
    t0 = time.perf_counter()
    a = cfg.adapt
    w, workers = Solo(), ranks(cfg)
    src, tgt = caches if caches is not None else (decode(cfg, source), decode(cfg, target))
    torch.manual_seed(cfg.seed)
    module = AdaptObjective(copy.deepcopy(model), cfg.loss, a)
    steps_per_epoch = math.ceil(len(src) / (cfg.train.batch_size * len(workers)))  # as run_adapt
    schedule = AdaptSchedule(a, steps_per_epoch)
    opt, sched = _optimizer(param_groups(module, a.lr, cfg.train.weight_decay, disc_lr=a.disc_lr), steps_per_epoch * a.epochs, a.lr_schedule)
    chooser = _Chooser(cfg, val)
    module.train()
    step, accuracy, epoch = 0, [], -1
    for epoch in range(a.epochs):
        if chooser.selection.stopped:
            break
        _seed_torch(cfg.seed, epoch, 0)
        share, accuracy = schedule.share(epoch), []
        targets = [_target_batches(tgt, cfg, r, epoch) for r in workers]
        shares = [epoch_batches(np.arange(len(src)), cfg.train.batch_size, r.world, r.rank, cfg.seed, epoch, 0) for r in workers]
        for i, step_rows in enumerate(zip(*shares)):
            losses = []
            for idx, rank_targets in zip(step_rows, targets):
                s = _prepare(src.batch(idx, epoch, cfg.seed, cfg, w.device, train=True), w, epoch, cfg.seed)
                t = _prepare(tgt.batch(next(rank_targets), epoch, cfg.seed, cfg, w.device, train=True), w, epoch, cfg.seed)
                loss, logs = module(s, t, schedule.weight(epoch, i), share, schedule.phase(step))
                losses.append(loss)
                accuracy.append(float(logs["disc_acc"]))
            _step(module, opt, sched, torch.stack(losses).mean(), cfg.train.grad_clip)
            step += 1
        chooser.end_epoch(module.model, epoch, epoch + 1 == a.epochs)
    info = chooser.chosen(module.model)
    return module.model.eval(), {**info, "epochs_run": epoch + 1, "disc_acc": float(np.mean(accuracy)) if accuracy else None,
                                 "seconds": time.perf_counter() - t0}

