"""SAM stage: ten caption-relevant segments per image, as the UrbanCross pipeline picks them.

SAM's automatic mask generator proposes masks; the `keep_largest` largest (by area) are
scored against the image's captions with the CLIP model, and the `num_segments` best are
kept, each stored as an image with the background painted white (the reference's choice)
or cropped to the mask's box. Images with too few masks are filled from a fixed grid of
boxes, so every row has exactly `num_segments` segments; `num_real_segments` says how
many came from SAM.
"""

from __future__ import annotations

import math
import os
import uuid
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from urbancross.config import Config, ConfigError, ModelConfig, SamConfig
from urbancross.data.manifest import encode_png

# Scores candidate segments (PIL images) against an image's captions; higher = more relevant.
Scorer = Callable[[list[Image.Image], list[str]], np.ndarray]

TINY_IMAGE_SIZE = 256  # the tiny SAM's encoder input; SAM resizes every image to this side


# --------------------------------------------------------------------------- model loading


def build_sam_tiny(checkpoint: str | None = None):
    """A small SAM (ViT depth 2, width 64, 256 px) laid out like `segment_anything.build_sam._build_sam`.

    `_build_sam` fixes a 1024 px encoder, which takes ~10 s per image on a CPU even at
    width 64; this builder changes only the sizes and loads a checkpoint the same way.
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
            state_dict = torch.load(f)
        sam.load_state_dict(state_dict)
    return sam


def sam_builders() -> dict[str, Callable]:
    from segment_anything import sam_model_registry

    return {"vit_b": sam_model_registry["vit_b"], "vit_l": sam_model_registry["vit_l"],
            "vit_h": sam_model_registry["vit_h"], "tiny": build_sam_tiny}


def load_sam(model_type: str, checkpoint: str):
    """SAM of `model_type` with weights from the local file `checkpoint` (never downloaded)."""
    if not os.path.isfile(checkpoint):
        raise ConfigError(f"preprocess.sam.checkpoint: no such file {checkpoint!r}")
    return sam_builders()[model_type](checkpoint=checkpoint)


def ensure_tiny_sam(path: str | os.PathLike, seed: int = 0) -> str:
    """Write a random-init tiny SAM checkpoint at `path` unless one is there; returns the path.

    Random weights give arbitrary masks, which is enough to exercise the real code path
    (no weights can be downloaded here); the grid fill covers images with too few masks.
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        torch.save(build_sam_tiny().state_dict(), tmp)
        os.replace(tmp, path)
    return str(path)


def resolve_checkpoint(cfg: Config) -> str:
    """The SAM checkpoint to load; builds the random tiny one under out_dir when none is named."""
    sam = cfg.preprocess.sam
    if sam.checkpoint:
        return sam.checkpoint
    if sam.model_type != "tiny":
        raise ConfigError(f"preprocess.sam.checkpoint: model_type {sam.model_type} needs a local checkpoint file")
    return ensure_tiny_sam(Path(cfg.out_dir) / "models" / "tiny_sam.pth", seed=cfg.seed)


# --------------------------------------------------------------------------- selection (pure)


def largest(areas: Sequence[int], keep: int) -> list[int]:
    """Indices of the `keep` largest areas, largest first (ties: lower index first)."""
    return sorted(range(len(areas)), key=lambda i: (-areas[i], i))[:keep]


