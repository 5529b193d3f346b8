import pytest

from urbancross.config import Config, ConfigError, load_config, save_config


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_yaml_override(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  epochs: 3\n  lr: 1\n  weight_decay: 1e-3\nsynth:\n  domains: [A, B]\n"))
    assert cfg.train.epochs == 3
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.weight_decay == 0.001  # YAML 1.1 reads 1e-3 as a string
    assert cfg.synth.domains == ["A", "B"]
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
    cfg.mlflow.tracking_uri = "http://127.0.0.1:5000"
    assert cfg.tracking_uri() == "http://127.0.0.1:5000"
    cfg.mlflow.tracking_uri = ""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")  # set by mlflow itself in-process
    assert cfg.tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"


def test_demo_config_is_valid_and_only_overrides_its_budget():
    from urbancross.demo import DEMO_CONFIG

    cfg, default = load_config(DEMO_CONFIG), Config()
    changed = {k for k, v in cfg.flat().items() if default.flat()[k] != v}
    assert changed == {
        "synth.images_per_domain", "model.use_segments", "train.epochs", "train.batch_size",
        "train.lr", "train.curriculum.rescore_every", "adapt.epochs",
    }
    assert (cfg.model.use_segments, cfg.train.epochs, cfg.train.lr, cfg.adapt.epochs) == (False, 40, 0.001, 8)
