"""Typed run configuration: frozen dataclasses loaded from YAML and validated once, here.

Every default lives in exactly one place: the field defaults below, and every numeric field
declares its range there (`num(...)`); no field takes NaN or infinity. A YAML file only
overrides what it names; an unknown key, a wrong type or a bad value raises `ConfigError`
naming the file and the dotted path of the field.

A `Config` is a value: it cannot be changed in place. `cfg.override({"data.manifest": p})`
(or `cfg.override(["train.epochs=3"])`, the `--set` form) derives a new one and validates it
exactly as a file is validated; it is the only way a changed config is made.
"""

from __future__ import annotations

import dataclasses
import math
import os
import reprlib
import types
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from urbancross import atomic, storage


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid."""


def num(default: int | float, *, ge: float | None = None, gt: float | None = None,
        le: float | None = None, lt: float | None = None) -> Any:
    """A numeric field (or list of numbers) with its allowed range; checked on every load."""
    return field(default=default, metadata={"range": (ge, gt, le, lt)})


def nums(default: Sequence[int | float], **bounds: float) -> Any:
    """A tuple-of-numbers field; each item must lie in the range of `num`."""
    return field(default=tuple(default), metadata={"range": tuple(bounds.get(k) for k in ("ge", "gt", "le", "lt"))})


@dataclass(frozen=True)
class Section:
    """Base of every config section: frozen, lists stored as tuples (so nothing inside changes),
    and validated when built, so no section can exist with a value outside its range."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        self.validate()

    def validate(self) -> None:
        """Every field's declared range (`num`), then the checks across fields (`check`)."""
        for f in dataclasses.fields(self):
            _check_range(f, getattr(self, f.name))
        self.check()

    def check(self) -> None:
        """Checks across fields; sections override it."""


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class SynthConfig(Section):
    """The embedded benchmark (procedural satellite-like tiles with captions).

    Every domain is split train/val/test by the same seeded fractions (the reference's
    70/10/20): the source trains and validates, the target's train images adapt and its val
    chooses the adapted model, and test images are only ever reported.
    """

    domains: tuple[str, ...] = ("Finland", "Germany", "Spain")
    images_per_domain: int = num(120, ge=2)
    image_size: int = num(64, ge=32, le=4096)
    captions_per_image: int = num(5, ge=1, le=10)
    test_fraction: float = num(0.2, ge=0, lt=1)
    val_fraction: float = num(0.1, ge=0, lt=1)
    near_duplicate_fraction: float = num(0.5, ge=0, le=1)  # chance an image is a one-element variant of the previous one
    seed: int = num(0, ge=0)

    def check(self) -> None:
        require(len(self.domains) >= 1, "domains must name at least one domain")
        dup = sorted({d for d in self.domains if self.domains.count(d) > 1})
        require(not dup, f"domains must be distinct (image ids are per domain), {dup} repeated")
        require(
            self.test_fraction + self.val_fraction < 1,
            f"test_fraction + val_fraction must be in [0, 1), got {self.test_fraction} + {self.val_fraction}",
        )


@dataclass(frozen=True)
class DataConfig(Section):
    """Where the manifest is and which part of it a stage uses."""

    manifest: str = ""  # Parquet dataset folder or URI; empty = the demo's synthesized one
    root: str = ""  # base for relative image paths; empty = the manifest's parent folder
    source_domain: str = "Finland"
    target_domain: str = "Spain"
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    image_size: int = num(64, ge=1)
    num_segments: int = num(10, ge=1)
    use_refined_captions: bool = True
    augment: bool = True
    # Import limits. A caption is cut at max_caption_chars (and reported): 10x the longest human
    # caption in RSICD/RSITMD/UCM/Sydney (188), and past what any text tower reads (77 CLIP
    # tokens; 512 BERT tokens at about 4 characters each), so nothing a model sees is lost.
    max_caption_chars: int = num(2000, ge=1)
    # A larger image is a bad row at import, checked from its header before decoding (a 24 KB
    # file can expand to 196 Mpx): preprocess.max_image_side squared, 200 MB decoded as RGB.
    max_image_pixels: int = num(8192 * 8192, ge=1)
    # Splits made at import, seeded by split_seed over the sorted image names (order-free): a
    # release without splits (the UrbanCross CSV) is cut into train/val/test by these shares of
    # each country's images (the reference's 70/10/20; every country, the target too, gets the
    # same cut: its train images adapt, its val chooses, its test is only reported); a release
    # with train and test but no val gets round(val_fraction * images) of its train images as val.
    val_fraction: float = num(0.1, ge=0, lt=1)
    test_fraction: float = num(0.2, ge=0, lt=1)
    split_seed: int = num(0, ge=0)

    def check(self) -> None:
        require(
            self.val_fraction + self.test_fraction < 1,
            f"val_fraction + test_fraction must be < 1, got {self.val_fraction} + {self.test_fraction}",
        )


