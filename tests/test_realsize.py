"""Real-size model paths, opt-in: `pytest -m realsize` (`--realsize-device cuda` on a GPU machine).

Weights are random, built from the libraries' own configs and saved in each real release's
key layout, so the code paths that real checkpoints take run here without a download: an
OpenCLIP ViT-B-32 state dict (the RemoteCLIP / GeoRSCLIP file layout) given as
`model.pretrained`, trained two steps with Ray Train + DeepSpeed ZeRO-3, evaluated and
registered; SAM `vit_b` (1024 px, segment_anything's builder) through the Ray Data stage; an
InstructBLIP with the real layer layout at reduced width through the LMM stage.

Each stage's wall time and the peak RSS of this process tree (the Ray processes it started
included) are recorded as test properties and, with URBANCROSS_REALSIZE_REPORT=FILE, appended
to FILE as JSON lines (bench/gpu_check.sh collects them). On CUDA the GPU's peak is sampled
from outside (nvidia-smi), since the models run in Ray worker processes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import threading
import time

import pytest
import torch
from ray import cloudpickle

from urbancross.config import SynthConfig, load_config

pytestmark = [pytest.mark.realsize, pytest.mark.ray]


@pytest.fixture(scope="module")
def device(request) -> str:
    name = request.config.getoption("--realsize-device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.fail("--realsize-device cuda: torch sees no CUDA device")
    return name


def tree_rss() -> int:
    """Resident memory of this process and all its descendants (Ray's raylet, workers, actors)."""
    import psutil

    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


@pytest.fixture
def measure(record_property, device):
    """`with measure(name) as extra:` records the block's wall time, the peak RSS of the process
    tree and what the block puts in `extra`."""

    @contextlib.contextmanager
    def run(name: str):
        baseline = tree_rss()
        peak = [baseline]
        stop = threading.Event()

        def sample():
            while not stop.wait(0.2):
                peak[0] = max(peak[0], tree_rss())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        started, t0 = time.time(), time.perf_counter()
        extra: dict = {}
        try:
            yield extra
        finally:
            seconds = time.perf_counter() - t0
            stop.set()
            thread.join()
            figures = {
                "stage": name,
                "device": device,
                "started": round(started, 1),
                "seconds": round(seconds, 1),
                "peak_rss_mb": round(max(peak[0], tree_rss()) / 2**20),
                "baseline_rss_mb": round(baseline / 2**20),
                "load_average_1min": round(os.getloadavg()[0], 2),
                "cpus": os.cpu_count(),
                **extra,
            }
            record_property(name, figures)
            print(f"\nrealsize {json.dumps(figures)}", flush=True)
            report = os.environ.get("URBANCROSS_REALSIZE_REPORT")
            if report:
                with open(report, "a") as f:
                    f.write(json.dumps(figures) + "\n")

    return run


def synth(path, images: int, size: int = 64):
    from urbancross.data.synth import synthesize

    return synthesize(SynthConfig(domains=["Finland"], images_per_domain=images, image_size=size, seed=0), str(path))


def record_worker(path: str, rank: int, epoch: int, step: int) -> None:
    """`on_step` hook, run in each Train worker: its process group backend and CUDA peak."""
    import torch.distributed as dist

    peak = round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None
    with open(f"{path}.rank{rank}.json", "w") as f:
        json.dump({"step": step, "backend": dist.get_backend(), "worker_cuda_peak_mb": peak}, f)


def test_vit_b32_checkpoint_trains_zero3_then_evaluates_and_registers(ray_session, tmp_path, device, measure, caplog):
    import open_clip

    from urbancross.evaluate.job import run_evaluate
    from urbancross.registry.promote import promote
    from urbancross.train import run_train

    manifest = tmp_path / "manifest"
    synth(manifest, 11)  # 8 train, 1 val, 2 test images (the seeded 70/10/20 split)
    torch.manual_seed(0)
    ckpt = tmp_path / "RemoteCLIP-ViT-B-32.pt"
    torch.save(open_clip.create_model("ViT-B-32-quickgelu").state_dict(), ckpt)  # the released files' layout
    workers = 1 if device == "cuda" else 2  # one GPU: one worker (NCCL); CPU: two (gloo)
    cfg = load_config(None, [
        f"data.manifest={manifest}", f"out_dir={tmp_path / 'run'}",
        "model.preset=ViT-B-32-quickgelu", f"model.pretrained={ckpt}", "model.use_segments=false",
        f"train.num_workers={workers}", "train.zero_stage=3", f"train.batch_size={8 // (2 * workers)}", "train.epochs=1",
        "train.lr=1.0e-5", "train.curriculum.enabled=false", "train.val_images=0", "train.ingest_actors=0",
        f"train.use_gpu={device == 'cuda'}", f"evaluate.num_gpus={1 if device == 'cuda' else 0}", "evaluate.batch_size=4",
    ])
    caplog.set_level(logging.INFO, logger="urbancross")
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the hook below runs in workers that cannot import this module
    with measure("vit_b32_train_zero3") as extra:
        result = run_train(cfg, on_step=functools.partial(record_worker, str(tmp_path / "worker")))
        worker = json.loads((tmp_path / "worker.rank0.json").read_text())
        extra.update(workers=workers, steps=result["metrics"]["step"], step_seconds=result["metrics"]["epoch_seconds"] / 2, **worker)
    assert (result["metrics"]["epoch"], result["metrics"]["step"]) == (1, 2)
    assert worker["backend"] == ("nccl" if device == "cuda" else "gloo")
    announced = [r.getMessage() for r in caplog.records if r.getMessage().startswith("model weights: loaded")]
    assert len(announced) == 1 and f"loaded {ckpt} (sha256 " in announced[0] and "151,277,313 parameters" in announced[0]

    exported = torch.load(result["model_path"], map_location="cpu")["state_dict"]
    start = torch.load(ckpt, map_location="cpu")
    for key in ("visual.proj", "visual.conv1.weight", "token_embedding.weight"):
        moved = (exported[f"clip.{key}"] - start[key]).abs().max().item()
        assert 0 < moved < 1e-2, (key, moved)  # started from the checkpoint (a fresh init is ~0.1 away), and trained

    with measure("vit_b32_evaluate"):
        records = run_evaluate(cfg, {"source": result["model_path"]})
    assert [r["tested_on"] for r in records] == ["Finland"] and records[0]["images"] == 2
    assert 0.0 <= records[0]["mR"] <= 100.0
    with measure("vit_b32_register"):
        decision = promote(cfg, result["mlflow_run_id"])
    assert (decision["version"], decision["decision"]) == (1, "champion")


def test_sam_vit_b_stage_through_ray_data(ray_session, tmp_path, device, measure):
    from segment_anything import sam_model_registry

    from urbancross.data.manifest import decode_image, read_manifest
    from urbancross.preprocess import run_preprocess

    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]()  # segment_anything's `_build_sam`: the 1024 px ViT-B encoder
    assert sam.image_encoder.img_size == 1024
    ckpt = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(sam.state_dict(), ckpt)  # the released file's layout
    del sam
    src, out = tmp_path / "manifest", tmp_path / "preprocessed"
    synth(src, 2, size=256)
    cfg = load_config(None, [
        f"out_dir={tmp_path / 'run'}", f"preprocess.input={src}", f"preprocess.output={out}",
        "preprocess.sam.model_type=vit_b", f"preprocess.sam.checkpoint={ckpt}", "preprocess.sam.points_per_side=8",
        "preprocess.sam.batch_size=2", f"preprocess.sam.num_gpus={1 if device == 'cuda' else 0}",
    ])
    with measure("sam_vit_b_stage"):
        summary = run_preprocess(cfg)
    assert (summary["rows_done"], summary["rejects"]) == (2, 0)
    table = read_manifest(out)
    for segments, real in zip(table["segments"].to_pylist(), table["num_real_segments"].to_pylist()):
        assert len(segments) == 10 and 0 <= real <= 10
        assert decode_image(segments[0]).size == (64, 64)


