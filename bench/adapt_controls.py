"""Does UrbanCross's weighted adversarial adaptation beat plain fine-tuning? Controls over seeds.

    python bench/adapt_controls.py --out runs/adapt_controls --seeds 0 1 2 [--sources Finland,Germany] [--set KEY=VALUE ...]

Fast single-process loops (no Ray), so that several variants fit in minutes: per seed, trains
one source model on `--sources` (plain PyTorch, the library's model and loss), then adapts a
copy of it to `data.target_domain` with `AdaptObjective` -- the exact stage-2 module the Ray
loop runs, on the stages' learning-rate curves (warm-up + cosine to `train.lr` / `adapt.lr`) --
once per variant, and prints test mR per country as mean +- sd over the seeds,
with chance. The benchmark (synth.seed) is the same for every seed; the seed sets the model's
initialisation, the batch order and the augmentation. Rows:

- source only: the stage-1 model, not adapted;
- plain fine-tune (control): the same passes on the whole source batch, no adversarial term;
- UrbanCross (paper): the method with the config's defaults -- the most target-like share of
  each source batch kept, growing 20% -> 100% over the passes, retrieval on the kept rows, the
  adversarial term on image embeddings weighted per kept row by target-likeness;
- target captions as labels: the method plus retrieval on labelled target pairs (an upper bound
  the paper's unlabelled setting does not have).

The last column, the discriminator's accuracy in the last pass (0.5 = the encoders fool it),
tells a weak adversary from a useless alignment. The last line is JSON.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from ablations import chance_mr  # bench/ is the script's folder
from urbancross.config import load_config
from urbancross.data.ingest import pick_caption, read_split
from urbancross.demo import DEMO_CONFIG
from urbancross.evaluate.scoring import domain_metrics
from urbancross.loss import retrieval_loss
from urbancross.model.embed import embed_table, numpy_batches
from urbancross.model.factory import create_model
from urbancross.model.inputs import ModelInputs
from urbancross.train.adversarial import AdaptObjective, AdaptSchedule
from urbancross.train.lr_schedule import lr_factor

VARIANTS = {
    "plain fine-tune (control)": ["adapt.max_weight=0", "adapt.select_fraction=1.0", "adapt.curriculum=false", "adapt.weight_floor=1.0"],
    "UrbanCross (paper)": [],
    "target captions as labels": ["adapt.use_target_captions=true"],
}


def batches(cfg, table: pa.Table, epoch: int, seed: int):
    """Shuffled, augmented batches of one caption per image (what ModelInputs gives Ray Data)."""
    inputs = ModelInputs(cfg, train=True)
    order = np.random.default_rng(seed + epoch).permutation(table.num_rows)
    for rows in numpy_batches(table.take(order), cfg.train.batch_size):
        x = inputs(rows)
        yield {"images": torch.as_tensor(x["images"]), "tokens": pick_caption(torch.as_tensor(x["tokens"]), x["key"], epoch, cfg.seed)}


def train_source(cfg, table: pa.Table):
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    total = cfg.train.epochs * math.ceil(table.num_rows / cfg.train.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total, cfg.train.lr_schedule))  # as the Ray loop
    for epoch in range(cfg.train.epochs):
        for b in batches(cfg, table, epoch, cfg.seed):
            loss, _ = retrieval_loss(model(b["images"], b["tokens"]), cfg.loss)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
            sched.step()
    return model


def adapt(cfg, model, source: pa.Table, target: pa.Table):
    """Stage 2 as `adapt_loop_per_worker` runs it: one source and one target batch per step.

    Returns the adapted model and the discriminator's mean accuracy over the last pass.
    """
    a = cfg.adapt
    torch.manual_seed(cfg.seed)
    module = AdaptObjective(copy.deepcopy(model), cfg.loss, a)
    opt = torch.optim.AdamW([{"params": module.model.parameters(), "lr": a.lr}, {"params": module.disc.parameters(), "lr": a.disc_lr}],
                            weight_decay=cfg.train.weight_decay)
    schedule = AdaptSchedule(a, steps_per_epoch=math.ceil(source.num_rows / cfg.train.batch_size))
    total = a.epochs * schedule.steps_per_epoch  # the model's lr follows adapt.lr_schedule, the discriminator's is constant
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda step: lr_factor(step, total, a.lr_schedule), lambda step: 1.0])
    step = 0
    for epoch in range(a.epochs):
        accuracy = []
        share = schedule.share(epoch)
        targets = (b for k in itertools.count() for b in batches(cfg, target, 1000 * (epoch + 1) + k, cfg.seed + 1))
        for i, src in enumerate(batches(cfg, source, epoch, cfg.seed)):
            loss, logs = module(src, next(targets), schedule.weight(epoch, i), share, schedule.phase(step))
            accuracy.append(float(logs["disc_acc"]))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.train.grad_clip)
            opt.step()
            sched.step()
            step += 1
    return module.model, float(np.mean(accuracy))


def test_mr(cfg, model, test: pa.Table) -> dict[str, float]:
    return {r["tested_on"]: r["mR"] for r in domain_metrics(embed_table(model.eval(), test, cfg), cfg.evaluate)}


def arguments(doc: str, out: str) -> argparse.ArgumentParser:
    """The options this script shares with bench/domain_gap.py: the benchmark and the source model."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=out)
    ap.add_argument("--sources", default="Finland", help="comma-separated source countries")
    ap.add_argument("--images-per-domain", type=int, default=300)
    ap.add_argument("--test-fraction", type=float, default=0.5)
    ap.add_argument("--set", action="append", default=["train.epochs=40", "train.batch_size=32", "adapt.epochs=10"],
                    dest="overrides", metavar="KEY=VALUE", help="config overrides on urbancross/demo.yaml (after the defaults shown)")
    return ap


