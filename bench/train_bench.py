"""A fair throughput bench: Ray Train + DeepSpeed (1 and 2 workers) against a plain PyTorch loop.

All three run the same model (tiny preset), data (a synthesized manifest decoded once into the
training cache), batch per worker, precision (fp32 on CPU), ZeRO stage, augmentation (seeded,
on the cached arrays) and torch threads per worker (`--threads`). Reported, in one run:
- steady-state samples/s: the steps after the first (warm-up) epoch, >= `--min-steps` timed
  steps per worker, median of `--repeats` interleaved repeats (plain, 1 worker, 2 workers, ...);
- on CPU, what two workers get without Ray: two plain loops at once in processes that never
  talk (the machine's ceiling, `ceiling_2_vs_1`), and the loop's DeepSpeed engine and gradient
  averaging in two processes started by hand (`no_ray_2_vs_1`), beside `scaling_2_vs_1`;
- ms per step by phase: data (cache -> batch, augmentation), forward, backward, optimizer step
  (+ gradient all-reduce under DeepSpeed);
- epoch-boundary costs (validation, checkpoint + report) and start-up (engine build, cache load
  in the worker, and the rest of the fit's wall time: driver-side decode, worker launch,
  MLflow), with whether DeepSpeed's op cache was cold;
- with `--demo`, the demo's wall time per stage and its cross-domain mR.
Figures are comparable only on an otherwise idle machine; the load average is printed.
The last line is one JSON object: per_worker_ratio (Ray 1 worker / plain, steady state),
scaling_2_vs_1 (2-worker / 1-worker samples/s, and per repeat), ceiling_2_vs_1, no_ray_2_vs_1,
threads_per_worker, step_ms (per loop and phase).

`--gpu`: everything on CUDA (bf16 autocast in the plain loop, `train.use_gpu` + bf16 in Ray Train),
one worker per GPU (up to 2; `scaling_2_vs_1` is null with one GPU).

    .venv/bin/python bench/train_bench.py [--images 256] [--batch-size 16] [--repeats 3] [--demo] [--gpu]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from urbancross.config import SynthConfig, load_config

PHASES = ("data", "forward", "backward", "step")


def plain_loop(cfg, table, epochs: int, device: str = "cpu") -> dict:
    """A single-process torch loop over the same cache, augmentation, objective and optimizer."""
    from urbancross.model.factory import create_model
    from urbancross.train.loop import adamw, param_groups
    from urbancross.train.objective import RetrievalObjective

    torch.set_num_threads(cfg.train.threads_per_worker)
    cache = _cache(cfg, table)
    torch.manual_seed(cfg.seed)
    module = RetrievalObjective(create_model(cfg.model), cfg.loss).to(device)
    opt = adamw(param_groups(module, cfg.train.lr, cfg.train.weight_decay))  # the loop's own optimizer

    def forward(b):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            return module(b)[0]

    def backward(loss):
        opt.zero_grad()
        loss.backward()

    def step():
        torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.train.grad_clip)
        opt.step()

    return _timed_steps(cfg, cache, epochs, torch.device(device), 1, 0, forward, backward, step)


def _cache(cfg, table):
    from urbancross.model.inputs import ModelInputs
    from urbancross.train.cache import Cache

    return Cache(ModelInputs(cfg, train=False, cache=True)({k: _column(v) for k, v in table.to_pydict().items()}))


def _timed_steps(cfg, cache, epochs: int, device, world: int, rank: int, forward, backward, step) -> dict:
    """Run `epochs` of this rank's seeded batches; ms per phase over the steps after the first epoch."""
    from urbancross.data.ingest import pick_caption
    from urbancross.train.cache import epoch_batches

    sums, steps = dict.fromkeys(PHASES, 0.0), 0
    for epoch in range(epochs):
        for idx in epoch_batches(np.arange(len(cache)), cfg.train.batch_size, world, rank, cfg.seed, epoch):
            t = [time.perf_counter()]
            b = cache.batch(idx, epoch, cfg.seed, cfg, device, train=True)
            b["tokens"] = pick_caption(b["tokens"], b["key"], epoch, cfg.seed).to(device)
            t.append(time.perf_counter())
            loss = forward(b)
            t.append(time.perf_counter())
            backward(loss)
            t.append(time.perf_counter())
            step()
            float(loss.detach())  # waits for the device
            t.append(time.perf_counter())
            if epoch > 0:  # the first epoch is warm-up
                steps += 1
                for k, a, z in zip(PHASES, t, t[1:]):
                    sums[k] += z - a
    ms = {k: 1000 * v / max(steps, 1) for k, v in sums.items()}
    return {"steps": steps, "ms": ms, "samples_per_s": cfg.train.batch_size * 1000 / sum(ms.values())}


