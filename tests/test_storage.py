"""Storage locations as URIs: a `file://` out_dir is written where it points, never as a local
`file:/...` folder (what `Path()` made of it, and of `s3://`)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from urbancross import storage
from urbancross.config import ModelConfig, SynthConfig, load_config
from urbancross.model.factory import create_model, save_model


def test_join_keeps_a_uri_a_uri():
    assert storage.join("s3://bucket/run", "train", "model.pt") == "s3://bucket/run/train/model.pt"
    assert storage.join("s3://bucket/run/", "x") == "s3://bucket/run/x"
    assert storage.join("/tmp/run", "x") == os.path.join("/tmp/run", "x")
    assert storage.local_path("file:///tmp/run/x") == "/tmp/run/x"
    assert storage.local_path("/tmp/run/x") == "/tmp/run/x"


def test_file_uri_round_trips_json_and_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = (tmp_path / "out").as_uri()
    storage.write_json(storage.join(base, "a", "r.json"), {"x": 1})
    assert storage.read_json(storage.join(base, "a", "r.json")) == {"x": 1}
    assert json.loads((tmp_path / "out" / "a" / "r.json").read_text()) == {"x": 1}
    torch.manual_seed(0)
    model = create_model(ModelConfig(use_segments=False))
    uri = storage.join(base, "train", "model.pt")
    save_model(model, uri)
    back = create_model(ModelConfig(use_segments=False), pretrained=uri)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no `file:` folder in the working directory
    assert [p.name for p in (tmp_path / "out" / "train").iterdir()] == ["model.pt"]  # no temporary file left


@pytest.mark.ray
def test_training_writes_a_file_uri_out_dir_where_it_points(ray_session, tmp_path, monkeypatch):
    from urbancross.data.synth import synthesize
    from urbancross.train import run_train

    monkeypatch.chdir(tmp_path)
    manifest = str(tmp_path / "manifest")
    synthesize(SynthConfig(domains=["Finland"], images_per_domain=8, seed=0), manifest)
    out = tmp_path / "out"
    cfg = load_config(None, [f"data.manifest={manifest}", f"out_dir={out.as_uri()}", "model.use_segments=false",
                             "train.num_workers=0", "train.ingest_actors=0", "train.batch_size=4", "train.epochs=1"])
    result = run_train(cfg)
    assert result["model_path"] == storage.join(out.as_uri(), "train", "model.pt")
    for name in ("model.pt", "result.json", "run.json", "config.yaml", "model.json"):
        assert (out / "train" / name).is_file(), name
    assert json.loads((out / "train" / "result.json").read_text())["mlflow_run_id"] == result["mlflow_run_id"]
    assert not any(p.name.startswith("file:") for p in tmp_path.iterdir())
