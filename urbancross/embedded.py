"""What the embedded (offline) benchmark needs at run time besides its data: its own pretrained models.

`build_sam_tiny` is the architecture (`preprocess.sam.model_type: tiny`); a checkpoint for it
is a local file like any SAM's. The tiny CLIP is a packaged model config,
`model/urbancross-tiny.json` (`model.preset: tiny`).

Nothing can be downloaded here, so the embedded world pretrains its own weights (`urbancross
pretrain`) and ships them inside the package under `assets/`: the value `embedded` of
`model.pretrained` / `preprocess.sam.checkpoint` names them (`asset`). Each checkpoint has a
sidecar `<file>.json` recording how it was made (command, config, seed, metrics) and its
sha256, which `check_asset` verifies before use. They load through the same code path as a
user's own local checkpoint. Without them (`checkpoint: ""`) `ensure_tiny_sam` writes a
random-init SAM under out_dir, enough to run the real preprocessing path.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import partial
from pathlib import Path

import torch

from urbancross import atomic

EMBEDDED = "embedded"  # the config value that selects a packaged checkpoint
ASSETS = Path(__file__).with_name("assets")
ASSET_FILES = {"clip": "clip-tiny.pt", "sam": "sam-tiny.pt"}  # kind -> file under ASSETS


class AssetError(RuntimeError):
    """A packaged checkpoint is missing or does not match its sidecar."""


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(f"{path}.json")


def write_sidecar(path: str | os.PathLike, *, command: str, config: dict, seed: int, metrics: dict) -> dict:
    """Record how the checkpoint at `path` was made, with its sha256 and size, in `<path>.json`."""
    record = {
        "file": Path(path).name,
        "sha256": sha256(path),
        "bytes": os.path.getsize(path),
        "command": command,
        "seed": seed,
        "config": config,
        "metrics": metrics,
    }
    atomic.write_json(sidecar_path(path), record, indent=2, sort_keys=True)
    return record


def check_asset(path: str | os.PathLike) -> dict:
    """The sidecar of the checkpoint at `path`, after checking that the file's sha256 matches it."""
    side = sidecar_path(path)
    if not os.path.isfile(path) or not side.is_file():
        raise AssetError(f"{path}: embedded checkpoint or its sidecar {side.name} is missing from this install")
    record = json.loads(side.read_text(encoding="utf-8"))
    if sha256(path) != record.get("sha256"):
        raise AssetError(f"{path}: sha256 does not match {side.name}; re-create it with: {record.get('command', '?')}")
    return record


def asset(kind: str) -> str:
    """The verified path of the packaged `kind` checkpoint (`clip` or `sam`)."""
    if kind not in ASSET_FILES:
        raise AssetError(f"no embedded {kind!r} checkpoint; known: {', '.join(ASSET_FILES)}")
    path = ASSETS / ASSET_FILES[kind]
    check_asset(path)
    return str(path)


def resolve(value: str, kind: str) -> str:
    """A checkpoint setting as a path: `embedded` names the packaged `kind` file, anything else is kept."""
    return asset(kind) if value == EMBEDDED else value

TINY_IMAGE_SIZE = 256  # the tiny SAM's encoder input; SAM resizes every image to this side


def build_sam_tiny(checkpoint: str | None = None):
    """A small SAM (ViT depth 2, width 64, 256 px) laid out like `segment_anything.build_sam._build_sam`.

    `_build_sam` fixes a 1024 px encoder, far too slow for a CPU even at width 64; this
    builder changes only the sizes and loads a checkpoint the same way.
    """
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    prompt_dim, patch = 64, 16
    grid = TINY_IMAGE_SIZE // patch
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=2,
            embed_dim=64,
            img_size=TINY_IMAGE_SIZE,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=2,
            patch_size=patch,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=[1],
            window_size=14,
            out_chans=prompt_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=128, num_heads=2),
            transformer_dim=prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=64,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    sam.eval()
    if checkpoint is not None:
        with open(checkpoint, "rb") as f:
            state_dict = torch.load(f, map_location="cpu", weights_only=True)  # tensors only: no code unpickled
        sam.load_state_dict(state_dict)
    return sam


def ensure_tiny_sam(path: str | os.PathLike, seed: int = 0) -> str:
    """Write a random-init tiny SAM checkpoint at `path` unless one is there; returns the path.

    Random weights give arbitrary masks, which is enough to exercise the real code path
    (no weights can be downloaded here); the grid fill covers images with too few masks.
    """
    if not os.path.exists(path):
        torch.manual_seed(seed)
        state = build_sam_tiny().state_dict()
        atomic.write_file(path, lambda tmp: torch.save(state, tmp))
    return str(path)
