"""Weighted adversarial fine-tuning (UrbanCross stage 2), done as the paper describes.

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

from urbancross.loss import retrieval_loss
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


def domain_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(BCE loss, accuracy) of domain logits against 0/1 labels."""
    loss = F.binary_cross_entropy_with_logits(logits, labels)
    acc = ((logits > 0).float() == labels).float().mean()
    return loss, acc.detach()


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


def selection_window(
    epoch: int, epochs: int, select_fraction: float, slices: int = 5, length: float = 1.0, enabled: bool = True
) -> tuple[float, float]:
    """The fine-tuning curriculum: which slice of the target-likeness ranking a pass uses.

    Ranks are fractions of a batch, 0 = most target-like. The window has width
    `select_fraction`; over the passes its start moves through `slices` evenly spaced
    positions from 0 (easiest) to `1 - select_fraction` (hardest), reaching the last after
    `length` of the passes. With select_fraction=0.2 and 5 slices these are the quintiles.
    """
    if not enabled or slices <= 1 or epochs <= 1:
        return 0.0, select_fraction
    t = min(1.0, epoch / max(length * (epochs - 1), 1e-9))
    k = round(t * (slices - 1))
    start = (1.0 - select_fraction) * k / (slices - 1)
    return start, start + select_fraction


class AdaptSchedule:
    """Stage 2's schedule, one object for every loop that adapts (Ray Train, bench controls).

    From `adapt` settings and the optimizer steps in one pass over the source: the selection
    window of a pass (`window(epoch)`), and at step `i` of that pass the adversarial weight
    (`weight(epoch, i)`, progress = (epoch + min(i / steps_per_epoch, 1)) / epochs) and what
    optimizer step number `global_step` trains (`phase(global_step)`).
    """

    def __init__(self, cfg, steps_per_epoch: int):
        self.cfg = cfg
        self.steps_per_epoch = max(1, int(steps_per_epoch))

    def window(self, epoch: int) -> tuple[float, float]:
        a = self.cfg
        return selection_window(epoch, a.epochs, a.select_fraction, a.slices, a.curriculum_length, a.curriculum)

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


def select_and_weight(scores: torch.Tensor, window: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the `window` slice of the ranking (most similar first) and their weights.

    Weights: the selected similarities min-max scaled to [0, 1], then normalised to mean 1
    (all equal -> all 1); detached, so weighting never trains the scorer.
    """
    scores = scores.detach()
    n = scores.shape[0]
    order = torch.argsort(scores, descending=True, stable=True)
    lo = min(n - 1, int(math.floor(window[0] * n + 1e-9)))
    count = max(1, int(round((window[1] - window[0]) * n)))
    idx = order[lo : lo + count]
    s = scores[idx].float()
    span = s.max() - s.min()
    if span <= 1e-12:
        w = torch.ones_like(s)
    else:
        w = (s - s.min()) / span
        w = w * (len(w) / w.sum())
    return idx, w


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
        window: tuple[float, float] = (0.0, 1.0),
        phase: str = "grl",
        embed: bool = False,
    ):
        if embed:  # validation: `embed_batch` of `source`
            return embed_batch(self.model, source)

        s_out = _run(self.model, source)
        t_out = _run(self.model, target)
        likeness = target_likeness(s_out["text"], t_out["text"])
        idx, w = select_and_weight(likeness, window)
        sel = take_rows(s_out, idx, source["images"].shape[0])
        ret, _ = retrieval_loss(sel, self.loss_cfg, weights=w.to(sel["fused"].dtype))
        if self.cfg.use_target_captions:
            ret = ret + retrieval_loss(t_out, self.loss_cfg)[0]

        keys = ("fused", "text") if self.cfg.disc_inputs == "image_text" else ("fused",)
        src = torch.cat([sel[k] for k in keys])
        tgt = torch.cat([t_out[k] for k in keys])
        feats = torch.cat([src, tgt])
        labels = torch.cat([torch.zeros(len(src)), torch.ones(len(tgt))]).to(feats.device, feats.dtype)
        if phase == "grl":
            d_loss, acc = domain_loss(self.disc(grad_reverse(feats, adv_weight)), labels)
            total = ret + d_loss
        elif phase == "disc":
            d_loss, acc = domain_loss(self.disc(feats.detach()), labels)
            total = ret + d_loss
        elif phase == "encoder":
            frozen = {n: p.detach() for n, p in self.disc.named_parameters()}
            logits = torch.func.functional_call(self.disc, frozen, (feats,))
            d_loss, fooled = domain_loss(logits, 1.0 - labels)
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
        }
        return total, logs


def _run(model: nn.Module, batch: dict) -> dict:
    return model(batch["images"], batch["tokens"], batch.get("segments"), batch.get("segment_mask"))
