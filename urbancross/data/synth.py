"""The embedded benchmark: procedural satellite-like tiles with captions, in three domains.

Why it exists: the pipeline needs data that trains a tiny CLIP on CPU in minutes yet
behaves like UrbanCross — images of one country look and are composed differently from
another's (domain shift), and retrieval needs detail (counts, relations), not only colour.

A tile is a `Scene`: elements (buildings, trees, lakes, ...) on a GRID x GRID layout,
optionally split in two by a road or river (the `Divider`). Everything else is a pure
function of the scene: `render` draws it, `describe` writes captions stating its counts,
sizes and relations, `geo_tags` lists OpenStreetMap tags. Every caption mentions every
element group exactly once with its count, so counts can be parsed back and checked.
Near-duplicate scenes (one element added, removed, resized or moved) are generated in
pairs, so that two images with the same kinds of elements need their captions' details
to be told apart.

Each row's scene class (`label`) is its dominant land use, `scene_label`: the element kind
with the most elements, ties broken in `KINDS` order (building first); the divider does not
count. It is a pure function of the scene, drawing nothing from the random streams, so
adding it left every tile and caption byte-identical.
"""

from __future__ import annotations

import logging
import zlib
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from urbancross.config import ConfigError, SynthConfig
from urbancross.data.manifest import check_output, encode_png, to_table, write_manifest

log = logging.getLogger(__name__)

GRID = 4  # cells per side; a divider runs along the middle, leaving GRID/2 rows (cols) per side
RGB = tuple[int, int, int]

# --------------------------------------------------------------------------- scene


@dataclass(frozen=True)
class Element:
    """One land-use object occupying one grid cell."""

    kind: str  # building, tree, lake, field, parking, pitch, pool
    row: int
    col: int
    scale: float  # fraction of the cell it fills; >= LARGE means "large"
    jitter: tuple[float, float] = (0.0, 0.0)  # offset inside the cell's free margin, in [-1, 1]
    variant: int = 0  # roof colour index for buildings; stripe direction for fields


@dataclass(frozen=True)
class Divider:
    """A road or river crossing the whole tile through its middle."""

    kind: str  # road | river
    horizontal: bool  # True: runs west-east, splitting the tile into north and south


@dataclass(frozen=True)
class Scene:
    domain: str
    elements: tuple[Element, ...]
    divider: Divider | None = None
    texture_seed: int = 0  # ground texture and noise; kept by near-duplicates


# --------------------------------------------------------------------------- domains


@dataclass(frozen=True)
class Style:
    """How one country's cities look: palette, texture, density and the mix of land uses."""

    name: str
    ground: RGB
    mottle: float  # amplitude of low-frequency ground texture (forest, soil patches)
    grain: float  # per-pixel noise
    tree: RGB
    water: RGB
    roofs: tuple[tuple[str, RGB], ...]  # (caption word, colour)
    ridge: bool  # gable roofs with a visible ridge line
    field: tuple[RGB, RGB]  # crop colour, furrow colour
    road: RGB
    parking: RGB
    pitch: RGB
    pool: RGB
    mix: dict[str, float]  # relative frequency of each element kind
    elements: tuple[int, int]  # min, max elements per scene
    building_scale: tuple[float, float]
    regular: float  # probability that buildings line up in a block
    dividers: dict[str, float]  # road / river / none
    areas: tuple[str, ...]  # caption words for the place (must not contain element nouns)
    lat: tuple[float, float]
    lon: tuple[float, float]


