"""Importers: precomp (both layouts), karpathy, urbancross; bad inputs; --skip-bad; the CLI."""

import csv
import io
import json
import shutil
import zipfile
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from PIL import Image

from urbancross.cli import main
from urbancross.data.importers import DatasetError, import_dataset, seeded_test_set
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


def test_precomp_caption_run_of_four_names_file_and_line(tmp_path):
    root = precomp_root(tmp_path, "precomp-per-caption")
    for name in ("test_caps.txt", "test_filename.txt"):  # drop line 7: playground_1 keeps 4 captions
        lines = (root / name).read_text().splitlines()
        (root / name).write_text("\n".join(lines[:6] + lines[7:]) + "\n")
    with pytest.raises(DatasetError, match=r"test_filename\.txt:6: playground_1\.tif has 4 captions \(.*test_caps\.txt:6-9\)"):
        import_dataset("precomp", str(root), str(tmp_path / "m"))


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
    sources = [Path(s["source"].rsplit(":", 1)[0]).name + ":" + s["source"].rsplit(":", 1)[1] for s in report["skipped"]]
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


def test_image_listed_twice_is_a_bad_row(tmp_path):
    root = precomp_root(tmp_path, "precomp-per-image")
    shutil.copy(root / "train_caps.txt", root / "test_caps.txt")
    (root / "test_filename.txt").write_text("airport_1.jpg\nother.jpg\nx.jpg\n")
    listed_again = r"test_filename\.txt:1: image RSDATA/airport_1\.jpg is listed again \(first at .*train_filename\.txt:1\)"
    with pytest.raises(DatasetError, match=listed_again):
        import_dataset("precomp", str(root), str(tmp_path / "m"))


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
    (tmp_path / "dataset_x.json").write_text('{"images": [\n{"filename": }\n]}')
    with pytest.raises(DatasetError, match=r"dataset_x\.json:2: not valid JSON"):
        import_dataset("karpathy", str(tmp_path), str(tmp_path / "m"))


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
        [["a.jpg", "a road, with trees"], ["b.jpg", "b first"], ["c.jpg", "c"], ["b.jpg", "b second"], ["d.jpg", "d"], ["e.jpg", "e"]],
    )
    write_zip(spa / "images.zip", {n: image_bytes("PNG") for n in ("s1.png", "s2.png")})
    write_csv(spa / "instructblip_generation_Spain_refine.csv", ["image_name", "description"], [["s1.png", "x"], ["s2.png", "y"]])
    return root


def test_urbancross_release_layout(tmp_path):
    root = urbancross_root(tmp_path)
    report = import_dataset("urbancross", str(root), str(tmp_path / "m"))
    assert report["per_domain"] == {"Finland": {"images": 5, "captions": 6}, "Spain": {"images": 2, "captions": 2}}
    # seeded 80/20 split: round(0.2 * 5) = 1 test image (c.jpg for seed 0), round(0.4) = 0 for Spain
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
    names = [f"{i}.jpg" for i in range(10)]
    test = seeded_test_set(names, 0.2, 0)
    assert len(test) == 2 and test == seeded_test_set(list(reversed(names)), 0.2, 0)
    assert test != seeded_test_set(names, 0.2, 1)


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
    assert report["per_split_domain"] == {"test/Spain": {"images": 1, "captions": 1}, "val/Spain": {"images": 1, "captions": 1}}
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
    with pytest.raises(DatasetError, match=r"finland_refine\.csv:7: .*image_segments\.zip:image_segments/e/e_0\.jpg: unreadable image"):
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
    assert report["per_split_domain"] == {"test/RS": {"images": 3, "captions": 15}, "train/RS": {"images": 3, "captions": 15}}
    assert report["out"] == str(out.resolve()) and report["skipped"] == []
    assert ds.dataset(str(out), format="parquet").count_rows() == 6


def test_cli_import_error_exits_1_with_message(tmp_path, capsys):
    root = precomp_root(tmp_path, "precomp-per-image")
    (root / "images" / "airport_1.jpg").unlink()
    argv = ["data", "import", "--format", "precomp", "--root", str(root), "--out", str(tmp_path / "m")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "train_filename.txt:1: image not found" in err
