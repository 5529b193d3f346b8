"""Cross-domain evaluation: scoring on hand-built embeddings, real embedding paths, report files."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from urbancross.config import config_from_dict
from urbancross.evaluate.job import model_entries, run_evaluate
from urbancross.evaluate.report import model_label, pivot, to_markdown, write_report
from urbancross.evaluate.scoring import domain_metrics, gallery
from urbancross.model.embed import embed_dataset, embed_table


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A 3-domain synthesized manifest (4 test images per domain) and two tiny random models."""
    from urbancross.data.synth import synthesize
    from urbancross.model.factory import create_model, save_model

    root = tmp_path_factory.mktemp("bench")
    cfg = config_from_dict(
        {
            "out_dir": str(root / "run"),
            "synth": {"images_per_domain": 8, "test_fraction": 0.5},
            "data": {"manifest": str(root / "manifest")},
            "evaluate": {"batch_size": 5},
        }
    )
    synthesize(cfg.synth, cfg.data.manifest)
    paths = {}
    for seed, name in ((0, "source"), (1, "adapted")):
        torch.manual_seed(seed)
        paths[name] = str(root / name / "model.pt")
        save_model(create_model(cfg.model), paths[name])
    (root / "adapted" / "model.json").write_text(json.dumps({"trained_on": "Finland", "adapted_to": "Spain"}))
    return cfg, paths


def hand_embeddings():
    """Domain A: 3 images (basis vectors) with 2, 1, 3 real captions; the rest are padding.

    Image 1's only caption points at image 2 (and slightly away from image 1).
    """
    e = np.eye(4, dtype=np.float32)
    text = np.tile(e[3], (4, 5, 1))  # padding: must never be scored
    text[0, :2] = [0.99 * e[0], 0.98 * e[0]]
    text[1, 0] = 0.5 * e[2] - 0.1 * e[1]
    text[2, :3] = [0.99 * e[2], 0.98 * e[2], 0.97 * e[2]]
    text[3, 0] = e[0]
    return {
        "image_id": np.array(["a0", "a1", "a2", "b0"], dtype=object),
        "domain": np.array(["A", "A", "A", "B"], dtype=object),
        "image": np.stack([e[0], e[1], e[2], e[0]]),
        "text": text,
        "num_captions": np.array([2, 1, 3, 1]),
    }


def test_gallery_keeps_only_real_captions():
    images, texts, owner = gallery(hand_embeddings(), "A")
    assert images.shape == (3, 4)
    assert owner.tolist() == [0, 0, 1, 2, 2, 2]
    assert not np.any(texts[:, 3])  # no padding caption got in


def test_domain_metrics_hand_worked():
    cfg = config_from_dict({"evaluate": {"ks": [1], "smr": {"enabled": False}}})
    a, b = domain_metrics(hand_embeddings(), cfg.evaluate)
    # i2t: images 0 and 2 hit, image 1 misses (its caption scores -0.1) -> 2/3
    # t2i: 5 of 6 captions find their image (image 1's finds image 2)     -> 5/6
    assert a["tested_on"] == "A" and (a["images"], a["texts"]) == (3, 6)
    assert a["i2t_r1"] == pytest.approx(200 / 3)
    assert a["t2i_r1"] == pytest.approx(500 / 6)
    assert a["mR"] == pytest.approx(75.0)
    assert "smr" not in a
    assert (b["tested_on"], b["i2t_r1"], b["t2i_r1"]) == ("B", 100.0, 100.0)
    cfg = cfg.override({"evaluate.smr.enabled": True})
    with_smr = domain_metrics(hand_embeddings(), cfg.evaluate)[0]
    assert set(with_smr["smr"]) == {"i2t_r1", "t2i_r1", "mR"}


def test_fused_and_image_only_scoring_both_reported():
    """A model that fuses segments is scored both ways, like the reference: its fused embedding
    (plain) and the tile's own embedding (`image_only`); the report has a table for each."""
    cfg = config_from_dict({"evaluate": {"ks": [1], "smr": {"enabled": False}}})
    emb = hand_embeddings()
    other = emb["image"][[1, 0, 2, 3]]
    both = domain_metrics({**emb, "image_only": other}, cfg.evaluate)
    alone = domain_metrics({**emb, "image": other}, cfg.evaluate)
    assert [r["mR"] for r in both] == [r["mR"] for r in domain_metrics(emb, cfg.evaluate)]
    assert [r["image_only"]["mR"] for r in both] == [r["mR"] for r in alone]
    assert both[0]["image_only"]["mR"] != both[0]["mR"]
    records = [{"model": "source", "trained_on": "A", "adapted_to": None, **r} for r in both]
    md = to_markdown(records)
    assert "### mR, image only (without segments)" in md
    assert f"| source (A) | {alone[0]['mR']:.2f} | {alone[1]['mR']:.2f} |" in md.split("image only")[1]


def test_embed_rows_gives_a_fusing_model_its_image_only_embedding(bench):
    import torch

    from urbancross.data.ingest import read_split
    from urbancross.model.embed import embed_rows, numpy_batches
    from urbancross.model.factory import create_model
    from urbancross.model.inputs import ModelInputs

    cfg, _ = bench
    cfg = cfg.override({"model.use_segments": True})
    table = read_split(cfg, "test")
    torch.manual_seed(0)
    model = create_model(cfg.model).eval()
    inputs = ModelInputs(cfg, train=False, keep_ids=True)
    rows = next(numpy_batches(table.slice(0, 2), 2))
    out = embed_rows(model, inputs, rows, cfg)
    with torch.no_grad():
        own = model.encode_image(torch.as_tensor(inputs(rows)["images"])).numpy()
    np.testing.assert_allclose(out["image_only"], own, atol=1e-6)
    assert not np.allclose(out["image"], out["image_only"])  # the fusion's gate is not zero
    plain = cfg.override({"model.use_segments": False})
    assert "image_only" not in embed_rows(create_model(plain.model).eval(), ModelInputs(plain, False, True), rows, plain)


