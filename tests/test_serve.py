"""`urbancross serve`: the Ray Serve search app, over HTTP on 127.0.0.1.

One app for the module: a 3-domain benchmark (lat/lon per domain), a champion whose
projection heads are fitted to it (so a caption finds its own tile), the index built with it.
The tests then query the real app: search, filters, thumbnails, bad input, image upload,
adding a tile, and the alias moving to another version while requests are in flight.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("ray.serve", reason="needs ray[serve] (grpcio-reflection, watchfiles, mmh3)")
requests = pytest.importorskip("requests")

from servers import free_port  # noqa: E402  (tests/ helper)
from test_registry import fit_projections, log_run  # noqa: E402
from urbancross.config import config_from_dict  # noqa: E402
from urbancross.registry.serve import parse_bbox  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SPAIN = (-6.0, 36.5, 2.0, 43.0)  # synth.py's box for the Spain domain (minlon, minlat, maxlon, maxlat)


@pytest.fixture(scope="module")
def app(tmp_path_factory, ray_session):
    """The served app's base URL, its config and the manifest table; shuts Serve down after."""
    import pyarrow.compute as pc
    from mlflow import MlflowClient
    from ray import serve

    from urbancross.data.ingest import read_split
    from urbancross.data.manifest import read_manifest
    from urbancross.data.synth import synthesize
    from urbancross.model.factory import create_model, save_model
    from urbancross.registry.promote import promote
    from urbancross.registry.search import build_index
    from urbancross.registry.serve import APP_NAME, build_app
    from urbancross.tracking import configure

    root = tmp_path_factory.mktemp("serve")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # a SQLite store puts artifacts under ./mlruns
        port = free_port()
        cfg = config_from_dict({
            "out_dir": str(root / "run"),
            "synth": {"images_per_domain": 12, "test_fraction": 0.5, "val_fraction": 0.25},
            "data": {"manifest": str(root / "manifest")},
            "serve": {"port": port, "num_cpus": 0.25, "follow_alias_s": 0.5, "max_batch_size": 8},
        })
        synthesize(cfg.synth, cfg.data.manifest)
        torch.manual_seed(0)
        model = create_model(cfg.model)
        save_model(model, str(root / "random.pt"))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        fit_projections(model, cfg, read_split(cfg, "val"))
        torch.set_num_threads(threads)
        save_model(model, str(root / "trained.pt"))
        configure(cfg)
        trained_run, random_run = log_run(cfg, str(root / "trained.pt")), log_run(cfg, str(root / "random.pt"))
        assert promote(cfg, trained_run, evaluate=lambda c, u: {"A": 50.0})["decision"] == "champion"
        index = str(root / "index.parquet")
        build_index("models:/urbancross@champion", cfg.data.manifest, index, cfg, split="val", use_ray=False)

        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(cfg, "models:/urbancross@champion", index), name=APP_NAME, route_prefix="/")
        try:
            val = read_manifest(cfg.data.manifest).filter(pc.equal(read_manifest(cfg.data.manifest).column("split"), "val"))
            yield {"url": f"http://127.0.0.1:{port}", "cfg": cfg, "table": val, "index": index,
                   "random_run": random_run, "client": MlflowClient(cfg.tracking_uri()), "root": root}
        finally:
            serve.shutdown()


def get(app, path, **params):
    return requests.get(app["url"] + path, params=params, timeout=30)


def row_of(app, n: int) -> dict:
    return app["table"].slice(n, 1).to_pylist()[0]


def test_health_reports_the_champion_version(app):
    health = get(app, "/health").json()
    assert health["status"] == "ok" and health["model"] == "models:/urbancross@champion"
    assert (health["version"], health["model_uri"], health["images"]) == ("1", "models:/urbancross/1", 9)
    assert health["domains"] == ["Finland", "Germany", "Spain"]
    minlon, minlat, maxlon, maxlat = health["extent"]
    assert -6.0 <= minlon < maxlon <= 27.5 and 36.5 <= minlat < maxlat <= 62.0


