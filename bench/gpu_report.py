"""Collect what bench/gpu_check.sh measured into one JSON file: OUTDIR/gpu_check.json.

Reads OUTDIR/steps.jsonl (each step's start, wall time, exit status), OUTDIR/gpu_samples.csv
(nvidia-smi: the whole GPU's memory in use every 250 ms), the demo's timings.json and its
training runs' MLflow metrics, the realsize tests' JSON lines and train_bench's JSON last
line. A GPU memory peak is the highest sample inside a step's or stage's time window. Works
without a GPU too (the peaks are then null), so the plumbing can be checked on CPU.

    .venv/bin/python bench/gpu_report.py OUTDIR
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import datetime
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def gpu_samples(path: Path) -> list[tuple[float, float]]:
    """(Unix time, MiB in use) from `nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits`."""
    samples = []
    if not path.is_file():
        return samples
    for line in path.read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        try:
            stamp = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()  # local time, as time.time() is
            samples.append((stamp, float(parts[1])))
        except (ValueError, IndexError):
            continue  # a header or a line cut off when the sampler was stopped
    return samples


def peak(samples: list[tuple[float, float]], start: float, seconds: float) -> float | None:
    inside = [mib for t, mib in samples if start <= t <= start + seconds]
    return max(inside) if inside else None


def training_rates(out: Path, stage: str) -> dict | None:
    """Per-epoch step time and samples/s of a demo training stage, from its MLflow metrics."""
    result = out / stage / "result.json"
    if not result.is_file():
        return None
    from mlflow import MlflowClient

    from urbancross.config import load_config

    run_id = json.loads(result.read_text())["mlflow_run_id"]
    cfg = load_config(out / stage / "config.yaml")
    client = MlflowClient(cfg.tracking_uri())
    history = {
        key: [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
        for key in ("step", "samples", "epoch_seconds")
    }
    steps = [b - a for a, b in zip([0.0, *history["step"]], history["step"])]
    seconds = history["epoch_seconds"]
    epochs = [{"steps": int(n), "seconds": round(s, 3), "seconds_per_step": round(s / n, 4) if n else None} for n, s in zip(steps, seconds)]
    if history["samples"]:
        samples = [b - a for a, b in zip([0.0, *history["samples"]], history["samples"])]
        for e, n in zip(epochs, samples):
            e["samples_per_s"] = round(n / e["seconds"], 2) if e["seconds"] else None
    steady = epochs[1:] or epochs  # the first epoch carries start-up (DeepSpeed, CUDA, the first Ray Data pass)
    summary = {"epochs": epochs, "precision": cfg.train.precision, "use_gpu": cfg.train.use_gpu, "workers": cfg.train.num_workers,
               "batch_size_per_worker": cfg.train.batch_size}
    for key in ("seconds_per_step", "samples_per_s"):
        values = [e[key] for e in steady if e.get(key) is not None]
        if values:
            summary[f"median_{key}_after_epoch_1"] = round(statistics.median(values), 4)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir")
    out = Path(ap.parse_args().outdir)
    samples = gpu_samples(out / "gpu_samples.csv")
    steps = read_jsonl(out / "steps.jsonl")
    for s in steps:
        s["gpu_memory_peak_mib"] = peak(samples, s["started"], s["seconds"])
    demo = out / "demo"
    stages = json.loads((demo / "timings.json").read_text()) if (demo / "timings.json").is_file() else []
    for s in stages:
        s["gpu_memory_peak_mib"] = peak(samples, s["started"], s["seconds"])
    realsize = read_jsonl(out / "realsize.jsonl")
    for r in realsize:
        r["gpu_memory_peak_mib"] = peak(samples, r["started"], r["seconds"]) if "started" in r else None
    bench = None
    if (out / "train_bench.log").is_file():
        lines = [x for x in (out / "train_bench.log").read_text().splitlines() if x.startswith("{")]
        bench = json.loads(lines[-1]) if lines else None
    machine = (out / "machine.txt").read_text().strip() if (out / "machine.txt").is_file() else None
    report = {
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "total_seconds": round(sum(s["seconds"] for s in steps), 1),
        "gpu_memory_peak_mib": max((m for _, m in samples), default=None),
        "steps": steps,
        "demo": {"stages": stages, "train": training_rates(demo, "train"), "adapt": training_rates(demo, "adapt")},
        "realsize": realsize,
        "train_bench": bench,
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("machine", "total_seconds", "gpu_memory_peak_mib")}))
    print(f"wrote {out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
