"""V-Net as used by SSL4MIS, UA-MT and DTC (``networks/vnet.py``): ``vnet`` and ``vnet_sdf``.

Encoder stages of 1, 2, 3, 3, 3 ``conv3 -> BN -> ReLU`` layers at 16, 32, 64, 128, 256 channels,
downsampled by k2 s2 convs (+ BN + ReLU); decoder stages of 3, 3, 2, 1 layers after k2 s2
transposed convs (+ BN + ReLU) whose output is *added* to the skip; channel dropout (p = 0.5) on the
bottleneck and before the 1x1x1 head. Not residual despite the name, as in SSL4MIS. PyTorch default
initialisation.
"""

from __future__ import annotations

from typing import List

from torch import Tensor, nn

from ._base import ModelOutputs, SegmentationModel
from ._registry import register_model

__all__ = ["VNet"]


def _conv_stage(n_layers: int, in_channels: int, out_channels: int) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i in range(n_layers):
        layers += [
            nn.Conv3d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


def _resample(in_channels: int, out_channels: int, up: bool) -> nn.Sequential:
    conv = nn.ConvTranspose3d if up else nn.Conv3d
    return nn.Sequential(
        conv(in_channels, out_channels, 2, stride=2), nn.BatchNorm3d(out_channels), nn.ReLU(inplace=True)
    )


class VNet(SegmentationModel):
    """V-Net with BatchNorm and dropout (SSL4MIS ``vnet``: ``normalization='batchnorm', has_dropout=True``).

    With ``sdf_channels > 0`` it is DTC's dual-task V-Net: a second 1x1x1 head followed by ``tanh``
    regresses signed distance maps, returned by ``forward_all`` under ``"sdf"``; ``forward`` still
    returns only the segmentation logits.

    Differences from SSL4MIS / DTC: dropout follows ``train()`` / ``eval()`` instead of a
    ``turnoff_drop`` argument; DTC's sigmoid set-up (``num_classes - 1`` logits) is replaced by
    ``num_classes`` softmax logits plus ``sdf_channels`` (default ``num_classes - 1``, i.e. one map
    per foreground class) SDF maps.

    Args:
        in_channels: Input channels.
        num_classes: Output classes.
        n_filters: Width of the first stage; stage ``i`` has ``n_filters * 2**i`` channels.
        dropout: Channel-dropout probability on the bottleneck and before the head (0 disables).
        sdf_channels: Channels of the signed-distance head; 0 builds no head.
    """

    def __init__(
        self, in_channels: int, num_classes: int, n_filters: int = 16, dropout: float = 0.5, sdf_channels: int = 0
    ) -> None:
        if n_filters < 1:
            raise ValueError(f"VNet: n_filters must be a positive int, got {n_filters!r}")
        if sdf_channels < 0:
            raise ValueError(f"VNet: sdf_channels must be >= 0, got {sdf_channels!r}")
        super().__init__(
            dim=3,
            in_channels=in_channels,
            num_classes=num_classes,
            size_divisor=16,
            output_keys=("logits", "sdf") if sdf_channels > 0 else ("logits",),
        )
        f = n_filters
        widths = [f, 2 * f, 4 * f, 8 * f, 16 * f]
        self.encoder = nn.ModuleList(
            _conv_stage(n, widths[i] if i else in_channels, widths[i]) for i, n in enumerate((1, 2, 3, 3, 3))
        )
        self.downs = nn.ModuleList(_resample(widths[i], widths[i + 1], up=False) for i in range(4))
        self.ups = nn.ModuleList(_resample(widths[i], widths[i - 1], up=True) for i in range(4, 0, -1))
        self.decoder = nn.ModuleList(_conv_stage(n, widths[i], widths[i]) for n, i in zip((3, 3, 2, 1), (3, 2, 1, 0)))
        self.dropout = nn.Dropout3d(dropout)
        self.out_conv = nn.Conv3d(f, num_classes, 1)
        self.sdf_head = nn.Conv3d(f, sdf_channels, 1) if sdf_channels > 0 else nn.Identity()
        self.sdf_channels = sdf_channels

    def _features(self, x: Tensor) -> Tensor:
        skips: List[Tensor] = []
        for stage, down in zip(self.encoder, self.downs):
            x = stage(x)
            skips.append(x)
            x = down(x)
        x = self.dropout(self.encoder[-1](x))
        for i, (up, stage) in enumerate(zip(self.ups, self.decoder)):
            x = stage(up(x) + skips[3 - i])
        return self.dropout(x)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return self.out_conv(self._features(x))

    def forward_all(self, x: Tensor) -> ModelOutputs:
        self.check_input(x)
        features = self._features(x)
        outputs: ModelOutputs = {"logits": self.out_conv(features)}
        if self.sdf_channels > 0:
            outputs["sdf"] = self.sdf_head(features).tanh()
        return outputs


@register_model("vnet", dim=3)
def vnet(in_channels: int, num_classes: int, n_filters: int = 16, dropout: float = 0.5) -> VNet:
    """V-Net with BatchNorm and dropout (SSL4MIS ``vnet``); 9,448,866 parameters at 2 classes."""
    return VNet(in_channels, num_classes, n_filters, dropout, sdf_channels=0)


@register_model("vnet_sdf", dim=3)
def vnet_sdf(
    in_channels: int, num_classes: int, n_filters: int = 16, dropout: float = 0.5, sdf_channels: int | None = None
) -> VNet:
    """V-Net with an extra tanh signed-distance head for DTC; ``forward_all`` adds ``"sdf"``."""
    if sdf_channels is None:
        sdf_channels = max(num_classes - 1, 1)
    if sdf_channels < 1:
        raise ValueError(f"vnet_sdf: sdf_channels must be >= 1, got {sdf_channels!r}")
    return VNet(in_channels, num_classes, n_filters, dropout, sdf_channels=sdf_channels)
