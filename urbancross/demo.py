"""`urbancross demo`: the whole pipeline on the embedded benchmark, on one machine.

synth -> preprocess (tiny SAM, Ray Data) -> train on the source domain (Ray Train +
DeepSpeed) -> adapt to the target domain -> evaluate both models on every domain.
Everything lands under `cfg.out_dir`, the MLflow store included; the cross-domain table is
`<out_dir>/cross_domain.{json,md,png}`. A stage whose output exists is skipped and a stage
that was interrupted resumes, so re-running the same command continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

from urbancross.config import Config, save_config

log = logging.getLogger("urbancross.demo")

DEMO_CONFIG = Path(__file__).with_name("demo.yaml")  # the embedded default's settings


def _timed(name: str, fn: Callable[[], object]):
    log.info("demo: %s ...", name)
    t0 = time.perf_counter()
    value = fn()
    log.info("demo: %s done in %.0fs", name, time.perf_counter() - t0)
    return value


def _train_stage(cfg: Config, stage: str, run: Callable[..., dict]) -> dict:
    """Run a training stage once: reuse a finished result, resume an interrupted run."""
    stage_dir = Path(cfg.out_dir) / stage
    result = stage_dir / "result.json"
    if result.exists():
        log.info("demo: %s already finished (%s), reused", stage, result)
        return json.loads(result.read_text())
    return run(cfg, resume=(stage_dir / "run.json").exists())


def run_demo(cfg: Config) -> list[dict]:
    from urbancross.data.manifest import read_manifest, summary_json
    from urbancross.data.synth import synthesize
    from urbancross.evaluate.job import run_evaluate
    from urbancross.preprocess import run_preprocess
    from urbancross.train import run_adapt, run_train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = Path(cfg.out_dir).resolve()
    cfg.out_dir = str(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    t0 = time.perf_counter()

    raw = out / "benchmark"
    if not cfg.data.manifest:
        table = read_manifest(raw) if raw.exists() else _timed("synthesize the embedded benchmark", lambda: synthesize(cfg.synth, str(raw)))
        print(summary_json(table), flush=True)
        cfg.data.manifest = str(raw)

    cfg.preprocess.input = cfg.preprocess.input or cfg.data.manifest
    cfg.preprocess.output = cfg.preprocess.output or str(out / "preprocessed")
    summary = _timed("preprocess (SAM segments, caption refinement)", lambda: run_preprocess(cfg))
    cfg.data.manifest = summary["output"]

    _timed(f"train on {cfg.data.source_domain}", lambda: _train_stage(cfg, "train", run_train))
    _timed(f"adapt {cfg.data.source_domain} -> {cfg.data.target_domain}", lambda: _train_stage(cfg, "adapt", run_adapt))

    cfg.evaluate.output = str(out)
    records = _timed("evaluate on every domain", lambda: run_evaluate(cfg))  # logs the table
    log.info("demo: finished in %.0fs; table in %s, MLflow store %s", time.perf_counter() - t0, out / "cross_domain.json", cfg.tracking_uri())
    return records
