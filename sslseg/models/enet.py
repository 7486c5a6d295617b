"""ENet (Paszke et al., 2016) as in SSL4MIS ``networks/enet.py`` (the standard PyTorch port):
``enet``.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import SegmentationModel
from ._registry import register_model

__all__ = ["ENet"]


def _act(prelu: bool) -> nn.Module:
    return nn.PReLU() if prelu else nn.ReLU()


def _conv_bn_act(conv: nn.Module, channels: int, prelu: bool, act: bool = True) -> nn.Sequential:
    layers: List[nn.Module] = [conv, nn.BatchNorm2d(channels)]
    if act:
        layers.append(_act(prelu))
    return nn.Sequential(*layers)


class InitialBlock(nn.Module):
    """``cat([conv3x3 s2 (16 - in_channels filters), maxpool3 s2 of the input])`` -> BN -> act."""

    def __init__(self, in_channels: int, out_channels: int, prelu: bool) -> None:
        super().__init__()
        self.main = nn.Conv2d(in_channels, out_channels - in_channels, 3, stride=2, padding=1, bias=False)
        self.ext = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = _act(prelu)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(torch.cat([self.main(x), self.ext(x)], dim=1)))


class RegularBottleneck(nn.Module):
    """Residual bottleneck (internal ratio 4): 1x1 -> 3x3 (regular / dilated / asymmetric kxk) -> 1x1."""

    def __init__(
        self,
        channels: int,
        prelu: bool,
        dropout: float,
        kernel_size: int = 3,
        dilation: int = 1,
        asymmetric: bool = False,
    ) -> None:
        super().__init__()
        inner = channels // 4
        pad = (kernel_size // 2) * dilation
        self.conv1 = _conv_bn_act(nn.Conv2d(channels, inner, 1, bias=False), inner, prelu)
        if asymmetric:
            self.conv2 = nn.Sequential(
                _conv_bn_act(nn.Conv2d(inner, inner, (kernel_size, 1), padding=(pad, 0), bias=False), inner, prelu),
                _conv_bn_act(nn.Conv2d(inner, inner, (1, kernel_size), padding=(0, pad), bias=False), inner, prelu),
            )
        else:
            self.conv2 = _conv_bn_act(
                nn.Conv2d(inner, inner, kernel_size, padding=pad, dilation=dilation, bias=False), inner, prelu
            )
        self.conv3 = _conv_bn_act(nn.Conv2d(inner, channels, 1, bias=False), channels, prelu)
        self.dropout = nn.Dropout2d(dropout)
        self.act = _act(prelu)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.dropout(self.conv3(self.conv2(self.conv1(x)))))


class DownsamplingBottleneck(nn.Module):
    """Max-pool (keeping the indices) + zero channel padding, added to a 2x2 s2 -> 3x3 -> 1x1 branch."""

    def __init__(self, in_channels: int, out_channels: int, prelu: bool, dropout: float) -> None:
        super().__init__()
        inner = in_channels // 4
        self.extra_channels = out_channels - in_channels
        self.conv1 = _conv_bn_act(nn.Conv2d(in_channels, inner, 2, stride=2, bias=False), inner, prelu)
        self.conv2 = _conv_bn_act(nn.Conv2d(inner, inner, 3, padding=1, bias=False), inner, prelu)
        self.conv3 = _conv_bn_act(nn.Conv2d(inner, out_channels, 1, bias=False), out_channels, prelu)
        self.dropout = nn.Dropout2d(dropout)
        self.act = _act(prelu)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        main, indices = F.max_pool2d_with_indices(x, 2, 2)
        # Zero channels appended to the pooled input (SSL4MIS allocates them with .cuda() when needed).
        main = F.pad(main, [0, 0, 0, 0, 0, self.extra_channels])
        ext = self.dropout(self.conv3(self.conv2(self.conv1(x))))
        return self.act(main + ext), indices


class UpsamplingBottleneck(nn.Module):
    """1x1 conv + max-unpool with the encoder's indices, added to a 1x1 -> 2x2 s2 transposed -> 1x1 branch."""

    def __init__(self, in_channels: int, out_channels: int, prelu: bool, dropout: float) -> None:
        super().__init__()
        inner = in_channels // 4
        self.main_conv = _conv_bn_act(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), out_channels, prelu, act=False
        )
        self.conv1 = _conv_bn_act(nn.Conv2d(in_channels, inner, 1, bias=False), inner, prelu)
        self.tconv = _conv_bn_act(nn.ConvTranspose2d(inner, inner, 2, stride=2, bias=False), inner, prelu)
        self.conv2 = _conv_bn_act(nn.Conv2d(inner, out_channels, 1, bias=False), out_channels, prelu, act=False)
        self.dropout = nn.Dropout2d(dropout)
        self.act = _act(prelu)

    def forward(self, x: Tensor, indices: Tensor, size: List[int]) -> Tensor:
        # F.max_unpool2d (not nn.MaxUnpool2d, which does not script) is exported to ONNX MaxUnpool.
        main = F.max_unpool2d(self.main_conv(x), indices, 2, 2, output_size=size)
        ext = self.dropout(self.conv2(self.tconv(self.conv1(x))))
        return self.act(main + ext)