def synced_loop(cfg, table, epochs: int, rank: int, world: int, port: int) -> dict:
    """The training loop's engine and gradient averaging (DeepSpeed, `GradSync`) in `world`
    processes started by hand: Ray Train's loop without Ray."""
    import types

    import torch.distributed as dist

    from urbancross.model.factory import create_model
    from urbancross.train.grad_sync import GradSync, shm_allreduce_env
    from urbancross.train.loop import build_engine, param_groups
    from urbancross.train.objective import RetrievalObjective, vectorize_scalars

    torch.set_num_threads(cfg.train.threads_per_worker)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    shm = shm_allreduce_env(world, world)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cache = _cache(cfg, table)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model)
    vectorize_scalars(model)  # as the loop does: DeepSpeed's broadcast cannot take 0-d parameters
    module = RetrievalObjective(model, cfg.loss)
    steps = epochs * math.ceil(len(cache) / (cfg.train.batch_size * world))  # the lr schedule's length
    groups = param_groups(module, cfg.train.lr, cfg.train.weight_decay)
    engine = build_engine(module, groups, cfg, types.SimpleNamespace(world=world), cfg.train.lr_schedule, steps)  # the loop's own
    sync = GradSync(engine, world, shm)

    def step():
        sync()
        engine.step()

    out = _timed_steps(cfg, cache, epochs, torch.device("cpu"), world, rank, lambda b: engine(b)[0], engine.backward, step)
    dist.destroy_process_group()
    return {**out, "sync": sync.describe()}


def _pair_worker(cfg, table, epochs: int, rank: int, port: int | None, results) -> None:
    results.put(plain_loop(cfg, table, epochs) if port is None else synced_loop(cfg, table, epochs, rank, 2, port))


def pair(cfg, table, epochs: int, synced: bool = False) -> dict:
    """Two loops at once in two processes, without Ray. Apart (`synced=False`), they never talk:
    what this machine gives two workers with no communication (the ceiling for `scaling_2_vs_1`).
    Synced, they are the training loop's engine and gradient averaging: Ray Train without Ray."""
    import multiprocessing as mp
    import queue
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1] if synced else None
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_pair_worker, args=(cfg, table, epochs, rank, port, results)) for rank in range(2)]
    for p in procs:
        p.start()
    runs = []
    while len(runs) < len(procs):
        try:
            runs.append(results.get(timeout=5))
        except queue.Empty:  # a process that died never answers
            if any(p.exitcode not in (None, 0) for p in procs):
                for p in procs:
                    p.kill()
                raise RuntimeError(f"a {'synced' if synced else 'plain'} loop process failed (exit codes {[p.exitcode for p in procs]})") from None
    for p in procs:
        p.join()
    ms = {k: statistics.mean(r["ms"][k] for r in runs) for k in PHASES}
    return {"steps": min(r["steps"] for r in runs), "ms": ms, "samples_per_s": sum(r["samples_per_s"] for r in runs)}


def _column(values: list):
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