@dataclass(frozen=True)
class DedupConfig(Section):
    """`urbancross data dedup`: exact and near-duplicate images within and across manifests.

    Two images are duplicates when the Hamming distance of their perceptual hashes
    (imagehash.phash, hash_size**2 bits) is at most max_distance. With the defaults (48 of 256
    bits), no two of 300 distinct benchmark tiles (64 and 256 px) came within 66 of each other,
    while JPEG re-encoding (<= 26), resizing (<= 12) and 99% of 1% shifts stayed within 48.
    """

    hash_size: int = num(16, ge=4, le=32)
    max_distance: int = num(48, ge=0)
    # Hash with Ray Data from this many images on (in all manifests together); below it a plain
    # loop, since starting Ray (seconds) costs more than hashing a few thousand small images.
    ray_min_images: int = num(10_000, ge=0)

    def check(self) -> None:
        bits = self.hash_size**2
        require(self.max_distance < bits, f"max_distance must be in [0, {bits}), got {self.max_distance}")


@dataclass(frozen=True)
class SamConfig(Section):
    """SAM segmentation stage (Ray Data actor pool)."""

    model_type: Literal["vit_b", "vit_l", "vit_h", "tiny"] = "tiny"
    checkpoint: str = ""  # local .pth; `embedded` = the packaged tiny SAM (assets/sam-tiny.pt); empty with `tiny` = a random tiny SAM under out_dir
    points_per_side: int = num(4, ge=1)  # 16 prompts: enough for the tiny demo SAM; real SAM models use 32
    pred_iou_thresh: float = num(0.5, ge=0, le=1)
    stability_score_thresh: float = num(0.6, ge=0, le=1)
    min_mask_region_area: int = num(0, ge=0)
    keep_largest: int = num(50, ge=1)  # masks sorted by area, this many kept before ranking
    # Ranking of the kept masks: SAM's predicted IoU x stability (from the image alone), or
    # "caption": CLIP similarity to the row's captions (UrbanCross), for training rows only.
    selection: Literal["quality", "caption"] = "quality"
    num_segments: int = num(10, ge=1)
    style: Literal["white", "crop"] = "white"
    segment_size: int = num(64, ge=1)
    num_gpus: float = num(0.0, ge=0)
    num_cpus: float = num(0.5, ge=0)
    concurrency: int = num(1, ge=1)  # actors (each loads the models once)
    batch_size: int = num(8, ge=1)  # rows per map_batches call (SAM runs per image; CLIP scores per batch)
    threads: int = num(0, ge=0)  # torch threads per actor (and in-process); 0 = as set (Ray: OMP_NUM_THREADS = num_cpus, >= 1)

    def check(self) -> None:
        require(self.keep_largest >= self.num_segments, "keep_largest must be >= num_segments")
        require(self.checkpoint != "embedded" or self.model_type == "tiny",
                f"checkpoint: embedded is the packaged tiny SAM, so it needs model_type: tiny, not {self.model_type}")


@dataclass(frozen=True)
class RefineConfig(Section):
    """LMM caption refinement stage; `passthrough` keeps the captions as they are."""

    kind: Literal["passthrough", "lmm"] = "passthrough"
    model_dir: str = ""  # transformers from_pretrained(local_dir)
    prompt: str = (
        "Write a comprehensive and detailed description of the satellite image and its "
        "geographical tags: {geo_tags}. Caption: {caption}"
    )
    max_new_tokens: int = num(48, ge=1)
    min_chars: int = num(8, ge=0)
    max_chars: int = num(600, ge=1)
    max_repeat_fraction: float = num(0.5, ge=0, le=1)
    # auto = bf16 on a GPU, fp32 on CPU: an InstructBLIP-Vicuna-7B holds 8B parameters, 32 GB in fp32
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    num_gpus: float = num(0.0, ge=0)
    num_cpus: float = num(0.5, ge=0)
    concurrency: int = num(1, ge=1)
    batch_size: int = num(4, ge=1)
    threads: int = num(0, ge=0)  # torch threads per actor (and in-process); 0 = as set (Ray: OMP_NUM_THREADS = num_cpus, >= 1)

    def check(self) -> None:
        require(self.min_chars <= self.max_chars, f"min_chars must be <= max_chars, got {self.min_chars} > {self.max_chars}")


