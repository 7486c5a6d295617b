"""Small building blocks shared by the networks: dimension-generic layer lookup, training-only
perturbations and stochastic depth. All are stock PyTorch underneath, so they script and export;
the perturbations are identities in eval mode and therefore vanish from exported graphs.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DropPath",
    "FeatureDropout",
    "FeatureNoise",
    "avg_pool_nd",
    "batch_norm_nd",
    "conv_nd",
    "conv_transpose_nd",
    "dropout_nd",
    "instance_norm_nd",
    "interp_mode",
    "max_pool_nd",
    "resize_to",
]


def _pick(dim: int, two: type, three: type) -> type:
    if dim == 2:
        return two
    if dim == 3:
        return three
    raise ValueError(f"dim must be 2 or 3, got {dim!r}")


def conv_nd(dim: int) -> type[nn.Module]:
    """``nn.Conv2d`` or ``nn.Conv3d``."""
    return _pick(dim, nn.Conv2d, nn.Conv3d)


def conv_transpose_nd(dim: int) -> type[nn.Module]:
    """``nn.ConvTranspose2d`` or ``nn.ConvTranspose3d``."""
    return _pick(dim, nn.ConvTranspose2d, nn.ConvTranspose3d)


def batch_norm_nd(dim: int) -> type[nn.Module]:
    """``nn.BatchNorm2d`` or ``nn.BatchNorm3d``."""
    return _pick(dim, nn.BatchNorm2d, nn.BatchNorm3d)


def instance_norm_nd(dim: int) -> type[nn.Module]:
    """``nn.InstanceNorm2d`` or ``nn.InstanceNorm3d``."""
    return _pick(dim, nn.InstanceNorm2d, nn.InstanceNorm3d)


def max_pool_nd(dim: int) -> type[nn.Module]:
    """``nn.MaxPool2d`` or ``nn.MaxPool3d``."""
    return _pick(dim, nn.MaxPool2d, nn.MaxPool3d)


def avg_pool_nd(dim: int) -> type[nn.Module]:
    """``nn.AdaptiveAvgPool2d`` or ``nn.AdaptiveAvgPool3d``."""
    return _pick(dim, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


def dropout_nd(dim: int) -> type[nn.Module]:
    """Channel-wise dropout: ``nn.Dropout2d`` or ``nn.Dropout3d``."""
    return _pick(dim, nn.Dropout2d, nn.Dropout3d)


def interp_mode(dim: int) -> str:
    """The linear interpolation mode for ``dim`` spatial axes."""
    return "bilinear" if dim == 2 else "trilinear"


def resize_to(x: Tensor, size: List[int], mode: str) -> Tensor:
    """Resize ``x`` to spatial ``size`` (no-op when it already has it)."""
    if list(x.shape[2:]) == size:
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode=mode)
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


class FeatureNoise(nn.Module):
    """Multiplicative uniform noise ``x * (1 + eps)``, ``eps ~ U(-magnitude, magnitude)``, training only.

    One noise tensor of shape ``x.shape[1:]`` is drawn per call and shared across the batch, as in
    URPC/CCT (SSL4MIS ``FeatureNoise``).

    Args:
        magnitude: Half-width of the uniform distribution.
    """

    def __init__(self, magnitude: float = 0.3) -> None:
        super().__init__()
        self.magnitude = float(magnitude)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.magnitude == 0.0:
            return x
        noise = (torch.rand(x.shape[1:], dtype=x.dtype, device=x.device) * 2.0 - 1.0) * self.magnitude
        return x + x * noise.unsqueeze(0)

    def extra_repr(self) -> str:
        return f"magnitude={self.magnitude}"


class FeatureDropout(nn.Module):
    """Drop the most activated positions, training only (URPC/CCT "feature dropout").

    The channel mean gives an attention map; every position whose attention reaches
    ``factor * max`` (per sample) is zeroed, with one ``factor ~ U(low, high)`` per call. SSL4MIS
    draws the factor from NumPy's RNG; here it comes from torch's, so seeding torch suffices.

    Args:
        low: Lower bound of the threshold factor.
        high: Upper bound of the threshold factor.
    """

    def __init__(self, low: float = 0.7, high: float = 0.9) -> None:
        super().__init__()
        self.low = float(low)
        self.high = float(high)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        attention = x.mean(dim=1, keepdim=True)
        max_val = attention.flatten(1).amax(dim=1)
        factor = torch.rand(1, dtype=x.dtype, device=x.device) * (self.high - self.low) + self.low
        shape: List[int] = [x.shape[0]] + [1] * (x.dim() - 1)
        threshold = (max_val * factor).reshape(shape)
        return x * (attention < threshold).to(x.dtype)

    def extra_repr(self) -> str:
        return f"low={self.low}, high={self.high}"


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch per sample with probability ``p``, training only.

    Args:
        p: Drop probability.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        shape: List[int] = [x.shape[0]] + [1] * (x.dim() - 1)
        mask = (torch.rand(shape, dtype=x.dtype, device=x.device) < keep).to(x.dtype)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"
