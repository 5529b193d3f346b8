"""`urbancross serve`: text -> tile search over an index, as a Ray Serve application.

One deployment (`SearchService`, a FastAPI ingress) holds the registered model, loaded once
per replica, and the index in memory. Text queries arriving together are embedded as one
batch (`@serve.batch`). Hits carry the tile's lat/lon, domain and a thumbnail URL, read from
the manifest the index was built from. `/` is a page (no script or style from elsewhere)
with the hits as a grid and at their lat/lon on a Leaflet map over a plain graticule; Leaflet
comes from PyPI (`django-js-lib-leaflet`, files only) and is served from where it is installed.

Ranking and the dimension check are search.py's (`top_k`, `check_dims`); images, the
gallery's and uploaded ones alike, are embedded by search.py's `IndexEmbedder`, as
`urbancross index` embeds them. With `serve.follow_alias_s` the replica polls the alias
(`models:/NAME@champion`): on a new version it loads it, re-embeds the gallery, and swaps
model and vectors in one assignment. A request uses one `State` from start to end, so
requests in flight finish on the version they started with and none is dropped.
"""
# no `from __future__ import annotations`: FastAPI must see the route parameters' real types (Request)

import asyncio
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, Response
from ray import serve

from urbancross.config import Config, ConfigError
from urbancross.data.manifest import ManifestError, decode_image, image_bytes, read_manifest, to_table
from urbancross.model.embed import numpy_batches
from urbancross.model.factory import get_tokenizer
from urbancross.model.pyfunc import embed_texts
from urbancross.registry.search import IndexEmbedder, check_dims, index_manifest, read_index, top_k
from urbancross.tracking import configure

log = logging.getLogger(__name__)

APP_NAME = "urbancross"
PAGE = Path(__file__).with_name("page.html")
ADDED_SPLIT = "added"  # split of the tiles added with POST /index
LIBRARY = "js_lib_leaflet"  # Leaflet 1.9.4 (BSD-2), from the `serve` extra: plain files, Django not needed
LIBRARY_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png", ".map": "application/json"}
MEDIA = {b"\x89PNG": "image/png", b"\xff\xd8\xff": "image/jpeg", b"GIF8": "image/gif", b"RIFF": "image/webp"}

api = FastAPI(title="UrbanCross search", docs_url=None, redoc_url=None)


# --------------------------------------------------------------------------- pure helpers


def resolve_model(model_uri: str) -> tuple[str, str | None]:
    """`models:/NAME@ALIAS` -> (`models:/NAME/VERSION`, VERSION) as the registry says now;
    `models:/NAME/VERSION` -> itself and VERSION; any other URI -> itself and None."""
    m = re.fullmatch(r"models:/([^/@]+)@([^/@]+)", model_uri)
    if m:
        from mlflow import MlflowClient

        version = str(MlflowClient().get_model_version_by_alias(m[1], m[2]).version)
        return f"models:/{m[1]}/{version}", version
    m = re.fullmatch(r"models:/([^/@]+)/(\d+)", model_uri)
    return model_uri, (m[2] if m else None)


def parse_bbox(text: str) -> tuple[float, float, float, float]:
    """`minlon,minlat,maxlon,maxlat` (degrees) -> floats; ValueError saying what is wrong."""
    parts = text.split(",")
    if len(parts) != 4:
        raise ValueError(f"bbox must be minlon,minlat,maxlon,maxlat (4 numbers), got {len(parts)} value(s)")
    try:
        minlon, minlat, maxlon, maxlat = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"bbox must be 4 numbers, got {text[:100]!r}") from None
    if not all(math.isfinite(v) for v in (minlon, minlat, maxlon, maxlat)):
        raise ValueError("bbox values must be finite")
    if not (-180 <= minlon <= maxlon <= 180):
        raise ValueError(f"bbox longitudes must satisfy -180 <= minlon <= maxlon <= 180, got {minlon:g}, {maxlon:g}")
    if not (-90 <= minlat <= maxlat <= 90):
        raise ValueError(f"bbox latitudes must satisfy -90 <= minlat <= maxlat <= 90, got {minlat:g}, {maxlat:g}")
    return minlon, minlat, maxlon, maxlat