@dataclass(frozen=True)
class PreprocessConfig(Section):
    """Ray Data preprocessing: manifest in -> SAM segments + refined captions -> manifest out."""

    input: str = ""  # empty = data.manifest
    output: str = ""  # empty = <out_dir>/preprocessed; rejected rows go to <output>_rejects.parquet
    image_modes: tuple[str, ...] = ("RGB", "RGBA", "L", "P")  # PIL modes accepted
    min_image_side: int = num(16, ge=1)  # pixels; smaller images are rejected
    max_image_side: int = num(8192, ge=1)  # pixels; larger images are rejected
    block_rows: int = num(0, ge=0)  # rows per Ray Data input block; 0 = the larger stage batch_size
    progress_bars: bool = False  # Ray Data's progress bars (the job logs its own img/s per block)
    # true: SAM and refinement in one actor pool (sam.concurrency actors, sam's CPUs/GPUs/threads), a
    # block goes through both in one actor: on few cores no stage's actor idles while the other works
    fuse_stages: bool = False
    sam: SamConfig = field(default_factory=SamConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)

    def check(self) -> None:
        require(len(self.image_modes) >= 1, "image_modes must name at least one PIL mode")
        require(self.min_image_side <= self.max_image_side, "need 1 <= min_image_side <= max_image_side")


@dataclass(frozen=True)
class SamPretrainConfig(Section):
    """`urbancross pretrain-sam`: the tiny SAM fine-tuned from random init on the generator's own object
    masks (`synth.object_masks`) of random web-style tiles, with SAM's point-prompt mask objective."""

    tiles: int = num(4000, ge=1)  # distinct training tiles (web styles, never the benchmark's countries)
    image_size: int = num(64, ge=32, le=1024)  # tile side in pixels, as the benchmark's (synth.image_size)
    steps: int = num(2000, ge=1)  # optimizer steps
    batch_size: int = num(8, ge=1)  # tiles per step
    prompts_per_tile: int = num(8, ge=1)  # point prompts per tile per step, each on a random object (or the ground)
    ground_fraction: float = num(0.15, ge=0, lt=1)  # share of prompts on the ground, whose target is all non-object pixels
    lr: float = num(3e-3, gt=0)  # AdamW peak, linear warm-up then cosine to 0
    warmup: float = num(0.05, ge=0, lt=1)  # share of the steps
    weight_decay: float = num(0.01, ge=0)
    focal_weight: float = num(20.0, ge=0)  # SAM's 20:1 focal:dice
    dice_weight: float = num(1.0, ge=0)
    iou_weight: float = num(1.0, ge=0)  # MSE of the IoU head against each output's true IoU
    eval_tiles: int = num(100, ge=0)  # held-out web tiles (another stream); the benchmark's val split (synth) is scored too
    seed: int = num(0, ge=0)
    output: str = ""  # the fp16 checkpoint (+ sidecar <output>.json); empty = <out_dir>/sam_pretrain/sam-tiny.pt
    num_workers: int = num(1, ge=0)  # Ray Train workers; 0 = run the loop in this process
    cpus_per_worker: float = num(1.0, ge=0)
    threads: int = num(1, ge=1)  # torch threads in the loop and the evaluation (1: lean on a shared machine)


@dataclass(frozen=True)
class ModelConfig(Section):
    """The model family and its shapes. `urbancross`: two-tower CLIP (open_clip) with segment
    fusion (CMPAGL's global-local block and pre-alignment as options). `cmpagl`: Gswin + BERT,
    pre-aligned, fusion encoder + matching head (`urbancross/model/cmpagl.py`); it reads
    `cmpagl_size`, `swin_dir`, `bert_dir`, `gswin_global` (False = plain Swin) and ignores the
    CLIP-only keys (preset, pretrained tags, segments)."""

    family: Literal["urbancross", "cmpagl"] = "urbancross"
    cmpagl_size: Literal["tiny", "base"] = "tiny"  # tiny: 64 px, CPU; base: Swin-T + BERT-base shapes
    swin_dir: str = ""  # cmpagl: local Swin checkpoint directory (transformers SwinModel keys); empty = random init
    bert_dir: str = ""  # cmpagl: local BERT directory (weights + vocab.txt); empty = random init + shipped vocabulary
    gswin_global: bool = True  # cmpagl: Gswin blocks' global-local window cross-attention (False = plain Swin ablation)
    preset: str = "tiny"  # tiny | ViT-B-32 | ViT-B-32-quickgelu | ViT-L-14 | ...
    pretrained: str = ""  # local checkpoint file; never a download tag
    use_segments: bool = True
    # crops: each segment image through the image tower (the paper; up to 11x the tower's work);
    # pooled: the tile's patch tokens averaged under each segment's mask (one pass; needs sam.style white)
    segment_encoding: Literal["crops", "pooled"] = "crops"
    fusion_heads: int = num(4, ge=1)
    global_local: bool = False  # CMPAGL global-local visual block
    window_sizes: tuple[int, ...] = nums((2, 4), ge=1)
    global_local_heads: int = num(4, ge=1)
    pre_align: bool = False  # CMPAGL pre-alignment loss on unimodal features
    aug_crop_scale: float = num(0.8, gt=0, le=1)  # train crops keep at least this share of the tile's area
    aug_color_jitter: float = num(0.2, ge=0, lt=1)  # brightness/contrast/saturation jitter strength (0 = off)

    def check(self) -> None:
        require(bool(self.window_sizes), "window_sizes must name at least one window size")
        require(  # "embedded" (urbancross.embedded.EMBEDDED) is the packaged tiny CLIP
            self.pretrained != "embedded" or (self.family == "urbancross" and self.preset == "tiny"),
            f"pretrained: 'embedded' is the packaged tiny CLIP, only valid with family urbancross and preset tiny "
            f"(got family {self.family!r}, preset {self.preset!r})",
        )

    @property
    def uses_segments(self) -> bool:
        """Whether the model takes SAM segments (CMPAGL never does)."""
        return self.use_segments and self.family == "urbancross"


