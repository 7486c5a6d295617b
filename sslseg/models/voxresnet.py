"""VoxResNet (Chen et al., NeuroImage 2018) as in SSL4MIS ``networks/VoxResNet.py``: ``voxresnet``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._base import SegmentationModel
from ._layers import resize_to
from ._registry import register_model

__all__ = ["VoxResNet"]


class VoxRes(nn.Module):
    """Pre-activation residual unit: ``x + [IN -> ReLU -> conv3 (no bias)] x 2``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.InstanceNorm3d(channels),
            nn.ReLU(inplace=False),
            nn.Conv3d(channels, channels, 3, padding=1, bias=False),
            nn.InstanceNorm3d(channels),
            nn.ReLU(inplace=True),
            nn.Conv3d(channels, channels, 3, padding=1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class _UpConv(nn.Sequential):
    """``[IN -> ReLU -> conv3 (no bias)] x 2`` from the concatenated features back to ``channels``."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__(
            nn.InstanceNorm3d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv3d(in_channels, channels, 3, padding=1, bias=False),
            nn.InstanceNorm3d(channels),
            nn.ReLU(inplace=True),
            nn.Conv3d(channels, channels, 3, padding=1, bias=False),
        )


class VoxResNet(SegmentationModel):
    """VoxResNet: six residual units over three 2x max-poolings, a two-step U-Net-like up path.

    ``conv3 -> pool (1/2) -> VoxRes x2 -> pool (1/4) -> VoxRes x2 -> pool (1/8) -> VoxRes x2``, then
    trilinear 2x up + concat with the 1/4 feature -> up conv, trilinear 2x up + concat with the 1/2
    feature -> up conv, trilinear 2x up -> 1x1x1 head. 1,992,578 parameters at 64 channels and
    2 classes, as in SSL4MIS. ``forward_all`` returns ``{"logits"}`` only.

    Args:
        in_channels: Input channels.
        num_classes: Output classes.
        channels: Width of every residual unit.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 64) -> None:
        if channels < 1:
            raise ValueError(f"VoxResNet: channels must be a positive int, got {channels!r}")
        super().__init__(dim=3, in_channels=in_channels, num_classes=num_classes, size_divisor=8)
        self.conv1 = nn.Conv3d(in_channels, channels, 3, padding=1)
        self.pool = nn.MaxPool3d(2)
        self.res1, self.res2 = VoxRes(channels), VoxRes(channels)
        self.res3, self.res4 = VoxRes(channels), VoxRes(channels)
        self.res5, self.res6 = VoxRes(channels), VoxRes(channels)
        self.up1 = _UpConv(2 * channels, channels)
        self.up2 = _UpConv(2 * channels, channels)
        self.out = nn.Conv3d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        half = self.res2(self.res1(self.pool(self.conv1(x))))
        quarter = self.res4(self.res3(self.pool(half)))
        eighth = self.res6(self.res5(self.pool(quarter)))
        y = self.up1(torch.cat([resize_to(eighth, list(quarter.shape[2:]), "trilinear"), quarter], dim=1))
        y = self.up2(torch.cat([resize_to(y, list(half.shape[2:]), "trilinear"), half], dim=1))
        return self.out(resize_to(y, list(x.shape[2:]), "trilinear"))


@register_model("voxresnet", dim=3)
def voxresnet(in_channels: int, num_classes: int, channels: int = 64) -> VoxResNet:
    """VoxResNet with 64-channel residual units (SSL4MIS ``voxresnet``); 1,992,578 parameters at 2 classes."""
    return VoxResNet(in_channels, num_classes, channels)
