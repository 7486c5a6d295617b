"""Attention U-Net (Oktay et al., MIDL 2018) as in SSL4MIS ``networks/attention_unet.py`` (from
Attention-Gated-Networks' ``unet_CT_multi_att_dsv_3D``): ``attention_unet_3d`` and its 2D twin
``attention_unet``.

The encoder and up blocks are those of ``unet_3d``. A gating signal (1x1 conv + InstanceNorm +
ReLU on the bottleneck) gates the skip of the deepest level; each shallower gated skip is gated by
the previous up block's output. Each gate is a ``MultiAttentionBlock``: two additive grid-attention
gates (theta: k2 s2 conv; phi: 1x1 conv on the gate, resized; psi: 1x1 conv + sigmoid, resized back
and multiplied with the skip; W: 1x1 conv + BatchNorm), concatenated and fused by a
1x1 conv + BatchNorm + ReLU. The finest skip is not gated. A 1x1 head on every up block's output
(resized to the input) feeds a final 1x1 conv over their concatenation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import List, Tuple

import torch
from torch import Tensor, nn

from ._base import ModelOutputs, SegmentationModel
from ._layers import batch_norm_nd, conv_nd, instance_norm_nd, interp_mode, resize_to
from ._registry import register_model
from .unet_3d import UnetEncoder, UnetUp, kaiming_init

__all__ = ["AttentionUNet"]

_CHANNELS = (16, 32, 64, 128, 256)


class GridAttentionGate(nn.Module):
    """Additive attention gate with 2x sub-sampling (concatenation mode); returns ``(W(a * x), a)``."""

    def __init__(self, dim: int, in_channels: int, gate_channels: int, inter_channels: int) -> None:
        super().__init__()
        conv = conv_nd(dim)
        self.mode = interp_mode(dim)
        self.theta = conv(in_channels, inter_channels, kernel_size=2, stride=2, bias=False)
        self.phi = conv(gate_channels, inter_channels, kernel_size=1)
        self.psi = conv(inter_channels, 1, kernel_size=1)
        self.W = nn.Sequential(conv(in_channels, in_channels, kernel_size=1), batch_norm_nd(dim)(in_channels))

    def forward(self, x: Tensor, gate: Tensor) -> Tuple[Tensor, Tensor]:
        theta = self.theta(x)
        phi = resize_to(self.phi(gate), list(theta.shape[2:]), self.mode)
        attention = torch.sigmoid(self.psi(torch.relu(theta + phi)))
        attention = resize_to(attention, list(x.shape[2:]), self.mode)
        return self.W(attention * x), attention


class MultiAttentionBlock(nn.Module):
    """Two attention gates on the same skip, concatenated and fused by 1x1 conv + BN + ReLU."""

    def __init__(self, dim: int, in_channels: int, gate_channels: int) -> None:
        super().__init__()
        self.gate1 = GridAttentionGate(dim, in_channels, gate_channels, in_channels)
        self.gate2 = GridAttentionGate(dim, in_channels, gate_channels, in_channels)
        self.combine = nn.Sequential(
            conv_nd(dim)(2 * in_channels, in_channels, kernel_size=1),
            batch_norm_nd(dim)(in_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:
        y1, _ = self.gate1(x, gate)
        y2, _ = self.gate2(x, gate)
        return self.combine(torch.cat([y1, y2], dim=1))


class NoGate(nn.Module):
    """Stands in for the (absent) gate of the finest skip, so one loop covers every level."""

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:
        return x


class AttentionUNet(SegmentationModel):
    """Attention U-Net with deep supervision, 2D or 3D.

    ``forward_all`` returns ``{"logits", "aux"}``: the final fused prediction, and the per-stage
    heads (already resized to the input; finest first) that the fusion is computed from. In 3D with
    the defaults this is SSL4MIS's ``Attention_UNet`` parameter for parameter (6,469,328 at
    2 classes, which the spec rounds to 6.47 M).

    Args:
        dim: 2 or 3.
        in_channels: Input channels.
        num_classes: Output classes.
        channels: Width of each level (at least 3 levels); ``len(channels) - 1`` poolings.
    """

    def __init__(self, dim: int, in_channels: int, num_classes: int, channels: Sequence[int] = _CHANNELS) -> None:
        if len(channels) < 3 or any(int(c) < 1 for c in channels):
            raise ValueError(
                f"{type(self).__name__}: channels must be >= 3 positive ints (one per level), got {tuple(channels)}"
            )
        super().__init__(
            dim=dim,
            in_channels=in_channels,
            num_classes=num_classes,
            size_divisor=2 ** (len(channels) - 1),
            output_keys=("logits", "aux"),
        )
        conv = conv_nd(dim)
        n = len(channels)
        self.mode = interp_mode(dim)
        self.encoder = UnetEncoder(dim, in_channels, channels)
        self.gating = nn.Sequential(
            conv(channels[-1], channels[-1], kernel_size=1), instance_norm_nd(dim)(channels[-1]), nn.ReLU(inplace=True)
        )
        # Up block i takes level n-1-i to level n-2-i; the skips of all levels but the finest are gated,
        # the first by the gating signal, the others by the previous up block's output.
        gates: List[nn.Module] = [
            MultiAttentionBlock(dim, channels[n - 2 - i], channels[n - 1 - i]) for i in range(n - 2)
        ]
        self.attention = nn.ModuleList([*gates, NoGate()])
        self.ups = nn.ModuleList(UnetUp(dim, channels[i], channels[i - 1]) for i in range(n - 1, 0, -1))
        self.heads = nn.ModuleList(conv(channels[i - 1], num_classes, kernel_size=1) for i in range(n - 1, 0, -1))
        self.final = conv(num_classes * (n - 1), num_classes, kernel_size=1)
        kaiming_init(self)

    def _heads(self, x: Tensor) -> List[Tensor]:
        """Per-stage predictions at the input size, coarsest first."""
        features = self.encoder(x)
        n = len(features)
        y = features[-1]
        gate = self.gating(y)
        size = list(x.shape[2:])
        outputs: List[Tensor] = []
        for i, (attention, up, head) in enumerate(zip(self.attention, self.ups, self.heads)):
            y = up(attention(features[n - 2 - i], gate), y)
            gate = y
            outputs.append(resize_to(head(y), size, self.mode))
        return outputs

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        outputs = self._heads(x)
        # SSL4MIS concatenates (dsv1, dsv2, dsv3, dsv4): finest first.
        outputs.reverse()
        return self.final(torch.cat(outputs, dim=1))

    def forward_all(self, x: Tensor) -> ModelOutputs:
        self.check_input(x)
        outputs = self._heads(x)
        outputs.reverse()
        return {"logits": self.final(torch.cat(outputs, dim=1)), "aux": outputs}


@register_model("attention_unet_3d", dim=3)
def attention_unet_3d(in_channels: int, num_classes: int, channels: Sequence[int] = _CHANNELS) -> AttentionUNet:
    """3D Attention U-Net with deep supervision (SSL4MIS ``attention_unet``); 6,469,328 parameters at 2 classes."""
    return AttentionUNet(3, in_channels, num_classes, channels)


@register_model("attention_unet", dim=2)
def attention_unet(in_channels: int, num_classes: int, channels: Sequence[int] = _CHANNELS) -> AttentionUNet:
    """2D Attention U-Net: the 3D design with 2D layers (no SSL4MIS counterpart)."""
    return AttentionUNet(2, in_channels, num_classes, channels)
