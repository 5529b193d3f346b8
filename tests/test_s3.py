"""Storage on an S3-compatible server (moto in server mode on 127.0.0.1): what a cluster writes
to `s3://` lands in the bucket, manifests are replaced atomically there (versioned, one pointer
PUT), and an output prefix holding someone else's objects is refused, never emptied."""

from __future__ import annotations

import json

import pytest

from urbancross import storage
from urbancross.config import ModelConfig, SynthConfig, load_config
from urbancross.data.manifest import POINTER, ManifestError, ManifestWriter, current, read_manifest
from urbancross.data.synth import synthesize

moto_server = pytest.importorskip("moto.server")
pafs = pytest.importorskip("pyarrow.fs")

BUCKET = "urbancross-test"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 and the environment that points pyarrow (and Ray) at it."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        pafs.S3FileSystem(allow_bucket_creation=True, endpoint_override=endpoint, access_key="testing",
                          secret_key="testing", region="us-east-1").create_dir(BUCKET)
        yield f"s3://{BUCKET}"
    server.stop()


def keys(uri: str) -> list[str]:
    fs, path = pafs.FileSystem.from_uri(uri)
    return sorted(e.path[len(path) + 1:] for e in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                  if e.type == pafs.FileType.File)


def test_json_and_weights_round_trip_through_the_bucket(s3):
    import torch

    from urbancross.model.factory import create_model, save_model

    storage.write_json(storage.join(s3, "a", "r.json"), {"x": 1})
    assert storage.read_json(f"{s3}/a/r.json") == {"x": 1}
    torch.manual_seed(0)
    model = create_model(ModelConfig(use_segments=False))
    save_model(model, f"{s3}/a/model.pt")
    back = create_model(ModelConfig(use_segments=False), pretrained=f"{s3}/a/model.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    assert keys(f"{s3}/a") == ["model.pt", "r.json"]  # no temporary object left


def test_a_manifest_is_replaced_atomically_in_the_bucket(s3):
    uri = f"{s3}/manifest"
    synthesize(SynthConfig(domains=["Finland"], images_per_domain=5, seed=0), uri)
    first = current(uri)
    old = read_manifest(uri)
    assert old.num_rows == 5 and first.startswith(uri + "/v-")

    with pytest.raises(RuntimeError), ManifestWriter(uri) as w:  # a writer that dies before its commit
        w.write(old.slice(0, 2))
        raise RuntimeError("killed")
    assert current(uri) == first and read_manifest(uri).equals(old)  # the old manifest, whole
    assert [k for k in keys(uri) if not k.startswith(first[len(uri) + 1:])] == [POINTER]  # its staging is gone

    synthesize(SynthConfig(domains=["Finland"], images_per_domain=4, seed=1), uri)
    assert read_manifest(uri).num_rows == 4 and current(uri) != first
    assert json.loads(storage.read_bytes(f"{uri}/{POINTER}"))["rows"] == 4
    assert not storage.exists(first)  # the replaced version is deleted, only after the pointer moved


def test_an_output_prefix_with_foreign_objects_is_refused_and_kept(s3):
    storage.write_text(f"{s3}/theirs/notes.txt", "not ours")
    with pytest.raises(ManifestError, match="not a manifest"):
        synthesize(SynthConfig(domains=["Finland"], images_per_domain=3, seed=0), f"{s3}/theirs")
    assert keys(f"{s3}/theirs") == ["notes.txt"]
    with pytest.raises(ManifestError, match="overlaps the input"):
        ManifestWriter(f"{s3}/theirs/out", inputs=[f"{s3}/theirs"])


@pytest.mark.ray
def test_training_writes_its_outputs_into_the_bucket(s3, fresh_ray, tmp_path, monkeypatch):
    """Manifest and out_dir both on s3:// (Ray started after the endpoint was set, so its workers see it)."""
    from urbancross.train import run_train

    monkeypatch.chdir(tmp_path)
    manifest, out = f"{s3}/train-data", f"{s3}/run"
    synthesize(SynthConfig(domains=["Finland"], images_per_domain=8, seed=0), manifest)
    cfg = load_config(None, [f"data.manifest={manifest}", f"out_dir={out}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
                             "model.use_segments=false", "train.num_workers=1", "train.ingest_actors=0",
                             "train.batch_size=4", "train.epochs=1"])
    result = run_train(cfg)
    assert result["model_path"] == f"{out}/train/model.pt"
    written = keys(out)
    for name in ("model.pt", "result.json", "run.json", "config.yaml", "model.json"):
        assert f"train/{name}" in written, (name, written)
    assert any(k.startswith("ray_results/") and "/checkpoint_" in k for k in written), written  # Ray Train's checkpoints too
    assert json.loads(storage.read_bytes(f"{out}/train/result.json"))["mlflow_run_id"] == result["mlflow_run_id"]
    assert not any(p.name.startswith("s3:") for p in tmp_path.iterdir())  # nothing written as a local `s3:` folder
