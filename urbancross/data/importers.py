"""Import existing caption datasets into a manifest (`urbancross data import`).

Every importer embeds the image bytes in the `image` column (after checking that they
decode), so the written manifest is self-contained: no dataset root has to travel with it
to Ray workers. PNG and JPEG files are stored as they are; other formats (RSITMD's TIFF)
are re-encoded as PNG, which every later stage can read.

Formats
-------
`precomp` (RSICD, RSITMD, UCM, Sydney): ROOT holds `{split}_caps.txt` (one caption a line,
five per image, in image order) and `{split}_filename.txt` for each split present among
train/val/test. The file-name list has either one line per caption (runs of five equal names,
RSITMD) or one line per image (RSICD); the line counts decide which. Images are read from
`--images` or ROOT/images. Duplicate captions are kept; an image listed twice is a bad row.

`karpathy`: `dataset_*.json` (ROOT may name the file) with `images[].filename`,
`images[].split` (`restval` counts as train, as in Karpathy's splits) and
`images[].sentences[].raw`; an optional `filepath` is a sub-folder of the images folder
(COCO). Images are read from `--images` or ROOT/images.

`urbancross`: the UrbanCross release, ROOT/{Finland,Germany,Spain}/ (or ROOT = one country
folder) each with `images.zip`, `image_segments.zip` and
`instructblip_generation_<country>_refine.csv` (any case). Zips may also be given
extracted, as `images/` and `image_segments/` folders. The CSV columns, as read by the
authors' loader (siruzhong/MM24-UrbanCross, data.py `PrecompDataset_mine`):

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
each country's distinct image names are sorted, shuffled with `random.Random(seed)` and the
first `round(test_fraction * n)` go to test, the rest to train (80/20, seed 0 by default),
so the split does not depend on CSV order or on which rows are later skipped.
`--domain` selects one country when ROOT holds several.

Errors name the file and line (CSV line, caption/file-name line, JSON index). With
`skip_bad`, bad rows are left out and listed in the report's `skipped`; a bad file
(header, layout, unreadable) always fails, and so does an import with no rows left.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
import re
import zipfile
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

import pyarrow as pa
from PIL import Image
from tqdm import tqdm

from urbancross.config import DataConfig
from urbancross.data.manifest import ManifestError, decode_image, encode_png, summarize, to_table, write_manifest

SPLITS = ("train", "val", "test")
CAPTIONS_PER_IMAGE = 5
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
CSV_REQUIRED = ("image_name", "description")
CSV_LAT = ("lat", "latitude")
CSV_LON = ("lon", "lng", "longitude")
CSV_TAGS = ("geo_tags", "tags")
KEPT_FORMATS = ("PNG", "JPEG")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")

log = logging.getLogger(__name__)


class DatasetError(ManifestError):
    """The dataset being imported is malformed; the message names the file and line."""


class BadRow(DatasetError):
    """One row is bad (missing or corrupt image, wrong caption count): skippable."""


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
) -> dict[str, Any]:
    """Convert the dataset at `root` into a manifest at `out`; return its summary + what was skipped."""
    readers = {"precomp": read_precomp, "karpathy": read_karpathy, "urbancross": read_urbancross}
    if fmt not in readers:
        raise DatasetError(f"unknown format {fmt!r}; expected one of {sorted(readers)}")
    if not Path(root).exists():
        raise DatasetError(f"{root}: no such dataset folder")
    candidates = list(readers[fmt](Path(root), Path(images) if images else None, domain))
    log.info("importing %d %s rows from %s", len(candidates), fmt, root)
    table, skipped = build_rows(candidates, skip_bad=skip_bad, desc=f"import {fmt}")
    if table.num_rows == 0:
        first = "; ".join(f"{s['source']}: {s['reason']}" for s in skipped[:3])
        raise DatasetError(f"{root}: no rows imported ({len(skipped)} skipped{': ' + first if first else ''})")
    path = write_manifest(table, out)
    return {**summarize(table), "skipped": skipped, "num_skipped": len(skipped), "format": fmt, "out": path}


def build_rows(candidates: list[Candidate], *, skip_bad: bool, desc: str = "import") -> tuple[pa.Table, list[dict]]:
    """Build every candidate; a bad one raises, or with `skip_bad` is listed in the returned skips."""
    skipped: list[dict[str, str]] = []
    seen: dict[str, str] = {}
    tables, batch = [], []
    for cand in tqdm(candidates, desc=desc, unit="img", disable=None):
        try:
            if cand.image_id is not None and cand.image_id in seen:
                raise BadRow(f"image {cand.image_id} is listed again (first at {seen[cand.image_id]})")
            row = cand.build()
        except BadRow as e:
            if not skip_bad:
                raise BadRow(f"{cand.source}: {e}") from None
            skipped.append({"source": cand.source, "reason": str(e)})
            continue
        seen[row["image_id"]] = cand.source
        batch.append(row)
        if len(batch) == 256:  # bounded Python-object overhead: rows become Arrow buffers in chunks
            tables.append(to_table(batch))
            batch = []
    tables.append(to_table(batch))
    return pa.concat_tables(tables), skipped


# --------------------------------------------------------------------------- shared helpers


def checked_image(data: bytes, where: str) -> tuple[bytes, Image.Image]:
    """Bytes that decode (as PNG/JPEG, re-encoded otherwise) and the decoded RGB image."""
    try:
        img = decode_image(data, where)
    except ManifestError as e:
        raise BadRow(str(e)) from None
    fmt = Image.open(io.BytesIO(data)).format
    return (data if fmt in KEPT_FORMATS else encode_png(img)), img


def images_folder(images: Path | None, default: Path) -> Path:
    """The folder that file names are relative to; a missing one fails the whole import."""
    folder = images or default
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such images folder (use --images)")
    return folder


def read_image_file(path: Path) -> bytes:
    if not path.is_file():
        raise BadRow(f"image not found: {path}")
    return checked_image(path.read_bytes(), str(path))[0]


def read_lines(path: Path) -> list[str]:
    """Stripped lines (trailing blank lines dropped); line i+1 of the file is item i."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read: {e}") from e
    while lines and not lines[-1]:
        lines.pop()
    return lines


