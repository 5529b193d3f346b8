"""Disk full while writing a manifest or a checkpoint: the previous version stays whole and
nothing half-written is left behind. ENOSPC comes from a real size-limited file system (a
tmpfs mounted for the test, where the run may mount: root, as in CI) and from a fake at the
writer (everywhere)."""

from __future__ import annotations

import errno
import os
import subprocess
import types

import pyarrow.parquet as pq
import pytest

from urbancross.data.manifest import read_manifest, to_table, write_manifest
from urbancross.train import loop


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def rows(n: int) -> list[dict]:
    return [{"image_id": f"i{i}", "image": b"x", "captions": ["a caption"], "domain": "A", "split": "train"} for i in range(n)]


def test_disk_full_while_rewriting_a_manifest_keeps_the_old_one(tmp_path, monkeypatch):
    out = str(tmp_path / "manifest")
    write_manifest(to_table(rows(3)), out)
    monkeypatch.setattr(pq.ParquetWriter, "write_table", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_manifest(to_table(rows(5)), out, overwrite=True)
    assert read_manifest(out).num_rows == 3
    assert sorted(os.listdir(tmp_path)) == ["manifest"]  # no staging folder left


class FullDiskEngine:
    """Writes part of a checkpoint, then the disk is full."""

    def save_checkpoint(self, folder, tag, client_state):
        with open(os.path.join(folder, "half.pt"), "wb") as f:
            f.write(b"x" * 1000)
        disk_full()


def test_disk_full_while_saving_an_epoch_keeps_the_previous_checkpoint(tmp_path):
    ckpts = tmp_path / "checkpoints"
    (ckpts / "epoch_000001").mkdir(parents=True)
    (ckpts / "epoch_000001" / "state.pt").write_bytes(b"epoch 1")
    w = types.SimpleNamespace(rank=0, name="train", local_checkpoints=str(ckpts))
    with pytest.raises(OSError, match="No space left"):
        loop.save_and_report(FullDiskEngine(), w, {"epoch": 2}, {"epoch": 2})
    assert sorted(os.listdir(ckpts)) == ["epoch_000001"]  # no half epoch 2 beside it
    assert (ckpts / "epoch_000001" / "state.pt").read_bytes() == b"epoch 1"


def test_disk_full_while_staging_for_ray_leaves_nothing_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    w = types.SimpleNamespace(rank=1, name="train", local_checkpoints=None)
    with pytest.raises(OSError, match="No space left"):
        loop.save_and_report(FullDiskEngine(), w, {"epoch": 2}, {"epoch": 2})
    assert os.listdir(tmp_path / "urbancross-ckpt") == []


def test_each_save_stages_in_its_own_folder(tmp_path, monkeypatch):
    """Tune trials on one node all run Train runs named `train`: their ranks must not share a folder."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    first, second, other_rank = loop.staging_dir(0), loop.staging_dir(0), loop.staging_dir(1)
    assert len({first, second, other_rank}) == 3
    assert all(os.path.isdir(p) and not os.listdir(p) for p in (first, second, other_rank))
    assert os.path.basename(other_rank).startswith("rank1-")


@pytest.fixture
def small_fs(tmp_path):
    """Mount a tmpfs of a given size under tmp_path; skip where mounting is not allowed."""
    mounted = []

    def mount(size: str):
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip() or done.returncode}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def big_rows(n: int) -> list[dict]:
    return [{**row, "image": os.urandom(100_000)} for row in rows(n)]  # random: Parquet cannot compress it


def test_a_real_full_disk_while_rewriting_a_manifest_keeps_the_old_one(small_fs):
    fs = small_fs("1500k")
    out = str(fs / "manifest")
    write_manifest(to_table(big_rows(8)), out)
    with pytest.raises(OSError) as e:
        write_manifest(to_table(big_rows(16)), out, overwrite=True)
    assert e.value.errno == errno.ENOSPC or "No space left" in str(e.value)
    assert read_manifest(out).num_rows == 8
    assert sorted(os.listdir(fs)) == ["manifest"]  # the staging folder is gone, and with it the space


def test_a_real_full_disk_while_saving_a_model_keeps_the_previous_file(small_fs):
    import torch

    from urbancross.config import ModelConfig
    from urbancross.model.factory import create_model, save_model

    model = create_model(ModelConfig(use_segments=False))
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    fs = small_fs(f"{int(size * 1.5)}")  # room for one copy, not two
    save_model(model, fs / "model.pt")
    before = (fs / "model.pt").read_bytes()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(OSError) as e:
        save_model(model, fs / "model.pt")
    assert e.value.errno == errno.ENOSPC or "No space left" in str(e.value)
    assert (fs / "model.pt").read_bytes() == before
    assert os.listdir(fs) == ["model.pt"]  # no temporary file left
