"""Preprocess: segment selection, caption checks, per-row safety, real model loading, Ray pipeline."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tiny_lmm import save_tiny_instructblip  # tests/ helper
from urbancross.cli import main
from urbancross.config import ConfigError, RefineConfig, SamConfig, load_config
from urbancross.data.manifest import MANIFEST_SCHEMA, decode_image, read_manifest, to_table, write_manifest
from urbancross.embedded import ensure_tiny_sam
from urbancross.preprocess.pipeline import (
    StageActor,
    load_image,
    parts_path,
    rejects_path,
    run_guarded,
    run_preprocess,
    with_status,
)
from urbancross.preprocess.refine import (
    Passthrough,
    Refiner,
    check_caption,
    choose_captions,
    format_prompt,
    repeat_fraction,
)
from urbancross.preprocess.sam import (
    Segmenter,
    best,
    grid_masks,
    largest,
    load_sam,
    mask_quality,
    paint_segment,
    select_segments,
)


def png(mode: str, size: tuple[int, int], color=0) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def row(image_id: str, image: bytes, captions=("a river next to two houses",)) -> dict:
    return {"image_id": image_id, "image": image, "captions": list(captions), "domain": "D", "split": "train",
            "source": f"test:{image_id}", "geo_tags": ["waterway=river"]}


# --------------------------------------------------------------------------- pure selection logic


def test_largest_and_best_order_and_ties():
    assert largest([5, 9, 1, 9, 3], 3) == [1, 3, 0]
    assert best([0.1, 0.7, 0.7, -1.0], 2) == [1, 2]
    assert best([0.3], 5) == [0]


def test_grid_masks_tile_the_image_row_major():
    masks = grid_masks(4, 6, 3)  # g = 2: cells of 2 x 3 px, first three in row-major order
    assert len(masks) == 3
    assert [int(m.sum()) for m in masks] == [6, 6, 6]
    assert masks[0][:2, :3].all() and masks[1][:2, 3:].all() and masks[2][2:, :3].all()
    assert not (masks[0] & masks[1]).any()
    assert grid_masks(4, 4, 0) == []


def test_paint_segment_white_and_crop():
    img = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    mask = np.zeros((4, 4), dtype=bool)
    mask[1:3, 2:4] = True
    white = np.asarray(paint_segment(img, mask, "white", 4))
    assert (white[~mask] == 255).all() and (white[mask] == img[mask]).all()
    crop = np.asarray(paint_segment(img, mask, "crop", 2))
    assert crop.shape == (2, 2, 3) and (crop == img[1:3, 2:4]).all()


def _record(m, iou=0.9, stability=0.9):
    return {"segmentation": m, "predicted_iou": iou, "stability_score": stability}


def test_select_segments_keeps_largest_then_best_then_fills():
    img = np.full((8, 8, 3), 50, dtype=np.uint8)
    masks = []
    for area_rows, iou in ((1, 0.9), (4, 0.5), (2, 0.8), (3, 0.5)):  # areas 8, 32, 16, 24
        m = np.zeros((8, 8), dtype=bool)
        m[:area_rows] = True
        masks.append(_record(m, iou))
    scored = []

    def score(segments):
        scored.append(len(segments))
        return np.array([0.1, 0.9, 0.5])  # for masks by area: 32, 24, 16

    def white_rows(segs):
        return [int((np.asarray(s)[:, 0, 0] == 50).sum()) for s in segs]

    cfg = SamConfig(keep_largest=3, num_segments=2, style="white", segment_size=8)
    segs, real = select_segments(img, masks, cfg, score)
    assert scored == [3] and real == 2
    assert white_rows(segs) == [3, 2]  # caption-guided: the 24-px mask (score .9) then the 16-px mask (score .5)
    segs, real = select_segments(img, masks, cfg)
    assert real == 2 and white_rows(segs) == [2, 4]  # SAM quality: the 16-px mask (iou .8), then the 32-px (.5, larger than 24)
    assert mask_quality(_record(None, 0.5, 0.8)) == pytest.approx(0.4) and mask_quality({}) == 1.0

    cfg = SamConfig(keep_largest=10, num_segments=10, style="crop", segment_size=8)
    segs, real = select_segments(img, masks[:1] + [_record(np.zeros((8, 8), bool))], cfg, score)
    assert real == 1 and len(segs) == 10  # empty masks are dropped; no scoring when <= num_segments
    assert len(scored) == 1


# --------------------------------------------------------------------------- caption checks


def test_check_caption_on_hand_made_strings():
    cfg = RefineConfig(min_chars=8, max_chars=40, max_repeat_fraction=0.5)
    assert repeat_fraction("a b a b") == 0.5
    assert check_caption("", cfg) == "empty"
    assert check_caption("  tiny ", cfg) == "too short"
    assert check_caption("x" * 41, cfg) == "too long"
    assert check_caption("the the the the river", cfg) == "repeated tokens"  # 1 - 2/5 = 0.6
    assert check_caption("two houses beside a river", cfg) is None
    out, kept = choose_captions(["orig a", "orig b"], ["", " a lake near three trees "], cfg)
    assert out == ["orig a", "a lake near three trees"] and kept == 1


def test_format_prompt_uses_geo_tags_and_caption():
    t = "tags: {geo_tags} | {caption}"
    assert format_prompt(t, "a lake", ["natural=water", "landuse=forest"]) == "tags: natural=water, landuse=forest | a lake"
    assert format_prompt(t, "a lake", None) == "tags: none | a lake"


# --------------------------------------------------------------------------- per-row safety


def test_run_guarded_retries_rows_and_rejects_only_failures():
    calls = []

    def process(items, rows):
        calls.append(list(rows))
        if len(rows) > 1 and "flaky" in rows:
            raise RuntimeError("batch failed")
        if "bad" in rows:
            raise ValueError("row failed")
        return [r.upper() for r in rows]

    out = run_guarded(process, [None] * 3, ["a", "flaky", "bad"])
    assert out == ["A", "FLAKY", "ValueError: row failed"]
    assert calls == [["a", "flaky", "bad"], ["a"], ["flaky"], ["bad"]]
    assert run_guarded(process, [], []) == []


def test_load_image_rejects_corrupt_mode_and_size():
    cfg = load_config().preprocess
    assert load_image(png("RGB", (32, 32)), "ok", cfg).size == (32, 32)
    with pytest.raises(Exception, match="bad.png: unreadable image"):
        load_image(b"not an image", "bad.png", cfg)
    with pytest.raises(Exception, match="mode 1 not in"):
        load_image(png("1", (32, 32)), "bits.png", cfg)
    with pytest.raises(Exception, match="size 8x8 outside"):
        load_image(png("RGB", (8, 8)), "small.png", cfg)


class Echo(Passthrough):
    """A stage that needs images and records their sizes."""

    needs_image = True

    def process(self, images, rows):
        return [{"refined_captions": [f"{img.size[0]}px"]} for img in images]


def test_stage_actor_rejects_bad_rows_and_passes_earlier_rejects():
    cfg = load_config()
    rows = [row("ok", png("RGB", (32, 32))), row("corrupt", b"\x89PNG broken"), row("small", png("L", (4, 4))),
            row("earlier", png("RGB", (32, 32)))]
    batch = with_status(to_table(rows))
    status = batch.schema.get_field_index("reject_reason")
    batch = batch.set_column(status, "reject_reason", pa.array([None, None, None, "before"], pa.string()))
    out = StageActor("refine", cfg, root="", factory=Echo)(batch).to_pylist()
    assert [r["refined_captions"] for r in out] == [["32px"], None, None, None]
    assert [r["reject_stage"] for r in out] == [None, "refine", "refine", None]
    assert "unreadable image" in out[1]["reject_reason"] and "size 4x4" in out[2]["reject_reason"]
    assert out[3]["reject_reason"] == "before"


# --------------------------------------------------------------------------- real model loading (no Ray)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from urbancross.config import SynthConfig
    from urbancross.data.synth import synthesize

    out = tmp_path_factory.mktemp("bench") / "manifest"
    return synthesize(SynthConfig(images_per_domain=3, domains=["Finland", "Spain"]), str(out)), out


@pytest.fixture(scope="module")
def tiny_lmm(bench, tmp_path_factory):
    table, _ = bench
    corpus = [c for caps in table["captions"].to_pylist() for c in caps]
    return save_tiny_instructblip(tmp_path_factory.mktemp("lmm"), corpus)


def test_tiny_sam_checkpoint_loads_through_builder_and_segments(bench, tmp_path):
    table, _ = bench
    ckpt = ensure_tiny_sam(tmp_path / "sam.pth")
    assert ensure_tiny_sam(tmp_path / "sam.pth") == ckpt  # existing checkpoint is reused
    sam = load_sam("tiny", ckpt)
    assert sam.image_encoder.img_size == 256
    with pytest.raises(ConfigError, match="no such file"):
        load_sam("vit_b", str(tmp_path / "missing.pth"))
    cfg = load_config(None, [f"out_dir={tmp_path}", f"preprocess.sam.checkpoint={ckpt}", "preprocess.sam.points_per_side=4"])
    rows = table.slice(0, 2).to_pylist()
    out = Segmenter(cfg).process([decode_image(r["image"]) for r in rows], rows)
    for o in out:
        assert len(o["segments"]) == 10 and 0 <= o["num_real_segments"] <= 10
        assert decode_image(o["segments"][-1]).size == (64, 64)


def test_test_image_segments_and_embedding_do_not_depend_on_its_captions(bench, tmp_path):
    """A gallery must not see its queries: the same test image with other captions gets
    byte-identical segments and the identical embedding; caption-guided ranking (an option)
    applies to training rows only."""
    import torch

    from urbancross.model.embed import embed_images, numpy_batches
    from urbancross.model.factory import create_model
    from urbancross.model.inputs import ModelInputs

    table, _ = bench
    ckpt = ensure_tiny_sam(tmp_path / "sam.pth")
    rng = np.random.default_rng(0)
    fake = [_record(rng.random((64, 64)) < rng.uniform(0.1, 0.9), *rng.uniform(0.5, 1.0, 2)) for _ in range(15)]
    row = {**table.slice(0, 1).to_pylist()[0], "split": "test"}
    other = {**row, "captions": ["a lake beside a long red runway", "ten boats in a harbour"]}
    image = decode_image(row["image"])
    for extra in ([], ["preprocess.sam.selection=caption"]):
        cfg = load_config(None, [f"out_dir={tmp_path}", f"preprocess.sam.checkpoint={ckpt}", "model.use_segments=true", *extra])
        seg = Segmenter(cfg)
        seg.generator.generate = lambda arr: fake  # more masks than segments: the ranking decides
        a, b = (seg.process([image], [r])[0] for r in (row, other))
        assert a["num_real_segments"] == 10 and a["segments"] == b["segments"]
        model = create_model(cfg.model).eval()
        inputs = ModelInputs(cfg, train=False)
        emb = []
        for r, out in ((row, a), (other, b)):
            x = inputs(next(numpy_batches(to_table([{**r, **out}]), 1)))
            with torch.no_grad():
                emb.append(embed_images(model, *(torch.as_tensor(x[k]) for k in ("images", "segments", "segment_mask"))))
        assert torch.equal(emb[0], emb[1])
    train_row = {**row, "split": "train"}
    assert seg.scorer(train_row) is not None and seg.scorer(row) is None
    seg.score = lambda candidates, captions: np.arange(len(candidates)) * (1.0 if "lake" in captions[0] else -1.0)
    assert seg.process([image], [train_row])[0]["segments"] != seg.process([image], [{**other, "split": "train"}])[0]["segments"]


def test_tiny_instructblip_loads_and_garbage_keeps_original_captions(bench, tiny_lmm):
    table, _ = bench
    cfg = load_config(None, ["preprocess.refine.kind=lmm", f"preprocess.refine.model_dir={tiny_lmm}",
                             "preprocess.refine.max_new_tokens=12"])
    refiner = Refiner(cfg)
    assert type(refiner.model).__name__ == "InstructBlipForConditionalGeneration"
    rows = table.slice(0, 2).to_pylist()
    images = [decode_image(r["image"]) for r in rows]
    generated = refiner.generate(images, ["describe the image"] * 2)
    assert len(generated) == 2 and all(check_caption(g, cfg.preprocess.refine) is not None for g in generated)
    out = refiner.process(images, rows)
    assert [o["refined_captions"] for o in out] == [r["captions"] for r in rows]


def test_lmm_precision_bf16_loads_and_generates_in_bf16(bench, tiny_lmm):
    """`refine.precision` (auto: bf16 on a GPU) halves a real LMM's memory; forced here on CPU."""
    table, _ = bench
    cfg = load_config(None, ["preprocess.refine.kind=lmm", f"preprocess.refine.model_dir={tiny_lmm}",
                             "preprocess.refine.max_new_tokens=6", "preprocess.refine.precision=bf16"])
    refiner = Refiner(cfg)
    assert next(refiner.model.parameters()).dtype == torch.bfloat16
    rows = table.slice(0, 2).to_pylist()
    generated = refiner.generate([decode_image(r["image"]) for r in rows], ["describe the image"] * 2)
    assert len(generated) == 2 and all(isinstance(g, str) for g in generated)
    assert next(Refiner(cfg.override({"preprocess.refine.precision": "auto"})).model.parameters()).dtype == torch.float32  # CPU