STYLES: dict[str, Style] = {
    s.name: s
    for s in (
        Style(
            name="Finland",
            ground=(58, 86, 52),
            mottle=16.0,
            grain=5.0,
            tree=(20, 54, 28),
            water=(26, 46, 74),
            roofs=(("red", (160, 50, 42)), ("brown", (112, 70, 50))),
            ridge=True,
            field=((156, 164, 92), (128, 138, 78)),
            road=(92, 92, 96),
            parking=(104, 104, 108),
            pitch=(76, 136, 64),
            pool=(72, 150, 190),
            mix={"building": 3.0, "tree": 4.0, "lake": 2.0, "field": 1.2, "pitch": 0.5, "parking": 0.3, "pool": 0.1},
            elements=(3, 7),
            building_scale=(0.45, 0.62),
            regular=0.1,
            dividers={"river": 0.45, "road": 0.35, "none": 0.2},
            areas=("wooded area", "green suburb", "forested neighbourhood"),
            lat=(60.15, 62.0),
            lon=(22.0, 27.5),
        ),
        Style(
            name="Germany",
            ground=(120, 144, 86),
            mottle=6.0,
            grain=3.0,
            tree=(46, 90, 44),
            water=(40, 70, 104),
            roofs=(("grey", (122, 122, 128)), ("orange", (198, 104, 62))),
            ridge=True,
            field=((172, 178, 94), (138, 116, 74)),
            road=(126, 126, 126),
            parking=(86, 86, 90),
            pitch=(58, 152, 60),
            pool=(80, 170, 204),
            mix={"building": 5.0, "field": 2.5, "tree": 1.5, "parking": 1.2, "pitch": 1.0, "lake": 0.4, "pool": 0.2},
            elements=(4, 8),
            building_scale=(0.68, 0.88),
            regular=0.8,
            dividers={"road": 0.7, "river": 0.15, "none": 0.15},
            areas=("suburban block", "tidy neighbourhood", "residential district"),
            lat=(48.0, 53.5),
            lon=(7.0, 13.5),
        ),
        Style(
            name="Spain",
            ground=(198, 166, 118),
            mottle=10.0,
            grain=9.0,
            tree=(94, 108, 56),
            water=(48, 88, 120),
            roofs=(("terracotta", (186, 92, 58)), ("white", (226, 218, 204))),
            ridge=False,
            field=((180, 152, 98), (150, 124, 80)),
            road=(142, 136, 128),
            parking=(108, 104, 98),
            pitch=(82, 142, 72),
            pool=(62, 190, 216),
            mix={"building": 4.0, "pool": 2.5, "parking": 1.5, "pitch": 1.0, "tree": 1.0, "field": 1.0, "lake": 0.15},
            elements=(3, 8),
            building_scale=(0.55, 0.8),
            regular=0.3,
            dividers={"road": 0.6, "river": 0.1, "none": 0.3},
            areas=("sunny neighbourhood", "dry suburban area", "sunbaked district"),
            lat=(36.5, 43.0),
            lon=(-6.0, 2.0),
        ),
    )
}

KINDS = ("building", "tree", "lake", "field", "parking", "pitch", "pool")
SIZED = ("lake", "field", "parking", "pitch", "pool")  # kinds whose captions state small/large
LARGE = 0.8  # scale threshold between "small" and "large"
SCALES = {"small": (0.5, 0.62), "large": (0.84, 0.96)}

# --------------------------------------------------------------------------- words

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven")
NOUNS: dict[str, tuple[tuple[str, str], ...]] = {  # kind -> (singular, plural) synonyms
    "building": (("building", "buildings"), ("house", "houses")),
    "tree": (("tree", "trees"),),
    "lake": (("lake", "lakes"), ("pond", "ponds")),
    "field": (("field", "fields"), ("farm field", "farm fields")),
    "parking": (("parking lot", "parking lots"), ("car park", "car parks")),
    "pitch": (("sports field", "sports fields"), ("pitch", "pitches")),
    "pool": (("swimming pool", "swimming pools"), ("pool", "pools")),
    "road": (("road", "roads"), ("street", "streets")),
    "river": (("river", "rivers"), ("stream", "streams")),
}
DIRECTIONS = {  # relation -> (compass wording, picture wording)
    "north": ("north of", "above"),
    "south": ("south of", "below"),
    "west": ("west of", "to the left of"),
    "east": ("east of", "to the right of"),
    "north-west": ("north-west of", "above and to the left of"),
    "north-east": ("north-east of", "above and to the right of"),
    "south-west": ("south-west of", "below and to the left of"),
    "south-east": ("south-east of", "below and to the right of"),
    "near": ("next to", "near"),
}
GEO_TAGS = {
    "building": "building=residential",
    "tree": "natural=tree",
    "lake": "natural=water",
    "field": "landuse=farmland",
    "parking": "amenity=parking",
    "pitch": "leisure=pitch",
    "pool": "leisure=swimming_pool",
    "road": "highway=residential",
    "river": "waterway=river",
}


# --------------------------------------------------------------------------- making scenes


