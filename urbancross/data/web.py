"""The embedded world's "web": a broad procedural corpus for pretraining the tiny CLIP.

The benchmark (`synth.py`) has three countries, each one `Style`. The web corpus draws a new
style for every few tiles from a WIDE distribution (`random_style`): ground, tree, water and
road palettes, texture, density, land-use mix, building sizes and layout, roof colours from a
broad colour vocabulary and place words from adjective x noun lists, anywhere on Earth. Tiles
and captions are then made by synth's own `make_scene` / `perturb` / `render` / `describe` at
the same size, so pixel and caption statistics are those of the benchmark's kind of data. The
three benchmark styles are never used, and web styles are named `web-<n>`, never a country.

Rows are a pure function of (seed, style index): `style_rows` makes one style's tiles, so the
corpus can be generated in any order or in parallel shards (`urbancross/pretrain.py` uses Ray
Data) and stays byte-identical. Whole styles go to one split, so the web val split holds
styles never seen in training.
"""

from __future__ import annotations

import numpy as np

from urbancross.data.synth import KINDS, Scene, Style, make_scene, perturb, scene_row

RGB = tuple[int, int, int]

# Roof colours: a broad vocabulary (the benchmark's red/brown/grey/orange/terracotta/white are
# among many); each style jitters the RGB of the ones it uses.
COLOURS: dict[str, RGB] = {
    "red": (160, 50, 42),
    "dark red": (118, 34, 32),
    "brown": (112, 70, 50),
    "grey": (122, 122, 128),
    "dark grey": (70, 72, 78),
    "light grey": (176, 176, 180),
    "orange": (198, 104, 62),
    "terracotta": (186, 92, 58),
    "white": (226, 218, 204),
    "cream": (232, 220, 180),
    "beige": (200, 182, 150),
    "black": (36, 36, 40),
    "blue": (60, 90, 150),
    "green": (70, 110, 70),
    "teal": (50, 120, 120),
    "yellow": (212, 186, 80),
    "pink": (210, 140, 150),
    "purple": (110, 70, 120),
    "tan": (170, 140, 100),
    "silver": (190, 196, 204),
}
# Place words (must not contain element nouns: `describe` counts those).
ADJECTIVES = (
    "sunny", "dry", "green", "wooded", "tidy", "quiet", "dense", "leafy", "busy", "old", "new", "rural",
    "coastal", "hilly", "flat", "arid", "lush", "sleepy", "historic", "modern", "remote", "rainy",
)  # fmt: skip
AREA_NOUNS = ("neighbourhood", "suburb", "district", "area", "block", "quarter", "village", "town", "estate")
# Ground colour families (forest, meadow, farmland, steppe, desert, soil, urban), jittered per style.
GROUNDS: tuple[RGB, ...] = (
    (58, 86, 52), (90, 120, 70), (120, 144, 86), (150, 150, 100), (198, 166, 118), (210, 190, 150),
    (140, 110, 80), (130, 130, 120), (100, 110, 90),
)  # fmt: skip


def jitter(rng: np.random.Generator, c: RGB, amount: float) -> RGB:
    return tuple(int(np.clip(v + rng.uniform(-amount, amount), 0, 255)) for v in c)  # type: ignore[return-value]