def ray_train(cfg, workers: int, out_dir: str) -> dict:
    """One `run_train` fit; steady state from the per-epoch step times rank 0 logs to MLflow."""
    import mlflow

    from urbancross.train import run_train

    cfg = cfg.override({"train.num_workers": workers, "out_dir": out_dir})
    t0 = time.perf_counter()
    result = run_train(cfg)
    wall = time.perf_counter() - t0
    client = mlflow.MlflowClient(cfg.tracking_uri())
    hist = {
        k: [m.value for m in sorted(client.get_metric_history(result["mlflow_run_id"], k), key=lambda m: m.step)]
        for k in ("steps", "epoch_seconds", "validation_seconds", "report_seconds", *(f"ms_{p}" for p in PHASES))
    }
    steady = slice(1, None)  # epochs after the first
    steps = hist["steps"][steady]
    ms = {p: sum(s * v for s, v in zip(steps, hist[f"ms_{p}"][steady])) / max(sum(steps), 1) for p in PHASES}
    m = result["metrics"]
    loop_total = sum(hist["epoch_seconds"]) + sum(hist["validation_seconds"]) + sum(hist["report_seconds"])
    return {
        "steps": int(sum(steps)),
        "ms": ms,
        "samples_per_s": workers * cfg.train.batch_size * 1000 / sum(ms.values()),
        "validation_s": statistics.median(hist["validation_seconds"]),
        "report_s": statistics.median(hist["report_seconds"][:-1] or hist["report_seconds"]),  # without a checkpoint
        "checkpoint_report_s": hist["report_seconds"][-1],  # the last epoch always checkpoints
        "startup_engine_s": m["startup_engine_seconds"],
        "startup_cache_s": m["startup_cache_seconds"],
        "fit_wall_s": wall,
        "other_s": wall - loop_total - m["startup_engine_seconds"] - m["startup_cache_seconds"],
    }


def op_cache_cold() -> bool:
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    return not any(root.glob("**/deepspeed_shm_comm*")) if root.exists() else True


