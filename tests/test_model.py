"""UrbanCross model on the `tiny` preset: forward/backward on CPU, gradients, save/load, errors."""

import dataclasses
import hashlib
import logging

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from urbancross.config import LossConfig, ModelConfig
from urbancross.loss import retrieval_loss
from urbancross.model import CheckpointError, announce_weights, create_model, get_tokenizer, image_size, image_transform, save_model
from urbancross.model.factory import TINY_NAME, open_clip_name
from urbancross.model.global_local import GlobalLocalBlock, _partition, _unpartition

CAPTIONS = ["a red roof north of a park", "two roads cross near a river", "a field left of a forest"]


def batch(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = image_size(cfg)
    images = torch.randn(3, 3, n, n, generator=g)
    segments = torch.randn(3, 2, 3, n, n, generator=g)
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    return images, get_tokenizer(cfg)(CAPTIONS), segments, mask


def test_tiny_preset_shapes_tokenizer_and_transforms():
    cfg = ModelConfig()
    model = create_model(cfg)
    assert image_size(cfg) == 64 and model.embed_dim == 128
    tokens = get_tokenizer(cfg)(CAPTIONS)
    assert tokens.shape == (3, model.clip.context_length) == (3, 64)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8))
    assert image_transform(cfg, train=False)(img).shape == (3, 64, 64)
    train = image_transform(cfg, train=True)
    assert train(img).shape == (3, 64, 64)
    names = {type(t).__name__ for t in train.transforms}
    assert not names & {"RandomHorizontalFlip", "RandomVerticalFlip", "RandomRotation"}


@pytest.mark.parametrize("options", [{}, {"global_local": True, "pre_align": True}, {"segment_encoding": "pooled"}])
def test_forward_backward_reaches_every_parameter(options):
    cfg = ModelConfig(**options)
    torch.manual_seed(0)
    model = create_model(cfg)
    images, tokens, segments, mask = batch(cfg)
    out = model(images, tokens, segments, mask)
    for key in ("image", "text", "fused"):
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(3))
    assert out["segments"][2].abs().sum() == 0  # missing segments stay zero
    assert ("pre_image" in out) == bool(options.get("pre_align"))
    total, parts = retrieval_loss(out, LossConfig())
    total.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
            or p.grad.abs().sum() == 0]
    assert dead == []


def test_fusion_ignores_masked_segments_and_is_identity_without_segments():
    cfg = ModelConfig()
    model = create_model(cfg).eval()
    images, tokens, segments, mask = batch(cfg)
    with torch.no_grad():
        a = model(images, tokens, segments, mask)["fused"]
        changed = segments.clone()
        changed[1, 1] = 5.0  # masked out
        b = model(images, tokens, changed, mask)["fused"]
        plain = model(images, tokens)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(plain["fused"], plain["image"])
    off = create_model(dataclasses.replace(cfg, use_segments=False))
    assert off(images, tokens, segments, mask)["segments"] is None


def test_global_local_block_pads_uneven_grids():
    x = torch.randn(2, 16, 7, 5)
    assert GlobalLocalBlock(16, 4, window=4)(x).shape == x.shape
    y = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(_unpartition(_partition(y, 4), 2, 8, 8, 4), y)


def test_save_load_roundtrip(tmp_path):
    cfg = ModelConfig(global_local=True)
    model = create_model(cfg).eval()
    path = tmp_path / "model.pt"
    save_model(model, path)
    loaded = create_model(cfg, pretrained=str(path)).eval()
    images, tokens, segments, mask = batch(cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(images, tokens, segments, mask)["fused"],
                                   loaded(images, tokens, segments, mask)["fused"])


def test_plain_open_clip_checkpoint_loads_through_open_clip(tmp_path):
    cfg = ModelConfig()
    clip = open_clip.create_model(open_clip_name(cfg))
    path = tmp_path / "clip.pt"
    torch.save(clip.state_dict(), path)
    # the registered tiny config is a real open_clip config: its own local-file loader takes it
    oc, _, _ = open_clip.create_model_and_transforms(TINY_NAME, pretrained=str(path))
    model = create_model(cfg, pretrained=str(path))
    for name in ("visual.conv1.weight", "token_embedding.weight", "text_projection"):
        torch.testing.assert_close(model.clip.state_dict()[name], clip.state_dict()[name])
        torch.testing.assert_close(oc.state_dict()[name], clip.state_dict()[name])