RECORDS = [
    {"model": "source", "trained_on": "Finland", "adapted_to": None, "tested_on": "Finland", "mR": 60.0, "smr": {"mR": 62.5}},
    {"model": "source", "trained_on": "Finland", "adapted_to": None, "tested_on": "Spain", "mR": 40.0, "smr": {"mR": 41.0}},
    {"model": "adapted", "trained_on": "Finland", "adapted_to": "Spain", "tested_on": "Spain", "mR": 45.25, "smr": {"mR": 47.0}},
]


def test_report_table_and_files(tmp_path):
    assert model_label(RECORDS[2]) == "adapted (Finland→Spain)"
    rows, cols, values = pivot(RECORDS, smr=True)
    assert rows == ["source (Finland)", "adapted (Finland→Spain)"] and cols == ["Finland", "Spain"]
    assert values == [[62.5, 41.0], [None, 47.0]]
    md = to_markdown(RECORDS).splitlines()
    assert md[2:5] == ["| model \\ tested on | Finland | Spain |", "|---|---|---|", "| source (Finland) | 60.00 | 40.00 |"]
    assert md[5] == "| adapted (Finland→Spain) | – | 45.25 |"
    assert "### mR with SMR re-ranking" in md
    paths = write_report(RECORDS, tmp_path)
    assert json.loads(open(paths["json"]).read()) == RECORDS
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cross_domain.json", "cross_domain.md", "cross_domain.png"]


def test_embed_table_matches_the_model(bench):
    from urbancross.data.ingest import read_split
    from urbancross.model.factory import create_model, get_tokenizer

    cfg, paths = bench
    model = create_model(cfg.model, pretrained=paths["source"]).eval()
    table = read_split(cfg, "test")
    emb = embed_table(model, table, cfg)
    assert emb["image"].shape == (12, model.embed_dim) and emb["text"].shape == (12, 5, model.embed_dim)
    assert list(emb["image_id"]) == sorted(table.column("image_id").to_pylist())
    assert emb["num_captions"].tolist() == [5] * 12
    np.testing.assert_allclose(np.linalg.norm(emb["image"], axis=1), 1.0, atol=1e-5)
    row = table.filter(pc.equal(table.column("image_id"), emb["image_id"][0]))
    caption = row.column("captions")[0].as_py()[2]
    with torch.no_grad():
        direct = model.encode_text(get_tokenizer(cfg.model)([caption]))[0].numpy()
    np.testing.assert_allclose(emb["text"][0, 2], direct, atol=1e-5)


def test_model_entries_metadata(bench):
    cfg, paths = bench
    entries = model_entries(cfg, {"source": paths["source"], "adapted": paths["adapted"], "other": {"path": paths["source"], "trained_on": "Spain"}})
    assert entries["source"] == {"path": paths["source"], "trained_on": "Finland", "adapted_to": None}
    assert entries["adapted"]["adapted_to"] == "Spain"  # from model.json
    assert (entries["other"]["trained_on"], entries["other"]["adapted_to"]) == ("Spain", None)
    with pytest.raises(FileNotFoundError, match="no weights file"):
        model_entries(cfg, {"x": "/nonexistent/model.pt"})


def test_run_evaluate_writes_and_logs_the_table(bench, tmp_path, monkeypatch):
    cfg, paths = bench
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is ./mlruns
    cfg = config_from_dict({**cfg.to_dict(), "out_dir": str(tmp_path / "run")})
    records = run_evaluate(cfg, paths, use_ray=False)
    assert [(r["model"], r["tested_on"]) for r in records] == [
        (m, d) for m in ("source", "adapted") for d in ("Finland", "Germany", "Spain")
    ]
    assert all(r["trained_on"] == "Finland" for r in records)
    assert [r["adapted_to"] for r in records] == [None] * 3 + ["Spain"] * 3
    assert all(set(r["smr"]) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mR"} for r in records)
    for r in records:  # mR is the mean of the six recalls
        assert r["mR"] == pytest.approx(np.mean([r[k] for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")]))
    saved = json.loads((tmp_path / "run" / "evaluate" / "cross_domain.json").read_text())
    assert saved == records
    runs = mlflow.search_runs(experiment_names=[cfg.mlflow.experiment], output_format="list")
    run = runs[0]
    assert run.data.metrics["adapted.Spain.mR"] == pytest.approx(records[5]["mR"])
    assert run.data.metrics["source.Finland.smr_mR"] == pytest.approx(records[0]["smr"]["mR"])
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"cross_domain.json", "cross_domain.md", "cross_domain.png"} <= logged


@pytest.mark.ray
def test_ray_path_equals_in_process_path(bench, ray_session):
    from urbancross.data.ingest import read_split
    from urbancross.model.factory import create_model

    cfg, paths = bench
    table = read_split(cfg, "test")
    ref = embed_table(create_model(cfg.model, pretrained=paths["source"]), table, cfg)
    got = embed_dataset(paths["source"], table, cfg)
    assert list(got["image_id"]) == list(ref["image_id"])
    np.testing.assert_allclose(got["image"], ref["image"], atol=1e-5)
    np.testing.assert_allclose(got["text"], ref["text"], atol=1e-5)
    for a, b in zip(domain_metrics(got, cfg.evaluate), domain_metrics(ref, cfg.evaluate)):
        assert (a["tested_on"], a["mR"], a["smr"]["mR"]) == (b["tested_on"], b["mR"], b["smr"]["mR"])
