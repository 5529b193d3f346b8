"""Gradient averaging under ZeRO-0: nothing with one rank, one flat all-reduce per optimizer
step with several, over DeepSpeed's shared-memory kernel when every rank is on this node.

DeepSpeed's own ZeRO-0 reduction flattens, all-reduces through torch.distributed (gloo on CPU)
and copies back even with a single rank. Its shared-memory all-reduce (the `deepspeed_shm_comm`
op it builds on first use, `deepspeed.comm.inference_all_reduce`) is about 3x faster than gloo
between two local processes, but it is only set up when `LOCAL_SIZE` equals the world size
before the engine is built, and it faults when it is not: `shm_allreduce_env` decides once,
from Ray Train's local world size, and `GradSync` uses the same decision. Its sums run in rank
order on every rank, so the ranks' gradients stay bit-identical and runs repeat exactly.
ZeRO 1-3 partition gradients themselves, and bf16/fp16 keep theirs in the optimizer's own
buffers: `GradSync` leaves those to DeepSpeed (as it does GPU tensors).

DeepSpeed names each rank's shared segment in /dev/shm (`shm_segment`) and never unlinks it,
so every run left a 66 MB file per rank in memory until reboot, and enough of them made Ray's
memory monitor kill workers. Once every rank has mapped every segment (a barrier after the
engine is built), `GradSync` unlinks its own: the mappings stay, and the kernel frees the
memory when the last rank exits, however it exits.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist


def shm_allreduce_env(world: int, local_world: int) -> bool:
    """Whether this run may use the shared-memory all-reduce; sets `LOCAL_SIZE` for DeepSpeed
    when it may (call before `deepspeed.initialize`). Needs every rank on this node and a
    per-run rendezvous (`MASTER_PORT`, which names the shared segments)."""
    ok = world > 1 and local_world == world and bool(os.environ.get("MASTER_PORT"))
    if ok:
        os.environ["LOCAL_SIZE"] = str(world)
    return ok


def shm_segment(rank: int) -> Path:
    """The file DeepSpeed's shm op (csrc/cpu/comm/shm.cpp) maps for `rank`; glibc puts POSIX
    shared memory in /dev/shm."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


class GradSync:
    """Call after `engine.backward` and before `engine.step`; a no-op where DeepSpeed reduces."""

    def __init__(self, engine, world: int, shm: bool):
        self.active = (
            engine.zero_optimization_stage() == 0
            and not (engine.bfloat16_enabled() or engine.fp16_enabled())
            and engine.device.type == "cpu"
        )
        self.engine, self.world, self.shm = engine, world, shm
        self.params = [p for p in engine.module.parameters() if p.requires_grad]
        self.flat: torch.Tensor | None = None
        if self.active:
            engine.enable_backward_allreduce = False  # its flatten + gloo pass, even at world 1
        if shm:  # every rank, collectively: a peer may still be opening this rank's segment by name
            dist.barrier()
            shm_segment(dist.get_rank()).unlink(missing_ok=True)

    def describe(self) -> str:
        if not self.active:
            return "DeepSpeed's"
        return "none (1 rank)" if self.world == 1 else ("shared memory" if self.shm else "torch.distributed")

    def __call__(self) -> None:
        if not self.active or self.world == 1 or not self.engine.is_gradient_accumulation_boundary():
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if self.flat is None:
            self.flat = torch.empty(sum(g.numel() for g in grads), dtype=grads[0].dtype, device=grads[0].device)
        torch.cat([g.reshape(-1) for g in grads], out=self.flat)
        if self.shm:
            import deepspeed.comm

            deepspeed.comm.inference_all_reduce(self.flat)
        else:
            dist.all_reduce(self.flat)
        self.flat.div_(self.world)
        offset = 0
        for p, g in zip(self.params, grads):
            n = g.numel()
            if p.grad is None:
                p.grad = g
            p.grad.copy_(self.flat[offset : offset + n].view_as(g))
            offset += n
