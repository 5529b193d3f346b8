"""Evidence over seeds: what the pretrained embedded defaults reach, and what each part of UrbanCross adds.

    python bench/evidence.py --out runs/evidence [--seeds 3] [--jobs 2] [--set KEY=VALUE ...] [--tracking-uri URI]

On the embedded benchmark of urbancross/demo.yaml (synthesized once under `--out`, then
preprocessed once by the repo's Ray Data pipeline, SAM segments included: the benchmark is
fixed by synth.seed, the seed varies the model: its initialisation, batches, augmentation),
for each seed 0..N-1, these arms (bench/loops.py: the Ray loops' pieces in one process):

- `source`: stage 1 on the source's train split from `model.pretrained` (the defaults),
  the epoch chosen on the source's val split; "source only" on the target;
- `control`, `adapted`, `upper`: stage 2 from that model, as bench/adapt_controls.py's
  rows (plain fine-tuning on the whole source batch; UrbanCross's weighted adversarial
  fine-tuning; + target captions as labels, the upper bound), the epoch chosen on the
  target's val split (as `urbancross adapt`);
- `scratch`: stage 1 from random init (`model.pretrained: ""`), the same seeds, with the
  recipe the demo used for random init (`SCRATCH_RECIPE`; `--scratch-set` changes it);
- ablations, each the default with one setting flipped: segments (`model.use_segments`),
  the stage-1 curriculum (`train.curriculum.enabled`), the stage-2 curriculum (the kept share
  growing over the passes, `adapt.curriculum`: an adapt arm), LMM refinement
  (`data.use_refined_captions`) only where a refiner ran (`preprocess.refine.kind: lmm`);
  SMR at evaluation time only (every arm is scored plain and SMR-re-ranked).

Every arm is reported on the test split of every country (one gallery each); nothing any
choice sees comes from test. Writes `<out>/evidence.json` and `<out>/evidence.md` (mean +- sd
over seeds, chance mR beside every figure; each comparison as the mean +- sd of its per-seed
differences, "no difference" when the mean lies inside that spread), logs one MLflow parent
run with a child run per arm (params, metrics per seed as steps) to `<out>/mlflow.db` unless
`--tracking-uri`, and prints one JSON object as its last line.

Resumable: each (arm, seed) result is written atomically under `<out>/arms/` with a fingerprint of
its config; a re-run reuses results whose fingerprint matches, so only unfinished arms run.
`--jobs` runs independent arms in that many processes (one torch thread each: on a shared
2-CPU machine two threads in one process spin on each other).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench scripts, also in spawned workers

from ablations import chance_mr  # noqa: E402
from adapt_controls import VARIANTS, mean_sd  # noqa: E402
from urbancross import atomic  # noqa: E402
from urbancross.config import Config, load_config  # noqa: E402
from urbancross.demo import DEMO_CONFIG  # noqa: E402

log = logging.getLogger("evidence")

ARMS_DIR = "arms"
JSON_FILE, MD_FILE = "evidence.json", "evidence.md"


# --------------------------------------------------------------------------- the arms


@dataclass(frozen=True)
class Arm:
    """One row of the evidence: a stage-1 model (`start` None) or a stage-2 one adapted from arm `start`."""

    name: str
    label: str
    overrides: tuple[str, ...] = ()
    start: str | None = None
    toggle: str = ""  # ablations: the setting this arm flips against its base (`source`, or `adapted` for stage 2)

    @property
    def stage(self) -> str:
        return "train" if self.start is None else "adapt"


TOGGLES = {  # ablation -> (config path, stage, what it is)
    "segments": ("model.use_segments", "train", "SAM segments fused into the image embedding"),
    "curriculum": ("train.curriculum.enabled", "train", "stage-1 curriculum (easiest first, similarity-margin difficulty)"),
    "adapt_curriculum": ("adapt.curriculum", "adapt", "stage-2 curriculum (kept share of each source batch growing 20% -> 100%)"),
    "lmm_refinement": ("data.use_refined_captions", "train", "LMM-refined captions"),
}


def _get(cfg: Config, path: str) -> Any:
    value: Any = cfg
    for part in path.split("."):
        value = getattr(value, part)
    return value


# The scratch arm's own recipe: what urbancross/demo.yaml set for random init before the
# embedded pretrained CLIP existed (chosen then on the source's val split). Fine-tuning rates
# and epoch counts would starve a random init; `--scratch-set` adds to / overrides these.
SCRATCH_RECIPE = ("train.epochs=40", "train.lr=1.0e-3", "train.batch_size=16")


def plan(base: Config, scratch: Sequence[str] = SCRATCH_RECIPE) -> tuple[list[Arm], dict[str, str]]:
    """(the arms this config can run, {comparison: why it is not run}); `scratch`: the random-init arm's settings."""
    control, adapted, upper = VARIANTS.values()
    arms = [
        Arm("source", "source only (trained on the source)"),
        Arm("control", "plain fine-tune on the source (control)", tuple(control), "source"),
        Arm("adapted", "UrbanCross weighted adversarial fine-tuning", tuple(adapted), "source"),
        Arm("upper", "target captions as labels (upper bound)", tuple(upper), "source"),
    ]
    not_run: dict[str, str] = {}
    if base.model.pretrained:
        arms.append(Arm("scratch", f"random init, trained on the source ({', '.join(scratch)})", ("model.pretrained=''", *scratch)))
    else:
        not_run["pretraining"] = "model.pretrained is empty: the defaults already start from random init"
    for key, (path, stage, _) in TOGGLES.items():
        on = bool(_get(base, path))
        if key == "lmm_refinement" and base.preprocess.refine.kind != "lmm":
            not_run[key] = (f"no refiner in this config (preprocess.refine.kind: {base.preprocess.refine.kind}): "
                            "the refined captions are the captions, so off would equal on")
            continue
        flip = "off" if on else "on"
        label = f"{key.replace('_', ' ')} {flip} ({path}={str(not on).lower()})"
        arms.append(Arm(f"{key}_{flip}", label, (f"{path}={str(not on).lower()}",), "source" if stage == "adapt" else None, key))
    if not base.model.use_segments:  # the other segment encoding (issue 15): one tower pass per tile
        arms.append(Arm("segments_pooled", "segments on, pooled from the tile's patch tokens (model.segment_encoding=pooled)",
                        ("model.use_segments=true", "model.segment_encoding=pooled")))
    return arms, not_run


