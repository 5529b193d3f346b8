"""Does UrbanCross's weighted adversarial adaptation beat plain fine-tuning? Controls over seeds.

    python bench/adapt_controls.py --out runs/adapt_controls --seeds 0 1 2 [--sources Finland,Germany] [--set KEY=VALUE ...]

Fast single-process loops (bench/loops.py: the Ray loops' cache, batches, curriculum,
objectives and lr curves, no Ray), so that several variants fit in minutes: per seed, trains
one source model on `--sources`, then adapts a copy of it to `data.target_domain` with
`AdaptObjective` -- the exact stage-2 module the Ray loop runs -- once per variant (each
stage's last epoch: no model choice on val here; bench/evidence.py chooses on val), and
prints test mR per country as mean +- sd over the seeds, with chance. The benchmark (synth.seed) is the same for every seed; the seed sets the model's
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
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from ablations import chance_mr  # bench/ is the script's folder
from loops import adapt, test_mr, train_source
from urbancross.config import load_config
from urbancross.data.ingest import read_split
from urbancross.demo import DEMO_CONFIG

VARIANTS = {
    "plain fine-tune (control)": ["adapt.max_weight=0", "adapt.select_fraction=1.0", "adapt.curriculum=false", "adapt.weight_floor=1.0"],
    "UrbanCross (paper)": [],
    "target captions as labels": ["adapt.use_target_captions=true"],
}


def arguments(doc: str, out: str) -> argparse.ArgumentParser:
    """The options this script shares with bench/domain_gap.py: the benchmark and the source model."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=out)
    ap.add_argument("--sources", default="Finland", help="comma-separated source countries")
    ap.add_argument("--images-per-domain", type=int, default=300)
    ap.add_argument("--test-fraction", type=float, default=0.5)
    ap.add_argument("--set", action="append", default=["train.epochs=40", "train.batch_size=32", "adapt.epochs=10", "train.num_workers=1"],
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
        model, _ = train_source(cfg0, source)
        runs["source only"].append(test_mr(cfg0, model, test))
        print(f"seed {seed} source only: {runs['source only'][-1]}", flush=True)
        for name, overrides in VARIANTS.items():
            cfg = load_config(DEMO_CONFIG, [*args.overrides, *overrides, f"data.manifest={manifest}", f"seed={seed}"])
            adapted, info = adapt(cfg, model, source, target)
            acc = info["disc_acc"]
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
