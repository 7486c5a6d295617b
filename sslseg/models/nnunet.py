"""nnU-Net-style plain convolutional U-Nets (Isensee et al., Nature Methods 2021): ``nnunet`` (2D)
and ``nnunet_3d``.

Each stage is ``n_convs x [conv (bias) -> InstanceNorm (affine, eps 1e-5) -> LeakyReLU(0.01)]``; the
first conv of every stage after the first downsamples by its stride (no pooling); the decoder
upsamples with transposed convs whose kernel equals the stride, concatenates ``[up, skip]`` and runs
a stage. Every decoder stage has a 1x1 segmentation head: the last gives the logits, the others are
the deep-supervision outputs. He initialisation (``a = 0.01``) as in nnU-Net.

Differences from SSL4MIS's ``nnUNet`` (a copy of nnU-Net v1's ``Generic_UNet`` with pooling
``[[1,2,2],[1,2,2],[2,2,2],[2,2,2],[1,2,2],[1,2,2]]``, features 16..320, 30.4 M parameters), which
needs inputs divisible by (4, 64, 64) and so cannot take the 96^3 patches of the 3D methods:
the defaults follow what nnU-Net's planner picks for those patches instead (see the builders), and
the geometry is an option (``features``, ``strides``, ``kernel_sizes``), so SSL4MIS's
configuration can be rebuilt when needed (its transposed convs and heads have no bias, these do).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import List, Tuple, Union

import torch
from torch import Tensor, nn

from ._base import ModelOutputs, SegmentationModel
from ._layers import conv_nd, conv_transpose_nd, instance_norm_nd, interp_mode, resize_to
from ._registry import register_model

__all__ = ["PlainConvUNet"]

IntOrSeq = Union[int, Sequence[int]]


def _per_axis(value: IntOrSeq, dim: int, what: str) -> Tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dim
    value = tuple(int(v) for v in value)
    if len(value) != dim:
        raise ValueError(f"PlainConvUNet: each entry of {what} must be an int or {dim} ints, got {value}")
    return value


class ConvStage(nn.Sequential):
    """``n_convs x [conv -> InstanceNorm(affine) -> LeakyReLU(0.01)]``; the first conv carries the stride."""

    def __init__(
        self,
        dim: int,
        in_channels: int,
        out_channels: int,
        kernel: Tuple[int, ...],
        stride: Tuple[int, ...],
        n_convs: int,
    ) -> None:
        layers: List[nn.Module] = []
        for i in range(n_convs):
            layers += [
                conv_nd(dim)(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    kernel,
                    stride=stride if i == 0 else 1,
                    padding=[k // 2 for k in kernel],
                ),
                instance_norm_nd(dim)(out_channels, eps=1e-5, affine=True),
                nn.LeakyReLU(0.01, inplace=True),
            ]
        super().__init__(*layers)


class PlainConvUNet(SegmentationModel):
    """A plain-convolution U-Net configured like nnU-Net, 2D or 3D.

    ``forward_all`` returns ``{"logits", "aux"}``; ``aux`` holds the deep-supervision heads of the
    coarser decoder stages, resized (linearly) to the input size, finest first. (nnU-Net itself
    downsamples the targets instead; resizing the predictions keeps one output contract.)

    Args:
        dim: 2 or 3.
        in_channels: Input channels.
        num_classes: Output classes.
        features: Width of each stage.
        strides: Downsampling of each stage after the first (``len(features) - 1`` entries, each an
            int or one int per axis).
        kernel_sizes: Conv kernel of each stage (``len(features)`` entries, each an int or one int per
            axis), or one int for all.
        n_convs: Convs per stage (encoder and decoder).
    """

    def __init__(
        self,
        dim: int,
        in_channels: int,
        num_classes: int,
        features: Sequence[int],
        strides: Sequence[IntOrSeq],
        kernel_sizes: Union[int, Sequence[IntOrSeq]] = 3,
        n_convs: int = 2,
    ) -> None:
        n = len(features)
        if n < 2 or any(int(f) < 1 for f in features):
            raise ValueError(f"PlainConvUNet: features must be >= 2 positive ints, got {tuple(features)}")
        if len(strides) != n - 1:
            raise ValueError(
                f"PlainConvUNet: strides must have len(features) - 1 = {n - 1} entries, "
                f"got {len(strides)}: {tuple(strides)}"
            )
        if isinstance(kernel_sizes, int):
            kernel_sizes = [kernel_sizes] * n
        if len(kernel_sizes) != n:
            raise ValueError(
                f"PlainConvUNet: kernel_sizes must be an int or have len(features) = {n} entries, "
                f"got {tuple(kernel_sizes)}"
            )
        if n_convs < 1:
            raise ValueError(f"PlainConvUNet: n_convs must be >= 1, got {n_convs}")
        stride_t = [_per_axis(s, dim, "strides") for s in strides]
        kernel_t = [_per_axis(k, dim, "kernel_sizes") for k in kernel_sizes]
        divisor = [1] * dim
        for s in stride_t:
            divisor = [d * si for d, si in zip(divisor, s)]
        super().__init__(
            dim=dim,
            in_channels=in_channels,
            num_classes=num_classes,
            size_divisor=divisor,
            output_keys=("logits", "aux"),
        )
        self.mode = interp_mode(dim)
        self.encoder = nn.ModuleList(
            ConvStage(dim, in_channels if i == 0 else features[i - 1], features[i], kernel_t[i],
                      (1,) * dim if i == 0 else stride_t[i - 1], n_convs)
            for i in range(n)
        )
        # Decoder stage j goes from stage n-1-j to n-2-j.
        self.ups = nn.ModuleList(
            conv_transpose_nd(dim)(features[i], features[i - 1], stride_t[i - 1], stride=stride_t[i - 1])
            for i in range(n - 1, 0, -1)
        )
        self.decoder = nn.ModuleList(
            ConvStage(dim, 2 * features[i - 1], features[i - 1], kernel_t[i - 1], (1,) * dim, n_convs)
            for i in range(n - 1, 0, -1)
        )
        self.heads = nn.ModuleList(conv_nd(dim)(features[i - 1], num_classes, 1) for i in range(n - 1, 0, -1))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight, a=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _decode(self, x: Tensor) -> List[Tensor]:
        skips: List[Tensor] = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        n = len(skips)
        outputs: List[Tensor] = []
        for i, (up, stage) in enumerate(zip(self.ups, self.decoder)):
            x = stage(torch.cat([up(x), skips[n - 2 - i]], dim=1))
            outputs.append(x)
        return outputs

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return self.heads[-1](self._decode(x)[-1])

    def forward_all(self, x: Tensor) -> ModelOutputs:
        self.check_input(x)
        stages = self._decode(x)
        size = list(x.shape[2:])
        outputs = [head(s) for head, s in zip(self.heads, stages)]
        aux = [resize_to(o, size, self.mode) for o in outputs[-2::-1]]
        return {"logits": outputs[-1], "aux": aux}


@register_model("nnunet", dim=2)
def nnunet(
    in_channels: int,
    num_classes: int,
    features: Sequence[int] = (32, 64, 128, 256, 512, 512),
    strides: Sequence[IntOrSeq] = (2, 2, 2, 2, 2),
    kernel_sizes: Union[int, Sequence[IntOrSeq]] = 3,
    n_convs: int = 2,
) -> PlainConvUNet:
    """2D nnU-Net-style plain conv U-Net: features 32-512, five stride-2 stages (inputs multiple of 32).

    SSL4MIS's 2D factory builds the 3D network under this name; this is a real 2D one.
    """
    return PlainConvUNet(2, in_channels, num_classes, features, strides, kernel_sizes, n_convs)


@register_model("nnunet_3d", dim=3)
def nnunet_3d(
    in_channels: int,
    num_classes: int,
    features: Sequence[int] = (32, 64, 128, 256, 320),
    strides: Sequence[IntOrSeq] = (2, 2, 2, 2),
    kernel_sizes: Union[int, Sequence[IntOrSeq]] = 3,
    n_convs: int = 2,
) -> PlainConvUNet:
    """3D nnU-Net-style plain conv U-Net: features 32-320, four stride-2 stages (inputs multiple of 16).

    This is the topology nnU-Net plans for 96^3 and 112x112x80 patches (pool while the feature map
    is >= 8 voxels), so it accepts the patches used by the 3D methods.
    """
    return PlainConvUNet(3, in_channels, num_classes, features, strides, kernel_sizes, n_convs)
