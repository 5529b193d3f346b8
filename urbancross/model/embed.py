"""Embedding: a model turns images and captions into retrieval vectors, one way everywhere.

Training's validation and curriculum rescoring, evaluation, promotion, the search index and
the logged MLflow model all call these functions, so every number comes from the same
computation. From the innermost out:

- `embed_images`: the retrieval embedding of images (fused with their segments when the
  model fuses; an image without segments gets an all-masked set, exactly as in training,
  where `ModelInputs` gives every row a segment mask);
- `embed_batch`: a model-ready tensor batch -> (image vectors, vectors of all its captions);
- `embed_rows`: raw manifest rows -> `image_id`, `domain`, `image`, `text`, `num_captions`
  (numpy), decoding them with `ModelInputs`; for a model that fuses segments also
  `image_only`, the tile's own embedding, so evaluation scores both ways (as the reference);
- `embed_table` runs `embed_rows` in-process (tests, promotion), `embed_dataset` as Ray Data
  batch inference over an actor pool (`Embedder` loads the model once per actor): both give
  the same numbers, rows sorted by image id.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from urbancross.config import Config
from urbancross.model.factory import create_model
from urbancross.model.inputs import ModelInputs

BATCH_TENSORS = ("images", "tokens", "segments", "segment_mask")  # the columns of ModelInputs a model takes


def fuses_segments(model: nn.Module) -> bool:
    """An UrbanCross model with segment fusion (CMPAGL's `fusion` is its text-image fusion encoder)."""
    return hasattr(model, "fuse") and getattr(model, "fusion", None) is not None


def embed_images(model: nn.Module, images: torch.Tensor, segments=None, segment_mask=None) -> torch.Tensor:
    """[B,3,H,W] (+ segments [B,S,3,H,W], mask [B,S]) -> L2-normalised retrieval embeddings [B,D]."""
    return embed_images_both(model, images, segments, segment_mask)[0]


def embed_images_both(model: nn.Module, images: torch.Tensor, segments=None, segment_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(retrieval embeddings, the tiles' own embeddings without segments); the same tensor twice
    when the model does not fuse."""
    if not fuses_segments(model):
        image = model.encode_image(images)
        return image, image
    if segments is None:
        segments = images.new_zeros(images.shape[0], 1, *images.shape[1:])
        segment_mask = torch.zeros(images.shape[0], 1, dtype=torch.bool, device=images.device)
    elif segment_mask is None:
        segment_mask = torch.ones(segments.shape[:2], dtype=torch.bool, device=segments.device)
    segment_mask = torch.as_tensor(segment_mask, dtype=torch.bool)
    image, _, seg = model.encode_image_segments(images, segments, segment_mask)
    return model.fuse(image, seg, segment_mask), image


def embed_batch(model: nn.Module, batch: Mapping[str, torch.Tensor], texts: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(image embeddings [B,D], embeddings of every caption [B*C,D] or None when `texts=False`).

    `batch["tokens"]` is [B,C,L] (every caption of each image) or [B,L] (one per image).
    """
    image = embed_images(model, batch["images"], batch.get("segments"), batch.get("segment_mask"))
    return image, embed_texts(model, batch["tokens"]) if texts else None


def embed_texts(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Token ids [B,C,L] or [B,L] -> caption embeddings [B*C,D] (or [B,D])."""
    return model.encode_text(tokens.flatten(0, 1) if tokens.dim() == 3 else tokens)


@torch.no_grad()
def embed_rows(model: nn.Module, inputs: ModelInputs, rows: Mapping[str, np.ndarray], cfg: Config, texts: bool = True) -> dict[str, np.ndarray]:
    """Raw manifest rows -> `image_id`, `domain`, `image` [B,D] (+ `image_only` [B,D] when the model
    fuses segments), `text` [B,C,D], `num_captions` [B].

    `inputs` is a `ModelInputs(cfg, train=False, keep_ids=True)`. It gives C = 5 captions
    per image (cycled when fewer); `num_captions` says how many are real, so repeats are not
    scored as extra queries. `texts=False`: images only (an index).
    """
    x = inputs(rows)
    device = next(model.parameters()).device
    batch = {k: torch.as_tensor(x[k]).to(device) for k in BATCH_TENSORS if k in x}
    image, image_only = embed_images_both(model, batch["images"], batch.get("segments"), batch.get("segment_mask"))
    out = {"image_id": x["image_id"], "domain": x["domain"], "image": image.float().cpu().numpy()}
    if fuses_segments(model):
        out["image_only"] = image_only.float().cpu().numpy()
    if not texts:
        return out
    text = embed_texts(model, batch["tokens"])
    b, c = x["tokens"].shape[:2]
    out["text"] = text.reshape(b, c, -1).float().cpu().numpy()
    out["num_captions"] = x["num_captions"]
    return out


class Embedder:
    """Ray Data actor: loads the model once (plain state dict, on the GPU when `evaluate.num_gpus` > 0), then embeds batches of rows."""

    def __init__(self, cfg: Config, weights: str):
        torch.set_num_threads(max(1, int(cfg.evaluate.num_cpus)))
        self.cfg = cfg
        device = "cuda" if cfg.evaluate.num_gpus > 0 and torch.cuda.is_available() else "cpu"  # the actor's GPU
        self.model = create_model(cfg.model, pretrained=weights).eval().to(device)
        self.inputs = ModelInputs(cfg, train=False, keep_ids=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return embed_rows(self.model, self.inputs, batch, self.cfg)


def numpy_batches(table: pa.Table, batch_size: int):
    """Arrow table -> dicts of 1-D object/number arrays, the shape Ray's numpy batches have."""
    for rb in table.to_batches(max_chunksize=batch_size):
        batch = {}
        for name, col in zip(rb.schema.names, rb.columns):
            values = col.to_pylist()
            arr = np.empty(len(values), dtype=object)
            arr[:] = values
            batch[name] = arr
        yield batch


def embed_table(model: nn.Module, table: pa.Table, cfg: Config) -> dict[str, np.ndarray]:
    """In-process embedding of manifest rows (no Ray): the reference path."""
    model.eval()
    inputs = ModelInputs(cfg, train=False, keep_ids=True)
    parts = [embed_rows(model, inputs, b, cfg) for b in numpy_batches(table, cfg.evaluate.batch_size)]
    return _sorted({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})


def embed_dataset(weights: str, table: pa.Table, cfg: Config) -> dict[str, np.ndarray]:
    """The same embedding as `embed_table`, as Ray Data batch inference over an actor pool."""
    parts = actor_map(table, Embedder, {"cfg": cfg, "weights": weights}, cfg)
    return _sorted({k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]})


def actor_map(table: pa.Table, fn_class: type, kwargs: dict[str, Any], cfg: Config) -> list[dict[str, np.ndarray]]:
    """Batch inference: `fn_class(**kwargs)` once per actor (evaluate.concurrency/num_cpus/num_gpus)."""
    import ray  # only batch inference needs Ray; in-process embedding must not start it

    ds = ray.data.from_arrow(table).map_batches(
        fn_class,
        fn_constructor_kwargs=kwargs,
        batch_size=cfg.evaluate.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.evaluate.concurrency),
        num_cpus=cfg.evaluate.num_cpus,
        num_gpus=cfg.evaluate.num_gpus,
    )
    return list(ds.iter_batches(batch_size=None, batch_format="numpy"))


def _sorted(emb: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows ordered by image id: Ray returns blocks in any order; metrics must not depend on it."""
    order = np.argsort(emb["image_id"].astype(str), kind="stable")
    return {k: v[order] for k, v in emb.items()}
