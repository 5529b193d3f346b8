"""The logged model: an MLflow pyfunc that turns texts or images into retrieval embeddings.

Why a pyfunc and not the pytorch flavor: the model has two towers and a fusion step, and
a consumer (search, a serving endpoint, the promotion gate) needs "text -> vector" and
"image -> vector" without the training code's Ray machinery. The artifacts are the plain
state dict and the run's config YAML; `code_paths` ships the `urbancross` package, so
`models:/NAME@champion` loads where the project is not installed.

Input: a DataFrame with a `text` column (strings) or an `image` column (PNG/JPEG bytes).
Output: float32 [N, D], L2-normalised (the `fused` retrieval embedding for images).

The pyfunc is for serving only. Our own commands (promote, index, search) read a logged
model as data with `load_urbancross`: MLmodel and config as YAML, weights with
`torch.load(weights_only=True)`; `python_model.pkl` (cloudpickle) is never unpickled, so
whoever can write to the registry's artifact store cannot run code in them.
"""

from __future__ import annotations

import importlib.metadata
import os
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
import yaml

from urbancross.config import Config, load_config, save_config
from urbancross.data.manifest import decode_image
from urbancross.model.embed import embed_images
from urbancross.model.factory import create_model, get_tokenizer, image_transform

REQUIREMENTS = ("torch", "torchvision", "open_clip_torch", "mlflow", "pandas", "pillow", "pyyaml", "pyarrow")
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def signature(embed_dim: int):
    """Either column may be given (one per call); the output is one vector per row."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    inputs = Schema([ColSpec("string", "text", required=False), ColSpec("binary", "image", required=False)])
    outputs = Schema([TensorSpec(np.dtype("float32"), (-1, embed_dim))])
    return ModelSignature(inputs=inputs, outputs=outputs)


def requirements() -> list[str]:
    """Pinned to what is installed here; explicit, so MLflow skips its slow inference."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in REQUIREMENTS]


class UrbanCrossPyfunc(mlflow.pyfunc.PythonModel):
    """Text or image bytes -> embeddings; `model`/`cfg` are exposed for batch jobs (index, promote)."""

    def load_context(self, context) -> None:
        self.cfg = load_config(context.artifacts["config"])
        self.model = create_model(self.cfg.model, pretrained=context.artifacts["weights"]).eval()
        self.tokenize = get_tokenizer(self.cfg.model)
        self.transform = image_transform(self.cfg.model, train=False)

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> np.ndarray:
        given = [c for c in ("text", "image") if c in model_input.columns and model_input[c].notna().all()]
        if len(given) != 1:
            raise ValueError(f"input needs exactly one of the columns `text` or `image` (no nulls); got {list(model_input.columns)}")
        if given == ["text"]:
            return embed_texts(self.model, self.tokenize, [str(t) for t in model_input["text"]])
        with torch.no_grad():
            images = [self.transform(decode_image(bytes(b), f"input row {i}")) for i, b in enumerate(model_input["image"])]
            return embed_images(self.model, torch.stack([torch.as_tensor(np.asarray(x)) for x in images])).float().numpy()


@torch.no_grad()
def embed_texts(model, tokenize, texts: list[str]) -> np.ndarray:
    """Query vectors [N, D] (float32), as the served model returns them for a `text` column."""
    return model.encode_text(torch.as_tensor(np.asarray(tokenize(texts)))).float().numpy()


def log_model(model_path: str, cfg: Config, name: str = "model") -> str:
    """Log the state dict at `model_path` (+ `cfg`) as a pyfunc in the active run; returns its URI.

    Call inside an active MLflow run (e.g. `tracking.mlflow_run`). The version in the
    registry is created later by `urbancross promote --run RUN_ID` from `runs:/RUN_ID/<name>`.
    """
    embed_dim = int(create_model(cfg.model, pretrained=model_path).embed_dim)
    with tempfile.TemporaryDirectory() as tmp:
        config_path = os.path.join(tmp, "config.yaml")
        save_config(cfg, config_path)
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=UrbanCrossPyfunc(),
            artifacts={"weights": str(model_path), "config": config_path},
            signature=signature(embed_dim),
            code_paths=[str(PACKAGE_DIR)],
            pip_requirements=requirements(),
            metadata={"family": cfg.model.family, "preset": cfg.model.preset, "embed_dim": embed_dim, "model_config": cfg.to_dict()["model"]},
        )
    return info.model_uri


def load_urbancross(model_uri: str):
    """`models:/...` or `runs:/...` -> (UrbanCrossModel in eval mode, its Config), read as data.

    Downloads the logged model and reads only MLmodel (YAML), the config artifact (YAML, with
    the config loader's limits) and the weights (`create_model`: `torch.load(weights_only=True)`);
    the pickled python_model and the shipped code are not loaded.
    """
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        weights, config = _artifact_paths(local, model_uri)
        cfg = load_config(str(config))
        model = create_model(cfg.model, pretrained=str(weights)).eval()
    return model, cfg


def _artifact_paths(local: Path, model_uri: str) -> tuple[Path, Path]:
    """The weights and config files a model logged by `log_model` names in its MLmodel."""
    try:
        meta = yaml.safe_load((local / "MLmodel").read_text(encoding="utf-8"))
        artifacts = meta["flavors"]["python_function"]["artifacts"]
        paths = [(local / artifacts[key]["path"]).resolve() for key in ("weights", "config")]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError) as e:
        raise TypeError(f"{model_uri}: not an UrbanCross model (MLmodel has no weights/config artifacts: {e!r})") from None
    for path in paths:
        if not path.is_relative_to(local.resolve()) or not path.is_file():
            raise TypeError(f"{model_uri}: not an UrbanCross model (artifact {path.name} missing or outside the model)")
    return paths[0], paths[1]