def test_a_local_checkpoint_is_announced_once_with_what_was_loaded(tmp_path, caplog):
    """open_clip's "initialized randomly" warning is not shown when a checkpoint is loaded next;
    the run logs instead, once, the file's sha256 prefix, the parameters loaded and what was
    skipped (a key open_clip drops) or left at its initialisation (the fusion head)."""
    cfg = ModelConfig()
    clip = open_clip.create_model(open_clip_name(cfg))
    state = {**clip.state_dict(), "text.transformer.embeddings.position_ids": torch.arange(64)}
    path = tmp_path / "RemoteCLIP-tiny.pt"
    torch.save(state, path)
    caplog.clear()
    caplog.set_level(logging.INFO, logger="urbancross")  # ours at INFO, libraries' (root) at WARNING
    create_model(cfg, pretrained=str(path))  # a worker's load: nothing at INFO or above
    assert [r.getMessage() for r in caplog.records] == []
    report = announce_weights(cfg, str(path))
    [record] = caplog.records
    assert record.levelno == logging.INFO and record.name == "urbancross.model.factory"
    message = record.getMessage()
    sha = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    params = sum(v.numel() for v in clip.state_dict().values())
    assert f"loaded {path} (sha256 {sha}, {len(clip.state_dict())} tensors, {params:,} parameters" in message
    assert "skipped: text.transformer.embeddings.position_ids;" in message
    assert report["skipped"] == ["text.transformer.embeddings.position_ids"]
    assert report["random_init"] == sorted(k for k in create_model(cfg).state_dict() if not k.startswith("clip."))
    assert "initialised randomly: fusion." in message
    assert "initialized randomly" in caplog.text  # no checkpoint: open_clip's warning is true, and kept
    assert logging.getLogger().filters == []


def test_mismatched_checkpoints_fail_clearly(tmp_path):
    cfg = ModelConfig()
    path = tmp_path / "model.pt"
    save_model(create_model(cfg), path)
    with pytest.raises(CheckpointError, match=r"missing keys \(e\.g\. global_local"):
        create_model(dataclasses.replace(cfg, global_local=True), pretrained=str(path))

    other = open_clip.CLIP(embed_dim=64, vision_cfg={"image_size": 64, "patch_size": 8, "width": 64, "layers": 2},
                           text_cfg={"context_length": 32, "width": 64, "heads": 2, "layers": 2})
    bad = tmp_path / "other_clip.pt"
    torch.save(other.state_dict(), bad)
    with pytest.raises(CheckpointError, match="does not fit model preset 'tiny'.*shape mismatches"):
        create_model(cfg, pretrained=str(bad))


def test_no_download_path():
    with pytest.raises(CheckpointError, match="not a local checkpoint file"):
        create_model(ModelConfig(), pretrained="openai")
    with pytest.raises(ValueError, match="model.preset"):
        open_clip_name(ModelConfig(preset="hf-hub:someone/model"))


def _png(seed: int, size: int = 32) -> bytes:
    from urbancross.data.manifest import encode_png

    rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return encode_png(Image.fromarray(rgb))


