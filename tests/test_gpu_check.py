"""bench/gpu_check.sh and bench/gpu_report.py without a GPU: syntax, refusal, and the report's arithmetic."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

BENCH = Path(__file__).parent.parent / "bench"


def test_gpu_check_parses_and_refuses_without_a_gpu(tmp_path):
    assert subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")]).returncode == 0
    if shutil.which("nvidia-smi"):
        return
    done = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 2 and "needs a CUDA GPU (or --cpu)" in done.stderr
    assert list((tmp_path / "out").iterdir()) == []


def test_gpu_report_takes_each_windows_gpu_peak(tmp_path):
    t0 = time.time()

    def stamp(t: float) -> str:
        return datetime.fromtimestamp(t).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]

    # nvidia-smi samples: 100 MiB, then 900 during the first step, 400 during the second
    samples = [(t0 - 1, 100), (t0 + 1, 900), (t0 + 2, 850), (t0 + 11, 400), (t0 + 30, 50)]
    (tmp_path / "gpu_samples.csv").write_text("".join(f"{stamp(t)}, {m}\n" for t, m in samples) + "2026/12/0")
    steps = [{"step": "demo", "started": t0, "seconds": 5.0, "rc": 0}, {"step": "realsize", "started": t0 + 10, "seconds": 5.0, "rc": 124}]
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "timings.json").write_text(json.dumps([{"stage": "train on Finland", "started": t0 + 1.5, "seconds": 1.0}]))
    (tmp_path / "realsize.jsonl").write_text(json.dumps({"stage": "sam_vit_b_stage", "started": t0 + 10.5, "seconds": 1.0}) + "\n")
    (tmp_path / "train_bench.log").write_text('table\n{"samples_per_s": {"plain": 10.0}, "per_worker_ratio": 0.9}\n')
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent)}
    done = subprocess.run([sys.executable, str(BENCH / "gpu_report.py"), str(tmp_path)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["gpu_memory_peak_mib"] for s in report["steps"]] == [900, 400]
    assert report["total_seconds"] == 10.0 and report["gpu_memory_peak_mib"] == 900
    assert report["demo"]["stages"][0]["gpu_memory_peak_mib"] == 850
    assert report["demo"]["train"] is None  # no finished training stage to read rates from
    assert report["realsize"][0]["gpu_memory_peak_mib"] == 400
    assert report["train_bench"]["samples_per_s"]["plain"] == 10.0
