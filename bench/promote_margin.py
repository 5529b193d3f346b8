"""Run-to-run spread of the promotion gate's metric: what `promote.margin` has to exceed.

    python bench/promote_margin.py --out runs/promote_margin [--seeds 0,1,2] [--split val] [--set train.epochs=10 ...]

Trains stage 1 of the demo config (urbancross/demo.yaml, in-process Ray Train, as `urbancross
train`) once per seed on one synthesized benchmark (with a val split), then scores each model
as `promote` does: mR per domain of `--split`, averaged over the domains. Two runs of the same
config differ only by their seed, so the gate must not prefer one to the other: a same-config
candidate beats its champion by a gain ~ N(0, sd·√2), and a margin of 2·sd·√2 lets it through
about 2% of the time. Prints per-seed scores, mean ± sd, chance, and that margin beside the
configured one; the last line is JSON. Finished seeds are reused when the command is re-run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import statistics
from pathlib import Path

from ablations import chance_mr  # bench/ is sys.path[0] when run as a script
from urbancross.config import load_config
from urbancross.data.manifest import read_manifest
from urbancross.data.synth import synthesize
from urbancross.demo import DEMO_CONFIG
from urbancross.evaluate.scoring import evaluate_model
from urbancross.model.factory import create_model
from urbancross.registry.promote import scores_of
from urbancross.train import run_train

Z = 2.0  # one-sided: P(gain >= Z·sd_diff) ≈ 2.3% for two runs of one config


def gate_scores(cfg, split: str) -> dict[str, float]:
    """Stage 1 for cfg.seed (reused if done), then {domain: mR} on `split`, as the gate computes it."""
    result = Path(cfg.out_dir) / "train" / "result.json"
    path = json.loads(result.read_text())["model_path"] if result.exists() else run_train(cfg)["model_path"]
    model = create_model(cfg.model, pretrained=path).eval()
    return scores_of(evaluate_model(model, cfg, cfg.data.manifest, split))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/promote_margin")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (>= 3 for a spread)")
    ap.add_argument("--split", default="val", help="the split the gate evaluates on")
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out).resolve()

    base = load_config(DEMO_CONFIG, ["synth.val_fraction=0.2", "train.num_workers=0", *args.overrides])
    manifest = out / "benchmark"
    if not manifest.exists():
        synthesize(base.synth, str(manifest))
    rows = []
    for seed in seeds:
        cfg = base.override({"seed": seed, "out_dir": str(out / f"seed{seed}"), "data.manifest": str(manifest)}, where=f"seed {seed}")
        scores = gate_scores(cfg, args.split)
        rows.append({"seed": seed, "mR": scores, "gate_mR": sum(scores.values()) / len(scores)})
        log_row = ", ".join(f"{d} {v:.2f}" for d, v in sorted(scores.items()))
        print(f"seed {seed}: gate mR {rows[-1]['gate_mR']:.2f} ({log_row})", flush=True)

    gate = [r["gate_mR"] for r in rows]
    sd = statistics.stdev(gate) if len(gate) > 1 else float("nan")
    split_images = read_manifest(str(manifest), columns=["split", "domain"]).to_pylist()
    per_domain = [sum(1 for r in split_images if r["split"] == args.split and r["domain"] == d) for d in rows[0]["mR"]]
    summary = {
        "seeds": seeds,
        "split": args.split,
        "epochs": base.train.epochs,
        "per_seed": rows,
        "gate_mR_mean": statistics.fmean(gate),
        "gate_mR_sd": sd,
        "chance_mR": statistics.fmean(chance_mr(n) for n in per_domain),
        "sd_of_difference": sd * math.sqrt(2),
        "max_pairwise_difference": max((abs(a - b) for a, b in itertools.combinations(gate, 2)), default=float("nan")),
        "suggested_margin": Z * sd * math.sqrt(2),
        "per_domain_sd": {d: statistics.stdev(r["mR"][d] for r in rows) if len(rows) > 1 else float("nan") for d in rows[0]["mR"]},
        "configured_margin": base.promote.margin,
    }
    summary["configured_margin_over_sd_of_difference"] = summary["configured_margin"] / summary["sd_of_difference"]
    print(f"gate mR {summary['gate_mR_mean']:.2f} ± {sd:.2f} (sd over {len(seeds)} seeds), chance {summary['chance_mR']:.2f}")
    print(f"two runs of one config differ by sd {summary['sd_of_difference']:.2f} (largest seen "
          f"{summary['max_pairwise_difference']:.2f}); margin {Z:g}·sd·√2 = {summary['suggested_margin']:.2f}, "
          f"configured {summary['configured_margin']:g}")
    print(json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    main()
