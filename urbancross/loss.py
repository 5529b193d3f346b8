"""Retrieval losses as small pure functions, and `retrieval_loss` combining them per config.

Conventions: a similarity matrix `sim` is [B images, B texts] with the matched pairs on the
diagonal; `logits` are similarities already multiplied by the temperature scale. Every loss
computes one value per sample (image/text pair i) and reduces with `weighted_mean`, so
per-sample `weights` (adversarial stage, curriculum) scale each pair's terms; None = uniform.
Scene-class `labels` are int64 class ids per sample, -1 where a sample has none
(`urbancross.data.ingest.label_id`); None = no sample has one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from urbancross.config import LossConfig

Tensor = torch.Tensor


def weighted_mean(per_sample: Tensor, weights: Tensor | None = None) -> Tensor:
    """sum(w_i * l_i) / sum(w_i); plain mean when `weights` is None."""
    if weights is None:
        return per_sample.mean()
    w = weights.to(per_sample)
    return (per_sample * w).sum() / w.sum().clamp_min(1e-12)


def _same_class(labels: Tensor) -> Tensor:
    """[n,n] bool: both samples have a class (>= 0) and it is the same one."""
    known = labels >= 0
    return (labels[:, None] == labels[None, :]) & known[:, None] & known[None, :]


def _negatives(n: int, labels: Tensor | None, device) -> Tensor:
    """[n,n] bool: True where (i, j) is a negative pair (off-diagonal, and not of one known class)."""
    neg = ~torch.eye(n, dtype=torch.bool, device=device)
    if labels is not None:
        neg &= ~_same_class(labels.to(device))
    return neg


def vse_hinge(sim: Tensor, margin: float, weights: Tensor | None = None) -> Tensor:
    """VSE bidirectional hinge (UrbanCross reference): summed over all in-batch negatives.

    l_i = sum_{j!=i} [m + s_ij - s_ii]_+  +  sum_{j!=i} [m + s_ji - s_ii]_+
    (image i against every other text, text i against every other image). The reference sums
    over the batch; here it is the (weighted) mean over pairs, which only rescales by B.
    """
    d = sim.diagonal()
    off = _negatives(sim.shape[0], None, sim.device)
    cost_text = (margin + sim - d[:, None]).clamp(min=0) * off  # row i: image i vs texts j
    cost_image = (margin + sim - d[None, :]).clamp(min=0) * off  # column i: text i vs images j
    return weighted_mean(cost_text.sum(1) + cost_image.sum(0), weights)


def infonce(logits: Tensor, weights: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE (CLIP): l_i = (CE(row i -> i) + CE(column i -> i)) / 2."""
    target = torch.arange(logits.shape[0], device=logits.device)
    per = F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.T, target, reduction="none")
    return weighted_mean(per / 2, weights)


