"""Training inputs decoded once per run, and every epoch's batches drawn from them by seed.

The driver decodes a stage's rows once (Ray Data, `ModelInputs(cache=True)`: uint8 images in
the evaluation geometry, int32 tokens of all captions, uint8 segment crops) into one of:
- memory: `materialize()`d in the object store (spilling as Ray does); each worker copies the
  rows into its own RAM on first use;
- disk: NumPy files under `<out_dir>/<stage>/cache/<fingerprint>/`, written once (reused by a
  resume) and memory-mapped by every worker, so the workers of a node share the page cache and
  the rows may exceed memory (`out_dir` must then be visible to every worker).
`train.cache: auto` takes memory when the decoded rows fit `train.cache_memory_mb` (each
worker holds a copy), else disk.

Every random choice of an epoch is a function of (seed, epoch, row), never of the worker
count's timing or Ray's block order: the rows are put in key order, one permutation per epoch
(`epoch_batches`) deals each step's global batch over the ranks, and the augmentation of a row
(random resized crop, colour jitter; no flips, captions state directions) draws from
(seed, epoch, key). So every rank knows every rank's batch sizes: no per-step barrier, and the
curriculum selects rows before batching (nothing decoded or batched just to be dropped).
Dropout is seeded per (seed, epoch, rank) in the loop; the initial weights from `seed`.

On CPU two runs of one config give bit-identical losses and metrics (tested with 2 workers).
On GPU the same rows, batches, augmentation draws, captions and seeds are used, but the float
results can differ in the last bits (cuBLAS/cuDNN kernels and NCCL reductions are not bitwise
deterministic unless `torch.use_deterministic_algorithms(True)`, which we do not set; bf16
widens the differences); not measured here.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from urbancross.config import Config, ModelConfig
from urbancross.model.factory import normalize
from urbancross.model.model import segment_pixels

META = "meta.json"


# --------------------------------------------------------------------------- seeded draws


def rng(seed: int, *salt: int) -> np.random.Generator:
    """A generator that depends only on (seed, *salt): the same on every worker and run."""
    return np.random.default_rng([int(seed), *(int(s) & (2**63 - 1) for s in salt)])


def epoch_batches(rows: np.ndarray, batch_size: int, world: int, rank: int, seed: int, *salt: int) -> list[np.ndarray]:
    """This rank's batches (row indices) of one pass over `rows`, shuffled by (seed, *salt).

    Each step deals `world * batch_size` rows of one permutation over the ranks; a last step
    with fewer rows than ranks is left out (at most world - 1 rows; each epoch's permutation is
    independent, so no row is left out systematically). Every rank gets the same number of steps.
    """
    perm = np.asarray(rows)[rng(seed, *salt).permutation(len(rows))]
    step = world * batch_size
    return [np.array_split(perm[i : i + step], world)[rank] for i in range(0, len(perm), step) if len(perm[i : i + step]) >= world]


def rank_rows(rows: np.ndarray, world: int, rank: int) -> tuple[np.ndarray, int]:
    """(this rank's share of `rows`, how many of it are real): equal length on every rank, the
    short ones padded by repeating rows, so collectives (ZeRO-3) see the same number of batches."""
    per = math.ceil(len(rows) / world) if len(rows) else 0
    padded = np.resize(np.asarray(rows), per * world) if per else np.asarray(rows)
    return padded[rank * per : (rank + 1) * per], max(0, min(per, len(rows) - rank * per))


# --------------------------------------------------------------------------- augmentation on cached arrays


def augment(images: torch.Tensor, keys: np.ndarray, epoch: int, seed: int, cfg: ModelConfig,
            masks: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """uint8 [B,3,S,S] -> augmented float [B,3,S,S] in [0, 1], drawn from (seed, epoch, key).

    A random resized crop (area >= `aug_crop_scale`, aspect 0.9-1.1) as one batched
    `grid_sample`, then brightness/contrast/saturation jitter and a small hue rotation (YIQ).
    With `masks` [B,K,H,W] (pooled segments' masks in the tile's frame), they get the same
    crop and `(images, masks)` is returned.
    """
    b = images.shape[0]
    x = images.float() / 255.0
    draws = np.array([rng(seed, epoch, k).random(8) for k in keys]).reshape(b, 8)
    area = cfg.aug_crop_scale + (1 - cfg.aug_crop_scale) * draws[:, 0]
    ratio = np.exp(np.log(0.9) + (np.log(1.1) - np.log(0.9)) * draws[:, 1])
    w = np.minimum(1.0, np.sqrt(area * ratio))
    h = np.minimum(1.0, np.sqrt(area / ratio))
    cx = (1 - w) * (2 * draws[:, 2] - 1)  # crop centre in [-1, 1] coordinates, inside the tile
    cy = (1 - h) * (2 * draws[:, 3] - 1)
    theta = torch.zeros(b, 2, 3, dtype=torch.float32)
    theta[:, 0, 0], theta[:, 0, 2] = torch.from_numpy(w), torch.from_numpy(cx)
    theta[:, 1, 1], theta[:, 1, 2] = torch.from_numpy(h), torch.from_numpy(cy)
    theta = theta.to(x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if masks is not None:
        grid_m = F.affine_grid(theta, [b, masks.shape[1], *masks.shape[-2:]], align_corners=False)
        masks = F.grid_sample(masks.float(), grid_m, mode="bilinear", padding_mode="zeros", align_corners=False)
    j = cfg.aug_color_jitter
    if j > 0:
        f = torch.as_tensor(1 + j * (2 * draws[:, 4:7] - 1), dtype=torch.float32, device=x.device).view(b, 3, 1, 1, 1)
        x = (x * f[:, 0]).clamp(0, 1)  # brightness
        mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
        x = (mean + f[:, 1] * (x - mean)).clamp(0, 1)  # contrast
        gray = _gray(x)
        x = (gray + f[:, 2] * (x - gray)).clamp(0, 1)  # saturation
        hue = torch.as_tensor(j / 10 * (2 * draws[:, 7] - 1) * 2 * math.pi, dtype=torch.float32, device=x.device)
        x = _rotate_hue(x, hue)
    return x if masks is None else (x, masks)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _rotate_hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate the chroma (I, Q) of every image by its own angle; luma unchanged."""
    to_yiq = _TO_YIQ.to(x.device)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(len(angle), 3, 3, device=x.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    m = torch.linalg.inv(to_yiq) @ rot @ to_yiq  # [B,3,3]
    return torch.einsum("bij,bjhw->bihw", m, x).clamp(0, 1)


# --------------------------------------------------------------------------- the cache


class Cache:
    """A stage's decoded rows (numpy, in RAM or memory-mapped), in sample-key order."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        order = np.argsort(arrays["key"], kind="stable")  # Ray's block order varies; key order does not
        self.arrays = arrays
        self.order = order
        self.keys = np.asarray(arrays["key"])[order]

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def from_shard(cls, shard) -> Cache:
        """Copy a (materialized, unsplit) Ray Dataset shard into RAM."""
        parts: dict[str, list] = {}
        for batch in shard.iter_batches(batch_size=1024, batch_format="numpy"):
            for k, v in batch.items():
                parts.setdefault(k, []).append(v)
        if not parts:
            raise RuntimeError("the cached training dataset is empty")
        return cls({k: np.concatenate(v) for k, v in parts.items()})

    @classmethod
    def from_folder(cls, folder: str) -> Cache:
        """Memory-map a disk cache written by `write_folder`."""
        names = json.loads((Path(folder) / META).read_text())["columns"]
        return cls({k: np.load(os.path.join(folder, f"{k}.npy"), mmap_mode="r") for k in names})

    def rows(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        """Rows at key-order `positions`, as numpy arrays."""
        idx = self.order[np.asarray(positions, dtype=np.int64)]
        sorted_idx = np.sort(idx)  # memory maps read faster in file order
        back = np.argsort(np.argsort(idx, kind="stable"), kind="stable")
        return {k: np.asarray(v[sorted_idx])[back] for k, v in self.arrays.items()}

    def batch(self, positions: np.ndarray, epoch: int, seed: int, cfg: Config, device: torch.device, train: bool) -> dict:
        """Model-ready tensors of these rows: images augmented (train and `data.augment`) and
        normalized on `device`, tokens int64 [B,C,L], segments normalized (never augmented)."""
        rows = self.rows(positions)
        images = torch.from_numpy(rows["images"]).to(device, non_blocking=True)
        out = {"key": torch.from_numpy(rows["key"]), "tokens": torch.from_numpy(rows["tokens"]).long()}
        if "segments" in rows:
            out["segments"] = normalize(torch.from_numpy(rows["segments"]).to(device))
            out["segment_mask"] = torch.from_numpy(rows["segment_mask"])
        pooled = "segments" in rows and cfg.model.segment_encoding == "pooled"
        if train and cfg.data.augment and pooled:  # the segments' masks follow the tile's crop
            images, out["segment_pixels"] = augment(images, rows["key"], epoch, seed, cfg.model, segment_pixels(out["segments"]))
        elif train and cfg.data.augment:
            images = augment(images, rows["key"], epoch, seed, cfg.model)
        out["images"] = normalize(images)
        for name in ("label", "num_captions"):  # scene class (intra-class term), real captions per row
            if name in rows:
                out[name] = torch.from_numpy(rows[name]).long()
        return out


def row_bytes(cfg: Config, image_side: int, token_length: int) -> int:
    """Decoded size of one cached row: image, all captions' tokens, segment crops."""
    image = 3 * image_side * image_side
    segments = cfg.data.num_segments * (image + 1) if cfg.model.uses_segments else 0
    return 8 + image + 5 * token_length * 4 + segments


def use_disk(cfg: Config, rows: int, bytes_per_row: int) -> bool:
    """The rule for `train.cache`: auto -> disk when the rows exceed `cache_memory_mb`."""
    if cfg.train.cache != "auto":
        return cfg.train.cache == "disk"
    return rows * bytes_per_row > cfg.train.cache_memory_mb * 2**20


def fingerprint(cfg: Config, table) -> str:
    """What the cached arrays depend on: every value of the rows (Arrow IPC bytes: ids, captions,
    image bytes or paths, segments) and the decoding settings."""
    import pyarrow as pa

    h = hashlib.blake2b(digest_size=8)
    d, m = cfg.data, cfg.model
    h.update(json.dumps([d.root, m.preset, m.uses_segments, d.num_segments, d.use_refined_captions]).encode())
    if m.family != "urbancross":  # another tokenizer and image size (urbancross fingerprints unchanged)
        h.update(json.dumps([m.family, m.cmpagl_size, m.bert_dir]).encode())
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    h.update(memoryview(sink.getvalue()))
    return h.hexdigest()


def write_folder(batches: Iterator[dict[str, np.ndarray]], rows: int, folder: Path) -> str:
    """Stream decoded batches into `<folder>/*.npy` (a hidden folder renamed when complete);
    an existing complete folder is reused. Returns the folder."""
    if (folder / META).exists():
        return str(folder)
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    files: dict[str, np.ndarray] = {}
    at = 0
    for batch in batches:
        n = len(batch["key"])
        for k, v in batch.items():
            if k not in files:
                files[k] = np.lib.format.open_memmap(partial / f"{k}.npy", mode="w+", dtype=v.dtype, shape=(rows, *v.shape[1:]))
            files[k][at : at + n] = v
        at += n
    if at != rows:
        raise RuntimeError(f"{folder}: decoded {at} rows, expected {rows}")
    for f in files.values():
        f.flush()
    (partial / META).write_text(json.dumps({"rows": rows, "columns": sorted(files)}))
    os.replace(partial, folder)
    return str(folder)
