"""Import existing caption datasets into a manifest (`urbancross data import`).

Every importer embeds the image bytes in the `image` column (after checking that they
decode), so the written manifest is self-contained: no dataset root has to travel with it
to Ray workers. PNG and JPEG files are stored as they are; other formats (RSITMD's TIFF)
are re-encoded as PNG, which every later stage can read.

Formats
-------
`precomp` (RSICD, RSITMD, UCM, Sydney): ROOT holds `{split}_caps.txt` (one caption a line,
five per image, in image order) and `{split}_filename.txt` for each split present among
train/val/test (other files, e.g. the `*_verify.txt` re-splits some copies ship, are
ignored). The file-name list has one line per caption (runs of equal names, RSITMD's and
RSICD's test) or one line per image (five caption lines each, RSICD's train); the line
counts decide which, per split. Images are read from `--images`, else ROOT/images,
ROOT/imgs or the one ROOT/*_images folder (`rsicd_images`, `ucm_images`). The scene `label`
is the file-name prefix (`mountain_2376.tif` -> `mountain`; null for `00001.jpg`, `1.tif`).

`karpathy`: `dataset*.json` (ROOT may name the file) with `images[].filename`,
`images[].split` (`restval` counts as train, as in Karpathy's splits) and
`images[].sentences[].raw`; an optional `filepath` is a sub-folder of the images folder
(COCO). Images are read from `--images` or the images folder beside the JSON, found as for
precomp; `label` as for precomp. An entry naming an image already listed is merged with it.

`urbancross`: the UrbanCross release, ROOT/{Finland,Germany,Spain}/ (or ROOT = one country
folder) each with `images.zip`, `image_segments.zip` and
`instructblip_generation_<country>_refine.csv` (any case). Zips may also be given
extracted, as `images/` and `image_segments/` folders; archives are read member by member
and closed when the import ends. The CSV columns, as read by the authors' loader
(siruzhong/MM24-UrbanCross, data.py `PrecompDataset_mine`):

  * `image_name`  (required) file name inside images.zip, e.g. `xxx.jpg`
  * `description` (required) the LMM-refined caption; several rows per image give
    several captions
  * optional, not in the public release but used when present: `split`
    (train/val/test), `lat`/`latitude`, `lon`/`lng`/`longitude`, `geo_tags`/`tags`
    (a JSON list or `;`-separated `key=value`), `original_description` (then the
    captions are the originals and `description` fills `refined_captions`).

Segments follow the authors' SAM script: `image_segments/<stem>/<stem>_<k>.jpg` with
`<stem>` the image name up to its first dot and `k` the SAM mask index (by area). They are
stored in increasing `k`, at most `DataConfig.num_segments`, padded with white images of
the first segment's size; `num_real_segments` counts the real ones. Without a split column,
each country's distinct image names are sorted, shuffled with `random.Random(data.split_seed)`
and the first `round(data.test_fraction * n)` go to test, the next `round(data.val_fraction * n)`
to val, the rest to train (70/10/20 by default, as the reference splits a country), so the
split does not depend on CSV order or on which rows are later skipped. The release has no
scene classes: `label` is null. `--domain` selects one country when ROOT holds several.

Validation split (every format): a release with train images but no val split (RSITMD's
precomp files, a Karpathy JSON without `val`, a CSV split column without `val`) gets a seeded
val split carved from its train images: `round(data.val_fraction * n)` of its n images (at
least one image stays in train), chosen as above. Models are chosen on val, never on test.

Release quirks (anomalies)
--------------------------
Public releases are not clean (RSITMD's train list has four images whose five caption lines
are blank; RSICD repeats captions to fill five; UCM and Sydney use CRLF line ends; some
names carry stray spaces). The importers keep every image and every usable caption, repair
what can be repaired and record each quirk in the report's `anomalies`: per kind, the
action, a count and the file:line of the first few. `strict=True` (`--strict`) makes the
first anomaly an error instead. Kinds (action):
  blank_caption (dropped), duplicate_caption (kept: the benchmarks count them),
  caption_count (kept: a precomp image listed with other than 5 caption lines),
  no_captions (kept: the image stays in the manifest; training and evaluation skip it),
  whitespace (stripped), caption_capped (cut at `data.max_caption_chars`),
  not_utf8 (undecodable bytes replaced by U+FFFD), name_resolved (the listed name differs from
  the file in case or image extension), listed_again (captions merged), in_several_splits
  (kept in the most held-out split, test > val > train, so no test image is trained on;
  captions merged), blank_file_name (its captions dropped), trailing_blank_lines (dropped
  where they break the line count).

Bad rows
--------
An image that cannot be imported is a bad row: missing, unreadable, over
`data.max_image_pixels` (checked from the header, before decoding), a path that resolves
outside the images folder (`../x.png`, an absolute path, a symlink pointing out), a
malformed entry, any other failure while building the row. Without `skip_bad` the first is
an error naming the file and line; with it every one is left out and listed in `skipped`.
A bad file (header, layout, unreadable) always fails, and so does an import with no rows left.

Memory: rows are built and written in small batches (`ManifestWriter`), so the peak does not
grow with the images; only the release's text (file lists, captions) is held whole. The
output is written atomically and never over an input (`manifest.check_output`).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import os
import random
import re
import zipfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

from PIL import Image
from tqdm import tqdm

from urbancross.config import DataConfig
from urbancross.data.manifest import (
    ManifestError,
    ManifestWriter,
    Summary,
    check_output,
    decode_image,
    encode_png,
    to_table,
)

SPLITS = ("train", "val", "test")
SPLIT_RANK = {"train": 0, "val": 1, "test": 2}  # an image listed in several splits keeps the highest
CAPTIONS_PER_IMAGE = 5
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
CSV_REQUIRED = ("image_name", "description")
CSV_LAT = ("lat", "latitude")
CSV_LON = ("lon", "lng", "longitude")
CSV_TAGS = ("geo_tags", "tags")
KEPT_FORMATS = ("PNG", "JPEG")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
BATCH_ROWS, BATCH_BYTES = 256, 64 << 20  # rows are written once either is reached
ANOMALY_ACTIONS = {
    "blank_caption": "dropped",
    "duplicate_caption": "kept",
    "caption_count": "kept",
    "no_captions": "kept",
    "whitespace": "repaired",
    "caption_capped": "repaired",
    "not_utf8": "repaired",
    "name_resolved": "repaired",
    "listed_again": "repaired",
    "in_several_splits": "repaired",
    "blank_file_name": "dropped",
    "trailing_blank_lines": "dropped",
}
FIRST_FEW = 5
LABEL = re.compile(r"([a-z]+(?:[ _-][a-z]+)*)[ _-]*\d+", re.IGNORECASE)

log = logging.getLogger(__name__)


class DatasetError(ManifestError):
    """The dataset being imported is malformed; the message names the file and line."""


class BadRow(DatasetError):
    """One row is bad (missing or corrupt image, path outside the folder): skippable."""


class AnomalyError(DatasetError):
    """A release quirk met with `strict`: never skipped."""


class Anomalies:
    """Release quirks repaired or dropped, per kind: action, count, where the first few are."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.kinds: dict[str, dict[str, Any]] = {}

    def add(self, kind: str, where: str, detail: str = "") -> None:
        text = f"{where}: {detail}" if detail else where
        if self.strict:
            what = kind.replace("_", " ") + (f": {detail}" if detail else "")
            raise AnomalyError(f"{where}: {what} (--strict makes release anomalies errors)")
        entry = self.kinds.setdefault(kind, {"action": ANOMALY_ACTIONS[kind], "count": 0, "first": []})
        entry["count"] += 1
        if len(entry["first"]) < FIRST_FEW:
            entry["first"].append(text)

    def report(self) -> dict[str, dict[str, Any]]:
        return {k: self.kinds[k] for k in sorted(self.kinds)}

    @property
    def total(self) -> int:
        return sum(v["count"] for v in self.kinds.values())