def choose(rng: np.random.Generator, weights: dict[str, float]) -> str:
    keys = list(weights)
    p = np.array([weights[k] for k in keys], dtype=float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def new_element(
    kind: str, cell: tuple[int, int], style: Style, rng: np.random.Generator, variant: int | None = None
) -> Element:
    if kind in SIZED:
        lo, hi = SCALES["large" if rng.random() < 0.5 else "small"]
    elif kind == "building":
        lo, hi = style.building_scale
    else:
        lo, hi = 0.45, 0.7
    if variant is None:
        variant = int(rng.integers(len(style.roofs))) if kind == "building" else int(rng.integers(2))
    jitter = (float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1)))
    return Element(kind, cell[0], cell[1], float(rng.uniform(lo, hi)), jitter, variant)


def make_scene(rng: np.random.Generator, style: Style) -> Scene:
    """A random scene in `style`: at least two kinds of element, optionally a divider."""
    n = int(rng.integers(style.elements[0], style.elements[1] + 1))
    kinds = [choose(rng, style.mix) for _ in range(n)]
    while len(set(kinds)) < 2:
        kinds[int(rng.integers(n))] = choose(rng, style.mix)
    divider_kind = choose(rng, style.dividers)
    divider = None if divider_kind == "none" else Divider(divider_kind, bool(rng.random() < 0.5))
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    order = [cells[i] for i in rng.permutation(len(cells))]
    buildings = kinds.count("building")
    if buildings and rng.random() < style.regular:  # a block: consecutive cells in reading order
        start = int(rng.integers(len(cells)))
        block = [cells[(start + i) % len(cells)] for i in range(buildings)]
        order = block + [c for c in order if c not in block]
    kinds.sort(key=lambda k: k != "building")
    roof = int(rng.integers(len(style.roofs)))
    elements = tuple(
        new_element(k, cell, style, rng, variant=roof if k == "building" and rng.random() < 0.7 else None)
        for k, cell in zip(kinds, order)
    )
    return Scene(style.name, elements, divider, int(rng.integers(2**31)))


def groups(scene: Scene, where: Callable[[Element], bool] = lambda e: True) -> dict[str, list[Element]]:
    """Elements by kind (those for which `where` holds), in scene order."""
    out: dict[str, list[Element]] = defaultdict(list)
    for e in scene.elements:
        if where(e):
            out[e.kind].append(e)
    return dict(out)


def counts(scene: Scene) -> dict[str, int]:
    """Elements per kind, the divider included (what every caption states)."""
    out = {k: len(v) for k, v in groups(scene).items()}
    if scene.divider:
        out[scene.divider.kind] = out.get(scene.divider.kind, 0) + 1
    return out


def size_word(e: Element) -> str:
    return "large" if e.scale >= LARGE else "small"


def side(e: Element, divider: Divider) -> str:
    if divider.horizontal:
        return "north" if e.row < GRID // 2 else "south"
    return "west" if e.col < GRID // 2 else "east"


def sides(divider: Divider) -> tuple[str, str]:
    return ("north", "south") if divider.horizontal else ("west", "east")


def relation(a: list[Element], b: list[Element]) -> str | None:
    """Where group `a` lies relative to group `b`, if every member agrees; else None."""
    ns = "north" if max(e.row for e in a) < min(e.row for e in b) else ""
    ns = ns or ("south" if min(e.row for e in a) > max(e.row for e in b) else "")
    ew = "west" if max(e.col for e in a) < min(e.col for e in b) else ""
    ew = ew or ("east" if min(e.col for e in a) > max(e.col for e in b) else "")
    if ns and ew:
        return f"{ns}-{ew}"
    if ns or ew:
        return ns or ew
    near = all(any(max(abs(x.row - y.row), abs(x.col - y.col)) == 1 for y in b) for x in a)
    return "near" if near else None


def anchor(scene: Scene) -> str:
    """The kind other groups are located against: a single landmark if there is one."""
    g = groups(scene)
    return min(g, key=lambda k: (len(g[k]), k not in SIZED, KINDS.index(k)))


