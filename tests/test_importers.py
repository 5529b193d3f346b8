"""Importers: precomp (both layouts), karpathy, urbancross; release quirks; hostile inputs and outputs; the CLI."""

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from PIL import Image

from urbancross.cli import main
from urbancross.config import DataConfig, config_from_dict
from urbancross.data.importers import DatasetError, import_dataset, scene_label, seeded_splits
from urbancross.data.ingest import read_split
from urbancross.data.manifest import ManifestError, decode_image, read_manifest

FIXTURES = Path(__file__).parent / "fixtures"
PNG_MAGIC = b"\x89PNG"
JPEG_MAGIC = b"\xff\xd8"


def image_bytes(fmt="PNG", color=(10, 20, 30), size=(6, 4)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def precomp_root(tmp_path, layout, name="RSDATA"):
    """A copy of a real-sample fixture with one tiny image per listed file name."""
    root = tmp_path / name
    shutil.copytree(FIXTURES / layout, root)
    (root / "images").mkdir()
    for listing in root.glob("*_filename.txt"):
        for i, fname in enumerate(dict.fromkeys(listing.read_text().split())):
            fmt = "TIFF" if fname.endswith(".tif") else "JPEG"
            (root / "images" / fname).write_bytes(image_bytes(fmt, color=(40 * i, 0, 0)))
    return root


def by_id(out):
    return {r["image_id"]: r for r in read_manifest(out).to_pylist()}


# --------------------------------------------------------------------------- precomp


def test_precomp_per_caption_layout(tmp_path):
    root = precomp_root(tmp_path, "precomp-per-caption")
    report = import_dataset("precomp", str(root), str(tmp_path / "m"))
    assert report["images"] == 3 and report["captions"] == 15 and report["skipped"] == []
    assert report["per_split_domain"] == {"test/RSDATA": {"images": 3, "captions": 15}}
    rows = by_id(tmp_path / "m")
    assert list(rows) == ["RSDATA/boat_0.tif", "RSDATA/playground_1.tif", "RSDATA/airport_2.tif"]
    caps = (root / "test_caps.txt").read_text().splitlines()
    assert rows["RSDATA/playground_1.tif"]["captions"] == caps[5:10]
    assert rows["RSDATA/boat_0.tif"]["source"].endswith("test_filename.txt:1")
    assert rows["RSDATA/airport_2.tif"]["source"].endswith("test_filename.txt:11")
    # TIFF is re-encoded as PNG, pixels unchanged
    img = rows["RSDATA/playground_1.tif"]["image"]
    assert img.startswith(PNG_MAGIC) and decode_image(img).getpixel((0, 0)) == (40, 0, 0)


def test_precomp_per_image_layout_keeps_duplicate_captions(tmp_path):
    root = precomp_root(tmp_path, "precomp-per-image")
    import_dataset("precomp", str(root), str(tmp_path / "m"), domain="RSICD")
    rows = by_id(tmp_path / "m")
    assert list(rows) == ["RSICD/airport_1.jpg", "RSICD/airport_10.jpg", "RSICD/airport_100.jpg"]
    dup = rows["RSICD/airport_1.jpg"]["captions"]
    assert dup == ["many planes are parked next to a long building in an airport ."] * 5
    assert rows["RSICD/airport_10.jpg"]["captions"][1] == "the airport here is full of airplanes and containers ."
    assert rows["RSICD/airport_100.jpg"]["source"].endswith("train_filename.txt:3")
    # JPEG bytes are stored as they are
    assert rows["RSICD/airport_10.jpg"]["image"] == (root / "images" / "airport_10.jpg").read_bytes()
    assert {r["split"] for r in rows.values()} == {"train"}


def test_precomp_line_counts_that_fit_no_layout(tmp_path):
    root = precomp_root(tmp_path, "precomp-per-image")
    caps = root / "train_caps.txt"
    caps.write_text("\n".join(caps.read_text().splitlines()[:14]) + "\n")
    with pytest.raises(DatasetError) as e:
        import_dataset("precomp", str(root), str(tmp_path / "m"))
    msg = str(e.value)
    assert "train_caps.txt has 14 lines" in msg and "train_filename.txt has 3" in msg


def test_precomp_caption_run_of_four_is_kept_and_reported_strict_fails(tmp_path):
    root = precomp_root(tmp_path, "precomp-per-caption")
    for name in ("test_caps.txt", "test_filename.txt"):  # drop line 7: playground_1 keeps 4 captions
        lines = (root / name).read_text().splitlines()
        (root / name).write_text("\n".join(lines[:6] + lines[7:]) + "\n")
    report = import_dataset("precomp", str(root), str(tmp_path / "m"))
    assert report["images"] == 3 and report["captions"] == 14
    count = report["anomalies"]["caption_count"]
    assert count["count"] == 1 and count["action"] == "kept"
    assert re.search(
        r"test_filename\.txt:6: playground_1\.tif has 4 caption lines \(.*test_caps\.txt:6-9\)", count["first"][0]
    )
    assert len(by_id(tmp_path / "m")["RSDATA/playground_1.tif"]["captions"]) == 4
    with pytest.raises(
        DatasetError, match=r"test_filename\.txt:6: caption count: playground_1\.tif has 4 caption lines .*--strict"
    ):
        import_dataset("precomp", str(root), str(tmp_path / "m2"), strict=True)
    assert not (tmp_path / "m2").exists()


def test_precomp_missing_image_names_file_and_line(tmp_path):
    root = precomp_root(tmp_path, "precomp-per-image")
    (root / "images" / "airport_10.jpg").unlink()
    with pytest.raises(ManifestError, match=r"train_filename\.txt:2: image not found: .*airport_10\.jpg"):
        import_dataset("precomp", str(root), str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()


def test_precomp_corrupt_image_names_file_and_line(tmp_path):
    root = precomp_root(tmp_path, "precomp-per-image")
    (root / "images" / "airport_100.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DatasetError, match=r"train_filename\.txt:3: .*airport_100\.jpg: unreadable image"):
        import_dataset("precomp", str(root), str(tmp_path / "m"))


def test_skip_bad_reports_every_skipped_row(tmp_path):
    root = precomp_root(tmp_path, "precomp-per-image")
    (root / "images" / "airport_10.jpg").unlink()
    (root / "images" / "airport_100.jpg").write_bytes(b"garbage")
    report = import_dataset("precomp", str(root), str(tmp_path / "m"), skip_bad=True)
    assert report["images"] == 1 and report["captions"] == 5 and report["num_skipped"] == 2
    sources = [
        Path(s["source"].rsplit(":", 1)[0]).name + ":" + s["source"].rsplit(":", 1)[1] for s in report["skipped"]
    ]
    assert sources == ["train_filename.txt:2", "train_filename.txt:3"]
    assert "image not found" in report["skipped"][0]["reason"]
    assert "unreadable image" in report["skipped"][1]["reason"]
    assert list(by_id(tmp_path / "m")) == ["RSDATA/airport_1.jpg"]


def test_import_with_no_rows_left_is_an_error(tmp_path):
    root = precomp_root(tmp_path, "precomp-per-image")
    for image in (root / "images").iterdir():
        image.unlink()
    with pytest.raises(DatasetError, match=r"no rows imported \(3 skipped: .*train_filename\.txt:1: image not found"):
        import_dataset("precomp", str(root), str(tmp_path / "m"), skip_bad=True)


def test_missing_images_folder_fails_even_with_skip_bad(tmp_path):
    root = precomp_root(tmp_path, "precomp-per-image")
    with pytest.raises(DatasetError, match=r"elsewhere: no such images folder"):
        import_dataset("precomp", str(root), str(tmp_path / "m"), images=str(tmp_path / "elsewhere"), skip_bad=True)


def test_image_listed_in_two_splits_is_kept_in_test_with_all_captions(tmp_path):
    root = precomp_root(tmp_path, "precomp-per-image")
    shutil.copy(root / "train_caps.txt", root / "test_caps.txt")
    (root / "test_filename.txt").write_text("airport_1.jpg\nother.jpg\nx.jpg\n")
    for name in ("other.jpg", "x.jpg"):
        (root / "images" / name).write_bytes(image_bytes("JPEG"))
    report = import_dataset("precomp", str(root), str(tmp_path / "m"))
    assert report["per_split"] == {"test": {"images": 3, "captions": 20}, "train": {"images": 2, "captions": 10}}
    several = report["anomalies"]["in_several_splits"]
    assert several["count"] == 1 and several["action"] == "repaired"
    assert re.search(
        r"train_filename\.txt:1: airport_1\.jpg listed in train at .*train_filename\.txt:1, test at .*test_filename\.txt:1; kept in test",
        several["first"][0],
    )
    row = by_id(tmp_path / "m")["RSDATA/airport_1.jpg"]
    assert row["split"] == "test" and len(row["captions"]) == 10  # both listings' captions
    with pytest.raises(DatasetError, match="in several splits"):
        import_dataset("precomp", str(root), str(tmp_path / "m2"), strict=True)


# --------------------------------------------------------------------------- karpathy


def karpathy_root(tmp_path):
    root = tmp_path / "RSICD"
    (root / "images" / "val2014").mkdir(parents=True)
    entries = []
    for i, (name, split, folder) in enumerate(
        [("a.jpg", "train", None), ("b.jpg", "restval", "val2014"), ("c.png", "val", None), ("d.jpg", "test", None)]
    ):
        sub = root / "images" / folder if folder else root / "images"
        (sub / name).write_bytes(image_bytes("PNG" if name.endswith("png") else "JPEG"))
        sentences = [{"raw": f"{name} one", "tokens": []}, {"raw": f"{name} two"}]
        entry = {"filename": name, "imgid": i, "split": split, "sentences": sentences}
        if folder:
            entry["filepath"] = folder
        entries.append(entry)
    (root / "dataset_rsicd.json").write_text(json.dumps({"images": entries, "dataset": "rsicd"}))
    return root


def test_karpathy_reads_splits_captions_and_filepath(tmp_path):
    root = karpathy_root(tmp_path)
    report = import_dataset("karpathy", str(root), str(tmp_path / "m"))
    assert report["per_split"] == {
        "test": {"images": 1, "captions": 2},
        "train": {"images": 2, "captions": 4},
        "val": {"images": 1, "captions": 2},
    }
    rows = by_id(tmp_path / "m")
    assert rows["RSICD/val2014/b.jpg"]["split"] == "train"  # restval counts as train
    assert rows["RSICD/c.png"]["captions"] == ["c.png one", "c.png two"]
    assert rows["RSICD/d.jpg"]["source"].endswith("dataset_rsicd.json:images[3]")


def test_karpathy_root_may_name_the_json_and_missing_key_names_index(tmp_path):
    root = karpathy_root(tmp_path)
    path = root / "dataset_rsicd.json"
    data = json.loads(path.read_text())
    del data["images"][1]["sentences"]
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"dataset_rsicd\.json:images\[1\]: missing key\(s\) \['sentences'\]"):
        import_dataset("karpathy", str(path), str(tmp_path / "m"))
    report = import_dataset("karpathy", str(path), str(tmp_path / "m"), skip_bad=True, domain="X")
    assert report["images"] == 3 and report["per_domain"] == {"X": {"images": 3, "captions": 6}}
    assert report["skipped"][0]["source"].endswith("images[1]")


def test_karpathy_invalid_json_names_line(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "dataset_x.json").write_text('{"images": [\n{"filename": }\n]}')
    with pytest.raises(DatasetError, match=r"dataset_x\.json:2: not valid JSON"):
        import_dataset("karpathy", str(tmp_path / "r"), str(tmp_path / "m"))


# --------------------------------------------------------------------------- urbancross


def write_zip(path, files):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def urbancross_root(tmp_path):
    """Finland: 5 images (b has two caption rows), segments for a (12), b (3), none for the rest.
    Spain: 2 images, capitalised CSV name, no segments archive."""
    root = tmp_path / "UrbanCross-Dataset"
    fin, spa = root / "Finland", root / "Spain"
    fin.mkdir(parents=True)
    spa.mkdir()
    names = ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"]
    write_zip(fin / "images.zip", {f"images/{n}": image_bytes("JPEG", size=(8, 8)) for n in names})
    segs = {f"image_segments/a/a_{k}.png": image_bytes("PNG", color=(10 * k, 0, 0), size=(8, 8)) for k in range(12)}
    segs.update({f"image_segments/b/b_{k}.jpg": image_bytes("JPEG", size=(5, 5)) for k in (7, 20, 3)})
    segs["image_segments/b/b.jpg"] = image_bytes("JPEG")  # not a segment name: ignored
    write_zip(fin / "image_segments.zip", segs)
    write_csv(
        fin / "instructblip_generation_finland_refine.csv",
        ["image_name", "description"],
        [
            ["a.jpg", "a road, with trees"],
            ["b.jpg", "b first"],
            ["c.jpg", "c"],
            ["b.jpg", "b second"],
            ["d.jpg", "d"],
            ["e.jpg", "e"],
        ],
    )
    write_zip(spa / "images.zip", {n: image_bytes("PNG") for n in ("s1.png", "s2.png")})
    write_csv(
        spa / "instructblip_generation_Spain_refine.csv",
        ["image_name", "description"],
        [["s1.png", "x"], ["s2.png", "y"]],
    )
    return root


def test_urbancross_release_layout(tmp_path):
    root = urbancross_root(tmp_path)
    report = import_dataset("urbancross", str(root), str(tmp_path / "m"))
    assert report["per_domain"] == {"Finland": {"images": 5, "captions": 6}, "Spain": {"images": 2, "captions": 2}}
    # seeded 70/10/20 split: round(0.2 * 5) = 1 test image (c.jpg for seed 0), round(0.5) = 0 val; 0 and 0 for Spain
    assert report["per_split_domain"]["test/Finland"] == {"images": 1, "captions": 1}
    assert report["per_split_domain"]["train/Spain"] == {"images": 2, "captions": 2}
    rows = by_id(tmp_path / "m")
    assert rows["Finland/c.jpg"]["split"] == "test"
    assert rows["Finland/b.jpg"]["captions"] == ["b first", "b second"]
    assert rows["Finland/a.jpg"]["captions"] == ["a road, with trees"]
    assert rows["Finland/a.jpg"]["source"].endswith("instructblip_generation_finland_refine.csv:2")
    a = rows["Finland/a.jpg"]
    assert a["num_real_segments"] == 10 and len(a["segments"]) == 10
    # numeric k order (not 0, 1, 10, 11, 2, ...), the first ten kept
    assert [decode_image(s).getpixel((0, 0))[0] for s in a["segments"]] == [10 * k for k in range(10)]
    b = rows["Finland/b.jpg"]
    assert b["num_real_segments"] == 3 and len(b["segments"]) == 10
    assert decode_image(b["segments"][3]).getpixel((0, 0)) == (255, 255, 255)  # white padding...
    assert decode_image(b["segments"][3]).size == (5, 5)  # ...of the segments' size
    assert rows["Finland/d.jpg"]["num_real_segments"] == 0
    assert rows["Spain/s1.png"]["segments"] is None and rows["Spain/s1.png"]["refined_captions"] is None
    assert ds.dataset(str(tmp_path / "m"), format="parquet").count_rows() == 7


def test_seeded_split_is_disjoint_and_order_free():
    names = [f"{i}.jpg" for i in range(20)]
    split_of = seeded_splits(names, DataConfig())  # 70/10/20 by default
    by = {s: {n for n, v in split_of.items() if v == s} for s in ("train", "val", "test")}
    assert [len(by[s]) for s in ("train", "val", "test")] == [14, 2, 4] and set(split_of) == set(names)
    assert split_of == seeded_splits(list(reversed(names)), DataConfig())
    other = seeded_splits(names, DataConfig(split_seed=1))
    assert other != split_of and sorted(other.values()) == sorted(split_of.values())


def test_urbancross_optional_columns_and_domain_selects_country(tmp_path):
    root = urbancross_root(tmp_path)
    write_csv(
        root / "Spain" / "instructblip_generation_Spain_refine.csv",
        ["image_name", "original_description", "description", "split", "lat", "lon", "geo_tags"],
        [
            ["s1.png", "orig", "refined", "val", "40.4", "-3.7", '["amenity=park", "highway=primary"]'],
            ["s2.png", "o2", "r2", "test", "", "", "a=b; c=d"],
        ],
    )
    report = import_dataset("urbancross", str(root), str(tmp_path / "m"), domain="Spain")
    assert report["per_split_domain"] == {
        "test/Spain": {"images": 1, "captions": 1},
        "val/Spain": {"images": 1, "captions": 1},
    }
    rows = by_id(tmp_path / "m")
    s1, s2 = rows["Spain/s1.png"], rows["Spain/s2.png"]
    assert (s1["captions"], s1["refined_captions"]) == (["orig"], ["refined"])
    assert (s1["lat"], s1["lon"], s1["geo_tags"]) == (40.4, -3.7, ["amenity=park", "highway=primary"])
    assert (s2["lat"], s2["geo_tags"]) == (None, ["a=b", "c=d"])


def test_urbancross_wrong_header_names_file_column_and_columns_found(tmp_path):
    root = urbancross_root(tmp_path)
    write_csv(root / "Spain" / "instructblip_generation_Spain_refine.csv", ["image", "description"], [["s1.png", "x"]])
    with pytest.raises(DatasetError) as e:
        import_dataset("urbancross", str(root), str(tmp_path / "m"))
    msg = str(e.value)
    assert "instructblip_generation_Spain_refine.csv:1: missing column(s) ['image_name']" in msg
    assert "columns found: ['image', 'description']" in msg


def test_urbancross_bad_rows_name_csv_lines(tmp_path):
    root = urbancross_root(tmp_path)
    csv_path = root / "Spain" / "instructblip_generation_Spain_refine.csv"
    csv_path.write_text('image_name,description\ns1.png,"two\nlines"\nmissing.png,z\ns2.png\n')
    with pytest.raises(DatasetError, match=r"Spain_refine\.csv:4: image missing\.png not found in .*images\.zip"):
        import_dataset("urbancross", str(root), str(tmp_path / "m"), domain="Spain")
    report = import_dataset("urbancross", str(root), str(tmp_path / "m"), domain="Spain", skip_bad=True)
    reasons = {s["source"].rsplit(":", 1)[1]: s["reason"] for s in report["skipped"]}
    assert reasons["5"] == "1 fields, the header has 2"
    assert reasons["4"].startswith("image missing.png not found")
    assert by_id(tmp_path / "m")["Spain/s1.png"]["captions"] == ["two\nlines"]


def test_urbancross_corrupt_segment_names_zip_member(tmp_path):
    root = urbancross_root(tmp_path)
    write_zip(root / "Finland" / "image_segments.zip", {"image_segments/e/e_0.jpg": b"broken"})
    with pytest.raises(
        DatasetError, match=r"finland_refine\.csv:7: .*image_segments\.zip:image_segments/e/e_0\.jpg: unreadable image"
    ):
        import_dataset("urbancross", str(root), str(tmp_path / "m"), domain="Finland")


# --------------------------------------------------------------------------- CLI


def test_cli_import_end_to_end(tmp_path, capsys):
    root = precomp_root(tmp_path, "precomp-per-caption")
    shutil.copytree(FIXTURES / "precomp-per-image", root, dirs_exist_ok=True)
    for i, name in enumerate(["airport_1.jpg", "airport_10.jpg", "airport_100.jpg"]):
        (root / "images" / name).write_bytes(image_bytes("JPEG", color=(i, i, i)))
    out = tmp_path / "manifest"
    argv = ["data", "import", "--format", "precomp", "--root", str(root), "--out", str(out), "--domain", "RS"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["per_split_domain"] == {  # no val split: round(0.1 * 6) = 1 train image carved out
        "test/RS": {"images": 3, "captions": 15},
        "train/RS": {"images": 2, "captions": 10},
        "val/RS": {"images": 1, "captions": 5},
    }
    assert report["out"] == str(out.resolve()) and report["skipped"] == []
    assert ds.dataset(str(out), format="parquet").count_rows() == 6


def test_cli_import_error_exits_1_with_message(tmp_path, capsys):
    root = precomp_root(tmp_path, "precomp-per-image")
    (root / "images" / "airport_1.jpg").unlink()
    argv = ["data", "import", "--format", "precomp", "--root", str(root), "--out", str(tmp_path / "m")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "train_filename.txt:1: image not found" in err


# --------------------------------------------------------------------------- real releases' quirks


def stand_in_images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        fmt = "TIFF" if name.lower().endswith((".tif", ".tiff")) else "PNG" if name.lower().endswith(".png") else "JPEG"
        (folder / name).write_bytes(image_bytes(fmt, color=(i % 256, 0, 0)))


def test_rsitmd_layout_with_blank_caption_lines_imports_without_skip_bad(tmp_path):
    """RSITMD's train list has images whose five caption lines are blank: the old importer failed
    the whole import ("empty caption") unless --skip-bad, which then dropped the image."""
    root = tmp_path / "rsitmd"
    shutil.copytree(FIXTURES / "rsitmd-like", root)
    stand_in_images(
        root / "images",
        [
            "baseballfield_452.tif",
            "boat_459.tif",
            "plane_12.tif",
            "storagetanks_4740.tif",
            "boat_0.tif",
            "intersection_5.tif",
        ],
    )
    report = import_dataset("precomp", str(root), str(tmp_path / "m"))
    assert report["images"] == 6 and report["num_skipped"] == 0
    assert report["per_split"] == {  # no val split: one captioned train image carved out as val
        "test": {"images": 2, "captions": 10},
        "train": {"images": 3, "captions": 10},
        "val": {"images": 1, "captions": 5},
    }
    a = report["anomalies"]
    assert {k: v["count"] for k, v in a.items()} == {
        "blank_caption": 5,
        "no_captions": 1,
        "whitespace": 2,
        "duplicate_caption": 1,
    }
    assert [w.rsplit("/", 1)[1] for w in a["blank_caption"]["first"]] == [f"train_caps.txt:{n}" for n in range(11, 16)]
    assert a["no_captions"]["first"][0].split("/")[-1].startswith("train_filename.txt:3: image kept without captions")
    assert a["whitespace"]["action"] == "repaired" and a["blank_caption"]["action"] == "dropped"
    rows = by_id(tmp_path / "m")
    assert rows["rsitmd/plane_12.tif"]["captions"] == [] and rows["rsitmd/plane_12.tif"]["split"] == "train"
    assert rows["rsitmd/baseballfield_452.tif"]["captions"][2] == "a baseball field is surrounded by trees and roads ."
    assert (
        rows["rsitmd/boat_459.tif"]["captions"].count("a boat sails on the dark blue water .") == 2
    )  # kept, as the benchmarks count
    assert {r["label"] for r in rows.values()} == {"baseballfield", "boat", "plane", "storagetanks", "intersection"}
    with pytest.raises(
        DatasetError, match=r"train_caps\.txt:3: whitespace \(--strict makes release anomalies errors\)"
    ):
        import_dataset("precomp", str(root), str(tmp_path / "m2"), strict=True)
    # the captionless image stays in the manifest, but training and evaluation never see it
    cfg = config_from_dict({"data": {"manifest": str(tmp_path / "m")}})
    train, val = (read_split(cfg, split).column("image_id").to_pylist() for split in ("train", "val"))
    assert sorted(train) == ["rsitmd/boat_459.tif", "rsitmd/storagetanks_4740.tif"]
    assert val == ["rsitmd/baseballfield_452.tif"]


def test_ucm_layout_crlf_numeric_names_and_named_images_folder(tmp_path):
    root = tmp_path / "ucm_precomp"
    shutil.copytree(FIXTURES / "ucm-like", root)
    assert b"\r\n" in (root / "train_caps.txt").read_bytes()
    stand_in_images(root / "ucm_images", ["1432.tif", "661.tif", "890.tif", "81.tif"])
    report = import_dataset("precomp", str(root), str(tmp_path / "m"), domain="UCM")
    assert report["anomalies"] == {} and report["num_skipped"] == 0
    assert report["per_split"] == {
        s: {"images": n, "captions": 5 * n} for s, n in (("test", 1), ("train", 2), ("val", 1))
    }
    rows = by_id(tmp_path / "m")
    assert rows["UCM/890.tif"]["captions"][0] == "Two airplanes are stopped at the airport ."  # no \r left
    assert {r["label"] for r in rows.values()} == {None}  # numbers only: no scene class


@pytest.mark.parametrize(
    "name, label",
    [
        ("mountain_2376.tif", "mountain"),
        ("00001.jpg", None),
        ("1.tif", None),
        ("denseresidential_12.jpg", "denseresidential"),
        ("Storage_Tanks_3.png", "storage_tanks"),
        ("sub/airport_7.jpg", "airport"),
        ("airport.jpg", None),
    ],
)
def test_scene_label_from_file_name(name, label):
    assert scene_label(name) == label


def listed_release(root, files, names):
    """A precomp train split listing `names` (one line per image, 5 captions each) over image `files`."""
    stand_in_images(root / "images", files)
    (root / "train_filename.txt").write_text("".join(n + "\n" for n in names))
    (root / "train_caps.txt").write_text("".join(f"caption {i} .\n" for i in range(5 * len(names))))
    return root


def test_case_and_extension_mismatches_are_resolved_and_reported(tmp_path):
    files = ["airport_1.jpg", "Beach_2.JPG", "river_3.tif", "pond_4.png", "pond_4.jpg"]
    root = listed_release(tmp_path / "RS", files, ["Airport_1.jpg", "beach_2.jpg", "river_3.tiff", "pond_4.tif"])
    with pytest.raises(
        DatasetError,
        match=r"train_filename\.txt:4: image 'pond_4\.tif' is ambiguous .*\['pond_4\.jpg', 'pond_4\.png'\]",
    ):
        import_dataset("precomp", str(root), str(tmp_path / "m"))
    report = import_dataset("precomp", str(root), str(tmp_path / "m"), skip_bad=True)
    assert sorted(by_id(tmp_path / "m")) == ["RS/Beach_2.JPG", "RS/airport_1.jpg", "RS/river_3.tif"]
    resolved = report["anomalies"]["name_resolved"]
    assert resolved["count"] == 3 and resolved["first"][0].endswith(
        "train_filename.txt:1: 'Airport_1.jpg' is 'airport_1.jpg'"
    )
    assert report["num_skipped"] == 1


def test_blank_file_name_not_utf8_bom_and_trailing_blank_lines(tmp_path):
    root = tmp_path / "RS"
    root.mkdir()
    stand_in_images(root / "images", ["a_1.jpg", "b_2.jpg"])
    (root / "test_filename.txt").write_bytes(
        b"\xef\xbb\xbfa_1.jpg\n\nb_2.jpg\n\n\n"
    )  # BOM; a blank name; 2 trailing blanks
    caps = [b"a one", b"a two \xff bad byte", b"a three", b"a four", b"a five"] + [b"orphan %d" % i for i in range(5)]
    caps += [b"b %d" % i for i in range(5)]
    (root / "test_caps.txt").write_bytes(b"\n".join(caps) + b"\n")
    report = import_dataset("precomp", str(root), str(tmp_path / "m"))
    a = report["anomalies"]
    assert {k: v["count"] for k, v in a.items()} == {"blank_file_name": 5, "not_utf8": 1, "trailing_blank_lines": 2}
    assert a["not_utf8"]["first"][0].split("/")[-1].startswith("test_caps.txt:2:")
    rows = by_id(tmp_path / "m")
    assert sorted(rows) == ["RS/a_1.jpg", "RS/b_2.jpg"]  # the BOM is not part of the name
    assert rows["RS/a_1.jpg"]["captions"][1] == "a two \ufffd bad byte"
    assert rows["RS/b_2.jpg"]["captions"] == [f"b {i}" for i in range(5)]


def test_over_long_caption_is_capped_and_reported(tmp_path):
    root = tmp_path / "RS"
    root.mkdir()
    stand_in_images(root / "images", ["a_1.jpg"])
    (root / "train_filename.txt").write_text("a_1.jpg\n")
    (root / "train_caps.txt").write_text("x" * 3_000_000 + "\nb\nc\nd\ne\n")
    report = import_dataset("precomp", str(root), str(tmp_path / "m"), cfg=DataConfig(max_caption_chars=100))
    capped = report["anomalies"]["caption_capped"]
    assert capped["count"] == 1 and capped["first"][0].endswith("train_caps.txt:1: cut to 100 characters")
    assert by_id(tmp_path / "m")["RS/a_1.jpg"]["captions"] == ["x" * 100, "b", "c", "d", "e"]


# --------------------------------------------------------------------------- hostile inputs


def test_paths_escaping_the_images_folder_are_bad_rows(tmp_path):
    secret = tmp_path / "host" / "secret.png"
    secret.parent.mkdir()
    secret.write_bytes(image_bytes("PNG", color=(1, 2, 3)))
    names = ["ok_1.jpg", "../../host/secret.png", str(secret), "link_2.png"]
    root = listed_release(tmp_path / "RS", ["ok_1.jpg"], names)
    (root / "images" / "link_2.png").symlink_to(secret)
    with pytest.raises(
        DatasetError,
        match=r"train_filename\.txt:2: file name '\.\./\.\./host/secret\.png' resolves to .*outside the images folder",
    ):
        import_dataset("precomp", str(root), str(tmp_path / "m"))
    report = import_dataset("precomp", str(root), str(tmp_path / "m"), skip_bad=True)
    assert [s["source"].rsplit(":", 1)[1] for s in report["skipped"]] == ["2", "3", "4"]
    assert all("outside the images folder" in s["reason"] for s in report["skipped"])
    assert list(by_id(tmp_path / "m")) == ["RS/ok_1.jpg"]  # the host file was not copied in


def decompression_bomb(size=14_000) -> bytes:
    """A PNG of about 24 KB that decodes to size x size pixels (196 Mpx): one bit a pixel, all zero."""
    buf = io.BytesIO()
    Image.new("1", (size, size)).save(buf, format="PNG")
    return buf.getvalue()


def test_decompression_bombs_are_bad_rows_even_with_skip_bad(tmp_path):
    root = precomp_root(tmp_path, "precomp-per-image")
    bomb = decompression_bomb()  # over twice PIL's own limit: PIL raises its own error type
    assert len(bomb) < 40_000
    (root / "images" / "airport_10.jpg").write_bytes(bomb)
    (root / "images" / "airport_100.jpg").write_bytes(decompression_bomb(9_000))  # 81 Mpx: under PIL's, over ours
    with pytest.raises(
        DatasetError, match=r"train_filename\.txt:2: .*airport_10\.jpg: image over the pixel limit: .*196000000 pixels"
    ):
        import_dataset("precomp", str(root), str(tmp_path / "m"))
    report = import_dataset("precomp", str(root), str(tmp_path / "m"), skip_bad=True)
    assert report["images"] == 1 and [s["source"][-1] for s in report["skipped"]] == ["2", "3"]
    assert report["skipped"][1]["reason"].endswith(
        "airport_100.jpg: image is 9000x9000 (81 Mpx), over the limit of 67.1089 Mpx"
    )


def test_karpathy_wrong_types_and_non_utf8_are_rows_not_tracebacks(tmp_path):
    root = karpathy_root(tmp_path)
    path = root / "dataset_rsicd.json"
    data = json.loads(path.read_text())
    data["images"][0]["filename"] = 5
    data["images"][1]["sentences"] = "not a list"
    data["images"][2]["split"] = ["train"]
    data["images"].append(7)
    raw = (
        json.dumps(data).replace("d.jpg one", "d.jpg \\u00e9one").encode().replace(b"\\u00e9", b"\xe9")
    )  # latin-1 byte
    path.write_bytes(raw)
    with pytest.raises(
        DatasetError, match=r"dataset_rsicd\.json:images\[0\]: filename must be a non-empty string, got 5"
    ):
        import_dataset("karpathy", str(root), str(tmp_path / "m"))
    report = import_dataset("karpathy", str(root), str(tmp_path / "m"), skip_bad=True)
    reasons = [(s["source"].rsplit(":", 1)[1], s["reason"]) for s in report["skipped"]]
    assert [r[0] for r in reasons] == ["images[0]", "images[1]", "images[2]", "images[4]"]
    assert reasons[3][1] == "expected an object, got int"
    assert report["anomalies"]["not_utf8"]["first"][0].split("/")[-1].startswith("dataset_rsicd.json:1: byte 0xe9")
    assert by_id(tmp_path / "m")["RSICD/d.jpg"]["captions"][0] == "d.jpg \ufffdone"
    with pytest.raises(DatasetError, match=r"dataset_rsicd\.json:1: not utf8: byte 0xe9 .*--strict"):
        import_dataset("karpathy", str(root), str(tmp_path / "m2"), strict=True, skip_bad=True)


def test_zip_archives_are_closed_after_the_import(tmp_path, monkeypatch):
    root = urbancross_root(tmp_path)
    opened = []
    real = zipfile.ZipFile

    class Tracked(real):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            opened.append(self)

    monkeypatch.setattr(zipfile, "ZipFile", Tracked)
    import_dataset("urbancross", str(root), str(tmp_path / "m"))
    assert len(opened) == 3 and all(z.fp is None for z in opened)  # images + segments of Finland, images of Spain
    opened.clear()
    (root / "Spain" / "instructblip_generation_Spain_refine.csv").write_text("image_name,description\nnone.png,x\n")
    with pytest.raises(DatasetError):
        import_dataset("urbancross", str(root), str(tmp_path / "m"))
    assert opened and all(z.fp is None for z in opened)  # closed on failure too


def test_urbancross_blank_descriptions_and_conflicting_splits(tmp_path):
    root = urbancross_root(tmp_path)
    write_csv(
        root / "Spain" / "instructblip_generation_Spain_refine.csv",
        ["image_name", "description", "split"],
        [["s1.png", "  x  ", "train"], ["s1.png", "y", "test"], ["s2.png", "", "train"], ["", "orphan", "train"]],
    )
    report = import_dataset("urbancross", str(root), str(tmp_path / "m"), domain="Spain")
    assert {k: v["count"] for k, v in report["anomalies"].items()} == {
        "whitespace": 1,
        "in_several_splits": 1,
        "blank_caption": 1,
        "no_captions": 1,
        "blank_file_name": 1,
    }
    rows = by_id(tmp_path / "m")
    assert (rows["Spain/s1.png"]["split"], rows["Spain/s1.png"]["captions"]) == ("test", ["x", "y"])
    assert rows["Spain/s2.png"]["captions"] == [] and rows["Spain/s1.png"]["label"] is None


# --------------------------------------------------------------------------- outputs: nothing lost


def test_out_equal_to_root_is_refused_and_the_source_survives(tmp_path, capsys):
    root = precomp_root(tmp_path, "precomp-per-image")
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    for out, extra in (
        (root, []),
        (root / "manifest", []),
        (tmp_path, []),
        (root, ["--overwrite"]),
        (root / "images", ["--overwrite"]),
    ):
        argv = ["data", "import", "--format", "precomp", "--root", str(root), "--out", str(out), *extra]
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "never over an input" in err and "Traceback" not in err
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    images = tmp_path / "elsewhere"
    shutil.copytree(root / "images", images)
    with pytest.raises(ManifestError, match="is inside the input"):
        import_dataset("precomp", str(root), str(images / "m"), images=str(images))


def test_non_empty_out_needs_overwrite_a_manifest_of_ours_does_not(tmp_path):
    root = precomp_root(tmp_path, "precomp-per-image")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("my thesis")
    with pytest.raises(
        ManifestError, match=r"out exists and is a non-empty folder that is not a manifest; .*--overwrite"
    ):
        import_dataset("precomp", str(root), str(out))
    assert (out / "notes.txt").read_text() == "my thesis"
    import_dataset("precomp", str(root), str(out), overwrite=True)
    assert read_manifest(out).num_rows == 3 and not (out / "notes.txt").exists()
    import_dataset("precomp", str(root), str(out), domain="again")  # a manifest of ours: replaced
    assert set(read_manifest(out).column("domain").to_pylist()) == {"again"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["RSDATA", "out"]  # nothing left beside it


@pytest.mark.slow
def test_streaming_import_of_20000_images_stays_under_1_gb(tmp_path):
    """Peak RSS of an import in a child process (its own VmHWM) for a 240 MB release."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
    from import_bench import CHILD, make_release

    weight = make_release(str(tmp_path / "release"), 20_000)
    assert weight > 200 * 2**20
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "release"), str(tmp_path / "m")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["images"] == 20_000
    assert result["peak_rss_mb"] < 1024, result
    assert ds.dataset(str(tmp_path / "m"), format="parquet").count_rows() == 20_000