@dataclass(frozen=True)
class LossConfig(Section):
    """Retrieval losses; the total is a weighted sum (weights here)."""

    kind: Literal["infonce", "vse", "triplet"] = "infonce"
    margin: float = num(0.2, ge=0)
    image_text_weight: float = num(1.0, ge=0)
    segment_text_weight: float = num(0.5, ge=0)
    image_segment_weight: float = num(0.25, ge=0)
    intra_class_weight: float = num(0.1, ge=0)  # used by kind=triplet (CMPAGL)
    pre_align_weight: float = num(0.1, ge=0)  # used when model.pre_align is on, and by model.family=cmpagl
    itm_weight: float = num(1.0, ge=0)  # model.family=cmpagl: matching-head loss on mined hard negatives


@dataclass(frozen=True)
class SMRConfig(Section):
    """Similarity-matrix re-weighting (re-ranking) at retrieval time."""

    enabled: bool = True
    k: int = num(10, ge=1)  # each query's top-k candidates are re-weighted; the rest keep their similarity
    score_weight: float = num(1.0, ge=0)  # column-normalised score term (GaLR's Wp1)
    rank_weight: float = num(1.0, ge=0)  # exp(-decay * rank) term, forward and reverse direction
    decay: float = num(0.05, ge=0)


@dataclass(frozen=True)
class CurriculumConfig(Section):
    """Adaptive curriculum sampling: difficulty score + pacing (easy -> hard)."""

    enabled: bool = True
    difficulty: Literal["similarity_margin", "caption_complexity"] = "similarity_margin"
    pacing: Literal["linear", "root", "geometric"] = "root"
    start_fraction: float = num(0.3, gt=0, le=1)
    length: float = num(0.6, gt=0, le=1)  # share of the epochs after which all data is used
    rescore_every: int = num(1, ge=1)  # epochs between difficulty re-scoring


@dataclass(frozen=True)
class LRScheduleConfig(Section):
    """A stage's learning-rate curve around its peak lr (`urbancross/train/lr_schedule.py`)."""

    kind: Literal["cosine", "constant"] = "cosine"  # constant: the peak throughout, no warm-up
    warmup: float = num(0.05, ge=0, lt=1)  # share of the stage's optimizer steps rising linearly to the peak
    final: float = num(0.0, ge=0, le=1)  # lr at the last step, as a share of the peak


@dataclass(frozen=True)
class TrainConfig(Section):
    """Ray Train + DeepSpeed training (stage 1)."""

    epochs: int = num(6, ge=1)
    batch_size: int = num(32, ge=1)  # per worker micro-batch
    grad_accum: int = num(1, ge=1)
    lr: float = num(5e-4, gt=0)  # peak; pretrained CLIP weights want far less (README: pretrained weights)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    weight_decay: float = num(0.05, ge=0)
    grad_clip: float = num(1.0, ge=0)
    zero_stage: int = num(0, ge=0, le=3)
    num_workers: int = num(2, ge=0)  # 0 = run the loop in the driver process (last checkpoint: <out_dir>/<stage>/checkpoints)
    use_gpu: bool = False
    cpus_per_worker: float = num(0.5, ge=0)
    max_failures: int = num(1, ge=0)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto = bf16 on GPU, fp32 on CPU
    domain: str = ""  # training domain; empty = data.source_domain, "all" = every domain
    val_images: int = num(64, ge=0)  # validation slice (val split, else held out of the train split)
    # Both stages export their best val-mR epoch; with patience > 0 they also stop after this many
    # epochs without a better val mR (epochs inside the curriculum's pacing ramp do not count).
    patience: int = num(0, ge=0)
    ingest_actors: int = num(0, ge=0)  # 0 = Ray Data tasks decode (once per run); N = a pool of N decoding actors
    ingest_cpus: float = num(0.5, ge=0)  # CPUs per decoding task/actor
    # Decoded rows are cached once per run (urbancross/train/cache.py): in memory (object store, a
    # copy per worker) or on disk (<out_dir>/<stage>/cache, memory-mapped); auto = memory up to cache_memory_mb
    cache: Literal["auto", "memory", "disk"] = "auto"
    cache_memory_mb: float = num(2048, ge=0)
    threads_per_worker: int = num(1, ge=1)  # torch threads in each Train worker (Ray sets OMP_NUM_THREADS=1 for fractional CPUs)
    checkpoint_every: int = num(5, ge=1)  # epochs between checkpoints; the last epoch of a fit always has one
    val_every: int = num(1, ge=1)  # epochs between validations; the last epoch of a fit always has one
    progress_seconds: float = num(30.0, gt=0)  # a progress line (rows, rate, ETA) at most this often
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)