def facts(scene: Scene) -> tuple:
    """Everything the captions state, canonically: near-duplicates must differ here."""
    g = groups(scene)
    sizes = tuple(sorted((k, size_word(v[0])) for k, v in g.items() if len(v) == 1 and k in SIZED))
    per_side: tuple = ()
    if scene.divider:
        per_side = tuple(sorted((e.kind, side(e, scene.divider)) for e in scene.elements))
    a = anchor(scene)
    rels = tuple(sorted((k, relation(v, g[a])) for k, v in g.items() if k != a))
    return (scene.divider, tuple(sorted(counts(scene).items())), sizes, per_side, a, rels)


def perturb(scene: Scene, rng: np.random.Generator, style: Style) -> Scene:
    """A near-duplicate: same kinds of element, one added, removed, resized or moved."""
    g = groups(scene)
    taken = {(e.row, e.col) for e in scene.elements}
    free = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in taken]
    els = list(scene.elements)
    for _ in range(50):
        op = ("add", "remove", "resize", "move")[int(rng.integers(4))]
        i = int(rng.integers(len(els)))
        e = els[i]
        if op == "add" and free:
            cell = free[int(rng.integers(len(free)))]
            new = els + [new_element(e.kind, cell, style, rng, variant=e.variant)]
        elif op == "remove" and len(g[e.kind]) > 1:
            new = els[:i] + els[i + 1 :]
        elif op == "resize" and e.kind in SIZED and len(g[e.kind]) == 1:
            lo, hi = SCALES["small" if size_word(e) == "large" else "large"]
            new = els[:i] + [replace(e, scale=float(rng.uniform(lo, hi)))] + els[i + 1 :]
        elif op == "move" and free:
            r, c = free[int(rng.integers(len(free)))]
            new = els[:i] + [replace(e, row=r, col=c)] + els[i + 1 :]
        else:
            continue
        candidate = replace(scene, elements=tuple(new))
        if facts(candidate) != facts(scene):
            return candidate
    return make_scene(rng, style)  # nothing changed the facts (rare): a fresh scene instead


# --------------------------------------------------------------------------- rendering


def band_half_width(divider: Divider, size: int) -> float:
    """Half the divider's width, wobble included: cells next to it stay clear of this."""
    return size * (0.04 if divider.kind == "road" else 0.08)


