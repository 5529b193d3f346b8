"""The manifest: one Parquet dataset folder that every stage reads and writes.

One row per image. Arrow schema (`MANIFEST_SCHEMA`):

| column             | type           | filled by   | meaning                                             |
|--------------------|----------------|-------------|-----------------------------------------------------|
| `image_id`         | string         | import      | unique id of the image within the manifest          |
| `image`            | binary         | import      | encoded image bytes (PNG/JPEG); null if `image_path` |
| `image_path`       | string         | import      | path relative to the dataset root; null if `image`  |
| `captions`         | list<string>   | import      | ground-truth captions (5 per image in the releases; |
|                    |                |             | may be empty: such an image is kept, but training   |
|                    |                |             | and evaluation skip it)                             |
| `domain`           | string         | import      | e.g. the country (`Finland`) or dataset (`RSICD`)   |
| `split`            | string         | import      | `train` / `val` / `test`                            |
| `label`            | string         | import      | optional scene class: the file-name prefix in RSICD, |
|                    |                |             | RSITMD, UCM (`mountain_2376.tif` -> `mountain`;     |
|                    |                |             | null for names without one, e.g. `00001.jpg`), the  |
|                    |                |             | dominant land use in the embedded benchmark, null   |
|                    |                |             | in the UrbanCross release                           |
| `lat`, `lon`       | float64        | import      | optional geo-location                               |
| `geo_tags`         | list<string>   | import      | optional OpenStreetMap-style `key=value` tags       |
| `source`           | string         | import      | where the row came from (file:line), for errors     |
| `segments`         | list<binary>   | preprocess  | encoded segment crops (10 per image)                |
| `num_real_segments`| int32          | preprocess  | how many of `segments` are real SAM masks           |
| `refined_captions` | list<string>   | preprocess  | LMM-refined captions, aligned with `captions`       |

Writing (`ManifestWriter`, `write_manifest`) never loses data:
- `check_output` refuses an output folder that overlaps an input (equal, inside or containing
  it), always, and one that exists, is not empty and is not a manifest, unless `overwrite`.
- Rows are streamed, batch by batch, into a hidden staging folder beside the target
  (`.<name>.tmp-<host>-<pid>-<hex>`), so memory does not grow with the manifest. A failed write
  removes it; one left by a killed process on this host is removed by the next writer.
- The complete folder replaces the target in one atomic step (`renameat2(RENAME_EXCHANGE)` on
  Linux), so a crash at any point leaves the old or the new manifest, never neither. Where the
  exchange is not available the old folder is renamed aside (`.<name>.old-<hex>`) first, and
  the next reader or writer puts it back if a crash came between the two renames.
Object stores (s3://, gs://) have no folder rename, so there a manifest is versioned: rows go
to a new `<uri>/v-<hex>/` folder, and the commit is one write of the pointer object
`<uri>/_MANIFEST.json` (a single PUT: readers see the old pointer or the new one), after which
the version it replaced is deleted. `current` follows the pointer; every reader goes through it.
A crash leaves the old manifest readable and at worst an orphan `v-<hex>/` folder (disk only).
"""

from __future__ import annotations

