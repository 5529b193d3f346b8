"""DeepSpeed checkpoints read as data: `torch.load(weights_only=True)` instead of DeepSpeed's own.

DeepSpeed's `TorchCheckpointEngine.load` unpickles with `weights_only=False`, so a resumed run
(or a PBT clone, or `resume_from`) would run any code planted in a checkpoint folder by
whoever can write the Train storage. Its files hold tensors, plain containers and three
DeepSpeed types (below), which are allowed by name: unpickling them only sets attributes or
looks up an enum value, never calls arbitrary code.
"""

from __future__ import annotations

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

# what ZeRO 0-3 optimizer states hold besides tensors (fp32 and bf16), found with
# torch.serialization.get_unsafe_globals_in_checkpoint
DEEPSPEED_GLOBALS = [LossScaler, ZeroStageEnum, fragment_address]


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with `weights_only=True`; saving unchanged."""

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(DEEPSPEED_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)


def load_weights_only(engine) -> None:
    """Make `engine.load_checkpoint` read every file as data (the engine our config selects is the torch one)."""
    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise TypeError(f"unexpected DeepSpeed checkpoint engine {type(engine.checkpoint_engine).__name__}: cannot make its loads safe")
    engine.checkpoint_engine.__class__ = WeightsOnlyCheckpointEngine
