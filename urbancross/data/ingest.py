"""Which rows and captions a stage uses: splits, caption choice, stable sample keys.

Model-independent; `urbancross.model.inputs.ModelInputs` turns these rows into the arrays a
model takes (decoding, augmentation, tokenizing) as a Ray Data stage.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import pyarrow.compute as pc

from urbancross.config import Config
from urbancross.data.manifest import ManifestError, filter_rows, read_manifest

log = logging.getLogger(__name__)

CAPTIONS_PER_SAMPLE = 5  # the releases' 5 captions per image; fewer are cycled to fill


def sample_key(image_id: str) -> int:
    """Stable 63-bit key of an image id: the same on every worker, epoch and run."""
    return int.from_bytes(hashlib.blake2b(image_id.encode(), digest_size=8).digest(), "little") >> 1


def label_id(label: Any) -> int:
    """Stable 63-bit class id of a scene label (the manifest's optional `label`); -1 for none."""
    if label is None or not str(label):
        return -1
    return sample_key("label:" + str(label))


def caption_texts(row: dict[str, Any], cfg: Config) -> list[str]:
    """The captions a stage trains/evaluates on: refined ones when configured and present."""
    refined = row.get("refined_captions")
    if cfg.data.use_refined_captions and refined is not None and len(refined) > 0:
        caps = [str(c) for c in refined]
    else:
        caps = [str(c) for c in row["captions"]]
    if not caps:
        raise ManifestError(f"{row.get('source') or row.get('image_id')}: image has no captions")
    return caps


def read_split(cfg: Config, split: str, domain: str | None = None, manifest: str | None = None):
    """One split (and domain) of the manifest as an Arrow table; empty is an error.

    Images without any caption (kept by the importers, e.g. RSITMD's blank caption lines)
    can be neither trained on nor queried: they are left out here, and counted in the log.
    """
    table = filter_rows(read_manifest(manifest or cfg.data.manifest), split=split, domain=domain)
    has = pc.greater(pc.fill_null(pc.list_value_length(table["captions"]), 0), 0)
    if cfg.data.use_refined_captions:
        has = pc.or_(has, pc.greater(pc.fill_null(pc.list_value_length(table["refined_captions"]), 0), 0))
    if not pc.all(has).as_py():
        left_out = table.num_rows - pc.sum(has).as_py()
        log.info("%s: %d %s image(s) without captions left out", manifest or cfg.data.manifest, left_out, split)
        table = table.filter(has)
    if table.num_rows == 0:
        raise ManifestError(f"{manifest or cfg.data.manifest}: no {split} images with captions (domain={domain!r})")
    return table


def pick_caption(tokens, keys, epoch: int, seed: int):
    """One caption per sample for this epoch, seeded by (seed, epoch, sample key).

    `tokens` [B,C,L] (torch or numpy), `keys` [B] -> [B,L]. Deterministic, so a resumed
    run sees the same captions as an uninterrupted one.
    """
    import torch

    keys = torch.as_tensor(keys, dtype=torch.int64)
    c = tokens.shape[1]
    mixed = (keys ^ (seed * 1_000_003 + epoch * 7_919)) % 2_147_483_647
    idx = (mixed * 48_271 % 2_147_483_647) % c
    tokens = torch.as_tensor(tokens)
    return tokens[torch.arange(tokens.shape[0]), idx.to(tokens.device)]
