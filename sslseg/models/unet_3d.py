"""3D U-Nets of SSL4MIS (``networks/unet_3D.py``, ``unet_3D_dv_semi.py``, after
Attention-Gated-Networks): ``unet_3d`` and ``unet_3d_urpc``.

Layout (defaults): channels 16-32-64-128-256 (``feature_scale=4``), four 2x max-poolings. A conv
block is ``[conv3 (bias) -> InstanceNorm (affine=False) -> ReLU] x 2``; an up block is a 2x
(tri)linear upsampling, ``cat([skip, up])`` and a conv block. Convolution weights get Kaiming-normal
(fan-in) initialisation, as in SSL4MIS. The blocks are dimension-generic and reused by
``attention_unet`` / ``attention_unet_3d``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import List

import torch
from torch import Tensor, nn

from ._base import ModelOutputs, SegmentationModel
from ._layers import conv_nd, instance_norm_nd, interp_mode, max_pool_nd, resize_to
from ._registry import register_model

__all__ = ["UNet3D", "UNet3DURPC"]

_CHANNELS = (16, 32, 64, 128, 256)


def kaiming_init(module: nn.Module) -> None:
    """Kaiming-normal (fan-in) weights for every conv; BatchNorm weights ~ N(1, 0.02), bias 0.

    This is Attention-Gated-Networks' ``init_weights(..., 'kaiming')``, which SSL4MIS applies to its
    3D networks. Biases keep PyTorch's default initialisation.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class UnetConv(nn.Sequential):
    """``[conv3 -> InstanceNorm(affine=False) -> ReLU] x 2`` (SSL4MIS ``UnetConv3``)."""

    def __init__(self, dim: int, in_channels: int, out_channels: int) -> None:
        conv, norm = conv_nd(dim), instance_norm_nd(dim)
        super().__init__(
            conv(in_channels, out_channels, 3, padding=1),
            norm(out_channels),
            nn.ReLU(inplace=True),
            conv(out_channels, out_channels, 3, padding=1),
            norm(out_channels),
            nn.ReLU(inplace=True),
        )


