"""The 2D U-Net family of SSL4MIS (``networks/unet.py``, after PyMIC): ``unet``, ``unet_ds``,
``unet_urpc`` and ``unet_cct``.

Layout (defaults): channels 16-32-64-128-256, four 2x max-poolings, encoder dropout
0.05/0.1/0.2/0.3/0.5 and none in the decoder. A conv block is
``conv3x3 -> BN -> LeakyReLU(0.01) -> Dropout(p) -> conv3x3 -> BN -> LeakyReLU``; an up block is a
2x2 stride-2 transposed conv to the skip's width, ``cat([skip, up])`` and a conv block; the head is
a 3x3 conv. PyTorch default initialisation, as in SSL4MIS.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import List

import torch
from torch import Tensor, nn

from ._base import ModelOutputs, SegmentationModel
from ._layers import FeatureDropout, FeatureNoise, resize_to
from ._registry import register_model

__all__ = ["UNet", "UNetCCT", "UNetDeepSupervision"]

_CHANNELS = (16, 32, 64, 128, 256)
_DROPOUT = (0.05, 0.1, 0.2, 0.3, 0.5)


class ConvBlock(nn.Sequential):
    """Two 3x3 convs with BN and LeakyReLU, dropout between them."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(0.01),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(0.01),
        )


class Encoder(nn.Module):
    """A conv block, then ``len(channels) - 1`` times [2x max-pool, conv block].

    ``forward`` returns the feature of every level, full resolution first.
    """

    def __init__(self, in_channels: int, channels: Sequence[int], dropout: Sequence[float]) -> None:
        super().__init__()
        self.in_conv = ConvBlock(in_channels, channels[0], dropout[0])
        self.downs = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), ConvBlock(channels[i - 1], channels[i], dropout[i]))
            for i in range(1, len(channels))
        )

    def forward(self, x: Tensor) -> List[Tensor]:
        features = [self.in_conv(x)]
        for down in self.downs:
            features.append(down(features[-1]))
        return features


