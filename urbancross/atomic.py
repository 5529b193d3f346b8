"""Atomic file writes: write beside the target under a hidden temporary name, then rename.

A reader (or a crashed writer's next run) sees the old file or the new one, never half of
one, and a failed write leaves no temporary file behind. `write_file` takes a callback for
writers that want a path (torch.save, pq.write_table, savefig); `write_fs` does the same
on a pyarrow filesystem (local or remote). Folder swaps (a manifest) are not handled here.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable


def write_file(path: str | os.PathLike, write: Callable[[str], Any]) -> str:
    """Call `write(tmp_path)` beside `path`, then rename it over `path`; returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if _disk_full(e) and not isinstance(e, OSError):  # torch.save wraps it in a RuntimeError ("enforce fail")
            raise OSError(errno.ENOSPC, f"no space left on device writing {path} (the previous file is kept)") from e
        raise
    return str(path)


def _disk_full(e: BaseException | None) -> bool:
    """Whether ENOSPC is somewhere in the exception's chain."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def write_bytes(path: str | os.PathLike, data: bytes) -> str:
    return write_file(path, lambda tmp: Path(tmp).write_bytes(data))


def write_text(path: str | os.PathLike, text: str) -> str:
    return write_file(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, obj: Any, **dumps: Any) -> str:
    """`obj` as JSON (`dumps` kwargs, e.g. indent=2, sort_keys=True, default=str)."""
    return write_text(path, json.dumps(obj, **dumps))


def write_fs(fs, path: str, write: Callable[[Any], Any]) -> None:
    """`write(stream)` into a temporary file beside `path` on pyarrow filesystem `fs`, then move it there."""
    parent = os.path.dirname(path)
    fs.create_dir(parent, recursive=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with fs.open_output_stream(tmp) as f:
            write(f)
        fs.move(tmp, path)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass
        raise