def demo(tmp: str) -> dict:
    """The embedded demo end to end: wall seconds per stage, and mR per (model, domain)."""
    from urbancross.config import load_config as load
    from urbancross.demo import DEMO_CONFIG, run_demo

    out = os.path.join(tmp, "demo")
    records = run_demo(load(DEMO_CONFIG, [f"out_dir={out}"]))
    times = {t["stage"].split(" ")[0]: round(t["seconds"], 1) for t in json.loads(Path(out, "timings.json").read_text())}
    mr = {f"{r['model']}/{r['tested_on']}": round(r['mR'], 2) for r in records if 'mR' in r}
    return {"stage_seconds": times, "mR": mr}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256, help="training images")
    ap.add_argument("--batch-size", type=int, default=16, help="per worker")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (and in the plain loop)")
    ap.add_argument("--zero-stage", type=int, default=None, help="DeepSpeed ZeRO stage; default: train.zero_stage's default, what a CPU run uses")
    ap.add_argument("--min-steps", type=int, default=50, help="timed steps per worker after the warm-up epoch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--demo", action="store_true", help="also run the demo and report its wall time per stage")
    ap.add_argument("--gpu", action="store_true", help="CUDA: the plain loop on the GPU, Ray Train with use_gpu (bf16), 1 worker per GPU")
    args = ap.parse_args()
    device = "cuda" if args.gpu else "cpu"
    worker_counts = tuple(range(1, min(torch.cuda.device_count(), 2) + 1)) if args.gpu else (1, 2)

    import ray

    from urbancross.data.ingest import read_split
    from urbancross.data.synth import synthesize

    cold = op_cache_cold()
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        manifest = os.path.join(tmp, "manifest")
        synthesize(SynthConfig(domains=["Finland"], images_per_domain=math.ceil(args.images / 0.75), test_fraction=0.25), manifest)
        steps_2 = math.ceil(args.images / (2 * args.batch_size))  # per worker and epoch with 2 workers
        epochs = 1 + math.ceil(args.min_steps / max(steps_2 - 1, 1))
        cfg = load_config(
            None,
            [
                f"data.manifest={manifest}",
                "model.use_segments=false",
                "train.curriculum=false",
                "train.val_images=32",
                f"train.epochs={epochs}",
                f"train.checkpoint_every={epochs}",
                f"train.batch_size={args.batch_size}",
                *([f"train.zero_stage={args.zero_stage}"] if args.zero_stage is not None else []),
                f"train.threads_per_worker={args.threads}",
                f"train.precision={'bf16' if args.gpu else 'fp32'}",
                f"train.use_gpu={args.gpu}",
                f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
            ],
        )
        table = read_split(cfg, "train", "Finland")
        print(f"{table.num_rows} images, batch {args.batch_size}/worker, {epochs} epochs, tiny preset, ZeRO-{cfg.train.zero_stage}, "
              f"{args.threads} thread(s)/worker, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
              f"DeepSpeed op cache {'cold' if cold else 'warm'}", flush=True)
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        runs: dict[str, list[dict]] = {"plain": [], **({} if args.gpu else {"plain2": [], "sync2": []}), **{f"ray{w}": [] for w in worker_counts}}
        for r in range(args.repeats):  # interleaved: load drifts hit every loop alike
            runs["plain"].append(plain_loop(cfg, table, epochs, device))
            if not args.gpu:
                runs["plain2"].append(pair(cfg, table, epochs))
                runs["sync2"].append(pair(cfg, table, epochs, synced=True))
            for w in worker_counts:
                runs[f"ray{w}"].append(ray_train(cfg, w, os.path.join(tmp, f"r{r}w{w}")))
            print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]['samples_per_s']:.1f} samples/s" for k, v in runs.items()), flush=True)
        extra = demo(tmp) if args.demo else None
        load_after = os.getloadavg()[0]

    med = {k: statistics.median(x["samples_per_s"] for x in v) for k, v in runs.items()}
    step_ms = {k: {p: round(statistics.median(x["ms"][p] for x in v), 2) for p in PHASES} for k, v in runs.items()}
    print(f"\n{'loop':28s} {'samples/s':>10s} {'ratio':>6s} {'steps':>6s}  ms/step " + " ".join(f"{p:>8s}" for p in PHASES))
    names = (("plain", "plain torch, 1 process"), ("plain2", "plain torch, 2 apart"), ("sync2", "DS + GradSync, 2, no Ray"),
             *((f"ray{w}", f"Ray Train+DS, {w} worker(s)") for w in worker_counts))
    for k, name in ((k, n) for k, n in names if k in runs):
        steps = min(x["steps"] for x in runs[k])
        print(f"{name:28s} {med[k]:10.1f} {med[k] / med['plain']:6.2f} {steps:6d}          " + " ".join(f"{step_ms[k][p]:8.1f}" for p in PHASES))
    boundary = {
        f"ray{w}": {k: round(statistics.median(x[k] for x in runs[f"ray{w}"]), 2) for k in (
            "validation_s", "report_s", "checkpoint_report_s", "startup_engine_s", "startup_cache_s", "other_s", "fit_wall_s")}
        for w in worker_counts
    }
    print("\nepoch boundary and start-up (s, median):")
    for k, v in boundary.items():
        print(f"  {k}: " + ", ".join(f"{n}={x}" for n, x in v.items()))
    if extra:
        print("\ndemo wall seconds per stage:", extra["stage_seconds"])
        print("demo mR:", extra["mR"])
    print(f"load average now {load_after:.1f} (figures are only comparable on an otherwise idle machine)")
    summary = {
        "per_worker_ratio": round(med["ray1"] / med["plain"], 3),
        "scaling_2_vs_1": round(med["ray2"] / med["ray1"], 3) if "ray2" in med else None,
        # the machine's own ceiling: two plain loops at once (no communication, no Ray) / one
        "ceiling_2_vs_1": round(med["plain2"] / med["plain"], 3) if "plain2" in med else None,
        # the same two workers' engine and gradient averaging, in two processes without Ray / plain
        "no_ray_2_vs_1": round(med["sync2"] / med["plain"], 3) if "sync2" in med else None,
        "scaling_per_repeat": (
            [round(b["samples_per_s"] / a["samples_per_s"], 3) for a, b in zip(runs["ray1"], runs["ray2"])] if "ray2" in med else None),
        "device": device,
        "threads_per_worker": args.threads,
        "step_ms": step_ms,
        "samples_per_s": {k: round(v, 2) for k, v in med.items()},
        "boundary_s": boundary,
        "deepspeed_op_cache": "cold" if cold else "warm",
        "repeats": args.repeats,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        **({"demo": extra} if extra else {}),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
