"""`urbancross pretrain-sam`: a SAM for the embedded world, trained on the generator's own objects.

The procedural generator knows every object it draws (`synth.object_masks`), so the tiny SAM
(`embedded.build_sam_tiny`, from random init) learns SAM's promptable segmentation on web
tiles (`data/web.py`'s random styles, never the benchmark's countries): each step, point prompts sampled inside
objects (and some on the ground, whose target is everything that is no object), three mask
outputs per prompt with the loss of the best one only (SAM's ambiguity-aware objective:
focal 20 : dice 1 on the low-res logits against the downsampled mask), and the IoU head
regressed (MSE) onto every output's true IoU, so `pred_iou_thresh` ranks the automatic
generator's masks. A plain Ray Train loop (`TorchTrainer`, one worker by default).

`mask_recall` is the metric: the share of the generator's objects on held-out tiles that a
`SamAutomaticMaskGenerator` mask (the repo's `preprocess.sam` settings) matches at IoU >= 0.5.
It is reported before training (random init) and after, on held-out web tiles (another stream
of the same seed) and on the benchmark's val split (`synth`; never its test split). The result
is exported in half precision with a sidecar (`embedded.write_sidecar`): with
`sam_pretrain.output: urbancross/assets/sam-tiny.pt` it is the packaged `embedded` SAM.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from urbancross import storage
from urbancross.config import Config, SamConfig, SamPretrainConfig, config_from_dict
from urbancross.data import synth, web
from urbancross.embedded import TINY_IMAGE_SIZE, build_sam_tiny, write_sidecar

log = logging.getLogger(__name__)

TRAIN_STREAM, HELD_OUT_STREAM = 0, 1  # web tiles: rng([seed, stream, index])
LOW_RES = TINY_IMAGE_SIZE // 4  # the mask decoder's output side


# --------------------------------------------------------------------------- tiles


def web_tile(seed: int, stream: int, index: int, size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(size x size x 3 uint8 tile, its objects' bool masks) of one web tile; pure in its arguments."""
    scene, style = web.web_scene(np.random.default_rng([seed, stream, index]), index)
    return np.asarray(synth.render(scene, size, style)), [m for _, m in synth.object_masks(scene, size)]


def val_tiles(synth_cfg, size: int) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """The benchmark's val-split tiles (every domain of `synth_cfg`) with their objects; test is never read."""
    out = []
    for domain in synth_cfg.domains:
        scenes, splits, _ = synth.domain_scenes(synth_cfg, domain)
        out += [(np.asarray(synth.render(s, size)), [m for _, m in synth.object_masks(s, size)])
                for s, split in zip(scenes, splits) if split == "val"]
    return out


# --------------------------------------------------------------------------- objective


def to_input(sam, images: list[np.ndarray]) -> torch.Tensor:
    """Tiles as the encoder's batch, resized exactly as `SamPredictor.set_image` does."""
    from segment_anything.utils.transforms import ResizeLongestSide

    resize = ResizeLongestSide(TINY_IMAGE_SIZE)
    x = torch.stack([torch.as_tensor(resize.apply_image(a)).permute(2, 0, 1) for a in images]).float()
    return sam.preprocess(x)


