"""Build, load and save UrbanCross models, plus their tokenizer and image transforms.

Weights only ever come from a local file: `pretrained` must be a path, and open_clip is never
given a pretrained *tag*, so no code path here can start a download.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import posixpath
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.convert import convert_state_dict
from open_clip.factory import get_model_config
from torchvision import transforms as T

from urbancross import embedded, storage
from urbancross.config import ModelConfig
from urbancross.model.cmpagl import SIZES as CMPAGL_SIZES
from urbancross.model.cmpagl import CMPAGLModel, build_cmpagl
from urbancross.model.model import UrbanCrossModel
from urbancross.model.text_bert import BertTextTokenizer, read_vocab

log = logging.getLogger(__name__)

TINY_CONFIG = Path(__file__).with_name("urbancross-tiny.json")  # the embedded benchmark: 64 px RGB, short captions
TINY_NAME = TINY_CONFIG.stem  # open_clip names a model config after its file

# preset -> what it is for. Checkpoints fine-tuned from OpenAI CLIP weights (RemoteCLIP, GeoRSCLIP
# ViT-B-32) were trained with QuickGELU: they load into the plain presets without a key error but
# compute different features, so they need the `-quickgelu` preset.
PRESETS = {
    "tiny": f"small random-init open_clip config ({TINY_NAME}), 64 px, trains on CPU in minutes",
    "ViT-B-32": "ViT-B/32 checkpoints trained with GELU (OpenCLIP LAION/DataComp-initialised)",
    "ViT-B-32-quickgelu": "ViT-B/32 initialised from OpenAI weights: RemoteCLIP-ViT-B-32, GeoRSCLIP ViT-B-32",
    "ViT-L-14": "ViT-L/14 checkpoints trained with GELU (OpenCLIP-initialised)",
    "ViT-L-14-quickgelu": "ViT-L/14 initialised from OpenAI weights: RemoteCLIP-ViT-L-14",
}
OPENAI_INIT_HINTS = ("remoteclip", "georsclip", "openai")
# open_clip's warning for a model built without a pretrained tag; untrue when a local checkpoint follows
RANDOM_INIT_WARNING = "No pretrained weights loaded for model"


class CheckpointError(ValueError):
    """A checkpoint is missing, not a local file, or does not fit the configured model."""


def open_clip_name(cfg: ModelConfig) -> str:
    """The open_clip model name of `cfg.preset` (registering the tiny config on first use)."""
    if cfg.preset not in PRESETS:
        raise ValueError(f"model.preset: unknown preset {cfg.preset!r}; choose one of: {', '.join(PRESETS)}")
    if cfg.preset != "tiny":
        return cfg.preset
    _register_tiny()
    return TINY_NAME


@functools.cache
def _register_tiny() -> None:
    """Add the packaged tiny config to open_clip's model configs (once per process)."""
    open_clip.add_model_config(TINY_CONFIG)


def _open_clip_config(cfg: ModelConfig) -> dict:
    return get_model_config(open_clip_name(cfg))


def image_size(cfg: ModelConfig) -> int:
    """Input side length in pixels (images and segment crops alike)."""
    if cfg.family == "cmpagl":
        return CMPAGL_SIZES[cfg.cmpagl_size].image.image_size
    size = _open_clip_config(cfg)["vision_cfg"]["image_size"]
    return int(size if isinstance(size, int) else size[0])


def get_tokenizer(cfg: ModelConfig) -> Callable[[list[str]], torch.LongTensor]:
    """open_clip's tokenizer for the preset, padded/truncated to the text tower's context length;
    for CMPAGL the BERT WordPiece tokenizer (the shipped tiny vocabulary, or `bert_dir`'s)."""
    if cfg.family == "cmpagl":
        return _cmpagl_tokenizer(cfg.bert_dir, CMPAGL_SIZES[cfg.cmpagl_size].context_length)
    return open_clip.get_tokenizer(open_clip_name(cfg))


@functools.cache
def _cmpagl_tokenizer(bert_dir: str, context_length: int) -> BertTextTokenizer:
    if bert_dir:
        return BertTextTokenizer.from_dir(bert_dir, context_length)
    return BertTextTokenizer(read_vocab(), context_length)


def _to_rgb(img):
    return img.convert("RGB")


