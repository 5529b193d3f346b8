"""A pickle that runs code when loaded (tests/ helper): proof that a loader unpickled it."""

from __future__ import annotations

import pickle
from pathlib import Path


class Payload:
    """Unpickling this writes `path`."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('pwned')",)


def plant(target: Path, marker: Path, wrap=lambda p: p, *, torch_format: bool = True) -> None:
    """Overwrite `target` with `wrap(Payload(marker))`, saved as torch.save does (or as a bare pickle)."""
    if torch_format:
        import torch

        torch.save(wrap(Payload(marker)), target)
    else:
        target.write_bytes(pickle.dumps(wrap(Payload(marker))))
