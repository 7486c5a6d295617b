"""P-Net (Wang et al., DeepIGeoS, TPAMI 2019) as in SSL4MIS ``networks/pnet.py``: ``pnet``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import List

import torch
from torch import Tensor, nn

from ._base import SegmentationModel
from ._registry import register_model

__all__ = ["PNet2D"]


class PNet2D(SegmentationModel):
    """Dilated fully convolutional 2D network without downsampling: any input size works.

    Five blocks of two ``conv3x3 (dilation d) -> BN -> LeakyReLU`` layers at 64 channels,
    ``d = 1, 2, 4, 8, 16``; their outputs are concatenated (320 channels) and reduced by 1x1 convs
    (320 -> 320 -> 128 -> 64 -> num_classes, LeakyReLU, ``Dropout2d(0.3)`` before the last two).
    486,596 parameters at 4 classes, as in SSL4MIS. ``forward_all`` returns ``{"logits"}`` only.

    Args:
        in_channels: Input channels.
        num_classes: Output classes.
        channels: Width of the dilated blocks.
        dilations: Dilation (and padding) of each block.
        dropout: Channel-dropout probability in the head.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 64,
        dilations: Sequence[int] = (1, 2, 4, 8, 16),
        dropout: float = 0.3,
    ) -> None:
        if channels < 1 or len(dilations) < 1 or any(d < 1 for d in dilations):
            raise ValueError(
                f"PNet2D: channels must be positive and dilations a non-empty sequence of positive ints, "
                f"got channels={channels!r}, dilations={tuple(dilations)!r}"
            )
        super().__init__(dim=2, in_channels=in_channels, num_classes=num_classes, size_divisor=1)
        blocks: List[nn.Module] = []
        for i, d in enumerate(dilations):
            layers: List[nn.Module] = []
            for j in range(2):
                c_in = in_channels if i == 0 and j == 0 else channels
                layers += [
                    nn.Conv2d(c_in, channels, 3, padding=d, dilation=d),
                    nn.BatchNorm2d(channels),
                    nn.LeakyReLU(0.01),
                ]
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        concat = channels * len(dilations)
        self.head = nn.Sequential(
            nn.Conv2d(concat, concat, 1),
            nn.LeakyReLU(0.01),
            nn.Conv2d(concat, 128, 1),
            nn.LeakyReLU(0.01),
            nn.Dropout2d(dropout),
            nn.Conv2d(128, 64, 1),
            nn.LeakyReLU(0.01),
            nn.Dropout2d(dropout),
            nn.Conv2d(64, num_classes, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        features: List[Tensor] = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return self.head(torch.cat(features, dim=1))


@register_model("pnet", dim=2)
def pnet(
    in_channels: int,
    num_classes: int,
    channels: int = 64,
    dilations: Sequence[int] = (1, 2, 4, 8, 16),
    dropout: float = 0.3,
) -> PNet2D:
    """Dilated 2D P-Net without downsampling (SSL4MIS ``pnet``); 486,596 parameters at 4 classes."""
    return PNet2D(in_channels, num_classes, channels, dilations, dropout)