def benchmark(args):
    """The config of `arguments`, its benchmark synthesized under `--out` unless already there."""
    from urbancross.data.synth import synthesize

    manifest = Path(args.out).resolve() / "benchmark"
    cfg = load_config(DEMO_CONFIG, [*args.overrides, f"data.manifest={manifest}", f"synth.images_per_domain={args.images_per_domain}",
                                    f"synth.test_fraction={args.test_fraction}"])
    if not manifest.exists():
        synthesize(cfg.synth, str(manifest))
    return cfg


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def main() -> None:
    ap = arguments(__doc__, "runs/adapt_controls")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (config `seed`); mean +- sd over them")
    args = ap.parse_args()

    base = benchmark(args)
    manifest = base.data.manifest
    source = pa.concat_tables([read_split(base, "train", d) for d in args.sources.split(",")])
    target = read_split(base, "train", base.data.target_domain)
    test = read_split(base, "test")
    names = ["source only", *VARIANTS]
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    accuracy: dict[str, list[float]] = {n: [] for n in VARIANTS}
    for seed in args.seeds:
        cfg0 = base.override({"seed": seed})
        model = train_source(cfg0, source)
        runs["source only"].append(test_mr(cfg0, model, test))
        print(f"seed {seed} source only: {runs['source only'][-1]}", flush=True)
        for name, overrides in VARIANTS.items():
            cfg = load_config(DEMO_CONFIG, [*args.overrides, *overrides, f"data.manifest={manifest}", f"seed={seed}"])
            adapted, acc = adapt(cfg, model, source, target)
            runs[name].append(test_mr(cfg, adapted, test))
            accuracy[name].append(acc)
            print(f"seed {seed} {name}: {runs[name][-1]}, discriminator accuracy {acc:.2f}", flush=True)
    domains = sorted(runs["source only"][0])
    images = test.num_rows // len(domains)
    chance = chance_mr(images)
    summary = {n: {d: mean_sd([r[d] for r in runs[n]]) for d in domains} for n in names}
    print(f"\nsources {args.sources} -> target {base.data.target_domain}; {images} test images per country "
          f"(chance mR {chance:.2f}); seeds {args.seeds}; test mR, mean +- sd over seeds")
    print("| model | " + " | ".join(domains) + " | discriminator accuracy, last pass |")
    print("|---" * (len(domains) + 2) + "|")
    for n in names:
        acc = "-" if n not in accuracy else "%.2f +- %.2f" % mean_sd(accuracy[n])
        print(f"| {n} | " + " | ".join("%.2f +- %.2f" % summary[n][d] for d in domains) + f" | {acc} |")
    print("| chance | " + " | ".join(f"{chance:.2f}" for _ in domains) + " | 0.50 |")
    print(json.dumps({"sources": args.sources, "target": base.data.target_domain, "seeds": args.seeds, "chance_mR": chance,
                      "test_images_per_domain": images, "runs": runs, "disc_acc": accuracy,
                      "mean_sd": {n: {d: list(v) for d, v in summary[n].items()} for n in names}}))


if __name__ == "__main__":
    main()