def library_file(rel: str) -> Path:
    """`rel` under the installed Leaflet's folder -> that file; FileNotFoundError for anything else
    (a path leading outside it, a type the page has no use for, the package not installed)."""
    try:
        root = (Path(str(files(LIBRARY))) / "static" / LIBRARY).resolve()
    except ModuleNotFoundError:
        raise FileNotFoundError(f"the map library ({LIBRARY}) is not installed: pip install -e '.[serve]'") from None
    path = (root / rel).resolve()
    if not path.is_relative_to(root) or path.suffix not in LIBRARY_TYPES or not path.is_file():
        raise FileNotFoundError(f"no file {rel[:200]!r} in the map library")
    return path


def media_type(data: bytes) -> str:
    return next((t for magic, t in MEDIA.items() if data.startswith(magic)), "application/octet-stream")


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class State:
    """What one request reads: a model and the gallery vectors it embedded, together."""

    embedder: IndexEmbedder  # the model (loaded once) and the image path of `urbancross index`
    tokenize: Any  # the model's tokenizer (a new version may bring another)
    model_uri: str  # what was loaded: models:/NAME/VERSION for an alias
    version: str | None
    rows: pa.Table  # manifest rows of the gallery, in index order
    vectors: np.ndarray  # [N, D]
    where: dict[str, int]  # image_id -> row
    lat: np.ndarray  # [N], NaN where unknown
    lon: np.ndarray
    domains: np.ndarray


def gallery_rows(ids: list[str], manifest: str) -> pa.Table:
    """The manifest rows of `ids`, in that order; an id missing from the manifest is an error."""
    table = read_manifest(manifest)
    pos = pc.index_in(pa.array(ids, pa.string()), value_set=table.column("image_id"))
    if pos.null_count:
        missing = [i for i, p in zip(ids, pos.is_null().to_pylist()) if p]
        raise ManifestError(f"{manifest}: {len(missing)} image(s) of the index are not in the manifest, e.g. {missing[:3]}")
    return table.take(pos)


def make_state(embedder: IndexEmbedder, model_uri: str, version: str | None, rows: pa.Table, vectors: np.ndarray) -> State:
    """A state for `rows` and their `vectors` (from `embedder`'s model)."""
    def floats(name: str) -> np.ndarray:
        return np.array([np.nan if v is None else v for v in rows.column(name).to_pylist()], dtype=np.float64)

    ids = rows.column("image_id").to_pylist()
    return State(embedder, get_tokenizer(embedder.cfg.model), model_uri, version, rows, vectors, {i: n for n, i in enumerate(ids)},
                 floats("lat"), floats("lon"), np.asarray(rows.column("domain").to_pylist(), dtype=object))


