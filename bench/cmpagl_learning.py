"""Does the tiny CMPAGL learn the benchmark, and what do its retrieval stages add? (pre-integration check)

A plain single-process loop (no Ray, no curriculum, no augmentation; the same for every
method): train on Finland's train tiles for `--epochs`, one random caption per tile per epoch,
AdamW, then rank Finland's test gallery (50 tiles, 250 captions). Methods: `cmpagl` (Gswin),
`swin` (CMPAGL with the global-local cross-attention off: plain Swin), `clip` (the UrbanCross
tiny CLIP, InfoNCE, the control). Per run one JSON line with each stage's mR (`prealign`,
`prealign_smr`, and for CMPAGL `itm` (top-k re-scored by the matching head) and `itm_smr`);
then mean +- sd over seeds and chance. Settings are fixed in advance, not chosen on test.
Replace with `urbancross demo --method cmpagl` once the family is integrated.

    .venv/bin/python bench/cmpagl_learning.py [--seeds 0 1 2] [--epochs 30] [--methods cmpagl swin clip]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import time

import numpy as np
import torch
from PIL import Image

from urbancross.config import LossConfig, ModelConfig, SMRConfig, SynthConfig
from urbancross.data import synth
from urbancross.evaluate.rerank import rerank_stages, stage_metrics
from urbancross.evaluate.smr import smr_rerank
from urbancross.loss import cmpagl_loss, retrieval_loss
from urbancross.model import build_cmpagl, create_model, get_tokenizer

LR = {"clip": 1e-3, "cmpagl": 3e-4, "swin": 3e-4}  # clip: the demo's; cmpagl: see tests/test_cmpagl.py
CMPAGL_LOSS = LossConfig(kind="triplet", pre_align_weight=1.0)  # the contrastive pre-alignment as the main term
RERANK_K = 10


def pixels(row) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"), np.float32)).permute(2, 0, 1) / 127.5 - 1


def run(method: str, seed: int, epochs: int, train, test) -> dict:
    torch.manual_seed(seed)
    if method == "clip":
        cfg = ModelConfig(use_segments=False)
        model, tok = create_model(cfg), get_tokenizer(cfg)
    else:
        model = build_cmpagl("tiny", global_local=method == "cmpagl")
        tok = model.tokenizer
    images = torch.stack([pixels(r) for r in train])
    captions = torch.stack([tok(r["captions"]) for r in train])  # [N,5,L]
    opt = torch.optim.AdamW(model.parameters(), lr=LR[method], weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        order, pick = torch.randperm(len(train), generator=g), torch.randint(0, 5, (len(train),), generator=g)
        for start in range(0, len(train) - 1, 16):
            idx = order[start : start + 16]
            out = model(images[idx], captions[idx, pick[idx]])
            loss = retrieval_loss(out, LossConfig())[0] if method == "clip" else cmpagl_loss(out, CMPAGL_LOSS)[0]
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    train_s = time.perf_counter() - t0
    model.eval()
    texts = tok([c for r in test for c in r["captions"]])
    owner = [i for i, r in enumerate(test) for _ in r["captions"]]
    gallery = torch.stack([pixels(r) for r in test])
    with torch.no_grad():
        if method == "clip":
            sim = model.encode_image(gallery) @ model.encode_text(texts).T
            stages = {"prealign": sim, "prealign_smr": smr_rerank(sim, SMRConfig())}
        else:
            image, image_tokens = model.image_features(gallery)
            sim = image @ model.encode_text(texts).T
            stages = rerank_stages(sim, model.pair_scorer(image_tokens, texts), k=RERANK_K, smr=SMRConfig())
    mr = {name: round(m["mR"], 2) for name, m in stage_metrics(stages, owner).items()}
    return {"method": method, "seed": seed, "epochs": epochs, "train_s": round(train_s), "mR": mr}


def chance_mr(n_images: int, per_image: int) -> float:
    """Expected mR of a random ranking: i2t hit if any of `per_image` captions is in the top K."""
    n_texts = n_images * per_image
    out = []
    for k in (1, 5, 10):
        out.append(1 - math.comb(n_texts - per_image, k) / math.comb(n_texts, k))
        out.append(k / n_images)
    return 100 * sum(out) / len(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--methods", nargs="+", default=["cmpagl", "swin", "clip"], choices=["cmpagl", "swin", "clip"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = synth.domain_rows(SynthConfig(images_per_domain=200), "Finland")
    train, test = [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "test"]
    results = []
    for seed in args.seeds:
        for method in args.methods:
            results.append(run(method, seed, args.epochs, train, test))
            print(json.dumps(results[-1]), flush=True)
    summary = {}
    for method in args.methods:
        runs = [r["mR"] for r in results if r["method"] == method]
        summary[method] = {stage: f"{statistics.mean(v):.1f} +- {statistics.stdev(v) if len(v) > 1 else 0:.1f}"
                           for stage in runs[0] for v in [[r[stage] for r in runs]]}
    print(json.dumps({"chance_mR": round(chance_mr(len(test), 5), 1), "n_seeds": len(args.seeds), **summary}))


if __name__ == "__main__":
    main()