def arm_config(base: Config, arm: Arm, seed: int) -> Config:
    return base.override([*arm.overrides, f"seed={seed}"], where=f"arm {arm.name}")


def fingerprint(cfg: Config, start: str | None = None) -> str:
    """What an (arm, seed) result depends on: its whole config, and the fingerprint of its start model."""
    text = json.dumps([cfg.to_dict(), start], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def result_path(out: Path, arm: str, seed: int) -> Path:
    return out / ARMS_DIR / arm / f"seed_{seed}.json"


def model_path(out: Path, arm: str, seed: int) -> Path:
    return out / ARMS_DIR / arm / f"seed_{seed}.pt"


def finished(out: Path, arm: str, seed: int, fp: str) -> dict | None:
    """The stored result of (arm, seed) when it was made with fingerprint `fp`, else None."""
    path = result_path(out, arm, seed)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.get("fingerprint") == fp else None


# --------------------------------------------------------------------------- running (worker side)


def run_task(out: str, base_dict: dict, arms: list[Arm], seed: int, threads: int) -> list[dict]:
    """Run `arms` of one seed in order (a stage-1 arm first, then the stage-2 arms adapted from it),
    reusing finished results; returns their records."""
    import torch

    from loops import adapt, decode, scores, train_source
    from urbancross.config import config_from_dict
    from urbancross.data.ingest import read_split
    from urbancross.model.factory import create_model, save_model
    from urbancross.train.trainer import check_disjoint, validation_slice

    torch.set_num_threads(threads)
    logging.getLogger("urbancross").setLevel(logging.WARNING)
    root, base = Path(out), config_from_dict(base_dict, where="evidence")
    src_d, tgt_d = base.data.source_domain, base.data.target_domain
    test = None  # read only when an arm runs: a fully reused task touches no data
    records, models = [], {}
    starts = {a.start for a in arms if a.start is not None}  # arms whose model a later arm adapts: kept as a file
    for arm in arms:
        cfg = arm_config(base, arm, seed)
        start_fp = None if arm.start is None else fingerprint(arm_config(base, next(a for a in arms if a.name == arm.start), seed))
        fp = fingerprint(cfg, start_fp)
        done = finished(root, arm.name, seed, fp)
        if done is not None and (arm.name not in starts or model_path(root, arm.name, seed).is_file()):
            print(f"seed {seed} {arm.name}: reused ({done['seconds']:.0f}s when run)", flush=True)
            records.append(done)
            continue
        t0 = time.perf_counter()
        source, source_val = validation_slice(cfg, read_split(cfg, cfg.data.train_split, src_d), src_d)
        if arm.start is None:
            check_disjoint(cfg, source, source_val)
            model, info = train_source(cfg, source, source_val, cache=decode(cfg, source))
            if arm.name in starts:
                save_model(model, str(model_path(root, arm.name, seed)))
        else:
            start = models.get(arm.start)
            if start is None:  # its result was reused: its model is on disk
                start = create_model(cfg.model, pretrained=str(model_path(root, arm.start, seed)))
            target, target_val = validation_slice(cfg, read_split(cfg, cfg.data.train_split, tgt_d), tgt_d)
            check_disjoint(cfg, source, target, target_val)
            model, info = adapt(cfg, start, source, target, target_val)
        models[arm.name] = model
        t1 = time.perf_counter()
        test = read_split(base, base.data.test_split) if test is None else test
        record = {"arm": arm.name, "seed": seed, "fingerprint": fp, "stage": arm.stage, "start": arm.start,
                  "test": scores(cfg, model, test), **{k: v for k, v in info.items() if k != "seconds"},
                  "train_seconds": info["seconds"], "test_seconds": time.perf_counter() - t1, "seconds": time.perf_counter() - t0}
        atomic.write_json(result_path(root, arm.name, seed), record, indent=1)
        t = record["test"]
        print(f"seed {seed} {arm.name}: {record['seconds']:.0f}s (train {info['seconds']:.0f}s), val mR {info.get('val_mR') or float('nan'):.2f} "
              f"(epoch {info.get('best_epoch')}), test mR {src_d} {t[src_d]['mR']:.2f} {tgt_d} {t[tgt_d]['mR']:.2f}", flush=True)
        records.append(record)
    return records


def tasks(arms: list[Arm], seeds: Sequence[int]) -> list[tuple[int, list[Arm]]]:
    """Independent units of work: per seed, the source arm with every arm adapted from it, and
    each other stage-1 arm alone. Chains first (the longest)."""
    chains = [(s, [a for a in arms if a.name == "source" or a.start == "source"]) for s in seeds]
    alone = [(s, [a]) for s in seeds for a in arms if a.start is None and a.name != "source"]
    return chains + alone


# --------------------------------------------------------------------------- aggregation (pure)


def verdict(mean: float, sd: float, n: int) -> str:
    """A difference inside the seeds' spread is no difference."""
    if n < 2:
        return "one seed: no spread to judge"
    if abs(mean) <= sd:
        return "no difference (inside the seeds' spread)"
    return "higher" if mean > 0 else "lower"


def metric(record: Mapping, domain: str, smr: bool = False) -> float:
    t = record["test"][domain]
    return float(t["smr_mR"] if smr else t["mR"])


COMPARISONS = [  # (name, arm a, arm b, domain role, smr): a - b per seed
    ("cross-domain drop: source model, target - in-domain", "source", "source", ("target", "source"), False),
    ("adapted - control", "adapted", "control", "target", False),
    ("adapted - source only", "adapted", "source", "target", False),
    ("control - source only", "control", "source", "target", False),
    ("upper bound - adapted", "upper", "adapted", "target", False),
    ("pretrained - scratch, in-domain", "source", "scratch", "source", False),
    ("pretrained - scratch, target", "source", "scratch", "target", False),
    ("SMR on - off: source model, in-domain", "source", "source", "source", (True, False)),
    ("SMR on - off: source model, target", "source", "source", "target", (True, False)),
    ("SMR on - off: adapted, target", "adapted", "adapted", "target", (True, False)),
    ("segments pooled - off, in-domain", "segments_pooled", "source", "source", False),
    ("segments pooled - crops, in-domain", "segments_pooled", "segments_on", "source", False),
    ("segments pooled - off, target", "segments_pooled", "source", "target", False),
]


def comparisons(runs: Mapping[str, Mapping[int, dict]], arms: Sequence[Arm], seeds: Sequence[int], src: str, tgt: str) -> list[dict]:
    """Each comparison as per-seed differences with mean, sd and verdict (skipped when an arm is missing)."""
    specs = list(COMPARISONS)
    for arm in arms:
        if arm.toggle:
            base = "adapted" if arm.start else "source"
            on_first = arm.name.endswith("_on")  # the flipped arm turns it on: on - off = arm - base
            a, b = (arm.name, base) if on_first else (base, arm.name)
            for role in (["target"] if arm.start else ["source", "target"]):
                specs.append((f"{arm.toggle.replace('_', ' ')} on - off, {'in-domain' if role == 'source' else 'target'}", a, b, role, False))
    out = []
    for name, a, b, role, smr in specs:
        if a not in runs or b not in runs or any(s not in runs[a] or s not in runs[b] for s in seeds):
            continue
        da, db = (role if isinstance(role, tuple) else (role, role))
        sa, sb = (smr if isinstance(smr, tuple) else (smr, smr))
        dom = {"source": src, "target": tgt}
        diffs = [metric(runs[a][s], dom[da], sa) - metric(runs[b][s], dom[db], sb) for s in seeds]
        m, sd = mean_sd(diffs)
        out.append({"comparison": name, "a": a, "b": b, "domain": dom[da] if da == db else f"{dom[da]} - {dom[db]}",
                    "per_seed": diffs, "mean": m, "sd": sd, "verdict": verdict(m, sd, len(diffs))})
    return out


def summarize(runs: Mapping[str, Mapping[int, dict]], arms: Sequence[Arm], seeds: Sequence[int], domains: Sequence[str]) -> dict:
    """Per arm and test domain: per-seed mR (plain and SMR), mean and sd; plus val and timings."""
    out = {}
    for arm in arms:
        if arm.name not in runs or any(s not in runs[arm.name] for s in seeds):
            continue
        recs = [runs[arm.name][s] for s in seeds]
        row: dict[str, Any] = {"label": arm.label, "stage": arm.stage, "overrides": list(arm.overrides), "start": arm.start}
        for d in domains:
            for smr in (False, True):
                values = [metric(r, d, smr) for r in recs]
                row[f"{d}{'_smr' if smr else ''}"] = {"per_seed": values, "mean": mean_sd(values)[0], "sd": mean_sd(values)[1]}
        val = [r.get("val_mR") for r in recs]
        row["val_mR"] = {"per_seed": val, "mean": mean_sd(val)[0] if None not in val else None}
        row["best_epoch"] = [r.get("best_epoch") for r in recs]
        row["seconds"] = [r["seconds"] for r in recs]
        if any(r.get("disc_acc") is not None for r in recs):
            row["disc_acc"] = [r.get("disc_acc") for r in recs]
        out[arm.name] = row
    return out


def headline(runs: Mapping[str, Mapping[int, dict]], seeds: Sequence[int], src: str, tgt: str, chance: float) -> dict[str, list]:
    """The last line's lists, one value per seed."""
    def per_seed(arm: str, domain: str) -> list[float]:
        return [metric(runs[arm][s], domain) for s in seeds] if arm in runs else []

    return {
        "seeds": list(seeds),
        "chance_mR": [chance for _ in seeds],
        "in_domain_mR": per_seed("source", src),
        "source_target_mR": per_seed("source", tgt),
        "control_target_mR": per_seed("control", tgt),
        "adapted_target_mR": per_seed("adapted", tgt),
        "upper_target_mR": per_seed("upper", tgt),
        "scratch_in_domain_mR": per_seed("scratch", src),
        "scratch_target_mR": per_seed("scratch", tgt),
    }


def pm(stats: Mapping[str, Any]) -> str:
    return f"{stats['mean']:.2f} ± {stats['sd']:.2f}"


def render(evidence: Mapping[str, Any]) -> str:
    """The Markdown report of `evidence` (as written to evidence.json)."""
    src, tgt, chance = evidence["source_domain"], evidence["target_domain"], evidence["chance"]
    domains, seeds = evidence["domains"], evidence["seeds"]
    others = [d for d in domains if d not in (src, tgt)]
    c = f"{chance:.2f}"
    lines = [
        f"Test mR (mean ± sd over seeds {seeds}), {evidence['test_images_per_domain']} test images per country "
        f"(chance mR {c}); trained on {src}, adapted to {tgt}; each arm's epoch chosen on val (val mR column: {src}'s val split "
        f"for stage-1 arms, {tgt}'s for stage-2 arms, {evidence.get('val_images', '?')} images each).",
        "",
        f"| arm | {src} (in-domain) | × chance | " + " | ".join(others) + f" | {tgt} (target) | {tgt} + SMR | chance | "
        "val mR (choice) | best epoch | s per seed |",
        "|---" * (9 + len(others)) + "|",
    ]
    for row in evidence["summary"].values():
        val = row["val_mR"]["mean"]
        lines.append(
            f"| {row['label']} | {pm(row[src])} | {row[src]['mean'] / chance:.1f}× | " + "".join(f"{pm(row[d])} | " for d in others)
            + f"{pm(row[tgt])} | {pm(row[tgt + '_smr'])} | {c} | {'-' if val is None else f'{val:.2f}'} | "
            + f"{', '.join(str(e) for e in row['best_epoch'])} | {np.mean(row['seconds']):.0f} |"
        )
    lines += ["", "Comparisons: per-seed differences a − b, mean ± sd; a mean inside ± sd is no difference.", "",
              "| comparison | on | mean ± sd | per seed | chance | verdict |", "|---|---|---|---|---|---|"]
    for r in evidence["comparisons"]:
        per = ", ".join(f"{v:+.2f}" for v in r["per_seed"])
        lines.append(f"| {r['comparison']} | {r['domain']} | {r['mean']:+.2f} ± {r['sd']:.2f} | {per} | {c} | {r['verdict']} |")
    for key, why in evidence["not_run"].items():
        lines.append(f"| {key.replace('_', ' ')} on − off | - | not run | - | {c} | {why} |")
    seg = evidence.get("preprocess", {}).get("mean_real_segments")
    if seg is not None:
        lines += ["", f"SAM segments per tile after preprocessing (mean real segments): {seg}"
                  + (": none, so segments on only adds the fusion's parameters." if seg == 0 else ".")]
    lines += ["", f"Wall time of this invocation: {evidence['wall_seconds']:.0f} s ({evidence['jobs']} job(s); arms finished "
              f"before were reused); the arms' own time: {evidence['arm_seconds_total']:.0f} s, preprocessing "
              f"{evidence['preprocess'].get('wall_seconds', 0):.0f} s; per arm and seed in evidence.json (`arm_seconds`)."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- MLflow


def log_mlflow(evidence: Mapping[str, Any], runs: Mapping[str, Mapping[int, dict]], cfg: Config, out: Path) -> str:
    """One parent run (the benchmark, the table, the comparisons) with a child run per arm."""
    import mlflow

    from urbancross.tracking import configure

    uri = configure(cfg)
    mlflow.set_experiment("evidence")
    src, tgt = evidence["source_domain"], evidence["target_domain"]
    with mlflow.start_run(run_name="evidence") as parent:
        mlflow.log_params({"seeds": json.dumps(evidence["seeds"]), "overrides": json.dumps(evidence["overrides"])[:500],
                           "source_domain": src, "target_domain": tgt, "model.pretrained": cfg.model.pretrained or "(random init)",
                           "preprocess.sam.checkpoint": cfg.preprocess.sam.checkpoint or "(random tiny SAM)"})
        mlflow.log_metrics({"chance_mR": evidence["chance"], "wall_seconds": evidence["wall_seconds"]})
        for r in evidence["comparisons"]:
            key = "cmp_" + "".join(ch if ch.isalnum() else "_" for ch in r["comparison"])
            mlflow.log_metrics({f"{key}_mean": r["mean"], f"{key}_sd": r["sd"]})
        mlflow.log_artifact(str(out / JSON_FILE))
        mlflow.log_artifact(str(out / MD_FILE))
        for name, row in evidence["summary"].items():
            with mlflow.start_run(run_name=name, nested=True):
                mlflow.log_params({"label": row["label"], "stage": row["stage"], "start": row["start"] or "",
                                   "overrides": json.dumps(row["overrides"])})
                for seed in evidence["seeds"]:
                    rec = runs[name][seed]
                    values = {f"test_mR_{d}": v["mR"] for d, v in rec["test"].items()}
                    values.update({f"test_smr_mR_{d}": v["smr_mR"] for d, v in rec["test"].items() if "smr_mR" in v})
                    values.update({k: float(rec[k]) for k in ("val_mR", "best_epoch", "disc_acc", "seconds") if rec.get(k) is not None})
                    mlflow.log_metrics(values, step=seed)
                mlflow.log_metrics({f"mean_test_mR_{d}": row[d]["mean"] for d in evidence["domains"]}
                                   | {f"sd_test_mR_{d}": row[d]["sd"] for d in evidence["domains"]})
        run_id = parent.info.run_id
    log.info("MLflow: parent run %s in %s", run_id, uri)
    return run_id


# --------------------------------------------------------------------------- the driver


def prepare(out: Path, overrides: Sequence[str], tracking_uri: str) -> tuple[Config, dict]:
    """The base config on the benchmark under `out`, synthesized and preprocessed (Ray) once."""
    from urbancross.data.manifest import read_manifest
    from urbancross.data.synth import synthesize
    from urbancross.preprocess import run_preprocess

    raw, prepared = out / "benchmark", out / "preprocessed"
    cfg = load_config(DEMO_CONFIG, [*overrides]).override(
        {"out_dir": str(out), "data.manifest": str(prepared), "preprocess.input": str(raw), "preprocess.output": str(prepared),
         **({"mlflow.tracking_uri": tracking_uri} if tracking_uri else {})}, where="evidence")
    if not raw.exists():
        synthesize(cfg.synth, str(raw))
    summary_file = out / "preprocess.json"
    if not summary_file.is_file():
        import ray

        t0 = time.perf_counter()
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
        if not ray.is_initialized():  # a runtime of our own: a bare ray.init() joins any cluster `ray start` left on this machine
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        summary = run_preprocess(cfg)
        summary["wall_seconds"] = time.perf_counter() - t0
        if ray.is_initialized():
            ray.shutdown()  # our own local runtime: the arms need both CPUs
        atomic.write_json(summary_file, summary, indent=1, default=str)
    summary = json.loads(summary_file.read_text())
    table = read_manifest(str(prepared), columns=["num_real_segments"])
    summary["mean_real_segments"] = round(float(np.mean(table["num_real_segments"].to_numpy())), 3)
    return cfg, summary


def run(out: Path, seeds: Sequence[int], overrides: Sequence[str], jobs: int, threads: int, tracking_uri: str = "",
        scratch: Sequence[str] = SCRATCH_RECIPE) -> dict:
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    base, pre = prepare(out, overrides, tracking_uri)
    t_pre = time.perf_counter() - t_start
    arms, not_run = plan(base, scratch)
    work = tasks(arms, seeds)
    records: list[dict] = []
    if jobs <= 1:
        for seed, group in work:
            records += run_task(str(out), base.to_dict(), group, seed, threads)
    else:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(run_task, str(out), base.to_dict(), group, seed, threads) for seed, group in work]
            for f in futures:
                records += f.result()
    runs: dict[str, dict[int, dict]] = {}
    for r in records:
        runs.setdefault(r["arm"], {})[r["seed"]] = r
    src, tgt = base.data.source_domain, base.data.target_domain
    domains = sorted(runs["source"][seeds[0]]["test"])
    from urbancross.data.ingest import read_split

    images = read_split(base, base.data.test_split, tgt).num_rows
    chance = chance_mr(images)
    evidence = {
        "source_domain": src, "target_domain": tgt, "domains": domains, "seeds": list(seeds), "overrides": list(overrides),
        "test_images_per_domain": images, "val_images": read_split(base, base.data.val_split, src).num_rows, "chance": chance,
        "jobs": jobs, "threads_per_job": threads,
        "model.pretrained": base.model.pretrained, "preprocess.sam.checkpoint": base.preprocess.sam.checkpoint,
        "preprocess": pre, "preprocess_seconds": t_pre,
        "summary": summarize(runs, arms, seeds, domains),
        "comparisons": comparisons(runs, arms, seeds, src, tgt),
        "not_run": not_run,
        "arm_seconds": {a: [runs[a][s]["seconds"] for s in seeds] for a in runs},
        "arm_seconds_total": sum(runs[a][s]["seconds"] for a in runs for s in seeds),
        **headline(runs, seeds, src, tgt, chance),
        "wall_seconds": 0.0,
    }
    evidence["wall_seconds"] = time.perf_counter() - t_start
    atomic.write_json(out / JSON_FILE, evidence, indent=1, default=str)
    atomic.write_text(out / MD_FILE, render(evidence))
    evidence["mlflow_run_id"] = log_mlflow(evidence, runs, base, out)
    atomic.write_json(out / JSON_FILE, evidence, indent=1, default=str)
    return evidence


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (config `seed`)")
    ap.add_argument("--jobs", type=int, default=2, help="arms run in this many processes at once")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per job")
    ap.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: sqlite under --out)")
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                    help="config overrides on urbancross/demo.yaml (every arm)")
    ap.add_argument("--scratch-set", action="append", default=[], metavar="KEY=VALUE",
                    help="the random-init arm's settings, after its recipe " + " ".join(SCRATCH_RECIPE))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    evidence = run(Path(args.out).resolve(), list(range(args.seeds)), args.overrides, args.jobs, args.threads, args.tracking_uri,
                   [*SCRATCH_RECIPE, *args.scratch_set])
    print(Path(args.out, MD_FILE).read_text())
    print("per-arm wall time, s per seed: " + "; ".join(f"{a} {', '.join(f'{s:.0f}' for s in v)}" for a, v in evidence["arm_seconds"].items()))
    keys = ["seeds", "chance_mR", "in_domain_mR", "source_target_mR", "control_target_mR", "adapted_target_mR", "upper_target_mR",
            "scratch_in_domain_mR", "scratch_target_mR"]
    print(json.dumps({**{k: evidence[k] for k in keys}, "wall_seconds": round(evidence["wall_seconds"], 1), "out": str(Path(args.out).resolve())}))


if __name__ == "__main__":
    main()
