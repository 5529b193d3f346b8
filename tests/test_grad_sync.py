"""ZeRO-0 gradient averaging (urbancross/train/grad_sync.py): with two ranks on this machine every
rank ends with the exact mean of the ranks' gradients, over DeepSpeed's shared-memory kernel and over
torch.distributed alike; with one rank DeepSpeed's own (flatten + all-reduce + copy) pass is off and
the gradients are the rank's own."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from urbancross.train.grad_sync import GradSync, shm_allreduce_env, shm_segment

DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 0},
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 1 << 30,
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def _batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(4, 8, generator=g), torch.randn(4, 3, generator=g)


def _local_grads(rank: int) -> list[torch.Tensor]:
    m = _model()
    x, y = _batch(rank)
    nn.functional.mse_loss(m(x), y).backward()
    return [p.grad.clone() for p in m.parameters()]


def _rank(rank: int, world: int, port: int, shm: bool, out: str) -> None:
    import deepspeed
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.pop("LOCAL_SIZE", None)
    use_shm = shm_allreduce_env(world, world if shm else 1)  # local_world 1 of 2: ranks elsewhere -> torch.distributed
    dist.init_process_group("gloo", rank=rank, world_size=world)
    m = _model()
    engine, *_ = deepspeed.initialize(model=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.0), config=DS_CONFIG)
    mapped = [shm_segment(r).exists() for r in range(world)]  # DeepSpeed's names, before GradSync
    sync = GradSync(engine, world, use_shm)
    x, y = _batch(rank)
    engine.backward(nn.functional.mse_loss(engine(x), y))
    own = [p.grad.clone() for p in m.parameters()]
    sync()
    torch.save({"use_shm": use_shm, "describe": sync.describe(), "own": own, "mapped": mapped,
                "synced": [p.grad.clone() for p in m.parameters()]}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("shm", [True, False], ids=["shared-memory", "torch.distributed"])
def test_two_ranks_end_with_the_exact_mean(shm, tmp_path):
    port = _free_port()
    mp.spawn(_rank, args=(2, port, shm, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert r0["use_shm"] is shm and r0["describe"] == ("shared memory" if shm else "torch.distributed")
    for own, rank in ((r0["own"], 0), (r1["own"], 1)):  # before the sync: each rank's own gradient
        assert all(torch.equal(a, b) for a, b in zip(own, _local_grads(rank)))
    expected = [(a + b) / 2 for a, b in zip(_local_grads(0), _local_grads(1))]
    for synced in (r0["synced"], r1["synced"]):
        assert all(torch.equal(a, b) for a, b in zip(synced, expected))  # bit-identical on both ranks
    assert not torch.equal(r0["own"][0], r1["own"][0])  # the ranks really had different gradients
    assert r0["mapped"] == [shm, shm]  # the segments had the names shm_segment gives them ...
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_*"))  # ... and are gone


def test_one_rank_skips_deepspeeds_pass_and_keeps_its_gradients(monkeypatch):
    import deepspeed
    import torch.distributed as dist

    from urbancross.train.loop import _ensure_process_group

    class One:  # what _ensure_process_group reads
        rank, local_rank, world = 0, 0, 1

    owns = _ensure_process_group(One())  # type: ignore[arg-type]
    try:
        m = _model()
        engine, *_ = deepspeed.initialize(model=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.0), config=DS_CONFIG)
        sync = GradSync(engine, 1, False)
        assert engine.enable_backward_allreduce is False and sync.describe() == "none (1 rank)"
        called = []
        monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: called.append(a))
        x, y = _batch(0)
        engine.backward(nn.functional.mse_loss(engine(x), y))
        sync()
        assert called == []
        assert all(torch.equal(p.grad, g) for p, g in zip(m.parameters(), _local_grads(0)))
    finally:
        if owns and dist.is_initialized():
            dist.destroy_process_group()


def test_shm_only_when_every_rank_is_here(monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "1234")
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    assert shm_allreduce_env(1, 1) is False and "LOCAL_SIZE" not in os.environ  # one rank: nothing to reduce
    assert shm_allreduce_env(4, 2) is False and "LOCAL_SIZE" not in os.environ  # two nodes: the kernel would fault
    assert shm_allreduce_env(2, 2) is True and os.environ["LOCAL_SIZE"] == "2"
    monkeypatch.delenv("MASTER_PORT")
    monkeypatch.delenv("LOCAL_SIZE")
    assert shm_allreduce_env(2, 2) is False  # no per-run rendezvous to name the shared segments
