"""U-Net with an EfficientNet-B3 encoder (SSL4MIS ``Effi_UNet``, segmentation_models_pytorch style):
``efficient_unet``.

Encoder: EfficientNet-B3 (width 1.2, depth 1.4: a 40-channel stem and 26 MBConv blocks with
squeeze-excitation 0.25, SiLU, BatchNorm eps 1e-3 / momentum 0.01, drop-connect 0.2 scaled by block
index). Skips are taken after the stem (40 @ 1/2) and after blocks 5, 8 and 18 (32 @ 1/4,
48 @ 1/8, 136 @ 1/16); the deepest feature is the last block (384 @ 1/32). Decoder: five blocks
(256, 128, 64, 32, 16) of nearest 2x upsampling, ``cat([up, skip])`` and two
``conv3x3 (no bias) -> BN -> ReLU``; a 1x1 head. 12,565,340 parameters with 1 input channel and
4 classes (encoder 10,102,616, decoder and head 2,462,724).

Differences from SSL4MIS:

* Trained from scratch: no ImageNet download (SSL4MIS loads ``efficientnet-b3`` weights and sums
  the RGB stem kernels for 1-channel input). Initialisation: Kaiming-normal (fan-out) for encoder
  convs, Kaiming-uniform for decoder convs, Xavier for the head, zero biases.
* The unused ``conv_head`` (384 -> 1536), its BatchNorm and the classifier are not built
  (592,896 fewer parameters than SSL4MIS's ~13.16 M).
* Convolutions use symmetric ``k // 2`` padding instead of TensorFlow "same" padding; for inputs
  divisible by 32 the shapes are identical.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import SegmentationModel
from ._layers import DropPath
from ._registry import register_model

__all__ = ["EfficientUNet"]

# EfficientNet-B0 stages: (repeats, kernel, stride, expand ratio, output channels).
_B0_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)


def _round_filters(channels: int, width: float, divisor: int = 8) -> int:
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class SqueezeExcite(nn.Module):
    """Global average pool -> 1x1 reduce -> SiLU -> 1x1 expand -> sigmoid gate."""

    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(s))))


class MBConv(nn.Module):
    """Inverted residual: [1x1 expand] -> depthwise kxk -> SE -> 1x1 project, residual when shapes match."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int, drop_connect: float
    ) -> None:
        super().__init__()
        hidden = in_channels * expand
        layers: List[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(in_channels, hidden, 1, bias=False), _bn(hidden), nn.SiLU()]
        layers += [
            nn.Conv2d(hidden, hidden, kernel, stride=stride, padding=kernel // 2, groups=hidden, bias=False),
            _bn(hidden),
            nn.SiLU(),
            SqueezeExcite(hidden, max(1, int(in_channels * 0.25))),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            _bn(out_channels),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels
        self.drop_path = DropPath(drop_connect)

    def forward(self, x: Tensor) -> Tensor:
        if self.residual:
            return x + self.drop_path(self.block(x))
        return self.block(x)


class EfficientNetEncoder(nn.Module):
    """EfficientNet trunk returning ``[stem, skip1, skip2, skip3, deepest]`` at strides 2..32."""

    def __init__(
        self, in_channels: int, width: float = 1.2, depth: float = 1.4, drop_connect: float = 0.2
    ) -> None:
        super().__init__()
        stem = _round_filters(32, width)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem, 3, stride=2, padding=1, bias=False), _bn(stem), nn.SiLU()
        )
        specs = []
        c_in = stem
        for repeats, kernel, stride, expand, c_out in _B0_STAGES:
            c_out = _round_filters(c_out, width)
            for i in range(int(math.ceil(depth * repeats))):
                specs.append((c_in if i == 0 else c_out, c_out, kernel, stride if i == 0 else 1, expand))
            c_in = c_out
        total = len(specs)
        blocks = [MBConv(*spec, drop_connect=drop_connect * idx / total) for idx, spec in enumerate(specs)]
        # Cut where the resolution is about to halve, so each group ends at a new scale (smp's stage split).
        cuts = [i for i, spec in enumerate(specs) if spec[3] == 2][1:] + [total]
        groups: List[nn.Module] = []
        start = 0
        for end in cuts:
            groups.append(nn.Sequential(*blocks[start:end]))
            start = end
        self.stages = nn.ModuleList(groups)
        self.out_channels = [stem] + [specs[end - 1][1] for end in cuts]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> List[Tensor]:
        x = self.stem(x)
        features = [x]
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class DecoderBlock(nn.Module):
    """Nearest 2x upsampling, ``cat([up, skip])`` and two ``conv3x3 -> BN -> ReLU``."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.has_skip = skip_channels > 0
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels + skip_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.has_skip:
            x = torch.cat([x, skip], dim=1)
        return self.conv(x)


class EfficientUNet(SegmentationModel):
    """U-Net decoder on an EfficientNet-B3 encoder trained from scratch. ``forward_all`` returns
    ``{"logits"}`` only. See the module docstring for the layout and the differences from SSL4MIS.

    Args:
        in_channels: Input channels.
        num_classes: Output classes.
        decoder_channels: Widths of the five decoder blocks.
        drop_connect: Maximum drop-connect (stochastic depth) probability of the encoder blocks.
        width: EfficientNet width multiplier (B3: 1.2; B0: 1.0).
        depth: EfficientNet depth multiplier (B3: 1.4; B0: 1.0).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        drop_connect: float = 0.2,
        width: float = 1.2,
        depth: float = 1.4,
    ) -> None:
        if len(decoder_channels) != 5 or any(int(c) < 1 for c in decoder_channels):
            raise ValueError(f"EfficientUNet: decoder_channels must be 5 positive ints, got {tuple(decoder_channels)}")
        if width <= 0 or depth <= 0:
            raise ValueError(
                f"EfficientUNet: width and depth multipliers must be > 0, got width={width}, depth={depth}"
            )
        super().__init__(dim=2, in_channels=in_channels, num_classes=num_classes, size_divisor=32)
        self.encoder = EfficientNetEncoder(in_channels, width=width, depth=depth, drop_connect=drop_connect)
        enc = self.encoder.out_channels  # [40, 32, 48, 136, 384]
        skips = [enc[3], enc[2], enc[1], enc[0], 0]
        ins = [enc[4], *decoder_channels[:-1]]
        self.decoder = nn.ModuleList(DecoderBlock(i, s, o) for i, s, o in zip(ins, skips, decoder_channels))
        self.head = nn.Conv2d(decoder_channels[-1], num_classes, 1)
        for m in self.decoder.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        features = self.encoder(x)
        y = features[-1]
        # The last decoder block has no skip (it ignores the tensor passed); one loop stays scriptable.
        skips = [features[3], features[2], features[1], features[0], features[0]]
        for i, block in enumerate(self.decoder):
            y = block(y, skips[i])
        return self.head(y)


@register_model("efficient_unet", dim=2)
def efficient_unet(
    in_channels: int,
    num_classes: int,
    decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
    drop_connect: float = 0.2,
    width: float = 1.2,
    depth: float = 1.4,
) -> EfficientUNet:
    """U-Net with an EfficientNet-B3-style encoder trained from scratch (SSL4MIS ``efficient_unet``, no download).

    ``width`` / ``depth`` select another EfficientNet scale (B0: 1.0 / 1.0).
    """
    return EfficientUNet(in_channels, num_classes, decoder_channels, drop_connect, width, depth)