def test_instructblip_real_layout_refines_through_ray_data(ray_session, tmp_path, device, measure):
    from transformers import AutoConfig

    from tiny_lmm import REAL_LAYOUT, save_tiny_instructblip  # tests/ helper
    from urbancross.data.manifest import read_manifest
    from urbancross.preprocess import run_preprocess

    src, out = tmp_path / "manifest", tmp_path / "preprocessed"
    table = synth(src, 2)
    lmm = save_tiny_instructblip(tmp_path / "instructblip", [c for caps in table["captions"].to_pylist() for c in caps],
                                 layout=REAL_LAYOUT)
    config = AutoConfig.from_pretrained(lmm, local_files_only=True)
    layers = (config.vision_config.num_hidden_layers, config.qformer_config.num_hidden_layers, config.text_config.num_hidden_layers)
    assert layers == (39, 12, 32) and config.num_query_tokens == 32 and config.vision_config.image_size == 224
    cfg = load_config(None, [
        f"out_dir={tmp_path / 'run'}", f"preprocess.input={src}", f"preprocess.output={out}",
        "preprocess.sam.points_per_side=4",  # the tiny SAM: this test is about the LMM
        "preprocess.refine.kind=lmm", f"preprocess.refine.model_dir={lmm}", "preprocess.refine.max_new_tokens=16",
        "preprocess.refine.batch_size=2", f"preprocess.refine.num_gpus={1 if device == 'cuda' else 0}",
    ])
    with measure("instructblip_refine_stage"):
        summary = run_preprocess(cfg)
    assert (summary["rows_done"], summary["rejects"]) == (2, 0)
    result = read_manifest(out)
    assert [len(r) for r in result["refined_captions"].to_pylist()] == [len(c) for c in result["captions"].to_pylist()]