def prompts(masks: list[np.ndarray], k: int, ground_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`k` (point (x, y) in tile pixels, target mask) pairs: a random pixel of a random object, or
    with `ground_fraction` of the ground (target: every pixel of no object)."""
    ground = ~np.any(masks, axis=0) if masks else None
    points, targets = [], []
    for _ in range(k):
        use_ground = not masks or (ground.any() and rng.random() < ground_fraction)
        target = ground if use_ground else masks[int(rng.integers(len(masks)))]
        ys, xs = np.nonzero(target)
        j = int(rng.integers(len(ys)))
        points.append((xs[j] + rng.random(), ys[j] + rng.random()))
        targets.append(target)
    return np.asarray(points, np.float32), np.stack(targets)


def low_res(targets: np.ndarray) -> torch.Tensor:
    """Masks at the decoder's output resolution (the padded 256 px input / 4): area average >= 0.5."""
    t = torch.as_tensor(targets, dtype=torch.float32)[:, None]
    side = t.shape[-1]
    t = F.interpolate(t, size=(LOW_RES, LOW_RES), mode="area") if side != LOW_RES else t
    return (t[:, 0] >= 0.5).float()


def mask_losses(logits: torch.Tensor, target: torch.Tensor, pred_iou: torch.Tensor, cfg: SamPretrainConfig) -> dict:
    """SAM's objective for (prompts, 3, H, W) logits: focal + dice of the best output, IoU-head MSE."""
    from torchvision.ops import sigmoid_focal_loss

    t = target[:, None].expand_as(logits)
    focal = sigmoid_focal_loss(logits, t, reduction="none").mean((-1, -2))
    p = logits.sigmoid()
    dice = 1 - (2 * (p * t).sum((-1, -2)) + 1) / (p.sum((-1, -2)) + t.sum((-1, -2)) + 1)
    per_output = cfg.focal_weight * focal + cfg.dice_weight * dice  # (prompts, 3)
    best = per_output.min(1)
    with torch.no_grad():
        hard = (logits > 0).float()
        iou = (hard * t).sum((-1, -2)) / ((hard + t).clamp(max=1).sum((-1, -2))).clamp(min=1)
    iou_loss = F.mse_loss(pred_iou, iou)
    return {"loss": best.values.mean() + cfg.iou_weight * iou_loss, "mask_loss": best.values.mean(),
            "iou_loss": iou_loss, "best_iou": iou.gather(1, best.indices[:, None]).mean()}


def train_step(sam, images: list[np.ndarray], masks: list[list[np.ndarray]], cfg: SamPretrainConfig, rng) -> dict:
    """One batch of tiles -> the mean of SAM's objective over their prompts (not yet backpropagated)."""
    emb = sam.image_encoder(to_input(sam, images))
    pe = sam.prompt_encoder.get_dense_pe()
    scale = TINY_IMAGE_SIZE / images[0].shape[0]
    out: dict = {}
    for i, objs in enumerate(masks):
        points, targets = prompts(objs, cfg.prompts_per_tile, cfg.ground_fraction, rng)
        coords = torch.as_tensor(points * scale)[:, None]  # input-frame coordinates, as the predictor's
        sparse, dense = sam.prompt_encoder(points=(coords, torch.ones(len(points), 1, dtype=torch.int)), boxes=None, masks=None)
        logits, pred_iou = sam.mask_decoder(emb[i : i + 1], pe, sparse, dense, multimask_output=True)
        for k, v in mask_losses(logits, low_res(targets), pred_iou, cfg).items():
            out[k] = out.get(k, 0) + v / len(masks)
    return out


def lr_at(step: int, cfg: SamPretrainConfig) -> float:
    warm = max(1, int(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.steps - warm)))


