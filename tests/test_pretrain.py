"""The embedded world's pretraining: the web corpus, the packaged tiny CLIP and `model.pretrained: embedded`."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from urbancross import embedded
from urbancross.config import Config, ConfigError, ModelConfig
from urbancross.data import synth, web

BENCHMARK = tuple(synth.STYLES)  # Finland, Germany, Spain


def test_web_rows_are_deterministic_per_seed():
    a = web.style_rows(0, 3, tiles=4)
    assert a == web.style_rows(0, 3, tiles=4)
    assert [r["image"] for r in a] != [r["image"] for r in web.style_rows(1, 3, tiles=4)]
    assert [r["image"] for r in a] != [r["image"] for r in web.style_rows(0, 4, tiles=4)]


def test_web_corpus_never_holds_the_benchmark():
    rows = [r for i in range(40) for r in web.style_rows(0, i, tiles=3)]
    text = json.dumps([{k: v for k, v in r.items() if k != "image"} for r in rows])
    for name in BENCHMARK:
        assert name not in text
    assert {r["domain"] for r in rows} == {"web"}
    styles = [web.random_style(web.style_rng(0, i), f"web-{i}") for i in range(40)]
    assert not {s.name for s in styles} & set(BENCHMARK)
    assert not any(s == b for s in styles for b in synth.STYLES.values())


def test_random_style_draws_a_wide_vocabulary():
    rng = np.random.default_rng(0)
    styles = [web.random_style(rng) for _ in range(300)]
    roof_words = {w for s in styles for w, _ in s.roofs}
    assert {"red", "brown", "grey", "orange", "terracotta", "white"} <= roof_words
    assert len(roof_words) == len(web.COLOURS)
    assert len({a for s in styles for a in s.areas}) > 100
    grounds = np.array([s.ground for s in styles])
    assert grounds.std(axis=0).min() > 15  # palettes spread, not one country's
    for s in styles:  # captions never say a place word that is also an element noun
        assert not any(noun in area for area in s.areas for forms in synth.NOUNS.values() for pair in forms for noun in pair)


def test_a_style_is_in_one_split_and_val_is_held_out():
    splits = [web.style_rows(0, i, tiles=2, val_fraction=0.3) for i in range(60)]
    assert all(len({r["split"] for r in rows}) == 1 for rows in splits)
    assert 5 < sum(rows[0]["split"] == "val" for rows in splits) < 35


def test_embedded_needs_the_tiny_preset():
    with pytest.raises(ConfigError, match="only valid with family urbancross and preset tiny"):
        ModelConfig(preset="ViT-B-32", pretrained="embedded")
    with pytest.raises(ConfigError, match=r"override: model: pretrained: 'embedded'.*'ViT-B-32'"):
        Config().override({"model.preset": "ViT-B-32", "model.pretrained": "embedded"})
    assert ModelConfig(pretrained="embedded").pretrained == "embedded"


def test_pretrain_train_config_and_help(capsys):
    from urbancross.cli import main
    from urbancross.pretrain import command_line, train_config

    cfg = train_config(Config(), "/data/web")
    assert (cfg.data.manifest, cfg.train.domain, cfg.model.use_segments, cfg.train.curriculum.enabled) == ("/data/web", "web", False, False)
    assert (cfg.train.epochs, cfg.train.batch_size) == (Config().pretrain.epochs, Config().pretrain.batch_size)
    with pytest.raises(ConfigError, match="preset tiny"):
        train_config(Config().override({"model.preset": "ViT-B-32"}), "/data/web")
    assert command_line("p.yaml", ["pretrain.epochs=1"]) == "urbancross pretrain --config p.yaml --set pretrain.epochs=1"
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--help"])
    assert e.value.code == 0
    assert "web corpus" in " ".join(capsys.readouterr().out.split())


def test_packaged_clip_matches_its_sidecar_and_loads_like_a_user_file():
    from urbancross.model.factory import create_model, load_weights

    path = embedded.asset("clip")  # sha256 checked against the sidecar
    record = embedded.check_asset(path)
    assert record["sha256"] == embedded.sha256(path) and record["command"].startswith("urbancross pretrain")
    assert record["metrics"]["web_val"]["mR"] > 0
    sam = embedded.ASSETS / embedded.ASSET_FILES["sam"]
    assert os.path.getsize(path) + (os.path.getsize(sam) if sam.exists() else 1 << 20) < 20 * 2**20
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())

    model = create_model(ModelConfig(use_segments=False))
    report = load_weights(model, embedded.EMBEDDED, preset="tiny")  # the same path a user's open_clip file takes
    own = model.clip.state_dict()
    assert report["into"] == "the CLIP towers (model.clip)" and report["path"] == path
    assert report["tensors"] == len(own) == len(state) and report["skipped"] == []
    assert not [k for k in report["random_init"] if k.startswith("clip.")]
    for k, v in state.items():
        assert torch.equal(own[k], v.float()), k

    again = create_model(ModelConfig(pretrained="embedded", use_segments=False))
    assert all(torch.equal(a, b) for a, b in zip(again.clip.state_dict().values(), own.values()))


@pytest.mark.heavy
@pytest.mark.ray
def test_pretrain_end_to_end_is_reproducible(tmp_path, ray_session):
    """A short version of the recorded command, twice, through Ray Data + Ray Train (2 workers)."""
    from urbancross.model.factory import create_model, load_weights
    from urbancross.pretrain import run_pretrain

    outputs = []
    for run in ("a", "b"):
        cfg = Config().override(
            {
                "out_dir": str(tmp_path / run),
                "pretrain.styles": 16,
                "pretrain.tiles_per_style": 4,
                "pretrain.val_fraction": 0.25,
                "pretrain.epochs": 2,
                "pretrain.batch_size": 8,
                "pretrain.val_images": 8,
                "train.num_workers": 2,
            }
        )
        record = run_pretrain(cfg, command="urbancross pretrain (test)")
        assert embedded.check_asset(record["output"])["sha256"] == record["sha256"]
        assert record["metrics"]["corpus"]["tiles"] == 64 and record["metrics"]["web_val"]["images"] > 0
        outputs.append(record)
    report = load_weights(create_model(ModelConfig(use_segments=False)), outputs[0]["output"], preset="tiny")
    assert report["skipped"] == [] and report["tensors"] == len(torch.load(outputs[0]["output"], weights_only=True))
    assert outputs[0]["sha256"] == outputs[1]["sha256"]  # CPU training is deterministic