@dataclass(frozen=True)
class AdaptConfig(Section):
    """Weighted adversarial fine-tuning from a trained checkpoint (stage 2)."""

    checkpoint: str = ""  # stage-1 model: a model.pt or a folder holding one; empty = <out_dir>/train
    epochs: int = num(5, ge=1)  # 5 passes: the kept share reaches 100% in the last (the reference's 5 cycles)
    # Peak lr, 100x below train.lr as in the reference (1e-5 training, 1e-7 fine-tuning a
    # pretrained CLIP): adaptation fine-tunes a trained model and must not undo it.
    lr: float = num(5e-6, gt=0)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    # Kept share of each source batch, most target-like first: select_fraction in the first pass,
    # + select_growth per pass up to 1 (the reference: 0.2 + 0.2 * cycle); curriculum off = fixed.
    select_fraction: float = num(0.2, gt=0, le=1)
    select_growth: float = num(0.2, ge=0, le=1)
    curriculum: bool = True
    # Weights of the kept rows: target-likeness min-max scaled into [weight_floor, 1], mean 1.
    # 0 = the reference's exact scaling (its least target-like kept row gets weight 0).
    weight_floor: float = num(0.5, ge=0, le=1)
    weighted_term: Literal["domain", "retrieval"] = "domain"  # the reference weights the adversarial term
    disc_hidden: int = num(0, ge=0)  # 0 = the embedding dimension
    disc_depth: int = num(2, ge=1)
    disc_lr: float = num(1e-3, gt=0)
    disc_inputs: Literal["image", "image_text"] = "image"  # embeddings the discriminator sees (reference: image)
    mode: Literal["grl", "alternating"] = "grl"
    schedule: Literal["constant", "linear", "dann"] = "dann"
    gamma: float = num(10.0, gt=0)
    max_weight: float = num(0.1, ge=0)
    use_target_captions: bool = False  # also train retrieval on target pairs (off: captions only weight)


@dataclass(frozen=True)
class EvaluateConfig(Section):
    """Retrieval evaluation: which splits/domains, and SMR re-ranking."""

    ks: tuple[int, ...] = nums((1, 5, 10), ge=1)
    batch_size: int = num(64, ge=1)
    smr: SMRConfig = field(default_factory=SMRConfig)
    num_cpus: float = num(0.5, ge=0)  # per embedding actor (Ray Data actor pool)
    num_gpus: float = num(0.0, ge=0)
    concurrency: int = num(1, ge=1)  # embedding actors
    output: str = ""  # report folder; empty = <out_dir>/evaluate
    rerank_k: int = num(16, ge=1)  # model.family=cmpagl: each query's top k re-scored by the matching head

    def check(self) -> None:
        require(len(self.ks) >= 1, f"ks must be positive integers, got {self.ks}")


@dataclass(frozen=True)
class MLflowConfig(Section):
    """Tracking store. Empty URI = `sqlite:///<out_dir>/mlflow.db` (the registry needs a DB store)."""

    tracking_uri: str = ""
    experiment: str = "urbancross"
    registered_model: str = "urbancross"

    def check(self) -> None:
        # A config is logged as run params and saved beside every run: credentials never go in
        # it. MLflow's client reads them from MLFLOW_TRACKING_USERNAME/_PASSWORD (or _TOKEN).
        require(
            "@" not in urllib.parse.urlsplit(self.tracking_uri).netloc,
            "tracking_uri must not hold credentials (user:password@host); export MLFLOW_TRACKING_USERNAME "
            "and MLFLOW_TRACKING_PASSWORD instead (the URI is not shown: it holds a secret)",
        )