def embed_rows_of(embedder: IndexEmbedder, rows: pa.Table, batch_size: int) -> np.ndarray:
    """Image vectors [N, D] of manifest rows, in order (as `build_index(use_ray=False)`)."""
    parts = [np.asarray(embedder(b)["image"], dtype=np.float32) for b in numpy_batches(rows, batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


# --------------------------------------------------------------------------- the deployment


@serve.deployment
@serve.ingress(api)
class SearchService:
    def __init__(self, cfg: Config, model_uri: str, index: str, manifest: str):
        configure(cfg)  # a replica does not inherit the driver's tracking URI
        self.cfg, self.scfg, self.alias_uri, self.index = cfg, cfg.serve, model_uri, index
        ids, _, vectors, built_with = read_index(index)
        self.manifest = manifest
        rows = gallery_rows(ids, manifest)
        uri, version = resolve_model(model_uri)
        embedder = IndexEmbedder(uri, cfg, manifest)
        self.state = make_state(embedder, uri, version, rows, vectors)
        check_dims(index, vectors, embed_texts(embedder.model, self.state.tokenize, ["x"]).shape[1], model_uri, built_with)
        self.lock = threading.Lock()  # one writer at a time: POST /index and the alias swap
        self.embed_queries.set_max_batch_size(self.scfg.max_batch_size)
        self.embed_queries.set_batch_wait_timeout_s(self.scfg.batch_wait_timeout_s)
        self.batch_sizes: list[int] = []  # sizes of the last text batches (GET /health shows them)
        self.stop = threading.Event()
        if self.scfg.follow_alias_s > 0:
            threading.Thread(target=self._follow, name="follow-alias", daemon=True).start()
        log.info("serve: %s (version %s) over %d images of %s", uri, version, len(ids), index)

    def __del__(self):
        self.stop.set()

    # ----------------------------------------------------------------- alias following

    def _follow(self) -> None:
        while not self.stop.wait(self.scfg.follow_alias_s):
            try:
                self.check_alias()
            except Exception as e:  # the registry may be down for a while: keep serving what we have
                log.warning("serve: following %s failed: %s", self.alias_uri, e)

    def check_alias(self) -> bool:
        """Load the version the alias names now, if it moved; True if it swapped."""
        uri, version = resolve_model(self.alias_uri)
        if version == self.state.version:
            return False
        embedder = IndexEmbedder(uri, self.cfg, self.manifest)  # loaded beside the serving one
        with self.lock:
            rows = self.state.rows
            vectors = embed_rows_of(embedder, rows, self.cfg.evaluate.batch_size)
            self.state = make_state(embedder, uri, version, rows, vectors)  # one assignment: the swap
        log.info("serve: %s moved to version %s: swapped", self.alias_uri, version)
        return True

    # ----------------------------------------------------------------- batching

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def embed_queries(self, texts: list[str]) -> list[tuple[State, np.ndarray]]:
        state = self.state
        self.batch_sizes = (self.batch_sizes + [len(texts)])[-100:]
        vectors = await asyncio.to_thread(embed_texts, state.embedder.model, state.tokenize, texts)
        return [(state, v) for v in vectors]

    # ----------------------------------------------------------------- results

    def hits(self, state: State, order: np.ndarray, scores: np.ndarray) -> list[dict[str, Any]]:
        ids = state.rows.column("image_id")
        out = []
        for i, s in zip(order.tolist(), scores.tolist()):
            image_id = ids[i].as_py()
            lat, lon = state.lat[i], state.lon[i]
            out.append({
                "image_id": image_id,
                "score": round(float(s), 6),
                "domain": state.domains[i],
                "lat": None if math.isnan(lat) else float(lat),
                "lon": None if math.isnan(lon) else float(lon),
                "thumbnail": f"/thumb/{image_id}",
            })
        return out

    @staticmethod
    def bbox(text: str | None) -> tuple[float, float, float, float] | None:
        try:
            return parse_bbox(text) if text else None
        except ValueError as e:
            raise HTTPException(400, str(e)) from None

    def keep(self, state: State, bbox: tuple[float, float, float, float] | None, domain: str | None) -> np.ndarray | None:
        mask = None
        if bbox:
            minlon, minlat, maxlon, maxlat = bbox
            with np.errstate(invalid="ignore"):  # NaN (no location) is outside every box
                mask = (state.lon >= minlon) & (state.lon <= maxlon) & (state.lat >= minlat) & (state.lat <= maxlat)
        if domain:
            m = state.domains == domain
            mask = m if mask is None else mask & m
        return mask

    def check_k(self, k: int) -> None:
        if not 1 <= k <= self.scfg.max_k:
            raise HTTPException(400, f"k must be between 1 and {self.scfg.max_k}, got {k}")

    async def body(self, request: Request) -> bytes:
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > self.scfg.max_upload_bytes:
            raise HTTPException(413, f"upload is {int(size)} bytes, over serve.max_upload_bytes {self.scfg.max_upload_bytes}")
        data = await request.body()
        if len(data) > self.scfg.max_upload_bytes:
            raise HTTPException(413, f"upload is {len(data)} bytes, over serve.max_upload_bytes {self.scfg.max_upload_bytes}")
        if not data:
            raise HTTPException(400, "the request body is empty: send the image bytes (PNG or JPEG)")
        return data

    def upload_row(self, data: bytes, image_id: str, domain: str, lat: float | None, lon: float | None) -> dict[str, Any]:
        """An uploaded image as a manifest row; a non-image or oversized one is a 400."""
        try:
            decode_image(data, f"upload {image_id}", max_pixels=self.cfg.data.max_image_pixels)
        except ManifestError as e:
            raise HTTPException(400, str(e)) from None
        return {"image_id": image_id, "image": data, "captions": ["(uploaded)"], "domain": domain, "split": ADDED_SPLIT, "lat": lat, "lon": lon}

    def embed_upload(self, state: State, row: dict[str, Any]) -> np.ndarray:
        batch = next(numpy_batches(to_table([row]), 1))
        return np.asarray(state.embedder(batch)["image"], dtype=np.float32)

    # ----------------------------------------------------------------- routes

    @api.get("/", response_class=HTMLResponse)
    def page(self) -> str:
        return PAGE.read_text(encoding="utf-8")

    @api.get("/static/leaflet/{rel:path}")
    def library(self, rel: str) -> Response:
        """The map library's JS, CSS and marker images, from where pip installed them."""
        try:
            path = library_file(rel)
        except FileNotFoundError as e:
            raise HTTPException(404, str(e)) from None
        return Response(content=path.read_bytes(), media_type=LIBRARY_TYPES[path.suffix], headers={"Cache-Control": "max-age=86400"})

    @api.get("/health")
    def health(self) -> dict[str, Any]:
        state = self.state
        known = ~np.isnan(state.lat) & ~np.isnan(state.lon)
        extent = ([float(state.lon[known].min()), float(state.lat[known].min()), float(state.lon[known].max()), float(state.lat[known].max())]
                  if known.any() else None)
        return {"status": "ok", "model": self.alias_uri, "model_uri": state.model_uri, "version": state.version,
                "images": len(state.where), "domains": sorted(set(state.domains.tolist())), "extent": extent,
                "max_batch_size": self.scfg.max_batch_size, "largest_recent_batch": max(self.batch_sizes, default=0)}

    @api.get("/tiles")
    def tiles(self) -> list[dict[str, Any]]:
        """Every tile's id, domain and lat/lon (the page plots them as the map's background)."""
        state = self.state
        return self.hits(state, np.arange(len(state.where)), np.zeros(len(state.where)))

    @api.get("/search")
    async def search(self, q: str = "", k: int = 10, bbox: str | None = None, domain: str | None = None) -> dict[str, Any]:
        q = q.strip()
        if not q:
            raise HTTPException(400, "q is empty: give a text query, e.g. /search?q=a+lake")
        if len(q) > self.scfg.max_query_chars:
            raise HTTPException(400, f"q is {len(q)} characters, over serve.max_query_chars {self.scfg.max_query_chars}")
        self.check_k(k)
        box = self.bbox(bbox)  # bad input fails before any embedding
        state, qvec = await self.embed_queries(q)
        order, scores = top_k(state.vectors, qvec, k, self.keep(state, box, domain))
        return {"query": q, "version": state.version, "hits": self.hits(state, order, scores)}

    @api.post("/search/image")
    async def search_image(self, request: Request, k: int = 10, bbox: str | None = None, domain: str | None = None) -> dict[str, Any]:
        """The uploaded image's nearest tiles, and the captions of the manifest nearest to it."""
        self.check_k(k)
        box = self.bbox(bbox)
        data = await self.body(request)
        state = self.state
        row = self.upload_row(data, "upload", "upload", None, None)
        qvec = (await asyncio.to_thread(self.embed_upload, state, row))[0]
        order, scores = top_k(state.vectors, qvec, k, self.keep(state, box, domain))
        captions = await asyncio.to_thread(self.caption_vectors, state)
        corder, cscores = top_k(captions[2], qvec, k)
        texts, owners, _ = captions
        near = [{"caption": texts[i], "image_id": owners[i], "score": round(float(s), 6)} for i, s in zip(corder.tolist(), cscores.tolist())]
        return {"version": state.version, "hits": self.hits(state, order, scores), "captions": near}

    def caption_vectors(self, state: State) -> tuple[list[str], list[str], np.ndarray]:
        """The gallery's captions, embedded once per model (cached on the state)."""
        cached = getattr(self, "_captions", None)
        if cached is not None and cached[0] is state.embedder and cached[1] == len(state.where):
            return cached[2]
        texts, owners = [], []
        for image_id, caps, split in zip(*(state.rows.column(c).to_pylist() for c in ("image_id", "captions", "split"))):
            if split != ADDED_SPLIT:
                texts.extend(caps)
                owners.extend([image_id] * len(caps))
        vecs = [embed_texts(state.embedder.model, state.tokenize, texts[i : i + 256]) for i in range(0, len(texts), 256)]
        value = (texts, owners, np.concatenate(vecs) if vecs else np.zeros((0, state.vectors.shape[1]), np.float32))
        self._captions = (state.embedder, len(state.where), value)
        return value

    @api.post("/index")
    async def add(
        self, request: Request, image_id: str = "", domain: str = "uploaded", lat: float | None = None, lon: float | None = None
    ) -> dict[str, Any]:
        """Add one tile (the body: its image bytes) to the index in memory, without a restart."""
        if not re.fullmatch(r"[\w.\-]{1,200}", image_id or ""):
            raise HTTPException(400, "image_id must be 1-200 letters, digits, '.', '_' or '-'")
        for name, value, bound in (("lat", lat, 90), ("lon", lon, 180)):
            if value is not None and not (math.isfinite(value) and -bound <= value <= bound):
                raise HTTPException(400, f"{name} must be between -{bound} and {bound}, got {value}")
        data = await self.body(request)
        row = self.upload_row(data, image_id, domain, lat, lon)

        def add_row() -> int:
            with self.lock:
                state = self.state
                if image_id in state.where:
                    raise HTTPException(409, f"image_id {image_id} is already in the index")
                vec = self.embed_upload(state, row)
                rows = pa.concat_tables([state.rows, to_table([row]).select(state.rows.column_names).cast(state.rows.schema)])
                self.state = make_state(state.embedder, state.model_uri, state.version, rows, np.concatenate([state.vectors, vec]))
                return len(self.state.where)

        return {"added": image_id, "images": await asyncio.to_thread(add_row)}

    @api.get("/thumb/{image_id}")
    def thumb(self, image_id: str) -> Response:
        state = self.state
        n = state.where.get(image_id)
        if n is None:
            raise HTTPException(404, f"no image {image_id[:200]!r} in the index")
        row = state.rows.slice(n, 1).to_pylist()[0]
        data = image_bytes(row, self.cfg.data.root or os.path.dirname(os.path.abspath(self.manifest)))
        return Response(content=data, media_type=media_type(data), headers={"Cache-Control": "max-age=3600"})


# --------------------------------------------------------------------------- driver side


def pick_manifest(index: str, manifest: str | None, cfg: Config) -> str:
    """The manifest of the index's tiles: given, else recorded in the index, else data.manifest."""
    chosen = manifest or index_manifest(index) or cfg.data.manifest
    if not chosen:
        raise ConfigError(f"{index}: no manifest recorded in the index and data.manifest is empty: pass --manifest")
    return chosen


def build_app(cfg: Config, model_uri: str, index: str, manifest: str | None = None):
    """The bound application: replicas and resources from `cfg.serve`."""
    s = cfg.serve
    if not os.path.isfile(index):
        raise FileNotFoundError(f"{index}: no such index (build it with `urbancross index`)")
    deployment = SearchService.options(
        num_replicas=s.num_replicas,
        ray_actor_options={"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
        max_ongoing_requests=s.max_ongoing_requests,
    )
    return deployment.bind(cfg, model_uri, os.path.abspath(index), pick_manifest(index, manifest, cfg))


def start(cfg: Config, model_uri: str, index: str, manifest: str | None = None) -> str:
    """Start Serve on `cfg.serve.host:port` (Ray started if needed) and deploy the app; -> its URL."""
    import ray

    app = build_app(cfg, model_uri, index, manifest)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, configure_logging=False)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(app, name=APP_NAME, route_prefix="/")
    return f"http://{cfg.serve.host}:{cfg.serve.port}/"


def run_forever(cfg: Config, model_uri: str, index: str, manifest: str | None = None) -> None:
    """`urbancross serve`: serve until interrupted, then shut Serve down."""
    url = start(cfg, model_uri, index, manifest)
    print(f"serving {model_uri} over {index} at {url} (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()


__all__ = ["SearchService", "State", "build_app", "library_file", "parse_bbox", "pick_manifest", "resolve_model", "run_forever", "start"]
