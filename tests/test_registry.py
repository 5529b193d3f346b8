"""MLflow registry: the decision rule, the pyfunc model, promotion by aliases, index and search.

Runs against a real `mlflow server` process (module fixture) and the default local SQLite
store. "Better" is real: one model has its projection heads fitted to the evaluation split
(cheap: the towers' features are computed once), the other is random.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from payload import plant  # tests/ helper
from servers import free_port
from servers import mlflow_server as start_mlflow_server
from urbancross.cli import main
from urbancross.config import config_from_dict
from urbancross.model.pyfunc import load_urbancross, log_model
from urbancross.registry.promote import decide, promote
from urbancross.registry.search import build_index, index_manifest, read_index, search, top_k
from urbancross.tracking import RegistryError, mlflow_run

# --------------------------------------------------------------------------- decide (pure)


def test_decide_first_version_wins():
    assert decide({"A": 10.0}, None, margin=1.0, max_domain_drop=0.0) == (True, "no champion yet")


def test_decide_needs_the_margin():
    champ = {"A": 50.0, "B": 60.0}  # mean 55
    ok, reason = decide({"A": 51.0, "B": 60.0}, champ, margin=0.5, max_domain_drop=2.0)  # mean 55.5
    assert ok and "gain +0.50 >= margin 0.5" in reason
    ok, reason = decide({"A": 50.8, "B": 60.0}, champ, margin=0.5, max_domain_drop=2.0)  # mean 55.4
    assert not ok and "gain +0.40 < margin 0.5" in reason


def test_decide_refuses_a_domain_drop_even_with_a_higher_mean():
    ok, reason = decide({"A": 70.0, "B": 57.5}, {"A": 50.0, "B": 60.0}, margin=0.5, max_domain_drop=2.0)
    assert not ok and reason == "mR on B drops by 2.50 > max_domain_drop 2"
    assert decide({"A": 70.0, "B": 58.0}, {"A": 50.0, "B": 60.0}, margin=0.5, max_domain_drop=2.0)[0]


def test_decide_refuses_missing_domains_and_empty_scores():
    assert decide({"A": 99.0}, {"A": 50.0, "B": 60.0}, 0.0, 100.0) == (False, "candidate was not evaluated on B")
    assert decide({}, None, 0.0, 0.0)[0] is False


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_decide_refuses_non_finite_scores(bad):
    champ = {"A": 50.0, "B": 60.0}
    ok, reason = decide({"A": bad, "B": 70.0}, champ, margin=0.5, max_domain_drop=2.0)
    assert not ok and reason == f"candidate mR on A is {bad}: not a finite score"
    assert decide({"A": bad}, None, 0.0, 0.0)[0] is False  # not even as the first version
    ok, reason = decide({"A": 55.0, "B": 65.0}, {"A": 50.0, "B": bad}, margin=0.5, max_domain_drop=2.0)
    assert not ok and reason == f"champion mR on B is {bad}: not a finite score"


def test_top_k_ranks_only_the_rows_kept():
    vectors, query = np.eye(4, dtype=np.float32), np.array([0.1, 0.4, 0.3, 0.2], np.float32)
    order, scores = top_k(vectors, query, 2, keep=np.array([True, False, True, True]))
    assert order.tolist() == [2, 3] and scores.tolist() == pytest.approx([0.3, 0.2])
    assert top_k(vectors, query, 9)[0].tolist() == [1, 2, 3, 0]
    assert top_k(vectors, query, 3, keep=np.zeros(4, bool))[0].tolist() == []


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def quiet_single_thread():
    """One torch thread (the 2 cores are shared with the tracking server) and no progress bars."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    old = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    yield
    torch.set_num_threads(threads)
    if old is None:
        os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    else:
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = old


