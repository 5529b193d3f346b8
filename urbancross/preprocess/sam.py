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
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from urbancross.config import Config, ConfigError, ModelConfig, SamConfig
from urbancross.data.manifest import encode_png
from urbancross.embedded import build_sam_tiny, ensure_tiny_sam, resolve
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
    """The SAM checkpoint to load: `embedded` is the packaged tiny SAM (`urbancross pretrain-sam`),
    a path is the user's; builds the random tiny one under out_dir when none is named."""
    sam = cfg.preprocess.sam
    if sam.checkpoint:
        return resolve(sam.checkpoint, "sam")
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


def kept_masks(masks: list[dict], cfg: SamConfig) -> list[dict]:
    """The `keep_largest` largest non-empty masks, largest first: the candidates to rank."""
    areas = [int(m["segmentation"].sum()) for m in masks]
    return [masks[i] for i in largest(areas, cfg.keep_largest) if areas[i] > 0]


def finish_segments(
    image: np.ndarray, kept: list[dict], cfg: SamConfig, scores: Sequence[float] | None = None
) -> tuple[list[Image.Image], int]:
    """(segments, real) from ranked `kept` masks: the best `num_segments` (by `scores`, or by
    `mask_quality` when None), painted, then the grid fill. Only the chosen masks are painted."""
    if len(kept) > cfg.num_segments:
        ranks = [mask_quality(m) for m in kept] if scores is None else np.asarray(scores, dtype=np.float64).tolist()
        kept = [kept[i] for i in best(ranks, cfg.num_segments)]
    real = len(kept)
    h, w = image.shape[:2]
    masks = [m["segmentation"] for m in kept] + grid_masks(h, w, cfg.num_segments - real)
    return [paint_segment(image, m, cfg.style, cfg.segment_size) for m in masks], real


def select_segments(
    image: np.ndarray, masks: list[dict], cfg: SamConfig, score: Callable[[list[Image.Image]], np.ndarray] | None = None
) -> tuple[list[Image.Image], int]:
    """(segments, how many are real SAM masks): largest masks -> best -> grid fill.

    `masks` are SAM's records (`segmentation`, `predicted_iou`, `stability_score`). Best =
    highest `score(candidates)` when given (caption-guided), else `mask_quality`; ties go to
    the larger mask.
    """
    kept = kept_masks(masks, cfg)
    scores = None
    if score is not None and len(kept) > cfg.num_segments:
        scores = score([paint_segment(image, m["segmentation"], cfg.style, cfg.segment_size) for m in kept])
    return finish_segments(image, kept, cfg, scores)


# --------------------------------------------------------------------------- stage


class ClipScorer:
    """Cosine similarity of each segment to the mean of the image's caption embeddings."""

    def __init__(self, model_cfg: ModelConfig, device: str = "cpu", seed: int = 0):
        self.device = device
        with torch.random.fork_rng(devices=[]):  # without `pretrained` the model is random: the same one in every actor
            torch.manual_seed(seed)
            self.model = create_model(model_cfg).eval().to(device)
        self.tokenize = get_tokenizer(model_cfg)
        self.transform = image_transform(model_cfg, train=False)

    @torch.no_grad()
    def __call__(self, segments: list[Image.Image], captions: list[str]) -> np.ndarray:
        return self.batch([segments], [captions])[0]

    @torch.no_grad()
    def batch(self, groups: list[list[Image.Image]], captions: list[list[str]]) -> list[np.ndarray]:
        """Scores of each group of segments against its own captions: one image and one text
        forward for the whole batch instead of two per row."""
        images = torch.stack([self.transform(s) for g in groups for s in g]).to(self.device)
        img = self.model.encode_image(images)
        flat = [str(c) for cs in captions for c in cs]
        txt = self.model.encode_text(torch.as_tensor(self.tokenize(flat)).to(self.device))
        out, i, t = [], 0, 0
        for g, cs in zip(groups, captions, strict=True):
            mean = torch.nn.functional.normalize(txt[t : t + len(cs)].mean(0), dim=-1)
            out.append((img[i : i + len(g)] @ mean).cpu().numpy())
            i, t = i + len(g), t + len(cs)
        return out


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
        self.score = ClipScorer(cfg.model, device, cfg.seed) if sam.selection == "caption" else None
        self.timings = {"sam": 0.0, "clip_scoring": 0.0}  # seconds spent, for the bench

    def scorer(self, row: dict) -> Callable[[list[Image.Image]], np.ndarray] | None:
        """CLIP against the row's captions for a training row in caption mode; else None (quality)."""
        if self.score is None or row.get("split") != self.train_split:
            return None
        captions = [str(c) for c in row["captions"]]
        return lambda candidates: self.score(candidates, captions)

    def _caption_rows(self, rows: list[dict], kept: list[list[dict]]) -> list[int]:
        """Rows whose ranking is by CLIP: caption mode, training split, more masks than segments."""
        if self.score is None:
            return []
        n = self.cfg.num_segments
        return [i for i, r in enumerate(rows) if r.get("split") == self.train_split and len(kept[i]) > n]

    @torch.no_grad()
    def process(self, images: list, rows: list[dict]) -> list[dict]:
        """`images`: decoded RGB images (PIL or HxWx3 uint8 arrays), one per row."""
        t0 = time.perf_counter()
        arrays = [a if isinstance(a, np.ndarray) else np.asarray(a.convert("RGB")) for a in images]
        kept = [kept_masks(self.generator.generate(a), self.cfg) for a in arrays]
        t1 = time.perf_counter()
        scores: list = [None] * len(rows)
        ranked = self._caption_rows(rows, kept)
        if ranked:
            c = self.cfg
            groups = [[paint_segment(arrays[i], m["segmentation"], c.style, c.segment_size) for m in kept[i]] for i in ranked]
            captions = [[str(x) for x in rows[i]["captions"]] for i in ranked]
            batch = getattr(self.score, "batch", None)
            got = batch(groups, captions) if batch else [self.score(g, cs) for g, cs in zip(groups, captions)]
            for i, s in zip(ranked, got):
                scores[i] = s
        t2 = time.perf_counter()
        out = []
        for a, k, s in zip(arrays, kept, scores):
            segments, real = finish_segments(a, k, self.cfg, s)
            out.append({"segments": [encode_png(x) for x in segments], "num_real_segments": real})
        self.timings["sam"] += t1 - t0 + time.perf_counter() - t2
        self.timings["clip_scoring"] += t2 - t1
        return out
