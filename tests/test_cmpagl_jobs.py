"""`model.family: cmpagl` through the system's jobs: train (decoded-once cache with BERT tokens),
adapt, evaluate (per retrieval stage, the re-scoring as a Ray Data stage), registry pyfunc +
index + search (matching-head re-scoring), `demo --method cmpagl`, and one real Tune trial."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from urbancross.config import load_config

STAGE_NAMES = {"prealign", "prealign_smr", "itm", "itm_smr"}


def cmpagl_cfg(manifest: str, out_dir, *overrides: str):
    return load_config(None, [
        f"data.manifest={manifest}", f"out_dir={out_dir}", "model.family=cmpagl", "loss.kind=triplet",
        "train.num_workers=0", "train.ingest_actors=0", "train.batch_size=4", "train.epochs=2",
        "train.curriculum.difficulty=caption_complexity", "adapt.epochs=2", "evaluate.rerank_k=3", *overrides,
    ])


@pytest.fixture(scope="module")
def trained(ray_session, manifest, tmp_path_factory):
    from urbancross.train import run_train

    cfg = cmpagl_cfg(manifest, tmp_path_factory.mktemp("run"), "train.cache=disk")
    return cfg, run_train(cfg)


def test_config_family_and_factory():
    from urbancross.model.cmpagl import CMPAGLModel
    from urbancross.model.factory import create_model, get_tokenizer, image_size

    cfg = load_config(None, ["model.family=cmpagl", "model.gswin_global=false"])
    assert not cfg.model.uses_segments and cfg.model.use_segments  # CMPAGL never takes segments
    model = create_model(cfg.model)
    assert isinstance(model, CMPAGLModel) and image_size(cfg.model) == 64
    assert not model.cfg.image.global_local  # the plain-Swin ablation
    ids = get_tokenizer(cfg.model)(["two buildings"])
    assert ids.shape == (1, model.cfg.context_length) and ids[0, 0] == model.tokenizer.vocab.index("[CLS]")
    with pytest.raises(Exception, match="family"):
        load_config(None, ["model.family=albef"])


def test_a_batch_of_one_trains_the_matching_head_on_its_positive_only():
    """Adapt's last target batch can hold one row: nothing to mine, so ITM sees the positive pair."""
    from urbancross.config import LossConfig
    from urbancross.loss import cmpagl_loss
    from urbancross.model.cmpagl import build_cmpagl

    torch.manual_seed(0)
    model = build_cmpagl("tiny")
    out = model(torch.randn(1, 3, 64, 64), model.tokenizer(["a lake"]))
    assert out["itm_logits"].shape == (1, 1, 2) and out["itm_negatives"] is None
    loss, parts = cmpagl_loss(out, LossConfig(kind="triplet"))
    want = torch.nn.functional.cross_entropy(out["itm_logits"][0], torch.tensor([1]))
    assert torch.isfinite(loss) and parts["itm"].item() == pytest.approx(want.item())


@pytest.mark.ray
def test_cmpagl_trains_on_bert_tokens_adapts_and_evaluates_per_stage(trained, tmp_path):
    from urbancross.evaluate.job import run_evaluate
    from urbancross.evaluate.rerank import STAGES
    from urbancross.model.cmpagl import build_cmpagl
    from urbancross.model.factory import create_model
    from urbancross.train import run_adapt

    cfg, result = trained
    m = result["metrics"]
    assert m["epoch"] == 2 and np.isfinite(m["loss"]) and 0.0 <= m["val_mR"] <= 100.0
    caches = list(Path(cfg.out_dir, "train", "cache").glob("*/tokens.npy"))
    assert len(caches) == 1 and not list(caches[0].parent.glob("segments.npy"))
    tokens = np.load(caches[0])
    vocab = build_cmpagl("tiny").tokenizer.vocab
    assert (tokens[:, :, 0] == vocab.index("[CLS]")).all() and tokens.max() < len(vocab)  # BERT ids, not CLIP's

    trained_model = create_model(cfg.model, pretrained=result["model_path"])
    adapted = run_adapt(cfg)
    assert adapted["metrics"]["epoch"] == 2 and adapted["metrics"]["adv_weight"] > 0
    after = create_model(cfg.model, pretrained=adapted["model_path"])
    assert not torch.equal(after.itm_head.weight, trained_model.itm_head.weight)  # ITM keeps training in adapt

    records = run_evaluate(cfg.override({"evaluate.output": str(tmp_path / "eval")}), use_ray=False)
    assert {(r["model"], r["tested_on"]) for r in records} == {(n, d) for n in ("source", "adapted") for d in ("Finland", "Spain")}
    for r in records:
        assert r["method"] == "cmpagl" and set(r["stages"]) == set(STAGES)
        assert r["stages"]["prealign"]["mR"] == pytest.approx(r["mR"])  # stage 1 is the plain ranking
        assert r["stages"]["prealign_smr"]["mR"] == pytest.approx(r["smr"]["mR"])
    saved = json.loads((tmp_path / "eval" / "cross_domain.json").read_text())
    assert saved[0]["stages"]["itm"].keys() == records[0]["stages"]["itm"].keys()
    assert "re-scored by the matching head, then SMR" in (tmp_path / "eval" / "cross_domain.md").read_text()


