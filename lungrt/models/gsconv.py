"""GSConv U-Net (paper 1): gated spatial convolutions, attention gates on every skip, Min-ASPP
at the bottleneck."""

from __future__ import annotations

import torch
from torch import nn

from lungrt.models.blocks import ConvBNReLU, UNetSkeleton, widths


class GatedSpatialConv(nn.Module):
    """A 3x3 feature conv modulated by a sigmoid gate conv computed from the same input.
    Both come out of one conv (2*cout channels) so the pair is a single GEMM."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, 2 * cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(2 * cout)
        self.cout = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat, gate = torch.split(self.bn(self.conv(x)), self.cout, dim=1)
        return torch.relu(feat) * torch.sigmoid(gate)


class GatedDoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(GatedSpatialConv(cin, cout), GatedSpatialConv(cout, cout))


class AttentionGate(nn.Module):
    """Additive attention (Attention U-Net): the decoder's coarser signal decides which skip
    pixels pass. The gating signal is upsampled to the skip's resolution."""

    def __init__(self, c_skip: int, c_gate: int):
        super().__init__()
        inter = max(c_skip // 2, 4)
        self.wx = nn.Conv2d(c_skip, inter, 1, bias=False)
        self.wg = nn.Conv2d(c_gate, inter, 1, bias=True)
        self.psi = nn.Sequential(nn.Conv2d(inter, 1, 1), nn.BatchNorm2d(1), nn.Sigmoid())
        self.up = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.wx(skip) + self.up(self.wg(gate)))
        return skip * self.psi(a)


class MinASPP(nn.Module):
    """A small ASPP: 1x1, two dilated 3x3 and a global-average-pool branch, fused by 1x1."""

    def __init__(self, c: int, rates: tuple[int, ...] = (2, 4)):
        super().__init__()
        b = c // 4
        self.branches = nn.ModuleList([ConvBNReLU(c, b, k=1)] + [ConvBNReLU(c, b, dilation=r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, b, 1), nn.ReLU(inplace=True))
        self.fuse = ConvBNReLU(b * (len(rates) + 2), c, k=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [br(x) for br in self.branches]
        outs.append(self.pool(x).expand(-1, -1, x.shape[2], x.shape[3]))
        return x + self.fuse(torch.cat(outs, dim=1))


class GSConvUNet(UNetSkeleton):
    def __init__(self, width: int = 16):
        super().__init__(width, stage=GatedDoubleConv)
        c = widths(width)
        self.aspp = MinASPP(c[4])
        self.gates = nn.ModuleList([AttentionGate(c[i], c[i + 1]) for i in range(4)])

    def after_encoder(self, level: int, x: torch.Tensor) -> torch.Tensor:
        return self.aspp(x) if level == 4 else x

    def gate_skip(self, level: int, skip: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        return self.gates[level](skip, coarse)