def fit_projections(model, cfg, table, steps: int = 200) -> None:
    """Fit only the two projection heads to `table` (InfoNCE on cached tower features)."""
    from urbancross.model.embed import numpy_batches
    from urbancross.model.inputs import ModelInputs

    x = ModelInputs(cfg, train=False)(next(numpy_batches(table, table.num_rows)))
    clip = model.clip
    vproj, tproj = clip.visual.proj, clip.text_projection
    tokens = torch.as_tensor(x["tokens"])
    n, c, length = tokens.shape
    with torch.no_grad():
        clip.visual.proj, clip.text_projection = None, None  # towers output pre-projection features
        img = clip.visual(torch.as_tensor(x["images"]))
        txt = clip.encode_text(tokens.reshape(n * c, length))
    clip.visual.proj, clip.text_projection = vproj, tproj
    owner = torch.arange(n).repeat_interleave(c)
    opt = torch.optim.Adam([vproj, tproj], lr=1e-2)
    for _ in range(steps):
        i, t = F.normalize(img @ vproj, dim=-1), F.normalize(txt @ tproj, dim=-1)
        loss = F.cross_entropy(20 * t @ i.T, owner) + F.cross_entropy(20 * i @ t[::c].T, torch.arange(n))
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A 3-domain manifest (3 val and 6 test images each) and two weight files: `random` and
    `trained` (fitted to val, where promotion compares and the search test queries)."""
    from urbancross.data.ingest import read_split
    from urbancross.data.synth import synthesize
    from urbancross.model.factory import create_model, save_model

    root = tmp_path_factory.mktemp("registry")
    raw = {
        "out_dir": str(root / "run"),
        "synth": {"images_per_domain": 12, "test_fraction": 0.5, "val_fraction": 0.25},
        "data": {"manifest": str(root / "manifest")},
        "promote": {"margin": 0.5, "max_domain_drop": 2.0},
    }
    cfg = config_from_dict(raw)
    synthesize(cfg.synth, cfg.data.manifest)
    torch.manual_seed(0)
    model = create_model(cfg.model)
    weights = {"random": str(root / "random.pt"), "trained": str(root / "trained.pt")}
    save_model(model, weights["random"])
    fit_projections(model, cfg, read_split(cfg, "val"))
    save_model(model, weights["trained"])
    return raw, weights


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on a free local port (SQLite backend, proxied artifacts)."""
    with start_mlflow_server(tmp_path_factory.mktemp("server")) as uri:
        yield uri


def make_cfg(raw: dict, tmp_path: Path, tracking_uri: str = "", **sections):
    """The bench config on its own store (`tracking_uri`, or SQLite under `tmp_path`)."""
    return config_from_dict({**raw, "out_dir": str(tmp_path / "run"), "mlflow": {"tracking_uri": tracking_uri}, **sections})


def log_run(cfg, weights: str) -> str:
    """A training run that logged the model at `weights` (what train/adapt do at their end)."""
    with mlflow_run(cfg, "train") as run:
        log_model(weights, cfg)
    return run.info.run_id


def encode_text(weights: str, cfg, texts: list[str]) -> np.ndarray:
    from urbancross.model.factory import create_model, get_tokenizer

    model = create_model(cfg.model, pretrained=weights).eval()
    with torch.no_grad():
        return model.encode_text(get_tokenizer(cfg.model)(texts)).numpy()


def first_val_caption(cfg) -> tuple[str, str]:
    from urbancross.data.ingest import read_split

    row = read_split(cfg, "val").slice(0, 1).to_pylist()[0]
    return row["image_id"], row["captions"][0]


# --------------------------------------------------------------------------- pyfunc


def test_pyfunc_maps_text_and_images_to_the_models_embeddings(bench, tmp_path, monkeypatch):
    from urbancross.data.ingest import read_split
    from urbancross.model.embed import embed_table

    raw, weights = bench
    monkeypatch.chdir(tmp_path)  # a SQLite store puts artifacts under ./mlruns
    cfg = make_cfg(raw, tmp_path)
    with mlflow_run(cfg, "train"):
        uri = log_model(weights["trained"], cfg)
    info = mlflow.models.get_model_info(uri)
    assert info.signature.inputs.input_names() == ["text", "image"]
    assert info.metadata["preset"] == "tiny" and info.metadata["model_config"]["use_segments"] is True
    pm = mlflow.pyfunc.load_model(uri)
    texts = ["two large buildings north of a road", "a lake"]
    np.testing.assert_allclose(pm.predict(pd.DataFrame({"text": texts})), encode_text(weights["trained"], cfg, texts), atol=1e-5)
    table = read_split(cfg, "test").slice(0, 3)
    got = pm.predict(pd.DataFrame({"image": table.column("image").to_pylist()}))
    model, _ = load_urbancross(uri)
    want = embed_table(model, table, cfg)  # evaluation's image embedding (rows sorted by id)
    order = np.argsort(table.column("image_id").to_pylist())
    np.testing.assert_allclose(got[order], want["image"], atol=1e-5)
    with pytest.raises(Exception, match="exactly one of the columns"):
        pm.predict(pd.DataFrame({"text": ["a"], "image": [b"x"]}))