@dataclass(frozen=True)
class PromoteConfig(Section):
    """Registry gate: a candidate becomes `champion` only if clearly better on the same split."""

    # mean mR (over domains) must beat the champion's by at least this: 2·sd·√2 of the run-to-run
    # spread, so a rerun of the champion's own config passes about 2% of the time
    # (`python bench/promote_margin.py --seeds 0,1,2,3,4`: the demo config, fine-tuning the packaged
    # CLIP 10 epochs; gate mR 68.94 sd 1.36 over 5 seeds -> 3.84. From random init it was sd 1.10 -> 3.1)
    margin: float = num(3.8, ge=0)
    # and no domain's mR may fall by more than this; stricter than the per-domain spread (sd 1.5-3.6
    # on the embedded val splits of 20-40 tiles), so it refuses more equal candidates than it needs to
    max_domain_drop: float = num(2.0, ge=0)
    manifest: str = ""  # evaluation manifest; empty = data.manifest
    split: str = "val"  # choosing a model is never done on test: that split is only reported


@dataclass(frozen=True)
class TuneConfig(Section):
    """Ray Tune sweep over a space file (tune_spaces/*.yaml); each trial is a whole Train run."""

    scheduler: Literal["asha", "pbt"] = "asha"
    num_samples: int = num(4, ge=1)  # trials (times the grid size when the space has `grid` params)
    metric: str = "val_mR"
    mode: Literal["max", "min"] = "max"
    max_concurrent_trials: int = num(1, ge=1)
    grace_period: int = num(1, ge=1)  # ASHA: epochs a trial always runs before it may be stopped
    reduction_factor: float = num(2.0, gt=1)  # ASHA: keep the best 1/reduction_factor at each rung
    perturbation_interval: int = num(1, ge=1)  # PBT: epochs per segment between exploit/explore steps
    synch: bool = False  # PBT: exploit only once every trial reached the step (reproducible, waits)
    cpus_per_trial: float = num(0.5, ge=0)  # the trial driver; training runs there when train.num_workers == 0
    gpus_per_trial: float = num(0.0, ge=0)
    max_failures: int = num(0, ge=0)  # retries of a failed trial (from its last checkpoint)
    storage_path: str = ""  # empty = <out_dir>/tune
    name: str = "sweep"

    def check(self) -> None:
        require(bool(self.name) and "/" not in self.name, f"name must be a non-empty folder name, got {show(self.name)}")


@dataclass(frozen=True)
class ServeConfig(Section):
    """`urbancross serve`: the Ray Serve search app (one deployment, each replica holds the model once)."""

    host: str = "127.0.0.1"
    port: int = num(8000, ge=1, le=65535)
    num_replicas: int = num(1, ge=1)
    num_cpus: float = num(0.5, ge=0)  # per replica
    num_gpus: float = num(0.0, ge=0)
    max_ongoing_requests: int = num(64, ge=1)  # per replica; more wait in the proxy
    max_batch_size: int = num(16, ge=1)  # text queries embedded together (@serve.batch)
    batch_wait_timeout_s: float = num(0.01, ge=0)  # how long a batch waits to fill
    max_k: int = num(100, ge=1)  # largest k a request may ask for
    max_query_chars: int = num(1000, ge=1)  # longer queries get a 400
    max_upload_bytes: int = num(20_000_000, ge=1)  # POST /search/image and /index bodies
    follow_alias_s: float = num(0.0, ge=0)  # poll the registry alias this often and swap to a new version; 0 = never


@dataclass(frozen=True)
class PretrainConfig(Section):
    """`urbancross pretrain`: contrastive pretraining of the tiny CLIP's two towers on the embedded
    world's web corpus (`urbancross/data/web.py`), run as the train stage (Ray Train + DeepSpeed;
    the rest of `train.*` applies) with the model chosen on the web val split only.

    The corpus: `styles` random styles x `tiles_per_style` tiles at `synth.image_size`, whole
    styles held out as web val. The export is the CLIP towers in open_clip's format, half
    precision, with a sidecar (`urbancross.embedded.write_sidecar`) at `output`.
    """

    styles: int = num(3600, ge=2)
    tiles_per_style: int = num(5, ge=1)
    val_fraction: float = num(0.05, gt=0, lt=1)  # share of styles held out (web val: model choice, metrics)
    captions_per_image: int = num(5, ge=1, le=10)
    seed: int = num(0, ge=0)  # corpus and training seed
    corpus: str = ""  # manifest folder of the corpus; empty = <out_dir>/web (re-made when its settings change)
    output: str = ""  # exported checkpoint; empty = <out_dir>/clip-tiny.pt
    epochs: int = num(4, ge=1)
    batch_size: int = num(128, ge=2)  # per worker micro-batch (train.batch_size)
    lr: float = num(1e-3, gt=0)  # peak (train.lr_schedule's curve)
    val_images: int = num(1000, ge=1)  # web val images scored each epoch (model choice)
    benchmark: str = ""  # a benchmark manifest, or `synth` (the synth section's, made under out_dir): zero-shot mR on its val split