@dataclass
class Context:
    """What every reader needs: the options, the limits, the anomaly log, open archives."""

    cfg: DataConfig
    anomalies: Anomalies
    stack: ExitStack
    images: Path | None = None
    domain: str | None = None


@dataclass
class Candidate:
    """A row to import: `build()` reads and checks its files, or raises BadRow."""

    source: str
    image_id: str | None
    build: Callable[[], dict[str, Any]]


def import_dataset(
    fmt: str,
    root: str,
    out: str,
    *,
    images: str | None = None,
    domain: str | None = None,
    skip_bad: bool = False,
    strict: bool = False,
    overwrite: bool = False,
    cfg: DataConfig | None = None,
) -> dict[str, Any]:
    """Convert the dataset at `root` into a manifest at `out`; return its summary, skips and anomalies."""
    readers = {"precomp": read_precomp, "karpathy": read_karpathy, "urbancross": read_urbancross}
    if fmt not in readers:
        raise DatasetError(f"unknown format {fmt!r}; expected one of {sorted(readers)}")
    if not Path(root).exists():
        raise DatasetError(f"{root}: no such dataset folder")
    inputs = [root, images]
    check_output(out, inputs, overwrite=overwrite)  # before any work
    anomalies = Anomalies(strict)
    with ExitStack() as stack:
        ctx = Context(cfg or DataConfig(), anomalies, stack, Path(images) if images else None, domain)
        candidates = readers[fmt](Path(root), ctx)
        log.info("importing %d %s rows from %s", len(candidates), fmt, root)
        with ManifestWriter(out, inputs=inputs, overwrite=overwrite) as writer:
            summary, skipped = write_rows(candidates, writer, skip_bad=skip_bad, desc=f"import {fmt}")
            if summary.images == 0:
                first = "; ".join(f"{s['source']}: {s['reason']}" for s in skipped[:3])
                raise DatasetError(f"{root}: no rows imported ({len(skipped)} skipped{': ' + first if first else ''})")
            path = writer.commit()
    return {
        **summary.result(),
        "skipped": skipped,
        "num_skipped": len(skipped),
        "anomalies": anomalies.report(),
        "num_anomalies": anomalies.total,
        "format": fmt,
        "out": path,
    }


