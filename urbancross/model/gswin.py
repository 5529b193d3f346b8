"""Gswin: CMPAGL's image encoder, a Swin transformer whose blocks also see a global window.

Each Gswin block is a Swin block (shifted or regular local window self-attention, then an
MLP) followed by a global-local window cross-attention: the stage's whole feature map is
average-pooled to one `window x window` *global window*, and every local window's tokens
attend to it (queries = local tokens, keys/values = global tokens + a learned position per
global token), as a gated pre-norm residual. Every local window attends to the same global
window, so this is computed as one cross-attention of all tokens to that window, which gives
the same result as partitioning first. Stages are joined by Swin's patch merging (2x2 -> 1,
channels x2), and the encoder returns every stage's map (multi-scale features).

Why on top of `transformers.SwinModel` instead of a copy: the Swin parts *are* a `SwinModel`
(`self.swin`), so its state-dict layout is the library's and a local Swin checkpoint loads
with `SwinModel.from_pretrained` (which also converts older key layouts); only the
cross-attentions and per-stage norms are Gswin's own. The price: `forward` drives the Swin
stages block by block (`SwinLayer`, `SwinPatchMerging`) instead of calling `SwinModel`; a test
checks it reproduces `SwinModel` exactly when the gates are 0.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import SwinConfig, SwinModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GswinConfig:
    """The shapes of a Gswin encoder; `swin_config()` gives the matching `SwinConfig`."""

    image_size: int = 64
    patch_size: int = 4
    embed_dim: int = 32  # stage 1 width; stage s has embed_dim * 2**s channels
    depths: tuple[int, ...] = (2, 2, 2)
    num_heads: tuple[int, ...] = (1, 2, 4)
    window_size: int = 4
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    global_local: bool = True  # False: a plain Swin (the Gswin ablation)
    gate_init: float = 0.1  # small, so a loaded Swin's features are only nudged at the start

    def __post_init__(self):
        if len(self.depths) != len(self.num_heads) or not self.depths:
            raise ValueError(f"gswin: depths {self.depths} and num_heads {self.num_heads} need one entry per stage")
        for s, heads in enumerate(self.num_heads):
            if (self.embed_dim * 2**s) % heads:
                raise ValueError(f"gswin: stage {s} width {self.embed_dim * 2**s} is not divisible by {heads} heads")

    def swin_config(self) -> SwinConfig:
        return SwinConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            embed_dim=self.embed_dim,
            depths=list(self.depths),
            num_heads=list(self.num_heads),
            window_size=self.window_size,
            mlp_ratio=self.mlp_ratio,
            drop_path_rate=self.drop_path_rate,
        )

    @property
    def widths(self) -> list[int]:
        return [self.embed_dim * 2**s for s in range(len(self.depths))]


GSWIN_TINY = GswinConfig()  # 64 px tiles on CPU: 16x16 -> 8x8 -> 4x4 tokens
GSWIN_T = GswinConfig(  # Swin-T's shapes (SwinConfig's defaults), loadable from a Swin-T checkpoint
    image_size=224, patch_size=4, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7,
    drop_path_rate=0.1,
)


class GlobalLocalCrossAttention(nn.Module):
    """Cross-attention from every local token to the stage's pooled global window (gated residual)."""

    def __init__(self, dim: int, heads: int, window: int, gate_init: float):
        super().__init__()
        self.window = window
        self.norm_local = nn.LayerNorm(dim)
        self.norm_global = nn.LayerNorm(dim)
        self.position = nn.Parameter(torch.zeros(window * window, dim))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))

    def _positions(self, s: int) -> torch.Tensor:
        """The learned positions for an `s x s` global window (resized when the map is smaller than a window)."""
        if s == self.window:
            return self.position
        grid = self.position.T.reshape(1, -1, self.window, self.window)
        return F.interpolate(grid, size=(s, s), mode="bilinear", align_corners=False).flatten(2)[0].T

    def forward(self, x: torch.Tensor, dims: tuple[int, int]) -> torch.Tensor:
        """`x` [B, H*W, C] tokens of an H x W map -> same shape."""
        b, _, c = x.shape
        h, w = dims
        s = min(self.window, h, w)
        grid = x.transpose(1, 2).reshape(b, c, h, w)
        glob = F.adaptive_avg_pool2d(grid, s).flatten(2).transpose(1, 2)  # [B, s*s, C]
        glob = self.norm_global(glob) + self._positions(s)
        out = self.attn(self.norm_local(x), glob, glob, need_weights=False)[0]
        return x + self.gate * out