class UpBlock(nn.Module):
    """Transposed-conv 2x upsampling to the skip's width, ``cat([skip, up])``, conv block."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, skip_channels, kernel_size=2, stride=2)
        self.conv = ConvBlock(2 * skip_channels, out_channels, 0.0)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class Decoder(nn.Module):
    """Up blocks from the deepest level back to full resolution, then a 3x3 head."""

    def __init__(self, channels: Sequence[int], num_classes: int) -> None:
        super().__init__()
        n = len(channels)
        self.ups = nn.ModuleList(
            UpBlock(channels[i], channels[i - 1], channels[i - 1]) for i in range(n - 1, 0, -1)
        )
        self.out_conv = nn.Conv2d(channels[0], num_classes, kernel_size=3, padding=1)

    def stages(self, features: List[Tensor]) -> List[Tensor]:
        """Outputs of every up block, coarsest first (the last one is at full resolution)."""
        x = features[-1]
        outputs: List[Tensor] = []
        n = len(features)
        for i, up in enumerate(self.ups):
            x = up(x, features[n - 2 - i])
            outputs.append(x)
        return outputs

    def forward(self, features: List[Tensor]) -> Tensor:
        return self.out_conv(self.stages(features)[-1])


def _check_levels(name: str, channels: Sequence[int], dropout: Sequence[float]) -> None:
    if len(channels) < 2 or any(int(c) < 1 for c in channels):
        raise ValueError(f"{name}: channels must be >= 2 positive ints (one per level), got {tuple(channels)}")
    if len(dropout) != len(channels) or any(not 0.0 <= p < 1.0 for p in dropout):
        raise ValueError(
            f"{name}: dropout must have one probability in [0, 1) per level ({len(channels)}), got {tuple(dropout)}"
        )


class UNet(SegmentationModel):
    """2D U-Net of SSL4MIS (``UNet``), the default student of the 2D methods.

    ``forward_all`` returns ``{"logits"}`` only.

    Args:
        in_channels: Input channels.
        num_classes: Output classes.
        channels: Width of each level; ``len(channels) - 1`` poolings.
        dropout: Dropout probability inside the encoder block of each level.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: Sequence[int] = _CHANNELS,
        dropout: Sequence[float] = _DROPOUT,
        output_keys: Sequence[str] = ("logits",),
    ) -> None:
        _check_levels(type(self).__name__, channels, dropout)
        super().__init__(
            dim=2,
            in_channels=in_channels,
            num_classes=num_classes,
            size_divisor=2 ** (len(channels) - 1),
            output_keys=output_keys,
        )
        self.encoder = Encoder(in_channels, channels, dropout)
        self.decoder = Decoder(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return self.decoder(self.encoder(x))


class UNetDeepSupervision(UNet):
    """U-Net with deep-supervision heads: SSL4MIS ``UNet_DS`` and, with ``perturb=True``, ``UNet_URPC``.

    A 3x3 head on every decoder stage but the last predicts logits that are resized (nearest, as in
    SSL4MIS) to the input size. ``forward_all`` returns ``{"logits", "aux"}`` with ``aux`` ordered
    finest first: for the default 5 levels, the 1/2-, 1/4- and 1/8-scale predictions (URPC's
    ``z_1, z_2, z_3``).

    With ``perturb=True`` (URPC), in training mode only, the heads see perturbed features: feature
    noise U(-0.3, 0.3) at 1/2, feature dropout at 1/4 and dropout(0.5) at 1/8 (cycling through the
    three for other depths). The main output is never perturbed.

    Differences from SSL4MIS: the unused 256-channel head ``out_conv_dp4`` is not built, so there
    are 9,220 fewer parameters at 4 classes (1,952,400 instead of 1,961,620).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: Sequence[int] = _CHANNELS,
        dropout: Sequence[float] = _DROPOUT,
        perturb: bool = False,
    ) -> None:
        super().__init__(in_channels, num_classes, channels, dropout, output_keys=("logits", "aux"))
        # Heads for decoder stages 0 .. n-3 (coarsest first, as the decoder produces them).
        stage_channels = list(reversed(channels[:-1]))[:-1]
        self.aux_heads = nn.ModuleList(nn.Conv2d(c, num_classes, 3, padding=1) for c in stage_channels)
        # Perturbations, finest aux first; reversed to line up with the heads.
        kinds = [FeatureNoise(0.3), FeatureDropout(0.7, 0.9), nn.Dropout(0.5)]
        perturbations: List[nn.Module] = []
        for i in range(len(stage_channels)):
            perturbations.append(kinds[i % 3] if perturb else nn.Identity())
        self.aux_perturbations = nn.ModuleList(reversed(perturbations))
        self.perturb = perturb

    def forward_all(self, x: Tensor) -> ModelOutputs:
        self.check_input(x)
        stages = self.decoder.stages(self.encoder(x))
        size = list(x.shape[2:])
        aux = [
            resize_to(head(perturb(stages[i])), size, "nearest")
            for i, (head, perturb) in enumerate(zip(self.aux_heads, self.aux_perturbations))
        ]
        return {"logits": self.decoder.out_conv(stages[-1]), "aux": aux[::-1]}


class UNetCCT(UNet):
    """U-Net with one shared encoder, a main decoder and three perturbed auxiliary decoders (CCT).

    Auxiliary decoder k sees every encoder feature perturbed by, respectively, feature noise
    U(-0.3, 0.3), dropout(0.3) and feature dropout. ``forward`` runs only the main decoder;
    ``forward_all`` returns ``{"logits", "aux"}`` with the three auxiliary predictions in that order.

    Differences from SSL4MIS ``UNet_CCT``: the perturbations are training-only (SSL4MIS applies them
    in eval mode too, which never affects the main output). Parameter count is identical
    (4,235,904 at 4 classes).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: Sequence[int] = _CHANNELS,
        dropout: Sequence[float] = _DROPOUT,
    ) -> None:
        super().__init__(in_channels, num_classes, channels, dropout, output_keys=("logits", "aux"))
        self.aux_decoders = nn.ModuleList(Decoder(channels, num_classes) for _ in range(3))
        self.aux_perturbations = nn.ModuleList([FeatureNoise(0.3), nn.Dropout(0.3), FeatureDropout(0.7, 0.9)])

    def forward_all(self, x: Tensor) -> ModelOutputs:
        self.check_input(x)
        features = self.encoder(x)
        aux = [
            decoder([perturb(f) for f in features])
            for decoder, perturb in zip(self.aux_decoders, self.aux_perturbations)
        ]
        return {"logits": self.decoder(features), "aux": aux}


@register_model("unet", dim=2)
def unet(
    in_channels: int,
    num_classes: int,
    channels: Sequence[int] = _CHANNELS,
    dropout: Sequence[float] = _DROPOUT,
) -> UNet:
    """2D U-Net (SSL4MIS ``unet``): 16-256 channels, encoder dropout; 1,944,324 parameters at 4 classes."""
    return UNet(in_channels, num_classes, channels, dropout)


@register_model("unet_ds", dim=2)
def unet_ds(
    in_channels: int,
    num_classes: int,
    channels: Sequence[int] = _CHANNELS,
    dropout: Sequence[float] = _DROPOUT,
) -> UNetDeepSupervision:
    """2D U-Net with three deep-supervision heads (SSL4MIS ``unet_ds``); ``aux`` finest first."""
    return UNetDeepSupervision(in_channels, num_classes, channels, dropout, perturb=False)


@register_model("unet_urpc", dim=2)
def unet_urpc(
    in_channels: int,
    num_classes: int,
    channels: Sequence[int] = _CHANNELS,
    dropout: Sequence[float] = _DROPOUT,
) -> UNetDeepSupervision:
    """2D U-Net with three perturbed pyramid heads for URPC (SSL4MIS ``unet_urpc``); ``aux`` finest first."""
    return UNetDeepSupervision(in_channels, num_classes, channels, dropout, perturb=True)


@register_model("unet_cct", dim=2)
def unet_cct(
    in_channels: int,
    num_classes: int,
    channels: Sequence[int] = _CHANNELS,
    dropout: Sequence[float] = _DROPOUT,
) -> UNetCCT:
    """2D U-Net with a main and three perturbed auxiliary decoders for CCT (SSL4MIS ``unet_cct``)."""
    return UNetCCT(in_channels, num_classes, channels, dropout)
