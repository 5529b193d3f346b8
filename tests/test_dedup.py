"""`urbancross data dedup`: known duplicates (resized, re-encoded, shifted, exact) are found,
distinct tiles are not; --drop-from writes a cleaned copy, never in place; loop and Ray agree."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from urbancross.cli import main
from urbancross.config import DedupConfig, SynthConfig
from urbancross.data import synth as S
from urbancross.data.dedup import close_pairs, rows_to_drop, run_dedup
from urbancross.data.manifest import ManifestError, read_manifest, to_table, write_manifest

SIZE = 256


def tiles(n=12):
    """`n` distinct benchmark scenes (no near-duplicate pairs) as PIL images."""
    cfg = SynthConfig(
        domains=["Finland", "Spain"], images_per_domain=n // 2, image_size=SIZE, near_duplicate_fraction=0.0
    )
    return [Image.open(io.BytesIO(r["image"])).convert("RGB") for d in cfg.domains for r in S.domain_rows(cfg, d)]


def png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def jpeg(img, quality=60):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def shifted(img, pixels=3):  # about 1% of the tile
    return Image.fromarray(np.roll(np.asarray(img), pixels, axis=1))


def row(image_id, data, split):
    return {"image_id": image_id, "image": data, "captions": ["c"], "domain": "d", "split": split}


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    """one: A-F train, G-H test, D2 (= D, same bytes) train, E2 (E at 224 px) test.
    two: A (resized to 224), B (shifted), C (same bytes) in test, G (JPEG) in train, I-L distinct."""
    t = tiles()
    root = tmp_path_factory.mktemp("dedup")
    one = [row(k, png(t[i]), "train") for i, k in enumerate("ABCDEF")]
    one += [row("G", png(t[6]), "test"), row("H", png(t[7]), "test")]
    one += [row("D2", png(t[3]), "train"), row("E2", png(t[4].resize((224, 224))), "test")]
    two = [
        row("A'", png(t[0].resize((224, 224))), "test"),
        row("B'", png(shifted(t[1])), "test"),
        row("C'", png(t[2]), "test"),
    ]
    two += [row("G'", jpeg(t[6]), "train")] + [row(f"{k}'", png(t[8 + i]), "test") for i, k in enumerate("IJKL")]
    paths = []
    for name, rows in (("one", one), ("two", two)):
        write_manifest(to_table(rows), root / name)
        paths.append(str(root / name))
    return root, paths


EXPECTED = {("A", "A'"), ("B", "B'"), ("C", "C'"), ("G", "G'"), ("D", "D2"), ("E", "E2")}


def found_pairs(report):
    return {tuple(sorted((p["a"]["image_id"], p["b"]["image_id"]))) for p in report["pairs"]}


def test_finds_exactly_the_known_duplicates_within_and_across(manifests):
    root, paths = manifests
    summary = run_dedup(paths, DedupConfig(), str(root / "report.json"))
    report = json.loads((root / "report.json").read_text())
    assert found_pairs(report) == EXPECTED
    assert summary["engine"] == "loop" and summary["images"] == 18 and summary["num_pairs"] == 6
    by = {tuple(sorted((p["a"]["image_id"], p["b"]["image_id"]))): p for p in report["pairs"]}
    assert {k for k, p in by.items() if p["exact"]} == {("C", "C'"), ("D", "D2")}
    assert by["C", "C'"]["distance"] == by["D", "D2"]["distance"] == 0
    assert all(p["distance"] <= 48 for p in report["pairs"])
    assert (by["A", "A'"]["a"]["manifest"], by["A", "A'"]["b"]["manifest"]) == (0, 1)
    assert (by["A", "A'"]["a"]["split"], by["A", "A'"]["b"]["split"]) == ("train", "test")
    assert report["pairs_by_splits"] == {
        "0:test ~ 0:train": 1,
        "0:test ~ 1:train": 1,
        "0:train ~ 0:train": 1,
        "0:train ~ 1:test": 3,
    }


def test_distinct_tiles_stay_far_apart():
    bits = []
    import imagehash

    for img in tiles(40):
        bits.append(np.packbits(np.asarray(imagehash.phash(img, hash_size=16).hash).ravel()))
    assert close_pairs(np.stack(bits), 48) == []
    assert close_pairs(np.stack(bits), 255) != []  # the search itself does find pairs


def test_close_pairs_matches_brute_force_across_blocks(monkeypatch):
    from urbancross.data import dedup as D

    monkeypatch.setattr(D, "BLOCK", 7)
    rng = np.random.default_rng(0)
    h = rng.integers(0, 256, (40, 3), dtype=np.uint8)
    h[5] = h[33]
    h[12] = h[2]
    h[12, 0] ^= 1
    bits = np.unpackbits(h, axis=1)
    want = sorted(
        (i, j, int((bits[i] != bits[j]).sum()))
        for i in range(40)
        for j in range(i + 1, 40)
        if (bits[i] != bits[j]).sum() <= 6
    )
    assert sorted(close_pairs(h, 6)) == want and (5, 33, 0) in want and (2, 12, 1) in want


def test_drop_from_writes_a_cleaned_copy_never_in_place(manifests, tmp_path):
    root, paths = manifests
    before = read_manifest(paths[0]).column("image_id").to_pylist()
    summary = run_dedup(paths, DedupConfig(), str(tmp_path / "r.json"), drop_from="train", out=str(tmp_path / "clean"))
    kept = read_manifest(tmp_path / "clean").column("image_id").to_pylist()
    # A, B, C duplicate test images of `two`; E one of its own test split; of D and D2 one stays
    assert sorted(set(before) - set(kept)) == ["A", "B", "C", "D2", "E"] and summary["num_dropped"] == 5
    assert read_manifest(paths[0]).column("image_id").to_pylist() == before  # the input is untouched
    with pytest.raises(ManifestError, match="never over an input"):
        run_dedup(paths, DedupConfig(), str(tmp_path / "r.json"), drop_from="train", out=paths[0], overwrite=True)
    with pytest.raises(ManifestError, match="needs --out"):
        run_dedup(paths, DedupConfig(), str(tmp_path / "r.json"), drop_from="train")


def test_rows_to_drop_rule():
    def side(m, i, s):
        return {"manifest": m, "image_id": i, "split": s, "domain": "d"}

    pairs = [
        {"a": side(0, "x", "train"), "b": side(1, "y", "test")},  # across manifests: drop x
        {"a": side(0, "p", "train"), "b": side(0, "q", "train")},  # within train: keep p
        {"a": side(0, "t", "test"), "b": side(1, "u", "train")},  # not in the first manifest's train: nothing
    ]
    assert rows_to_drop(pairs, "train") == {"x", "q"}


def test_cli_report_and_one_line_errors(manifests, tmp_path, capsys):
    root, paths = manifests
    assert main(["data", "dedup", *paths, "--report", str(tmp_path / "r.json"), "--set", "dedup.max_distance=0"]) == 0
    summary = json.loads(capsys.readouterr().out)
    # max_distance 0: the two byte-identical pairs, and E2 (E resized: the same hash, other bytes)
    assert summary["num_pairs"] == 3 and summary["num_exact"] == 2 and "pairs" not in summary
    (tmp_path / "notes.json").write_text("my notes")
    assert main(["data", "dedup", *paths, "--report", str(tmp_path / "notes.json")]) == 1
    assert "not a dedup report" in capsys.readouterr().err and (tmp_path / "notes.json").read_text() == "my notes"


@pytest.mark.ray
def test_ray_data_path_finds_the_same_pairs(manifests, tmp_path, ray_session):
    root, paths = manifests
    summary = run_dedup(paths, DedupConfig(ray_min_images=0), str(tmp_path / "r.json"))
    report = json.loads((tmp_path / "r.json").read_text())
    assert summary["engine"] == "ray data" and found_pairs(report) == EXPECTED
