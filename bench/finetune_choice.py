"""Choosing the demo's stage-1 settings for a pretrained model, on the source's val split only.

    python bench/finetune_choice.py --out runs/finetune_choice [--lr 1e-4 3e-4 1e-3] [--batch 16] [--epochs 20] [--seeds 0] [--set ...]

For every (lr, batch, seed), trains on the source's train split from urbancross/demo.yaml's
`model.pretrained` (bench/loops.py, the demo's `train.num_workers` ranks emulated) for
`--epochs` epochs and records val mR after each epoch (the curve `Selection` chooses the
exported epoch from). Prints per setting the best val mR and its epoch and the curve every few
epochs; with `--adapt-lr`, adapts each run's chosen model (UrbanCross defaults) at each
adapt.lr and prints the target's val mR per pass (the split `urbancross adapt` chooses on).
Nothing here reads test. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapt_controls import mean_sd  # noqa: E402
from urbancross.config import load_config  # noqa: E402
from urbancross.demo import DEMO_CONFIG  # noqa: E402


def one(manifest: str, overrides: list[str], threads: int, adapt_lrs: list[float]) -> dict:
    import torch

    from loops import train_source
    from urbancross.data.ingest import read_split
    from urbancross.train.trainer import validation_slice

    torch.set_num_threads(threads)
    cfg = load_config(DEMO_CONFIG, [*overrides, f"data.manifest={manifest}"])
    d = cfg.data.source_domain
    train, val = validation_slice(cfg, read_split(cfg, cfg.data.train_split, d), d)
    t0 = time.perf_counter()
    model, info = train_source(cfg, train, val)
    out = {"overrides": overrides, "val_history": info["val_history"], "best_epoch": info["best_epoch"], "val_mR": info["val_mR"],
           "seconds": time.perf_counter() - t0}
    if adapt_lrs:  # stage 2 (UrbanCross defaults) from the chosen epoch, each adapt.lr chosen on the target's val split
        from loops import adapt

        t = cfg.data.target_domain
        target, target_val = validation_slice(cfg, read_split(cfg, cfg.data.train_split, t), t)
        out["adapt"] = {}
        for lr in adapt_lrs:
            _, a = adapt(cfg.override([f"adapt.lr={lr}"]), model, train, target, target_val)
            out["adapt"][lr] = {"val_history": a["val_history"], "best_epoch": a["best_epoch"], "val_mR": a["val_mR"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/finetune_choice")
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    ap.add_argument("--batch", type=int, nargs="+", default=[16])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--adapt-lr", type=float, nargs="*", default=[], help="then adapt each run's model at these adapt.lr (target val curves)")
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    args = ap.parse_args()

    from urbancross.data.synth import synthesize

    manifest = Path(args.out).resolve() / "benchmark"
    base = load_config(DEMO_CONFIG, args.overrides)
    if not manifest.exists():
        synthesize(base.synth, str(manifest))
    grid = [(lr, b, s) for lr in args.lr for b in args.batch for s in args.seeds]
    runs = [[*args.overrides, f"train.lr={lr}", f"train.batch_size={b}", f"train.epochs={args.epochs}", f"seed={s}"] for lr, b, s in grid]
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(one, [str(manifest)] * len(runs), runs, [1] * len(runs), [args.adapt_lr] * len(runs)))
    print(f"\nsource val mR by epoch (model.pretrained {base.model.pretrained or '(random init)'}, {base.train.num_workers} rank(s) per step)")
    print("| lr | batch | best val mR (mean ± sd over seeds) | best epochs | val mR at epochs 1, 5, 10, ... | s per run |\n|---|---|---|---|---|---|")
    table = []
    for lr in args.lr:
        for b in args.batch:
            rs = [r for (l2, b2, _), r in zip(grid, results) if (l2, b2) == (lr, b)]
            curve = np.mean([r["val_history"] for r in rs], axis=0)
            marks = [e for e in range(1, args.epochs + 1) if e == 1 or e % 5 == 0]
            best = mean_sd([r["val_mR"] for r in rs])
            table.append({"lr": lr, "batch": b, "best_val_mR": best, "best_epochs": [r["best_epoch"] for r in rs], "curve": curve.tolist()})
            print(f"| {lr:g} | {b} | {best[0]:.2f} ± {best[1]:.2f} | {[r['best_epoch'] for r in rs]} | "
                  + ", ".join(f"{curve[e - 1]:.1f}" for e in marks) + f" | {np.mean([r['seconds'] for r in rs]):.0f} |")
    if args.adapt_lr:
        print(f"\n{base.data.target_domain} val mR by adaptation epoch (UrbanCross defaults, from each run's chosen model)")
        print("| lr | batch | seed | adapt.lr | best val mR | best epoch | val mR per epoch |\n|---|---|---|---|---|---|---|")
        for (lr, b, seed), r in zip(grid, results):
            for alr, a in r["adapt"].items():
                curve = ", ".join(f"{v:.1f}" for v in a["val_history"])
                print(f"| {lr:g} | {b} | {seed} | {alr:g} | {a['val_mR']:.2f} | {a['best_epoch']} | {curve} |")
    print(json.dumps({"epochs": args.epochs, "seeds": args.seeds, "table": table,
                      "adapt": [{"setting": list(g), **{str(k): v for k, v in r.get("adapt", {}).items()}} for g, r in zip(grid, results)]}))


if __name__ == "__main__":
    main()