def train_loop_per_worker(config: dict) -> None:
    """Ray Train loop: fresh tiles every step (worker-specific indices), grads averaged across workers."""
    import ray.train

    cfg = config_from_dict(config["cfg"]).sam_pretrain
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # the same random init on every worker
    sam = build_sam_tiny().train()
    opt = torch.optim.AdamW(sam.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng([cfg.seed, 2, rank])
    t0, logged = time.perf_counter(), {}
    for step in range(cfg.steps):
        ids = rng.integers(cfg.tiles, size=cfg.batch_size)
        tiles = [web_tile(cfg.seed, TRAIN_STREAM, int(i), cfg.image_size) for i in ids]
        losses = train_step(sam, [t for t, _ in tiles], [m for _, m in tiles], cfg, rng)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if world > 1:
            for p in sam.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= world
        opt.step()
        logged = {k: float(v.detach()) for k, v in losses.items()} | {"step": step + 1, "seconds": time.perf_counter() - t0}
        if rank == 0 and (step % 50 == 0 or step + 1 == cfg.steps):
            log.warning("pretrain-sam: step %d/%d loss %.4f best_iou %.3f (%.0f s)",
                        step + 1, cfg.steps, logged["loss"], logged["best_iou"], logged["seconds"])
    with tempfile.TemporaryDirectory() as d:
        if rank == 0:
            torch.save(sam.state_dict(), os.path.join(d, "sam.pt"))
        ray.train.report(logged, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)


# --------------------------------------------------------------------------- metric


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every mask in `a` (n, H, W) with every mask in `b` (m, H, W)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    fa, fb = a.reshape(len(a), -1).astype(np.float32), b.reshape(len(b), -1).astype(np.float32)
    inter = fa @ fb.T
    return inter / np.maximum(fa.sum(1)[:, None] + fb.sum(1)[None] - inter, 1)


def generator(sam, sam_cfg: SamConfig):
    from segment_anything import SamAutomaticMaskGenerator

    return SamAutomaticMaskGenerator(
        sam.eval(), points_per_side=sam_cfg.points_per_side, pred_iou_thresh=sam_cfg.pred_iou_thresh,
        stability_score_thresh=sam_cfg.stability_score_thresh, min_mask_region_area=sam_cfg.min_mask_region_area,
    )


@torch.no_grad()
def mask_recall(sam, tiles: list[tuple[np.ndarray, list[np.ndarray]]], sam_cfg: SamConfig, threshold: float = 0.5) -> dict:
    """Share of the tiles' objects matched by an automatic-generator mask at IoU >= `threshold`, and masks per tile."""
    gen = generator(sam, sam_cfg)
    found = total = n_masks = 0
    for image, objs in tiles:
        got = [m["segmentation"] for m in gen.generate(image)]
        n_masks += len(got)
        if objs and got:
            found += int((iou_matrix(np.stack(objs), np.stack(got)).max(1) >= threshold).sum())
        total += len(objs)
    return {"recall": found / max(total, 1), "objects": total, "tiles": len(tiles), "masks_per_tile": n_masks / max(len(tiles), 1)}


def evaluate(sam, cfg: Config) -> dict:
    """Recall on the held-out web tiles and on the benchmark's val tiles, with `preprocess.sam`'s settings."""
    p = cfg.sam_pretrain
    web = [web_tile(p.seed, HELD_OUT_STREAM, i, p.image_size) for i in range(p.eval_tiles)]
    val = val_tiles(cfg.synth, cfg.synth.image_size)
    return {"web": mask_recall(sam, web, cfg.preprocess.sam), "val": mask_recall(sam, val, cfg.preprocess.sam)}


# --------------------------------------------------------------------------- job


def output_path(cfg: Config) -> str:
    return cfg.sam_pretrain.output or str(Path(cfg.out_dir) / "sam_pretrain" / "sam-tiny.pt")


def run_pretrain_sam(cfg: Config, command: str | None = None) -> dict:
    """Train (Ray Train), score before/after, export fp16 + sidecar; returns the sidecar record."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    p = cfg.sam_pretrain
    torch.set_num_threads(p.threads)
    t0 = time.perf_counter()
    torch.manual_seed(p.seed)
    before = evaluate(build_sam_tiny(), cfg)  # the loop's own random init
    log.info("pretrain-sam: recall before %s", before)
    if not ray.is_initialized():
        ray.init()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict()},
        scaling_config=ScalingConfig(num_workers=p.num_workers,
                                     resources_per_worker=None if p.num_workers == 0 else {"CPU": p.cpus_per_worker}),
        run_config=RunConfig(name="sam_pretrain", storage_path=storage.join(os.path.abspath(cfg.out_dir), "ray_results")),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, "sam.pt"), map_location="cpu", weights_only=True)
    train_seconds = time.perf_counter() - t0
    out = output_path(cfg)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    from urbancross import atomic

    atomic.write_file(out, lambda tmp: torch.save(half, tmp))
    sam = build_sam_tiny(out)  # the exported fp16 weights, as every user loads them
    after = evaluate(sam, cfg)
    log.info("pretrain-sam: recall after %s", after)
    metrics = {"before": before, "after": after, "train": dict(result.metrics or {}),
               "wall_seconds": round(time.perf_counter() - t0, 1), "train_seconds": round(train_seconds, 1),
               "load_average": [round(x, 2) for x in os.getloadavg()]}
    config = {"sam_pretrain": cfg.to_dict()["sam_pretrain"], "synth": cfg.to_dict()["synth"],
              "preprocess.sam": cfg.to_dict()["preprocess"]["sam"], "seed": cfg.seed}
    return write_sidecar(out, command=command or " ".join(["urbancross", *sys.argv[1:]]), config=config, seed=p.seed, metrics=metrics)