import ctypes
import errno
import io
import json
import logging
import os
import shutil
import socket
import sys
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from urbancross.storage import is_remote, resolve_fs  # re-exported: importers and preprocess use them from here

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image", pa.binary()),
        pa.field("image_path", pa.string()),
        pa.field("captions", pa.list_(pa.string()), nullable=False),
        pa.field("domain", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("label", pa.string()),
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


def to_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Rows (dicts) -> a table with the manifest schema; absent columns are null."""
    rows = list(rows)
    for i, row in enumerate(rows):
        unknown = set(row) - set(MANIFEST_SCHEMA.names)
        if unknown:
            raise ManifestError(
                f"row {i} ({row.get('source') or row.get('image_id')}): unknown columns {sorted(unknown)}"
            )
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


# --------------------------------------------------------------------------- safe outputs


POINTER = "_MANIFEST.json"  # remote manifests: {"version": "v-<hex>"}, the folder holding the rows


def _pointer(fs: pafs.FileSystem, path: str) -> dict | None:
    try:
        with fs.open_input_stream(f"{path}/{POINTER}") as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError, ValueError):
        return None


def current(uri: str | os.PathLike) -> str:
    """Where a manifest's rows are: `uri` itself, or for a versioned remote manifest its current version."""
    uri = str(uri)
    if not is_remote(uri):
        return uri
    fs, path = resolve_fs(uri)
    pointer = _pointer(fs, path)
    return f"{uri.rstrip('/')}/{pointer['version']}" if pointer and pointer.get("version") else uri


def _is_remote_manifest(fs: pafs.FileSystem, path: str) -> bool:
    """A remote folder of ours: a version pointer, or (a plain dataset) only Parquet files with the required columns."""
    if _pointer(fs, path) is not None:
        return True
    entries = sorted(fs.get_file_info(pafs.FileSelector(path)), key=lambda e: e.path)
    if not entries or not all(e.type == pafs.FileType.File and e.path.endswith(".parquet") for e in entries):
        return False
    try:
        names = pq.read_schema(entries[0].path, filesystem=fs).names
    except Exception:  # not Parquet at all: pyarrow raises several types
        return False
    return all(c in names for c in REQUIRED_COLUMNS)


def is_manifest(path: str | os.PathLike) -> bool:
    """A folder of ours: only `*.parquet` files, the first with the required columns."""
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError:
        return False
    if not entries or not all(e.name.endswith(".parquet") and e.is_file(follow_symlinks=False) for e in entries):
        return False
    try:
        names = pq.read_schema(entries[0].path).names
    except Exception:  # not Parquet at all: pyarrow raises several types
        return False
    return all(c in names for c in REQUIRED_COLUMNS)


def check_output(
    out: str | os.PathLike, inputs: Sequence[str | os.PathLike | None] = (), *, overwrite: bool = False
) -> None:
    """Refuse an output that would destroy data we did not write (see the module docstring)."""
    if is_remote(out):
        target = str(out).rstrip("/")
        for src in filter(None, inputs):
            s = str(src).rstrip("/")
            if target == s or target.startswith(s + "/") or s.startswith(target + "/"):
                raise ManifestError(f"output {out} overlaps the input {src}; write it somewhere else")
        fs, path = resolve_fs(out)
        kind = fs.get_file_info(path).type
        if overwrite or kind == pafs.FileType.NotFound:
            return
        if kind == pafs.FileType.Directory and (not fs.get_file_info(pafs.FileSelector(path)) or _is_remote_manifest(fs, path)):
            return
        what = "an object" if kind == pafs.FileType.File else "a non-empty folder that is not a manifest"
        raise ManifestError(f"output {out} exists and is {what}; refusing to replace it (pass --overwrite to replace it)")
    target = Path(out).resolve()
    for src in filter(None, inputs):
        if is_remote(src):
            continue
        s = Path(src).resolve()
        if target == s or s in target.parents or target in s.parents:
            how = "is" if target == s else "is inside" if s in target.parents else "contains"
            raise ManifestError(f"output {out} {how} the input {src}; write it somewhere else (never over an input)")
    if overwrite or not os.path.lexists(target):
        return
    if target.is_dir() and (not any(target.iterdir()) or is_manifest(target)):
        return
    what = "a file" if not target.is_dir() else "a non-empty folder that is not a manifest"
    raise ManifestError(f"output {out} exists and is {what}; refusing to replace it (pass --overwrite to replace it)")


def _sibling(target: str, kind: str) -> str:
    parent, name = os.path.split(target)
    tag = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}" if kind == "tmp" else uuid.uuid4().hex[:8]
    return os.path.join(parent, f".{name}.{kind}-{tag}")