def random_style(rng: np.random.Generator, name: str = "web-0") -> Style:
    """A style drawn from the web's wide distribution (never one of the benchmark's)."""
    mix = {k: float(rng.lognormal(0.0, 1.0)) * float(rng.random() > 0.15) for k in KINDS}
    for k in [KINDS[i] for i in rng.permutation(len(KINDS))[:2]]:  # make_scene needs two kinds
        mix[k] = mix[k] or float(rng.lognormal(0.0, 1.0))
    lo = int(rng.integers(2, 6))
    b_lo = float(rng.uniform(0.4, 0.75))
    names = list(COLOURS)
    roofs = tuple((c, jitter(rng, COLOURS[c], 14)) for c in (names[i] for i in rng.permutation(len(names))[: rng.integers(1, 4)]))
    adjectives = [ADJECTIVES[i] for i in rng.permutation(len(ADJECTIVES))[:3]]
    areas = tuple(f"{a} {AREA_NOUNS[int(rng.integers(len(AREA_NOUNS)))]}" for a in adjectives)
    div = rng.dirichlet((1.0, 1.0, 1.0))
    lat0, lon0 = float(rng.uniform(-55, 65)), float(rng.uniform(-180, 175))
    crop = jitter(rng, (166, 164, 96), 30)
    grey = int(rng.integers(80, 160))
    return Style(
        name=name,
        ground=jitter(rng, GROUNDS[int(rng.integers(len(GROUNDS)))], 25),
        mottle=float(rng.uniform(2, 20)),
        grain=float(rng.uniform(2, 11)),
        tree=jitter(rng, (50, 85, 40), 30),
        water=jitter(rng, (40, 70, 105), 25),
        roofs=roofs,
        ridge=bool(rng.random() < 0.5),
        field=(crop, jitter(rng, tuple(int(v * 0.8) for v in crop), 15)),  # type: ignore[arg-type]
        road=jitter(rng, (grey, grey, grey), 10),
        parking=jitter(rng, (96, 96, 100), 20),
        pitch=jitter(rng, (70, 145, 64), 20),
        pool=jitter(rng, (70, 170, 205), 25),
        mix=mix,
        elements=(lo, int(rng.integers(lo + 1, 10))),
        building_scale=(b_lo, min(0.95, b_lo + float(rng.uniform(0.1, 0.25)))),
        regular=float(rng.random()),
        dividers={"road": float(div[0]), "river": float(div[1]), "none": float(div[2])},
        areas=areas,
        lat=(lat0, lat0 + float(rng.uniform(0.5, 5))),
        lon=(lon0, lon0 + float(rng.uniform(0.5, 5))),
    )


def style_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, 0x7E8, index])


def web_scenes(
    rng: np.random.Generator, style: Style, n: int, near_duplicate_fraction: float = 0.5
) -> list[Scene]:
    """`n` scenes in `style`, near-duplicate pairs as often as the benchmark makes them."""
    scenes: list[Scene] = []
    fresh = True
    for _ in range(n):
        if scenes and fresh and rng.random() < near_duplicate_fraction:
            scenes.append(perturb(scenes[-1], rng, style))
            fresh = False
        else:
            scenes.append(make_scene(rng, style))
            fresh = True
    return scenes


def web_scene(rng: np.random.Generator, index: int = 0) -> tuple[Scene, Style]:
    """One web scene in a freshly drawn style (e.g. SAM pretraining, which needs no captions)."""
    style = random_style(rng, f"web-{index}")
    return make_scene(rng, style), style


def split_of(seed: int, index: int, val_fraction: float, test_fraction: float) -> str:
    u = float(np.random.default_rng([seed, 0x5B1, index]).random())
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


def style_rows(
    seed: int,
    index: int,
    *,
    tiles: int,
    image_size: int = 64,
    captions: int = 5,
    val_fraction: float = 0.05,
    test_fraction: float = 0.0,
    near_duplicate_fraction: float = 0.5,
) -> list[dict]:
    """The manifest rows of web style `index`: `tiles` tiles, all in one split (domain `web`)."""
    rng = style_rng(seed, index)
    style = random_style(rng, f"web-{index}")
    split = split_of(seed, index, val_fraction, test_fraction)
    rows = []
    for j, scene in enumerate(web_scenes(rng, style, tiles, near_duplicate_fraction)):
        rows.append(scene_row(scene, style, rng, f"web_{index:06d}_{j:02d}", "web", split, image_size, captions,
                              f"web:{seed}:{index}:{j}"))
    return rows
