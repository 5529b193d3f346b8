"""Models: UrbanCross (open_clip towers + segment fusion, optional CMPAGL block) and CMPAGL (Gswin + BERT + fusion)."""

from urbancross.model.cmpagl import CMPAGLConfig, CMPAGLModel, build_cmpagl, load_cmpagl, save_cmpagl
from urbancross.model.factory import (
    PRESETS,
    CheckpointError,
    announce_weights,
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
    "CMPAGLConfig",
    "CMPAGLModel",
    "CheckpointError",
    "UrbanCrossModel",
    "build_cmpagl",
    "create_model",
    "get_tokenizer",
    "image_size",
    "image_transform",
    "load_cmpagl",
    "announce_weights",
    "load_weights",
    "save_cmpagl",
    "save_model",
]
