"""UrbanCross model: open_clip towers + segment fusion (+ CMPAGL global-local block, pre-alignment)."""

from urbancross.model.factory import (
    PRESETS,
    CheckpointError,
    create_model,
    get_tokenizer,
    image_size,
    image_transform,
    load_weights,
    save_model,
)
from urbancross.model.model import UrbanCrossModel

__all__ = [
    "PRESETS",
    "CheckpointError",
    "UrbanCrossModel",
    "create_model",
    "get_tokenizer",
    "image_size",
    "image_transform",
    "load_weights",
    "save_model",
]