def test_promote_index_and_search_never_unpickle_a_logged_model(bench, tmp_path, monkeypatch):
    """A planted python_model.pkl runs code only through the serving pyfunc, not our commands;
    planted weights are refused."""
    from urbancross.model.factory import CheckpointError
    from urbancross.registry.promote import evaluate_model_uri

    raw, weights = bench
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg(raw, tmp_path)
    with mlflow_run(cfg, "train"):
        uri = log_model(weights["trained"], cfg)
    (pkl,) = (tmp_path / "run").rglob("python_model.pkl")
    marker = tmp_path / "pwned"
    plant(pkl, marker, torch_format=False)  # cloudpickle's file: a bare pickle

    assert set(evaluate_model_uri(cfg, uri)) == {"Finland", "Germany", "Spain"}  # promote's evaluation
    index = str(tmp_path / "index.parquet")
    assert build_index(uri, cfg.data.manifest, index, cfg, split="val", use_ray=False)["images"] == 9
    assert index_manifest(index) == cfg.data.manifest  # `serve` finds the tiles' lat/lon and images there
    image_id, caption = first_val_caption(cfg)
    assert search(uri, index, caption, top=1)[0]["image_id"] == image_id
    assert not marker.exists()

    (weights_file,) = pkl.parent.glob("artifacts/*.pt")
    plant(weights_file, marker, lambda p: {"state_dict": p})
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_urbancross(uri)
    assert not marker.exists()
    with pytest.raises(AttributeError):  # the serving path does unpickle: the plant is live
        mlflow.pyfunc.load_model(uri)
    assert marker.read_text() == "pwned"


# --------------------------------------------------------------------------- promotion


def test_promote_end_to_end_on_a_tracking_server(bench, mlflow_server, tmp_path, monkeypatch, capsys):
    raw, weights = bench
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg(raw, tmp_path, mlflow_server)
    random_run, trained_run = log_run(cfg, weights["random"]), log_run(cfg, weights["trained"])

    first = promote(cfg, random_run, "city")
    assert (first["version"], first["promoted"], first["reason"]) == (1, True, "no champion yet")
    second = promote(cfg, trained_run, "city")
    assert (second["version"], second["decision"], second["champion_version"]) == (2, "champion", 1)
    assert second["champion_mR"] == first["candidate_mR"]  # the champion re-evaluated: same split, same numbers
    assert all(second["candidate_mR"][d] > first["candidate_mR"][d] + 2 for d in ("Finland", "Germany", "Spain"))
    third = promote(cfg, random_run, "city")
    assert (third["version"], third["decision"], third["promoted"]) == (3, "challenger", False)
    assert third["candidate_mR"] == first["candidate_mR"]
    assert "drops by" in third["reason"]

    client = mlflow.MlflowClient(cfg.tracking_uri())
    assert int(client.get_model_version_by_alias("city", "champion").version) == 2
    assert int(client.get_model_version_by_alias("city", "challenger").version) == 3
    tags = client.get_model_version("city", "3").tags
    assert tags["promote.decision"] == "challenger" and tags["promote.champion_version"] == "2"
    assert json.loads(tags["promote.candidate_mR"]) == third["candidate_mR"]
    assert json.loads(tags["promote.champion_mR"]) == second["candidate_mR"]
    assert tags["promote.reason"] == third["reason"] and tags["promote.time"].startswith("20")

    # the champion serves search: index the val split, then query with one of its captions
    index = str(tmp_path / "index.parquet")
    summary = build_index("models:/city@champion", cfg.data.manifest, index, cfg, split="val", use_ray=False)
    assert summary["images"] == 9
    ids, domains, vectors, built_with = read_index(index)
    assert built_with == "models:/city@champion" and vectors.shape == (9, 128)
    image_id, caption = first_val_caption(cfg)
    hits = search("models:/city@champion", index, caption, top=3)
    order, scores = top_k(vectors, encode_text(weights["trained"], cfg, [caption])[0], 3)
    assert [h["image_id"] for h in hits] == [ids[i] for i in order]
    assert [h["score"] for h in hits] == pytest.approx(scores.tolist(), abs=1e-5)
    assert hits[0]["image_id"] == image_id  # the fitted model finds the captioned image

    capsys.readouterr()  # drop MLflow's "View run" lines printed so far
    code = main(["search", "--model", "models:/city@champion", "--index", index, "--top", "2",
                 "--set", f"mlflow.tracking_uri={mlflow_server}", caption])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(lines) == 2 and lines[0].split()[-1] == image_id


def test_failed_promotion_leaves_no_version(bench, mlflow_server, tmp_path, monkeypatch):
    raw, weights = bench
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg(raw, tmp_path, mlflow_server)
    run_id = log_run(cfg, weights["random"])

    def broken(cfg, uri):
        raise RuntimeError("evaluation failed")

    with pytest.raises(RuntimeError, match="evaluation failed"):
        promote(cfg, run_id, "ghost", evaluate=broken)
    with pytest.raises(mlflow.exceptions.MlflowException):
        promote(cfg, "0" * 32, "ghost")  # no such run
    assert mlflow.MlflowClient(cfg.tracking_uri()).search_model_versions("name='ghost'") == []