def write_rows(
    candidates: list[Candidate], writer: ManifestWriter, *, skip_bad: bool, desc: str = "import"
) -> tuple[Summary, list[dict[str, str]]]:
    """Build every candidate and stream the rows to `writer` in batches; a bad one raises, or is skipped."""
    summary, skipped, seen = Summary(), [], {}
    batch: list[dict[str, Any]] = []
    size = 0

    def flush() -> None:
        nonlocal batch, size
        if batch:
            table = to_table(batch)
            writer.write(table)
            summary.add(table)
            batch, size = [], 0

    for cand in tqdm(candidates, desc=desc, unit="img", disable=None):
        try:
            if cand.image_id is not None and cand.image_id in seen:
                raise BadRow(f"image {cand.image_id} is listed again (first at {seen[cand.image_id]})")
            row = cand.build()
        except AnomalyError:
            raise
        except Exception as e:  # any per-row failure is a bad row
            reason = str(e) if isinstance(e, ManifestError) else f"{type(e).__name__}: {e}"
            if not skip_bad:
                raise BadRow(f"{cand.source}: {reason}") from (None if isinstance(e, ManifestError) else e)
            skipped.append({"source": cand.source, "reason": reason})
            continue
        seen[row["image_id"]] = cand.source
        batch.append(row)
        size += len(row.get("image") or b"") + sum(len(s) for s in row.get("segments") or [])
        if len(batch) >= BATCH_ROWS or size >= BATCH_BYTES:
            flush()
    flush()
    return summary, skipped


# --------------------------------------------------------------------------- shared helpers


def scene_label(name: str) -> str | None:
    """The scene class a file name starts with (`mountain_2376.tif` -> `mountain`), if any."""
    m = LABEL.fullmatch(PurePosixPath(name).name.split(".")[0])
    return m.group(1).lower() if m else None


def checked_image(data: bytes, where: str, cfg: DataConfig) -> tuple[bytes, Image.Image]:
    """Bytes that decode (as PNG/JPEG, re-encoded otherwise) and the decoded RGB image."""
    try:
        img = decode_image(data, where, cfg.max_image_pixels)
    except ManifestError as e:
        raise BadRow(str(e)) from None
    fmt = Image.open(io.BytesIO(data)).format
    return (data if fmt in KEPT_FORMATS else encode_png(img)), img


def max_image_bytes(cfg: DataConfig) -> int:
    """No encoded image is larger than its pixels stored raw at 16-bit RGBA: a cap read before the bytes."""
    return 8 * cfg.max_image_pixels + (1 << 20)


def failing(reason: str) -> Callable[[], dict[str, Any]]:
    def build() -> dict[str, Any]:
        raise BadRow(reason)

    return build


def tidy(text: str, where: str, ctx: Context, *, caption: bool = True) -> str:
    """`text` stripped (and, for a caption, cut at max_caption_chars), each repair recorded."""
    stripped = text.strip()
    if stripped != text and stripped:
        ctx.anomalies.add("whitespace", where)
    limit = ctx.cfg.max_caption_chars
    if caption and len(stripped) > limit:
        ctx.anomalies.add("caption_capped", where, f"{len(stripped)} characters cut to {limit}")
        stripped = stripped[:limit].rstrip()
    return stripped


