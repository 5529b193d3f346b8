"""Ablations on the embedded benchmark, one run, same seed: the demo vs segments on vs curriculum off.

    python bench/ablations.py --out runs/ablations [--set train.epochs=15 ...]

Each variant is `urbancross demo` (urbancross/demo.yaml: train on the source domain, adapt to
the target, evaluate on every domain) sharing one synthesized + preprocessed manifest. Prints, per variant, mR
in-domain, on the target before and after adaptation (and with SMR), and chance level.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

from urbancross.config import load_config
from urbancross.demo import DEMO_CONFIG, run_demo

VARIANTS = {
    "demo": [],  # segments off, curriculum on (demo.yaml)
    "segments_on": ["model.use_segments=true"],
    "curriculum_off": ["train.curriculum.enabled=false"],
}


def chance_mr(images: int, ks=(1, 5, 10)) -> float:
    """mR of a random ranking over `images` images with 5 captions each (both directions)."""
    t2i = [min(k, images) / images for k in ks]
    i2t = [1 - math.comb(5 * images - 5, k) / math.comb(5 * images, k) for k in ks]
    return 100 * (sum(t2i) + sum(i2t)) / 6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/ablations")
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")  # the demo's progress

    out = Path(args.out).resolve()
    base = load_config(DEMO_CONFIG, args.overrides)
    rows = []
    for name in args.variants.split(","):
        # one benchmark and one preprocessing for all: later variants find every row done
        cfg = load_config(DEMO_CONFIG, [*args.overrides, *VARIANTS[name]]).override({
            "out_dir": str(out / name),
            "data.manifest": "" if not rows else str(out / rows[0]["variant"] / "benchmark"),
            "preprocess.output": str(out / "preprocessed"),
        }, where=name)
        records = run_demo(cfg)
        by = {(r["model"], r["tested_on"]): r for r in records}
        src, tgt = base.data.source_domain, base.data.target_domain
        rows.append({
            "variant": name,
            "in_domain": by[("source", src)]["mR"],
            "target_source_only": by[("source", tgt)]["mR"],
            "target_adapted": by[("adapted", tgt)]["mR"],
            "target_adapted_smr": by[("adapted", tgt)].get("smr", {}).get("mR"),
            "chance": chance_mr(by[("source", tgt)]["images"]),
        })
    print(json.dumps(rows, indent=2))
    print("| variant | mR in-domain | mR target, source-only | mR target, adapted | adapted + SMR | chance |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['in_domain']:.2f} | {r['target_source_only']:.2f} | {r['target_adapted']:.2f} | "
              f"{(r['target_adapted_smr'] or float('nan')):.2f} | {r['chance']:.2f} |")


if __name__ == "__main__":
    main()
