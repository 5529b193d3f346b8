"""The embedded benchmark: determinism, captions true of the scene, domain shift, splits, CLI."""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections import Counter

import numpy as np
import pyarrow.dataset as ds
import pytest
from PIL import Image

from urbancross.cli import main
from urbancross.config import ConfigError, SynthConfig
from urbancross.data import synth as S
from urbancross.data.synth import Divider, Element, Scene

NUMBERS = {"a": 1, "an": 1, "one": 1, **{w: i for i, w in enumerate(S.NUMBER_WORDS) if i >= 2}}
NOUN_KIND = {noun: kind for kind, pairs in S.NOUNS.items() for pair in pairs for noun in pair}
COUNT_RE = re.compile(
    r"\b(" + "|".join(NUMBERS) + r")\s+(?:[\w-]+\s+){0,2}?("
    + "|".join(re.escape(n) for n in sorted(NOUN_KIND, key=len, reverse=True))
    + r")\b"
)


def parse_counts(caption: str) -> Counter:
    """Independent reading of a caption: 'three red-roofed houses' -> {building: 3}."""
    out: Counter = Counter()
    for number, noun in COUNT_RE.findall(caption.lower()):
        out[NOUN_KIND[noun]] += NUMBERS[number]
    return out


def el(kind, row, col, scale=0.7, variant=0):
    return Element(kind, row, col, scale, (0.0, 0.0), variant)


# Three houses in the north-west, a large lake in the south-east, a river between them.
HOUSES = (el("building", 0, 0), el("building", 0, 1), el("building", 1, 0))
LAKE = el("lake", 3, 3, scale=0.9)
RIVER = Divider("river", horizontal=True)
SCENE = Scene("Finland", HOUSES + (LAKE,), RIVER, texture_seed=7)


def small_cfg(**kw) -> SynthConfig:
    return SynthConfig(**{"images_per_domain": 8, **kw})


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=float)


def dist(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, float) - np.asarray(b, float)))


# --------------------------------------------------------------------------- parsing helper


def test_parse_counts_reads_number_words_and_synonyms():
    got = parse_counts("Three red-roofed houses and a large sports field north of a stream, two farm fields below it.")
    assert got == Counter({"building": 3, "pitch": 1, "river": 1, "field": 2})


# --------------------------------------------------------------------------- scene geometry


def test_relation_hand_cases():
    assert S.relation([el("tree", 0, 0)], [el("lake", 2, 2)]) == "north-west"
    assert S.relation([el("tree", 1, 0), el("tree", 2, 0)], [el("lake", 1, 2)]) == "west"
    assert S.relation([el("tree", 3, 1)], [el("lake", 1, 1)]) == "south"
    assert S.relation([el("tree", 0, 0), el("tree", 2, 2)], [el("lake", 1, 1)]) == "near"
    assert S.relation([el("tree", 0, 0), el("tree", 3, 3)], [el("lake", 1, 1)]) is None


def test_facts_of_hand_scene():
    assert S.counts(SCENE) == {"building": 3, "lake": 1, "river": 1}
    assert S.anchor(SCENE) == "lake"
    assert [S.side(e, RIVER) for e in SCENE.elements] == ["north", "north", "north", "south"]
    assert S.geo_tags(SCENE) == ["building=residential", "natural=water", "waterway=river"]


def test_element_box_hand_values():
    # 64 px, 16 px cells; lake in cell (3, 3): 14 px inside a 1 px margin, * 0.9 = 12.6 around 56
    # -> [49.7, 62.3) -> pixels 50..61 inclusive.
    assert S.element_box(LAKE, RIVER, 64) == (50, 50, 61, 61)
    # Row 1 touches the river band (centre 32, half width 64 * 0.08 + 1 = 6.12): the cell spans
    # y in [16, 25.88), x in [0, 16); at scale 1: x [1, 15) -> 1..14, y [17.0, 24.88) -> 17..24.
    assert S.element_box(el("building", 1, 0, scale=1.0), RIVER, 64) == (1, 17, 14, 24)


# --------------------------------------------------------------------------- captions


def test_hand_scene_captions_state_counts_sizes_and_relations():
    caps = S.describe(SCENE, np.random.default_rng(0))
    assert len(caps) == 5 and len(set(caps)) == 5
    for c in caps:
        assert parse_counts(c) == Counter(S.counts(SCENE)), c
        assert re.search(r"\blarge (lake|pond)\b", c.lower()) and "small" not in c.lower(), c
    text = " ".join(caps).lower()
    # the sides template: houses north of the river, the lake south of it
    assert re.search(r"(houses|buildings) (north of|above) (a|the) (river|stream)", text)
    assert re.search(r"(lake|pond) (south of|below) (it|the river|the stream)", text)
    # the relations template: houses relative to the lake (rows 0-1 vs 3, cols 0-1 vs 3)
    assert re.search(r"(houses|buildings) (north-west of|above and to the left of) (a large|the) (lake|pond)", text)
    assert "south-east" not in text and "to the right of" not in text


