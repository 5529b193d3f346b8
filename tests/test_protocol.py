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
    w = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)
    val = validate(RetrievalObjective(model, cfg.loss), _Shard(cfg, read_split(cfg, "val")), cfg, w)
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
