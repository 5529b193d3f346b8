"""In-domain mR on the embedded benchmark from the packaged pretrained tiny CLIP against random init, same seed.

    python bench/pretrain_gain.py --out runs/pretrain_gain [--pretrained-lr 2e-4] [--set train.epochs=20 ...]

Synthesizes the demo's benchmark (urbancross/demo.yaml), then trains the demo's model on the source
country's train split twice, from random init (the demo's lr) and from `model.pretrained: embedded`
(--pretrained-lr), each chosen on the source's val split, and scores both on the source's test split
(only reported, never used to choose). Also the packaged model zero-shot on that test split. Prints
mR, chance and the ratios to chance; JSON last line.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ablations import chance_mr  # bench/ is the script's folder
from urbancross.config import load_config
from urbancross.data.manifest import filter_rows, is_manifest, read_manifest
from urbancross.data.synth import synthesize
from urbancross.demo import DEMO_CONFIG
from urbancross.pretrain import score
from urbancross.train import run_train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/pretrain_gain")
    ap.add_argument("--pretrained-lr", type=float, default=2e-4, help="peak lr when fine-tuning the pretrained towers")
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    out = Path(args.out).resolve()
    manifest = str(out / "benchmark")
    base = load_config(DEMO_CONFIG, args.overrides).override({"data.manifest": manifest, "model.use_segments": False})
    if not is_manifest(manifest):
        synthesize(base.synth, manifest)
    source = base.data.source_domain
    test = filter_rows(read_manifest(manifest), split=base.data.test_split, domain=source)
    chance = chance_mr(test.num_rows)
    found = {"domain": source, "test_images": test.num_rows, "chance_mR": round(chance, 2), "pretrained_lr": args.pretrained_lr}
    found["zero_shot_mR"] = score(base, "embedded", test)["mR"]
    for name, pretrained, lr in (("random_init", "", base.train.lr), ("pretrained", "embedded", args.pretrained_lr)):
        cfg = base.override({"out_dir": str(out / name), "model.pretrained": pretrained, "train.lr": lr})
        found[f"{name}_mR"] = score(cfg, run_train(cfg)["model_path"], test)["mR"]
    for key in ("zero_shot_mR", "random_init_mR", "pretrained_mR"):
        print(f"{source} test, {key}: {found[key]:.2f} ({found[key] / chance:.2f}x chance {chance:.2f})")
    print(json.dumps(found))


if __name__ == "__main__":
    main()