@pytest.mark.parametrize("domain", sorted(S.STYLES))
def test_random_captions_count_exactly_what_the_scene_holds(domain):
    rng = np.random.default_rng(1)
    style = S.STYLES[domain]
    for _ in range(40):
        scene = S.make_scene(rng, style)
        for s in (scene, S.perturb(scene, rng, style)):
            want = Counter(S.counts(s))
            for c in S.describe(s, rng):
                assert parse_counts(c) == want, (c, s)


def test_one_more_building_changes_every_caption():
    more = Scene("Finland", SCENE.elements + (el("building", 0, 2),), RIVER, 7)
    a, b = S.describe(SCENE, np.random.default_rng(0)), S.describe(more, np.random.default_rng(0))
    assert set(a).isdisjoint(b)
    assert all(parse_counts(c)["building"] == 4 for c in b)


def test_moving_the_lake_across_the_river_changes_the_captions():
    moved = Scene("Finland", HOUSES + (el("lake", 0, 3, scale=0.9),), RIVER, 7)
    assert S.facts(moved) != S.facts(SCENE)
    a, b = S.describe(SCENE, np.random.default_rng(0)), S.describe(moved, np.random.default_rng(0))
    assert set(a) != set(b)
    assert any(re.search(r"\b(south|below)\b", c.lower()) for c in a)
    assert not any(re.search(r"\b(south|below)\b", c.lower()) for c in b), b


def test_perturb_keeps_element_kinds_and_changes_the_facts():
    rng = np.random.default_rng(2)
    for style in S.STYLES.values():
        for _ in range(30):
            scene = S.make_scene(rng, style)
            near = S.perturb(scene, rng, style)
            assert set(S.groups(near)) == set(S.groups(scene)) and near.divider == scene.divider
            assert S.facts(near) != S.facts(scene)
            assert sum(a != b for a, b in zip(sorted(S.counts(near).values()), sorted(S.counts(scene).values()))) <= 2


# --------------------------------------------------------------------------- pixels


def test_rendered_pixels_show_the_elements():
    img = np.asarray(S.render(SCENE, 64), dtype=float)
    style = S.STYLES["Finland"]
    assert img.shape == (64, 64, 3)
    # lake centre is water, not ground
    assert dist(img[56, 56], style.water) < 25 < dist(img[56, 56], style.ground)
    # the river's centre line (y = 32) is water across the whole tile
    assert dist(img[32].mean(axis=0), style.water) < 20
    # an empty cell (row 3, col 0) is mottled ground: green dominates, unlike water
    empty = img[50:62, 2:14].reshape(-1, 3).mean(axis=0)
    assert dist(empty, style.ground) < dist(empty, style.water) and empty[1] > max(empty[0], empty[2])
    # a house: the middle of its box is roof-coloured
    x0, y0, x1, y1 = S.element_box(HOUSES[0], RIVER, 64)
    roof = style.roofs[0][1]
    patch = img[y0 + 1 : y1, x0 + 1 : x1].reshape(-1, 3).mean(axis=0)
    assert dist(patch, roof) < dist(patch, style.ground)


def palette(style: S.Style) -> dict[str, tuple]:
    named = {"ground": style.ground, "tree": style.tree, "lake": style.water, "pool": style.pool, "road": style.road}
    named |= {"parking": style.parking, "pitch": style.pitch, "field": style.field[0]}
    return named | {f"roof{i}": rgb for i, (_, rgb) in enumerate(style.roofs)}


def test_random_scenes_paint_each_element_where_it_is():
    """The middle of every lake, pool and building box is nearest to that element's colour."""
    rng = np.random.default_rng(3)
    checked = Counter()
    for style in S.STYLES.values():
        colours = palette(style)
        for _ in range(20):
            scene = S.make_scene(rng, style)
            img = np.asarray(S.render(scene, 64), dtype=float)
            for e in scene.elements:
                if e.kind not in ("lake", "pool", "building"):
                    continue
                x0, y0, x1, y1 = S.element_box(e, scene.divider, 64)
                cx, cy, rx, ry = (x0 + x1) // 2, (y0 + y1) // 2, max(1, (x1 - x0) // 4), max(1, (y1 - y0) // 4)
                mean = img[cy - ry : cy + ry + 1, cx - rx : cx + rx + 1].reshape(-1, 3).mean(axis=0)
                nearest = min(colours, key=lambda name: dist(mean, colours[name]))
                assert nearest == (f"roof{e.variant}" if e.kind == "building" else e.kind), (style.name, e, mean)
                checked[e.kind] += 1
    assert min(checked.values()) >= 5 and sum(checked.values()) > 50, checked


