"""Images/s of the Ray Data preprocess pipeline vs a plain sequential loop, same images and models.

    .venv/bin/python bench/preprocess_bench.py --images-per-domain 20 --refine lmm

Both sides run the same stage code (`StageActor` around the tiny SAM + CLIP selection and
the tiny InstructBLIP or passthrough refiner) on the embedded benchmark, on CPUs
(`num_gpus=0`), and both times include loading the models (Ray: in its actors).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa


def sequential(cfg, table: pa.Table, root: str) -> float:
    """Seconds for the stages in this process, batch by batch, no Ray."""
    from urbancross.preprocess.pipeline import StageActor, with_status

    t0 = time.perf_counter()
    sam = StageActor("sam", cfg, root)
    refine = StageActor("refine", cfg, root)
    batch = cfg.preprocess.sam.batch_size
    data = with_status(table)
    for start in range(0, data.num_rows, batch):
        refine(sam(data.slice(start, batch)))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images-per-domain", type=int, default=20)
    ap.add_argument("--refine", choices=["passthrough", "lmm"], default="lmm")
    ap.add_argument("--sam-concurrency", type=int, default=2)
    ap.add_argument("--points-per-side", type=int, default=4, help="SAM prompts per side (config default 4)")
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()

    import ray

    from urbancross.config import load_config
    from urbancross.data.synth import synthesize
    from urbancross.preprocess import run_preprocess
    from urbancross.preprocess.pipeline import resolve_paths

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # test scaffolding: the tiny LMM
    from tiny_lmm import save_tiny_instructblip

    tmp = Path(tempfile.mkdtemp(prefix="preprocess-bench-"))
    cfg = load_config(None, [
        f"out_dir={tmp}", f"synth.images_per_domain={args.images_per_domain}", f"data.manifest={tmp / 'bench'}",
        f"preprocess.sam.concurrency={args.sam_concurrency}", f"preprocess.sam.points_per_side={args.points_per_side}",
        f"preprocess.refine.kind={args.refine}", f"preprocess.refine.model_dir={tmp / 'lmm'}",
    ])
    table = synthesize(cfg.synth, str(tmp / "bench"))
    save_tiny_instructblip(tmp / "lmm", [c for caps in table["captions"].to_pylist() for c in caps])
    n = table.num_rows

    resolved, _, _, root = resolve_paths(cfg)
    seq_s = sequential(resolved, table, root)

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    t0 = time.perf_counter()
    summary = run_preprocess(cfg)
    ray_s = time.perf_counter() - t0
    ray.shutdown()

    result = {
        "images": n,
        "refine": args.refine,
        "sam_concurrency": args.sam_concurrency,
        "sequential_images_per_s": round(n / seq_s, 2),
        "ray_images_per_s": round(n / ray_s, 2),
        "ray_over_sequential": round(seq_s / ray_s, 2),
        "ray_map_images_per_s": summary["images_per_s"],
        "rejects": summary["rejects"],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