def element_box(e: Element, divider: Divider | None, size: int) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1), inclusive, of an element: its cell minus the divider band, scaled."""
    cell = size / GRID
    x0, y0, x1, y1 = e.col * cell, e.row * cell, (e.col + 1) * cell, (e.row + 1) * cell
    if divider is not None:
        mid, half = size / 2, band_half_width(divider, size) + 1
        lo, hi = (y0, y1) if divider.horizontal else (x0, x1)
        lo, hi = (lo, min(hi, mid - half)) if lo < mid else (max(lo, mid + half), hi)
        x0, y0, x1, y1 = (x0, lo, x1, hi) if divider.horizontal else (lo, y0, hi, y1)
    w, h = (x1 - x0 - 2) * e.scale, (y1 - y0 - 2) * e.scale
    cx = (x0 + x1) / 2 + e.jitter[0] * (x1 - x0 - 2 - w) / 2
    cy = (y0 + y1) / 2 + e.jitter[1] * (y1 - y0 - 2 - h) / 2
    return round(cx - w / 2), round(cy - h / 2), round(cx + w / 2) - 1, round(cy + h / 2) - 1


def shade(c: RGB, f: float) -> RGB:
    return tuple(int(min(255, max(0, v * f))) for v in c)  # type: ignore[return-value]


def draw_building(d: ImageDraw.ImageDraw, box, style: Style, e: Element) -> None:
    x0, y0, x1, y1 = box
    roof = style.roofs[e.variant % len(style.roofs)][1]
    d.rectangle((x0 + 1, y0 + 1, x1 + 1, y1 + 1), fill=shade(style.ground, 0.45))  # shadow
    d.rectangle(box, fill=roof)
    if style.ridge:
        if x1 - x0 >= y1 - y0:
            d.line((x0, (y0 + y1) // 2, x1, (y0 + y1) // 2), fill=shade(roof, 0.75))
        else:
            d.line(((x0 + x1) // 2, y0, (x0 + x1) // 2, y1), fill=shade(roof, 0.75))
    else:
        d.rectangle(box, outline=shade(roof, 0.85))


def draw_tree(d: ImageDraw.ImageDraw, box, style: Style, e: Element) -> None:
    x0, y0, x1, y1 = box
    d.ellipse((x0 + 1, y0 + 1, x1 + 1, y1 + 1), fill=shade(style.tree, 0.55))
    d.ellipse(box, fill=style.tree)


def draw_lake(d: ImageDraw.ImageDraw, box, style: Style, e: Element) -> None:
    d.ellipse(box, fill=style.water)


def draw_field(d: ImageDraw.ImageDraw, box, style: Style, e: Element) -> None:
    x0, y0, x1, y1 = box
    crop, furrow = style.field
    d.rectangle(box, fill=crop)
    for t in range((x0 if e.variant else y0) + 1, (x1 if e.variant else y1), 3):
        d.line((t, y0, t, y1) if e.variant else (x0, t, x1, t), fill=furrow)


def draw_parking(d: ImageDraw.ImageDraw, box, style: Style, e: Element) -> None:
    x0, y0, x1, y1 = box
    d.rectangle(box, fill=style.parking)
    for x in range(x0 + 1, x1, 3):
        d.line((x, y0, x, y0 + (y1 - y0) // 3), fill=shade(style.parking, 1.8))
        d.line((x, y1 - (y1 - y0) // 3, x, y1), fill=shade(style.parking, 1.8))


def draw_pitch(d: ImageDraw.ImageDraw, box, style: Style, e: Element) -> None:
    x0, y0, x1, y1 = box
    d.rectangle(box, fill=style.pitch, outline=(235, 235, 230))
    d.line(((x0 + x1) // 2, y0, (x0 + x1) // 2, y1), fill=(235, 235, 230))


def draw_pool(d: ImageDraw.ImageDraw, box, style: Style, e: Element) -> None:
    x0, y0, x1, y1 = box
    d.rectangle(box, fill=(226, 222, 212))  # paving around the water
    d.rectangle((x0 + 1, y0 + 1, x1 - 1, y1 - 1), fill=style.pool)


DRAW: dict[str, Callable] = {
    "building": draw_building,
    "tree": draw_tree,
    "lake": draw_lake,
    "field": draw_field,
    "parking": draw_parking,
    "pitch": draw_pitch,
    "pool": draw_pool,
}


def divider_polygon(divider: Divider, size: int, phase: float) -> list[tuple[float, float]]:
    """The divider's outline: a straight band (road) or one meandering within its reserved width (river)."""
    half, mid = band_half_width(divider, size), size / 2
    t = np.arange(size + 1)
    if divider.kind == "river":  # a meandering band, wobble within its reserved width
        width = half * 0.6
        centre = mid + half * 0.4 * np.sin(2 * np.pi * t / size * 1.5 + phase)
    else:
        width, centre = half, np.full(len(t), mid)
    upper = [(float(x), float(c - width)) for x, c in zip(t, centre)]
    lower = [(float(x), float(c + width)) for x, c in zip(t[::-1], centre[::-1])]
    poly = upper + lower
    return poly if divider.horizontal else [(y, x) for x, y in poly]


def draw_divider(d: ImageDraw.ImageDraw, divider: Divider, style: Style, size: int, phase: float) -> None:
    mid = size / 2
    d.polygon(divider_polygon(divider, size, phase), fill=style.water if divider.kind == "river" else style.road)
    if divider.kind == "road":  # dashed centre line
        for s in range(0, size, 6):
            seg = (s, mid, s + 2, mid) if divider.horizontal else (mid, s, mid, s + 2)
            d.line(seg, fill=(214, 210, 190))


def ground(style: Style, size: int, rng: np.random.Generator) -> np.ndarray:
    """Base colour plus low-frequency mottling (forest canopy, soil patches)."""
    coarse = rng.normal(0.0, 1.0, (GRID + 1, GRID + 1)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BILINEAR))
    return np.asarray(style.ground, np.float32) + style.mottle * smooth[..., None]


def render(scene: Scene, size: int, style: Style | None = None) -> Image.Image:
    """Draw `scene` as a size x size RGB tile; deterministic in the scene (and its style) alone.

    `style` defaults to the benchmark's `STYLES[scene.domain]`; the web corpus passes its own."""
    style = style or STYLES[scene.domain]
    rng = np.random.default_rng(scene.texture_seed)
    img = Image.fromarray(np.clip(ground(style, size, rng), 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    if scene.divider:
        draw_divider(d, scene.divider, style, size, phase=float(rng.uniform(0, 2 * np.pi)))
    for e in scene.elements:
        DRAW[e.kind](d, element_box(e, scene.divider, size), style, e)
    noisy = np.asarray(img, np.float32) + rng.normal(0.0, style.grain, (size, size, 3))
    return Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8))