def test_rerun_with_everything_done_skips_without_ray(bench, tmp_path, capsys):
    table, _ = bench
    rows = table.slice(0, 4).to_pylist()
    for i, r in enumerate(rows):
        r.update(segments=[png("RGB", (16, 16), i)], num_real_segments=1, refined_captions=[f"refined {i}"])
    src, out = tmp_path / "in", tmp_path / "out"
    write_manifest(table.slice(0, 4), src)
    write_manifest(to_table([rows[2], rows[0]]), out)  # a previous run's output
    parts = tmp_path / "out.parts"
    parts.mkdir()
    pq.write_table(to_table([rows[3], rows[1]]), parts / "part-x.parquet")  # a killed run's journal
    assert main(["preprocess", "--set", f"out_dir={tmp_path}", "--set", f"preprocess.input={src}",
                 "--set", f"preprocess.output={out}"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["rows_total"], summary["rows_skipped_existing"], summary["rows_processed"]) == (4, 4, 0)
    result = read_manifest(out)
    assert result["refined_captions"].to_pylist() == [["refined 0"], ["refined 1"], ["refined 2"], ["refined 3"]]
    assert not parts.exists()


def test_missing_models_fail_before_any_work(bench, tmp_path):
    _, src = bench
    base = [f"out_dir={tmp_path}", f"data.manifest={src}"]
    with pytest.raises(ConfigError, match="refine.model_dir: no such folder"):
        run_preprocess(load_config(None, [*base, "preprocess.refine.kind=lmm", f"preprocess.refine.model_dir={tmp_path}/x"]))
    with pytest.raises(ConfigError, match="model_type vit_b needs a local checkpoint"):
        run_preprocess(load_config(None, [*base, "preprocess.sam.model_type=vit_b"]))


# --------------------------------------------------------------------------- Ray pipeline


class FlakyRefiner(Refiner):
    """The real tiny LMM, made to fail: always on row `bad`, on any batch holding `flaky`."""

    def process(self, images, rows):
        ids = [r["image_id"] for r in rows]
        if "bad" in ids or (len(rows) > 1 and "flaky" in ids):
            raise RuntimeError(f"model failed on {ids}")
        return super().process(images, rows)


@pytest.mark.ray
def test_pipeline_writes_manifest_rejects_and_summary(ray_session, bench, tiny_lmm, tmp_path):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(__import__(__name__))  # Ray workers cannot import this test module
    table, _ = bench
    good = table.to_pylist()
    good[0]["image_id"], good[1]["image_id"] = "flaky", "bad"
    extra = [row("corrupt", b"\x89PNG\r\n\x1a\n broken"), row("grey16", png("I;16", (64, 64)))]
    src, out = tmp_path / "in", tmp_path / "out"
    write_manifest(to_table(good + extra), src)
    cfg = load_config(None, [
        f"out_dir={tmp_path}", f"preprocess.input={src}", f"preprocess.output={out}",
        "preprocess.sam.points_per_side=4", "preprocess.sam.batch_size=4",
        "preprocess.refine.kind=lmm", f"preprocess.refine.model_dir={tiny_lmm}", "preprocess.refine.batch_size=4",
        "preprocess.refine.max_new_tokens=12",
    ])
    summary = run_preprocess(cfg, stages={"refine": FlakyRefiner})
    assert (summary["rows_total"], summary["rows_done"], summary["rejects"]) == (8, 5, 3)
    assert summary["rows_processed"] == 5 and summary["rows_skipped_existing"] == 0
    assert summary["captions_refined"] == 0 and summary["images_per_s"] > 0

    result = read_manifest(out)
    assert result["image_id"].to_pylist() == [r["image_id"] for r in good if r["image_id"] != "bad"]
    assert result.schema.equals(MANIFEST_SCHEMA)
    assert all(len(s) == 10 for s in result["segments"].to_pylist())
    assert result["refined_captions"].to_pylist() == result["captions"].to_pylist()
    rejects = {r["image_id"]: r for r in pq.read_table(rejects_path(str(out))).to_pylist()}
    assert sorted(rejects) == ["bad", "corrupt", "grey16"]
    assert rejects["bad"]["stage"] == "refine" and "model failed on ['bad']" in rejects["bad"]["reason"]
    assert rejects["corrupt"]["stage"] == "sam" and "unreadable image" in rejects["corrupt"]["reason"]
    assert "mode I;16" in rejects["grey16"]["reason"] and rejects["grey16"]["source"] == "test:grey16"
    assert not (tmp_path / "out.parts").exists() and parts_path(str(out)).endswith("out.parts")


def test_output_over_the_input_or_a_foreign_folder_is_refused_before_any_work(bench, tmp_path, capsys):
    table, _ = bench
    src = tmp_path / "in"
    write_manifest(table.slice(0, 4), src)
    base = ["preprocess", "--set", f"out_dir={tmp_path}", "--set", f"preprocess.input={src}"]
    assert main([*base, "--set", f"preprocess.output={src}", "--overwrite"]) == 1  # would drop rejected rows
    assert "is the input" in capsys.readouterr().err and read_manifest(src).num_rows == 4
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    assert main([*base, "--set", f"preprocess.output={tmp_path / 'notes'}"]) == 1
    assert "not a manifest" in capsys.readouterr().err and (tmp_path / "notes" / "a.txt").exists()
