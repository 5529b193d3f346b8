"""Requests/s and p50/p99 latency of `GET /search` against the Serve app, batching on and off.

    PYTHONPATH=. .venv/bin/python bench/serve_bench.py [--clients 1 8 32] [--seconds 10] [--batch 16]

Self-contained: synthesizes a small benchmark, logs a tiny random model to a temporary SQLite
store, registers it as `champion`, builds the index, and serves it on a free 127.0.0.1 port,
once with `serve.max_batch_size=--batch` and once with 1 (batching off). Each client sends
queries back to back (a different caption each time) for `--seconds`. Latency is measured at
the client, so it includes HTTP and the proxy. The last line is JSON.
"""

import argparse
import json
import os
import sys
import tempfile
import threading
import time

import numpy as np
import requests

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from servers import free_port  # noqa: E402  (tests/ helper)


def setup(root: str, images_per_domain: int):
    import torch

    from urbancross.config import config_from_dict
    from urbancross.data.synth import synthesize
    from urbancross.model.factory import create_model, save_model
    from urbancross.model.pyfunc import log_model
    from urbancross.registry.promote import promote
    from urbancross.registry.search import build_index
    from urbancross.tracking import configure, mlflow_run

    os.chdir(root)
    cfg = config_from_dict({"out_dir": f"{root}/run", "synth": {"images_per_domain": images_per_domain}, "data": {"manifest": f"{root}/manifest"}})
    table = synthesize(cfg.synth, cfg.data.manifest)
    torch.manual_seed(0)
    save_model(create_model(cfg.model), f"{root}/model.pt")
    configure(cfg)
    with mlflow_run(cfg, "bench") as run:
        log_model(f"{root}/model.pt", cfg)
    promote(cfg, run.info.run_id, evaluate=lambda c, u: {"A": 1.0})
    build_index("models:/urbancross@champion", cfg.data.manifest, f"{root}/index.parquet", cfg, use_ray=False)
    captions = [c for caps in table.column("captions").to_pylist() for c in caps]
    return cfg, captions


def load(url: str, captions: list[str], clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors = [0]
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        session = requests.Session()
        n = i
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            r = session.get(url + "/search", params={"q": captions[n % len(captions)], "k": 10}, timeout=60)
            latencies.append(time.perf_counter() - t0)
            errors[0] += r.status_code != 200
            n += clients

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.asarray(latencies) * 1000
    return {"clients": clients, "requests": len(ms), "errors": errors[0], "rps": round(len(ms) / wall, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--batch", type=int, default=16, help="serve.max_batch_size with batching on")
    ap.add_argument("--images-per-domain", type=int, default=50)
    args = ap.parse_args()

    import ray
    from ray import serve

    from urbancross.registry.serve import APP_NAME, build_app

    with tempfile.TemporaryDirectory() as root:
        cfg, captions = setup(root, args.images_per_domain)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        results = {}
        try:
            for mode, batch in (("batching_on", args.batch), ("batching_off", 1)):
                run_cfg = cfg.override({"serve.max_batch_size": batch, "serve.port": port}, where="bench")
                serve.run(build_app(run_cfg, "models:/urbancross@champion", f"{root}/index.parquet"), name=APP_NAME, route_prefix="/")
                load(url, captions, 4, 2.0)  # warm-up
                results[mode] = []
                for clients in args.clients:
                    row = load(url, captions, clients, args.seconds)
                    results[mode].append(row)
                    print(f"{mode:<13} max_batch_size={batch:<3} " + "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()
    ratios = {str(on["clients"]): round(on["rps"] / off["rps"], 2) for on, off in zip(results["batching_on"], results["batching_off"])}
    print("throughput batching on / off, by clients: " + ", ".join(f"{c}: {r}x" for c, r in ratios.items()))
    print(json.dumps({"load_average": os.getloadavg(), "cpus": os.cpu_count(), **results, "rps_ratio_on_off": ratios}))


if __name__ == "__main__":
    main()