def failing(reason: str) -> Callable[[], dict[str, Any]]:
    def build() -> dict[str, Any]:
        raise BadRow(reason)

    return build


# --------------------------------------------------------------------------- precomp


def read_precomp(root: Path, images: Path | None, domain: str | None) -> Iterator[Candidate]:
    splits = [s for s in SPLITS if (root / f"{s}_caps.txt").is_file()]
    if not splits:
        raise DatasetError(f"{root}: no train_caps.txt, val_caps.txt or test_caps.txt")
    images = images_folder(images, root / "images")
    domain = domain or root.resolve().name
    for split in splits:
        yield from precomp_split(root, split, images, domain)


def precomp_runs(caps_file: Path, n_caps: int, names_file: Path, names: list[str]) -> list[tuple[int, int]]:
    """(first name line index, caption count) per image, for either file-name layout."""
    if n_caps and n_caps == CAPTIONS_PER_IMAGE * len(names):  # one name per image
        return [(i, CAPTIONS_PER_IMAGE) for i in range(len(names))]
    if n_caps and n_caps == len(names):  # one name per caption, in runs
        runs, start = [], 0
        for i in range(1, len(names) + 1):
            if i == len(names) or names[i] != names[start]:
                runs.append((start, i - start))
                start = i
        return runs
    raise DatasetError(
        f"{caps_file} has {n_caps} lines and {names_file} has {len(names)}: expected one file name "
        f"per caption ({n_caps} lines) or per image ({n_caps / CAPTIONS_PER_IMAGE:g} lines, "
        f"{CAPTIONS_PER_IMAGE} captions each)"
    )


