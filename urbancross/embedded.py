"""What the embedded (offline) benchmark needs at run time besides its data: a tiny SAM.

`build_sam_tiny` is the architecture (`preprocess.sam.model_type: tiny`); a checkpoint for it
is a local file like any SAM's. When none is named, `ensure_tiny_sam` writes a random-init
one under out_dir: random weights give arbitrary masks, which is enough to run the real
preprocessing path, and nothing can be downloaded here. The tiny CLIP is a packaged model
config, `model/urbancross-tiny.json` (`model.preset: tiny`).
"""

from __future__ import annotations

import os
from functools import partial

import torch

from urbancross import atomic

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
