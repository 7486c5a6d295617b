"""Discriminators for the adversarial method (DAN), after SSL4MIS ``networks/discriminator.py``:
``discriminator`` (2D) and ``discriminator_3d``.

Output contract (different from the segmentation networks): ``forward(probs, image)`` takes the
softmax map ``(B, num_classes, *spatial)`` and the image ``(B, in_channels, *spatial)`` and returns
``(B, num_outputs)`` logits (2 by default: class 1 = "labeled", 0 = "unlabeled", trained with
cross-entropy). ``dim`` is set as on the segmentation networks; ``min_size`` is the smallest
spatial size accepted (16: four stride-2 convs must leave at least one voxel).
"""

from __future__ import annotations

from typing import List

import torch
from torch import Tensor, nn

from ._layers import avg_pool_nd, conv_nd, dropout_nd
from ._registry import register_model

__all__ = ["Discriminator"]


class Discriminator(nn.Module):
    """Fully convolutional discriminator with global average pooling, 2D or 3D.

    The probability map and the image each go through a k4 s2 conv to ``ndf`` channels; the two
    are summed, then three k4 s2 convs (``2*ndf``, ``4*ndf``, ``8*ndf``) with LeakyReLU(0.2) and
    channel dropout(0.5), global average pooling and a linear layer.

    Differences from SSL4MIS: global pooling replaces ``AvgPool2d(7)`` / ``AvgPool3d(6)`` + flatten,
    so any input of at least 16 per axis works (SSL4MIS: only 256x256 and 96^3). In 3D this is the
    same function at 96^3 and the same parameter count (11,024,386 at 2 classes); in 2D the linear
    layer shrinks from 2048 to 512 inputs (2,759,682 instead of 2,762,754 parameters at 4 classes).
    The 2D/3D activation placement of SSL4MIS is kept: in 2D the summed input branches are not
    activated and dropout follows the second and third convs; in 3D LeakyReLU + dropout follow the
    sum and the second and third convs.

    Args:
        dim: 2 or 3.
        in_channels: Image channels.
        num_classes: Channels of the probability map.
        ndf: Width of the first layer.
        num_outputs: Logits per sample.
        dropout: Channel-dropout probability.
    """

    def __init__(
        self, dim: int, in_channels: int, num_classes: int, ndf: int = 64, num_outputs: int = 2, dropout: float = 0.5
    ) -> None:
        super().__init__()
        if ndf < 1 or num_outputs < 1:
            raise ValueError(f"Discriminator: ndf and num_outputs must be positive, got {ndf}, {num_outputs}")
        conv = conv_nd(dim)
        self.dim = dim
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.min_size = 16
        self._model_name = type(self).__name__
        self.prob_conv = conv(num_classes, ndf, 4, stride=2, padding=1)
        self.image_conv = conv(in_channels, ndf, 4, stride=2, padding=1)
        act_input = dim == 3
        self.input_act = nn.Sequential(nn.LeakyReLU(0.2), dropout_nd(dim)(dropout)) if act_input else nn.Identity()
        layers: List[nn.Module] = []
        for i, (c_in, c_out) in enumerate([(ndf, 2 * ndf), (2 * ndf, 4 * ndf), (4 * ndf, 8 * ndf)]):
            layers += [conv(c_in, c_out, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            if i < 2:
                layers.append(dropout_nd(dim)(dropout))
        self.features = nn.Sequential(*layers)
        self.pool = avg_pool_nd(dim)(1)
        self.classifier = nn.Linear(8 * ndf, num_outputs)

    def forward(self, probs: Tensor, image: Tensor) -> Tensor:
        """Logits ``(B, num_outputs)`` for a probability map and its image (same batch and spatial size)."""
        if probs.dim() != self.dim + 2 or image.dim() != self.dim + 2:
            raise ValueError(
                f"{self._model_name}: probs and image must have {self.dim} spatial axes, "
                f"got shapes {list(probs.shape)} and {list(image.shape)}"
            )
        if probs.shape[1] != self.num_classes or image.shape[1] != self.in_channels:
            raise ValueError(
                f"{self._model_name}: expected probs with {self.num_classes} and image with {self.in_channels} "
                f"channel(s), got shapes {list(probs.shape)} and {list(image.shape)}"
            )
        if probs.shape[0] != image.shape[0] or probs.shape[2:] != image.shape[2:]:
            raise ValueError(
                f"{self._model_name}: probs and image must share batch and spatial sizes, "
                f"got shapes {list(probs.shape)} and {list(image.shape)}"
            )
        if min(probs.shape[2:]) < self.min_size:
            raise ValueError(
                f"{self._model_name}: each spatial size must be >= {self.min_size}, got {list(probs.shape[2:])}"
            )
        x = self.input_act(self.prob_conv(probs) + self.image_conv(image))
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


@register_model("discriminator", dim=2, task="discriminator")
def discriminator(
    in_channels: int, num_classes: int, ndf: int = 64, num_outputs: int = 2, dropout: float = 0.5
) -> Discriminator:
    """2D DAN discriminator on (softmax map, image) with global pooling; ``forward(probs, image) -> (B, 2)``."""
    return Discriminator(2, in_channels, num_classes, ndf, num_outputs, dropout)


@register_model("discriminator_3d", dim=3, task="discriminator")
def discriminator_3d(
    in_channels: int, num_classes: int, ndf: int = 64, num_outputs: int = 2, dropout: float = 0.5
) -> Discriminator:
    """3D DAN discriminator on (softmax map, image) with global pooling; ``forward(probs, image) -> (B, 2)``."""
    return Discriminator(3, in_channels, num_classes, ndf, num_outputs, dropout)
