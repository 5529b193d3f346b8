"""Typed run configuration: dataclasses loaded from YAML and validated once, here.

Every default lives in exactly one place: the field defaults below. A YAML file only
overrides what it names; an unknown key, a wrong type or a bad value raises
`ConfigError` naming the file and the dotted path of the field.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid."""


# --------------------------------------------------------------------------- sections


@dataclass
class SynthConfig:
    """The embedded benchmark (procedural satellite-like tiles with captions)."""

    domains: list[str] = field(default_factory=lambda: ["Finland", "Germany", "Spain"])
    images_per_domain: int = 120
    image_size: int = 64
    captions_per_image: int = 5
    test_fraction: float = 0.25
    val_fraction: float = 0.0
    near_duplicate_fraction: float = 0.5  # chance an image is a one-element variant of the previous one
    seed: int = 0

    def validate(self) -> None:
        require(len(self.domains) >= 1, "domains must name at least one domain")
        dup = sorted({d for d in self.domains if self.domains.count(d) > 1})
        require(not dup, f"domains must be distinct (image ids are per domain), {dup} repeated")
        require(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        require(self.images_per_domain >= 2, f"images_per_domain must be >= 2, got {self.images_per_domain}")
        require(self.image_size >= 32, f"image_size must be >= 32 pixels, got {self.image_size}")
        require(1 <= self.captions_per_image <= 10, f"captions_per_image must be 1-10, got {self.captions_per_image}")
        require(
            0 <= self.test_fraction < 1 and 0 <= self.val_fraction < 1 and self.test_fraction + self.val_fraction < 1,
            f"test_fraction + val_fraction must be in [0, 1), got {self.test_fraction} + {self.val_fraction}",
        )
        require(
            0 <= self.near_duplicate_fraction <= 1,
            f"near_duplicate_fraction must be in [0, 1], got {self.near_duplicate_fraction}",
        )


@dataclass
class DataConfig:
    """Where the manifest is and which part of it a stage uses."""

    manifest: str = ""  # Parquet dataset folder or URI; empty = the demo's synthesized one
    root: str = ""  # base for relative image paths; empty = the manifest's parent folder
    source_domain: str = "Finland"
    target_domain: str = "Spain"
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    image_size: int = 64
    num_segments: int = 10
    use_refined_captions: bool = True
    augment: bool = True
    # Import limits. A caption is cut at max_caption_chars (and reported): 10x the longest human
    # caption in RSICD/RSITMD/UCM/Sydney (188), and past what any text tower reads (77 CLIP
    # tokens; 512 BERT tokens at about 4 characters each), so nothing a model sees is lost.
    max_caption_chars: int = 2000
    # A larger image is a bad row at import, checked from its header before decoding (a 24 KB
    # file can expand to 196 Mpx): preprocess.max_image_side squared, 200 MB decoded as RGB.
    max_image_pixels: int = 8192 * 8192

    def validate(self) -> None:
        require(self.num_segments >= 1, f"num_segments must be >= 1, got {self.num_segments}")
        require(self.max_caption_chars >= 1, f"max_caption_chars must be >= 1, got {self.max_caption_chars}")
        require(self.max_image_pixels >= 1, f"max_image_pixels must be >= 1, got {self.max_image_pixels}")


@dataclass
class DedupConfig:
    """`urbancross data dedup`: exact and near-duplicate images within and across manifests.

    Two images are duplicates when the Hamming distance of their perceptual hashes
    (imagehash.phash, hash_size**2 bits) is at most max_distance. With the defaults (48 of 256
    bits), no two of 300 distinct benchmark tiles (64 and 256 px) came within 66 of each other,
    while JPEG re-encoding (<= 26), resizing (<= 12) and 99% of 1% shifts stayed within 48.
    """

    hash_size: int = 16
    max_distance: int = 48
    # Hash with Ray Data from this many images on (in all manifests together); below it a plain
    # loop, since starting Ray (seconds) costs more than hashing a few thousand small images.
    ray_min_images: int = 10_000

    def validate(self) -> None:
        require(4 <= self.hash_size <= 32, f"hash_size must be 4-32, got {self.hash_size}")
        bits = self.hash_size**2
        require(0 <= self.max_distance < bits, f"max_distance must be in [0, {bits}), got {self.max_distance}")
        require(self.ray_min_images >= 0, f"ray_min_images must be >= 0, got {self.ray_min_images}")


@dataclass
class SamConfig:
    """SAM segmentation stage (Ray Data actor pool)."""

    model_type: Literal["vit_b", "vit_l", "vit_h", "tiny"] = "tiny"
    checkpoint: str = ""  # local .pth; empty with `tiny` = build a random tiny SAM under out_dir
    points_per_side: int = 4  # 16 prompts: fast for the tiny demo SAM; real SAM models use 32
    pred_iou_thresh: float = 0.5
    stability_score_thresh: float = 0.6
    min_mask_region_area: int = 0
    keep_largest: int = 50  # masks sorted by area, this many kept before CLIP scoring
    num_segments: int = 10
    style: Literal["white", "crop"] = "white"
    segment_size: int = 64
    num_gpus: float = 0.0
    num_cpus: float = 0.5
    concurrency: int = 1
    batch_size: int = 8

    def validate(self) -> None:
        require(self.num_segments >= 1, f"num_segments must be >= 1, got {self.num_segments}")
        require(self.keep_largest >= self.num_segments, "keep_largest must be >= num_segments")
        require(self.concurrency >= 1 and self.batch_size >= 1, "concurrency and batch_size must be >= 1")


@dataclass
class RefineConfig:
    """LMM caption refinement stage; `passthrough` keeps the captions as they are."""

    kind: Literal["passthrough", "lmm"] = "passthrough"
    model_dir: str = ""  # transformers from_pretrained(local_dir)
    prompt: str = (
        "Write a comprehensive and detailed description of the satellite image and its "
        "geographical tags: {geo_tags}. Caption: {caption}"
    )
    max_new_tokens: int = 48
    min_chars: int = 8
    max_chars: int = 600
    max_repeat_fraction: float = 0.5
    num_gpus: float = 0.0
    num_cpus: float = 0.5
    concurrency: int = 1
    batch_size: int = 4


@dataclass
class PreprocessConfig:
    """Ray Data preprocessing: manifest in -> SAM segments + refined captions -> manifest out."""

    input: str = ""  # empty = data.manifest
    output: str = ""  # empty = <out_dir>/preprocessed; rejected rows go to <output>_rejects.parquet
    image_modes: list[str] = field(default_factory=lambda: ["RGB", "RGBA", "L", "P"])  # PIL modes accepted
    min_image_side: int = 16  # pixels; smaller images are rejected
    max_image_side: int = 8192  # pixels; larger images are rejected
    sam: SamConfig = field(default_factory=SamConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)

    def validate(self) -> None:
        require(len(self.image_modes) >= 1, "image_modes must name at least one PIL mode")
        require(1 <= self.min_image_side <= self.max_image_side, "need 1 <= min_image_side <= max_image_side")


@dataclass
class ModelConfig:
    """Two-tower CLIP (open_clip) with segment fusion; CMPAGL's global-local block as an option."""

    preset: str = "tiny"  # tiny | ViT-B-32 | ViT-B-32-quickgelu | ViT-L-14 | ...
    pretrained: str = ""  # local checkpoint file; never a download tag
    use_segments: bool = True
    fusion_heads: int = 4
    global_local: bool = False  # CMPAGL global-local visual block
    window_sizes: list[int] = field(default_factory=lambda: [2, 4])
    global_local_heads: int = 4
    pre_align: bool = False  # CMPAGL pre-alignment loss on unimodal features
    aug_crop_scale: float = 0.8  # train crops keep at least this share of the tile's area
    aug_color_jitter: float = 0.2  # brightness/contrast/saturation jitter strength (0 = off)

    def validate(self) -> None:
        require(self.fusion_heads >= 1 and self.global_local_heads >= 1, "fusion_heads and global_local_heads must be >= 1")
        require(bool(self.window_sizes) and all(w >= 1 for w in self.window_sizes), "window_sizes must be positive")
        require(0.0 < self.aug_crop_scale <= 1.0, f"aug_crop_scale must be in (0, 1], got {self.aug_crop_scale}")
        require(0.0 <= self.aug_color_jitter < 1.0, f"aug_color_jitter must be in [0, 1), got {self.aug_color_jitter}")


@dataclass
class LossConfig:
    """Retrieval losses; the total is a weighted sum (weights here)."""

    kind: Literal["infonce", "vse", "triplet"] = "infonce"
    margin: float = 0.2
    image_text_weight: float = 1.0
    segment_text_weight: float = 0.5
    image_segment_weight: float = 0.25
    intra_class_weight: float = 0.1  # used by kind=triplet (CMPAGL)
    pre_align_weight: float = 0.1  # used when model.pre_align is on

    def validate(self) -> None:
        require(self.margin >= 0.0, f"margin must be >= 0, got {self.margin}")
        weights = (self.image_text_weight, self.segment_text_weight, self.image_segment_weight,
                   self.intra_class_weight, self.pre_align_weight)
        require(all(w >= 0.0 for w in weights), "loss weights must be >= 0")


@dataclass
class SMRConfig:
    """Similarity-matrix re-weighting (re-ranking) at retrieval time."""

    enabled: bool = True
    k: int = 10  # each query's top-k candidates are re-weighted; the rest keep their similarity
    score_weight: float = 1.0  # column-normalised score term (GaLR's Wp1)
    rank_weight: float = 1.0  # exp(-decay * rank) term, forward and reverse direction
    decay: float = 0.05

    def validate(self) -> None:
        require(self.k >= 1, f"k must be >= 1, got {self.k}")
        require(self.score_weight >= 0.0 and self.rank_weight >= 0.0 and self.decay >= 0.0,
                "score_weight, rank_weight and decay must be >= 0")


@dataclass
class CurriculumConfig:
    """Adaptive curriculum sampling: difficulty score + pacing (easy -> hard)."""

    enabled: bool = True
    difficulty: Literal["similarity_margin", "caption_complexity"] = "similarity_margin"
    pacing: Literal["linear", "root", "geometric"] = "root"
    start_fraction: float = 0.3
    length: float = 0.6  # share of the epochs after which all data is used
    rescore_every: int = 1  # epochs between difficulty re-scoring

    def validate(self) -> None:
        require(0.0 < self.start_fraction <= 1.0, f"start_fraction must be in (0, 1], got {self.start_fraction}")
        require(0.0 < self.length <= 1.0, f"length must be in (0, 1], got {self.length}")
        require(self.rescore_every >= 1, f"rescore_every must be >= 1, got {self.rescore_every}")


@dataclass
class TrainConfig:
    """Ray Train + DeepSpeed training (stage 1)."""

    epochs: int = 6
    batch_size: int = 32  # per worker micro-batch
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    zero_stage: int = 0
    num_workers: int = 2  # 0 = run the loop in the driver process (last checkpoint: <out_dir>/<stage>/checkpoints)
    use_gpu: bool = False
    cpus_per_worker: float = 0.5
    max_failures: int = 1
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto = bf16 on GPU, fp32 on CPU
    domain: str = ""  # training domain; empty = data.source_domain, "all" = every domain
    val_images: int = 64  # validation slice (val split, else held out of the train split)
    ingest_actors: int = 0  # 0 = Ray Data tasks (workers reused across epochs); N = a pool of N decoding actors
    ingest_cpus: float = 0.5  # CPUs per decoding actor
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)

    def validate(self) -> None:
        require(self.zero_stage in (0, 1, 2, 3), f"zero_stage must be 0-3, got {self.zero_stage}")
        require(self.epochs >= 1 and self.batch_size >= 1, "epochs and batch_size must be >= 1")
        require(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        require(self.num_workers >= 0 and self.max_failures >= 0, "num_workers and max_failures must be >= 0")
        require(self.val_images >= 0 and self.ingest_actors >= 0, "val_images and ingest_actors must be >= 0")


@dataclass
class AdaptConfig:
    """Weighted adversarial fine-tuning from a trained checkpoint (stage 2)."""

    checkpoint: str = ""  # stage-1 model: a model.pt or a folder holding one; empty = <out_dir>/train
    epochs: int = 4
    lr: float = 1e-4
    select_fraction: float = 0.5  # share of each source batch selected (most target-like first)
    curriculum: bool = True  # move the selection window from easiest to harder slices over the passes
    slices: int = 5  # positions of the window (5 = quintiles when select_fraction = 0.2)
    curriculum_length: float = 1.0  # share of the passes after which the hardest slice is reached
    disc_hidden: int = 0  # 0 = the embedding dimension
    disc_depth: int = 2
    disc_lr: float = 1e-3
    disc_inputs: Literal["image_text", "image"] = "image_text"  # embeddings the discriminator sees
    mode: Literal["grl", "alternating"] = "grl"
    schedule: Literal["constant", "linear", "dann"] = "dann"
    gamma: float = 10.0
    max_weight: float = 0.1
    use_target_captions: bool = False  # also train retrieval on target pairs (off: captions only weight)

    def validate(self) -> None:
        require(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        require(0.0 < self.select_fraction <= 1.0, f"select_fraction must be in (0, 1], got {self.select_fraction}")
        require(self.slices >= 1 and self.disc_depth >= 1, "slices and disc_depth must be >= 1")
        require(0.0 < self.curriculum_length <= 1.0, f"curriculum_length must be in (0, 1], got {self.curriculum_length}")
        require(self.gamma > 0 and self.max_weight >= 0, "gamma must be > 0 and max_weight >= 0")


@dataclass
class EvaluateConfig:
    """Retrieval evaluation: which splits/domains, and SMR re-ranking."""

    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    batch_size: int = 64
    smr: SMRConfig = field(default_factory=SMRConfig)
    num_cpus: float = 0.5  # per embedding actor (Ray Data actor pool)
    num_gpus: float = 0.0
    concurrency: int = 1  # embedding actors
    output: str = ""  # report folder; empty = <out_dir>/evaluate

    def validate(self) -> None:
        require(len(self.ks) >= 1 and all(k >= 1 for k in self.ks), f"ks must be positive integers, got {self.ks}")
        require(self.batch_size >= 1 and self.concurrency >= 1, "batch_size and concurrency must be >= 1")


@dataclass
class MLflowConfig:
    """Tracking store. Empty URI = `sqlite:///<out_dir>/mlflow.db` (the registry needs a DB store)."""

    tracking_uri: str = ""
    experiment: str = "urbancross"
    registered_model: str = "urbancross"


@dataclass
class PromoteConfig:
    """Registry gate: a candidate becomes `champion` only if clearly better on the same split."""

    margin: float = 0.5  # mean mR (over domains) must beat the champion's by at least this
    max_domain_drop: float = 2.0  # and no domain's mR may fall by more than this
    manifest: str = ""  # evaluation manifest; empty = data.manifest
    split: str = "test"

    def validate(self) -> None:
        require(self.margin >= 0 and self.max_domain_drop >= 0, "margin and max_domain_drop must be >= 0")


@dataclass
class TuneConfig:
    """Ray Tune sweep over a space file (tune_spaces/*.yaml); each trial is a whole Train run."""

    scheduler: Literal["asha", "pbt"] = "asha"
    num_samples: int = 4  # trials (times the grid size when the space has `grid` params)
    metric: str = "val_mR"
    mode: Literal["max", "min"] = "max"
    max_concurrent_trials: int = 1
    grace_period: int = 1  # ASHA: epochs a trial always runs before it may be stopped
    reduction_factor: float = 2.0  # ASHA: keep the best 1/reduction_factor at each rung
    perturbation_interval: int = 1  # PBT: epochs per segment between exploit/explore steps
    synch: bool = False  # PBT: exploit only once every trial reached the step (reproducible, waits)
    cpus_per_trial: float = 0.5  # the trial driver; training runs there when train.num_workers == 0
    gpus_per_trial: float = 0.0
    max_failures: int = 0  # retries of a failed trial (from its last checkpoint)
    storage_path: str = ""  # empty = <out_dir>/tune
    name: str = "sweep"

    def validate(self) -> None:
        require(self.num_samples >= 1, f"num_samples must be >= 1, got {self.num_samples}")
        require(self.max_concurrent_trials >= 1, "max_concurrent_trials must be >= 1")
        require(self.grace_period >= 1 and self.perturbation_interval >= 1, "grace_period and perturbation_interval must be >= 1")
        require(self.reduction_factor > 1, f"reduction_factor must be > 1, got {self.reduction_factor}")
        require(self.cpus_per_trial >= 0 and self.gpus_per_trial >= 0, "cpus_per_trial and gpus_per_trial must be >= 0")
        require(bool(self.name) and "/" not in self.name, f"name must be a non-empty folder name, got {self.name!r}")


@dataclass
class Config:
    """A whole run: one file configures every stage of the pipeline."""

    seed: int = 0
    out_dir: str = "runs/default"
    synth: SynthConfig = field(default_factory=SynthConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted-key view, e.g. for MLflow params."""
        return flatten(self.to_dict())

    def tracking_uri(self) -> str:
        """The config's URI, else a local SQLite file under out_dir.

        $MLFLOW_TRACKING_URI is deliberately not consulted: `mlflow.set_tracking_uri` sets it
        in-process, so one run's store would silently become the next config's default.
        """
        if self.mlflow.tracking_uri:
            return self.mlflow.tracking_uri
        return "sqlite:///" + str((Path(self.out_dir) / "mlflow.db").resolve())


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


def load_config(path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load `path` (YAML) over the defaults, then apply `key.sub=value` overrides."""
    raw: dict[str, Any] = {}
    where = "<defaults>"
    if path is not None:
        where = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"{where}: cannot read config: {e.strerror}") from e
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{where}: top level must be a mapping, got {type(loaded).__name__}")
        raw = loaded
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.epochs=3")
        key, value = item.split("=", 1)
        set_dotted(raw, key.strip(), yaml.safe_load(value))
    return from_dict(Config, raw, where=where)


def config_from_dict(raw: dict[str, Any], where: str = "<dict>") -> Config:
    return from_dict(Config, raw, where=where)


def set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        nxt = d.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
        d = nxt
    d[parts[-1]] = value


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write `cfg` as YAML atomically; `load_config` reads it back unchanged."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    os.replace(tmp, path)


def from_dict(cls: type, raw: Any, where: str = "<dict>", prefix: str = ""):
    """Build dataclass `cls` from a mapping, checking keys, types and `validate()` hooks."""
    label = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {label} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {prefix}{unknown[0]!s}; {label} accepts: {', '.join(sorted(fields))}"
        )
    kwargs = {name: _convert(hints[name], raw[name], where, f"{prefix}{name}") for name in raw}
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ConfigError as e:
            raise ConfigError(f"{where}: {label}: {e}") from None
    return obj


def _convert(tp: Any, value: Any, where: str, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{where}: {path}: expected {expected}, got {value!r}")

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
            raise ConfigError(f"{where}: {path}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        item = args[0] if args else Any
        items = [_convert(item, v, where, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _convert(vt, v, where, f"{path}.{k}") for k, v in value.items()}
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
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    raise ConfigError(f"{where}: {path}: unsupported field type {tp!r}")


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def require(cond: bool, message: str) -> None:
    """For `validate()` hooks: raise ConfigError(message) unless `cond`."""
    if not cond:
        raise ConfigError(message)


__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "DedupConfig",
    "MLflowConfig",
    "SynthConfig",
    "config_from_dict",
    "flatten",
    "from_dict",
    "load_config",
    "require",
    "save_config",
]
