"""Retrieval as CMPAGL/ALBEF-style models do it: rank by the pre-aligned similarity, re-score the
top k with the matching (ITM) head, then SMR. Pure functions on [images, texts] matrices.

Each stage is ONE [images, texts] matrix, so `retrieval_metrics` (rows: image->text, columns:
text->image) and `smr_rerank` read every stage unchanged:

- `prealign`: S, the cosine similarity of the pre-aligned embeddings (the whole gallery);
- `itm`: every pair in either direction's top k of S (each image's k best texts and each
  text's k best images) gets the matching head's probability p, and

      R[i,t] = (1 - w) * p(i,t) + w * (S[i,t] + 1) / 2    for re-scored pairs   (in [0, 1])
      R[i,t] = (S[i,t] - 1) / 2                             for the others        (in [-1, 0])

  so re-scored candidates rank above all others, ordered by p (w = `sim_weight` lets S break
  near-ties, as ALBEF adds the contrastive similarity to the ITM score), the others keep S's
  order, and R stays a cosine-like matrix in [-1, 1] as SMR expects. A query may see a few more
  than k re-scored candidates: pairs that made the *other* direction's top k are scored too.
- `itm_smr`: SMR on R; `prealign_smr`: SMR on S (the ablation without the matching head).

Cost: the matching head runs on at most (images + texts) * k pairs, in batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import torch

from urbancross.config import SMRConfig
from urbancross.evaluate.metrics import retrieval_metrics
from urbancross.evaluate.smr import smr_rerank

STAGES = ("prealign", "prealign_smr", "itm", "itm_smr")


def candidate_pairs(similarity: torch.Tensor, k: int, chunk_size: int = 512) -> torch.Tensor:
    """[P,2] (image, text) index pairs, sorted and unique, in either direction's top k of `similarity`."""
    s = _matrix(similarity)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n_img, n_txt = s.shape
    keys = []
    for start in range(0, n_img, chunk_size):
        idx = s[start : start + chunk_size].topk(min(k, n_txt), dim=1).indices  # texts of each image
        rows = torch.arange(start, start + idx.shape[0])[:, None]
        keys.append((rows * n_txt + idx).reshape(-1))
    for start in range(0, n_txt, chunk_size):
        idx = s[:, start : start + chunk_size].topk(min(k, n_img), dim=0).indices  # images of each text
        cols = torch.arange(start, start + idx.shape[1])[None, :]
        keys.append((idx * n_txt + cols).reshape(-1))
    flat = torch.unique(torch.cat(keys)) if keys else torch.zeros(0, dtype=torch.long)
    return torch.stack([flat // n_txt, flat % n_txt], dim=1)


def itm_matrix(similarity: torch.Tensor, pairs: torch.Tensor, scores: torch.Tensor, sim_weight: float = 0.1) -> torch.Tensor:
    """The `itm` stage matrix R from S, the re-scored `pairs` [P,2] and their match probabilities [P]."""
    s = _matrix(similarity)
    scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
    if scores.shape[0] != pairs.shape[0]:
        raise ValueError(f"{pairs.shape[0]} pairs but {scores.shape[0]} scores")
    if scores.numel() and (float(scores.min()) < 0.0 or float(scores.max()) > 1.0):
        raise ValueError("scores must be match probabilities in [0, 1]")
    if not 0.0 <= sim_weight <= 1.0:
        raise ValueError(f"sim_weight must be in [0, 1], got {sim_weight}")
    out = (s - 1) / 2
    i, t = pairs[:, 0], pairs[:, 1]
    out[i, t] = (1 - sim_weight) * scores + sim_weight * (s[i, t] + 1) / 2
    return out


def rerank_stages(
    similarity: torch.Tensor | np.ndarray,
    score_pairs: Callable[[torch.Tensor], torch.Tensor],
    *,
    k: int,
    smr: SMRConfig,
    sim_weight: float = 0.1,
    batch_size: int = 256,
) -> dict[str, torch.Tensor]:
    """Every stage's matrix (`STAGES`), from S and `score_pairs`: [n,2] pairs -> [n] P(match).

    `score_pairs` is called on batches of at most `batch_size` candidate pairs, e.g.
    `CMPAGLModel.pair_scorer(image_tokens, tokens)`. SMR is applied with `smr` (its `enabled`
    flag is ignored here: both with and without SMR are returned).
    """
    s = _matrix(similarity)
    pairs = candidate_pairs(s, k)
    scores = [torch.as_tensor(score_pairs(pairs[b : b + batch_size])).float().reshape(-1).cpu()
              for b in range(0, pairs.shape[0], batch_size)]
    return stages_from_scores(s, pairs, torch.cat(scores) if scores else torch.zeros(0), smr=smr, sim_weight=sim_weight)


def stages_from_scores(
    similarity, pairs: torch.Tensor, scores: torch.Tensor, *, smr: SMRConfig, sim_weight: float = 0.1
) -> dict[str, torch.Tensor]:
    """`rerank_stages` when the candidate `pairs`' match probabilities are already known
    (e.g. scored by a Ray Data stage, `score_candidates`)."""
    s = _matrix(similarity)
    r = itm_matrix(s, pairs, scores, sim_weight)
    on = dataclasses.replace(smr, enabled=True)
    return {"prealign": s, "prealign_smr": smr_rerank(s, on), "itm": r, "itm_smr": smr_rerank(r, on)}


def stage_metrics(
    stages: dict[str, torch.Tensor], image_of_text: Sequence[int] | np.ndarray | torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, dict[str, float]]:
    """R@K (both directions) and mR per stage, so each stage's gain is visible."""
    return {name: retrieval_metrics(matrix, image_of_text, ks) for name, matrix in stages.items()}


def _matrix(similarity) -> torch.Tensor:
    s = torch.as_tensor(similarity, dtype=torch.float32)
    if s.ndim != 2:
        raise ValueError(f"similarity must be 2-D [images, texts], got shape {tuple(s.shape)}")
    if s.numel() and (float(s.min()) < -1.0 - 1e-4 or float(s.max()) > 1.0 + 1e-4):
        raise ValueError("similarity must be cosine similarities in [-1, 1] (not logits)")
    return s


# ---------------------------------------------------------------------- the evaluation job's stage


class CandidateScorer:
    """Ray Data actor (and the in-process path): manifest rows of gallery images, each with the
    token ids of its candidate captions (`cand_tokens`, a list per row) and their pair indices
    (`cand_pair`) -> `pair` [P], `score` [P] (the matching head's P(match)). The image is decoded
    and encoded once for all its candidates; the model is loaded once per actor."""

    def __init__(self, cfg, weights: str | None = None, model=None):
        from urbancross.model.factory import create_model
        from urbancross.model.inputs import ModelInputs

        torch.set_num_threads(max(1, int(cfg.evaluate.num_cpus)))
        if model is None:  # an actor: on its GPU when `evaluate.num_gpus` > 0, as the embedding actors
            device = "cuda" if cfg.evaluate.num_gpus > 0 and torch.cuda.is_available() else "cpu"
            model = create_model(cfg.model, pretrained=weights).eval().to(device)
        self.model = model
        self.device = next(model.parameters()).device
        self.inputs = ModelInputs(cfg, train=False)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cand_tokens, cand_pair = batch.pop("cand_tokens"), batch.pop("cand_pair")
        x = self.inputs(batch)
        _, image_tokens = self.model.image_features(torch.as_tensor(x["images"]).to(self.device))
        owner = np.concatenate([np.full(len(p), i) for i, p in enumerate(cand_pair)]).astype(np.int64)
        if len(owner) == 0:
            return {"pair": np.zeros(0, np.int64), "score": np.zeros(0, np.float32)}
        tokens = torch.as_tensor(np.stack([np.asarray(t, dtype=np.int64) for ts in cand_tokens for t in ts])).to(self.device)
        score = self.model.match_score(image_tokens[torch.as_tensor(owner, device=self.device)], tokens)
        return {"pair": np.concatenate([np.asarray(p, dtype=np.int64) for p in cand_pair]), "score": score.float().cpu().numpy()}


def score_candidates(cfg, table, image_ids: np.ndarray, texts: list[str], owner: np.ndarray, pairs: torch.Tensor,
                     *, weights: str | None = None, model=None) -> torch.Tensor:
    """P(match) [P] of the candidate `pairs` (gallery image index, caption index) of one gallery:
    `image_ids` [N] its images (gallery order), `texts` [M] its captions. A Ray Data stage over
    the images (actors load `weights`) when `model` is None, else in-process with `model`."""
    import pyarrow as pa

    from urbancross.model.embed import actor_map, numpy_batches
    from urbancross.model.factory import get_tokenizer

    del owner  # the pairs name captions directly
    ids = table.column("image_id").to_pylist()
    where = {str(i): r for r, i in enumerate(ids)}
    rows = table.take([where[str(i)] for i in image_ids])
    token_ids = np.asarray(get_tokenizer(cfg.model)(list(texts)), dtype=np.int64)
    by_image: list[list[int]] = [[] for _ in range(len(image_ids))]
    for p, (i, _) in enumerate(pairs.tolist()):
        by_image[i].append(p)
    rows = rows.append_column("cand_pair", pa.array(by_image, type=pa.list_(pa.int64())))
    rows = rows.append_column("cand_tokens", pa.array([[token_ids[pairs[p, 1]].tolist() for p in ps] for ps in by_image],
                                                      type=pa.list_(pa.list_(pa.int64()))))
    if model is None:
        parts = actor_map(rows, CandidateScorer, {"cfg": cfg, "weights": weights}, cfg)
    else:
        scorer = CandidateScorer(cfg, model=model)
        parts = [scorer(b) for b in numpy_batches(rows, cfg.evaluate.batch_size)]
    scores = torch.zeros(pairs.shape[0])
    for part in parts:
        scores[torch.as_tensor(np.asarray(part["pair"], dtype=np.int64))] = torch.as_tensor(np.asarray(part["score"], dtype=np.float32))
    return scores


def domain_stages(cfg, table, emb: dict[str, np.ndarray], *, weights: str | None = None, model=None) -> dict[str, dict]:
    """Per test domain, every stage's metrics (`STAGES`): the gallery ranked by the pre-aligned
    similarity, its top `evaluate.rerank_k` re-scored by the matching head (`score_candidates`),
    each with and without SMR."""
    from urbancross.data.ingest import caption_texts
    from urbancross.evaluate.scoring import gallery

    out = {}
    captions = {str(r["image_id"]): caption_texts(r, cfg) for r in table.to_pylist()}
    for domain in sorted({str(d) for d in emb["domain"]}):
        images, text_vecs, owner = gallery(emb, domain)
        ids = emb["image_id"][np.flatnonzero(emb["domain"].astype(str) == domain)]
        counts = emb["num_captions"][np.flatnonzero(emb["domain"].astype(str) == domain)]
        texts = [c for i, n in zip(ids, counts) for c in captions[str(i)][: int(n)]]
        if len(texts) != len(text_vecs):
            raise RuntimeError(f"{domain}: {len(texts)} captions but {len(text_vecs)} caption embeddings")
        s = torch.as_tensor(images) @ torch.as_tensor(text_vecs).T
        pairs = candidate_pairs(s, cfg.evaluate.rerank_k)
        scores = score_candidates(cfg, table, ids, texts, owner, pairs, weights=weights, model=model)
        stages = stages_from_scores(s.clamp(-1, 1), pairs, scores, smr=cfg.evaluate.smr)
        out[domain] = {name: {k: float(v) for k, v in m.items()} for name, m in stage_metrics(stages, owner, cfg.evaluate.ks).items()}
    return out
