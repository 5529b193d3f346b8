"""CMPAGL's global-local visual block (a Gswin-style block) over ViT patch tokens.

Remote-sensing tiles mix objects of very different sizes, so one global token misses small
structures and plain window attention misses the layout. Each scale `s` here:

1. splits the patch grid into `s x s` windows and runs self-attention inside each window
   (local detail), padding the grid to a multiple of `s` with the padding masked out;
2. builds a *global window*: the whole grid average-pooled to `s x s` tokens;
3. lets every local window cross-attend to that global window (queries = local tokens,
   keys/values = global tokens), so layout information flows into each window;
4. applies an MLP; all three steps are pre-norm residual.

Scales run in parallel on the same tokens; their mean-pooled outputs are the multi-scale
features, concatenated and projected to the embedding size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GATE_INIT = 0.1  # residual gate: small, so a pretrained CLIP embedding is barely moved at start


class GlobalLocalBlock(nn.Module):
    """One scale: window self-attention + cross-attention from local windows to a global window."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.window = window
        self.norm_local = nn.LayerNorm(dim)
        self.local_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_cross = nn.LayerNorm(dim)
        self.norm_global = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x` [B,C,H,W] patch tokens -> [B,C,H,W]."""
        b, c, h, w = x.shape
        s = self.window
        ph, pw = -h % s, -w % s
        valid = torch.ones(b, 1, h, w, dtype=torch.bool, device=x.device)
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
            valid = F.pad(valid, (0, pw, 0, ph), value=False)
        windows = _partition(x, s)  # [B*nW, s*s, C]
        pad_mask = ~_partition(valid, s)[..., 0]  # [B*nW, s*s], True = padding
        n_windows = windows.shape[0] // b

        q = self.norm_local(windows)
        windows = windows + self.local_attn(q, q, q, key_padding_mask=pad_mask, need_weights=False)[0]

        glob = F.adaptive_avg_pool2d(x[..., :h, :w], s).flatten(2).transpose(1, 2)  # [B, s*s, C]
        glob = self.norm_global(glob).repeat_interleave(n_windows, dim=0)
        windows = windows + self.cross_attn(self.norm_cross(windows), glob, glob, need_weights=False)[0]
        windows = windows + self.mlp(self.norm_mlp(windows))
        return _unpartition(windows, b, h + ph, w + pw, s)[..., :h, :w]


class MultiScaleGlobalLocal(nn.Module):
    """Parallel `GlobalLocalBlock`s (one per window size) -> a gated residual for the image embedding."""

    def __init__(self, dim: int, out_dim: int, heads: int, window_sizes: list[int]):
        super().__init__()
        self.blocks = nn.ModuleList(GlobalLocalBlock(dim, heads, s) for s in window_sizes)
        self.proj = nn.Linear(dim * len(window_sizes), out_dim)
        self.gate = nn.Parameter(torch.tensor(GATE_INIT))

    def scales(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Multi-scale features: per window size, the block's output mean-pooled -> [B,C] each."""
        return [block(tokens).mean(dim=(2, 3)) for block in self.blocks]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """`tokens` [B,C,H,W] -> [B,out_dim], to be added to the pooled CLIP embedding."""
        return self.gate * self.proj(torch.cat(self.scales(tokens), dim=-1))


def _partition(x: torch.Tensor, s: int) -> torch.Tensor:
    """[B,C,H,W] -> [B*(H/s)*(W/s), s*s, C]."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // s, s, w // s, s).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(-1, s * s, c)


def _unpartition(windows: torch.Tensor, b: int, h: int, w: int, s: int) -> torch.Tensor:
    """Inverse of `_partition`."""
    c = windows.shape[-1]
    x = windows.reshape(b, h // s, w // s, s, s, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, h, w)