def best(scores: Sequence[float], k: int) -> list[int]:
    """Indices of the `k` highest scores, best first (ties: lower index first)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


def grid_masks(height: int, width: int, n: int) -> list[np.ndarray]:
    """`n` box masks from a g x g grid (g = ceil(sqrt(n))), row-major: a deterministic fill."""
    if n <= 0:
        return []
    g = math.ceil(math.sqrt(n))
    ys = np.linspace(0, height, g + 1).round().astype(int)
    xs = np.linspace(0, width, g + 1).round().astype(int)
    masks = []
    for r in range(g):
        for c in range(g):
            m = np.zeros((height, width), dtype=bool)
            m[ys[r] : ys[r + 1], xs[c] : xs[c + 1]] = True
            masks.append(m)
    return masks[:n]


def paint_segment(image: np.ndarray, mask: np.ndarray, style: str, size: int) -> Image.Image:
    """One segment as a `size` x `size` RGB image.

    `white`: the whole image with everything outside the mask painted white.
    `crop`: the image cropped to the mask's bounding box.
    """
    if style == "white":
        out = np.full_like(image, 255)
        out[mask] = image[mask]
    else:
        ys, xs = np.nonzero(mask)
        if len(ys) == 0:
            out = image
        else:
            out = image[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    return Image.fromarray(out).resize((size, size), Image.BILINEAR)


def select_segments(
    image: np.ndarray, masks: list[np.ndarray], captions: list[str], score: Scorer, cfg: SamConfig
) -> tuple[list[Image.Image], int]:
    """(segments, how many are real SAM masks): largest masks -> best by score -> grid fill."""
    areas = [int(m.sum()) for m in masks]
    kept = [masks[i] for i in largest(areas, cfg.keep_largest) if areas[i] > 0]
    candidates = [paint_segment(image, m, cfg.style, cfg.segment_size) for m in kept]
    if len(candidates) > cfg.num_segments:
        scores = np.asarray(score(candidates, captions), dtype=np.float64)
        candidates = [candidates[i] for i in best(scores.tolist(), cfg.num_segments)]
    real = len(candidates)
    h, w = image.shape[:2]
    fill = [paint_segment(image, m, cfg.style, cfg.segment_size) for m in grid_masks(h, w, cfg.num_segments - real)]
    return candidates + fill, real


# --------------------------------------------------------------------------- stage


class ClipScorer:
    """Cosine similarity of each segment to the mean of the image's caption embeddings."""

    def __init__(self, model_cfg: ModelConfig, device: str = "cpu"):
        from urbancross.model.factory import create_model, get_tokenizer, image_transform

        self.device = device
        self.model = create_model(model_cfg).eval().to(device)
        self.tokenize = get_tokenizer(model_cfg)
        self.transform = image_transform(model_cfg, train=False)

    @torch.no_grad()
    def __call__(self, segments: list[Image.Image], captions: list[str]) -> np.ndarray:
        images = torch.stack([self.transform(s) for s in segments]).to(self.device)
        img = self.model.encode_image(images)
        txt = self.model.encode_text(torch.as_tensor(self.tokenize(list(captions))).to(self.device))
        txt = torch.nn.functional.normalize(txt.mean(0), dim=-1)
        return (img @ txt).cpu().numpy()


class Segmenter:
    """SAM + CLIP selection for a batch of decoded images; output column values per row."""

    needs_image = True

    def __init__(self, cfg: Config):
        from segment_anything import SamAutomaticMaskGenerator

        sam = cfg.preprocess.sam
        self.cfg = sam
        self.generator = SamAutomaticMaskGenerator(
            load_sam(sam.model_type, resolve_checkpoint(cfg)),
            points_per_side=sam.points_per_side,
            pred_iou_thresh=sam.pred_iou_thresh,
            stability_score_thresh=sam.stability_score_thresh,
            min_mask_region_area=sam.min_mask_region_area,
        )
        device = "cuda" if sam.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.generator.predictor.model.to(device)
        self.score = ClipScorer(cfg.model, device)

    @torch.no_grad()
    def process(self, images: list[Image.Image], rows: list[dict]) -> list[dict]:
        out = []
        for img, row in zip(images, rows):
            arr = np.asarray(img.convert("RGB"))
            masks = [m["segmentation"] for m in self.generator.generate(arr)]
            segments, real = select_segments(arr, masks, [str(c) for c in row["captions"]], self.score, self.cfg)
            out.append({"segments": [encode_png(s) for s in segments], "num_real_segments": real})
        return out
