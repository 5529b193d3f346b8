"""CMPAGL against the UrbanCross family, and CMPAGL's ablations, in and across domains.

A plain single-process loop (no Ray, no curriculum, no augmentation; the same for every
method): train on Finland's train tiles for `--epochs`, one random caption per tile per epoch,
AdamW, then rank the test gallery of Finland (in-domain) and of Spain (cross-domain), 40
tiles / 200 captions each. Methods:
- `cmpagl`: Gswin + BERT + fusion/ITM, triplet + intra-class (scene labels) + pre-alignment + ITM;
- `swin`: the Gswin's global-local cross-attention off (plain Swin);
- `vit`: a plain ViT image encoder of similar size (4 layers x 128, patch 8; 0.83M vs 0.75M);
- `no_prealign`: the pre-alignment InfoNCE off (weight 0);
- `no_intra`: the intra-class term off (weight 0);
- `clip`: the UrbanCross family's tiny CLIP, InfoNCE (the control).
Matching-head re-scoring and SMR on/off are the retrieval stages of every CMPAGL run:
`prealign` (neither), `prealign_smr` (SMR only), `itm` (top-k re-scored), `itm_smr` (both).
One JSON line per run, then mean +- sd over seeds and chance. Settings are fixed in advance,
not chosen on test. The numbers are deterministic per seed (CPU), load only changes time.

    .venv/bin/python bench/cmpagl_learning.py [--seeds 0 1 2] [--epochs 30] [--methods ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import statistics
import time

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import ViTConfig, ViTModel

from urbancross.config import LossConfig, ModelConfig, SMRConfig, SynthConfig
from urbancross.data import synth
from urbancross.data.ingest import label_id
from urbancross.evaluate.rerank import rerank_stages, stage_metrics
from urbancross.evaluate.smr import smr_rerank
from urbancross.loss import cmpagl_loss, retrieval_loss
from urbancross.model import build_cmpagl, create_model, get_tokenizer
from urbancross.model.cmpagl import CMPAGLModel
from urbancross.model.gswin import GswinOutput

CMPAGL_LOSS = LossConfig(kind="triplet", pre_align_weight=1.0)  # the contrastive pre-alignment as the main term
METHODS = {  # name -> (image encoder, loss)
    "cmpagl": ("gswin", CMPAGL_LOSS),
    "swin": ("swin", CMPAGL_LOSS),
    "vit": ("vit", CMPAGL_LOSS),
    "no_prealign": ("gswin", dataclasses.replace(CMPAGL_LOSS, pre_align_weight=0.0)),
    "no_intra": ("gswin", dataclasses.replace(CMPAGL_LOSS, intra_class_weight=0.0)),
    "clip": ("clip", LossConfig()),
}
LR = {"clip": 1e-3}  # clip: the demo's; every CMPAGL variant 3e-4 (see tests/test_cmpagl.py)
RERANK_K = 10


class ViTEncoder(nn.Module):
    """A plain ViT (`transformers.ViTModel`) with the Gswin's output surface: the Gswin ablation."""

    def __init__(self, width: int = 128, layers: int = 4, heads: int = 4, patch: int = 8, image_size: int = 64):
        super().__init__()
        self.vit = ViTModel(ViTConfig(image_size=image_size, patch_size=patch, hidden_size=width, num_hidden_layers=layers,
                                      num_attention_heads=heads, intermediate_size=4 * width), add_pooling_layer=False)
        self.width = self.pooled_width = width

    def forward(self, images: torch.Tensor) -> GswinOutput:
        h = self.vit(pixel_values=images).last_hidden_state
        return GswinOutput(tokens=h[:, 1:], pooled=h[:, 0])


def build(method: str) -> CMPAGLModel:
    image = METHODS[method][0]
    model = build_cmpagl("tiny", global_local=image == "gswin")
    if image == "vit":
        model = CMPAGLModel(model.cfg, ViTEncoder(), model.text_encoder, model.tokenizer)
    return model


def pixels(row) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"), np.float32)).permute(2, 0, 1) / 127.5 - 1


def run(method: str, seed: int, epochs: int, train, tests: dict) -> dict:
    torch.manual_seed(seed)
    if method == "clip":
        cfg = ModelConfig(use_segments=False)
        model, tok = create_model(cfg), get_tokenizer(cfg)
    else:
        model = build(method)
        tok = model.tokenizer
    labels = torch.tensor([label_id(r.get("label")) for r in train])
    images = torch.stack([pixels(r) for r in train])
    captions = torch.stack([tok(r["captions"]) for r in train])  # [N,5,L]
    opt = torch.optim.AdamW(model.parameters(), lr=LR.get(method, 3e-4), weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        order, pick = torch.randperm(len(train), generator=g), torch.randint(0, 5, (len(train),), generator=g)
        for start in range(0, len(train) - 1, 16):
            idx = order[start : start + 16]
            out = model(images[idx], captions[idx, pick[idx]])
            loss_cfg = METHODS[method][1]
            loss = retrieval_loss(out, loss_cfg)[0] if method == "clip" else cmpagl_loss(out, loss_cfg, labels=labels[idx])[0]
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    train_s = time.perf_counter() - t0
    model.eval()
    mr = {domain: evaluate(model, tok, method, test) for domain, test in tests.items()}
    return {"method": method, "seed": seed, "epochs": epochs, "train_s": round(train_s), "mR": mr}


def evaluate(model, tok, method: str, test) -> dict:
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
    return {name: round(m["mR"], 2) for name, m in stage_metrics(stages, owner).items()}


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
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = {d: synth.domain_rows(SynthConfig(images_per_domain=200), d) for d in ("Finland", "Spain")}
    train = [r for r in rows["Finland"] if r["split"] == "train"]
    tests = {d: [r for r in rs if r["split"] == "test"] for d, rs in rows.items()}
    results = []
    for seed in args.seeds:
        for method in args.methods:
            results.append(run(method, seed, args.epochs, train, tests))
            print(json.dumps(results[-1]), flush=True)
    summary = {}
    for method in args.methods:
        runs = [r["mR"] for r in results if r["method"] == method]
        summary[method] = {
            domain: {stage: f"{statistics.mean(v):.1f} +- {statistics.stdev(v) if len(v) > 1 else 0:.1f}"
                     for stage in runs[0][domain] for v in [[r[domain][stage] for r in runs]]}
            for domain in tests
        }
    chance = {d: round(chance_mr(len(t), 5), 1) for d, t in tests.items()}
    print(json.dumps({"chance_mR": chance, "n_seeds": len(args.seeds), "train_on": "Finland", **summary}))


if __name__ == "__main__":
    main()