@pytest.mark.ray
def test_rescoring_as_a_ray_data_stage_matches_in_process(trained):
    from urbancross.data.ingest import read_split
    from urbancross.evaluate.rerank import domain_stages
    from urbancross.model.embed import embed_table
    from urbancross.model.factory import create_model

    cfg, result = trained
    model = create_model(cfg.model, pretrained=result["model_path"]).eval()
    table = read_split(cfg, "test")
    emb = embed_table(model, table, cfg)
    keep = emb["domain"].astype(str) == "Spain"  # one gallery: one actor pool start
    emb = {k: v[keep] for k, v in emb.items()}
    here = domain_stages(cfg, table, emb, model=model)
    ray_data = domain_stages(cfg, table, emb, weights=result["model_path"])
    assert set(here) == {"Spain"} and set(here["Spain"]) == {"prealign", "prealign_smr", "itm", "itm_smr"}
    for domain in here:
        for stage in here[domain]:
            assert here[domain][stage] == pytest.approx(ray_data[domain][stage], abs=1e-6)


def test_search_rescores_the_top_k_with_the_matching_head(trained, tmp_path, monkeypatch):
    import mlflow
    import pandas as pd

    from urbancross.data.ingest import read_split
    from urbancross.model.factory import create_model, get_tokenizer
    from urbancross.model.pyfunc import load_urbancross, log_model
    from urbancross.registry.search import build_index, read_fusion_tokens, search
    from urbancross.tracking import mlflow_run

    cfg, result = trained
    monkeypatch.chdir(tmp_path)
    cfg = cfg.override({"mlflow.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "out_dir": str(tmp_path / "run")})
    with mlflow_run(cfg, "train"):
        uri = log_model(result["model_path"], cfg)
    model, model_cfg = load_urbancross(uri)
    assert model_cfg.model.family == "cmpagl"
    text = ["two large buildings north of a road"]
    want = create_model(cfg.model, pretrained=result["model_path"]).eval().encode_text(get_tokenizer(cfg.model)(text))
    got = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"text": text}))
    np.testing.assert_allclose(got, want.detach().numpy(), atol=1e-5)

    index = str(tmp_path / "index.parquet")
    assert build_index(uri, cfg.data.manifest, index, cfg, split="test", use_ray=False)["images"] == 6
    tokens = read_fusion_tokens(index)
    assert tokens is not None and tokens.shape[0] == 6
    caption = read_split(cfg, "test").slice(0, 1).to_pylist()[0]["captions"][0]
    hits = search(uri, index, caption, top=3)
    assert len(hits) == 3 and all(0.0 <= h["score"] <= 1.0 for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_demo_method_cmpagl_sets_the_family_before_any_set(monkeypatch, tmp_path):
    from urbancross import cli, demo

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda cfg: seen.setdefault("cfg", cfg))
    assert cli.main(["demo", "--method", "cmpagl", "--out", str(tmp_path), "--set", "train.lr=0.001"]) == 0
    cfg = seen["cfg"]
    assert (cfg.model.family, cfg.model.pretrained, cfg.loss.kind, cfg.train.lr) == ("cmpagl", "", "triplet", 0.001)
    seen.clear()
    assert cli.main(["demo", "--out", str(tmp_path)]) == 0
    assert seen["cfg"].model.family == "urbancross"


@pytest.mark.ray
@pytest.mark.slow  # one real Tune trial of Ray Train + DeepSpeed with a CMPAGL model: about 75 s
def test_one_tune_trial_trains_cmpagl_under_ray_train(ray_session, manifest, tmp_path):
    import yaml

    from urbancross.tune import run_tune

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"stage": "train", "params": {"train.curriculum.pacing": {"grid": ["linear"]}}}))
    cfg = cmpagl_cfg(manifest, tmp_path / "run", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
                     "train.num_workers=1", "train.epochs=1", "train.val_images=2", "train.ingest_cpus=0.25",
                     "tune.num_samples=1", "tune.max_concurrent_trials=1", "tune.cpus_per_trial=0.25")
    summary = run_tune(cfg, space)
    (trial,) = summary["trials"]
    assert trial["error"] is None and 0.0 <= trial["metric"] <= 100.0
    assert load_config(summary["best_config"]).model.family == "cmpagl"
