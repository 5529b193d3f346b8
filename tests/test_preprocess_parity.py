"""The preprocess stage gives the same bytes however it runs: per-batch CLIP scoring vs the
per-row scoring it replaced, and the Ray Data pipeline vs the in-process sequential loop."""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from urbancross.config import load_config
from urbancross.data.manifest import decode_image, encode_png, read_manifest, write_manifest
from urbancross.embedded import ensure_tiny_sam
from urbancross.preprocess.pipeline import in_order, local_blocks, resolve_paths, run_preprocess, split_status
from urbancross.preprocess.sam import ClipScorer, Segmenter, select_segments


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    from urbancross.config import SynthConfig
    from urbancross.data.synth import synthesize

    out = tmp_path_factory.mktemp("parity") / "manifest"
    return synthesize(SynthConfig(images_per_domain=3, domains=["Finland", "Spain"]), str(out))


def _fake_masks(seed: int, n: int = 14, shape=(64, 64)):
    rng = np.random.default_rng(seed)
    return [
        {"segmentation": rng.random(shape) < rng.uniform(0.1, 0.9), "predicted_iou": rng.uniform(0.5, 1),
         "stability_score": rng.uniform(0.5, 1)}
        for _ in range(n)
    ]


class ManyMasks(Segmenter):
    """The real stage with a SAM that proposes 14 masks per image (a function of its pixels):
    the random tiny SAM proposes one at most, so CLIP ranking would never run."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.generator.generate = lambda arr: _fake_masks(zlib.crc32(arr.tobytes()), 14, arr.shape[:2])


@torch.no_grad()
def test_batch_clip_scores_equal_the_per_row_scores_they_replace():
    cfg = load_config()
    scorer = ClipScorer(cfg.model)
    rng = np.random.default_rng(1)
    groups = [[Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(k)] for k in (12, 3, 7)]
    captions = [["a red roof by a road"], ["two boats", "a harbour with boats", "sea"], ["a field", "green fields"]]
    got = scorer.batch(groups, captions)
    for g, cs, s in zip(groups, captions, got):
        # the per-row formula used before: one image and one text forward per row
        img = scorer.model.encode_image(torch.stack([scorer.transform(x) for x in g]))
        txt = torch.nn.functional.normalize(scorer.model.encode_text(torch.as_tensor(scorer.tokenize(cs))).mean(0), dim=-1)
        want = (img @ txt).numpy()
        assert s.shape == (len(g),)
        np.testing.assert_allclose(s, want, rtol=1e-4, atol=1e-5)
        assert list(np.argsort(-s, kind="stable")) == list(np.argsort(-want, kind="stable"))


def test_batched_segmenter_gives_the_per_row_selection_bytes(table, tmp_path):
    """process() over a batch (SAM per image, CLIP once per batch, only chosen masks painted)
    returns the segments select_segments gives row by row, in both selection modes."""
    ckpt = ensure_tiny_sam(tmp_path / "sam.pth")
    rows = table.to_pylist()
    rows[1]["split"], rows[2]["split"] = "train", "test"  # both kinds of row in one batch
    arrs = [np.asarray(decode_image(r["image"]).convert("RGB")) for r in rows]
    fakes = {id(a): _fake_masks(i, 14 if i % 3 else 6) for i, a in enumerate(arrs)}  # some rows need the fill
    for mode in ("quality", "caption"):
        cfg = load_config(None, [f"out_dir={tmp_path}", f"preprocess.sam.checkpoint={ckpt}", f"preprocess.sam.selection={mode}"])
        seg = Segmenter(cfg)
        seg.generator.generate = lambda arr: fakes[id(arr)]
        got = seg.process(arrs, rows)
        for a, r, g in zip(arrs, rows, got):
            want, real = select_segments(a, fakes[id(a)], seg.cfg, seg.scorer(r))
            assert g["num_real_segments"] == real
            assert g["segments"] == [encode_png(s) for s in want]
        assert sorted({g["num_real_segments"] for g in got}) == [6, 10]
        if mode == "caption":
            assert seg.timings["clip_scoring"] > 0


@pytest.mark.ray
@pytest.mark.parametrize("fused", [False, True], ids=["two-pools", "fused-2-actors"])
def test_ray_path_writes_the_manifest_the_sequential_loop_computes(ray_session, table, tmp_path, fused):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(__import__(__name__))  # Ray workers cannot import this test module
    src, out = tmp_path / "in", tmp_path / "out"
    write_manifest(table, src)
    threads = torch.get_num_threads()
    cfg = load_config(None, [
        f"out_dir={tmp_path}", f"preprocess.input={src}", f"preprocess.output={out}", "seed=3",
        "preprocess.sam.selection=caption", "preprocess.sam.batch_size=4", "preprocess.sam.threads=1",
        "preprocess.refine.batch_size=2", "preprocess.refine.threads=1", "preprocess.block_rows=4",
        f"preprocess.fuse_stages={str(fused).lower()}", f"preprocess.sam.concurrency={2 if fused else 1}",
    ])
    stages = {"sam": ManyMasks}
    try:
        resolved, _, _, root = resolve_paths(cfg)
        local = pa.concat_tables([split_status(b)[0] for b in local_blocks(table, resolved, root, stages)])
        quality = resolved.override({"preprocess.sam.selection": "quality"})
        by_quality = pa.concat_tables([split_status(b)[0] for b in local_blocks(table, quality, root, stages)])
    finally:
        torch.set_num_threads(threads)
    summary = run_preprocess(cfg, stages=stages)
    ray_out = read_manifest(out)
    local = in_order(local, table["image_id"].to_pylist())
    assert summary["rows_done"] == table.num_rows == local.num_rows and summary["startup_s"] > 0
    assert set(local["num_real_segments"].to_pylist()) == {10}
    for col in ("image_id", "segments", "num_real_segments", "refined_captions", "image"):
        assert ray_out[col].to_pylist() == local[col].to_pylist(), col
    assert ray_out.equals(local)
    # the ranking ran: training rows (only those) differ from the quality ranking
    train = [s == "train" for s in table["split"].to_pylist()]
    same = [a == b for a, b in zip(local["segments"].to_pylist(), by_quality["segments"].to_pylist())]
    assert not any(s for s, t in zip(same, train) if t) and all(s for s, t in zip(same, train) if not t)


def test_threads_block_rows_and_plan_come_from_config(table, tmp_path):
    from urbancross.preprocess.pipeline import StageActor, stage_plan

    cfg = load_config(None, [
        f"out_dir={tmp_path}", "preprocess.sam.threads=1", "preprocess.refine.threads=3", "preprocess.sam.batch_size=2",
        "preprocess.refine.batch_size=5", "preprocess.block_rows=4", "preprocess.sam.concurrency=2",
    ])
    plan = stage_plan(cfg)
    assert "sam: 2 actor(s) x 0.5 CPU 0 GPU, threads 1, batch 2" in plan and "threads 3, batch 5" in plan
    assert plan.endswith("block_rows 4")
    assert stage_plan(load_config()).endswith("threads torch default, batch 4; block_rows 8")
    fused = stage_plan(cfg.override({"preprocess.fuse_stages": True}))
    assert fused.startswith("sam+refine fused: 2 actor(s) x 0.5 CPU 0 GPU, threads 1, batch 2/5")
    threads = torch.get_num_threads()
    try:
        StageActor("refine", cfg, "")
        assert torch.get_num_threads() == 3
        blocks = list(local_blocks(table, cfg, ""))  # passthrough refine; SAM on the tiny model
        assert [b.num_rows for b in blocks] == [4, 2]
    finally:
        torch.set_num_threads(threads)