ELLIPSES = ("tree", "lake")  # kinds drawn as an ellipse in their box; the others fill it
SHADOWED = ("building", "tree")  # kinds that cast a shadow one pixel south-east


def object_masks(scene: Scene, size: int) -> list[tuple[str, np.ndarray]]:
    """The generator's own objects in `render(scene, size)`: (kind, size x size bool mask) per element
    in scene order, then the divider's visible part. Each mask is the shape `render` fills (a roof,
    a crown, a lake, a field with its furrows, a pool with its paving), shadows excluded; they are
    disjoint. Pure and style-free: the geometry does not depend on the palette."""

    def shape(draw: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
        canvas = Image.new("L", (size, size), 0)
        draw(ImageDraw.Draw(canvas))
        return np.asarray(canvas) > 0

    out, cover = [], np.zeros((size, size), bool)
    for e in scene.elements:
        x0, y0, x1, y1 = box = element_box(e, scene.divider, size)
        fill = "ellipse" if e.kind in ELLIPSES else "rectangle"
        mask = shape(lambda d: getattr(d, fill)(box, fill=1))
        out.append((e.kind, mask))
        cover |= mask
        if e.kind in SHADOWED:
            cover |= shape(lambda d: getattr(d, fill)((x0 + 1, y0 + 1, x1 + 1, y1 + 1), fill=1))
    if scene.divider:
        rng = np.random.default_rng(scene.texture_seed)
        rng.normal(0.0, 1.0, (GRID + 1, GRID + 1))  # `ground`'s draw, so that the phase is `render`'s
        phase = float(rng.uniform(0, 2 * np.pi))
        band = shape(lambda d: d.polygon(divider_polygon(scene.divider, size, phase), fill=1))
        out.append((scene.divider.kind, band & ~cover))  # elements are drawn after it
    return out


# --------------------------------------------------------------------------- captions


def pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def phrase(kind: str, members: list[Element], style: Style, rng: np.random.Generator) -> str:
    """'three red-roofed houses', 'a large lake': the count, then adjectives, then a noun."""
    n = len(members)
    singular, plural = pick(rng, NOUNS[kind])
    adjs = []
    if n == 1 and kind in SIZED:
        adjs.append(size_word(members[0]))
    roofs = {m.variant for m in members}
    if kind == "building" and len(roofs) == 1 and rng.random() < 0.5:
        adjs.append(style.roofs[roofs.pop() % len(style.roofs)][0] + "-roofed")
    words = " ".join(adjs + [singular if n == 1 else plural])
    if n > 1:
        return f"{NUMBER_WORDS[n]} {words}"
    if rng.random() < 0.2:
        return f"one {words}"
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def listing(g: dict[str, list[Element]], style: Style, rng: np.random.Generator) -> str:
    kinds = [list(g)[i] for i in rng.permutation(len(g))]
    return join([phrase(k, g[k], style, rng) for k in kinds])


def divider_nouns(divider: Divider, rng: np.random.Generator) -> tuple[str, str]:
    """('a road', 'the road') with one synonym for both."""
    noun = pick(rng, NOUNS[divider.kind])[0]
    return f"a {noun}", f"the {noun}"


def divider_clause(scene: Scene, rng: np.random.Generator) -> str:
    if scene.divider is None:
        return ""
    intro, _ = divider_nouns(scene.divider, rng)
    horizontal = scene.divider.horizontal
    course = pick(rng, ("east-west", "from left to right") if horizontal else ("north-south", "from top to bottom"))
    return pick(rng, (f", crossed by {intro}", f", with {intro} running {course}", f" along {intro}"))


def caption_listing(scene: Scene, style: Style, rng: np.random.Generator) -> str | None:
    opener = pick(rng, ("an aerial view of", "a satellite image showing", "an overhead view with", "a tile containing"))
    return f"{opener} {listing(groups(scene), style, rng)}{divider_clause(scene, rng)}"


def caption_area(scene: Scene, style: Style, rng: np.random.Generator) -> str | None:
    built = len(groups(scene).get("building", []))
    density = "undeveloped" if built == 0 else "sparsely built" if built <= 2 else "densely built"
    area = f"{density} {pick(rng, style.areas)}"
    article = "an" if area[0] in "aeiou" else "a"
    return f"{article} {area} with {listing(groups(scene), style, rng)}{divider_clause(scene, rng)}"


def caption_sides(scene: Scene, style: Style, rng: np.random.Generator) -> str | None:
    """'three houses north of a river, a lake south of it': per-side counts."""
    if scene.divider is None:
        return None
    intro, ref = divider_nouns(scene.divider, rng)
    compass = int(rng.integers(2))
    parts = []
    for s in sides(scene.divider):
        here = groups(scene, lambda e: side(e, scene.divider) == s)
        if here:
            parts.append((listing(here, style, rng), DIRECTIONS[s][compass]))
    if rng.random() < 0.5:
        parts.reverse()
    first = f"{parts[0][0]} {parts[0][1]} {intro}"
    return first if len(parts) == 1 else f"{first}, {parts[1][0]} {parts[1][1]} {pick(rng, ('it', ref))}"


def caption_between(scene: Scene, style: Style, rng: np.random.Generator) -> str | None:
    """'a road runs between two fields and a lake': kinds wholly on opposite sides."""
    if scene.divider is None:
        return None
    g = groups(scene)
    a, b = sides(scene.divider)
    on = {s: [k for k, v in g.items() if all(side(e, scene.divider) == s for e in v)] for s in (a, b)}
    if not on[a] or not on[b]:
        return None
    ka, kb = pick(rng, on[a]), pick(rng, on[b])
    intro, _ = divider_nouns(scene.divider, rng)
    verb = pick(rng, ("runs between", "passes between", "separates", "lies between"))
    text = f"{intro} {verb} {phrase(ka, g[ka], style, rng)} and {phrase(kb, g[kb], style, rng)}"
    rest = {k: v for k, v in g.items() if k not in (ka, kb)}
    return text + (f", with {listing(rest, style, rng)} as well" if rest else "")


def caption_relations(scene: Scene, style: Style, rng: np.random.Generator) -> str | None:
    """'three houses west of a large lake, two trees next to the lake, and a road'."""
    g = groups(scene)
    a = anchor(scene)
    related = [(k, relation(v, g[a])) for k, v in g.items() if k != a]
    related = [(k, r) for k, r in related if r]
    if not related:
        return None
    related = [related[i] for i in rng.permutation(len(related))]
    singular, plural = pick(rng, NOUNS[a])
    ref = f"the {singular if len(g[a]) == 1 else plural}"
    parts = [  # the anchor is introduced (with its count) once, then referred to as `ref`
        f"{phrase(k, g[k], style, rng)} {pick(rng, DIRECTIONS[r])} {phrase(a, g[a], style, rng) if i == 0 else ref}"
        for i, (k, r) in enumerate(related)
    ]
    rest = {k: v for k, v in g.items() if k != a and k not in dict(related)}
    plus = f", plus {listing(rest, style, rng)}" if rest else ""
    return join(parts) + plus + divider_clause(scene, rng)


TEMPLATES = (caption_sides, caption_between, caption_relations, caption_listing, caption_area)


def describe(scene: Scene, rng: np.random.Generator, n: int = 5, style: Style | None = None) -> list[str]:
    """`n` distinct captions, cycling through the templates that apply (relations first)."""
    style = style or STYLES[scene.domain]
    relational, plain = list(TEMPLATES[:3]), list(TEMPLATES[3:])
    order = [relational[i] for i in rng.permutation(3)] + [plain[i] for i in rng.permutation(2)]
    out: list[str] = []
    for attempt in range(20 * n):
        text = order[attempt % len(order)](scene, style, rng)
        if text is None:
            continue
        text = text[0].upper() + text[1:] + "."
        if text not in out:
            out.append(text)
            if len(out) == n:
                return out
    raise RuntimeError(f"could not write {n} distinct captions for {scene}")


def scene_label(scene: Scene) -> str:
    """The dominant land use: the kind with the most elements (ties: `KINDS` order)."""
    g = groups(scene)
    return max(g, key=lambda k: (len(g[k]), -KINDS.index(k)))


def geo_tags(scene: Scene) -> list[str]:
    return sorted({GEO_TAGS[k] for k in counts(scene)})


# --------------------------------------------------------------------------- the benchmark


def split_sizes(n: int, test_fraction: float, val_fraction: float) -> dict[str, int]:
    """Images per split for one domain: fractions rounded half up, train gets the rest."""
    test, val = int(n * test_fraction + 0.5), int(n * val_fraction + 0.5)
    return {"train": n - test - val, "val": val, "test": test}


def assign_splits(families: list[int], sizes: dict[str, int], rng: np.random.Generator) -> list[str]:
    """Split labels per image, keeping a near-duplicate pair (same family) together where the sizes allow."""
    ids = sorted(set(families))
    order = [ids[i] for i in rng.permutation(len(ids))]
    rank = {f: i for i, f in enumerate(order)}
    by_family = sorted(range(len(families)), key=lambda i: (rank[families[i]], i))
    labels = ["test"] * sizes["test"] + ["val"] * sizes["val"] + ["train"] * sizes["train"]
    out = [""] * len(families)
    for label, i in zip(labels, by_family):
        out[i] = label
    return out


def domain_rng(seed: int, domain: str, stream: int) -> np.random.Generator:
    """Independent of which other domains are generated, so a domain is reproducible alone."""
    return np.random.default_rng([seed, zlib.crc32(domain.encode()), stream])


def domain_scenes(cfg: SynthConfig, domain: str) -> tuple[list[Scene], list[str], np.random.Generator]:
    """The domain's scenes, their split labels, and the stream its captions and places continue from."""
    style = STYLES[domain]
    rng = domain_rng(cfg.seed, domain, 0)
    scenes: list[Scene] = []
    families: list[int] = []
    for i in range(cfg.images_per_domain):
        if i and families[-1] == i - 1 and rng.random() < cfg.near_duplicate_fraction:
            scenes.append(perturb(scenes[-1], rng, style))
            families.append(families[-1])
        else:
            scenes.append(make_scene(rng, style))
            families.append(i)
    sizes = split_sizes(cfg.images_per_domain, cfg.test_fraction, cfg.val_fraction)
    return scenes, assign_splits(families, sizes, domain_rng(cfg.seed, domain, 1)), rng


def domain_rows(cfg: SynthConfig, domain: str) -> list[dict]:
    style = STYLES[domain]
    scenes, splits, rng = domain_scenes(cfg, domain)
    rows = []
    for i, (scene, split) in enumerate(zip(scenes, splits)):
        rows.append(
            scene_row(scene, style, rng, f"{domain}_{i:06d}", domain, split, cfg.image_size, cfg.captions_per_image,
                      f"synth:{domain}:{i}")
        )
    return rows


def scene_row(scene: Scene, style: Style, rng: np.random.Generator, image_id: str, domain: str, split: str,
              image_size: int, captions: int, source: str) -> dict:
    """One manifest row of `scene` drawn in `style` (captions, then lat/lon, drawn from `rng` in that order)."""
    return {
        "image_id": image_id,
        "image": encode_png(render(scene, image_size, style)),
        "captions": describe(scene, rng, captions, style),
        "domain": domain,
        "split": split,
        "label": scene_label(scene),
        "lat": round(float(rng.uniform(*style.lat)), 5),
        "lon": round(float(rng.uniform(*style.lon)), 5),
        "geo_tags": geo_tags(scene),
        "source": source,
    }


def synthesize(cfg: SynthConfig, out: str, *, overwrite: bool = False) -> pa.Table:
    """Generate the benchmark described by `cfg`, write it as a manifest at `out`, return the table.

    `out` may be new, empty or a manifest; anything else needs `overwrite` (`manifest.check_output`).
    """
    cfg.validate()
    unknown = [d for d in cfg.domains if d not in STYLES]
    if unknown:
        raise ConfigError(f"synth.domains: unknown domain(s) {unknown}; the generator knows {sorted(STYLES)}")
    check_output(out, overwrite=overwrite)  # before the work
    rows = []
    for domain in cfg.domains:
        log.info("synth: %d %s images of %d px", cfg.images_per_domain, domain, cfg.image_size)
        rows += domain_rows(cfg, domain)
    table = to_table(rows)
    write_manifest(table, out, overwrite=overwrite)
    return table