def iter_lines(path: Path, limit: int) -> Iterator[tuple[int, str, bool, bool]]:
    """(line number, text, cut, not_utf8) per line, split on \\n only (a caption may hold other
    line separators), \\r\\n and a BOM removed. At most about 4 * `limit` bytes of a line are held:
    the rest of a longer line is skipped and `cut` set."""
    cap = 4 * limit + 4  # UTF-8 needs at most 4 bytes a character
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DatasetError(f"{path}: cannot read: {e.strerror}") from e
    with f:
        n = 0
        while raw := f.readline(cap):
            n += 1
            cut = not raw.endswith(b"\n") and len(raw) == cap
            while cut and (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
            raw = raw[:-1] if raw.endswith(b"\n") else raw
            raw = raw[:-1] if raw.endswith(b"\r") else raw
            if n == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                text, bad = raw.decode("utf-8"), False
            except UnicodeDecodeError as e:
                if cut and e.start >= len(raw) - 3:  # the cut split a character
                    text, bad = raw[: e.start].decode("utf-8", "replace"), False
                else:
                    text, bad = raw.decode("utf-8", "replace"), True
            yield n, text, cut or len(text) > limit, bad


def text_lines(path: Path, ctx: Context, *, caption: bool) -> list[tuple[str, str]]:
    """(file:line, tidy text) for every line of a caption or file-name list; quirks recorded."""
    out = []
    for n, text, cut, bad in iter_lines(path, ctx.cfg.max_caption_chars):
        where = f"{path}:{n}"
        if bad:
            ctx.anomalies.add("not_utf8", where, "undecodable bytes replaced by U+FFFD")
        if cut and caption:
            ctx.anomalies.add("caption_capped", where, f"cut to {ctx.cfg.max_caption_chars} characters")
        out.append((where, tidy(text[: ctx.cfg.max_caption_chars], where, ctx, caption=caption)))
    return out


class ImageFolder:
    """Names from a release's lists resolved inside one folder, never outside it. A name that
    differs from the file only in case or image extension is repaired (and reported)."""

    def __init__(self, path: Path, cfg: DataConfig):
        self.path, self.cfg = path, cfg
        self.real = path.resolve()
        self._listings: dict[Path, tuple[dict[str, list[str]], dict[str, list[str]]]] = {}

    def find(self, name: str) -> str:
        """The file's path relative to the folder (POSIX); BadRow if missing, ambiguous or outside."""
        rel = os.path.normpath(name.replace("\\", "/"))
        path = self.path / rel  # an absolute name replaces the folder: caught below
        if not os.path.lexists(path):
            path = self._near(path, name)
        real = path.resolve()
        if not real.is_relative_to(self.real):
            raise BadRow(f"file name {name!r} resolves to {real}, outside the images folder {self.path}")
        if not real.is_file():
            raise BadRow(f"image not found: {path}")
        return real.relative_to(self.real).as_posix()

    def _near(self, path: Path, name: str) -> Path:
        parent = path.parent
        if not parent.is_dir():
            raise BadRow(f"image not found: {path}")
        if parent not in self._listings:
            names: dict[str, list[str]] = {}
            stems: dict[str, list[str]] = {}
            for entry in os.scandir(parent):
                names.setdefault(entry.name.casefold(), []).append(entry.name)
                stem, ext = os.path.splitext(entry.name)
                if ext.lower() in IMAGE_SUFFIXES:
                    stems.setdefault(stem.casefold(), []).append(entry.name)
            self._listings[parent] = (names, stems)
        names, stems = self._listings[parent]
        found = names.get(path.name.casefold()) or stems.get(os.path.splitext(path.name)[0].casefold(), [])
        if len(found) > 1:
            raise BadRow(f"image {name!r} is ambiguous in {parent}: {sorted(found)}")
        if not found:
            raise BadRow(f"image not found: {path}")
        return parent / found[0]

    def read(self, rel: str) -> tuple[bytes, str]:
        """The checked image bytes of a name `find` returned, and where they came from."""
        path = self.real / rel
        if path.stat().st_size > max_image_bytes(self.cfg):
            raise BadRow(f"{path}: {path.stat().st_size} bytes, more than an image of data.max_image_pixels can take")
        return checked_image(path.read_bytes(), str(path), self.cfg)[0], str(path)


def images_folder(images: Path | None, root: Path) -> Path:
    """`--images`, else ROOT/images, ROOT/imgs or the one ROOT/*_images; none fails the whole import."""
    if images is not None:
        if not images.is_dir():
            raise DatasetError(f"{images}: no such images folder (use --images)")
        return images
    found = [root / n for n in ("images", "imgs") if (root / n).is_dir()]
    found = found or sorted(p for p in root.glob("*_images") if p.is_dir())
    if len(found) != 1:
        what = f"several: {[p.name for p in found]}" if found else "none"
        raise DatasetError(
            f"{root}: expected one images folder (images/, imgs/ or *_images/), found {what}; use --images"
        )
    return found[0]


@dataclass
class Listing:
    """One image as one file lists it: its name, where, its split and its caption lines."""

    order: int
    name: str
    source: str
    split: str
    captions: list[tuple[str, str]] = field(default_factory=list)  # (file:line, tidy text)


def grouped_candidates(
    listings: list[Listing], failed: list[tuple[int, Candidate]], folder: ImageFolder, domain: str, ctx: Context
) -> list[Candidate]:
    """One candidate per image file, however often it is listed; in the order of first listing."""
    groups: dict[str, list[Listing]] = {}
    items = list(failed)
    for lst in listings:
        try:
            rel = folder.find(lst.name)
        except BadRow as e:
            items.append((lst.order, Candidate(lst.source, None, failing(str(e)))))
            continue
        if rel != os.path.normpath(lst.name):
            ctx.anomalies.add("name_resolved", lst.source, f"{lst.name!r} is {rel!r}")
        groups.setdefault(rel, []).append(lst)
    captioned = {rel for rel, group in groups.items() if any(text for g in group for _, text in g.captions)}
    split_of = carve_val({rel: max((g.split for g in group), key=SPLIT_RANK.__getitem__) for rel, group in groups.items()}, ctx.cfg, captioned)
    for rel, group in groups.items():
        first = group[0]
        splits = sorted({g.split for g in group}, key=SPLIT_RANK.__getitem__)
        if len(splits) > 1:
            where = ", ".join(f"{g.split} at {g.source}" for g in group)
            ctx.anomalies.add("in_several_splits", first.source, f"{rel} listed in {where}; kept in {splits[-1]}")
        seen_splits: dict[str, str] = {}
        for g in group:
            if g.split in seen_splits:
                ctx.anomalies.add("listed_again", g.source, f"{rel} first listed at {seen_splits[g.split]}")
            seen_splits.setdefault(g.split, g.source)
        row = {
            "image_id": f"{domain}/{rel}",
            "domain": domain,
            "split": split_of[rel],
            "label": scene_label(rel),
            "source": first.source,
            "captions": usable_captions([c for g in group for c in g.captions], first.source, ctx),
        }
        items.append((first.order, Candidate(first.source, row["image_id"], partial(file_row, row, folder, rel))))
    return [cand for _, cand in sorted(items, key=lambda item: item[0])]


def usable_captions(lines: list[tuple[str, str]], source: str, ctx: Context) -> list[str]:
    """The non-blank captions of one image (duplicates kept); blanks, repeats, none recorded."""
    out: list[str] = []
    for where, text in lines:
        if not text:
            ctx.anomalies.add("blank_caption", where)
        elif text in out:
            ctx.anomalies.add("duplicate_caption", where)
            out.append(text)
        else:
            out.append(text)
    if not out:
        ctx.anomalies.add("no_captions", source, "image kept without captions; training and evaluation skip it")
    return out


def file_row(row: dict[str, Any], folder: ImageFolder, rel: str) -> dict[str, Any]:
    return {**row, "image": folder.read(rel)[0]}


# --------------------------------------------------------------------------- precomp


def read_precomp(root: Path, ctx: Context) -> list[Candidate]:
    splits = [s for s in SPLITS if (root / f"{s}_caps.txt").is_file()]
    if not splits:
        raise DatasetError(f"{root}: no train_caps.txt, val_caps.txt or test_caps.txt")
    folder = ImageFolder(images_folder(ctx.images, root), ctx.cfg)
    domain = ctx.domain or root.resolve().name
    listings: list[Listing] = []
    for split in splits:
        listings += precomp_listings(root, split, len(listings), ctx)
    return grouped_candidates(listings, [], folder, domain, ctx)


def precomp_layout(
    caps_file: Path, caps: list[tuple[str, str]], names_file: Path, names: list[tuple[str, str]], ctx: Context
) -> bool:
    """True: one file name per caption; False: one per image. Trailing blank lines are dropped
    (and recorded) only where they break both counts."""
    for trim in (False, True):
        if trim:
            for lines in (caps, names):
                while lines and not lines[-1][1]:
                    ctx.anomalies.add("trailing_blank_lines", lines.pop()[0])
        if len(caps) == len(names):
            return True
        if names and len(caps) == CAPTIONS_PER_IMAGE * len(names):
            return False
    raise DatasetError(
        f"{caps_file} has {len(caps)} lines and {names_file} has {len(names)}: expected one file name "
        f"per caption ({len(caps)} lines) or per image ({len(caps) / CAPTIONS_PER_IMAGE:g} lines, "
        f"{CAPTIONS_PER_IMAGE} captions each)"
    )


def precomp_listings(root: Path, split: str, order: int, ctx: Context) -> list[Listing]:
    caps_file, names_file = root / f"{split}_caps.txt", root / f"{split}_filename.txt"
    if not names_file.is_file():
        raise DatasetError(f"{caps_file}: no matching {names_file.name} in {root}")
    caps = text_lines(caps_file, ctx, caption=True)
    names = text_lines(names_file, ctx, caption=False)
    if precomp_layout(caps_file, caps, names_file, names, ctx):  # runs of equal names
        runs, start = [], 0
        for i in range(1, len(names) + 1):
            if i == len(names) or names[i][1] != names[start][1]:
                runs.append((start, i - start))
                start = i
        spans = [(names[s][0], names[s][1], caps[s : s + n]) for s, n in runs]
    else:
        spans = [
            (where, name, caps[i * CAPTIONS_PER_IMAGE : (i + 1) * CAPTIONS_PER_IMAGE])
            for i, (where, name) in enumerate(names)
        ]
    out = []
    for where, name, lines in spans:
        if not name:
            for cap_where, _ in lines:
                ctx.anomalies.add("blank_file_name", cap_where, f"caption without an image name ({where})")
            continue
        if len(lines) != CAPTIONS_PER_IMAGE:
            span = f"{lines[0][0]}-{lines[-1][0].rsplit(':', 1)[1]}"
            ctx.anomalies.add("caption_count", where, f"{name} has {len(lines)} caption lines ({span})")
        out.append(Listing(order + len(out), name, where, split, lines))
    return out


# --------------------------------------------------------------------------- karpathy


def karpathy_json(root: Path) -> Path:
    if root.is_file():
        return root
    found = sorted(root.glob("dataset*.json"))
    if len(found) != 1:
        raise DatasetError(f"{root}: expected one dataset*.json, found {[p.name for p in found] or 'none'}")
    return found[0]


def load_json(path: Path, ctx: Context) -> Any:
    """The parsed file; bytes that are not UTF-8 are replaced (and recorded with their line)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read: {e.strerror}") from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        ctx.anomalies.add(
            "not_utf8",
            f"{path}:{line}",
            f"byte {raw[e.start]:#04x} at offset {e.start} (and any later ones) replaced by U+FFFD",
        )
        text = raw.decode("utf-8-sig", "replace")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    except RecursionError:
        raise DatasetError(f"{path}: not valid JSON: nested too deeply") from None


def read_karpathy(root: Path, ctx: Context) -> list[Candidate]:
    path = karpathy_json(root)
    data = load_json(path, ctx)
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise DatasetError(f"{path}: expected a top-level object with an `images` list")
    folder = ImageFolder(images_folder(ctx.images, path.parent), ctx.cfg)
    domain = ctx.domain or path.resolve().parent.name
    listings, failed = [], []
    for i, entry in enumerate(entries):
        source = f"{path}:images[{i}]"
        try:
            listings.append(karpathy_listing(i, entry, source, ctx))
        except BadRow as e:
            failed.append((i, Candidate(source, None, failing(str(e)))))
    return grouped_candidates(listings, failed, folder, domain, ctx)


def karpathy_listing(i: int, entry: Any, source: str, ctx: Context) -> Listing:
    """One JSON entry, its types checked; a malformed entry is a bad row."""
    if not isinstance(entry, dict):
        raise BadRow(f"expected an object, got {type(entry).__name__}")
    missing = [k for k in ("filename", "split", "sentences") if k not in entry]
    if missing:
        raise BadRow(f"missing key(s) {missing}; has {sorted(map(str, entry))[:10]}")
    filename, filepath = entry["filename"], entry.get("filepath")
    if not isinstance(filename, str) or not filename.strip():
        raise BadRow(f"filename must be a non-empty string, got {filename!r:.60}")
    if filepath is not None and not isinstance(filepath, str):
        raise BadRow(f"filepath must be a string, got {filepath!r:.60}")
    split = KARPATHY_SPLITS.get(entry["split"]) if isinstance(entry["split"], str) else None
    if split is None:
        raise BadRow(f"split {entry['split']!r:.60} is not one of {sorted(KARPATHY_SPLITS)}")
    sentences = entry["sentences"]
    if not isinstance(sentences, list) or not all(
        isinstance(s, dict) and isinstance(s.get("raw"), str) for s in sentences
    ):
        raise BadRow("sentences must be a list of objects, each with a `raw` string")
    name = "/".join(p.strip() for p in (filepath, filename) if p and p.strip())
    caps = [
        (f"{source}.sentences[{j}]", tidy(s["raw"], f"{source}.sentences[{j}]", ctx)) for j, s in enumerate(sentences)
    ]
    return Listing(i, name, source, split, caps)


# --------------------------------------------------------------------------- urbancross


class Files:
    """The files of a zip archive (read member by member) or of a folder, by relative POSIX path."""

    def __init__(self, path: Path, cfg: DataConfig):
        self.path, self.cfg = path, cfg
        self.zip: zipfile.ZipFile | None = None
        if path.is_dir():
            self.real = path.resolve()
            self.members = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
            return
        try:
            self.zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise DatasetError(f"{path}: not a readable zip archive: {e}") from e
        self.members = [n for n in self.zip.namelist() if not n.endswith("/") and not n.startswith("__MACOSX/")]

    def __enter__(self) -> "Files":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()

    def where(self, member: str) -> str:
        return f"{self.path}:{member}" if self.zip else str(self.path / member)

    def read(self, member: str) -> bytes:
        """One member's bytes; its size is checked first, and a folder's file must stay inside it."""
        try:
            if self.zip:
                size = self.zip.getinfo(member).file_size
            else:
                real = (self.path / member).resolve()
                size = real.stat().st_size
        except (OSError, KeyError) as e:
            raise BadRow(f"cannot read {self.where(member)}: {e}") from None
        if not self.zip and not real.is_relative_to(self.real):
            raise BadRow(f"{self.where(member)} resolves to {real}, outside {self.path}")
        if size > max_image_bytes(self.cfg):
            raise BadRow(f"{self.where(member)}: {size} bytes, more than an image of data.max_image_pixels can take")
        try:
            return self.zip.read(member) if self.zip else real.read_bytes()
        except (OSError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, RuntimeError) as e:
            raise BadRow(f"cannot read {self.where(member)}: {e}") from None

    def by_name(self) -> dict[str, list[str]]:
        index: dict[str, list[str]] = {}
        for m in self.members:
            index.setdefault(PurePosixPath(m).name, []).append(m)
        return index

    def segments(self) -> dict[str, list[str]]:
        """Segment files per image stem (`<stem>/<stem>_<k>.<ext>`), in increasing `k`."""
        found: dict[str, list[tuple[int, str]]] = {}
        for m in self.members:
            p = PurePosixPath(m)
            stem, _, k = p.stem.rpartition("_")
            if stem == p.parent.name and k.isdigit() and p.suffix.lower() in IMAGE_SUFFIXES:
                found.setdefault(stem, []).append((int(k), m))
        return {stem: [m for _, m in sorted(items)] for stem, items in found.items()}


def find_country_csv(folder: Path) -> Path | None:
    """`instructblip_generation_<country>_refine.csv`, the country in any case."""
    pattern = re.compile(r"instructblip_generation_.+_refine\.csv", re.I)
    found = sorted(p for p in folder.glob("*.csv") if pattern.fullmatch(p.name))
    if len(found) > 1:
        raise DatasetError(f"{folder}: several caption CSVs {[p.name for p in found]}")
    return found[0] if found else None


def read_urbancross(root: Path, ctx: Context) -> list[Candidate]:
    if find_country_csv(root):
        countries = {ctx.domain or root.resolve().name: root}
    else:
        countries = {d.name: d for d in sorted(root.iterdir()) if d.is_dir() and find_country_csv(d)}
        if not countries:
            raise DatasetError(f"{root}: no <country>/instructblip_generation_<country>_refine.csv")
        if ctx.domain:
            if ctx.domain not in countries:
                raise DatasetError(f"{root}: no country folder {ctx.domain!r}; found {sorted(countries)}")
            countries = {ctx.domain: countries[ctx.domain]}
    if ctx.images and len(countries) > 1:
        raise DatasetError("--images names one country's images; give ROOT as that country's folder")
    out: list[Candidate] = []
    for name, folder in countries.items():
        out += urbancross_country(folder, name, ctx)
    return out


def country_files(folder: Path, kind: str, required: bool, ctx: Context) -> Files | None:
    for path in (folder / f"{kind}.zip", folder / kind):
        if path.exists():
            return ctx.stack.enter_context(Files(path, ctx.cfg))
    if required:
        raise DatasetError(f"{folder}: no {kind}.zip or {kind}/ folder")
    return None


CsvRows = list[tuple[int, dict[str, str]]]  # one image's CSV rows: (line, column -> value)


@dataclass
class CsvRecord:
    line: int  # where the record starts in the file (1 = header)
    values: list[str] | None  # None: the record could not be parsed
    error: str = ""


def read_csv(path: Path, field_limit: int) -> tuple[list[str], list[CsvRecord]]:
    """Header and non-blank records; a record the csv module rejects (a field over `field_limit`
    characters, a stray quote) is kept as an error, the rest still read."""
    old = csv.field_size_limit(field_limit)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            records, line = [], reader.line_num
            while True:
                try:
                    values = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:
                    records.append(CsvRecord(line + 1, None, str(e)))
                else:
                    if values:
                        records.append(CsvRecord(line + 1, values))
                line = reader.line_num
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{path}: cannot read CSV: {e}") from e
    finally:
        csv.field_size_limit(old)
    missing = [c for c in CSV_REQUIRED if c not in header]
    if missing:
        raise DatasetError(f"{path}:1: missing column(s) {missing}; columns found: {header}")
    return header, records


def first_column(header: list[str], names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in header), None)


def parse_float(text: str, column: str) -> float | None:
    if not text.strip():
        return None
    try:
        return float(text)
    except ValueError:
        raise BadRow(f"column {column}: {text!r:.60} is not a number") from None


def parse_tags(text: str) -> list[str] | None:
    text = text.strip()
    if not text:
        return None
    if text.startswith("["):
        try:
            tags = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            raise BadRow(f"geo tags {text[:40]!r} are not a JSON list") from None
        if not isinstance(tags, list):
            raise BadRow(f"geo tags {text[:40]!r} are not a JSON list")
        return [str(t) for t in tags]
    return [t.strip() for t in text.split(";") if t.strip()]


def seeded_order(names: list[str], seed: int) -> list[str]:
    """The names sorted, then shuffled by `random.Random(seed)`: independent of input order."""
    order = sorted(names)
    random.Random(seed).shuffle(order)
    return order


def seeded_splits(names: list[str], cfg: DataConfig) -> dict[str, str]:
    """name -> split: in `seeded_order`, the first round(test_fraction * n) test, the next
    round(val_fraction * n) val, the rest train (disjoint by construction)."""
    order = seeded_order(names, cfg.split_seed)
    test, val = round(cfg.test_fraction * len(order)), round(cfg.val_fraction * len(order))
    return {name: "test" if i < test else "val" if i < test + val else "train" for i, name in enumerate(order)}


def carve_val(split_of: dict[str, str], cfg: DataConfig, eligible: set[str] | None = None) -> dict[str, str]:
    """`split_of` (name -> split) with a seeded val split carved from train when it has none:
    round(val_fraction * n) of all n names, drawn from the `eligible` train names (all when
    None; the importers pass those with a caption, as a captionless image cannot be scored),
    at least one train name left in train."""
    train = [name for name, split in split_of.items() if split == "train"]
    if "val" in split_of.values() or not train:
        return split_of
    pool = [name for name in train if eligible is None or name in eligible]
    count = min(round(cfg.val_fraction * len(split_of)), len(train) - 1, len(pool))
    val = set(seeded_order(pool, cfg.split_seed)[:count])
    if val:
        log.info("no val split: %d of %d train images carved out as val (data.val_fraction %g)", len(val), len(train), cfg.val_fraction)
    return {name: "val" if name in val else split for name, split in split_of.items()}


@dataclass
class CountryFiles:
    """One country's archives, indexed once."""

    name: str
    images: Files
    by_name: dict[str, list[str]]
    segments: Files | None
    segments_by_stem: dict[str, list[str]] | None
    cfg: DataConfig


def urbancross_country(folder: Path, country: str, ctx: Context) -> list[Candidate]:
    """One candidate per distinct image name (its CSV rows grouped) and per bad CSV record, in file order."""
    csv_path = find_country_csv(folder)
    header, records = read_csv(csv_path, field_limit=max(csv.field_size_limit(), 4 * ctx.cfg.max_caption_chars))
    image_files = (
        ctx.stack.enter_context(Files(ctx.images, ctx.cfg))
        if ctx.images
        else country_files(folder, "images", True, ctx)
    )
    seg_files = country_files(folder, "image_segments", False, ctx)
    seg_index = seg_files.segments() if seg_files else None
    files = CountryFiles(country, image_files, image_files.by_name(), seg_files, seg_index, ctx.cfg)

    found: list[tuple[int, Candidate]] = []
    groups: dict[str, CsvRows] = {}
    for rec in records:
        where = f"{csv_path}:{rec.line}"
        if rec.values is None:
            found.append((rec.line, Candidate(where, None, failing(f"unreadable CSV record: {rec.error}"))))
            continue
        if len(rec.values) != len(header):
            reason = f"{len(rec.values)} fields, the header has {len(header)}"
            found.append((rec.line, Candidate(where, None, failing(reason))))
            continue
        values = dict(zip(header, rec.values))
        name = tidy(values["image_name"], where, ctx, caption=False)
        if not name:
            ctx.anomalies.add("blank_file_name", where, "caption without an image name")
            continue
        for col in ("description", "original_description"):
            if col in values:
                values[col] = tidy(values[col], where, ctx)
        groups.setdefault(name, []).append((rec.line, values))

    if "split" not in header:
        split_of = seeded_splits(list(groups), ctx.cfg)
    else:
        split_of = {}
        for name, recs in groups.items():
            try:
                split_of[name] = csv_split(recs, f"{csv_path}:{recs[0][0]}", ctx)
            except BadRow as e:
                found.append((recs[0][0], Candidate(f"{csv_path}:{recs[0][0]}", None, failing(str(e)))))
        split_of = carve_val(split_of, ctx.cfg)
    for name, recs in groups.items():
        if name not in split_of:
            continue  # a bad split column: already a failing candidate
        source = f"{csv_path}:{recs[0][0]}"
        fields = {"split": split_of[name], **csv_captions(csv_path, header, recs, source, ctx)}
        build = partial(urbancross_row, files, name, header, recs, fields, source)
        found.append((recs[0][0], Candidate(source, f"{country}/{name}", build)))
    return [cand for _, cand in sorted(found, key=lambda item: item[0])]


def csv_split(recs: CsvRows, source: str, ctx: Context) -> str:
    """The `split` column of one image's rows; rows that disagree keep the most held-out split."""
    splits = {v["split"].strip() for _, v in recs}
    if not splits <= set(SPLITS):
        lines = ", ".join(str(line) for line, _ in recs)
        raise BadRow(f"split {sorted(splits)} (lines {lines}) must be one of {list(SPLITS)}")
    split = max(splits, key=SPLIT_RANK.__getitem__)
    if len(splits) > 1:
        ctx.anomalies.add("in_several_splits", source, f"rows say {sorted(splits)}; kept in {split}")
    return split


def csv_captions(csv_path: Path, header: list[str], recs: CsvRows, source: str, ctx: Context) -> dict[str, list[str]]:
    """Captions (and refined captions) of one image from its CSV rows."""
    out = {"captions": usable_captions([(f"{csv_path}:{line}", v["description"]) for line, v in recs], source, ctx)}
    if "original_description" in header:
        originals = [(f"{csv_path}:{line}", v["original_description"]) for line, v in recs]
        out = {"refined_captions": out["captions"], "captions": usable_captions(originals, source, ctx)}
    return out


def urbancross_row(
    files: CountryFiles, name: str, header: list[str], recs: CsvRows, fields: dict[str, Any], source: str
) -> dict[str, Any]:
    """The manifest row of one image: CSV fields, the checked image and its segments."""
    row = {**fields, **geo_fields(header, recs[0][1])}
    members = files.by_name.get(name, [])
    if len(members) != 1:
        raise BadRow(f"image {name} {'ambiguous: ' + str(members) if members else 'not found'} in {files.images.path}")
    data, img = checked_image(files.images.read(members[0]), files.images.where(members[0]), files.cfg)
    if files.segments is not None:
        stem = name.split(".")[0]  # as the authors' SAM script names segment folders
        members = files.segments_by_stem.get(stem, [])
        row["segments"], row["num_real_segments"] = load_segments(files.segments, members, img, files.cfg)
    return {"image_id": f"{files.name}/{name}", "image": data, "domain": files.name, "source": source, **row}


def geo_fields(header: list[str], first: dict[str, str]) -> dict[str, Any]:
    """lat, lon and geo tags of an image, from its first CSV row."""
    row: dict[str, Any] = {}
    for key, names in (("lat", CSV_LAT), ("lon", CSV_LON)):
        col = first_column(header, names)
        if col:
            row[key] = parse_float(first[col], col)
    tags = first_column(header, CSV_TAGS)
    if tags:
        row["geo_tags"] = parse_tags(first[tags])
    return row


def load_segments(files: Files, members: list[str], image: Image.Image, cfg: DataConfig) -> tuple[list[bytes], int]:
    """The first `num_segments` segments (checked), padded with white images; and how many are real."""
    limit = cfg.num_segments
    real = [checked_image(files.read(m), files.where(m), cfg) for m in members[:limit]]
    size = real[0][1].size if real else image.size
    pad = encode_png(Image.new("RGB", size, (255, 255, 255)))
    return [data for data, _ in real] + [pad] * (limit - len(real)), len(real)
