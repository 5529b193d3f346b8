"""The embedded SAM: the generator's object masks, SAM's objective, the packaged checkpoint, recall."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from urbancross import embedded
from urbancross.cli import main
from urbancross.config import Config, ConfigError, SynthConfig
from urbancross.data import synth as S
from urbancross.preprocess import sam_pretrain as P
from urbancross.preprocess.sam import load_sam, resolve_checkpoint

FLAT = replace(S.STYLES["Finland"], name="Flat", mottle=0.0, grain=0.0)  # no texture, no noise: colours are exact


def flat_scenes(n: int = 60):
    for i in range(n):
        scene = S.make_scene(np.random.default_rng(i), S.STYLES[("Finland", "Germany", "Spain")[i % 3]])
        yield replace(scene, domain="Flat")


def colour(img: np.ndarray, rgb) -> np.ndarray:
    return (img == np.asarray(rgb)).all(-1)


@pytest.mark.parametrize("size", [64, 256])
def test_object_masks_are_what_render_draws(size):
    shapes = 0
    for scene in flat_scenes():
        img = np.asarray(S.render(scene, size, FLAT)).astype(int)
        objs = S.object_masks(scene, size)
        assert [k for k, _ in objs] == [e.kind for e in scene.elements] + ([scene.divider.kind] if scene.divider else [])
        union = np.zeros((size, size), bool)
        for (kind, mask), e in zip(objs, scene.elements):
            assert mask.any() and not (mask & union).any()  # disjoint
            union |= mask
            ys, xs = np.nonzero(mask)
            cell = size / S.GRID
            assert e.col * cell <= xs.min() and xs.max() < (e.col + 1) * cell  # inside its cell
            assert e.row * cell <= ys.min() and ys.max() < (e.row + 1) * cell
            if kind == "tree":
                assert colour(img, FLAT.tree)[mask].all()
            if kind == "building":  # the roof (and its ridge line), never the shadow or the ground
                roof = FLAT.roofs[e.variant % len(FLAT.roofs)][1]
                assert (colour(img, roof) | colour(img, S.shade(roof, 0.75)))[mask].all()
            if kind == "field":
                assert (colour(img, FLAT.field[0]) | colour(img, FLAT.field[1]))[mask].all()
            shapes += 1
        # water (lakes, the river) is exactly the lake and river masks, pixel for pixel
        water = np.any([m for k, m in objs if k in ("lake", "river")] or [np.zeros((size, size), bool)], axis=0)
        assert (colour(img, FLAT.water) == water).all()
        if scene.divider and scene.divider.kind == "road":  # the road's visible part is road (or its dashes)
            road = objs[-1][1]
            assert (colour(img, FLAT.road) | colour(img, (214, 210, 190)))[road].all()
        # everything outside the objects and the shadows is ground
        shadow = colour(img, S.shade(FLAT.ground, 0.45)) | colour(img, S.shade(FLAT.tree, 0.55))
        assert colour(img, FLAT.ground)[~np.any([m for _, m in objs], axis=0) & ~shadow].all()
    assert shapes > 200


def test_best_of_three_loss_and_iou_targets():
    target = torch.zeros(2, 8, 8)
    target[:, 2:6, 2:6] = 1
    logits = torch.full((2, 3, 8, 8), -20.0)
    logits[0, 1] = target[0] * 40 - 20  # prompt 0: output 1 is exact; prompt 1: every output empty
    cfg = Config().sam_pretrain
    out = P.mask_losses(logits, target, torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]), cfg)
    assert float(out["best_iou"]) == pytest.approx(0.5)  # (1 + 0) / 2: the best output of each prompt
    assert float(out["iou_loss"]) == pytest.approx(0.0)  # the head predicted each output's true IoU
    exact = P.mask_losses(logits[:1], target[:1], torch.zeros(1, 3), cfg)
    assert float(exact["mask_loss"]) < 1e-3  # only the best output counts


def test_prompts_lie_on_their_targets():
    _, masks = P.web_tile(0, 0, 3, 64)
    points, targets = P.prompts(masks, 50, 0.2, np.random.default_rng(0))
    for (x, y), t in zip(points, targets):
        assert t[int(y), int(x)]
    assert any((t == ~np.any(masks, axis=0)).all() for t in targets)  # some on the ground


def test_embedded_needs_the_tiny_model_type():
    with pytest.raises(ConfigError, match="preprocess.sam: checkpoint: embedded .* needs model_type: tiny"):
        Config().override(["preprocess.sam.checkpoint=embedded", "preprocess.sam.model_type=vit_b"])


def test_embedded_sam_asset_matches_its_sidecar_and_loads_like_a_user_checkpoint():
    cfg = Config().override(["preprocess.sam.checkpoint=embedded"])
    path = resolve_checkpoint(cfg)
    record = embedded.check_asset(path)
    assert path == str(embedded.ASSETS / "sam-tiny.pt") and record["command"].startswith("urbancross pretrain-sam")
    stored = torch.load(path, map_location="cpu", weights_only=True)
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}
    sam = load_sam("tiny", path)
    name, value = next((k, v) for k, v in sam.state_dict().items() if v.is_floating_point())
    assert value.dtype == torch.float32 and torch.equal(value, stored[name].float())
    assert record["bytes"] < 5_000_000


def test_embedded_sam_finds_the_objects_of_benchmark_val_tiles():
    cfg = Config().override(["preprocess.sam.checkpoint=embedded"])
    sam = load_sam("tiny", resolve_checkpoint(cfg))
    tiles = P.val_tiles(SynthConfig(images_per_domain=60, val_fraction=0.1), 64)[:12]  # 6 val tiles per domain
    got = P.mask_recall(sam, tiles, cfg.preprocess.sam)
    torch.manual_seed(0)
    random = P.mask_recall(embedded.build_sam_tiny(), tiles, cfg.preprocess.sam)
    assert got["objects"] > 50 and got["recall"] > 0.3 and got["masks_per_tile"] >= 2
    assert random["recall"] < 0.1


@pytest.mark.heavy
@pytest.mark.ray
def test_pretrain_sam_command_end_to_end(ray_session, tmp_path, capsys):
    out = tmp_path / "sam.pt"
    argv = ["pretrain-sam", "--config", str(embedded.ASSETS / "sam-tiny.yaml"), "--set", f"out_dir={tmp_path}",
            "--set", f"sam_pretrain.output={out}", "--set", "sam_pretrain.steps=3", "--set", "sam_pretrain.eval_tiles=2",
            "--set", "synth.images_per_domain=20"]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    assert embedded.check_asset(out) == record
    assert record["command"] == "urbancross " + " ".join(argv[:3]) + "".join(f" --set {v}" for v in argv[4::2])
    assert record["metrics"]["after"]["web"]["tiles"] == 2 and record["metrics"]["train"]["step"] == 3
    load_sam("tiny", str(out))
