"""SAM stage: ten segments per image, picked from the image alone wherever it can be evaluated.

SAM's automatic mask generator proposes masks; of the `keep_largest` largest (by area) the
`num_segments` best are kept, each stored as an image with the background painted white (the
reference's choice) or cropped to the mask's box. Images with too few masks are filled from
a fixed grid of boxes, so every row has exactly `num_segments` segments; `num_real_segments`
says how many came from SAM (the model masks the rest out).

"Best" is SAM's own quality, predicted IoU x stability score (ties: larger area): a function
of the image, so a test image's segments, and so its embedding, never depend on its captions
-- a gallery must not see its queries. The UrbanCross pipeline ranks by CLIP similarity to
the row's captions; `preprocess.sam.selection: caption` does that, for training rows only
(`data.train_split`); every other row is still ranked by quality.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from urbancross.config import Config, ConfigError, ModelConfig, SamConfig
from urbancross.data.manifest import encode_png
from urbancross.embedded import build_sam_tiny, ensure_tiny_sam
from urbancross.model.factory import create_model, get_tokenizer, image_transform

# Scores candidate segments (PIL images) against an image's captions; higher = more relevant.
Scorer = Callable[[list[Image.Image], list[str]], np.ndarray]



# --------------------------------------------------------------------------- model loading


def sam_builders() -> dict[str, Callable]:
    from segment_anything import sam_model_registry

    return {"vit_b": sam_model_registry["vit_b"], "vit_l": sam_model_registry["vit_l"],
            "vit_h": sam_model_registry["vit_h"], "tiny": build_sam_tiny}


def load_sam(model_type: str, checkpoint: str):
    """SAM of `model_type` with weights from the local file `checkpoint` (never downloaded)."""
    if not os.path.isfile(checkpoint):
        raise ConfigError(f"preprocess.sam.checkpoint: no such file {checkpoint!r}")
    sam = sam_builders()[model_type](checkpoint=None)
    # loaded here, not by segment_anything's builders: theirs is a bare torch.load(f), which
    # unpickles arbitrary code if TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set or torch is < 2.6
    sam.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return sam


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


def mask_quality(mask: dict) -> float:
    """SAM's own confidence in a mask record: predicted IoU x stability score (1 where absent)."""
    return float(mask.get("predicted_iou", 1.0)) * float(mask.get("stability_score", 1.0))


def select_segments(
    image: np.ndarray, masks: list[dict], cfg: SamConfig, score: Callable[[list[Image.Image]], np.ndarray] | None = None
) -> tuple[list[Image.Image], int]:
    """(segments, how many are real SAM masks): largest masks -> best -> grid fill.

    `masks` are SAM's records (`segmentation`, `predicted_iou`, `stability_score`). Best =
    highest `score(candidates)` when given (caption-guided), else `mask_quality`; ties go to
    the larger mask.
    """
    areas = [int(m["segmentation"].sum()) for m in masks]
    kept = [masks[i] for i in largest(areas, cfg.keep_largest) if areas[i] > 0]
    candidates = [paint_segment(image, m["segmentation"], cfg.style, cfg.segment_size) for m in kept]
    if len(candidates) > cfg.num_segments:
        scores = [mask_quality(m) for m in kept] if score is None else np.asarray(score(candidates), dtype=np.float64).tolist()
        candidates = [candidates[i] for i in best(scores, cfg.num_segments)]
    real = len(candidates)
    h, w = image.shape[:2]
    fill = [paint_segment(image, m, cfg.style, cfg.segment_size) for m in grid_masks(h, w, cfg.num_segments - real)]
    return candidates + fill, real


# --------------------------------------------------------------------------- stage


class ClipScorer:
    """Cosine similarity of each segment to the mean of the image's caption embeddings."""

    def __init__(self, model_cfg: ModelConfig, device: str = "cpu"):
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
    """SAM + selection for a batch of decoded images; output column values per row.

    Caption-guided (CLIP) ranking only with `selection: caption` and only for training rows.
    """

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
        self.train_split = cfg.data.train_split
        self.score = ClipScorer(cfg.model, device) if sam.selection == "caption" else None

    def scorer(self, row: dict) -> Callable[[list[Image.Image]], np.ndarray] | None:
        """CLIP against the row's captions for a training row in caption mode; else None (quality)."""
        if self.score is None or row.get("split") != self.train_split:
            return None
        captions = [str(c) for c in row["captions"]]
        return lambda candidates: self.score(candidates, captions)

    @torch.no_grad()
    def process(self, images: list[Image.Image], rows: list[dict]) -> list[dict]:
        out = []
        for img, row in zip(images, rows):
            arr = np.asarray(img.convert("RGB"))
            segments, real = select_segments(arr, self.generator.generate(arr), self.cfg, self.scorer(row))
            out.append({"segments": [encode_png(s) for s in segments], "num_real_segments": real})
        return out