@dataclass(frozen=True)
class Config(Section):
    """A whole run: one file configures every stage of the pipeline."""

    seed: int = num(0, ge=0)
    out_dir: str = "runs/default"
    synth: SynthConfig = field(default_factory=SynthConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    sam_pretrain: SamPretrainConfig = field(default_factory=SamPretrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def check(self) -> None:
        require(
            not (self.model.uses_segments and self.model.segment_encoding == "pooled" and self.preprocess.sam.style != "white"),
            "model.segment_encoding pooled reads each segment's mask from its white background: "
            f"needs preprocess.sam.style white, got {self.preprocess.sam.style}",
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts and lists (YAML/JSON-able); `config_from_dict` reads it back."""
        return _plain(self)

    def flat(self) -> dict[str, Any]:
        """Dotted-key view, e.g. for MLflow params."""
        return flatten(self.to_dict())

    def override(self, changes: Mapping[str, Any] | Sequence[str], where: str = "override") -> Config:
        """A new, validated Config with `changes` applied; `self` is unchanged.

        `changes` maps dotted keys to values (`{"data.manifest": "/x", "model": other.model}`),
        or is a list of `KEY=VALUE` strings whose values are read as YAML (the `--set` form).
        A bad key or value raises `ConfigError` naming `where` and the dotted path.
        """
        raw = self.to_dict()
        _apply(raw, changes, where)
        return from_dict(Config, raw, where=where)

    def tracking_uri(self) -> str:
        """The config's URI, else a local SQLite file under out_dir.

        $MLFLOW_TRACKING_URI is deliberately not consulted: `mlflow.set_tracking_uri` sets it
        in-process, so one run's store would silently become the next config's default.
        """
        if self.mlflow.tracking_uri:
            return self.mlflow.tracking_uri
        local = storage.local_path(self.out_dir)  # `file://` too; Path() would make `file:/...` a relative folder
        if local is None:
            raise ConfigError(f"mlflow.tracking_uri is empty and out_dir {show(self.out_dir)} is remote: set a tracking server URI")
        return "sqlite:///" + str(Path(local) / "mlflow.db")


# --------------------------------------------------------------------------- loading


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def local_absolute(path: str) -> str:
    """A local relative path made absolute; URIs and empty strings unchanged."""
    return path if not path or "://" in path else os.path.abspath(path)


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without aliases: `*name` could expand a few hundred bytes into billions of nodes."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a config", mark)
        return super().compose_node(parent, index)


def load_yaml(text: str, where: str) -> Any:
    """Parse YAML safely: no aliases, no Python objects; every failure is a one-line ConfigError."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {' '.join(str(e).split())}") from None
    except (ValueError, RecursionError) as e:  # e.g. a 5000-digit integer, nesting thousands deep
        raise ConfigError(f"{where}: not valid YAML: {show(str(e))}") from None


def read_yaml_file(path: str | os.PathLike, what: str = "config") -> Any:
    """Read a UTF-8 YAML file through `load_yaml`; unreadable or non-UTF-8 files fail in one line."""
    where = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{where}: cannot read {what}: {e.strerror}") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}); save the {what} as UTF-8") from None
    return load_yaml(text, where)


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load `path` (YAML) over the defaults, then apply `key.sub=value` overrides."""
    raw: dict[str, Any] = {}
    where = "<defaults>"
    if path is not None:
        where = str(path)
        loaded = read_yaml_file(path)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{where}: top level must be a mapping, got {type(loaded).__name__}")
        raw = loaded
    _apply(raw, overrides, where)
    return from_dict(Config, raw, where=where)


def config_from_dict(raw: dict[str, Any], where: str = "<dict>") -> Config:
    return from_dict(Config, raw, where=where)


def _apply(raw: dict[str, Any], changes: Mapping[str, Any] | Sequence[str], where: str) -> None:
    """Set dotted `changes` (a mapping, or `KEY=VALUE` strings) into the nested dict `raw`."""
    if isinstance(changes, Mapping):
        items = [(str(k), _plain(v)) for k, v in changes.items()]
    else:
        items = []
        for item in changes:
            if "=" not in item:
                raise ConfigError(f"{where}: override {show(item)}: expected KEY=VALUE, e.g. train.epochs=3")
            key, value = item.split("=", 1)
            items.append((key.strip(), load_yaml(value, f"{where}: override {show(key.strip(), quote=False)}")))
    for key, value in items:
        d = raw
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = d.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"{where}: {show(key, quote=False)}: {show(part, quote=False)} is not a section")
            d = nxt
        d[parts[-1]] = value


def _plain(value: Any) -> Any:
    """Dataclasses -> dicts and tuples -> lists, recursively (what YAML and JSON take)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def dump_config(cfg: Config) -> str:
    """`cfg` as YAML text; `load_config` reads it back unchanged."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write `cfg` as YAML atomically; `load_config` reads it back unchanged."""
    atomic.write_text(path, dump_config(cfg))


def from_dict(cls: type, raw: Any, where: str = "<dict>", prefix: str = ""):
    """Build dataclass `cls` from a mapping, checking keys and types; the section checks its ranges."""
    label = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {label} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {prefix}{show(unknown[0], quote=False)}; {label} accepts: {', '.join(sorted(fields))}"
        )
    kwargs = {name: _convert(hints[name], raw[name], where, f"{prefix}{name}") for name in raw}
    try:
        return cls(**kwargs)  # validates itself (`Section.validate`)
    except ConfigError as e:
        raise ConfigError(f"{where}: {label}: {e}" if prefix else f"{where}: {e}") from None


