"""Model registry: name -> constructor. All take 1-channel input and give 1-channel logits."""

from __future__ import annotations

import torch
from torch import nn

from lungrt.models.gsconv import GSConvUNet
from lungrt.models.msag import MSAGUNet
from lungrt.models.unet import UNet

REGISTRY: dict[str, type[nn.Module]] = {
    "unet": UNet,
    "gsconv-unet": GSConvUNet,
    "msag-unet": MSAGUNet,
}


def build_model(name: str, width: int = 16) -> nn.Module:
    if name not in REGISTRY:
        raise KeyError(f"unknown model {name!r}; choose from {', '.join(REGISTRY)}")
    return REGISTRY[name](width=width)


class ProbabilityModel(nn.Module):
    """The network plus the sigmoid: what every backend runs and what ONNX exports."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(image))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gflops_per_image(model: nn.Module, size: int) -> float:
    """Forward GFLOPs for one 1 x size x size image (convs and matmuls; 2 FLOPs per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 1, size, size))
    model.train(was_training)
    return counter.get_total_flops() / 1e9