def test_tracking_server_down_fails_fast_naming_the_uri(bench, tmp_path, capsys):
    raw, _ = bench
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    code = main(["promote", "--run", "0" * 32, "--set", f"mlflow.tracking_uri={uri}", "--set", f"out_dir={tmp_path}"])
    assert code == 1 and time.monotonic() - start < 10
    assert f"MLflow tracking server {uri} is not reachable" in capsys.readouterr().err


def test_promote_on_the_local_store_with_given_scores(bench, tmp_path, monkeypatch):
    """The gate's bookkeeping on the default SQLite store; scores come through the seam."""
    raw, weights = bench
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg(raw, tmp_path)
    run_id = log_run(cfg, weights["random"])
    v1 = {"A": 60.0, "B": 60.0}
    scores = iter([v1, {"A": 70.0, "B": 55.0}, v1, {"A": 61.0, "B": 60.2}, v1])  # candidate, then champion
    seen = []

    def given(cfg, uri):
        seen.append(uri)
        return next(scores)

    assert promote(cfg, run_id, evaluate=given)["decision"] == "champion"  # first version
    refused = promote(cfg, run_id, evaluate=given)
    assert refused["decision"] == "challenger" and refused["reason"] == "mR on B drops by 5.00 > max_domain_drop 2"
    assert promote(cfg, run_id, evaluate=given)["decision"] == "champion"  # gain +0.60 >= 0.5
    assert seen == [f"runs:/{run_id}/model", f"runs:/{run_id}/model", "models:/urbancross/1", f"runs:/{run_id}/model", "models:/urbancross/1"]
    client = mlflow.MlflowClient(cfg.tracking_uri())
    assert int(client.get_model_version_by_alias("urbancross", "champion").version) == 3
    assert int(client.get_model_version_by_alias("urbancross", "challenger").version) == 2
    pm = mlflow.pyfunc.load_model("models:/urbancross@champion")
    assert pm.predict(pd.DataFrame({"text": ["a lake"]})).shape == (1, 128)


def test_concurrent_promotions_only_one_moves_the_champion(bench, tmp_path, monkeypatch):
    """Two better candidates evaluated against the same champion: the first alias move wins,
    the second sees the champion moved since it evaluated and stays challenger."""
    raw, weights = bench
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg(raw, tmp_path)
    run_id = log_run(cfg, weights["random"])
    assert promote(cfg, run_id, evaluate=lambda cfg, uri: {"A": 50.0})["version"] == 1
    both_evaluated = threading.Barrier(2, timeout=120)

    def better(cfg, uri):
        if uri.startswith("models:/"):
            both_evaluated.wait()  # both read champion v1 before either moves it
            return {"A": 50.0}
        return {"A": 60.0}

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: promote(cfg, run_id, evaluate=better), range(2)))
    assert sorted(r["decision"] for r in results) == ["challenger", "champion"]
    winner, loser = sorted(results, key=lambda r: r["decision"] != "champion")
    assert loser["reason"] == f"champion moved from v1 to v{winner['version']} during evaluation: promote again to compare with it"
    assert winner["champion_version"] == loser["champion_version"] == 1
    client = mlflow.MlflowClient(cfg.tracking_uri())
    assert int(client.get_model_version_by_alias("urbancross", "champion").version) == winner["version"]
    assert client.get_model_version("urbancross", str(loser["version"])).tags["promote.decision"] == "challenger"
    assert [m.name for m in client.search_registered_models()] == ["urbancross"]  # the lock is gone


def test_alias_lock_waits_then_names_the_lock(bench, tmp_path, monkeypatch):
    from urbancross.registry.promote import alias_lock

    raw, _ = bench
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg(raw, tmp_path)
    client = mlflow.MlflowClient(cfg.tracking_uri())
    with alias_lock(client, "m"):
        with pytest.raises(RegistryError, match=r"m\.promote-lock held for over 0.3s"):
            with alias_lock(client, "m", wait=0.3):
                pass
    with alias_lock(client, "m", wait=0.3):  # released
        pass


@pytest.mark.ray
def test_index_with_ray_equals_in_process(bench, tmp_path, monkeypatch, ray_session):
    raw, weights = bench
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg(raw, tmp_path)
    with mlflow_run(cfg, "train") as run:
        log_model(weights["trained"], cfg)
    uri = f"runs:/{run.info.run_id}/model"
    build_index(uri, cfg.data.manifest, str(tmp_path / "ray.parquet"), cfg, use_ray=True)
    build_index(uri, cfg.data.manifest, str(tmp_path / "local.parquet"), cfg, use_ray=False)
    ray_ids, ray_domains, ray_vec, _ = read_index(str(tmp_path / "ray.parquet"))
    ids, domains, vec, _ = read_index(str(tmp_path / "local.parquet"))
    assert len(ids) == 36 and ray_ids == ids and ray_domains == domains
    np.testing.assert_allclose(ray_vec, vec, atol=1e-5)
