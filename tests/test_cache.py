"""Decoded-once training cache and the seeded epoch draws (`urbancross.train.cache`): pure
functions, no Ray. The real 2-worker reproducibility run is in test_train.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from urbancross.config import Config, ModelConfig
from urbancross.train.cache import Cache, augment, epoch_batches, rank_rows, use_disk, write_folder
from urbancross.train.loop import due, used_rows


def test_epoch_batches_deal_one_seeded_permutation_over_the_ranks():
    rows = np.arange(100, 123)  # 23 rows, 2 ranks x batch 4: 2 full steps of 8, then 7 rows split 4 + 3
    r0 = epoch_batches(rows, 4, 2, 0, 7, 3)
    r1 = epoch_batches(rows, 4, 2, 1, 7, 3)
    assert [len(b) for b in r0] == [4, 4, 4] and [len(b) for b in r1] == [4, 4, 3]  # same step count
    seen = np.concatenate(r0 + r1)
    assert sorted(seen) == list(rows) and used_rows(len(rows), 4, 2) == 23
    again = epoch_batches(rows, 4, 2, 0, 7, 3)
    assert all(np.array_equal(a, b) for a, b in zip(r0, again))  # same (seed, epoch): same batches
    other = epoch_batches(rows, 4, 2, 0, 7, 4)
    assert not all(np.array_equal(a, b) for a, b in zip(r0, other))  # next epoch: another order
    # a tail with fewer rows than ranks is left out on every rank
    tail = [epoch_batches(np.arange(9), 4, 2, r, 0, 0) for r in (0, 1)]
    assert [len(t) for t in tail] == [1, 1] and used_rows(9, 4, 2) == 8


def test_rank_rows_are_equal_length_and_cover_everything_once():
    parts = [rank_rows(np.arange(7), 3, r) for r in range(3)]
    assert [len(p) for p, _ in parts] == [3, 3, 3] and [n for _, n in parts] == [3, 3, 1]
    assert sorted(np.concatenate([p[:n] for p, n in parts])) == list(range(7))


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, 16, 16), dtype=np.uint8))


def test_augmentation_depends_only_on_seed_epoch_and_row():
    cfg = ModelConfig()
    images, keys = _images(3), np.array([11, 22, 33])
    a = augment(images, keys, epoch=2, seed=5, cfg=cfg)
    assert a.shape == (3, 3, 16, 16) and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, augment(images, keys, epoch=2, seed=5, cfg=cfg))
    # the same row, alone or in another batch: the same augmentation
    assert torch.allclose(augment(images[1:2], keys[1:2], epoch=2, seed=5, cfg=cfg)[0], a[1], atol=1e-6)
    assert not torch.allclose(augment(images, keys, epoch=3, seed=5, cfg=cfg), a)
    assert not torch.allclose(augment(images, keys, epoch=2, seed=6, cfg=cfg), a)
    # a crop of a flat tile without jitter is the same flat tile
    flat = torch.full((2, 3, 16, 16), 100, dtype=torch.uint8)
    plain = augment(flat, keys[:2], 0, 0, ModelConfig(aug_color_jitter=0.0))
    assert torch.allclose(plain, torch.full_like(plain, 100 / 255), atol=1e-6)


def _arrays(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "key": rng.permutation(np.arange(1000, 1000 + n)).astype(np.int64),
        "images": rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8),
        "tokens": rng.integers(1, 50, (n, 5, 6)).astype(np.int32),
        "segments": rng.integers(0, 256, (n, 2, 3, 8, 8), dtype=np.uint8),
        "segment_mask": rng.random((n, 2)) < 0.5,
    }


def test_cache_rows_are_in_key_order_whatever_order_ray_delivered(tmp_path):
    arrays = _arrays(10)
    order = np.random.default_rng(2).permutation(10)
    a, b = Cache(arrays), Cache({k: v[order] for k, v in arrays.items()})
    assert np.array_equal(a.keys, np.sort(arrays["key"])) and np.array_equal(a.keys, b.keys)
    cfg = Config()
    pa_, pb = (c.batch(np.array([4, 0, 7]), 1, 0, cfg, torch.device("cpu"), train=True) for c in (a, b))
    assert all(torch.equal(pa_[k], pb[k]) for k in pa_)
    assert pa_["tokens"].dtype == torch.int64 and pa_["images"].dtype == torch.float32
    assert pa_["segments"].shape == (3, 2, 3, 8, 8) and pa_["segments"].dtype == torch.float32
    assert torch.equal(pa_["segment_mask"], torch.from_numpy(arrays["segment_mask"][np.argsort(arrays["key"])][[4, 0, 7]]))
    # the disk form gives the same rows
    folder = write_folder(iter([{k: v[:6] for k, v in arrays.items()}, {k: v[6:] for k, v in arrays.items()}]), 10, tmp_path / "c")
    d = Cache.from_folder(folder)
    pd = d.batch(np.array([4, 0, 7]), 1, 0, cfg, torch.device("cpu"), train=True)
    assert all(torch.equal(pa_[k], pd[k]) for k in pa_)
    assert write_folder(iter([]), 10, tmp_path / "c") == folder  # complete: reused, nothing decoded
    with pytest.raises(RuntimeError, match="decoded 6 rows, expected 10"):
        write_folder(iter([{k: v[:6] for k, v in arrays.items()}]), 10, tmp_path / "short")


def test_cache_fingerprint_follows_rows_and_decoding_settings():
    import pyarrow as pa

    from urbancross.train.cache import fingerprint

    cfg = Config()
    table = pa.table({"image_id": ["a", "b"], "captions": [["x"], ["y"]]})
    same = pa.table({"image_id": ["a", "b"], "captions": [["x"], ["y"]]})
    edited = pa.table({"image_id": ["a", "b"], "captions": [["x"], ["y z"]]})
    assert fingerprint(cfg, table) == fingerprint(cfg, same) != fingerprint(cfg, edited)
    assert fingerprint(cfg, table) != fingerprint(cfg.override({"model.use_segments": False}), table)


def test_cache_location_rule():
    cfg = Config().override({"train.cache_memory_mb": 1})
    assert not use_disk(cfg, rows=10, bytes_per_row=1000)
    assert use_disk(cfg, rows=10_000, bytes_per_row=1000)
    assert use_disk(cfg.override({"train.cache": "disk"}), rows=1, bytes_per_row=1)
    assert not use_disk(cfg.override({"train.cache": "memory"}), rows=10**9, bytes_per_row=10**6)


def test_checkpoint_and_validation_cadence_include_the_last_epoch():
    assert [e for e in range(12) if due(5, e, 12)] == [4, 9, 11]
    assert [e for e in range(3) if due(5, e, 3)] == [2]
    assert [e for e in range(4) if due(1, e, 4)] == [0, 1, 2, 3]
