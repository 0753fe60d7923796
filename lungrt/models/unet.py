"""The baseline U-Net: 4 down / 4 up, double 3x3 conv + BN + ReLU, skip concatenation."""

from lungrt.models.blocks import UNetSkeleton


class UNet(UNetSkeleton):
    def __init__(self, width: int = 16):
        super().__init__(width)
