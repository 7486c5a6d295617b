"""Exact Euclidean distance transform (EDT) of binary masks, batched, with voxel spacing.

``edt(mask, spacing)`` is the function ``scipy.ndimage.distance_transform_edt(mask, sampling=spacing)``
computes, for a batch of 2D or 3D masks at once, on CPU (threads over lines) or CUDA, in float32.
The algorithm is separable and linear time: a scan along one axis gives squared 1D distances,
then Felzenszwalb & Huttenlocher's lower envelope of parabolas solves each line of every other
axis. Distance maps built on it live in :mod:`sslseg.losses` (signed distance maps, boundary and
Hausdorff losses) and :mod:`sslseg.metrics` (HD95, ASD, Hausdorff).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from sslseg.ops._loader import backend_for, has_ops

__all__ = ["edt"]

_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
# Mirrors edt_detail::kMaxFloatSize in csrc/ops/edt.h.
_MAX_FLOAT_SIZE = 2048


def edt(
    mask: Tensor,
    spacing: float | Sequence[float] | None = None,
    *,
    spatial_dims: int | None = None,
) -> Tensor:
    """Euclidean distance from every nonzero voxel to the nearest zero voxel (0 on zeros).

    Args:
        mask: ``(*batch, H, W)`` or ``(*batch, D, H, W)`` tensor of dtype bool or any integer type;
            nonzero is foreground. Any layout (non-contiguous input is copied). CPU or CUDA.
        spacing: Physical size of a voxel along each spatial dim: a sequence with one entry per
            spatial dim (its length then says how many trailing dims are spatial), or one number
            for all of them. ``None`` is unit spacing (distances in voxels).
        spatial_dims: Number of trailing spatial dims, 2 or 3, when ``spacing`` does not give it.
            When neither does, every dim of a 2D or 3D ``mask`` is spatial (as in scipy), and a
            mask of any other rank is an error.

    Returns:
        float32 tensor with the shape and device of ``mask``. Every leading (batch) index is
        transformed independently. Values equal scipy's to float32 rounding (exact, ties included,
        when the spacing is isotropic; float64 internally otherwise).

        A batch element without any zero voxel (an all-foreground mask) has no background to
        measure to: its distances are ``+inf`` (scipy returns distances to a phantom background
        point just outside the array instead). An all-zero mask gives all zeros.

    The transform is not differentiable: the input is a mask (bool/integer), and the result
    never requires grad. Differentiable losses built on it (``sslseg.losses``) treat the
    distance maps as constants.

    Example:
        >>> m = torch.zeros(2, 64, 64, 40, dtype=torch.bool); m[:, 20:40, 20:40, 10:30] = True
        >>> d = sslseg.ops.edt(m, spacing=(0.8, 0.8, 2.5))   # (2, 64, 64, 40) float32, in mm
    """
    if not isinstance(mask, Tensor):
        raise TypeError(f"edt: mask must be a Tensor, got {type(mask).__name__}")
    sp = _resolve_spacing(mask, spacing, spatial_dims)
    if mask.dtype not in _MASK_DTYPES:
        raise TypeError(
            f"edt: mask must be bool or an integer dtype (nonzero = foreground), got {mask.dtype}; "
            "threshold a float tensor first, e.g. edt(prob > 0.5)"
        )
    if backend_for() == "compiled":
        return torch.ops.sslseg.edt.default(mask, sp)
    return _reference(mask, sp)


def _resolve_spacing(mask: Tensor, spacing: float | Sequence[float] | None, spatial_dims: int | None) -> list[float]:
    """The per-spatial-dim spacing list the op takes; validates the arguments (ValueError/TypeError)."""
    if spatial_dims is not None and (isinstance(spatial_dims, bool) or spatial_dims not in (2, 3)):
        raise ValueError(f"edt: spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if spacing is None or isinstance(spacing, (int, float)) and not isinstance(spacing, bool):
        nsp = spatial_dims
        if nsp is None:
            if mask.dim() not in (2, 3):
                raise ValueError(
                    f"edt: cannot tell the spatial dims of a mask of shape {tuple(mask.shape)}: pass spatial_dims=2 or 3, "
                    "or a spacing sequence with one entry per spatial dim"
                )
            nsp = mask.dim()
        values = [1.0 if spacing is None else float(spacing)] * nsp
    elif isinstance(spacing, (Sequence, Tensor)) and not isinstance(spacing, str):
        values = [float(s) for s in spacing]
        if len(values) not in (2, 3):
            raise ValueError(f"edt: spacing must have 2 or 3 entries (one per spatial dim), got {len(values)}")
        if spatial_dims is not None and spatial_dims != len(values):
            raise ValueError(f"edt: spatial_dims={spatial_dims} disagrees with the {len(values)} entries of spacing")
    else:
        raise TypeError(f"edt: spacing must be None, a number or a sequence of numbers, got {type(spacing).__name__}")
    for i, s in enumerate(values):
        if not (math.isfinite(s) and s > 0.0):
            raise ValueError(f"edt: spacing[{i}] must be finite and > 0, got {s}")
    if mask.dim() < len(values):
        raise ValueError(
            f"edt: mask must have at least {len(values)} dims (batch dims, then {len(values)} spatial dims), "
            f"got shape {tuple(mask.shape)}"
        )
    return values


# ---- the reference twin, and the fake kernel ----------------------------------------------------


def _check(mask: Tensor, spacing: list[float]) -> None:
    """The checks of the compiled kernel (csrc/ops/edt.cpp), with the same messages."""
    nsp = len(spacing)
    if nsp not in (2, 3):
        raise RuntimeError(f"edt: spacing must have 2 or 3 entries (one per spatial dim), got {nsp}")
    if mask.dim() < nsp:
        raise RuntimeError(
            f"edt: mask must have at least {nsp} dims (batch dims, then {nsp} spatial dims), got shape {list(mask.shape)}"
        )
    if mask.dtype not in _MASK_DTYPES:
        raise RuntimeError(f"edt: mask must be bool or an integer dtype (nonzero = foreground), got {mask.dtype}")
    for i, s in enumerate(spacing):
        if not (math.isfinite(s) and s > 0.0):
            raise RuntimeError(f"edt: spacing[{i}] must be finite and > 0, got {s}")


def _use_float(spatial: Sequence[int], spacing: list[float]) -> bool:
    """edt_use_float of the kernel: exact float32 arithmetic in voxel units."""
    return all(s == spacing[0] for s in spacing) and all(n <= _MAX_FLOAT_SIZE for n in spatial)


def _lower_envelope_1d(f: Tensor, h: float) -> Tensor:
    """``out[..., y] = min_p f[..., p] + ((y - p) * h)^2`` along the last dim, by brute force.

    The value the kernel's parabola envelope computes, in the same dtype with the same
    rounding per term; O(n^2) per line, in chunks of lines to bound memory.
    """
    n = f.shape[-1]
    idx = torch.arange(n, device=f.device, dtype=f.dtype)
    step = (idx[:, None] - idx[None, :]) * h
    sq = step * step  # (y, p)
    rows = f.reshape(-1, n)
    out = torch.empty_like(rows)
    chunk = max(1, (1 << 22) // max(n * n, 1))
    for r0 in range(0, rows.shape[0], chunk):
        block = rows[r0 : r0 + chunk]
        out[r0 : r0 + chunk] = (block[:, None, :] + sq[None]).amin(dim=-1)
    return out.reshape(f.shape)


def _reference(mask: Tensor, spacing: list[float]) -> Tensor:
    """Pure-PyTorch twin of the kernel: same checks, passes, working dtype and final rounding.

    Pass 1 (the kernel's scan along Y) is the same min-plus problem with f = 0 on zeros and
    +inf elsewhere; each later pass is the envelope along one axis, solved by brute
    force. Slow (quadratic per line): for tests and for the fallback when the extension is absent.
    """
    _check(mask, spacing)
    nsp = len(spacing)
    if mask.numel() == 0:
        return torch.empty(mask.shape, dtype=torch.float32, device=mask.device)
    spatial = tuple(mask.shape[-nsp:])
    fp = _use_float(spatial, spacing)
    wdtype = torch.float32 if fp else torch.float64
    h = [1.0] * nsp if fp else list(spacing)
    f = torch.where(mask != 0, torch.tensor(math.inf, dtype=wdtype, device=mask.device),
                    torch.tensor(0.0, dtype=wdtype, device=mask.device))
    # Same order as the kernel: the scan along Y (the second-to-last dim), then X, then Z.
    for axis in (nsp - 2, nsp - 1, *range(nsp - 3, -1, -1)):
        dim = mask.dim() - nsp + axis
        g = f.movedim(dim, -1)
        f = _lower_envelope_1d(g.contiguous(), h[axis]).movedim(-1, dim)
    if fp:
        return (torch.sqrt(f.double()) * spacing[-1]).float()
    return torch.sqrt(f).float()


if has_ops():

    @torch.library.register_fake("sslseg::edt")
    def _edt_fake(mask: Tensor, spacing: list[float]) -> Tensor:
        torch._check(len(spacing) in (2, 3), lambda: "edt: spacing must have 2 or 3 entries")
        torch._check(mask.dim() >= len(spacing), lambda: "edt: mask has fewer dims than spacing entries")
        return torch.empty(mask.shape, dtype=torch.float32, device=mask.device)
