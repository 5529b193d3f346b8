"""Time and peak memory of `retrieval_metrics` and `smr_rerank` on a large CPU gallery.

    .venv/bin/python bench/metrics_bench.py [--images 10000] [--texts 50000] [--dim 64]

The similarity matrix (images x texts float32: 2 GB at the default size) is built once from
random unit embeddings; each step reports its wall time and how far it raised the process's
peak RSS above what was already held (ru_maxrss is a high-water mark, so SMR runs last).
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from urbancross.config import SMRConfig
from urbancross.evaluate import retrieval_metrics, smr_rerank


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def step(name: str, fn):
    before, start = peak_mb(), time.perf_counter()
    result = fn()
    print(f"{name:<22} {time.perf_counter() - start:8.2f} s   peak +{peak_mb() - before:8.0f} MB "
          f"(process peak {peak_mb():.0f} MB)", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--texts", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=SMRConfig().k)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"gallery: {args.images} images x {args.texts} texts, torch threads {torch.get_num_threads()}")

    def build():
        img = torch.nn.functional.normalize(torch.randn(args.images, args.dim), dim=-1)
        owner = torch.arange(args.texts) % args.images
        txt = torch.nn.functional.normalize(img[owner] + 0.9 * torch.randn(args.texts, args.dim), dim=-1)
        return img @ txt.T, owner

    sim, owner = step("build similarity", build)
    metrics = step("retrieval_metrics", lambda: retrieval_metrics(sim, owner))
    print("  " + ", ".join(f"{k}={v:.2f}" for k, v in metrics.items()))
    reranked = step(f"smr_rerank (k={args.k})", lambda: smr_rerank(sim, SMRConfig(k=args.k)))
    metrics = step("metrics on SMR", lambda: retrieval_metrics(reranked, owner))
    print("  " + ", ".join(f"{k}={v:.2f}" for k, v in metrics.items()))


if __name__ == "__main__":
    main()
