"""Steady-state images/s of the Ray Data preprocess job vs a sequential loop at the same threads.

    .venv/bin/python bench/preprocess_bench.py                      # 600 images, lmm refine, 3 repeats
    .venv/bin/python bench/preprocess_bench.py --images-per-domain 10 --repeats 1   # a smoke run

Both sides run the same stage code (`StageActor` around the tiny SAM + CLIP selection and the
tiny InstructBLIP or passthrough refiner) on the embedded benchmark, on CPUs, with the same
block size, and journal each finished block to Parquet as the job does.

- Sequential: `LocalStages` in this process, torch at `--threads` threads.
- Ray Data: `run_preprocess` (the real job) with `--sam-concurrency` SAM actors sharing
  `--threads - 1` torch threads and one refine actor at 1 thread: `--threads` in all; or with
  `--fused` (`preprocess.fuse_stages`), `--threads` actors at 1 thread each, every actor running
  a block through SAM and then refinement.

Start-up (model loads and the first block; for Ray also actor start: each actor pool is up
before data flows) is reported apart, and the end-to-end ratio with it included. The
steady rate counts the rows of the blocks that arrive after the first `--warmup` share of
blocks, over the time since then (block arrival times, same rule on both sides). Each side is
run `--repeats` times, interleaved; medians are reported. Run it on an otherwise idle machine:
the load average at start and end is in the result, and a loaded machine makes it meaningless.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path


def stand_in_sam(masks: int):
    """The SAM stage with a SAM that proposes `masks` masks per image (a function of its pixels):
    the random tiny SAM proposes one at most, so CLIP ranking would never run."""
    import zlib

    import numpy as np

    from urbancross.preprocess.sam import Segmenter

    def generate(arr):
        rng = np.random.default_rng(zlib.crc32(arr.tobytes()))
        return [{"segmentation": rng.random(arr.shape[:2]) < rng.uniform(0.1, 0.9),
                 "predicted_iou": rng.uniform(0.5, 1), "stability_score": rng.uniform(0.5, 1)} for _ in range(masks)]

    class StandIn(Segmenter):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.generator.generate = generate  # SAM's forward is skipped: only selection, CLIP and PNGs remain

    return StandIn


class Clock:
    """Block arrival times; `steady()` = rows/s after the first `warmup` share of blocks."""

    def __init__(self, warmup: float):
        self.warmup, self.t0, self.arrivals = warmup, time.perf_counter(), []

    def __call__(self, rows: int) -> None:
        self.arrivals.append((time.perf_counter(), rows))

    def startup(self) -> float:
        return self.arrivals[0][0] - self.t0

    def total(self) -> float:
        return sum(n for _, n in self.arrivals) / (self.arrivals[-1][0] - self.t0)

    def steady(self) -> float:
        k = max(1, math.ceil(self.warmup * len(self.arrivals)))
        if k >= len(self.arrivals):
            raise SystemExit(f"only {len(self.arrivals)} blocks: too few images for a steady-state rate")
        rows = sum(n for _, n in self.arrivals[k:])
        return rows / (self.arrivals[-1][0] - self.arrivals[k - 1][0])


def sequential(cfg, table, root: str, parts: Path, warmup: float, stages: dict) -> tuple[Clock, dict]:
    """The loop: load both stages, then block by block through them and into the journal."""
    import pyarrow as pa

    from urbancross.preprocess.pipeline import LocalStages, _write_file_atomic, block_rows, split_status, with_status

    clock = Clock(warmup)
    stages = LocalStages(cfg, root, stages)
    load_s = time.perf_counter() - clock.t0
    write_s = 0.0
    parts.mkdir(parents=True)
    for batch in with_status(table).to_batches(max_chunksize=block_rows(cfg)):
        block = stages(pa.Table.from_batches([batch]))
        t = time.perf_counter()
        ok, _ = split_status(block)
        _write_file_atomic(ok, str(parts / f"part-{uuid.uuid4().hex}.parquet"))
        write_s += time.perf_counter() - t
        clock(block.num_rows)
    seg = stages.sam.stage
    n = table.num_rows
    stage_ms = {
        "sam": 1000 * (stages.sam.seconds - seg.timings["clip_scoring"]) / n,  # decode + SAM + paint + PNG
        "clip_scoring": 1000 * seg.timings["clip_scoring"] / n,
        "refine": 1000 * stages.refine.seconds / n,
        "write": 1000 * write_s / n,
        "model_load": 1000 * load_s,  # once, not per image
    }
    return clock, stage_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images-per-domain", type=int, default=200, help="3 domains: 200 = 600 images")
    ap.add_argument("--refine", choices=["passthrough", "lmm"], default="lmm")
    ap.add_argument("--selection", choices=["quality", "caption"], default="caption")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in all, on each side")
    ap.add_argument("--sam-concurrency", type=int, default=1)
    ap.add_argument("--fused", action="store_true", help="preprocess.fuse_stages: --threads fused actors at 1 thread each")
    ap.add_argument("--batch-size", type=int, default=8, help="SAM and refine batch size, and rows per block")
    ap.add_argument("--points-per-side", type=int, default=4, help="SAM prompts per side (config default 4)")
    ap.add_argument("--stand-in-masks", type=int, default=0,
                    help="replace SAM's masks by this many random ones per image (0 = the tiny SAM, which finds at most one, "
                         "so CLIP scoring never runs); > num_segments exercises CLIP ranking")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=float, default=0.1, help="share of blocks left out of the steady rate")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs given to Ray")
    args = ap.parse_args()
    if args.fused:
        args.sam_concurrency = args.threads
    sam_threads = 1 if args.fused else (args.threads - 1) // args.sam_concurrency
    if sam_threads < 1:
        raise SystemExit("--threads must be >= --sam-concurrency + 1 (one thread for the refine actor)")
    load_start = os.getloadavg()

    import ray
    import ray.data
    import torch

    from urbancross.config import load_config
    from urbancross.data.synth import synthesize
    from urbancross.preprocess import run_preprocess
    from urbancross.preprocess.pipeline import resolve_paths, stage_plan

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # test scaffolding: the tiny LMM
    from tiny_lmm import save_tiny_instructblip

    tmp = Path(tempfile.mkdtemp(prefix="preprocess-bench-"))
    common = [
        f"out_dir={tmp}", f"synth.images_per_domain={args.images_per_domain}", f"data.manifest={tmp / 'bench'}",
        f"preprocess.sam.points_per_side={args.points_per_side}", f"preprocess.sam.selection={args.selection}",
        f"preprocess.sam.batch_size={args.batch_size}", f"preprocess.refine.batch_size={args.batch_size}",
        f"preprocess.block_rows={args.batch_size}",
        f"preprocess.refine.kind={args.refine}", f"preprocess.refine.model_dir={tmp / 'lmm'}",
    ]
    seq_cfg = load_config(None, [*common, f"preprocess.sam.threads={args.threads}", f"preprocess.refine.threads={args.threads}"])
    ray_cfg = load_config(None, [
        *common, f"preprocess.sam.concurrency={args.sam_concurrency}", f"preprocess.sam.threads={sam_threads}",
        "preprocess.refine.concurrency=1", "preprocess.refine.threads=1",
        f"preprocess.fuse_stages={str(args.fused).lower()}",
    ])
    table = synthesize(seq_cfg.synth, str(tmp / "bench"))
    save_tiny_instructblip(tmp / "lmm", [c for caps in table["captions"].to_pylist() for c in caps])
    resolved, _, _, root = resolve_paths(seq_cfg)
    n = table.num_rows
    print(f"{n} images; sequential: torch threads {args.threads}; ray: {stage_plan(ray_cfg)}", flush=True)

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    # Each actor pool starts (actors up, models loaded) before any block flows: otherwise a SAM
    # actor that loads faster than the LMM one runs ahead during start-up and the blocks it
    # queued then arrive "for free", inflating the rate measured after the first blocks.
    ray.data.DataContext.get_current().wait_for_min_actors_s = 1800
    stages = {"sam": stand_in_sam(args.stand_in_masks)} if args.stand_in_masks else {}
    seq, ray_runs, stage_ms = [], [], []
    for r in range(args.repeats):
        torch.set_num_threads(args.threads)
        clock, ms = sequential(resolved, table, root, tmp / f"seq-{r}.parts", args.warmup, stages)
        seq.append(clock)
        stage_ms.append(ms)
        clock = Clock(args.warmup)
        run_preprocess(ray_cfg.override({"preprocess.output": str(tmp / f"ray-{r}")}), stages=stages, on_block=clock)
        ray_runs.append(clock)
        print(f"repeat {r + 1}: sequential {seq[-1].steady():.2f} img/s (start-up {seq[-1].startup():.1f} s), "
              f"ray {clock.steady():.2f} img/s (start-up {clock.startup():.1f} s)", flush=True)
    ray.shutdown()

    med = statistics.median
    seq_rate, ray_rate = med(c.steady() for c in seq), med(c.steady() for c in ray_runs)
    result = {
        "images": n,
        "refine": args.refine,
        "selection": args.selection,
        "threads": args.threads,
        "ray_threads": sam_threads * args.sam_concurrency + (0 if args.fused else 1),  # < threads when sam_concurrency does not divide threads - 1
        "sam_concurrency": args.sam_concurrency,
        "fused": args.fused,
        "stand_in_masks": args.stand_in_masks,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "steady_blocks": len(seq[0].arrivals) - max(1, math.ceil(args.warmup * len(seq[0].arrivals))),  # few = no steady state
        "sequential_images_per_s": round(seq_rate, 2),
        "ray_images_per_s": round(ray_rate, 2),
        "ray_over_sequential": round(ray_rate / seq_rate, 3),
        "end_to_end_ray_over_sequential": round(med(c.total() for c in ray_runs) / med(c.total() for c in seq), 3),
        "startup_s": {"sequential": round(med(c.startup() for c in seq), 2),
                      "ray": round(med(c.startup() for c in ray_runs), 2)},
        "per_stage_ms": {k: round(med(m[k] for m in stage_ms), 2) for k in stage_ms[0]},
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
