"""The automatic generator's settings for the embedded SAM: mask recall, masks per tile and time per tile.

    python bench/sam_settings.py [--checkpoint embedded] [--config urbancross/assets/sam-tiny.yaml]

For each (points_per_side, pred_iou_thresh, stability_score_thresh) in a small grid, the
`SamAutomaticMaskGenerator` runs on the held-out web tiles and the benchmark's val tiles that
`urbancross pretrain-sam` scores (`sam_pretrain.evaluate`); recall is the share of the
generator's objects matched at IoU >= 0.5. Times are ratios to the repo's default settings,
measured in this run. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

from urbancross.config import load_config
from urbancross.preprocess import sam_pretrain as P
from urbancross.preprocess.sam import load_sam, resolve_checkpoint

GRID = [(4, 0.5, 0.6), (4, 0.4, 0.5), (4, 0.6, 0.7), (8, 0.5, 0.6), (8, 0.6, 0.7), (8, 0.7, 0.8)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="urbancross/assets/sam-tiny.yaml")
    ap.add_argument("--checkpoint", default="embedded")
    args = ap.parse_args()
    cfg = load_config(args.config, [f"preprocess.sam.checkpoint={args.checkpoint}"])
    torch.set_num_threads(cfg.sam_pretrain.threads)
    sam = load_sam("tiny", resolve_checkpoint(cfg))
    p = cfg.sam_pretrain
    tiles = {"web": [P.web_tile(p.seed, P.HELD_OUT_STREAM, i, p.image_size) for i in range(p.eval_tiles)],
             "val": P.val_tiles(cfg.synth, cfg.synth.image_size)}
    rows = []
    for pps, iou, stab in GRID:
        s = replace(cfg.preprocess.sam, points_per_side=pps, pred_iou_thresh=iou, stability_score_thresh=stab)
        row = {"points_per_side": pps, "pred_iou_thresh": iou, "stability_score_thresh": stab}
        for name, t in tiles.items():
            t0 = time.perf_counter()
            r = P.mask_recall(sam, t, s)
            row |= {f"{name}_recall": round(r["recall"], 3), f"{name}_masks_per_tile": round(r["masks_per_tile"], 2),
                    f"{name}_s_per_tile": (time.perf_counter() - t0) / len(t)}
        rows.append(row)
        print(row, flush=True)
    base = rows[0]["val_s_per_tile"]
    for r in rows:
        r["val_time_ratio"] = round(r.pop("val_s_per_tile") / base, 2)
        r.pop("web_s_per_tile")
    print(json.dumps({"settings": rows, "web_objects": sum(len(m) for _, m in tiles["web"]),
                      "val_objects": sum(len(m) for _, m in tiles["val"])}))


if __name__ == "__main__":
    main()
