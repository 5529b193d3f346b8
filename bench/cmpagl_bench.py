"""Size and speed of the tiny CMPAGL model against the UrbanCross tiny CLIP, on CPU.

Both get the same batch (`--batch-size` 64 px benchmark tiles, one caption each) and one
training step's work: forward, their loss, backward (no optimizer step). CMPAGL runs its full
objective (pre-alignment + triplet + intra-class + ITM on 3 x batch fused pairs) and, to show
what the matching head costs, once without ITM. Also: ITM re-scoring throughput (pairs/s, no
grad), which sizes the top-k re-scoring stage. Medians over `--reps` after one warm-up, in one
run, with `--threads` intra-op threads. Last line: one JSON object.

    .venv/bin/python bench/cmpagl_bench.py [--batch-size 16] [--reps 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time

import numpy as np
import torch
from PIL import Image

from urbancross.config import LossConfig, ModelConfig, SynthConfig
from urbancross.data import synth
from urbancross.loss import cmpagl_loss, retrieval_loss
from urbancross.model import build_cmpagl, create_model, get_tokenizer


def batch(n: int) -> tuple[torch.Tensor, list[str]]:
    rows = synth.domain_rows(SynthConfig(images_per_domain=n), "Finland")
    pixels = [np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB"), np.float32) for r in rows]
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2) / 127.5 - 1, [r["captions"][0] for r in rows]


def median_ms(step, reps: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    images, captions = batch(args.batch_size)

    torch.manual_seed(0)
    clip_cfg = ModelConfig()
    clip = create_model(clip_cfg)
    clip_tokens = get_tokenizer(clip_cfg)(captions)

    def clip_step():
        clip.zero_grad()
        retrieval_loss(clip(images, clip_tokens), LossConfig())[0].backward()

    cmpagl = build_cmpagl("tiny")
    tokens = cmpagl.tokenizer(captions)
    loss_cfg = LossConfig(kind="triplet")

    def cmpagl_step(itm: bool):
        cmpagl.zero_grad()
        cmpagl_loss(cmpagl(images, tokens, itm=itm), loss_cfg)[0].backward()

    with torch.no_grad():
        image_tokens = cmpagl.image_features(images)[1]
    pairs = torch.cartesian_prod(torch.arange(len(captions)), torch.arange(len(captions)))
    scorer = cmpagl.pair_scorer(image_tokens, tokens)
    itm_ms = median_ms(lambda: scorer(pairs), args.reps)

    params = {"urbancross_tiny_params": sum(p.numel() for p in clip.parameters()),
              "cmpagl_tiny_params": sum(p.numel() for p in cmpagl.parameters())}
    ms = {"urbancross_tiny_step_ms": median_ms(clip_step, args.reps),
          "cmpagl_tiny_step_ms": median_ms(lambda: cmpagl_step(True), args.reps),
          "cmpagl_tiny_no_itm_step_ms": median_ms(lambda: cmpagl_step(False), args.reps)}
    parts = {name: sum(p.numel() for p in getattr(cmpagl, name).parameters())
             for name in ("image_encoder", "text_encoder", "fusion")}
    print(f"parameters: UrbanCross tiny {params['urbancross_tiny_params']:,}, CMPAGL tiny "
          f"{params['cmpagl_tiny_params']:,} (Gswin {parts['image_encoder']:,}, BERT {parts['text_encoder']:,}, "
          f"fusion {parts['fusion']:,})")
    print(f"forward+backward, batch {args.batch_size} at 64 px, {args.threads} thread(s), median of {args.reps}: "
          f"UrbanCross {ms['urbancross_tiny_step_ms']:.0f} ms, CMPAGL {ms['cmpagl_tiny_step_ms']:.0f} ms "
          f"(without ITM {ms['cmpagl_tiny_no_itm_step_ms']:.0f} ms)")
    print(f"ITM re-scoring: {len(pairs)} pairs in {itm_ms:.0f} ms ({1000 * len(pairs) / itm_ms:.0f} pairs/s)")
    print(json.dumps({**params, **{k: round(v, 1) for k, v in ms.items()},
                      "step_ratio_cmpagl_to_urbancross": round(ms["cmpagl_tiny_step_ms"] / ms["urbancross_tiny_step_ms"], 2),
                      "itm_pairs_per_s": round(1000 * len(pairs) / itm_ms), "batch_size": args.batch_size,
                      "threads": args.threads}))


if __name__ == "__main__":
    main()