def precomp_split(root: Path, split: str, images: Path, domain: str) -> Iterator[Candidate]:
    caps_file, names_file = root / f"{split}_caps.txt", root / f"{split}_filename.txt"
    if not names_file.is_file():
        raise DatasetError(f"{caps_file}: no matching {names_file.name} in {root}")
    caps, names = read_lines(caps_file), read_lines(names_file)
    per_caption = len(caps) == len(names)
    for line, count in precomp_runs(caps_file, len(caps), names_file, names):
        name, source = names[line], f"{names_file}:{line + 1}"
        if not name:
            yield Candidate(source, None, failing("empty file name"))
            continue
        first = line if per_caption else line * CAPTIONS_PER_IMAGE
        lines = [(f"{caps_file}:{i + 1}", caps[i]) for i in range(first, first + count)]
        row = {"image_id": f"{domain}/{name}", "domain": domain, "split": split, "source": source}
        yield Candidate(source, row["image_id"], partial(precomp_row, row, images / name, lines))


def precomp_row(row: dict[str, Any], image: Path, lines: list[tuple[str, str]]) -> dict[str, Any]:
    """`row` completed with its captions (`lines`: (file:line, caption)) and checked image."""
    if len(lines) != CAPTIONS_PER_IMAGE:
        span = f"{lines[0][0]}-{lines[-1][0].rsplit(':', 1)[1]}"
        raise BadRow(f"{image.name} has {len(lines)} captions ({span}), expected {CAPTIONS_PER_IMAGE}")
    for where, cap in lines:
        if not cap:
            raise BadRow(f"empty caption at {where}")
    return {**row, "captions": [cap for _, cap in lines], "image": read_image_file(image)}


# --------------------------------------------------------------------------- karpathy


def karpathy_json(root: Path) -> Path:
    if root.is_file():
        return root
    found = sorted(root.glob("dataset_*.json"))
    if len(found) != 1:
        raise DatasetError(f"{root}: expected one dataset_*.json, found {[p.name for p in found] or 'none'}")
    return found[0]


def read_karpathy(root: Path, images: Path | None, domain: str | None) -> Iterator[Candidate]:
    path = karpathy_json(root)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from e
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise DatasetError(f"{path}: expected a top-level object with an `images` list")
    images = images_folder(images, path.parent / "images")
    domain = domain or path.resolve().parent.name
    for i, entry in enumerate(entries):
        source = f"{path}:images[{i}]"
        if not isinstance(entry, dict):
            yield Candidate(source, None, failing(f"expected an object, got {type(entry).__name__}"))
            continue
        rel = "/".join(p for p in (entry.get("filepath"), entry.get("filename")) if p)
        image_id = f"{domain}/{rel}" if entry.get("filename") else None
        yield Candidate(source, image_id, partial(karpathy_row, entry, rel, images, domain, source))


def karpathy_row(entry: dict, rel: str, images: Path, domain: str, source: str) -> dict[str, Any]:
    missing = [k for k in ("filename", "split", "sentences") if k not in entry]
    if missing:
        raise BadRow(f"missing key(s) {missing}; has {sorted(entry)}")
    split = KARPATHY_SPLITS.get(entry["split"]) if isinstance(entry["split"], str) else None
    if split is None:
        raise BadRow(f"split {entry['split']!r} is not one of {sorted(KARPATHY_SPLITS)}")
    sentences = entry["sentences"]
    if not isinstance(sentences, list) or not sentences:
        raise BadRow("no sentences")
    if not all(isinstance(s, dict) and isinstance(s.get("raw"), str) for s in sentences):
        raise BadRow("every sentence needs a `raw` string")
    caps = [s["raw"].strip() for s in sentences]
    if not all(caps):
        raise BadRow(f"empty caption at sentences[{caps.index('')}]")
    return {
        "image_id": f"{domain}/{rel}",
        "image": read_image_file(images / rel),
        "captions": caps,
        "domain": domain,
        "split": split,
        "source": source,
    }


