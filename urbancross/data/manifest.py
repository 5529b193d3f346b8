"""The manifest: one Parquet dataset folder that every stage reads and writes.

One row per image. Arrow schema (`MANIFEST_SCHEMA`):

| column             | type           | filled by   | meaning                                             |
|--------------------|----------------|-------------|-----------------------------------------------------|
| `image_id`         | string         | import      | unique id of the image within the manifest          |
| `image`            | binary         | import      | encoded image bytes (PNG/JPEG); null if `image_path` |
| `image_path`       | string         | import      | path relative to the dataset root; null if `image`  |
| `captions`         | list<string>   | import      | ground-truth captions (5 per image in the releases) |
| `domain`           | string         | import      | e.g. the country (`Finland`) or dataset (`RSICD`)   |
| `split`            | string         | import      | `train` / `val` / `test`                            |
| `lat`, `lon`       | float64        | import      | optional geo-location                               |
| `geo_tags`         | list<string>   | import      | optional OpenStreetMap-style `key=value` tags       |
| `source`           | string         | import      | where the row came from (file:line), for errors     |
| `segments`         | list<binary>   | preprocess  | encoded segment crops (10 per image)                |
| `num_real_segments`| int32          | preprocess  | how many of `segments` are real SAM masks           |
| `refined_captions` | list<string>   | preprocess  | LMM-refined captions, aligned with `captions`       |

Writes are atomic on local filesystems (written beside the target, then renamed), so a
failed job never leaves a half-written manifest behind.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image", pa.binary()),
        pa.field("image_path", pa.string()),
        pa.field("captions", pa.list_(pa.string()), nullable=False),
        pa.field("domain", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("lat", pa.float64()),
        pa.field("lon", pa.float64()),
        pa.field("geo_tags", pa.list_(pa.string())),
        pa.field("source", pa.string()),
        pa.field("segments", pa.list_(pa.binary())),
        pa.field("num_real_segments", pa.int32()),
        pa.field("refined_captions", pa.list_(pa.string())),
    ]
)
REQUIRED_COLUMNS = ("image_id", "captions", "domain", "split")


class ManifestError(ValueError):
    """A manifest (or a row of one) does not follow the schema."""


def resolve_fs(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """Local path or any URI pyarrow understands (s3://, gs://, file://)."""
    uri = str(uri)
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def to_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Rows (dicts) -> a table with the manifest schema; absent columns are null."""
    rows = list(rows)
    for i, row in enumerate(rows):
        unknown = set(row) - set(MANIFEST_SCHEMA.names)
        if unknown:
            raise ManifestError(f"row {i} ({row.get('source') or row.get('image_id')}): unknown columns {sorted(unknown)}")
        for col in REQUIRED_COLUMNS:
            if row.get(col) is None:
                raise ManifestError(f"row {i} ({row.get('source') or row.get('image_id')}): missing {col}")
    columns = {name: [row.get(name) for row in rows] for name in MANIFEST_SCHEMA.names}
    return pa.table(columns, schema=MANIFEST_SCHEMA)


def conform(table: pa.Table, where: str = "manifest") -> pa.Table:
    """Check required columns and types; add missing optional columns as nulls; fix column order."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ManifestError(f"{where}: missing required column(s) {missing}; has {table.column_names}")
    if "image" not in table.column_names and "image_path" not in table.column_names:
        raise ManifestError(f"{where}: needs an `image` or an `image_path` column")
    arrays = []
    for f in MANIFEST_SCHEMA:
        if f.name in table.column_names:
            col = table.column(f.name)
            if not col.type.equals(f.type):
                try:
                    col = col.cast(f.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                    raise ManifestError(f"{where}: column {f.name} has type {col.type}, expected {f.type}") from e
            arrays.append(col)
        else:
            arrays.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(arrays, schema=MANIFEST_SCHEMA)


def write_manifest(table: pa.Table, uri: str | os.PathLike, *, max_rows_per_file: int = 512) -> str:
    """Write `table` as a Parquet dataset folder at `uri`, replacing it atomically (local fs)."""
    table = conform(table, str(uri))
    fs, path = resolve_fs(uri)
    local = isinstance(fs, pafs.LocalFileSystem)
    target = f"{path}.tmp-{uuid.uuid4().hex[:8]}" if local else path
    ds.write_dataset(
        table,
        target,
        filesystem=fs,
        format="parquet",
        basename_template="part-{i}.parquet",
        max_rows_per_file=max_rows_per_file,
        max_rows_per_group=min(max_rows_per_file, 128),
        existing_data_behavior="delete_matching",
    )
    if local:
        if os.path.exists(path):
            old = f"{path}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            os.replace(target, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            os.replace(target, path)
    return path


def read_manifest(uri: str | os.PathLike, *, columns: list[str] | None = None) -> pa.Table:
    """Read a manifest folder (or single Parquet file), validated against the schema."""
    fs, path = resolve_fs(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ManifestError(f"{uri}: no such manifest")
    try:
        dataset = ds.dataset(path, filesystem=fs, format="parquet", exclude_invalid_files=False)
        table = dataset.to_table()
    except (pa.ArrowInvalid, OSError) as e:
        raise ManifestError(f"{uri}: not a readable Parquet dataset: {e}") from e
    if table.num_rows == 0:
        raise ManifestError(f"{uri}: manifest is empty")
    table = conform(table, str(uri))
    return table.select(columns) if columns else table


def filter_rows(table: pa.Table, *, split: str | None = None, domain: str | None = None) -> pa.Table:
    """Rows of one split and/or domain; an empty result is an error naming what was asked for."""
    import pyarrow.compute as pc

    mask = None
    for col, value in (("split", split), ("domain", domain)):
        if value is None:
            continue
        m = pc.equal(table.column(col), value)
        mask = m if mask is None else pc.and_(mask, m)
    out = table if mask is None else table.filter(mask)
    if out.num_rows == 0:
        have = summarize(table)["per_split_domain"]
        raise ManifestError(f"no rows with split={split!r} domain={domain!r}; manifest has {sorted(have)}")
    return out


def summarize(table: pa.Table) -> dict[str, Any]:
    """Images and captions per split, per domain and per (split, domain)."""
    per: dict[str, dict[str, dict[str, int]]] = {"split": {}, "domain": {}, "split_domain": {}}
    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    splits = table.column("split").to_pylist()
    domains = table.column("domain").to_pylist()
    ncaps = [len(c or []) for c in table.column("captions").to_pylist()]
    for s, d, n in zip(splits, domains, ncaps):
        for key in (("split", s), ("domain", d), ("split_domain", f"{s}/{d}")):
            c = counts[key]
            c[0] += 1
            c[1] += n
    for (kind, name), (images, caps) in sorted(counts.items()):
        per[kind][name] = {"images": images, "captions": caps}
    return {
        "images": table.num_rows,
        "captions": sum(ncaps),
        "per_split": per["split"],
        "per_domain": per["domain"],
        "per_split_domain": per["split_domain"],
    }


def summary_json(table: pa.Table) -> str:
    return json.dumps(summarize(table), indent=2, sort_keys=True)


def image_bytes(row: Mapping[str, Any], root: str | os.PathLike = "") -> bytes:
    """The encoded image of a manifest row, from `image` or `root/image_path`."""
    data = row.get("image")
    if data is not None:
        return data
    rel = row.get("image_path")
    if not rel:
        raise ManifestError(f"{row.get('image_id')}: row has neither image bytes nor image_path")
    fs, path = resolve_fs(os.path.join(str(root), rel) if root and "://" not in rel else rel)
    try:
        with fs.open_input_file(path) as f:
            return f.read()
    except (FileNotFoundError, OSError) as e:
        raise ManifestError(f"{row.get('image_id')}: cannot read image {path}: {e}") from e


def decode_image(data: bytes, where: str = "image"):
    """Bytes -> RGB PIL image; a corrupt file raises ManifestError naming `where`."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ManifestError(f"{where}: unreadable image: {e}") from e
    return img.convert("RGB")


def encode_png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
