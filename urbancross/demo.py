"""`urbancross demo`: the whole pipeline on the embedded benchmark, on one machine.

synth -> preprocess (tiny SAM, Ray Data) -> train on the source domain (Ray Train +
DeepSpeed) -> adapt to the target domain -> evaluate both models on every domain.
Everything lands under `cfg.out_dir`, the MLflow store included; the cross-domain table is
`<out_dir>/cross_domain.{json,md,png}`, each stage's wall time `<out_dir>/timings.json`. A
stage whose output exists is skipped and a stage that was interrupted resumes, so re-running
the same command continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

from urbancross.atomic import write_json
from urbancross.config import Config, local_absolute, save_config
from urbancross.data.manifest import read_manifest, summary_json
from urbancross.data.synth import synthesize
from urbancross.evaluate.job import run_evaluate
from urbancross.evaluate.report import to_markdown
from urbancross.preprocess import run_preprocess
from urbancross.train import run_adapt, run_train

log = logging.getLogger("urbancross.demo")

DEMO_CONFIG = Path(__file__).with_name("demo.yaml")  # the embedded default's settings
BENCHMARK = "benchmark"  # <out_dir>/benchmark: the synthesized manifest when none is given
CONFIG_FILE = "config.yaml"


# `urbancross demo --method M`: the settings of each model family, applied before any --set.
# CMPAGL: its objective (hardest-negative triplet + intra-class, the contrastive pre-alignment as
# the main term, ITM on mined negatives) and the lr bench/cmpagl_learning.py uses for it. The
# embedded pretrained CLIP does not fit its Gswin + BERT towers: it trains from random init, for
# the from-scratch epochs the demo ran before the embedded CLIP existed.
METHODS = {
    "urbancross": [],
    "cmpagl": ["model.family=cmpagl", "model.pretrained=''", "loss.kind=triplet", "loss.pre_align_weight=1.0",
               "train.lr=3e-4", "train.epochs=40"],
}

TIMINGS_FILE = "timings.json"  # each stage's start (Unix time) and wall seconds, for benchmarks


def _timed(name: str, fn: Callable[[], object], timings: list[dict] | None = None, out: Path | None = None):
    """Run one stage, logging its wall time (and appending it to `timings`, written to `out`)."""
    log.info("demo: %s ...", name)
    started, t0 = time.time(), time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - t0
    log.info("demo: %s done in %.0fs", name, seconds)
    if timings is not None and out is not None:
        timings.append({"stage": name, "started": round(started, 3), "seconds": round(seconds, 3)})
        write_json(out / TIMINGS_FILE, timings, indent=2)
    return value


def _train_stage(cfg: Config, stage: str, run: Callable[..., dict]) -> dict:
    """Run a training stage once: reuse a finished result, resume an interrupted run."""
    stage_dir = Path(cfg.out_dir) / stage
    result = stage_dir / "result.json"
    if result.exists():
        log.info("demo: %s already finished (%s), reused", stage, result)
        return json.loads(result.read_text())
    return run(cfg, resume=(stage_dir / "run.json").exists())


def demo_config(cfg: Config) -> Config:
    """The config the demo runs with: absolute paths, and every stage's input and output named.

    The source manifest (`data.manifest`, else the benchmark synthesized under out_dir) is
    preprocessed into `preprocess.output`, which becomes `data.manifest` for training,
    adaptation and evaluation. Saved as `<out_dir>/config.yaml`, it is a config that every
    later command (`evaluate`, `promote`, `index`, a re-run of the demo) takes unchanged.
    """
    out = local_absolute(cfg.out_dir)
    source = local_absolute(cfg.preprocess.input or cfg.data.manifest) or os.path.join(out, BENCHMARK)
    prepared = local_absolute(cfg.preprocess.output) or os.path.join(out, "preprocessed")
    changes = {"out_dir": out, "preprocess.input": source, "preprocess.output": prepared, "data.manifest": prepared, "evaluate.output": out}
    return cfg.override(changes, where="demo")


def run_demo(cfg: Config) -> list[dict]:
    cfg = demo_config(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / CONFIG_FILE)
    t0 = time.perf_counter()

    raw = out / BENCHMARK
    timings: list[dict] = []

    def timed(name: str, fn: Callable[[], object]):
        return _timed(name, fn, timings, out)

    if cfg.preprocess.input == str(raw):
        table = read_manifest(raw) if raw.exists() else timed("synthesize the embedded benchmark", lambda: synthesize(cfg.synth, str(raw)))
        print(summary_json(table), flush=True)
    timed("preprocess (SAM segments, caption refinement)", lambda: run_preprocess(cfg))

    timed(f"train on {cfg.data.source_domain}", lambda: _train_stage(cfg, "train", run_train))
    timed(f"adapt {cfg.data.source_domain} -> {cfg.data.target_domain}", lambda: _train_stage(cfg, "adapt", run_adapt))

    records = timed("evaluate on every domain", lambda: run_evaluate(cfg))  # logs the table
    log.info("demo: finished in %.0fs; table in %s, MLflow store %s", time.perf_counter() - t0, out / "cross_domain.json", cfg.tracking_uri())
    print(to_markdown(records), flush=True)  # the cross-domain table, last on stdout
    return records
