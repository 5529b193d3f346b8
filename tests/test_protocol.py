"""The evaluation protocol: train on train, choose on val, report on test.

Splits are seeded and disjoint, validation scores the way test evaluation does, and
nothing that chooses a model (validation, early stopping, Tune, the registry gate) reads test.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from urbancross.config import SynthConfig, load_config


def _manifest_with_caption_counts(path, counts: list[int], split: str = "val") -> str:
    """Benchmark rows of one domain whose images keep only `counts[i]` of their captions."""
    from urbancross.data import synth
    from urbancross.data.manifest import to_table, write_manifest

    rows = synth.domain_rows(SynthConfig(images_per_domain=len(counts), image_size=48), "Finland")
    for row, n in zip(rows, counts):
        row["captions"], row["split"] = row["captions"][:n], split
    write_manifest(to_table(rows), str(path))
    return str(path)


class _Shard:
    """What `validate` reads from a Ray Data shard: model-ready torch batches."""

    def __init__(self, cfg, table):
        self.cfg, self.table = cfg, table

    def iter_torch_batches(self, batch_size: int):
        from urbancross.model.embed import numpy_batches
        from urbancross.model.inputs import ModelInputs

        inputs = ModelInputs(self.cfg, train=False)
        for rows in numpy_batches(self.table, batch_size):
            yield {k: torch.as_tensor(v) for k, v in inputs(rows).items()}


def test_validation_and_test_metrics_agree_on_the_same_split(tmp_path):
    """Images with 1-3 captions: validation must score each real caption once, as evaluation does
    (it used to cycle them to 5 slots and count every slot as a query)."""
    from urbancross.data.ingest import read_split
    from urbancross.evaluate.scoring import evaluate_model
    from urbancross.model.factory import create_model
    from urbancross.train.loop import validate
    from urbancross.train.objective import RetrievalObjective

    manifest = _manifest_with_caption_counts(tmp_path / "m", [1, 2, 3, 1, 1, 2, 3, 1, 2, 1])
    cfg = load_config(None, [f"data.manifest={manifest}", "model.use_segments=false", "evaluate.batch_size=3"])
    torch.manual_seed(0)
    model = create_model(cfg.model).eval()
    (test,) = evaluate_model(model, cfg, manifest, "val")
    assert test["texts"] == 17  # the real captions, not 10 x 5 slots
    w = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32, rank=0, world=1)
    engine = SimpleNamespace(module=RetrievalObjective(model, cfg.loss))  # what validate reads below ZeRO-3
    val = validate(engine, _Shard(cfg, read_split(cfg, "val")), cfg, w)
    metrics = {k: v for k, v in test.items() if k.startswith(("i2t_", "t2i_", "mR"))}
    assert len(metrics) == 7
    assert {k: val[f"val_{k}"] for k in metrics} == pytest.approx(metrics, abs=1e-9)


def test_real_captions_drops_padding_slots():
    from urbancross.evaluate.metrics import real_captions

    text = np.arange(3 * 5 * 2, dtype=np.float32).reshape(3, 5, 2)
    texts, owner = real_captions(text, [2, 1, 5])
    assert owner.tolist() == [0, 0, 1, 2, 2, 2, 2, 2]
    assert texts.tolist() == [text[0, 0].tolist(), text[0, 1].tolist(), text[1, 0].tolist(), *text[2].tolist()]
    with pytest.raises(ValueError, match="num_captions"):
        real_captions(text, [1, 2])


# --------------------------------------------------------------------------- splits


def _splits(table) -> dict[str, str]:
    return dict(zip(table.column("image_id").to_pylist(), table.column("split").to_pylist()))


def test_benchmark_domains_get_seeded_disjoint_train_val_test_by_default(tmp_path):
    from urbancross.data.synth import synthesize
    from urbancross.demo import DEMO_CONFIG

    cfg = SynthConfig(images_per_domain=20, image_size=48)  # the defaults: the reference's 70/10/20
    table = synthesize(cfg, str(tmp_path / "a"))
    split_of = _splits(table)
    assert len(split_of) == table.num_rows == 60  # one split per image: disjoint
    for domain in cfg.domains:
        mine = [s for i, s in split_of.items() if i.startswith(domain)]
        assert (mine.count("train"), mine.count("val"), mine.count("test")) == (14, 2, 4)
    assert _splits(synthesize(cfg, str(tmp_path / "b"))) == split_of  # seeded
    reseeded = _splits(synthesize(SynthConfig(images_per_domain=20, image_size=48, seed=1), str(tmp_path / "c")))
    assert sorted(reseeded.values()) == sorted(split_of.values()) and reseeded != split_of
    demo = load_config(DEMO_CONFIG).synth  # the demo's benchmark has a val split to choose on
    assert round(demo.images_per_domain * demo.val_fraction) >= 10


def test_import_carves_a_seeded_val_split_from_train_only(tmp_path):
    from urbancross.config import DataConfig
    from urbancross.data.importers import carve_val

    split_of = {f"{i:02d}.jpg": "test" if i < 6 else "train" for i in range(30)}
    carved = carve_val(split_of, DataConfig())
    assert sum(s == "val" for s in carved.values()) == 3  # round(0.1 * 30)
    assert {n for n, s in carved.items() if s == "test"} == {n for n, s in split_of.items() if s == "test"}
    assert all(split_of[n] == "train" for n, s in carved.items() if s == "val")
    assert carved == carve_val(dict(reversed(split_of.items())), DataConfig())  # seeded, order-free
    assert carved != carve_val(split_of, DataConfig(split_seed=1))
    eligible = {"20.jpg", "21.jpg"}
    assert {n for n, s in carve_val(split_of, DataConfig(), eligible).items() if s == "val"} == eligible
    has_val = {**split_of, "29.jpg": "val"}
    assert carve_val(has_val, DataConfig()) == has_val  # a release's own val split is kept
    assert carve_val({"a": "train", "b": "test"}, DataConfig(val_fraction=0.5)) == {"a": "train", "b": "test"}


# --------------------------------------------------------------------------- model choice on val


def test_selection_keeps_the_best_epoch_and_stops_after_patience():
    from urbancross.train.selection import Selection

    s = Selection(patience=2)
    assert [s.update(e, v, counts=e > 2) for e, v in enumerate([5.0, 3.0, 2.0, 6.0, 6.0, 4.0], start=1)] == [
        True, False, False, True, False, False
    ]
    assert (s.best, s.best_epoch, s.waited, s.stopped) == (6.0, 4, 2, True)
    ramp = Selection(patience=1)
    for e in range(1, 6):
        ramp.update(e, 1.0, counts=False)  # epochs inside the pacing ramp never stop a stage
    assert not ramp.stopped and ramp.best_epoch == 1
    again = Selection.from_state(s.state(), patience=2)
    assert again == s and Selection.from_state({}, 3) == Selection(patience=3)
    never = Selection(patience=0)
    for e in range(1, 20):
        never.update(e, 0.0)
    assert not never.stopped


def test_promotion_and_validation_galleries_hold_no_test_rows(tmp_path, monkeypatch):
    """The registry gate evaluates on val by default (it read test before), and training's
    validation gallery comes from val; neither sees a test image."""
    from urbancross.config import Config
    from urbancross.data.ingest import read_split
    from urbancross.data.synth import synthesize
    from urbancross.registry import promote
    from urbancross.train.trainer import validation_slice

    manifest = str(tmp_path / "m")
    synthesize(SynthConfig(domains=["Finland", "Spain"], images_per_domain=20, image_size=48), manifest)
    cfg = load_config(None, [f"data.manifest={manifest}"])
    assert cfg.promote.split == "val"
    test_ids = set(read_split(cfg, "test").column("image_id").to_pylist())
    seen: list = []

    def fake_evaluate(model, run_cfg, on_manifest, split):
        seen.append(read_split(run_cfg, split, manifest=on_manifest))
        return [{"tested_on": "Finland", "mR": 1.0}]

    monkeypatch.setattr(promote, "load_urbancross", lambda uri: (None, Config()))
    monkeypatch.setattr(promote, "evaluate_model", fake_evaluate)
    assert promote.evaluate_model_uri(cfg, "runs:/x/model") == {"Finland": 1.0}
    (gallery,) = seen
    assert gallery.num_rows == 4 and not test_ids & set(gallery.column("image_id").to_pylist())
    for domain in ("Finland", "Spain"):
        train, val = validation_slice(cfg, read_split(cfg, "train", domain), domain)
        assert set(val.column("split").to_pylist()) == {"val"} and not test_ids & set(val.column("image_id").to_pylist())


def test_a_stage_exports_its_best_val_epoch_and_stops_early(ray_session, tmp_path):
    """A learning rate too small to change val mR: epoch 1 stays the best, epoch 2 uses the
    patience of 1, so a 4-epoch run stops after 2; the exported weights score val_best_mR on val."""
    from urbancross.data.synth import synthesize
    from urbancross.evaluate.scoring import evaluate_model
    from urbancross.model.factory import create_model
    from urbancross.train import run_train

    manifest = str(tmp_path / "m")
    synthesize(SynthConfig(domains=["Finland"], images_per_domain=30, image_size=48), manifest)
    cfg = load_config(None, [
        f"data.manifest={manifest}", f"out_dir={tmp_path / 'run'}", "model.use_segments=false",
        "train.num_workers=0", "train.batch_size=8", "train.epochs=4", "train.lr=1.0e-12",
        "train.curriculum.enabled=false", "train.patience=1",
    ])
    m = run_train(cfg)["metrics"]
    assert (m["epoch"], m["best_epoch"]) == (2, 1) and m["val_best_mR"] == m["val_mR"]
    model = create_model(cfg.model, pretrained=str(tmp_path / "run" / "train" / "model.pt"))
    (record,) = evaluate_model(model, cfg, manifest, "val")
    assert record["images"] == 3 and record["mR"] == pytest.approx(m["val_best_mR"], abs=1e-6)


# --------------------------------------------------------------------------- learning-rate schedule


def test_lr_schedule_warms_up_then_decays_by_cosine_to_final():
    from urbancross.config import LRScheduleConfig
    from urbancross.train.lr_schedule import lr_factor

    cfg = LRScheduleConfig(warmup=0.1, final=0.01)
    f = [lr_factor(s, 100, cfg) for s in range(100)]
    assert f[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warm-up, at 1 by step 9
    assert f[10] == 1.0 and f[99] == pytest.approx(0.01) and lr_factor(500, 100, cfg) == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))  # never rises after the warm-up
    assert f[10 + 89 // 2] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * 44 / 89)))
    assert [lr_factor(s, 100, cfg) for s in range(100)] == f  # a pure function of (step, total, cfg)
    assert lr_factor(0, 1, LRScheduleConfig()) == pytest.approx(1.0) and lr_factor(3, 0, LRScheduleConfig()) == 0.0
    assert {lr_factor(s, 10, LRScheduleConfig(kind="constant")) for s in range(20)} == {1.0}


def test_adapt_peak_lr_is_far_below_trains_from_one_set_of_defaults():
    from urbancross.config import Config, LRScheduleConfig
    from urbancross.demo import DEMO_CONFIG

    for cfg in (Config(), load_config(DEMO_CONFIG)):
        assert cfg.adapt.lr <= cfg.train.lr / 100
    assert Config().train.lr_schedule == Config().adapt.lr_schedule == LRScheduleConfig()
    assert load_config(None, ["adapt.lr_schedule.warmup=0.2"]).train.lr_schedule.warmup == LRScheduleConfig().warmup
