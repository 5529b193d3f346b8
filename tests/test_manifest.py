
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from PIL import Image

from urbancross.data.manifest import (
    MANIFEST_SCHEMA,
    ManifestError,
    decode_image,
    encode_png,
    filter_rows,
    image_bytes,
    read_manifest,
    summarize,
    to_table,
    write_manifest,
)


def png(color=(10, 20, 30)):
    return encode_png(Image.new("RGB", (4, 4), color))


def rows():
    return [
        {"image_id": "a", "image": png(), "captions": ["x", "y"], "domain": "Finland", "split": "train"},
        {"image_id": "b", "image": png(), "captions": ["z"], "domain": "Spain", "split": "train"},
        {"image_id": "c", "image_path": "imgs/c.png", "captions": ["u", "v", "w"], "domain": "Spain", "split": "test"},
    ]


def test_roundtrip_and_summary(tmp_path):
    out = tmp_path / "m"
    write_manifest(to_table(rows()), out)
    table = read_manifest(out)
    assert table.schema.equals(MANIFEST_SCHEMA)
    assert ds.dataset(out, format="parquet").count_rows() == 3
    s = summarize(table)
    assert s["images"] == 3 and s["captions"] == 6
    assert s["per_split"] == {"test": {"images": 1, "captions": 3}, "train": {"images": 2, "captions": 3}}
    assert s["per_domain"]["Spain"] == {"images": 2, "captions": 4}
    assert s["per_split_domain"]["train/Finland"] == {"images": 1, "captions": 2}


def test_rewrite_replaces_atomically(tmp_path):
    out = tmp_path / "m"
    write_manifest(to_table(rows()), out)
    write_manifest(to_table(rows()[:1]), out)
    assert read_manifest(out).num_rows == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp folders left behind


def test_missing_required_column_is_named(tmp_path):
    out = tmp_path / "bad"
    out.mkdir()
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image_id": ["a"], "image": [b"x"], "domain": ["d"], "split": ["train"]}), out / "p.parquet")
    with pytest.raises(ManifestError, match=r"missing required column\(s\) \['captions'\]"):
        read_manifest(out)


def test_row_errors_name_the_row():
    bad = rows()
    del bad[1]["domain"]
    with pytest.raises(ManifestError, match="row 1 .*missing domain"):
        to_table(bad)
    with pytest.raises(ManifestError, match="unknown columns"):
        to_table([{**rows()[0], "colour": 1}])


def test_filter_rows_and_empty_split(tmp_path):
    table = to_table(rows())
    assert filter_rows(table, split="train", domain="Spain").column("image_id").to_pylist() == ["b"]
    with pytest.raises(ManifestError, match="split='val'"):
        filter_rows(table, split="val")


def test_image_bytes_from_path_and_corrupt(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (3, 2), (1, 2, 3)).save(tmp_path / "imgs" / "c.png")
    data = image_bytes(rows()[2], tmp_path)
    img = decode_image(data)
    assert img.size == (3, 2) and img.getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(ManifestError, match="c: cannot read image"):
        image_bytes(rows()[2], tmp_path / "elsewhere")
    with pytest.raises(ManifestError, match="tile7: unreadable image"):
        decode_image(b"not a png", "tile7")


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="no such manifest"):
        read_manifest(tmp_path / "none")