# --------------------------------------------------------------------------- domains


def mean_histogram(pngs: list[bytes], bins: int = 4) -> np.ndarray:
    h = np.zeros(bins**3)
    for png in pngs:
        q = (decode(png) // (256 / bins)).astype(int).reshape(-1, 3)
        h += np.bincount(q[:, 0] * bins * bins + q[:, 1] * bins + q[:, 2], minlength=bins**3)
    return h / h.sum()


def test_domains_differ_more_than_two_samples_of_one_domain():
    hist = {
        (d, seed): mean_histogram([r["image"] for r in S.domain_rows(small_cfg(images_per_domain=20, seed=seed), d)])
        for d in S.STYLES
        for seed in (0, 1)
    }
    within = max(np.abs(hist[d, 0] - hist[d, 1]).sum() for d in S.STYLES)
    between = min(np.abs(hist[a, 0] - hist[b, 0]).sum() for a in S.STYLES for b in S.STYLES if a < b)
    assert within < 0.5 * between, (within, between)


def test_domains_differ_in_their_mix_of_land_uses():
    rng = np.random.default_rng(4)
    mean = {}
    for d, style in S.STYLES.items():
        scenes = [S.counts(S.make_scene(rng, style)) for _ in range(200)]
        mean[d] = {k: np.mean([c.get(k, 0) for c in scenes]) for k in ("lake", "pool", "building", "field")}
    assert mean["Finland"]["lake"] > 3 * mean["Spain"]["lake"]
    assert mean["Spain"]["pool"] > 3 * mean["Finland"]["pool"]
    assert mean["Germany"]["building"] > mean["Finland"]["building"]
    assert mean["Germany"]["field"] > mean["Spain"]["field"]


# --------------------------------------------------------------------------- the manifest


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = S.synthesize(small_cfg(seed=5), str(tmp_path / "a"))
    b = S.synthesize(small_cfg(seed=5), str(tmp_path / "b"))
    c = S.synthesize(small_cfg(seed=6), str(tmp_path / "c"))
    assert a.equals(b)
    assert a.column("image").to_pylist() == b.column("image").to_pylist()
    images_a, images_c = a.column("image").to_pylist(), c.column("image").to_pylist()
    assert sum(x != y for x, y in zip(images_a, images_c)) == len(images_a)
    assert a.column("captions").to_pylist() != c.column("captions").to_pylist()


def test_a_domain_does_not_depend_on_the_others(tmp_path):
    alone = S.synthesize(small_cfg(domains=["Spain"]), str(tmp_path / "alone"))
    every = S.synthesize(small_cfg(), str(tmp_path / "every"))
    spain = every.filter(np.array(every.column("domain").to_pylist()) == "Spain")
    assert alone.column("image").to_pylist() == spain.column("image").to_pylist()


def test_splits_disjoint_stratified_and_sized(tmp_path):
    table = S.synthesize(small_cfg(images_per_domain=10, test_fraction=0.2, val_fraction=0.1), str(tmp_path / "m"))
    rows = table.to_pylist()
    ids = [r["image_id"] for r in rows]
    assert len(ids) == len(set(ids)) == 30
    per = Counter((r["domain"], r["split"]) for r in rows)
    for d in ("Finland", "Germany", "Spain"):
        assert (per[d, "train"], per[d, "val"], per[d, "test"]) == (7, 1, 2)
    default = S.synthesize(small_cfg(images_per_domain=10), str(tmp_path / "d"))  # the reference's 70/10/20
    assert Counter(default.column("split").to_pylist()) == {"train": 21, "val": 3, "test": 6}
    no_val = S.synthesize(small_cfg(images_per_domain=6, test_fraction=0.25, val_fraction=0.0), str(tmp_path / "n"))
    assert Counter(no_val.column("split").to_pylist()) == {"train": 12, "test": 6}


def test_split_sizes_and_near_duplicates_stay_together():
    assert S.split_sizes(120, 0.25, 0.0) == {"train": 90, "val": 0, "test": 30}
    assert S.split_sizes(6, 0.25, 0.0) == {"train": 4, "val": 0, "test": 2}
    labels = S.assign_splits([0, 0, 2, 2, 4, 4, 6, 6], {"train": 6, "val": 0, "test": 2}, np.random.default_rng(0))
    test = [i for i, s in enumerate(labels) if s == "test"]
    assert len(test) == 2 and test[0] // 2 == test[1] // 2


def test_written_folder_reads_with_pyarrow_dataset(tmp_path):
    out = tmp_path / "m"
    S.synthesize(small_cfg(images_per_domain=4, image_size=48), str(out))
    table = ds.dataset(str(out), format="parquet").to_table()
    assert table.num_rows == 12
    for r in table.to_pylist():
        style = S.STYLES[r["domain"]]
        idx = int(r["image_id"].split("_")[1])
        assert r["image_id"] == f"{r['domain']}_{idx:06d}" and r["source"] == f"synth:{r['domain']}:{idx}"
        assert Image.open(io.BytesIO(r["image"])).size == (48, 48)
        assert len(r["captions"]) == 5 and len(set(r["captions"])) == 5
        assert style.lat[0] <= r["lat"] <= style.lat[1] and style.lon[0] <= r["lon"] <= style.lon[1]
        assert r["geo_tags"] and all(re.fullmatch(r"[a-z_]+=[a-z_]+", t) for t in r["geo_tags"])
        kinds_in_captions = set(parse_counts(r["captions"][0]))
        assert {S.GEO_TAGS[k] for k in kinds_in_captions} == set(r["geo_tags"])


def test_bad_config_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="synth.domains.*Atlantis"):
        S.synthesize(small_cfg(domains=["Atlantis"]), str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="test_fraction"):
        S.synthesize(small_cfg(test_fraction=0.8, val_fraction=0.3), str(tmp_path / "y"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_prints_summary(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["data", "synth", "--out", str(out), "--images-per-domain", "6"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 18 and summary["captions"] == 90
    assert summary["per_domain"]["Spain"] == {"images": 6, "captions": 30}
    assert summary["per_split"] == {  # per domain of 6: round(1.2) test, round(0.6) val
        "test": {"images": 3, "captions": 15},
        "train": {"images": 12, "captions": 60},
        "val": {"images": 3, "captions": 15},
    }
    assert ds.dataset(str(out), format="parquet").count_rows() == 18


# --------------------------------------------------------------------------- labels, bad flags


def rows_digest(cfg: SynthConfig) -> str:
    """Everything a row held before `label` existed, hashed: tiles, captions, ids, splits, geo."""
    h = hashlib.sha256()
    for d in cfg.domains:
        for r in S.domain_rows(cfg, d):
            h.update(r["image"])
            kept = [r[k] for k in ("image_id", "captions", "split", "lat", "lon", "geo_tags", "source")]
            h.update(json.dumps(kept).encode())
    return h.hexdigest()


def test_label_left_every_tile_and_caption_byte_identical():
    # digests taken on the code before `label` was added (commit dddbbf6)
    then = {"test_fraction": 0.25, "val_fraction": 0.0}  # the split defaults of then
    assert rows_digest(small_cfg(**then)) == "53dc72efd4e463a275918c8a57f470b6128c01249ef77c4c007f954bf28b5e23"
    cfg = small_cfg(images_per_domain=12, seed=3, image_size=48, **then)
    assert rows_digest(cfg) == "760a00d831843702dfca44d68b5df7dc764b090ae365f65ea58ed13719d83102"


def test_label_is_the_dominant_land_use():
    assert S.scene_label(SCENE) == "building"  # three houses, one lake
    two_each = Scene("Finland", (el("tree", 0, 0), el("tree", 0, 1), el("lake", 3, 3), el("lake", 3, 2)), None, 1)
    assert S.scene_label(two_each) == "tree"  # a tie goes to the earlier kind in KINDS
    rows = S.domain_rows(small_cfg(images_per_domain=20), "Spain")
    for r in rows:
        counts = Counter(parse_counts(r["captions"][0]))
        counts.pop("road", None), counts.pop("river", None)
        assert counts[r["label"]] == max(counts.values()), (r["label"], counts)


def test_cli_refuses_repeated_domains_and_negative_seed_in_one_line(tmp_path, capsys):
    for flags, message in (
        (["--domains", "Finland,Finland"], "domains must be distinct"),
        (["--seed", "-1"], "seed must be >= 0"),
    ):
        assert main(["data", "synth", "--out", str(tmp_path / "m"), *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_synth_refuses_a_foreign_folder_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "work"
    out.mkdir()
    (out / "paper.tex").write_text("x")
    assert main(["data", "synth", "--out", str(out), "--images-per-domain", "2"]) == 1
    assert "not a manifest" in capsys.readouterr().err and (out / "paper.tex").exists()
    assert main(["data", "synth", "--out", str(out), "--images-per-domain", "2", "--overwrite"]) == 0
    assert not (out / "paper.tex").exists() and ds.dataset(str(out), format="parquet").count_rows() == 6


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    def broken(cfg, out, overwrite=False):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(S, "synthesize", broken)
    assert main(["data", "synth", "--out", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert err == "urbancross: error: RuntimeError: something broke (--debug shows the traceback)\n"
    with pytest.raises(RuntimeError, match="something"):
        main(["--debug", "data", "synth", "--out", str(tmp_path / "m")])
