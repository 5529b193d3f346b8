"""Throughput of Ray Train + DeepSpeed (1 and 2 workers) against a plain PyTorch loop.

Same model (tiny preset), data (a synthesized manifest), batch size and loss in all three.
The plain loop decodes and augments in its own process (what Ray Data takes off the
training process). Prints samples/s of the last epoch (steady state: start-up, JIT and the
first Ray Data execution excluded) and end to end, and each as a ratio to the plain loop;
the last line is the same figures as JSON. `--gpu`: everything on CUDA (bf16), one worker per GPU.

    .venv/bin/python bench/train_bench.py [--images 64] [--epochs 3] [--batch-size 16] [--gpu]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

import torch

from urbancross.config import SynthConfig, load_config


def plain_loop(cfg, table, epochs: int, device: str = "cpu") -> tuple[float, float]:
    """(last-epoch samples/s, end-to-end samples/s) of a single-process torch loop (bf16 autocast on CUDA)."""
    from urbancross.data.ingest import pick_caption
    from urbancross.loss import retrieval_loss
    from urbancross.model.factory import create_model
    from urbancross.model.inputs import ModelInputs

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    inputs = ModelInputs(cfg, train=True)
    rows = table.to_pydict()
    n, b = table.num_rows, cfg.train.batch_size
    last = 0.0
    for epoch in range(epochs):
        te = time.perf_counter()
        for start in range(0, n, b):
            batch = {k: v[start : start + b] for k, v in rows.items()}
            arrays = inputs({k: _column(v) for k, v in batch.items()})
            tokens = pick_caption(torch.as_tensor(arrays["tokens"]), arrays["key"], epoch, cfg.seed).to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
                out = model(torch.as_tensor(arrays["images"]).to(device), tokens)
                loss, _ = retrieval_loss(out, cfg.loss)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        last = n / (time.perf_counter() - te)
    return last, n * epochs / (time.perf_counter() - t0)


def _column(values: list):
    import numpy as np

    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


def ray_train(cfg, workers: int, out_dir: str) -> tuple[float, float]:
    from urbancross.train import run_train

    cfg = cfg.override({"train.num_workers": workers, "out_dir": os.path.join(out_dir, f"workers{workers}")})
    t0 = time.perf_counter()
    result = run_train(cfg)
    wall = time.perf_counter() - t0
    m = result["metrics"]
    per_epoch = m["samples"] / cfg.train.epochs
    return per_epoch / m["epoch_seconds"], m["samples"] / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64, help="images in the training domain")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--gpu", action="store_true", help="CUDA: the plain loop on the GPU, Ray Train with use_gpu (bf16, NCCL), 1 worker per GPU")
    args = ap.parse_args()
    device = "cuda" if args.gpu else "cpu"
    worker_counts = tuple(range(1, torch.cuda.device_count() + 1))[:2] if args.gpu else (1, 2)

    import ray

    from urbancross.data.ingest import read_split
    from urbancross.data.synth import synthesize

    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        manifest = os.path.join(tmp, "manifest")
        synthesize(SynthConfig(domains=["Finland"], images_per_domain=math.ceil(args.images / 0.75), test_fraction=0.25), manifest)
        cfg = load_config(
            None,
            [
                f"data.manifest={manifest}",
                "model.use_segments=false",
                "train.curriculum=false",
                "train.val_images=0",
                "train.ingest_actors=0",
                f"train.epochs={args.epochs}",
                f"train.batch_size={args.batch_size}",
                f"train.zero_stage={args.zero_stage}",
                f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
                f"train.use_gpu={args.gpu}",
            ],
        )
        table = read_split(cfg, "train", "Finland")
        load_before = os.getloadavg()[0]
        print(f"{table.num_rows} images, batch {args.batch_size}, {args.epochs} epochs, tiny preset, ZeRO-{args.zero_stage}, "
              f"{device}, {os.cpu_count()} CPUs, load average {load_before:.1f}", flush=True)
        rows = {"plain torch (1 process)": plain_loop(cfg, table, args.epochs, device)}
        plain_peak = torch.cuda.max_memory_allocated() / 2**20 if args.gpu else None
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        for workers in worker_counts:
            rows[f"Ray Train + DeepSpeed, {workers} worker(s)"] = ray_train(cfg, workers, tmp)
        print(f"load average now {os.getloadavg()[0]:.1f} (figures are only comparable on an otherwise idle machine)")
        base_last, base_e2e = rows["plain torch (1 process)"]
        print(f"\n{'loop':40s} {'last epoch s/s':>15s} {'ratio':>7s} {'end-to-end s/s':>15s} {'ratio':>7s}")
        for name, (last, e2e) in rows.items():
            print(f"{name:40s} {last:15.1f} {last / base_last:7.2f} {e2e:15.1f} {e2e / base_e2e:7.2f}")
        figures = {
            name: {"last_epoch_samples_per_s": round(last, 2), "last_epoch_ratio": round(last / base_last, 3),
                   "end_to_end_samples_per_s": round(e2e, 2), "end_to_end_ratio": round(e2e / base_e2e, 3)}
            for name, (last, e2e) in rows.items()
        }
        print(json.dumps({"images": table.num_rows, "batch_size": args.batch_size, "epochs": args.epochs, "zero_stage": args.zero_stage,
                          "device": device, "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                          "plain_cuda_peak_mb": None if plain_peak is None else round(plain_peak), "loops": figures}))


if __name__ == "__main__":
    main()