def test_a_caption_finds_its_tile_with_location_and_thumbnail(app):
    """The served ranking is `urbancross search`'s, to the score; the first caption finds its tile."""
    from urbancross.registry.search import search

    val = app["table"].to_pylist()
    for row in val:
        body = get(app, "/search", q=row["captions"][0], k=5).json()
        want = search("models:/urbancross/1", app["index"], row["captions"][0], top=5)
        assert [h["image_id"] for h in body["hits"]] == [w["image_id"] for w in want] and body["version"] == "1"
        np.testing.assert_allclose([h["score"] for h in body["hits"]], [w["score"] for w in want], atol=1e-4)
    row = val[0]
    hit = get(app, "/search", q=row["captions"][0], k=1).json()["hits"][0]
    assert hit["image_id"] == row["image_id"]
    assert (hit["lat"], hit["lon"], hit["domain"]) == (pytest.approx(row["lat"]), pytest.approx(row["lon"]), row["domain"])
    thumb = requests.get(app["url"] + hit["thumbnail"], timeout=30)
    assert thumb.status_code == 200 and thumb.content == row["image"] and thumb.headers["content-type"] == "image/png"
    assert requests.get(app["url"] + "/thumb/nope", timeout=30).status_code == 404


def test_bbox_and_domain_filter_the_hits(app):
    hits = get(app, "/search", q="a lake next to a road", k=9, bbox=",".join(map(str, SPAIN))).json()["hits"]
    assert len(hits) == 3 and {h["domain"] for h in hits} == {"Spain"}
    assert all(SPAIN[0] <= h["lon"] <= SPAIN[2] and SPAIN[1] <= h["lat"] <= SPAIN[3] for h in hits)
    hits = get(app, "/search", q="a lake next to a road", k=9, domain="Finland").json()["hits"]
    assert len(hits) == 3 and {h["domain"] for h in hits} == {"Finland"}
    assert get(app, "/search", q="a lake", k=5, bbox=",".join(map(str, SPAIN)), domain="Finland").json()["hits"] == []


def test_bad_input_is_a_4xx_naming_the_problem_and_the_app_keeps_serving(app):
    cases = [
        ({"q": ""}, "q is empty"),
        ({"q": "   "}, "q is empty"),
        ({"q": "lake " * 1000}, "over serve.max_query_chars"),
        ({"q": "lake", "k": 0}, "k must be between 1 and 100"),
        ({"q": "lake", "k": 101}, "k must be between 1 and 100"),
        ({"q": "lake", "bbox": "1,2,3"}, "4 numbers"),
        ({"q": "lake", "bbox": "a,b,c,d"}, "must be 4 numbers"),
        ({"q": "lake", "bbox": "-200,0,10,10"}, "longitudes"),
        ({"q": "lake", "bbox": "0,50,10,40"}, "latitudes"),
    ]
    for params, message in cases:
        r = get(app, "/search", **params)
        assert r.status_code == 400 and message in r.json()["detail"], (params, r.text[:300])
    r = requests.post(app["url"] + "/search/image", data=b"not an image", timeout=30)
    assert r.status_code == 400 and "unreadable image" in r.json()["detail"]
    r = requests.post(app["url"] + "/search/image", data=b"", timeout=30)
    assert r.status_code == 400 and "body is empty" in r.json()["detail"]
    assert get(app, "/search", q="a lake", k=3).status_code == 200


def test_pure_bbox_parse():
    assert parse_bbox("-6,36.5,2,43") == SPAIN
    for bad in ("", "1,2,3,4,5", "nan,0,1,1", "0,0,inf,1", "10,0,0,1"):
        with pytest.raises(ValueError):
            parse_bbox(bad)


