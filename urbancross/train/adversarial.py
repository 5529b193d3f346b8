"""Weighted adversarial fine-tuning (UrbanCross stage 2), as the paper and its reference code do it.

Each step ranks the source batch by target-likeness (its captions' similarity to the target
batch's), keeps the most target-like share -- growing over the passes, 20% -> 100% by default,
as the reference's `0.2 + 0.2 * cycle` -- trains retrieval on the kept rows, and weights each
kept row's term of the adversarial (domain) loss by its target-likeness, as the reference's
`AdversarialLoss` weights `log p` per source sample. `adapt.weighted_term=retrieval` (an
earlier variant of this code) puts the weights on the retrieval loss instead.

Fixes over the public reference code: a real gradient-reversal layer (the encoders learn to
*fool* the discriminator), a discriminator sized from the embedding dimension, weights
computed for and applied to the selected rows, and one module/optimizer/engine so that
DeepSpeed ZeRO-2 works (the discriminator has its own lr through a param group).

`mode="grl"`: every step trains the discriminator on the domain labels and, through the
reversal layer scaled by the adversarial weight, pushes the encoders the other way.
`mode="alternating"`: even optimizer steps train the discriminator on detached embeddings
(the encoders get only the retrieval loss), odd steps train the encoders against a frozen
discriminator (flipped labels, weighted) plus the retrieval loss -- the same single engine,
toggling which adversarial term is applied. The retrieval loss is in every step of both modes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from urbancross.loss import cmpagl_loss
from urbancross.model.embed import embed_batch

# --------------------------------------------------------------------------- reversal + discriminator


class GradReverse(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `-coeff`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = float(coeff)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.coeff * grad, None


def grad_reverse(x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
    return GradReverse.apply(x, coeff)


class DomainDiscriminator(nn.Module):
    """MLP embedding -> one logit (target = 1). `hidden=0` uses the embedding width."""

    def __init__(self, embed_dim: int, hidden: int = 0, depth: int = 2):
        super().__init__()
        if depth < 1:
            raise ValueError(f"discriminator depth must be >= 1, got {depth}")
        width = hidden or embed_dim
        layers: list[nn.Module] = []
        d = embed_dim
        for _ in range(depth - 1):
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        layers.append(nn.Linear(d, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def domain_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(BCE loss, accuracy) of domain logits against 0/1 labels.

    The loss is the mean over the two domains of each domain's (`weights`-)weighted mean BCE,
    as the reference's `-(mean(W log p_s) + mean(log(1 - p_t)))` up to the factor 2: the share
    of kept source rows changes over the passes, the balance of the two domains does not.
    """
    per = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    w = torch.ones_like(per) if weights is None else weights.to(per)
    parts = [(per * w * m).sum() / (w * m).sum().clamp_min(1e-12) for m in ((labels == 0).to(per), (labels == 1).to(per)) if m.any()]
    acc = ((logits > 0).float() == labels).float().mean()
    return torch.stack(parts).mean(), acc.detach()


# --------------------------------------------------------------------------- schedules


def step_phase(mode: str, step: int) -> str:
    """What optimizer step `step` trains: "grl" every step, or alternating "disc" (even) / "encoder" (odd)."""
    if mode == "grl":
        return "grl"
    return "disc" if step % 2 == 0 else "encoder"


def adversarial_weight(progress: float, schedule: str, max_weight: float, gamma: float = 10.0) -> float:
    """Weight of the adversarial term at training progress p in [0, 1].

    constant: w; linear: w p; dann: w (2 / (1 + exp(-gamma p)) - 1) (Ganin & Lempitsky 2015).
    """
    p = min(1.0, max(0.0, progress))
    if schedule == "constant":
        return max_weight
    if schedule == "linear":
        return max_weight * p
    if schedule == "dann":
        return max_weight * (2.0 / (1.0 + math.exp(-gamma * p)) - 1.0)
    raise ValueError(f"unknown adversarial schedule {schedule!r}; expected constant, linear or dann")


def kept_share(epoch: int, start: float, growth: float, enabled: bool = True) -> float:
    """The fine-tuning curriculum: the share of each source batch pass `epoch` keeps, easiest
    (most target-like) first: `start + growth * epoch`, capped at 1 (the reference: 0.2 + 0.2 c)."""
    return min(1.0, start + growth * epoch) if enabled else start


class AdaptSchedule:
    """Stage 2's schedule, one object for every loop that adapts (Ray Train, bench controls).

    From `adapt` settings and the optimizer steps in one pass over the source: the kept share
    of a pass (`share(epoch)`), and at step `i` of that pass the adversarial weight
    (`weight(epoch, i)`, progress = (epoch + min(i / steps_per_epoch, 1)) / epochs) and what
    optimizer step number `global_step` trains (`phase(global_step)`).
    """

    def __init__(self, cfg, steps_per_epoch: int):
        self.cfg = cfg
        self.steps_per_epoch = max(1, int(steps_per_epoch))

    def share(self, epoch: int) -> float:
        a = self.cfg
        return kept_share(epoch, a.select_fraction, a.select_growth, a.curriculum)

    def weight(self, epoch: int, i: int) -> float:
        a = self.cfg
        return adversarial_weight((epoch + min(i / self.steps_per_epoch, 1.0)) / a.epochs, a.schedule, a.max_weight, a.gamma)

    def phase(self, global_step: int) -> str:
        return step_phase(self.cfg.mode, global_step)


# --------------------------------------------------------------------------- source weighting


