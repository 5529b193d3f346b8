"""Exact and near-duplicate images within and across manifests (`urbancross data dedup`).

Why: public releases share images (train images of RSICD appear in RSITMD's test split and
the other way round), which inflates cross-dataset numbers, and a release can repeat an
image within itself. Each image gets a perceptual hash (imagehash.phash: the low DCT
frequencies of a grey thumbnail, `dedup.hash_size`² bits): resizing, re-encoding and small
shifts move it by a few bits, another image by many (`DedupConfig` states the measured
margins). Two images are a pair when the Hamming distance of their hashes is at most
`dedup.max_distance`; a pair is `exact` when the encoded bytes are equal too (sha256).

Hashing (decode + thumbnail per image) is the cost. It runs as a plain loop over record
batches below `dedup.ray_min_images` images in all, and as a Ray Data map over the
manifests' Parquet files from there on. The pair search compares packed hashes with numpy,
block by block, on the driver either way.

`--drop-from SPLIT` writes a copy of the FIRST manifest without those of its SPLIT rows that
duplicate another row: one in another split, in another manifest, or earlier in the same
split (so one image of a pair within the split stays). The copy goes to a new folder, never
over an input; to clean another manifest, list it first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from urbancross.config import DedupConfig
from urbancross.data.manifest import (
    ManifestError,
    ManifestWriter,
    check_output,
    current,
    decode_image,
    image_bytes,
    resolve_fs,
)

log = logging.getLogger(__name__)

HASH_COLUMNS = ("image_id", "split", "domain", "image", "image_path")
HASH_SCHEMA = pa.schema(
    [
        ("manifest", pa.int32()),
        ("image_id", pa.string()),
        ("split", pa.string()),
        ("domain", pa.string()),
        ("phash", pa.binary()),
        ("sha256", pa.binary()),
        ("error", pa.string()),
    ]
)
BLOCK = 1024  # rows per side of one block of the pair search (BLOCK² x hash words x 8 bytes of scratch)


def phash_bits(data: bytes, hash_size: int, where: str) -> bytes:
    """The packed perceptual hash of an encoded image."""
    import imagehash

    bits = imagehash.phash(decode_image(data, where), hash_size=hash_size).hash
    return np.packbits(np.asarray(bits, dtype=bool).ravel()).tobytes()


def hash_batch(batch: pa.Table, *, manifest: int, root: str, hash_size: int) -> pa.Table:
    """Manifest rows -> one `HASH_SCHEMA` row each; an unreadable image gets `error` instead of hashes."""
    out: dict[str, list] = {name: [] for name in HASH_SCHEMA.names}
    for row in batch.to_pylist():
        ph = sha = err = None
        try:
            data = image_bytes(row, root)
            ph, sha = phash_bits(data, hash_size, str(row["image_id"])), hashlib.sha256(data).digest()
        except Exception as e:  # one bad image is reported, never fatal
            err = str(e)
        for name, value in zip(
            HASH_SCHEMA.names, (manifest, row["image_id"], row["split"], row["domain"], ph, sha, err)
        ):
            out[name].append(value)
    return pa.table(out, schema=HASH_SCHEMA)


def manifest_dataset(uri: str) -> tuple[ds.Dataset, list[str]]:
    fs, path = resolve_fs(current(uri))
    try:
        dataset = ds.dataset(path, filesystem=fs, format="parquet")
    except (pa.ArrowInvalid, OSError, FileNotFoundError) as e:
        raise ManifestError(f"{uri}: not a readable manifest: {e}") from e
    missing = [c for c in ("image_id", "split", "domain") if c not in dataset.schema.names]
    if missing:
        raise ManifestError(f"{uri}: missing required column(s) {missing}")
    return dataset, [c for c in HASH_COLUMNS if c in dataset.schema.names]


def image_root(uri: str) -> str:
    """Base of relative `image_path`s: the folder that holds the manifest, as `ingest` reads them."""
    return os.path.dirname(os.path.abspath(uri)) if "://" not in uri else uri.rsplit("/", 1)[0]


def hash_manifests(manifests: Sequence[str], cfg: DedupConfig) -> tuple[pa.Table, str]:
    """Hashes of every row of every manifest, and which engine made them."""
    sets = [manifest_dataset(m) for m in manifests]
    total = sum(d.count_rows() for d, _ in sets)
    if total >= cfg.ray_min_images:
        return hash_with_ray(manifests, sets, cfg), "ray data"
    tables = []
    for i, (m, (dataset, cols)) in enumerate(zip(manifests, sets)):
        for batch in dataset.to_batches(columns=cols, batch_size=64):
            tables.append(
                hash_batch(pa.Table.from_batches([batch]), manifest=i, root=image_root(m), hash_size=cfg.hash_size)
            )
    return pa.concat_tables(tables) if tables else HASH_SCHEMA.empty_table(), "loop"


def hash_with_ray(manifests: Sequence[str], sets: list, cfg: DedupConfig) -> pa.Table:
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init()
    tables = []
    for i, (m, (_, cols)) in enumerate(zip(manifests, sets)):
        kwargs = {"manifest": i, "root": image_root(m), "hash_size": cfg.hash_size}
        source = ray.data.read_parquet(os.path.abspath(m) if "://" not in m else current(m)).select_columns(cols)
        hashed = source.map_batches(hash_batch, fn_kwargs=kwargs, batch_format="pyarrow", batch_size=64)
        tables += [b for b in hashed.iter_batches(batch_format="pyarrow", batch_size=None)]
    return pa.concat_tables(tables).cast(HASH_SCHEMA) if tables else HASH_SCHEMA.empty_table()


def close_pairs(hashes: np.ndarray, max_distance: int) -> list[tuple[int, int, int]]:
    """(i, j, distance) for every i < j with Hamming distance <= max_distance; `hashes` [N, bytes]."""
    n, width = hashes.shape
    words = np.zeros((n, -(-width // 8) * 8), np.uint8)
    words[:, :width] = hashes
    words = words.view(np.uint64)
    out = []
    for a in range(0, n, BLOCK):
        for b in range(a, n, BLOCK):
            d = np.bitwise_count(words[a : a + BLOCK, None, :] ^ words[None, b : b + BLOCK, :]).sum(-1, dtype=np.int32)
            i, j = np.nonzero(d <= max_distance)
            i, j = i + a, j + b
            keep = i < j
            out += zip(i[keep].tolist(), j[keep].tolist(), d[i[keep] - a, j[keep] - b].tolist())
    return out


def find_duplicates(manifests: Sequence[str], cfg: DedupConfig) -> dict[str, Any]:
    """The report: every close pair (manifest, id, split, domain of each side; distance; exact)."""
    hashed, engine = hash_manifests(manifests, cfg)
    ok = hashed.filter(pc.is_null(hashed["error"]))
    bad = hashed.filter(pc.is_valid(hashed["error"])).to_pylist()
    rows = ok.select(["manifest", "image_id", "split", "domain"]).to_pylist()
    shas = ok["sha256"].to_pylist()
    bits = (
        np.frombuffer(b"".join(ok["phash"].to_pylist()), np.uint8).reshape(len(rows), -1)
        if rows
        else np.zeros((0, 1), np.uint8)
    )
    pairs = [
        {"a": rows[i], "b": rows[j], "distance": d, "exact": shas[i] == shas[j]}
        for i, j, d in close_pairs(bits, cfg.max_distance)
    ]
    pairs.sort(
        key=lambda p: (p["distance"], p["a"]["manifest"], p["a"]["image_id"], p["b"]["manifest"], p["b"]["image_id"])
    )
    kinds = Counter(" ~ ".join(sorted(f"{p[s]['manifest']}:{p[s]['split']}" for s in "ab")) for p in pairs)
    return {
        "manifests": [str(m) for m in manifests],
        "images": hashed.num_rows,
        "hash": "phash",
        "hash_size": cfg.hash_size,
        "max_distance": cfg.max_distance,
        "engine": engine,
        "num_pairs": len(pairs),
        "num_exact": sum(p["exact"] for p in pairs),
        "pairs_by_splits": dict(sorted(kinds.items())),
        "unreadable": [{"manifest": r["manifest"], "image_id": r["image_id"], "reason": r["error"]} for r in bad],
        "pairs": pairs,
    }


def rows_to_drop(pairs: list[dict[str, Any]], split: str) -> set[str]:
    """Ids of the first manifest's `split` rows that duplicate a row elsewhere (module docstring)."""
    drop: set[str] = set()
    for p in sorted(pairs, key=lambda p: (p["a"]["image_id"], p["b"]["image_id"])):
        a, b = p["a"], p["b"]
        inside = [s for s in (a, b) if s["manifest"] == 0 and s["split"] == split]
        if len(inside) == 1:
            drop.add(inside[0]["image_id"])
        elif len(inside) == 2 and not ({a["image_id"], b["image_id"]} & drop):
            drop.add(max(a["image_id"], b["image_id"]))  # keep one: the smaller id
    return drop


