"""The DeepSpeed config, derived from ours (never written by hand)."""

from __future__ import annotations

from typing import Any

from urbancross.config import TrainConfig


def use_bf16(cfg: TrainConfig) -> bool:
    """bf16 on GPU, fp32 on CPU, unless `precision` says otherwise."""
    if cfg.precision == "auto":
        return cfg.use_gpu
    return cfg.precision == "bf16"


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """ZeRO stage, micro-batch, accumulation, clipping and precision from `cfg`.

    The optimizer is a torch AdamW built by the loop (param groups for the discriminator's
    lr), hence `zero_allow_untested_optimizer`: it also avoids compiling DeepSpeed's Adam.
    """
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    if cfg.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * max(1, world_size),
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16(cfg)},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