# --------------------------------------------------------------------------- urbancross


class Files:
    """The files of a zip archive or of a folder, by relative POSIX path."""

    def __init__(self, path: Path):
        self.path = path
        self.zip: zipfile.ZipFile | None = None
        if path.is_dir():
            self.members = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
            return
        try:
            self.zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise DatasetError(f"{path}: not a readable zip archive: {e}") from e
        self.members = [n for n in self.zip.namelist() if not n.endswith("/") and not n.startswith("__MACOSX/")]

    def where(self, member: str) -> str:
        return f"{self.path}:{member}" if self.zip else str(self.path / member)

    def read(self, member: str) -> bytes:
        try:
            return self.zip.read(member) if self.zip else (self.path / member).read_bytes()
        except (OSError, zipfile.BadZipFile, zlib.error, KeyError) as e:
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


def read_urbancross(
    root: Path, images: Path | None, domain: str | None, *, test_fraction: float = 0.2, seed: int = 0
) -> Iterator[Candidate]:
    if find_country_csv(root):
        countries = {domain or root.resolve().name: root}
    else:
        countries = {d.name: d for d in sorted(root.iterdir()) if d.is_dir() and find_country_csv(d)}
        if not countries:
            raise DatasetError(f"{root}: no <country>/instructblip_generation_<country>_refine.csv")
        if domain:
            if domain not in countries:
                raise DatasetError(f"{root}: no country folder {domain!r}; found {sorted(countries)}")
            countries = {domain: countries[domain]}
    if images and len(countries) > 1:
        raise DatasetError("--images names one country's images; give ROOT as that country's folder")
    for name, folder in countries.items():
        yield from urbancross_country(folder, name, images, test_fraction, seed)


def country_files(folder: Path, kind: str, required: bool) -> Files | None:
    for path in (folder / f"{kind}.zip", folder / kind):
        if path.exists():
            return Files(path)
    if required:
        raise DatasetError(f"{folder}: no {kind}.zip or {kind}/ folder")
    return None


CsvRows = list[tuple[int, dict[str, str]]]  # one image's CSV rows: (line, column -> value)


@dataclass
class CsvRecord:
    line: int  # where the record starts in the file (1 = header)
    values: list[str]


def read_csv(path: Path) -> tuple[list[str], list[CsvRecord]]:
    """Header and non-blank records; a header without the required columns is an error."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            records, line = [], reader.line_num
            for values in reader:
                if values:
                    records.append(CsvRecord(line + 1, values))
                line = reader.line_num
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{path}: cannot read CSV: {e}") from e
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
        raise BadRow(f"column {column}: {text!r} is not a number") from None


def parse_tags(text: str) -> list[str] | None:
    text = text.strip()
    if not text:
        return None
    if text.startswith("["):
        try:
            tags = json.loads(text)
        except json.JSONDecodeError:
            raise BadRow(f"geo tags {text[:40]!r} are not a JSON list") from None
        return [str(t) for t in tags]
    return [t.strip() for t in text.split(";") if t.strip()]


def seeded_test_set(names: list[str], test_fraction: float, seed: int) -> set[str]:
    """The `round(test_fraction * n)` names that go to test: sorted, then a seeded shuffle."""
    order = sorted(names)
    random.Random(seed).shuffle(order)
    return set(order[: round(test_fraction * len(order))])


@dataclass
class CountryFiles:
    """One country's archives, indexed once."""

    name: str
    images: Files
    by_name: dict[str, list[str]]
    segments: Files | None
    segments_by_stem: dict[str, list[str]] | None


