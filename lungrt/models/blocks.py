"""Building blocks shared by the three U-Nets. Only ops that ONNX Runtime and TensorRT run natively
(Conv, BatchNorm folded into Conv, ReLU, MaxPool, ConvTranspose, MatMul, Softmax, LayerNorm)."""

from __future__ import annotations

import torch
from torch import nn


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, dilation: int = 1):
        pad = dilation * (k // 2)
        super().__init__(
            nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class DoubleConv(nn.Sequential):
    """The U-Net stage: (3x3 conv + BN + ReLU) twice."""

    def __init__(self, cin: int, cout: int):
        super().__init__(ConvBNReLU(cin, cout), ConvBNReLU(cout, cout))


class Up(nn.Module):
    """2x transposed-conv upsampling, concatenation with the skip, then a conv stage."""

    def __init__(self, cin: int, cskip: int, cout: int, stage: type[nn.Module] = DoubleConv):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin // 2, 2, stride=2)
        self.conv = stage(cin // 2 + cskip, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


def widths(base: int, levels: int = 5) -> list[int]:
    return [base * 2**i for i in range(levels)]


class UNetSkeleton(nn.Module):
    """Encoder (4 downsamplings) / decoder with skip concatenation. Subclasses pick the stage
    blocks and may wrap skips (attention gates) or the bottleneck (ASPP, self-attention)."""

    def __init__(self, width: int, stage: type[nn.Module] = DoubleConv):
        super().__init__()
        c = widths(width)
        self.width = width
        self.enc = nn.ModuleList([stage(1, c[0])] + [stage(c[i - 1], c[i]) for i in range(1, 5)])
        self.pool = nn.MaxPool2d(2)
        self.dec = nn.ModuleList([Up(c[i + 1], c[i], c[i], stage) for i in reversed(range(4))])
        self.head = nn.Conv2d(c[0], 1, 1)

    # hooks for the variants
    def after_encoder(self, level: int, x: torch.Tensor) -> torch.Tensor:
        return x

    def after_decoder(self, level: int, x: torch.Tensor) -> torch.Tensor:
        return x

    def gate_skip(self, level: int, skip: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        return skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, stage in enumerate(self.enc):
            if level:
                x = self.pool(x)
            x = self.after_encoder(level, stage(x))
            skips.append(x)
        x = skips.pop()
        for i, up in enumerate(self.dec):
            level = 3 - i
            skip = self.gate_skip(level, skips[level], x)
            x = self.after_decoder(level, up(x, skip))
        return self.head(x)
