"""Import real precomp releases' file lists with generated stand-in images.

The public RSICD / RSITMD / UCM / Sydney caption files can be checked without their images:
for each folder given, this copies `{split}_caps.txt` and `{split}_filename.txt` (nothing
else) to a scratch folder, writes a tiny image in the listed format for every listed name,
imports it with the default settings (no --skip-bad) and prints images, captions and the
anomaly counts per kind. The caption files are not part of this repository; get them e.g.
from the UrbanCross reference repository (`data/rsicd_precomp`, `data/rsitmd_precomp`).

    python bench/real_releases.py /path/to/rsicd_precomp /path/to/rsitmd_precomp --work /tmp/real

Last line: one JSON object {release folder: summary or {"error": message}}.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil

from PIL import Image

SPLITS = ("train", "val", "test")


def stand_ins(src: str, dst: str) -> int:
    """Copy the split files of `src` to `dst` and write one 4x4 image per listed name; returns how many."""
    os.makedirs(os.path.join(dst, "images"), exist_ok=True)
    names: set[str] = set()
    for split in SPLITS:
        for kind in ("caps", "filename"):
            path = os.path.join(src, f"{split}_{kind}.txt")
            if os.path.isfile(path):
                shutil.copy(path, dst)
        listing = os.path.join(src, f"{split}_filename.txt")
        if os.path.isfile(listing):
            with open(listing, encoding="utf-8", errors="replace") as f:
                names.update(line.strip() for line in f if line.strip())
    for i, name in enumerate(sorted(names)):
        ext = name.lower().rsplit(".", 1)[-1]
        fmt = {"tif": "TIFF", "tiff": "TIFF", "png": "PNG"}.get(ext, "JPEG")
        buf = io.BytesIO()
        Image.new("RGB", (4, 4), (i % 256, (i // 256) % 256, 0)).save(buf, format=fmt)
        with open(os.path.join(dst, "images", os.path.basename(name)), "wb") as f:
            f.write(buf.getvalue())
    return len(names)


def main() -> None:
    import pyarrow.dataset as ds

    from urbancross.data.importers import import_dataset
    from urbancross.data.manifest import ManifestError

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("releases", nargs="+", help="precomp folders ({split}_caps.txt, {split}_filename.txt)")
    ap.add_argument("--work", default="/tmp/real_releases", help="scratch folder (emptied per release)")
    args = ap.parse_args()
    results = {}
    for src in args.releases:
        name = os.path.basename(os.path.normpath(src))
        root, out = os.path.join(args.work, name), os.path.join(args.work, name + "_manifest")
        for p in (root, out):
            shutil.rmtree(p, ignore_errors=True)
        listed = stand_ins(src, root)
        try:
            r = import_dataset("precomp", root, out)
        except ManifestError as e:
            results[src] = {"listed_names": listed, "error": str(e).replace(root, name)}
        else:
            results[src] = {
                "listed_names": listed,
                "images": r["images"],
                "captions": r["captions"],
                "per_split": {s: v["images"] for s, v in r["per_split"].items()},
                "labelled": None,
                "skipped": r["num_skipped"],
                "anomalies": {k: v["count"] for k, v in r.get("anomalies", {}).items()},
            }
            dataset = ds.dataset(out, format="parquet")
            if "label" in dataset.schema.names:
                labels = dataset.to_table(columns=["label"]).column("label")
                results[src]["labelled"] = len(labels) - labels.null_count
        print(src, json.dumps(results[src]), flush=True)
        for p in (root, out):
            shutil.rmtree(p, ignore_errors=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
