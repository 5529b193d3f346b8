"""bench/evidence.py's pure parts: the arms a config gets, aggregation (mean +- sd, per-seed
differences and their verdict), the Markdown table, the last line's keys, and resume."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import evidence as ev  # noqa: E402
from urbancross import atomic  # noqa: E402
from urbancross.config import load_config  # noqa: E402
from urbancross.data.manifest import ManifestError  # noqa: E402
from urbancross.demo import DEMO_CONFIG  # noqa: E402

SRC, TGT, OTHER = "Finland", "Spain", "Germany"


def record(arm: str, seed: int, src: float, tgt: float, smr_tgt: float | None = None, **extra) -> dict:
    test = {SRC: {"mR": src, "smr_mR": src}, OTHER: {"mR": 1.0, "smr_mR": 1.0}, TGT: {"mR": tgt, "smr_mR": tgt if smr_tgt is None else smr_tgt}}
    return {"arm": arm, "seed": seed, "test": test, "val_mR": 20.0 + seed, "best_epoch": 3, "seconds": 10.0 + seed, **extra}


def base_config(*overrides: str):
    return load_config(DEMO_CONFIG, ["model.pretrained=/some/clip.pt", *overrides])


def fake_runs(seeds=(0, 1, 2)) -> dict:
    values = {  # arm -> (in-domain per seed, target per seed)
        "source": ([40.0, 44.0, 42.0], [20.0, 22.0, 24.0]),
        "control": ([40.0, 44.0, 42.0], [21.0, 22.0, 23.0]),
        "adapted": ([40.0, 44.0, 42.0], [21.0, 23.0, 22.0]),
        "upper": ([40.0, 44.0, 42.0], [30.0, 31.0, 32.0]),
        "scratch": ([20.0, 22.0, 24.0], [14.0, 15.0, 16.0]),
    }
    return {arm: {s: record(arm, s, v[0][i], v[1][i], smr_tgt=v[1][i] + 1.0) for i, s in enumerate(seeds)} for arm, v in values.items()}


def test_verdict_calls_a_difference_inside_the_spread_no_difference():
    assert ev.verdict(0.5, 1.0, 3) == "no difference (inside the seeds' spread)"
    assert ev.verdict(-1.0, 1.0, 3) == "no difference (inside the seeds' spread)"
    assert ev.verdict(2.0, 1.0, 3) == "higher"
    assert ev.verdict(-2.0, 1.0, 3) == "lower"
    assert ev.verdict(5.0, 0.0, 1) == "one seed: no spread to judge"


def test_plan_flips_each_toggle_against_the_defaults_and_says_what_is_not_run():
    arms, not_run = ev.plan(base_config())
    names = [a.name for a in arms]
    assert names[:5] == ["source", "control", "adapted", "upper", "scratch"]
    cfg = base_config()
    seg = "segments_on" if not cfg.model.use_segments else "segments_off"
    assert seg in names and "curriculum_off" in names and "adapt_curriculum_off" in names
    assert ("segments_pooled" in names) == (not cfg.model.use_segments)
    by = {a.name: a for a in arms}
    assert by["adapt_curriculum_off"].start == "source" and by["curriculum_off"].start is None
    assert by["curriculum_off"].overrides == ("train.curriculum.enabled=false",)
    assert by["scratch"].overrides[0] == "model.pretrained=''" and "train.epochs=40" in by["scratch"].overrides
    assert "lmm_refinement" in not_run and "passthrough" in not_run["lmm_refinement"]  # no refiner: said, not faked
    assert "pretraining" not in not_run

    arms, not_run = ev.plan(base_config("model.pretrained=''", "model.use_segments=true"))
    assert "scratch" not in [a.name for a in arms] and "random init" in not_run["pretraining"]
    assert "segments_off" in [a.name for a in arms]

    arms, not_run = ev.plan(base_config("preprocess.refine.kind=lmm"))
    assert "lmm_refinement" not in not_run
    assert ("data.use_refined_captions=false",) in [a.overrides for a in arms]


def test_summary_is_mean_and_sample_sd_over_seeds():
    runs = fake_runs()
    arms, _ = ev.plan(base_config())
    summary = ev.summarize(runs, arms, [0, 1, 2], [SRC, OTHER, TGT])
    assert set(summary) == {"source", "control", "adapted", "upper", "scratch"}  # arms without results are left out
    assert summary["source"][SRC]["mean"] == pytest.approx(42.0)
    assert summary["source"][SRC]["sd"] == pytest.approx(2.0)  # sample sd of 40, 44, 42
    assert summary["source"][TGT + "_smr"]["mean"] == pytest.approx(23.0)
    assert summary["source"][TGT]["per_seed"] == [20.0, 22.0, 24.0]
    assert summary["scratch"]["val_mR"]["mean"] == pytest.approx(21.0)
    assert summary["source"]["seconds"] == [10.0, 11.0, 12.0]


def test_comparisons_are_per_seed_differences_with_their_spread():
    runs = fake_runs()
    arms, _ = ev.plan(base_config())
    rows = {r["comparison"]: r for r in ev.comparisons(runs, arms, [0, 1, 2], SRC, TGT)}
    r = rows["adapted - control"]
    assert r["per_seed"] == [0.0, 1.0, -1.0]
    assert (r["mean"], r["sd"]) == (pytest.approx(0.0), pytest.approx(1.0))
    assert r["verdict"] == "no difference (inside the seeds' spread)"
    r = rows["upper bound - adapted"]
    assert r["per_seed"] == [9.0, 8.0, 10.0] and r["verdict"] == "higher"
    r = rows["cross-domain drop: source model, target - in-domain"]
    assert r["per_seed"] == [-20.0, -22.0, -18.0] and r["domain"] == f"{TGT} - {SRC}" and r["verdict"] == "lower"
    assert rows["pretrained - scratch, in-domain"]["mean"] == pytest.approx(20.0)
    assert rows["SMR on - off: source model, target"]["per_seed"] == [1.0, 1.0, 1.0]  # sd 0: any mean is outside it
    assert rows["SMR on - off: source model, target"]["verdict"] == "higher"
    assert not any("segments" in name for name in rows)  # its arm has no results: no row


def test_toggle_comparisons_are_signed_on_minus_off():
    runs = fake_runs()
    runs["curriculum_off"] = {s: record("curriculum_off", s, 45.0, 20.0) for s in (0, 1, 2)}  # base has it on
    runs["segments_on"] = {s: record("segments_on", s, 43.0, 22.0) for s in (0, 1, 2)}  # base has it off
    arms, _ = ev.plan(base_config("model.use_segments=false"))
    rows = {r["comparison"]: r for r in ev.comparisons(runs, arms, [0, 1, 2], SRC, TGT)}
    assert rows["curriculum on - off, in-domain"]["per_seed"] == [-5.0, -1.0, -3.0]  # source (on) - curriculum_off
    assert rows["segments on - off, in-domain"]["per_seed"] == [3.0, -1.0, 1.0]  # segments_on - source (off)


def evidence_dict(runs, seeds=(0, 1, 2)) -> dict:
    arms, not_run = ev.plan(base_config())
    return {"source_domain": SRC, "target_domain": TGT, "domains": [SRC, OTHER, TGT], "seeds": list(seeds),
            "test_images_per_domain": 40, "chance": 12.89, "summary": ev.summarize(runs, arms, seeds, [SRC, OTHER, TGT]),
            "comparisons": ev.comparisons(runs, arms, seeds, SRC, TGT), "not_run": not_run, "preprocess": {"mean_real_segments": 6.5,
            "wall_seconds": 30.0}, "wall_seconds": 100.0, "arm_seconds_total": 190.0, "jobs": 2}


def test_render_puts_chance_beside_every_figure_and_shows_the_verdicts():
    md = ev.render(evidence_dict(fake_runs()))
    lines = md.splitlines()
    source = next(line for line in lines if line.startswith("| source only"))
    cells = [c.strip() for c in source.strip("|").split("|")]
    assert cells[1] == "42.00 ± 2.00" and cells[2] == "3.3×" and cells[4] == "22.00 ± 2.00" and cells[5] == "23.00 ± 2.00"
    assert cells[6] == "12.89"
    adapted = next(line for line in lines if line.startswith("| adapted - control"))
    assert "+0.00 ± 1.00" in adapted and "no difference (inside the seeds' spread)" in adapted and "12.89" in adapted
    assert any(line.startswith("| lmm refinement on − off | - | not run") for line in lines)
    header = next(line for line in lines if line.startswith("| arm"))
    assert header.count("|") == source.count("|")  # every row has the header's columns
    assert "6.5" in md


def test_headline_has_one_value_per_seed_for_every_required_key():
    runs = fake_runs()
    line = ev.headline(runs, [0, 1, 2], SRC, TGT, 12.89)
    for key in ("chance_mR", "in_domain_mR", "source_target_mR", "control_target_mR", "adapted_target_mR", "upper_target_mR"):
        assert len(line[key]) == 3, key
    assert line["in_domain_mR"] == [40.0, 44.0, 42.0]
    assert line["upper_target_mR"] == [30.0, 31.0, 32.0]
    assert line["scratch_target_mR"] == [14.0, 15.0, 16.0]
    assert line["chance_mR"] == [12.89] * 3
    json.dumps(line)


def test_resume_reuses_finished_arms_and_reruns_when_the_config_changed(tmp_path):
    base = base_config(f"data.manifest={tmp_path / 'no-such-manifest'}")
    arms, _ = ev.plan(base)
    chain = [a for a in arms if a.name in ("source", "adapted")]
    fps = {}
    for arm in chain:
        cfg = ev.arm_config(base, arm, 0)
        start = None if arm.start is None else ev.fingerprint(ev.arm_config(base, chain[0], 0))
        fps[arm.name] = ev.fingerprint(cfg, start)
        atomic.write_json(ev.result_path(tmp_path, arm.name, 0), {**record(arm.name, 0, 1.0, 2.0), "fingerprint": fps[arm.name]})
    ev.model_path(tmp_path, "source", 0).write_bytes(b"weights")  # adapt arms start from it: reuse needs the file
    # everything finished: no data is read (the manifest does not exist) and the records come back
    got = ev.run_task(str(tmp_path), base.to_dict(), chain, 0, threads=1)
    assert [r["arm"] for r in got] == ["source", "adapted"] and got[1]["fingerprint"] == fps["adapted"]

    assert ev.finished(tmp_path, "source", 0, fps["source"]) is not None
    other = ev.fingerprint(ev.arm_config(base.override(["train.lr=0.5"]), chain[0], 0))
    assert other != fps["source"] and ev.finished(tmp_path, "source", 0, other) is None  # another config: run again
    assert ev.finished(tmp_path, "source", 1, fps["source"]) is None  # another seed: not there
    # the stage-2 fingerprint follows its start model's: a changed source invalidates the adapted arm
    changed = base.override(["train.epochs=3"])
    assert ev.fingerprint(ev.arm_config(changed, chain[1], 0), ev.fingerprint(ev.arm_config(changed, chain[0], 0))) != fps["adapted"]
    # a missing start model file means the source arm must run again (here: it fails on the missing data)
    ev.model_path(tmp_path, "source", 0).unlink()
    with pytest.raises(ManifestError):
        ev.run_task(str(tmp_path), base.to_dict(), chain, 0, threads=1)


def test_tasks_keep_each_adapt_arm_with_its_source_arm():
    arms, _ = ev.plan(base_config())
    work = ev.tasks(arms, [0, 1])
    chains = [(s, [a.name for a in group]) for s, group in work if group[0].name == "source"]
    assert chains == [(0, ["source", "control", "adapted", "upper", "adapt_curriculum_off"]),
                      (1, ["source", "control", "adapted", "upper", "adapt_curriculum_off"])]
    alone = sorted((s, g[0].name) for s, g in work if g[0].name != "source")
    assert all(len(g) == 1 and g[0].start is None for s, g in work if g[0].name != "source")
    assert len(alone) == 2 * 4 and (0, "scratch") in alone  # scratch, segments (crops, pooled), curriculum per seed
    assert math.isclose(sum(len(g) for _, g in work), 2 * len(arms))
