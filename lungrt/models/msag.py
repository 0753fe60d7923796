"""MSAG U-Net (paper 2): multi-head self-attention in encoder and decoder stages.

Full attention over 256x256 tokens is infeasible, so attention runs on the three coarsest encoder
levels, the bottleneck and the matching decoder levels, with spatial-reduction attention (keys and
values average-pooled to at most `max_kv` tokens, as in PVT). Position comes from a depthwise-conv
positional encoding (CPVT), which works at any input size and exports as a plain Conv.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lungrt.models.blocks import UNetSkeleton, widths


class SpatialReductionAttention(nn.Module):
    def __init__(self, c: int, heads: int, reduction: int):
        super().__init__()
        self.heads, self.dh = heads, c // heads
        self.q = nn.Linear(c, c)
        self.kv = nn.Linear(c, 2 * c)
        self.proj = nn.Linear(c, c)
        self.reduce = nn.AvgPool2d(reduction) if reduction > 1 else nn.Identity()
        self.scale = 1.0 / math.sqrt(self.dh)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        b, n, c = tokens.shape
        q = self.q(tokens).reshape(b, n, self.heads, self.dh).transpose(1, 2)
        kv_src = self.reduce(x).flatten(2).transpose(1, 2)
        kv = self.kv(kv_src).reshape(b, -1, 2, self.heads, self.dh).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        # softmax stays FP32 in the FP16 variant (precision module keeps Softmax out of the cast)
        attn = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class MHSABlock(nn.Module):
    """Pre-norm transformer block on the feature map's pixels, residual around attention and MLP."""

    def __init__(self, c: int, reduction: int, mlp_ratio: int = 2):
        super().__init__()
        self.pos = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm1 = nn.LayerNorm(c)
        self.attn = SpatialReductionAttention(c, heads=max(1, c // 32), reduction=reduction)
        self.norm2 = nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, c * mlp_ratio), nn.GELU(), nn.Linear(c * mlp_ratio, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos(x)
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        xn = self.norm1(t)
        t = t + self.attn(xn.transpose(1, 2).reshape(b, c, h, w), xn)
        t = t + self.mlp(self.norm2(t))
        return t.transpose(1, 2).reshape(b, c, h, w)


class MSAGUNet(UNetSkeleton):
    # level -> spatial reduction of keys/values, chosen for a 256 input (64x64 -> 16x16 kv tokens)
    REDUCTION = {2: 4, 3: 2, 4: 1}

    def __init__(self, width: int = 16):
        super().__init__(width)
        c = widths(width)
        self.enc_attn = nn.ModuleDict({str(lv): MHSABlock(c[lv], r) for lv, r in self.REDUCTION.items()})
        self.dec_attn = nn.ModuleDict({str(lv): MHSABlock(c[lv], r) for lv, r in self.REDUCTION.items() if lv < 4})

    def after_encoder(self, level: int, x: torch.Tensor) -> torch.Tensor:
        blk = self.enc_attn[str(level)] if str(level) in self.enc_attn else None
        return blk(x) if blk is not None else x

    def after_decoder(self, level: int, x: torch.Tensor) -> torch.Tensor:
        blk = self.dec_attn[str(level)] if str(level) in self.dec_attn else None
        return blk(x) if blk is not None else x
