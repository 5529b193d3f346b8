"""What segments cost a training step: none, the paper's per-crop encoding, and pooled masks.

    python bench/segment_bench.py [--batch-size 16] [--segments 10] [--steps 20] [--threads 2] [--preset tiny]

One process, the library's model and loss, the same random batch for every encoding (every
segment present, white-background masks of random boxes): forward + backward + Adam step,
median ms per step over `--steps` timed steps after 3 warm-up steps. `crops` runs the image
tower on the tile and each segment (1 + S images per row); `pooled` runs it once per row and
averages the tile's patch tokens under each mask. The last line is JSON with ms per step and
the ratios to the no-segment step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from urbancross.config import LossConfig, ModelConfig
from urbancross.loss import retrieval_loss
from urbancross.model.factory import create_model, get_tokenizer, image_size, normalize


def make_batch(cfg: ModelConfig, batch: int, segments: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = image_size(cfg)
    images = torch.rand(batch, 3, n, n, generator=g)
    segs = torch.ones(batch, segments, 3, n, n)
    for b in range(batch):
        for s in range(segments):
            r0, c0 = torch.randint(0, n // 2, (2,), generator=g).tolist()
            h, w = torch.randint(4, n // 2, (2,), generator=g).tolist()
            segs[b, s, :, r0:r0 + h, c0:c0 + w] = images[b, :, r0:r0 + h, c0:c0 + w]
    captions = [f"a tile with {i % 7} buildings north of a road" for i in range(batch)]
    mask = torch.ones(batch, segments, dtype=torch.bool)
    return normalize(images), get_tokenizer(cfg)(captions), normalize(segs.flatten(0, 1)).view_as(segs), mask


def step_ms(encoding: str, args) -> float:
    cfg = ModelConfig(preset=args.preset, use_segments=encoding != "off", segment_encoding="pooled" if encoding == "pooled" else "crops")
    torch.manual_seed(0)
    model = create_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images, tokens, segs, mask = make_batch(cfg, args.batch_size, args.segments)
    times = []
    for i in range(3 + args.steps):
        t0 = time.perf_counter()
        out = model(images, tokens, segs if encoding != "off" else None, mask if encoding != "off" else None)
        loss, _ = retrieval_loss(out, LossConfig())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--segments", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--preset", default="tiny")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ms = {enc: step_ms(enc, args) for enc in ("off", "crops", "pooled")}
    for enc, v in ms.items():
        print(f"{enc:7s} {v:8.1f} ms/step  ({v / ms['off']:.2f}x no segments)")
    print(json.dumps({"ms_per_step": {k: round(v, 1) for k, v in ms.items()},
                      "crops_over_off": round(ms["crops"] / ms["off"], 2), "pooled_over_off": round(ms["pooled"] / ms["off"], 2),
                      "crops_over_pooled": round(ms["crops"] / ms["pooled"], 2), "batch_size": args.batch_size,
                      "segments": args.segments, "threads": args.threads}))


if __name__ == "__main__":
    main()