def test_an_uploaded_image_finds_its_tile_and_captions(app):
    row = row_of(app, 0)
    body = requests.post(app["url"] + "/search/image", params={"k": 3}, data=row["image"], timeout=60).json()
    assert body["hits"][0]["image_id"] == row["image_id"] and body["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert len(body["captions"]) == 3 and all(isinstance(c["caption"], str) and c["image_id"] for c in body["captions"])


def test_a_tile_added_without_restart_is_searchable(app):
    from urbancross.config import SynthConfig
    from urbancross.data.synth import synthesize

    extra = synthesize(SynthConfig(images_per_domain=4, seed=99), str(app["root"] / "extra")).slice(0, 1).to_pylist()[0]
    url = app["url"] + "/index"
    r = requests.post(url, params={"image_id": "new-1", "lat": 10.5, "lon": 20.25, "domain": "mine"}, data=extra["image"], timeout=60)
    assert r.status_code == 200 and r.json() == {"added": "new-1", "images": 10}
    assert requests.post(url, params={"image_id": "new-1"}, data=extra["image"], timeout=60).status_code == 409
    assert requests.post(url, params={"image_id": "bad/id"}, data=extra["image"], timeout=60).status_code == 400
    assert requests.post(url, params={"image_id": "x", "lat": 91}, data=extra["image"], timeout=60).status_code == 400
    assert requests.post(url, params={"image_id": "x"}, data=b"GIF89a broken", timeout=60).status_code == 400
    hit = requests.post(app["url"] + "/search/image", params={"k": 1}, data=extra["image"], timeout=60).json()["hits"][0]
    assert (hit["image_id"], hit["lat"], hit["lon"], hit["domain"]) == ("new-1", 10.5, 20.25, "mine")
    assert requests.get(app["url"] + "/thumb/new-1", timeout=30).content == extra["image"]
    hits = get(app, "/search", q="a lake", k=5, bbox="20,10,21,11").json()["hits"]
    assert [h["image_id"] for h in hits] == ["new-1"]


def test_page_is_served_and_fetches_nothing_from_elsewhere(app):
    r = get(app, "/")
    assert r.status_code == 200 and '<div id="map">' in r.text and "/search?" in r.text
    assert '<script src="/static/leaflet/leaflet.js">' in r.text and '<link rel="stylesheet" href="/static/leaflet/leaflet.css">' in r.text
    assert "http://" not in r.text and "https://" not in r.text and '="//' not in r.text


def test_the_map_library_is_served_from_its_package_and_nothing_outside_it(app):
    """/static/leaflet/ serves the installed Leaflet's files (pip's copy, byte for byte) with their
    content types; a path leading out of its folder, even to a file that exists, is a 404."""
    import http.client
    from urllib.parse import urlparse

    from urbancross.registry.serve import library_file

    js = get(app, "/static/leaflet/leaflet.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert js.content == library_file("leaflet.js").read_bytes() and b"Leaflet 1.9.4" in js.content[:200]
    assert get(app, "/static/leaflet/leaflet.css").headers["content-type"].startswith("text/css")
    assert get(app, "/static/leaflet/images/marker-icon.png").content[:4] == b"\x89PNG"
    assert (library_file("leaflet.js").parents[2] / "__init__.py").is_file()  # what ../../__init__.py would reach exists
    host = urlparse(app["url"])
    for path in ("../../__init__.py", "../../apps.py", "%2E%2E/%2E%2E/__init__.py", "..%2F..%2F__init__.py", "images", "nope.js"):
        conn = http.client.HTTPConnection(host.hostname, host.port, timeout=30)  # sends the path as is (requests drops ../)
        conn.request("GET", "/static/leaflet/" + path)
        resp = conn.getresponse()
        assert resp.status == 404 and b"__version__" not in resp.read(), path
        conn.close()
    for bad in ("../../__init__.py", "../../apps.py", "/etc/passwd", "images", "leaflet.js/..", "nope.js"):
        with pytest.raises(FileNotFoundError, match="no file"):
            library_file(bad)


def test_alias_move_swaps_the_model_without_failing_a_request(app):
    """Version 2 (random heads) becomes champion while 4 clients query: every request answers
    200, answers move from version 1 to 2, and v2's gallery was re-embedded (an indexed image
    finds itself with score 1 again)."""
    import mlflow

    client = app["client"]
    v2 = mlflow.register_model(f"runs:/{app['random_run']}/model", "urbancross").version
    results: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def hammer():
        while not stop.is_set():
            r = get(app, "/search", q="two buildings north of a road", k=3)
            results.append((r.status_code, r.json().get("version") if r.status_code == 200 else r.text[:200]))

    workers = [threading.Thread(target=hammer) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        time.sleep(1.0)
        client.set_registered_model_alias("urbancross", "champion", v2)
        deadline = time.monotonic() + 60
        while get(app, "/health").json()["version"] != str(v2):
            assert time.monotonic() < deadline, "the app did not follow the alias within 60 s"
            time.sleep(0.3)
        time.sleep(1.0)
    finally:
        stop.set()
        for w in workers:
            w.join()
    codes = {c for c, _ in results}
    versions = [v for _, v in results]
    assert codes == {200}, [r for r in results if r[0] != 200][:3]
    assert versions[0] == "1" and versions[-1] == str(v2) and len(results) > 20
    row = row_of(app, 5)
    hit = requests.post(app["url"] + "/search/image", params={"k": 1}, data=row["image"], timeout=60).json()["hits"][0]
    assert hit["image_id"] == row["image_id"] and hit["score"] == pytest.approx(1.0, abs=1e-4)


def test_the_page_in_headless_chromium_shows_the_hits_as_a_grid_and_on_the_map(app, tmp_path):
    """Debian's chromium loads /?q=..., which runs the search: the grid and the map's (Leaflet's)
    markers in the DOM are the API's hits, in order; a screenshot is saved beside the test's files."""
    import re
    import shutil
    import subprocess

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("no chromium (Debian: apt-get install chromium)")
    query = "a lake next to a road"
    url = f"{app['url']}/?q={requests.utils.quote(query)}&k=5"
    flags = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=15000", "--window-size=1200,800"]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    want = [h["image_id"] for h in get(app, "/search", q=query, k=5).json()["hits"]]
    assert re.findall(r'class="hit" data-image-id="([^"]+)"', dom) == want, dom[-2000:]
    assert re.findall(r'<img [^>]*class="leaflet-marker-icon[^"]*"[^>]*data-image-id="([^"]+)"', dom) == want  # Leaflet's markers
    assert len(re.findall(r'<path class="tile ', dom)) >= 9  # every indexed tile as the map's background
    shot = tmp_path / "page.png"
    subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    assert shot.read_bytes()[:4] == b"\x89PNG"


def test_the_serve_command_builds_a_missing_index_then_serves(app, tmp_path, monkeypatch, capsys):
    """demo -> promote -> serve: `urbancross serve` on the run's saved config builds the index
    the first time (from data.manifest), then hands it to the app."""
    from urbancross.cli import main
    from urbancross.config import save_config
    from urbancross.registry.search import read_index

    served = []
    monkeypatch.setattr("urbancross.registry.serve.run_forever", lambda cfg, model, index, manifest: served.append((cfg.serve.port, model, index)))
    save_config(app["cfg"], tmp_path / "config.yaml")
    index = str(tmp_path / "index.parquet")
    args = ["serve", "--config", str(tmp_path / "config.yaml"), "--model", "models:/urbancross@champion", "--index", index]
    assert main([*args, "--port", "8123"]) == 0
    assert served == [(8123, "models:/urbancross@champion", index)] and len(read_index(index)[0]) == 36  # every tile of the manifest
    assert main([*args[:-1], str(tmp_path / "other.parquet"), "--set", "data.manifest=''"]) == 2
    assert "no manifest to build it from" in capsys.readouterr().err


def test_a_user_types_a_query_and_drags_a_box_in_headless_chromium(app, tmp_path):
    """Chromium driven over its DevTools protocol as a user would: type into the query box,
    press Enter, read the grid and Leaflet's markers from the DOM (the API's hits, in order),
    shift-drag a box around Spain on the map and get only Spain's tiles (a screenshot is saved),
    open a marker's popup; every request the page made went to the app on 127.0.0.1."""
    import asyncio
    import base64
    import json
    import shutil
    import subprocess

    websockets = pytest.importorskip("websockets")
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("no chromium (Debian: apt-get install chromium)")
    query, port = "a lake next to a road", free_port()
    proc = subprocess.Popen(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
         "--window-size=1200,900", f"--remote-debugging-port={port}", "--remote-allow-origins=*", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    fetched: list[str] = []  # every URL the page requested (Network.requestWillBeSent)

    async def drive(ws_url: str) -> dict:
        async with websockets.connect(ws_url, max_size=None) as ws:
            ids = iter(range(1, 10**6))

            async def call(method: str, **params):
                n = next(ids)
                await ws.send(json.dumps({"id": n, "method": method, "params": params}))
                while True:
                    msg = json.loads(await ws.recv())
                    if msg.get("method") == "Network.requestWillBeSent":
                        fetched.append(msg["params"]["request"]["url"])
                    if msg.get("id") == n:
                        assert "error" not in msg, msg
                        return msg.get("result", {})

            async def js(expr: str):
                return (await call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True))["result"].get("value")

            async def until(expr: str, timeout: float = 60.0):
                deadline = time.monotonic() + timeout
                while not (value := await js(expr)):
                    assert time.monotonic() < deadline, f"timed out waiting for {expr}"
                    await asyncio.sleep(0.25)
                return value

            ids_of = "[...document.querySelectorAll('{}')].map((e) => e.dataset.imageId)"
            await call("Network.enable")
            await call("Page.navigate", url=app["url"] + "/")
            await until("document.querySelectorAll('#map path.tile').length >= 9")  # the page has loaded /health and /tiles
            await js("document.getElementById('k').value = '5'; document.getElementById('q').focus()")
            await call("Input.insertText", text=query)
            for kind in ("keyDown", "keyUp"):
                await call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13, text="\r")
            hits = await until(ids_of.format(".hit"))
            markers = await js(ids_of.format("#map .leaflet-marker-icon"))
            corners = await js(  # Spain's box (synth.py), a little wider, in page pixels
                "(() => { const r = map.getContainer().getBoundingClientRect();"
                f" return [[{SPAIN[3] + 0.5}, {SPAIN[0] - 0.5}], [{SPAIN[1] - 0.5}, {SPAIN[2] + 0.5}]]"
                ".map((ll) => map.latLngToContainerPoint(ll)).map((p) => [r.left + p.x, r.top + p.y]); })()"
            )
            (x0, y0), (x1, y1) = corners
            shift = 8  # CDP's modifier bit for Shift
            await call("Input.dispatchMouseEvent", type="mousePressed", x=x0, y=y0, button="left", clickCount=1, modifiers=shift)
            await call("Input.dispatchMouseEvent", type="mouseMoved", x=(x0 + x1) / 2, y=(y0 + y1) / 2, button="left", modifiers=shift)
            await call("Input.dispatchMouseEvent", type="mouseReleased", x=x1, y=y1, button="left", clickCount=1, modifiers=shift)
            await until("document.getElementById('status').textContent.includes('in the box')")
            boxed = await js("[...document.querySelectorAll('.hit')].map((e) => e.textContent)")
            boxed_ids = await js(ids_of.format(".hit"))
            boxed_markers = await js(ids_of.format("#map .leaflet-marker-icon"))
            await asyncio.sleep(0.5)  # the grid's thumbnails
            shot = base64.b64decode((await call("Page.captureScreenshot", format="png"))["data"])
            await js("document.querySelector('#map .leaflet-marker-icon').click()")
            popup = await until("document.querySelector('.leaflet-popup-content')?.textContent")
            return {"hits": hits, "markers": markers, "boxed": boxed, "boxed_ids": boxed_ids, "boxed_markers": boxed_markers,
                    "popup": popup, "shot": shot}

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                pages = [t for t in requests.get(f"http://127.0.0.1:{port}/json", timeout=5).json() if t["type"] == "page"]
                if pages:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "chromium's DevTools endpoint did not come up"
            time.sleep(0.5)
        seen = asyncio.run(drive(pages[0]["webSocketDebuggerUrl"]))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    want = get(app, "/search", q=query, k=5).json()["hits"]
    assert seen["hits"] == [h["image_id"] for h in want] and seen["markers"] == seen["hits"]  # one Leaflet marker per hit
    assert seen["boxed"] and all(" Spain " in text for text in seen["boxed"]), seen["boxed"]
    assert seen["boxed_markers"] == seen["boxed_ids"] and len(seen["boxed_ids"]) == 3  # Spain's 3 tiles, on the map too
    wide = (SPAIN[0] - 0.5, SPAIN[1] - 0.5, SPAIN[2] + 0.5, SPAIN[3] + 0.5)
    first = get(app, "/search", q=query, k=5, bbox=",".join(map(str, wide))).json()["hits"][0]
    assert seen["popup"].startswith(f"#1 {first['image_id']} score {first['score']:.3f}"), seen["popup"]
    assert f"{app['url']}/static/leaflet/leaflet.js" in fetched and f"{app['url']}/search?q=" in " ".join(fetched)
    assert all(u.startswith(app["url"] + "/") for u in fetched), [u for u in fetched if not u.startswith(app["url"] + "/")]
    (tmp_path / "typed.png").write_bytes(seen["shot"])
    assert seen["shot"][:4] == b"\x89PNG"
