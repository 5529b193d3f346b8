import os
import socket
import subprocess

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image

from urbancross.data import manifest as M
from urbancross.data.manifest import (
    MANIFEST_SCHEMA,
    ManifestError,
    ManifestWriter,
    check_output,
    decode_image,
    encode_png,
    filter_rows,
    image_bytes,
    is_manifest,
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

    pq.write_table(
        pa.table({"image_id": ["a"], "image": [b"x"], "domain": ["d"], "split": ["train"]}), out / "p.parquet"
    )
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


# --------------------------------------------------------------------------- nothing lost on failure


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_failure_while_writing_parts_keeps_the_old_manifest_and_no_temp(tmp_path, monkeypatch):
    out = tmp_path / "m"
    write_manifest(to_table(rows()), out)
    calls = []

    def boom(self, table, *a, **kw):
        calls.append(1)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", boom)
    with pytest.raises(OSError, match="No space left"):
        write_manifest(to_table(rows()[:1]), out)
    assert calls and read_manifest(out).num_rows == 3 and leftovers(tmp_path) == []


@pytest.mark.parametrize("step", ["exchange", "first_rename", "second_rename"])
def test_failure_at_each_swap_step_leaves_old_or_new_never_neither(tmp_path, monkeypatch, step):
    out = tmp_path / "m"
    write_manifest(to_table(rows()), out)
    real_rename = os.rename
    if step == "exchange":
        monkeypatch.setattr(M, "_exchange", lambda a, b: (_ for _ in ()).throw(OSError(5, "I/O error")))
    else:  # the fallback path: no atomic exchange on this file system
        monkeypatch.setattr(M, "_exchange", lambda a, b: False)
        fail_at = {"first_rename": 1, "second_rename": 2}[step]
        count = []

        def rename(a, b):
            count.append(1)
            if len(count) == fail_at:
                raise OSError(5, "I/O error")
            return real_rename(a, b)

        monkeypatch.setattr(M.os, "rename", rename)
    with pytest.raises(OSError, match="I/O error"):
        write_manifest(to_table(rows()[:1]), out)
    monkeypatch.undo()
    assert read_manifest(out).num_rows == 3  # the old one, whole
    assert leftovers(tmp_path) == []


def test_a_crash_between_the_fallback_renames_is_repaired_by_the_next_reader(tmp_path):
    out = tmp_path / "m"
    write_manifest(to_table(rows()), out)
    os.rename(out, tmp_path / ".m.old-1234abcd")  # killed right after the first rename
    assert read_manifest(out).num_rows == 3 and leftovers(tmp_path) == []


def test_atomic_exchange_replaces_in_one_step(tmp_path, monkeypatch):
    out = tmp_path / "m"
    write_manifest(to_table(rows()), out)
    seen = []
    real = M._exchange

    def spy(a, b):
        ok = real(a, b)
        seen.append((ok, read_manifest(b).num_rows))  # right after the swap: the new manifest is in place
        return ok

    monkeypatch.setattr(M, "_exchange", spy)
    write_manifest(to_table(rows()[:2]), out)
    assert seen == [(True, 2)] and read_manifest(out).num_rows == 2 and leftovers(tmp_path) == []


def test_staging_folders_of_killed_writers_are_swept(tmp_path):
    out = tmp_path / "m"
    proc = subprocess.Popen(["true"])  # a writer that has exited
    proc.wait()
    stale = tmp_path / f".m.tmp-{socket.gethostname()}-{proc.pid}-deadbeef"
    stale.mkdir()
    (stale / "part-0.parquet").write_bytes(b"half")
    alive = tmp_path / f".m.tmp-{socket.gethostname()}-{os.getpid()}-cafecafe"
    alive.mkdir()
    write_manifest(to_table(rows()), out)
    assert not stale.exists() and alive.exists()  # ours (alive) is left alone


def test_check_output_refuses_overlaps_and_foreign_folders(tmp_path):
    src = tmp_path / "data"
    (src / "images").mkdir(parents=True)
    for out in (src, src / "images", src / "new", tmp_path):
        with pytest.raises(ManifestError, match="never over an input"):
            check_output(out, [src], overwrite=True)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(ManifestError, match="not a manifest"):
        check_output(tmp_path / "notes", [src])
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ManifestError, match="is a file"):
        check_output(tmp_path / "f.txt", [src])
    check_output(tmp_path / "notes", [src], overwrite=True)
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", [src])
    write_manifest(to_table(rows()), tmp_path / "ours")
    check_output(tmp_path / "ours", [src])
    assert is_manifest(tmp_path / "ours") and not is_manifest(tmp_path / "notes")


def test_streamed_writes_split_into_files_and_label_column(tmp_path):
    out = tmp_path / "m"
    many = [{**rows()[0], "image_id": f"x{i}", "label": "beach" if i % 2 else None} for i in range(7)]
    with ManifestWriter(out, max_rows_per_file=3) as w:
        for i in range(0, 7, 2):
            w.write(to_table(many[i : i + 2]))
        w.commit()
    assert sorted(p.name for p in out.iterdir()) == ["part-0.parquet", "part-1.parquet", "part-2.parquet"]
    table = read_manifest(out)
    assert table.column("image_id").to_pylist() == [f"x{i}" for i in range(7)]
    assert table.column("label").to_pylist() == [None, "beach"] * 3 + [None]
    with ManifestWriter(tmp_path / "n") as w:
        w.write(to_table(rows()))  # never committed: nothing appears
    assert not (tmp_path / "n").exists() and leftovers(tmp_path) == []


def test_decode_image_limits_pixels_before_decoding():
    big = encode_png(Image.new("RGB", (300, 200)))
    assert decode_image(big, "t", max_pixels=60_000).size == (300, 200)
    with pytest.raises(ManifestError, match=r"t: image is 300x200 \(0 Mpx\), over the limit of 0\.05 Mpx"):
        decode_image(big, "t", max_pixels=50_000)
