"""UrbanCross: an open_clip two-tower model whose image side also sees its SAM segments.

The image tower encodes the whole tile and, with the same weights and input size, each of its
segment crops (`model.segment_encoding: crops`, the paper's: up to 11x the image tower's work);
or (`pooled`) each segment is the tile's own patch tokens averaged under the segment's mask, one
encoder pass for the tile and its segments (the mask is read from the segment image: everything
not painted white, so it needs `preprocess.sam.style: white`). `SegmentFusion` pools the global embedding with its segment embeddings
(attention with a learned query, missing segments masked) into `fused`, the embedding used
for retrieval. CMPAGL options: a global-local block on the patch tokens
(`global_local.py`) and pre-alignment heads on the unimodal features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIP
from open_clip.transformer import text_global_pool
from torch import nn

from urbancross.config import ModelConfig
from urbancross.model.global_local import GATE_INIT, MultiScaleGlobalLocal

MAX_LOGIT_SCALE = 100.0  # CLIP's clamp on exp(logit_scale)
_WHITE = [(1.0 - m) / s for m, s in zip(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)]  # a white pixel, normalized


def segment_pixels(segments: torch.Tensor, tol: float = 0.1) -> torch.Tensor:
    """Normalized white-background segment images [..., 3, H, W] -> their masks [..., H, W] (1 = inside)."""
    white = segments.new_tensor(_WHITE).view(3, 1, 1)
    return ((segments - white).abs().amax(dim=-3) > tol).to(segments.dtype)


class SegmentFusion(nn.Module):
    """Attention pooling over [image; segments] with a learned query, as a gated residual.

    The global image token is always a key, so a tile without segments still pools to
    something; missing segments are masked out of the keys.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(dim) * dim**-0.5)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.gate = nn.Parameter(torch.tensor(GATE_INIT))

    def forward(self, image: torch.Tensor, segments: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`image` [B,D], `segments` [B,S,D], `mask` [B,S] bool -> fused [B,D] (L2-normalised)."""
        b = image.shape[0]
        tokens = torch.cat([image[:, None], segments], dim=1)
        keep = torch.cat([mask.new_ones(b, 1), mask], dim=1)
        query = self.query.expand(b, 1, -1)
        pooled = self.attn(query, tokens, tokens, key_padding_mask=~keep, need_weights=False)[0][:, 0]
        return F.normalize(image + self.gate * pooled, dim=-1)


class PreAlignHeads(nn.Module):
    """CMPAGL pre-alignment: project each tower's unimodal (pre-projection) features to one space."""

    def __init__(self, vision_width: int, text_width: int, dim: int):
        super().__init__()
        self.image = nn.Linear(vision_width, dim)
        self.text = nn.Linear(text_width, dim)


class UrbanCrossModel(nn.Module):
    """open_clip CLIP + segment fusion (+ optional CMPAGL global-local block and pre-alignment)."""

    def __init__(self, clip: CLIP, cfg: ModelConfig):
        super().__init__()
        self.clip = clip
        self.embed_dim = int(clip.text_projection.shape[1])
        vision_width = clip.visual.transformer.width
        self.fusion = SegmentFusion(self.embed_dim, cfg.fusion_heads) if cfg.use_segments else None
        self.pooled_segments = cfg.use_segments and cfg.segment_encoding == "pooled"
        self.global_local = (
            MultiScaleGlobalLocal(vision_width, self.embed_dim, cfg.global_local_heads, cfg.window_sizes)
            if cfg.global_local
            else None
        )
        self.pre_align = PreAlignHeads(vision_width, clip.transformer.width, self.embed_dim) if cfg.pre_align else None

    @property
    def _needs_tokens(self) -> bool:
        return self.global_local is not None or self.pre_align is not None

    # ------------------------------------------------------------------ towers

    def _image(self, images: torch.Tensor, want_tokens: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """-> (L2-normalised embedding [B,D], pre-alignment feature [B,D] or None, patch tokens [B,C,h,w] or None)."""
        if not (self._needs_tokens or want_tokens):
            return F.normalize(self.clip.visual(images), dim=-1), None, None
        out = self.clip.visual.forward_intermediates(images, indices=1, normalize_intermediates=True)
        tokens = out["image_intermediates"][-1]  # [B,C,H,W], after ln_post
        pooled = out["image_features"]
        if self.global_local is not None:
            pooled = pooled + self.global_local(tokens)
        pre = None
        if self.pre_align is not None:
            pre = F.normalize(self.pre_align.image(tokens.mean(dim=(2, 3))), dim=-1)
        return F.normalize(pooled, dim=-1), pre, tokens

    def _text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.pre_align is None:
            return F.normalize(self.clip.encode_text(tokens), dim=-1), None
        out = self.clip.forward_intermediates(text=tokens, text_indices=1, normalize_intermediates=True)
        last = out["text_intermediates"][-1]  # [B,L,W], after ln_final
        pooled = text_global_pool(last, tokens, self.clip.text_pool_type)
        pre = F.normalize(self.pre_align.text(pooled), dim=-1)
        return out["text_features"], pre  # forward_intermediates already L2-normalises

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] -> [B,D], L2-normalised (global-local block included when on)."""
        return self._image(images)[0]

    def encode_image_segments(
        self, images: torch.Tensor, segments: torch.Tensor, mask: torch.Tensor, pixels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """-> (image [B,D], pre-alignment feature or None, segments [B,S,D]) in the configured encoding.

        `pixels` [B,S,H,W]: the segments' masks in the tile's frame (training passes them warped
        like the augmented tile); by default they are read from the segment images.
        """
        if not self.pooled_segments:
            image, pre, _ = self._image(images)
            return image, pre, self.encode_segments(segments, mask)
        image, pre, tokens = self._image(images, want_tokens=True)
        if pixels is None:
            pixels = segment_pixels(segments)
        b, s, h, w = pixels.shape
        weights = F.adaptive_avg_pool2d(pixels.reshape(b * s, 1, h, w), tokens.shape[-2:]).view(b, s, -1)
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-6)
        feats = torch.einsum("bsn,bcn->bsc", weights.to(tokens.dtype), tokens.flatten(2))
        proj = self.clip.visual.proj
        seg = F.normalize(feats @ proj if proj is not None else feats, dim=-1)
        return image, pre, seg * mask[..., None].to(seg.dtype)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B,L] token ids -> [B,D], L2-normalised."""
        return self._text(tokens)[0]

    def encode_segments(self, segments: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B,S,3,H,W] crops + [B,S] bool mask -> [B,S,D]; only present segments are encoded, the rest are 0."""
        b, s = mask.shape
        out = segments.new_zeros(b, s, self.embed_dim)
        if mask.any():
            out[mask] = self.encode_image(segments[mask]).to(out.dtype)
        return out

    def fuse(self, image: torch.Tensor, segments: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        """The retrieval embedding: fused with the segments when there are any, else `image`."""
        if self.fusion is None or segments is None:
            return image
        return self.fusion(image, segments, mask)

    def forward(
        self,
        images: torch.Tensor,
        tokens: torch.Tensor,
        segments: torch.Tensor | None = None,
        segment_mask: torch.Tensor | None = None,
        segment_pixels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """-> `image, text, segments, segment_mask, fused, logit_scale` (+ `pre_image, pre_text`).

        Embeddings are L2-normalised; `logit_scale` is exp(learned log-scale), clamped to 100.
        `segments`/`segment_mask` are None when the model has no fusion or none were given.
        """
        text, pre_text = self._text(tokens)
        seg = None
        if self.fusion is not None and segments is not None:
            if segment_mask is None:
                segment_mask = torch.ones(segments.shape[:2], dtype=torch.bool, device=segments.device)
            segment_mask = segment_mask.bool()
            image, pre_image, seg = self.encode_image_segments(images, segments, segment_mask, segment_pixels)
        else:
            image, pre_image, _ = self._image(images)
            segment_mask = None
        out = {
            "image": image,
            "text": text,
            "segments": seg,
            "segment_mask": segment_mask,
            "fused": self.fuse(image, seg, segment_mask),
            "logit_scale": self.clip.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE),
        }
        if self.pre_align is not None:
            out["pre_image"], out["pre_text"] = pre_image, pre_text
        return out