@dataclass
class GswinOutput:
    tokens: torch.Tensor  # [B, N, C_last]: last stage, after the final LayerNorm
    stages: list[torch.Tensor] = field(default_factory=list)  # per stage [B, C_s, H_s, W_s], before merging
    pooled: torch.Tensor | None = None  # [B, sum C_s]: each stage's map normed and mean-pooled (multi-scale)


class GswinEncoder(nn.Module):
    """Swin stages (`self.swin`, a `transformers.SwinModel`) + one global-local cross-attention per block."""

    def __init__(self, cfg: GswinConfig):
        super().__init__()
        self.cfg = cfg
        self.swin = SwinModel(cfg.swin_config(), add_pooling_layer=False)
        self.global_local = nn.ModuleList(
            nn.ModuleList(GlobalLocalCrossAttention(width, heads, cfg.window_size, cfg.gate_init) for _ in range(depth))
            for width, depth, heads in zip(cfg.widths, cfg.depths, cfg.num_heads)
        ) if cfg.global_local else None
        # the last stage's norm is Swin's own `layernorm`; the earlier stages get theirs here
        self.stage_norms = nn.ModuleList(nn.LayerNorm(w) for w in cfg.widths[:-1])

    @property
    def width(self) -> int:
        """Channels of the last stage's tokens."""
        return self.cfg.widths[-1]

    @property
    def pooled_width(self) -> int:
        return sum(self.cfg.widths)

    def forward(self, images: torch.Tensor) -> GswinOutput:
        """`images` [B,3,H,W] -> last-stage tokens, every stage's map and the multi-scale pooled feature."""
        x, dims = self.swin.embeddings(images)
        stages, pooled = [], []
        last = len(self.swin.encoder.layers) - 1
        for s, stage in enumerate(self.swin.encoder.layers):
            for i, block in enumerate(stage.blocks):
                x = block(x, dims)[0]
                if self.global_local is not None:
                    x = self.global_local[s][i](x, dims)
            normed = self.swin.layernorm(x) if s == last else self.stage_norms[s](x)
            pooled.append(normed.mean(dim=1))
            stages.append(x.transpose(1, 2).reshape(x.shape[0], -1, *dims))
            if stage.downsample is not None:
                x = stage.downsample(x, dims)
                dims = ((dims[0] + 1) // 2, (dims[1] + 1) // 2)
        return GswinOutput(tokens=normed, stages=stages, pooled=torch.cat(pooled, dim=-1))


@dataclass
class SwinLoadReport:
    """What `load_swin` did: keys copied, keys kept at random init (and why), Gswin-only keys."""

    loaded: list[str]
    shape_mismatch: list[str]  # in both, shapes differ: kept random
    missing: list[str]  # in the Gswin's Swin part, not in the checkpoint: kept random
    unexpected: list[str]  # in the checkpoint only: ignored
    gswin_only: list[str]  # Gswin parameters outside the Swin part (never in a Swin checkpoint)


def load_swin(encoder: GswinEncoder, source: str | os.PathLike | Mapping[str, torch.Tensor]) -> SwinLoadReport:
    """Copy a Swin checkpoint into `encoder.swin` wherever names and shapes agree; the rest stays random.

    `source` is a local directory that `transformers.SwinModel.from_pretrained` reads (its
    config, safetensors/bin weights; also a `SwinForImageClassification` directory; older key
    layouts are converted by the library), or a `SwinModel` state dict. Nothing is downloaded.
    """
    if isinstance(source, Mapping):
        state = {k.removeprefix("swin."): v for k, v in source.items()}
    else:
        if not os.path.isdir(source):
            raise FileNotFoundError(f"swin checkpoint: {source!r} is not a local directory")
        state = SwinModel.from_pretrained(os.fspath(source), local_files_only=True).state_dict()
    own = encoder.swin.state_dict()
    fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    report = SwinLoadReport(
        loaded=sorted(fits),
        shape_mismatch=sorted(k for k in state if k in own and own[k].shape != state[k].shape),
        missing=sorted(k for k in own if k not in state),
        unexpected=sorted(k for k in state if k not in own),
        gswin_only=sorted(k for k in encoder.state_dict() if not k.startswith("swin.")),
    )
    encoder.swin.load_state_dict(fits, strict=False)
    if report.shape_mismatch or report.missing:
        log.warning("swin checkpoint: %d keys loaded; kept at random init: %d with other shapes (e.g. %s), "
                    "%d missing (e.g. %s)", len(report.loaded), len(report.shape_mismatch),
                    report.shape_mismatch[:3], len(report.missing), report.missing[:3])
    return report
