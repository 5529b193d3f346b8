"""Storage locations as URIs: a local path or anything pyarrow's filesystems open (s3://, gs://, file://).

On a cluster `out_dir` is object storage: `Path("s3://b/x")` is the local folder `s3:/b/x`, and
what a run writes there is lost with the node. Code that writes or reads a location that can
be remote joins and opens it here. Writes are atomic on every filesystem (`atomic`).
"""

from __future__ import annotations

import io
import json
import os
import posixpath
from pathlib import Path
from typing import Any, Callable

import pyarrow.fs as pafs

from urbancross import atomic


def is_remote(uri: str | os.PathLike) -> bool:
    return "://" in str(uri)


def resolve_fs(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) for a local path or a URI."""
    uri = str(uri)
    if is_remote(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/...`: a URI stays a URI (`Path` would turn `s3://b` into `s3:/b`)."""
    base = str(base)
    if is_remote(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def local_path(uri: str | os.PathLike) -> str | None:
    """The local path of `uri` when it is on this machine's filesystem (a path or file://), else None."""
    fs, path = resolve_fs(uri)
    return path if isinstance(fs, pafs.LocalFileSystem) else None


def exists(uri: str | os.PathLike) -> bool:
    fs, path = resolve_fs(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(uri: str | os.PathLike) -> bool:
    fs, path = resolve_fs(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(uri: str | os.PathLike) -> bytes:
    fs, path = resolve_fs(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_with(uri: str | os.PathLike, write: Callable[[Any], Any]) -> str:
    """`write(binary stream)` to `uri` atomically (local: rename; remote: temporary object, then move)."""
    path = local_path(uri)
    if path is not None:
        def to_file(tmp: str) -> None:
            with open(tmp, "wb") as f:
                write(f)

        atomic.write_file(path, to_file)
    else:
        fs, remote = resolve_fs(uri)
        atomic.write_fs(fs, remote, write)
    return str(uri)


def write_bytes(uri: str | os.PathLike, data: bytes) -> str:
    return write_with(uri, lambda f: f.write(data))


def write_text(uri: str | os.PathLike, text: str) -> str:
    return write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str | os.PathLike, obj: Any, **dumps: Any) -> str:
    return write_text(uri, json.dumps(obj, **dumps))


def read_json(uri: str | os.PathLike) -> Any:
    return json.loads(read_bytes(uri).decode("utf-8"))


def read_stream(uri: str | os.PathLike) -> io.BytesIO:
    """The whole file at `uri` as an in-memory binary stream (for readers that want a file object)."""
    return io.BytesIO(read_bytes(uri))
