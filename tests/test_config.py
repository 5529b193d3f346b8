import time

import pytest

from urbancross.config import Config, ConfigError, SynthConfig, load_config, save_config


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_yaml_override(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  epochs: 3\n  lr: 1\n  weight_decay: 1e-3\nsynth:\n  domains: [A, B]\n"))
    assert cfg.train.epochs == 3
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.weight_decay == 0.001  # YAML 1.1 reads 1e-3 as a string
    assert cfg.synth.domains == ("A", "B")  # lists are stored as tuples: a config is a frozen value
    assert cfg.train.batch_size == Config().train.batch_size


def test_unknown_key_names_file_and_path(tmp_path):
    p = write(tmp_path, "train:\n  curriculum:\n    pacin: root\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value)
    assert "train.curriculum.pacin" in str(e.value)
    assert "pacing" in str(e.value)  # lists what is accepted


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("train:\n  epochs: three\n", "train.epochs: expected an integer"),
        ("train:\n  lr: fast\n", "train.lr: expected a number"),
        ("train:\n  epochs: true\n", "train.epochs: expected an integer"),
        ("loss:\n  kind: focal\n", "loss.kind: must be one of"),
        ("train:\n  zero_stage: 4\n", "zero_stage must be 0-3"),
        ("train: 3\n", "train must be a mapping"),
        ("- a\n", "top level must be a mapping"),
        ("train: [\n", "not valid YAML"),
    ],
)
def test_bad_values(tmp_path, text, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        load_config(write(tmp_path, text))


def test_off_is_shorthand_for_disabled(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  curriculum: off\n"))
    assert cfg.train.curriculum.enabled is False
    assert cfg.train.curriculum.pacing == Config().train.curriculum.pacing


def test_overrides_and_roundtrip(tmp_path):
    cfg = load_config(None, ["train.epochs=2", "model.use_segments=false", "seed=7"])
    assert (cfg.train.epochs, cfg.model.use_segments, cfg.seed) == (2, False, 7)
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["train.epochs"])


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_flat_and_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(None, [f"out_dir={tmp_path}"])
    flat = cfg.flat()
    assert flat["train.curriculum.pacing"] == cfg.train.curriculum.pacing
    assert cfg.tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    assert cfg.override({"mlflow.tracking_uri": "http://127.0.0.1:5000"}).tracking_uri() == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")  # set by mlflow itself in-process
    assert cfg.tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"


def test_demo_config_is_valid_and_only_overrides_its_budget():
    from urbancross.demo import DEMO_CONFIG

    cfg, default = load_config(DEMO_CONFIG), Config()
    changed = {k for k, v in cfg.flat().items() if default.flat()[k] != v}
    assert changed == {
        "synth.images_per_domain", "preprocess.sam.checkpoint", "model.pretrained", "model.use_segments", "train.epochs",
        "train.batch_size", "train.lr", "train.curriculum.rescore_every", "adapt.epochs", "adapt.lr",
    }
    assert (cfg.model.pretrained, cfg.preprocess.sam.checkpoint) == ("embedded", "embedded")  # the packaged pretrained models
    assert (cfg.model.use_segments, cfg.train.epochs, cfg.train.lr, cfg.adapt.epochs, cfg.adapt.lr) == (False, 10, 1e-4, 8, 1e-6)


# --------------------------------------------------------------------------- a config is a value


def test_config_is_frozen_and_override_derives_a_validated_copy():
    import dataclasses

    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.out_dir = "elsewhere"
    assert isinstance(cfg.synth.domains, tuple) and isinstance(cfg.evaluate.ks, tuple)  # nothing inside changes
    new = cfg.override({"train.epochs": 3, "data.manifest": "/m"})
    assert (new.train.epochs, new.data.manifest) == (3, "/m")
    assert (cfg.train.epochs, cfg.data.manifest) == (Config().train.epochs, "")  # the original is unchanged
    assert cfg.override(["train.epochs=3", "data.manifest=/m"]) == new  # the --set form
    assert cfg.override({"model": new.override({"model.use_segments": False}).model}).model.use_segments is False
    with pytest.raises(ConfigError, match="images_per_domain must be >= 2, got 1"):
        SynthConfig(images_per_domain=1)  # a section validates itself when built, however it is built


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"synth.images_per_domain": 1}, "flag: synth: images_per_domain must be >= 2, got 1"),
        ({"train.epochs": "3"}, "flag: train.epochs: expected an integer, got '3'"),
        ({"train.epoch": 3}, "flag: unknown key train.epoch; train accepts:"),
        ({"loss.kind": "focal"}, "flag: loss.kind: must be one of"),
        ({"train.epochs.x": 3}, "flag: train.epochs.x: epochs is not a section"),
        (["train.epochs"], "expected KEY=VALUE"),
    ],
)
def test_override_validates_like_a_file(changes, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        Config().override(changes, where="flag")


def test_cli_flags_are_validated(tmp_path, capsys):
    from urbancross.cli import main

    assert main(["data", "synth", "--out", str(tmp_path / "m"), "--images-per-domain", "1"]) == 2
    err = capsys.readouterr().err
    assert "command line: synth: images_per_domain must be >= 2, got 1" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()


# --------------------------------------------------------------------------- hostile and careless files


def test_yaml_aliases_are_refused_fast(tmp_path):
    """A 'billion laughs' file: nine nested aliases expand 386 bytes into 9**9 strings."""
    import time

    lines = ["train:", "  epochs:", '    - &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"    - &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    p = write(tmp_path, "\n".join(lines) + "\n")
    assert p.stat().st_size < 500
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases .* are not allowed") as e:
        load_config(p)
    assert time.perf_counter() - t0 < 5 and str(p) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="aliases"):
        load_config(None, ["synth.domains=[&a x, *a]"])


def test_non_utf8_file_is_one_line_naming_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes("train:\n  epochs: 3 # réglé\n".encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(f"{p}: not UTF-8") and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.lr=-1", "train: lr must be > 0, got -1.0"),
        ("train.lr=.nan", "train: lr must be > 0, got nan"),
        ("adapt.lr=.inf", "adapt: lr must be > 0, got inf"),
        ("train.cpus_per_worker=-1", "train: cpus_per_worker must be >= 0, got -1.0"),
        ("data.num_segments=-1", "data: num_segments must be >= 1, got -1"),
        ("preprocess.sam.num_segments=0", "preprocess.sam: num_segments must be >= 1, got 0"),
        ("promote.margin=.inf", "promote: margin must be >= 0, got inf"),
        ("evaluate.ks=[1, -5]", "evaluate: ks must be >= 1, got (1, -5)"),
        ("seed=-1", "seed must be >= 0, got -1"),
        ("train.lr=1e999", "train: lr must be > 0, got inf"),
        ("train.epochs=" + "9" * 5000, "not valid YAML"),
    ],
)
def test_numeric_ranges_and_non_finite_values(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_config(None, [override])


def test_every_numeric_field_declares_its_range():
    import dataclasses
    import typing

    def walk(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                yield from walk(tp, f"{prefix}{f.name}.")
            elif tp in (int, float) or typing.get_args(tp)[:1] in ((int,), (float,)):
                yield f"{prefix}{f.name}", f.metadata.get("range")

    numeric = dict(walk(Config))
    assert len(numeric) > 80
    assert [name for name, bounds in numeric.items() if bounds is None] == []


def test_a_huge_bad_value_is_not_echoed(tmp_path):
    p = write(tmp_path, "train:\n  epochs: " + "x" * 1_000_000 + "\n" + "y" * 1_000_000 + "z: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert len(str(e.value)) < 400, str(e.value)[:400]
    with pytest.raises(ConfigError) as e:
        load_config(None, ["tune.name=" + "/" * 1_000_000])
    assert len(str(e.value)) < 400


# --------------------------------------------------------------------------- the config a run saves


def test_demo_saves_the_config_it_runs_with(tmp_path, monkeypatch):
    """What the demo saves names the preprocessed manifest and absolute paths, so a later
    command (evaluate, promote) takes it unchanged, from any working directory."""
    from urbancross.demo import DEMO_CONFIG, demo_config

    monkeypatch.chdir(tmp_path)
    cfg = demo_config(load_config(DEMO_CONFIG, ["out_dir=demo_out"]))
    out = tmp_path / "demo_out"
    assert cfg.out_dir == str(out)
    assert (cfg.preprocess.input, cfg.preprocess.output) == (str(out / "benchmark"), str(out / "preprocessed"))
    assert cfg.data.manifest == str(out / "preprocessed") and cfg.evaluate.output == str(out)
    save_config(cfg, out / "config.yaml")
    monkeypatch.chdir("/")
    again = load_config(out / "config.yaml")
    assert again == cfg and demo_config(again) == cfg  # a re-run of the demo on it plans the same run
    own = demo_config(load_config(DEMO_CONFIG, [f"out_dir={out}", "data.manifest=/data/m"]))
    assert (own.preprocess.input, own.data.manifest) == ("/data/m", str(out / "preprocessed"))


def test_demo_writes_each_stage_time_as_it_finishes(tmp_path):
    import json

    from urbancross.demo import TIMINGS_FILE, _timed

    timings: list[dict] = []
    assert _timed("first", lambda: 7, timings, tmp_path) == 7
    _timed("second", lambda: time.sleep(0.05), timings, tmp_path)
    saved = json.loads((tmp_path / TIMINGS_FILE).read_text())
    assert [t["stage"] for t in saved] == ["first", "second"] and saved[1]["seconds"] >= 0.05
    assert saved[0]["started"] <= saved[1]["started"] <= time.time()


def test_an_empty_manifest_path_is_refused_naming_the_field(tmp_path, monkeypatch):
    """An empty `data.manifest` once read the working directory ("not a readable Parquet dataset
    ... adapt/model.json"); now it fails naming the field, before any model is loaded."""
    from urbancross.data.manifest import ManifestError, read_manifest
    from urbancross.registry.promote import evaluate_model_uri

    (tmp_path / "adapt").mkdir()
    (tmp_path / "adapt" / "model.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ManifestError, match="manifest path is empty: set data.manifest"):
        read_manifest("")
    cfg = load_config(None, [f"out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="promote.manifest and data.manifest are both empty"):
        evaluate_model_uri(cfg, "runs:/0123/model")  # no such run: the check comes first