def image_transform(cfg: ModelConfig, train: bool) -> Callable:
    """PIL image -> normalised float tensor [3,H,W] at `image_size(cfg)`.

    Training adds only a mild random crop (area >= `aug_crop_scale`, near-square) and colour
    jitter. No flips or rotations: captions state directions and layouts ("north of", "on the
    left"), which a flip or rot90 would silently make false.
    """
    size = image_size(cfg)
    if not train:
        return open_clip.image_transform(size, is_train=False)
    steps = [_to_rgb, T.RandomResizedCrop(size, scale=(cfg.aug_crop_scale, 1.0), ratio=(0.9, 1.1),
                                          interpolation=T.InterpolationMode.BICUBIC)]
    if cfg.aug_color_jitter > 0:
        j = cfg.aug_color_jitter
        steps.append(T.ColorJitter(brightness=j, contrast=j, saturation=j, hue=j / 10))
    steps += [T.ToTensor(), T.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)]
    return T.Compose(steps)


def cache_transform(cfg: ModelConfig) -> Callable:
    """PIL image -> uint8 array [3,H,W]: the evaluation geometry (resize, centre crop) before
    `ToTensor`/`Normalize`, so decoded images can be cached compactly; `normalize` finishes it."""
    size = image_size(cfg)
    geometry = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)])

    def transform(img):
        return np.ascontiguousarray(np.asarray(geometry(_to_rgb(img)), dtype=np.uint8).transpose(2, 0, 1))

    return transform


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or [0, 1] float) images [...,3,H,W] -> the float input the towers take."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    mean = torch.tensor(OPENAI_DATASET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def create_model(cfg: ModelConfig, *, pretrained: str | None = None) -> UrbanCrossModel:
    """Build the model for `cfg` and load `pretrained` (or `cfg.pretrained`) when set.

    The checkpoint may be a plain open_clip/OpenAI-format CLIP state dict (only the two towers
    are loaded, via open_clip's `load_checkpoint`) or a full UrbanCross file from `save_model`.
    What was loaded is logged at DEBUG: every Train worker and inference actor loads the same
    file, and the run says it once at INFO (`announce_weights`).
    """
    path = cfg.pretrained if pretrained is None else pretrained
    if cfg.family == "cmpagl":
        model = build_cmpagl(cfg.cmpagl_size, swin_dir=cfg.swin_dir or None, bert_dir=cfg.bert_dir or None,
                             global_local=cfg.gswin_global)
        if path:
            log.debug("%s", describe_load(load_weights(model, path, preset="cmpagl")))
        return model
    model = _build(cfg, loads_weights=bool(path))
    if path:
        log.debug("%s", describe_load(load_weights(model, path, preset=cfg.preset)))
    return model


def announce_weights(cfg: ModelConfig, path: str) -> dict:
    """Load `path` into a fresh model once, in the driver, and log at INFO what was loaded.

    Train workers then load the same file quietly (one line per run, not one per worker), and
    a checkpoint that does not fit fails here in one line, before any worker starts. Returns
    the `load_weights` report with the file's `sha256` prefix.
    """
    if cfg.family == "cmpagl":
        report = load_weights(create_model(cfg, pretrained=""), path, preset="cmpagl")
    else:
        report = load_weights(_build(cfg, loads_weights=True), path, preset=cfg.preset)
    path = embedded.resolve(path, "clip")
    local = storage.local_path(path) if storage.is_remote(path) else path
    if local is not None:
        report["sha256"] = sha256_prefix(local)
    log.info("%s", describe_load(report))
    return report


def _build(cfg: ModelConfig, loads_weights: bool) -> UrbanCrossModel:
    cfg_text = _open_clip_config(cfg)["text_cfg"]
    if "hf_model_name" in cfg_text or "hf_tokenizer_name" in cfg_text:
        raise ValueError(f"model.preset: {cfg.preset!r} needs Hugging Face downloads, which are not allowed")
    with _without_random_init_warning() if loads_weights else contextlib.nullcontext():
        clip = open_clip.create_model(open_clip_name(cfg), pretrained=None, device="cpu")
    return UrbanCrossModel(clip, cfg)


@contextlib.contextmanager
def _without_random_init_warning():
    """Drop open_clip's "initialized randomly" warning (root logger) while building a model
    that a local checkpoint is loaded into next: users read it as "my weights were ignored"."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(RANDOM_INIT_WARNING)

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def sha256_prefix(path: str, chars: int = 12) -> str:
    """The first `chars` hex digits of the file's SHA-256 (identifies which checkpoint a run used)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:chars]


def describe_load(report: dict) -> str:
    """One log line for a `load_weights` report."""
    def keys(items: list[str]) -> str:
        return "none" if not items else ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")

    sha = f"sha256 {report['sha256']}, " if "sha256" in report else ""
    return (
        f"model weights: loaded {report['path']} ({sha}{report['tensors']} tensors, {report['parameters']:,} parameters "
        f"into {report['into']}); checkpoint keys skipped: {keys(report['skipped'])}; "
        f"not in the checkpoint, initialised randomly: {keys(report['random_init'])}"
    )


