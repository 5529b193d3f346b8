"""Stage 1 (train) and stage 2 (adapt): Ray Train + DeepSpeed loops, curriculum, adversarial parts."""

from urbancross.train.trainer import run_adapt, run_train

__all__ = ["run_adapt", "run_train"]
