"""Peak memory of `urbancross data import` against the size of the release.

Generates precomp releases (RSICD layout: one file name per image, five captions each) of
N random-noise PNG tiles (about 12 KB each at 64 px, so 20,000 images weigh 240 MB),
imports each in a fresh child process and prints the child's peak RSS. A streaming import
keeps the peak flat as N grows; one that builds the manifest in memory grows with it.
Optionally adds one caption line of `--long-caption-mb` megabytes (the cap at import keeps it
from costing memory).

    python bench/import_bench.py --images 5000 20000 --work /tmp/import_bench

Last line: one JSON object {"runs": [{"images", "release_mb", "peak_rss_mb", "seconds"}...],
"peak_ratio_largest_to_smallest"}. Timings are of this machine under whatever load it has.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image

# The child reads its own high-water mark (VmHWM, this process only): ru_maxrss would also count
# the parent's RSS at fork, since Linux keeps it across execve.
CHILD = """
import json, sys, time
from urbancross.data.importers import import_dataset
t = time.perf_counter()
report = import_dataset("precomp", sys.argv[1], sys.argv[2])
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"images": report["images"], "anomalies": report.get("num_anomalies", 0),
                  "seconds": time.perf_counter() - t, "peak_rss_mb": hwm / 1024}))
"""


def make_release(root: str, n: int, size: int = 64, distinct: int = 256, long_caption_mb: float = 0.0) -> int:
    """A precomp release of `n` noise tiles (cycling through `distinct` encodings); returns its bytes."""
    rng = np.random.default_rng(0)
    tiles = []
    for _ in range(distinct):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        tiles.append(buf.getvalue())
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    total = 0
    with (
        open(os.path.join(root, "train_filename.txt"), "w") as names,
        open(os.path.join(root, "train_caps.txt"), "w") as caps,
    ):
        for i in range(n):
            name = f"scene_{i}.png"
            data = tiles[i % distinct]
            with open(os.path.join(root, "images", name), "wb") as f:
                f.write(data)
            total += len(data)
            names.write(name + "\n")
            for k in range(5):
                if i == 0 and k == 0 and long_caption_mb:
                    caps.write("a" * int(long_caption_mb * 2**20) + "\n")
                else:
                    caps.write(f"caption {k} of tile {i} with a few ordinary words .\n")
    return total


def run(work: str, n: int, long_caption_mb: float) -> dict:
    root, out = os.path.join(work, f"release_{n}"), os.path.join(work, f"manifest_{n}")
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    weight = make_release(root, n, long_caption_mb=long_caption_mb)
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.run([sys.executable, "-c", CHILD, root, out], capture_output=True, text=True, env=env)
    if child.returncode:
        raise SystemExit(child.stderr[-2000:])
    result = json.loads(child.stdout.strip().splitlines()[-1])
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return {"images": n, "release_mb": round(weight / 2**20, 1), **{k: round(v, 1) for k, v in result.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, nargs="+", default=[5000, 20000])
    ap.add_argument("--work", default="/tmp/import_bench")
    ap.add_argument("--long-caption-mb", type=float, default=0.0)
    args = ap.parse_args()
    runs = []
    for n in args.images:
        runs.append(run(args.work, n, args.long_caption_mb))
        print(runs[-1], flush=True)
    ratio = runs[-1]["peak_rss_mb"] / runs[0]["peak_rss_mb"]
    print(json.dumps({"runs": runs, "peak_ratio_largest_to_smallest": round(ratio, 2)}))


if __name__ == "__main__":
    main()