class ENet(SegmentationModel):
    """ENet: an efficient encoder-decoder with max-unpooling, three 2x downsamplings.

    Encoder (PReLU): initial block to 16 channels; stage 1: downsampling bottleneck to 64 + four
    regular ones (dropout 0.01); stages 2 and 3 (dropout 0.1): [downsampling to 128 in stage 2],
    regular, dilated 2, asymmetric 5, dilated 4, regular, dilated 8, asymmetric 5, dilated 16.
    Decoder (ReLU): upsampling bottleneck to 64 + two regular, upsampling to 16 + one regular, and a
    3x3 s2 transposed conv to the classes. ``forward_all`` returns ``{"logits"}`` only.

    Args:
        in_channels: Input channels (fewer than 16: the initial block concatenates a
            ``16 - in_channels``-filter conv with the pooled input).
        num_classes: Output classes.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        if in_channels >= 16:
            raise ValueError(
                f"ENet: in_channels must be < 16 (the initial block has 16 - in_channels filters), got {in_channels}"
            )
        super().__init__(dim=2, in_channels=in_channels, num_classes=num_classes, size_divisor=8)
        enc, dec = True, False  # PReLU in the encoder, ReLU in the decoder (ENet defaults)
        self.initial = InitialBlock(in_channels, 16, enc)
        self.down1 = DownsamplingBottleneck(16, 64, enc, 0.01)
        self.stage1 = nn.Sequential(*[RegularBottleneck(64, enc, 0.01) for _ in range(4)])
        self.down2 = DownsamplingBottleneck(64, 128, enc, 0.1)
        self.stage2 = self._middle_stage(enc)
        self.stage3 = self._middle_stage(enc)
        self.up4 = UpsamplingBottleneck(128, 64, dec, 0.1)
        self.stage4 = nn.Sequential(RegularBottleneck(64, dec, 0.1), RegularBottleneck(64, dec, 0.1))
        self.up5 = UpsamplingBottleneck(64, 16, dec, 0.1)
        self.stage5 = RegularBottleneck(16, dec, 0.1)
        self.out = nn.ConvTranspose2d(16, num_classes, 3, stride=2, padding=1, bias=False)

    @staticmethod
    def _middle_stage(prelu: bool) -> nn.Sequential:
        def block(**kw: object) -> RegularBottleneck:
            return RegularBottleneck(128, prelu, 0.1, **kw)  # type: ignore[arg-type]

        return nn.Sequential(
            block(),
            block(dilation=2),
            block(kernel_size=5, asymmetric=True),
            block(dilation=4),
            block(),
            block(dilation=8),
            block(kernel_size=5, asymmetric=True),
            block(dilation=16),
        )

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        x1 = self.initial(x)
        x2, indices1 = self.down1(x1)
        x2 = self.stage1(x2)
        x3, indices2 = self.down2(x2)
        x3 = self.stage3(self.stage2(x3))
        y = self.stage4(self.up4(x3, indices2, list(x2.shape[2:])))
        y = self.stage5(self.up5(y, indices1, list(x1.shape[2:])))
        return self.out(y, output_size=list(x.shape[2:]))


@register_model("enet", dim=2)
def enet(in_channels: int, num_classes: int) -> ENet:
    """ENet (SSL4MIS ``enet``): light encoder-decoder with max-unpooling; 349,284 parameters at 4 classes."""
    return ENet(in_channels, num_classes)