def _remove(path: str) -> None:
    """Best effort: a leftover copy of an old manifest is not data loss, only disk."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except OSError as e:
        log.warning("could not remove %s (%s); delete it by hand", path, e)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale(target: str) -> None:
    """Remove staging folders of `target` left by killed writers on this host."""
    parent, name = os.path.split(target)
    prefix = f".{name}.tmp-{socket.gethostname()}-"
    for entry in os.scandir(parent):
        if entry.name.startswith(prefix):
            pid = entry.name[len(prefix) :].split("-")[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                log.info("removing %s, left by a killed write", entry.path)
                _remove(entry.path)


def restore_interrupted(target: str) -> bool:
    """If a crash came between the fallback's two renames, put the old manifest back."""
    if os.path.lexists(target):
        return False
    parent, name = os.path.split(target)
    try:
        olds = [e.path for e in os.scandir(parent) if e.name.startswith(f".{name}.old-")]
    except OSError:
        return False
    if len(olds) != 1:
        return False
    log.warning("restoring %s from %s (a replacement was interrupted)", target, olds[0])
    os.rename(olds[0], target)
    return True


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: str, b: str) -> bool:
    """Swap two existing paths atomically; False where the OS or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), b)


def replace_dir(staging: str, target: str) -> None:
    """Put the complete folder `staging` at `target` in one atomic step, then delete the old one."""
    if not os.path.lexists(target):
        os.rename(staging, target)
        return
    if _exchange(staging, target):
        _remove(staging)  # now holds the old target
        return
    old = _sibling(target, "old")
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(old, target)
        raise
    _remove(old)


class ManifestWriter:
    """Stream tables into a manifest folder that appears whole, or not at all.

    with ManifestWriter(out, inputs=[root]) as w:
        w.write(table)   # any number of times
        path = w.commit()

    Leaving the block without `commit()` (an exception) discards everything written.
    """

    def __init__(
        self,
        uri: str | os.PathLike,
        *,
        inputs: Sequence[str | os.PathLike | None] = (),
        overwrite: bool = False,
        max_rows_per_file: int = 512,
        row_group_size: int = 128,
    ):
        check_output(uri, inputs, overwrite=overwrite)
        self.uri = str(uri)
        self.fs, path = resolve_fs(uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.max_rows, self.group = max_rows_per_file, min(row_group_size, max_rows_per_file)
        self.rows = self.files = self._file_rows = 0
        self._writer: pq.ParquetWriter | None = None
        if self.local:
            self.path = os.path.realpath(path)
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            restore_interrupted(self.path)
            _sweep_stale(self.path)
            self.staging = _sibling(self.path, "tmp")
            os.mkdir(self.staging)
        else:  # versioned: rows go to a new folder, the pointer moves at commit
            self.path, self.version = path, f"v-{uuid.uuid4().hex[:12]}"
            self.staging = f"{path}/{self.version}"
            self.fs.create_dir(self.staging, recursive=True)
        self._open = True

    def __enter__(self) -> "ManifestWriter":
        return self

    def __exit__(self, *exc) -> None:
        if self._open:
            self.abort()

    def write(self, table: pa.Table) -> None:
        """Append rows (any subset of the schema's columns; conformed here)."""
        table = conform(table, self.uri)
        start = 0
        while start < table.num_rows:
            if self._writer is None:
                self._new_file()
            n = min(self.max_rows - self._file_rows, table.num_rows - start)
            self._writer.write_table(table.slice(start, n), row_group_size=self.group)
            start, self._file_rows, self.rows = start + n, self._file_rows + n, self.rows + n
            if self._file_rows >= self.max_rows:
                self._close_file()

    def _new_file(self) -> None:
        self._writer = pq.ParquetWriter(
            f"{self.staging}/part-{self.files}.parquet", MANIFEST_SCHEMA, filesystem=self.fs
        )
        self.files += 1

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer, self._file_rows = None, 0

    def commit(self) -> str:
        """Close the last file and put the folder in place; returns the manifest's path."""
        if self.files == 0:
            self._new_file()  # an empty manifest is still a manifest: one part, no rows
        self._close_file()
        if self.local:
            replace_dir(self.staging, self.path)
        else:
            self._commit_remote()
        self._open = False
        return self.path if self.local else self.uri

    def _commit_remote(self) -> None:
        """Move the pointer to the new version (one PUT), then delete what it replaced."""
        from urbancross import atomic

        old = _pointer(self.fs, self.path)
        stale = [e for e in self.fs.get_file_info(pafs.FileSelector(self.path))
                 if e.type == pafs.FileType.File and e.path.endswith(".parquet")]  # a plain dataset we replace
        body = json.dumps({"version": self.version, "rows": self.rows}).encode()
        atomic.write_fs(self.fs, f"{self.path}/{POINTER}", lambda f: f.write(body))
        try:
            if old and old.get("version") and old["version"] != self.version:
                self.fs.delete_dir(f"{self.path}/{old['version']}")
            for e in stale:
                self.fs.delete_file(e.path)
        except OSError as e:  # the new manifest is in place: a leftover is disk, not data loss
            log.warning("could not remove the replaced version under %s (%s); delete it by hand", self.uri, e)

    def abort(self) -> None:
        """Discard what was written (the staging folder); the target is untouched."""
        self._open = False
        try:
            self._close_file()
        except Exception:  # closing a half-written file may fail again; it is deleted anyway
            pass
        if self.local:
            _remove(self.staging)
        else:
            try:
                self.fs.delete_dir(self.staging)
            except OSError:
                pass


def write_manifest(
    table: pa.Table,
    uri: str | os.PathLike,
    *,
    inputs: Sequence[str | os.PathLike | None] = (),
    overwrite: bool = False,
    max_rows_per_file: int = 512,
) -> str:
    """Write `table` as a Parquet dataset folder at `uri`, replacing it atomically (local fs)."""
    table = conform(table, str(uri))
    with ManifestWriter(uri, inputs=inputs, overwrite=overwrite, max_rows_per_file=max_rows_per_file) as w:
        w.write(table)
        return w.commit()


def read_manifest(uri: str | os.PathLike, *, columns: list[str] | None = None) -> pa.Table:
    """Read a manifest folder (or single Parquet file), validated against the schema."""
    if not str(uri).strip():  # "" resolves to the working directory: refuse it rather than read what lies there
        raise ManifestError("manifest path is empty: set data.manifest (or pass the manifest folder)")
    fs, path = resolve_fs(current(uri))
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound and not (isinstance(fs, pafs.LocalFileSystem) and restore_interrupted(path)):
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


class Summary:
    """Images and captions per split, per domain and per (split, domain), added up batch by batch."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        self.images = self.captions = 0

    def add(self, table: pa.Table) -> None:
        splits = table.column("split").to_pylist()
        domains = table.column("domain").to_pylist()
        ncaps = [len(c or []) for c in table.column("captions").to_pylist()]
        for s, d, n in zip(splits, domains, ncaps):
            for key in (("split", s), ("domain", d), ("split_domain", f"{s}/{d}")):
                c = self.counts[key]
                c[0] += 1
                c[1] += n
        self.images += table.num_rows
        self.captions += sum(ncaps)

    def result(self) -> dict[str, Any]:
        per: dict[str, dict[str, dict[str, int]]] = {"split": {}, "domain": {}, "split_domain": {}}
        for (kind, name), (images, caps) in sorted(self.counts.items()):
            per[kind][name] = {"images": images, "captions": caps}
        return {
            "images": self.images,
            "captions": self.captions,
            "per_split": per["split"],
            "per_domain": per["domain"],
            "per_split_domain": per["split_domain"],
        }


def summarize(table: pa.Table) -> dict[str, Any]:
    """Images and captions per split, per domain and per (split, domain)."""
    s = Summary()
    s.add(table)
    return s.result()


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


def decode_image(data: bytes, where: str = "image", max_pixels: int | None = None):
    """Bytes -> RGB PIL image; a corrupt file, or one over `max_pixels`, raises ManifestError naming `where`.

    The size is checked from the header, before decoding, so a small file that expands to a
    huge image (a decompression bomb) costs nothing. Without `max_pixels`, PIL's own limit
    applies (`Image.MAX_IMAGE_PIXELS`, an error at twice it).
    """
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))  # PIL itself refuses twice Image.MAX_IMAGE_PIXELS here
        w, h = img.size
        if max_pixels is not None and w * h > max_pixels:
            raise ManifestError(
                f"{where}: image is {w}x{h} ({w * h / 1e6:.0f} Mpx), over the limit of {max_pixels / 1e6:g} Mpx"
            )
        img.load()
        return img.convert("RGB")
    except ManifestError:
        raise
    except Image.DecompressionBombError as e:
        raise ManifestError(f"{where}: image over the pixel limit: {e}") from e
    except Exception as e:  # hostile files raise many types (SyntaxError, struct.error, ...)
        raise ManifestError(f"{where}: unreadable image: {e}") from e


def encode_png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