def triplet_hardest(sim: Tensor, margin: float, weights: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
    """CMPAGL/VSE++ triplet on the hardest negative, both directions.

    l_i = [m + max_{j neg} s_ij - s_ii]_+  +  [m + max_{j neg} s_ji - s_ii]_+ ; with `labels`,
    pairs of the same class are not negatives.
    """
    d = sim.diagonal()
    neg = _negatives(sim.shape[0], labels, sim.device)
    low = torch.finfo(sim.dtype).min
    hard_text = sim.masked_fill(~neg, low).amax(dim=1)
    hard_image = sim.masked_fill(~neg, low).amax(dim=0)
    per = (margin + hard_text - d).clamp(min=0) + (margin + hard_image - d).clamp(min=0)
    return weighted_mean(per, weights)


def intra_class(image: Tensor, text: Tensor, labels: Tensor | None = None, weights: Tensor | None = None) -> Tensor:
    """CMPAGL's intra-class distance: pull matched (or same-class) image/text embeddings together.

    With unit vectors, l_i = mean_{j: same class as i} (1 - <image_i, text_j>), over the samples
    that have a class (`retrieval_loss` leaves the term out when none has); without labels only
    the matched pair (j = i) counts.
    """
    dist = 1.0 - image @ text.T
    if labels is None:
        return weighted_mean(dist.diagonal(), weights)
    known = (labels >= 0).to(dist)
    same = _same_class(labels.to(dist.device)).to(dist)
    w = known if weights is None else weights.to(dist) * known
    return weighted_mean((dist * same).sum(1) / same.sum(1).clamp_min(1), w)


def has_labels(labels: Tensor | None) -> bool:
    """Whether any sample of the batch has a scene class."""
    return labels is not None and bool((labels >= 0).any())


def hardest_negatives(sim: Tensor, same: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Each sample's hardest negative in both directions of a [B,B] similarity matrix (ITM mining).

    -> (text_of_image, image_of_text), both [B]: text_of_image[i] = argmax_{j neg} s_ij,
    image_of_text[i] = argmax_{j neg} s_ji. `same` [B,B] bool marks further pairs that are not
    negatives (e.g. two captions of one image); the diagonal never is. ALBEF samples negatives
    in proportion to softmax(s); the argmax is deterministic and the hardest.
    """
    n = sim.shape[0]
    neg = _negatives(n, None, sim.device)
    if same is not None:
        neg &= ~same.to(device=sim.device, dtype=torch.bool)
    if not (bool(neg.any(1).all()) and bool(neg.any(0).all())):
        raise ValueError(f"hard-negative mining: every one of the {n} pairs needs a negative in the batch")
    low = torch.finfo(sim.dtype).min
    masked = sim.masked_fill(~neg, low)
    return masked.argmax(dim=1), masked.argmax(dim=0)


def itm_hard_negative(itm_logits: Tensor, weights: Tensor | None = None) -> Tensor:
    """Image-text matching on mined negatives: l_i = mean of the CE of sample i's three pairs.

    `itm_logits` [B,3,2] (index 1 = match): (image i, text i) -> match, (image i, its hardest
    negative text) -> no match, (text i's hardest negative image, text i) -> no match.
    """
    b, n = itm_logits.shape[:2]  # n = 1: a batch of one sample has no negatives, only its positive pair
    target = torch.zeros(b, n, dtype=torch.long, device=itm_logits.device)
    target[:, 0] = 1
    ce = F.cross_entropy(itm_logits.reshape(-1, 2), target.reshape(-1), reduction="none").reshape(b, n)
    return weighted_mean(ce.mean(dim=1), weights)


def segment_infonce(
    query: Tensor, segments: Tensor, mask: Tensor, logit_scale: Tensor, weights: Tensor | None = None
) -> Tensor:
    """Symmetric InfoNCE between one embedding per sample (`query` [B,D]) and its segments.

    segment -> query: each present segment (i, s) must pick sample i's query among the batch's;
    query -> segments: query i must put its mass on its own segments (multi-positive CE,
    -log sum_{own} p). l_i averages the two; samples without segments are left out.
    """
    has = mask.any(dim=1)
    if not bool(has.any()):
        return query.new_zeros(())
    owner = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]  # [N]
    flat = segments[mask]  # [N,D]
    logits = logit_scale * query @ flat.T  # [B,N]
    seg_ce = F.cross_entropy(logits.T, owner, reduction="none")  # [N]
    seg_term = torch.zeros(mask.shape[0], device=logits.device, dtype=logits.dtype).index_add(0, owner, seg_ce)
    seg_term = seg_term / mask.sum(1).clamp_min(1)
    own = owner[None, :] == torch.arange(mask.shape[0], device=mask.device)[:, None]  # [B,N]
    own |= ~has[:, None]  # a sample without segments gets a 0 term, and no inf/NaN gradient
    query_term = torch.logsumexp(logits, dim=1) - torch.logsumexp(logits.masked_fill(~own, float("-inf")), dim=1)
    w = has.to(logits) if weights is None else weights.to(logits) * has
    return weighted_mean((seg_term + query_term) / 2, w)


def pre_align_loss(pre_image: Tensor, pre_text: Tensor, logit_scale: Tensor, weights: Tensor | None = None) -> Tensor:
    """CMPAGL pre-alignment: InfoNCE on the projected unimodal features, before fusion."""
    return infonce(logit_scale * pre_image @ pre_text.T, weights)


def segment_mean(segments: Tensor, mask: Tensor, fallback: Tensor) -> Tensor:
    """L2-normalised mean of the present segments; `fallback` (the image) where there are none."""
    m = mask.to(segments)[..., None]
    mean = (segments * m).sum(1) / m.sum(1).clamp_min(1)
    return F.normalize(torch.where(mask.any(1, keepdim=True), mean, fallback), dim=-1)


def retrieval_loss(
    out: dict, cfg: LossConfig, weights: Tensor | None = None, labels: Tensor | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """The configured objective on a model output dict -> (weighted total, unweighted parts).

    kind=infonce: image_text (fused vs text) + segment_text + image_segment (segment_infonce);
    kind=vse: hinge on image_text + hinge on segment_text (mean segment vs text), UrbanCross;
    kind=triplet: hardest-negative triplet on image_text + intra_class, CMPAGL; the intra-class
    term needs scene classes and is left out when no sample of the batch has one.
    Any kind adds pre_align when the model outputs `pre_image`/`pre_text`. Segment terms are
    skipped when `out["segments"]` is None.
    """
    scale, text, fused = out["logit_scale"], out["text"], out["fused"]
    seg, mask = out.get("segments"), out.get("segment_mask")
    sim = fused @ text.T
    parts: dict[str, Tensor] = {}
    if cfg.kind == "infonce":
        parts["image_text"] = infonce(scale * sim, weights)
        if seg is not None:
            parts["segment_text"] = segment_infonce(text, seg, mask, scale, weights)
            parts["image_segment"] = segment_infonce(out["image"], seg, mask, scale, weights)
    elif cfg.kind == "vse":
        parts["image_text"] = vse_hinge(sim, cfg.margin, weights)
        if seg is not None:
            parts["segment_text"] = vse_hinge(segment_mean(seg, mask, out["image"]) @ text.T, cfg.margin, weights)
    elif cfg.kind == "triplet":
        parts["image_text"] = triplet_hardest(sim, cfg.margin, weights, labels)
        if has_labels(labels):
            parts["intra_class"] = intra_class(fused, text, labels, weights)
    else:
        raise ValueError(f"loss.kind: unknown loss {cfg.kind!r}")
    if out.get("pre_image") is not None:
        parts["pre_align"] = pre_align_loss(out["pre_image"], out["pre_text"], scale, weights)
    scale_of = {
        "image_text": cfg.image_text_weight,
        "segment_text": cfg.segment_text_weight,
        "image_segment": cfg.image_segment_weight,
        "intra_class": cfg.intra_class_weight,
        "pre_align": cfg.pre_align_weight,
    }
    total = sum(scale_of[name] * value for name, value in parts.items())
    return total, parts


def cmpagl_loss(
    out: dict, cfg: LossConfig, weights: Tensor | None = None, labels: Tensor | None = None, itm_weight: float = 1.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """CMPAGL's objective: `retrieval_loss` plus `itm_weight` * ITM on the mined hard negatives.

    With a CMPAGL model output and kind=triplet, `retrieval_loss` gives the hardest-negative
    triplet and the intra-class term on the pre-aligned embeddings and the pre-alignment
    InfoNCE (`pre_align`); `itm` is added when the output has `itm_logits`.
    """
    total, parts = retrieval_loss(out, cfg, weights, labels)
    if out.get("itm_logits") is not None:
        parts["itm"] = itm_hard_negative(out["itm_logits"], weights)
        total = total + itm_weight * parts["itm"]
    return total, parts