def urbancross_country(
    folder: Path, country: str, images: Path | None, test_fraction: float, seed: int
) -> Iterator[Candidate]:
    """One candidate per distinct image name (its CSV rows grouped) and per bad CSV record, in file order."""
    csv_path = find_country_csv(folder)
    header, records = read_csv(csv_path)
    image_files = Files(images) if images else country_files(folder, "images", required=True)
    seg_files = country_files(folder, "image_segments", required=False)
    seg_index = seg_files.segments() if seg_files else None
    files = CountryFiles(country, image_files, image_files.by_name(), seg_files, seg_index)

    found: list[tuple[int, Candidate]] = []
    groups: dict[str, CsvRows] = {}
    for rec in records:
        values = dict(zip(header, rec.values))
        if len(rec.values) != len(header):
            reason = f"{len(rec.values)} fields, the header has {len(header)}"
        elif not values["image_name"].strip() or not values["description"].strip():
            reason = "empty image_name or description"
        else:
            groups.setdefault(values["image_name"].strip(), []).append((rec.line, values))
            continue
        found.append((rec.line, Candidate(f"{csv_path}:{rec.line}", None, failing(reason))))

    test = seeded_test_set(list(groups), test_fraction, seed) if "split" not in header else None
    for name, recs in groups.items():
        split = None if test is None else ("test" if name in test else "train")
        source = f"{csv_path}:{recs[0][0]}"
        build = partial(urbancross_row, files, name, header, recs, split, source)
        found.append((recs[0][0], Candidate(source, f"{country}/{name}", build)))
    for _, cand in sorted(found, key=lambda item: item[0]):
        yield cand


def urbancross_row(
    files: CountryFiles, name: str, header: list[str], recs: CsvRows, split: str | None, source: str
) -> dict[str, Any]:
    """The manifest row of one image: CSV fields, the checked image and its segments."""
    row = csv_fields(header, recs)
    if split is not None:
        row["split"] = split
    members = files.by_name.get(name, [])
    if len(members) != 1:
        raise BadRow(f"image {name} {'ambiguous: ' + str(members) if members else 'not found'} in {files.images.path}")
    data, img = checked_image(files.images.read(members[0]), files.images.where(members[0]))
    if files.segments is not None:
        stem = name.split(".")[0]  # as the authors' SAM script names segment folders
        members = files.segments_by_stem.get(stem, [])
        row["segments"], row["num_real_segments"] = load_segments(files.segments, members, img)
    return {"image_id": f"{files.name}/{name}", "image": data, "domain": files.name, "source": source, **row}


def csv_fields(header: list[str], recs: CsvRows) -> dict[str, Any]:
    """Captions, split and geo fields of one image from its (line, values) CSV rows; geo from the first."""
    first = recs[0][1]
    row: dict[str, Any] = {"captions": [v["description"].strip() for _, v in recs]}
    if "original_description" in header:
        row["refined_captions"] = row["captions"]
        row["captions"] = [v["original_description"].strip() for _, v in recs]
    if "split" in header:
        splits = {v["split"].strip() for _, v in recs}
        if len(splits) != 1 or not splits <= set(SPLITS):
            lines = ", ".join(str(line) for line, _ in recs)
            raise BadRow(f"split {sorted(splits)} (lines {lines}) must be one of {list(SPLITS)}")
        row["split"] = splits.pop()
    for key, names in (("lat", CSV_LAT), ("lon", CSV_LON)):
        col = first_column(header, names)
        if col:
            row[key] = parse_float(first[col], col)
    tags = first_column(header, CSV_TAGS)
    if tags:
        row["geo_tags"] = parse_tags(first[tags])
    return row


def load_segments(files: Files, members: list[str], image: Image.Image) -> tuple[list[bytes], int]:
    """The first `num_segments` segments (checked), padded with white images; and how many are real."""
    limit = DataConfig().num_segments
    real = [checked_image(files.read(m), files.where(m)) for m in members[:limit]]
    size = real[0][1].size if real else image.size
    pad = encode_png(Image.new("RGB", size, (255, 255, 255)))
    return [data for data, _ in real] + [pad] * (limit - len(real)), len(real)