def target_likeness(source_text: torch.Tensor, target_text: torch.Tensor) -> torch.Tensor:
    """Per source sample: mean cosine similarity of its caption to the target batch's captions."""
    s = F.normalize(source_text.detach().float(), dim=-1)
    t = F.normalize(target_text.detach().float(), dim=-1)
    return (s @ t.T).mean(dim=1)


def select_and_weight(scores: torch.Tensor, share: float, floor: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """The most similar `share` of the rows (at least one; most similar first) and their weights.

    Weights: the kept similarities min-max scaled into [`floor`, 1], then normalised to mean 1
    (all equal -> all 1). `floor` > 0 never zeroes a kept row; `floor` = 0 is the reference's
    exact scaling, where the least similar kept row gets 0. Detached: weighting never trains
    the scorer.
    """
    scores = scores.detach()
    n = scores.shape[0]
    order = torch.argsort(scores, descending=True, stable=True)
    idx = order[: max(1, int(math.floor(share * n + 1e-9)))]
    s = scores[idx].float()
    span = s.max() - s.min()
    if span <= 1e-12:
        return idx, torch.ones_like(s)
    w = floor + (1.0 - floor) * (s - s.min()) / span
    return idx, w * (len(w) / w.sum())


def take_rows(out: dict, idx: torch.Tensor, batch: int) -> dict:
    """The model output restricted to rows `idx` (per-sample tensors only; scalars kept)."""
    picked = {}
    for k, v in out.items():
        if isinstance(v, dict):
            picked[k] = take_rows(v, idx, batch)
        elif torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == batch:
            picked[k] = v[idx]
        else:
            picked[k] = v
    return picked


# --------------------------------------------------------------------------- the stage-2 module


class AdaptObjective(nn.Module):
    """Model + discriminator in one module: forward(source, target, ...) -> (loss, logs).

    `phase`: "grl", or for mode=alternating "disc" / "encoder" (see the module docstring).

    Everything that touches parameters runs inside this forward, so the DeepSpeed engine
    (ZeRO-3 included) sees one module; the discriminator is a submodule with its own
    optimizer param group.
    """

    def __init__(self, model: nn.Module, loss_cfg, adapt_cfg):
        super().__init__()
        self.model = model
        self.disc = DomainDiscriminator(model.embed_dim, adapt_cfg.disc_hidden, adapt_cfg.disc_depth)
        self.loss_cfg = loss_cfg
        self.cfg = adapt_cfg

    def forward(
        self,
        source: dict,
        target: dict | None = None,
        adv_weight: float = 0.0,
        share: float = 1.0,
        phase: str = "grl",
        embed: bool = False,
    ):
        if embed:  # validation: `embed_batch` of `source`
            return embed_batch(self.model, source)

        s_out = _run(self.model, source)
        t_out = _run(self.model, target)
        likeness = target_likeness(s_out["text"], t_out["text"])
        idx, w = select_and_weight(likeness, share, self.cfg.weight_floor)
        sel = take_rows(s_out, idx, source["images"].shape[0])
        on_domain = self.cfg.weighted_term == "domain"
        labels = source.get("label")
        # cmpagl_loss = retrieval_loss (+ the matching head's loss for a CMPAGL model, so it keeps training)
        itm = self.loss_cfg.itm_weight
        ret, _ = cmpagl_loss(sel, self.loss_cfg, weights=None if on_domain else w.to(sel["fused"].dtype),
                             labels=None if labels is None else labels[idx], itm_weight=itm)
        if self.cfg.use_target_captions:  # the labelled-target setting: its scene classes too
            ret = ret + cmpagl_loss(t_out, self.loss_cfg, labels=target.get("label"), itm_weight=itm)[0]

        keys = ("fused", "text") if self.cfg.disc_inputs == "image_text" else ("fused",)
        src = torch.cat([sel[k] for k in keys])
        tgt = torch.cat([t_out[k] for k in keys])
        feats = torch.cat([src, tgt])
        labels = torch.cat([torch.zeros(len(src)), torch.ones(len(tgt))]).to(feats.device, feats.dtype)
        row_w = torch.cat([w.repeat(len(keys)), torch.ones(len(tgt), device=w.device)]) if on_domain else None
        if phase == "grl":
            d_loss, acc = domain_loss(self.disc(grad_reverse(feats, adv_weight)), labels, row_w)
            total = ret + d_loss
        elif phase == "disc":
            d_loss, acc = domain_loss(self.disc(feats.detach()), labels, row_w)
            total = ret + d_loss
        elif phase == "encoder":
            frozen = {n: p.detach() for n, p in self.disc.named_parameters()}
            logits = torch.func.functional_call(self.disc, frozen, (feats,))
            d_loss, fooled = domain_loss(logits, 1.0 - labels, row_w)
            acc = 1.0 - fooled  # logged against the true labels, like the other phases
            total = ret + adv_weight * d_loss
        else:
            raise ValueError(f"unknown adversarial phase {phase!r}")
        logs = {
            "retrieval": ret.detach(),
            "domain": d_loss.detach(),
            "disc_acc": acc,
            "selected_likeness": likeness[idx].mean(),
            "weight_max": w.max(),
            "kept": torch.tensor(float(len(idx))),
        }
        return total, logs


def _run(model: nn.Module, batch: dict) -> dict:
    return model(batch["images"], batch["tokens"], batch.get("segments"), batch.get("segment_mask"),
        **({"segment_pixels": batch["segment_pixels"]} if "segment_pixels" in batch else {}))
