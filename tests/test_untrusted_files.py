"""Files from outside are read as data: a planted pickle in model weights, a SAM checkpoint
or a DeepSpeed checkpoint is refused, never executed (each loader once ran it)."""

from __future__ import annotations

import glob
import os
import pickle
import socket
from pathlib import Path

import pytest
import torch

from payload import plant  # tests/ helper
from urbancross.config import ModelConfig, config_from_dict
from urbancross.model.factory import CheckpointError, create_model, save_model


@pytest.fixture(autouse=True)
def no_weights_only_default(monkeypatch):
    """torch's default unpickles code again under this variable: only an explicit weights_only=True holds."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


def test_model_weights_with_a_pickle_payload_are_refused(tmp_path):
    marker, weights = tmp_path / "pwned", tmp_path / "model.pt"
    save_model(create_model(ModelConfig()), weights)
    assert create_model(ModelConfig(), pretrained=str(weights)) is not None  # a real file loads
    plant(weights, marker, lambda p: {"state_dict": {"clip.x": p}})
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        create_model(ModelConfig(), pretrained=str(weights))
    assert not marker.exists()


def test_sam_checkpoint_with_a_pickle_payload_is_refused(tmp_path):
    from urbancross.embedded import ensure_tiny_sam
    from urbancross.preprocess.sam import load_sam

    marker, ckpt = tmp_path / "pwned", tmp_path / "sam.pth"
    assert load_sam("tiny", ensure_tiny_sam(ckpt)) is not None
    plant(ckpt, marker)
    with pytest.raises(pickle.UnpicklingError):
        load_sam("tiny", str(ckpt))
    assert not marker.exists()


@pytest.fixture
def process_group():
    """A one-process gloo group, as an in-process Train run has (DeepSpeed needs one)."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    from deepspeed.utils import groups

    groups._WORLD_GROUP = None
    groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None
    yield
    dist.destroy_process_group()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_resume_reads_checkpoints_as_data(tmp_path, process_group, stage):
    import deepspeed

    from urbancross.train.checkpoint_io import load_weights_only
    from urbancross.train.deepspeed_config import deepspeed_config

    cfg = config_from_dict({"train": {"zero_stage": stage}})

    def engine():
        torch.manual_seed(0)
        module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
        eng, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.AdamW(module.parameters()), config=deepspeed_config(cfg.train, 1))
        load_weights_only(eng)
        return eng

    saved = engine()
    saved.backward(saved(torch.randn(2, 4)).sum())
    saved.step()
    saved.save_checkpoint(str(tmp_path), tag="ds", client_state={"epoch": 1})
    resumed = engine()
    path, client = resumed.load_checkpoint(str(tmp_path), tag="ds")
    assert path is not None and client["epoch"] == 1 and resumed.global_steps == 1

    marker = tmp_path / "pwned"
    for f in glob.glob(str(tmp_path / "ds" / "*optim_states.pt")) or glob.glob(str(tmp_path / "ds" / "*model_states.pt")):
        plant(Path(f), marker, lambda p: {"optimizer_state_dict": p, "module": p})
    with pytest.raises(pickle.UnpicklingError):
        engine().load_checkpoint(str(tmp_path), tag="ds")
    assert not marker.exists()