def load_weights(model: UrbanCrossModel | CMPAGLModel, path: str, preset: str = "?") -> dict:
    """Load a checkpoint (a local path or a storage URI) into `model`; a misfit raises `CheckpointError`.

    Returns what was loaded: `path`, `into` (the whole model or its CLIP towers), `tensors`
    and `parameters` loaded, `skipped` (checkpoint keys the model does not take, dropped by
    open_clip's conversion, e.g. `text.transformer.embeddings.position_ids`) and `random_init`
    (model keys the checkpoint does not have: the UrbanCross heads of a plain CLIP checkpoint).
    """
    path = embedded.resolve(path, "clip")  # `model.pretrained: embedded`: the packaged tiny CLIP, loaded like a user's file
    if storage.is_remote(path):
        local = storage.local_path(path)
        if local is None:  # object storage: fetch once into a temporary file (open_clip's loader wants a path)
            if not storage.is_file(path):
                raise CheckpointError(f"model.pretrained: {path!r} not found")
            with tempfile.TemporaryDirectory() as tmp:
                copy = os.path.join(tmp, posixpath.basename(path))
                Path(copy).write_bytes(storage.read_bytes(path))
                return {**load_weights(model, copy, preset), "path": path}
        path = local
    if not os.path.isfile(path):
        raise CheckpointError(
            f"model.pretrained: {path!r} is not a local checkpoint file (weights are never downloaded; "
            "tags such as 'openai' or 'laion2b_s34b_b79k' are not accepted)"
        )
    if not preset.endswith("quickgelu") and preset != "tiny" and any(h in Path(path).name.lower() for h in OPENAI_INIT_HINTS):
        log.warning("%s looks OpenAI-initialised; such checkpoints need the '%s-quickgelu' preset", path, preset)
    try:
        state = read_state_dict(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise CheckpointError(f"{path}: not a readable checkpoint: {e}") from e
    if isinstance(model, CMPAGLModel):  # CMPAGL files are whole-model state dicts (`save_model`)
        _check_fit(model, state, path, preset)
        model.load_state_dict(state)
        return _report(path, "the whole model", model, state, model, "")
    if any(k.startswith("clip.") for k in state):
        _check_fit(model, state, path, preset)
        model.load_state_dict(state)
        return _report(path, "the whole model", model, state, model, "")
    try:  # open_clip's loader: converts OpenAI/third-party formats and resizes position embeddings
        open_clip.load_checkpoint(model.clip, path, strict=True)
    except Exception as e:  # noqa: BLE001 - open_clip signals misfits with Runtime/Key/AssertionError
        _check_fit(model.clip, state, path, preset)
        raise CheckpointError(f"{path}: does not fit model preset {preset!r}: {e}") from e
    return _report(path, "the CLIP towers (model.clip)", model.clip, convert_state_dict(model.clip, state), model, "clip.")


def _report(path: str, into: str, target: torch.nn.Module, state: dict, model: torch.nn.Module, prefix: str) -> dict:
    """A strict load filled every key of `target`; the rest of `model` kept its initialisation."""
    own = target.state_dict()
    return {
        "path": path,
        "into": into,
        "tensors": len(own),
        "parameters": sum(v.numel() for v in own.values()),
        "skipped": sorted(set(state) - set(own)),
        "random_init": sorted(k for k in model.state_dict() if not k.startswith(prefix) or k[len(prefix) :] not in own),
    }


def read_state_dict(path: str) -> dict:
    """The tensors of a checkpoint file, read as data: safetensors, else `torch.load(weights_only=True)`.

    Ours rather than open_clip's `load_state_dict`, which retries with a plain `torch.load` on a
    TypeError: a crafted file could raise one and get a second, weaker unpickling.
    """
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path, device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: holds no state dict")
    if next(iter(state)).startswith("module."):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _check_fit(module: torch.nn.Module, state: dict, path: str, preset: str) -> None:
    """Raise a readable `CheckpointError` listing missing/unexpected/mis-shaped keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            problems.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
    raise CheckpointError(
        f"{path}: checkpoint does not fit model preset {preset!r}: {'; '.join(problems)}. "
        "Check model.preset and the model options (use_segments, global_local, window_sizes, pre_align) "
        "against the run that saved it."
    )


def save_model(model: UrbanCrossModel | CMPAGLModel, path: str | os.PathLike) -> None:
    """Write the full state dict atomically; `create_model(cfg, pretrained=path)` loads it back."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    storage.write_with(path, lambda f: torch.save({"state_dict": state}, f))  # a local path or a storage URI