def _check_range(f: dataclasses.Field, value: Any) -> None:
    """The field's declared range (`num`); floats must also be finite."""
    bounds = f.metadata.get("range")
    if bounds is None:
        return
    ge, gt, le, lt = bounds
    for v in value if isinstance(value, tuple) else (value,):
        ok = (not isinstance(v, float) or math.isfinite(v)) and (ge is None or v >= ge) and (gt is None or v > gt)
        ok = ok and (le is None or v <= le) and (lt is None or v < lt)
        if not ok:
            raise ConfigError(f"{f.name} must be {_describe(bounds, f.type)}, got {show(value)}")


def _describe(bounds: tuple, tp: Any) -> str:
    """`0-3` (integers), `in (0, 1]`, `>= 0`: the range as the old messages wrote it."""
    ge, gt, le, lt = bounds
    lo, hi = (ge if ge is not None else gt), (le if le is not None else lt)
    if lo is not None and hi is not None:
        if "int" in str(tp) and ge is not None and le is not None:
            return f"{ge:g}-{le:g}"
        return f"in {'[' if ge is not None else '('}{lo:g}, {hi:g}{']' if le is not None else ')'}"
    return f"{'>=' if ge is not None else '>' if gt is not None else '<=' if le is not None else '<'} {(lo if lo is not None else hi):g}"


def _convert(tp: Any, value: Any, where: str, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{where}: {path}: expected {expected}, got {show(value)}")

    if dataclasses.is_dataclass(tp):
        if isinstance(value, bool) and "enabled" in {f.name for f in dataclasses.fields(tp)}:
            value = {"enabled": value}  # `curriculum: off` is shorthand for `enabled: false`
        return from_dict(tp, value, where, path + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        errors = []
        for a in rest:
            try:
                return _convert(a, value, where, path)
            except ConfigError as e:
                errors.append(str(e))
        raise errors[0] if len(errors) == 1 else bad(" or ".join(map(_name, rest)))
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {path}: must be one of {', '.join(map(repr, args))}, got {show(value)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        item = args[0] if args else Any
        return tuple(_convert(item, v, where, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        try:
            return float(value)
        except OverflowError:
            raise bad("a finite number") from None
    if tp is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    raise ConfigError(f"{where}: {path}: unsupported field type {tp!r}")


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = _SHOW.maxlong = 80
_SHOW.maxlist = _SHOW.maxtuple = _SHOW.maxdict = 6
_SHOW.maxlevel = 3


def show(value: Any, quote: bool = True) -> str:
    """A value for an error message, cut to about 80 characters (a config may hold huge strings)."""
    if isinstance(value, str) and not quote:
        return value if len(value) <= 80 else f"{value[:60]}... ({len(value)} chars)"
    if isinstance(value, str) and len(value) > 80:
        return f"{value[:60]!r}... ({len(value)} chars)"
    return _SHOW.repr(value)


def require(cond: bool, message: str) -> None:
    """For `check()` hooks: raise ConfigError(message) unless `cond`."""
    if not cond:
        raise ConfigError(message)


__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "DedupConfig",
    "MLflowConfig",
    "PretrainConfig",
    "SynthConfig",
    "config_from_dict",
    "flatten",
    "from_dict",
    "load_config",
    "load_yaml",
    "local_absolute",
    "num",
    "read_yaml_file",
    "require",
    "dump_config",
    "save_config",
    "show",
]