class UnetUp(nn.Module):
    """2x linear upsampling, ``cat([skip, up])``, conv block (SSL4MIS ``UnetUp3_CT``)."""

    def __init__(self, dim: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.mode = interp_mode(dim)
        self.conv = UnetConv(dim, in_channels + out_channels, out_channels)

    def forward(self, skip: Tensor, x: Tensor) -> Tensor:
        up = resize_to(x, list(skip.shape[2:]), self.mode)
        return self.conv(torch.cat([skip, up], dim=1))


class UnetEncoder(nn.Module):
    """Conv blocks with 2x max-pooling in between; returns every level, full resolution first."""

    def __init__(self, dim: int, in_channels: int, channels: Sequence[int]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            UnetConv(dim, in_channels if i == 0 else channels[i - 1], channels[i]) for i in range(len(channels))
        )
        self.pool = max_pool_nd(dim)(2)

    def forward(self, x: Tensor) -> List[Tensor]:
        features: List[Tensor] = []
        for i, block in enumerate(self.blocks):
            x = block(x if i == 0 else self.pool(x))
            features.append(x)
        return features


def _check_channels(name: str, channels: Sequence[int]) -> None:
    if len(channels) < 2 or any(int(c) < 1 for c in channels):
        raise ValueError(f"{name}: channels must be >= 2 positive ints (one per level), got {tuple(channels)}")


class UNet3D(SegmentationModel):
    """3D U-Net of SSL4MIS (``unet_3D``): InstanceNorm, dropout 0.3 after the bottleneck and the last
    up block, 1x1x1 head. 5,884,050 parameters at 2 classes, as in SSL4MIS.

    ``forward_all`` returns ``{"logits"}`` only.

    Args:
        in_channels: Input channels.
        num_classes: Output classes.
        channels: Width of each level; ``len(channels) - 1`` poolings.
        dropout: Dropout probability after the bottleneck and after the last up block.
    """

    def __init__(
        self, in_channels: int, num_classes: int, channels: Sequence[int] = _CHANNELS, dropout: float = 0.3
    ) -> None:
        _check_channels(type(self).__name__, channels)
        super().__init__(
            dim=3, in_channels=in_channels, num_classes=num_classes, size_divisor=2 ** (len(channels) - 1)
        )
        self.encoder = UnetEncoder(3, in_channels, channels)
        self.dropout_center = nn.Dropout(dropout)
        self.ups = nn.ModuleList(UnetUp(3, channels[i], channels[i - 1]) for i in range(len(channels) - 1, 0, -1))
        self.dropout_out = nn.Dropout(dropout)
        self.final = nn.Conv3d(channels[0], num_classes, 1)
        kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        features = self.encoder(x)
        n = len(features)
        y = self.dropout_center(features[-1])
        for i, up in enumerate(self.ups):
            y = up(features[n - 2 - i], y)
        return self.final(self.dropout_out(y))


class UNet3DURPC(SegmentationModel):
    """3D U-Net with four deep-supervision heads for URPC (SSL4MIS ``unet_3D_dv_semi``).

    No final conv: channel dropout (``Dropout3d`` p = 0.5, 0.3, 0.2, 0.1 from the coarsest up block
    to the finest) follows each up block, and a 1x1x1 head on each predicts logits, trilinearly
    upsampled to the input size. The full-resolution head is the main output; ``forward_all``
    returns ``{"logits", "aux"}`` with ``aux`` = the 1/2-, 1/4- and 1/8-scale heads (finest first),
    i.e. SSL4MIS's ``(dsv1, dsv2, dsv3, dsv4)`` as ``logits, aux[0], aux[1], aux[2]``. 5,884,504
    parameters at 2 classes, as in SSL4MIS.

    Args:
        in_channels: Input channels.
        num_classes: Output classes.
        channels: Width of each level; ``len(channels) - 1`` poolings.
        dropout: Channel-dropout probability after each up block, coarsest first.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: Sequence[int] = _CHANNELS,
        dropout: Sequence[float] = (0.5, 0.3, 0.2, 0.1),
    ) -> None:
        _check_channels(type(self).__name__, channels)
        if len(dropout) != len(channels) - 1:
            raise ValueError(
                f"{type(self).__name__}: dropout must have one probability per up block "
                f"({len(channels) - 1}), got {tuple(dropout)}"
            )
        super().__init__(
            dim=3,
            in_channels=in_channels,
            num_classes=num_classes,
            size_divisor=2 ** (len(channels) - 1),
            output_keys=("logits", "aux"),
        )
        self.encoder = UnetEncoder(3, in_channels, channels)
        self.ups = nn.ModuleList(UnetUp(3, channels[i], channels[i - 1]) for i in range(len(channels) - 1, 0, -1))
        self.dropouts = nn.ModuleList(nn.Dropout3d(p) for p in dropout)
        # Heads coarsest first, lined up with the up blocks.
        self.heads = nn.ModuleList(nn.Conv3d(channels[i - 1], num_classes, 1) for i in range(len(channels) - 1, 0, -1))
        kaiming_init(self)

    def _decode(self, x: Tensor) -> List[Tensor]:
        features = self.encoder(x)
        n = len(features)
        y = features[-1]
        stages: List[Tensor] = []
        for i, (up, drop) in enumerate(zip(self.ups, self.dropouts)):
            y = drop(up(features[n - 2 - i], y))
            stages.append(y)
        return stages

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        stages = self._decode(x)
        return self.heads[-1](stages[-1])

    def forward_all(self, x: Tensor) -> ModelOutputs:
        self.check_input(x)
        stages = self._decode(x)
        size = list(x.shape[2:])
        outputs = [resize_to(head(s), size, "trilinear") for head, s in zip(self.heads, stages)]
        return {"logits": outputs[-1], "aux": outputs[-2::-1]}


@register_model("unet_3d", dim=3)
def unet_3d(
    in_channels: int, num_classes: int, channels: Sequence[int] = _CHANNELS, dropout: float = 0.3
) -> UNet3D:
    """3D U-Net (SSL4MIS ``unet_3D``): InstanceNorm, 16-256 channels; 5,884,050 parameters at 2 classes."""
    return UNet3D(in_channels, num_classes, channels, dropout)


@register_model("unet_3d_urpc", dim=3)
def unet_3d_urpc(
    in_channels: int,
    num_classes: int,
    channels: Sequence[int] = _CHANNELS,
    dropout: Sequence[float] = (0.5, 0.3, 0.2, 0.1),
) -> UNet3DURPC:
    """3D U-Net with four deep-supervision heads and decoder channel dropout (SSL4MIS ``unet_3D_dv_semi``)."""
    return UNet3DURPC(in_channels, num_classes, channels, dropout)