def write_without(manifest: str, drop: set[str], out: str, inputs: Sequence[str], overwrite: bool) -> str:
    """A copy of `manifest` without the rows in `drop`, streamed batch by batch."""
    fs, path = resolve_fs(current(manifest))
    dataset = ds.dataset(path, filesystem=fs, format="parquet")
    mask = pc.invert(pc.field("image_id").isin(pa.array(sorted(drop), pa.string())))
    with ManifestWriter(out, inputs=inputs, overwrite=overwrite) as w:
        for batch in dataset.to_batches(filter=mask, batch_size=256):
            if batch.num_rows:
                w.write(pa.Table.from_batches([batch]))
        return w.commit()


def is_report(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"hash", "max_distance", "pairs"} <= set(data)


def write_report(report: dict[str, Any], path: str, inputs: Sequence[str], overwrite: bool) -> None:
    """The report as JSON, atomically; never inside an input, never over a file that is not a report."""
    check_output(path, inputs, overwrite=True)  # the overlap part only
    if os.path.exists(path) and not overwrite and not is_report(path):
        raise ManifestError(
            f"report {path} exists and is not a dedup report; refusing to replace it (pass --overwrite)"
        )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def run_dedup(
    manifests: Sequence[str],
    cfg: DedupConfig,
    report_path: str,
    *,
    drop_from: str | None = None,
    out: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Find duplicates, write the report (and with `drop_from`, the cleaned first manifest); return a summary."""
    if drop_from and not out:
        raise ManifestError("--drop-from needs --out, the folder for the cleaned manifest (never written in place)")
    if out:
        check_output(out, manifests, overwrite=overwrite)  # before the work
    report = find_duplicates(manifests, cfg)
    if drop_from:
        drop = rows_to_drop(report["pairs"], drop_from)
        report["dropped"] = {"from": str(manifests[0]), "split": drop_from, "image_ids": sorted(drop)}
        report["out"] = write_without(manifests[0], drop, out, manifests, overwrite)
    write_report(report, report_path, manifests, overwrite)
    summary = {k: v for k, v in report.items() if k not in ("pairs", "dropped", "unreadable")}
    summary["num_unreadable"] = len(report["unreadable"])
    if drop_from:
        summary["num_dropped"] = len(report["dropped"]["image_ids"])
    return {**summary, "report": os.path.abspath(report_path)}