def test_segment_mask_follows_num_real_segments():
    """Grid fills that pad a row up to 10 segments are not segments: the mask covers only the
    `num_real_segments` real ones, so the fused embedding is the one of the real segments alone."""
    from urbancross.config import Config
    from urbancross.data.ingest import label_id
    from urbancross.model.embed import embed_images
    from urbancross.model.inputs import ModelInputs

    cfg = Config().override({"data.num_segments": 4})
    inputs = ModelInputs(cfg, train=False)

    def row(segments, real):
        return {"image_id": "Finland/a.png", "domain": "Finland", "image": _png(0), "captions": ["a road"],
                "segments": [_png(10 + i) for i in range(segments)], "num_real_segments": real}

    def run(rows):
        batch = {k: np.array([r[k] for r in rows] + [None], dtype=object)[:-1] for k in rows[0]}
        return inputs(batch)

    padded, alone, legacy = run([row(4, 2)]), run([row(2, 2)]), run([{**row(4, 2), "num_real_segments": None}])
    assert padded["segment_mask"].tolist() == [[True, True, False, False]]
    assert padded["label"].tolist() == [-1] and run([{**row(2, 2), "label": "forest"}])["label"].tolist() == [label_id("forest")]
    assert legacy["segment_mask"].tolist() == [[True, True, True, True]]  # no count: every stored segment is real
    np.testing.assert_array_equal(padded["segments"], alone["segments"])
    model = create_model(ModelConfig()).eval()
    with torch.no_grad():
        emb = [embed_images(model, *(torch.as_tensor(x[k]) for k in ("images", "segments", "segment_mask"))) for x in (padded, alone)]
        fused = model(torch.as_tensor(padded["images"]), torch.as_tensor(padded["tokens"][:, 0]),
                      torch.as_tensor(padded["segments"]), torch.as_tensor(padded["segment_mask"]))
    torch.testing.assert_close(emb[0], emb[1])
    assert fused["segment_mask"].sum().item() == 2


def _white_segment(n: int, box: tuple[int, int, int, int]) -> torch.Tensor:
    """A normalized segment image: white everywhere but a coloured box (rows r0:r1, cols c0:c1)."""
    from urbancross.model.factory import normalize

    x = torch.ones(3, n, n)
    r0, r1, c0, c1 = box
    x[:, r0:r1, c0:c1] = torch.tensor([0.6, 0.2, 0.1]).view(3, 1, 1)
    return normalize(x[None])[0]


def test_pooled_segments_are_the_tiles_patch_tokens_under_each_mask_in_one_pass():
    from urbancross.model.model import segment_pixels

    cfg = ModelConfig(segment_encoding="pooled")
    torch.manual_seed(0)
    model = create_model(cfg).eval()
    n = image_size(cfg)
    segments = torch.stack([_white_segment(n, (0, 8, 0, 8)), _white_segment(n, (0, n, 0, n))])[None]  # one patch; all
    assert segment_pixels(segments)[0, 0].sum() == 64 and segment_pixels(segments)[0, 0, :8, :8].all()
    images = torch.randn(1, 3, n, n)
    with torch.no_grad():
        image, _, seg = model.encode_image_segments(images, segments, torch.tensor([[True, True]]))
        tokens = model.clip.visual.forward_intermediates(images, indices=1, normalize_intermediates=True)["image_intermediates"][-1]
    proj = model.clip.visual.proj
    first = torch.nn.functional.normalize(tokens[0, :, 0, 0] @ proj, dim=-1)  # the top-left patch alone
    whole = torch.nn.functional.normalize(tokens[0].flatten(1).mean(1) @ proj, dim=-1)
    torch.testing.assert_close(seg[0, 0], first)
    torch.testing.assert_close(seg[0, 1], whole)
    torch.testing.assert_close(image, model.encode_image(images))


def test_pooled_segments_cost_one_tower_pass_where_crops_cost_one_per_segment():
    torch.manual_seed(0)
    seen = {}
    for encoding in ("crops", "pooled"):
        model = create_model(ModelConfig(segment_encoding=encoding))
        rows = []
        model.clip.visual.conv1.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))  # the patch embedding
        images, tokens, segments, mask = batch(ModelConfig())
        with torch.no_grad():
            model(images, tokens, segments, mask)
        seen[encoding] = sum(rows)
    assert seen == {"crops": 3 + 3, "pooled": 3}  # 3 tiles (+ their 3 present segments as crops)


def test_augmentation_moves_the_pooled_masks_with_the_tile():
    from urbancross.train.cache import augment

    cfg = ModelConfig(aug_crop_scale=0.5, aug_color_jitter=0.0)
    n = 64
    images = torch.zeros(2, 3, n, n, dtype=torch.uint8)
    images[:, :, 8:24, 40:56] = 255  # a white square on black
    masks = (images[:, :1].float() / 255)  # the same square as a mask, one segment per tile
    x, warped = augment(images, np.array([3, 7]), epoch=1, seed=0, cfg=cfg, masks=masks)
    assert not torch.equal(warped, masks)  # the crop moved it
    torch.testing.assert_close(warped[:, 0], x[:, 0], atol=1e-5, rtol=0)  # ... exactly as it moved the tile
