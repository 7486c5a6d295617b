"""Surface-distance metrics: Hausdorff, HD95, (symmetric) average surface distance.

Definitions are medpy's (``medpy.metric.binary``), which SSL4MIS and most papers report:

* the surface of a mask is ``mask XOR binary_erosion(mask)`` with the connectivity-1 cross
  (6-neighbourhood in 3D), voxels outside the image counting as background, so foreground on
  the image border is surface;
* ``d(P -> G)`` are the distances, in physical units (``spacing``), from every surface voxel of P
  to the nearest surface voxel of G, read from the exact distance transform (:func:`sslseg.ops.edt`);
* ``hausdorff`` = max over ``d(P -> G)`` and ``d(G -> P)``;
  ``hd95`` = the 95th percentile (linear interpolation, as ``numpy.percentile``) of the **union**
  of both directions (medpy; MONAI's ``compute_hausdorff_distance(percentile=95)`` takes the max
  of the two directed percentiles instead, which differs when the errors are one-sided);
  ``asd`` = mean of ``d(P -> G)`` (directed, medpy's ``asd``), ``asd(symmetric=True)`` = mean of
  the union (medpy 0.5's ``assd``, MONAI's ``symmetric=True``).

Both masks are first cropped to the bounding box of their union plus one voxel (as MONAI does):
every surface voxel lies inside it, so the distances are exactly those of the whole image, at a
fraction of the cost. Empty masks follow the policy of :mod:`sslseg.metrics.result`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from sslseg.metrics.cases import Cases, resolve_cases
from sslseg.metrics.result import MetricResult, apply_policy, check_policy, image_diagonal
from sslseg.ops.edt import edt

__all__ = ["asd", "hausdorff", "hd95", "surface", "surface_distances"]


def _erode(mask: Tensor, nsp: int, outside: bool) -> Tensor:
    """Binary erosion with the connectivity-1 cross over the last ``nsp`` dims; ``outside`` is the
    value assumed beyond the image (scipy's ``border_value``)."""
    out = mask.clone()
    for a in range(nsp):
        d = mask.dim() - nsp + a
        n = mask.shape[d]
        if n > 1:
            out.narrow(d, 1, n - 1).logical_and_(mask.narrow(d, 0, n - 1))
            out.narrow(d, 0, n - 1).logical_and_(mask.narrow(d, 1, n - 1))
        if not outside:
            out.narrow(d, 0, 1).zero_()
            out.narrow(d, n - 1, 1).zero_()
    return out


def surface(mask: Tensor, spatial_dims: int | None = None, *, image_border: bool = True) -> Tensor:
    """Surface voxels of a binary mask: ``mask & ~erosion(mask)`` with the connectivity-1 cross.

    Args:
        mask: ``(*batch, *spatial)``, any dtype (nonzero = foreground).
        spatial_dims: Trailing spatial dims (2 or 3); default: all dims of a 2D/3D mask.
        image_border: True (medpy): beyond the image is background, so foreground voxels on the
            image border are surface. False (skimage's ``find_boundaries(mode="inner")``, used by
            SSL4MIS's signed distance map): beyond the image repeats the border, so only voxels
            with a background neighbour inside the image are surface.

    Returns:
        bool tensor, the shape of ``mask``.
    """
    if not isinstance(mask, Tensor):
        raise TypeError(f"surface: mask must be a Tensor, got {type(mask).__name__}")
    nsp = spatial_dims if spatial_dims is not None else mask.dim()
    if nsp not in (2, 3) or mask.dim() < nsp:
        raise ValueError(f"surface: spatial_dims must be 2 or 3 and at most mask.dim(); got spatial_dims={spatial_dims!r} "
                         f"for a mask of shape {list(mask.shape)}")
    m = mask if mask.dtype == torch.bool else mask != 0
    return m & ~_erode(m, nsp, outside=not image_border)


def _crop_to_union_np(p: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u = p | g
    slices = []
    for d in range(u.ndim):
        others = tuple(i for i in range(u.ndim) if i != d)
        idx = np.flatnonzero(u.any(axis=others) if others else u)
        slices.append(slice(max(int(idx[0]) - 1, 0), min(int(idx[-1]) + 2, u.shape[d])))
    return p[tuple(slices)], g[tuple(slices)]


def _surface_np(m: np.ndarray) -> np.ndarray:
    """numpy twin of ``surface(m)`` (medpy's border) for one mask."""
    eroded = m.copy()
    for d in range(m.ndim):
        n = m.shape[d]
        lo, hi = [slice(None)] * m.ndim, [slice(None)] * m.ndim
        lo[d], hi[d] = slice(0, n - 1), slice(1, n)
        eroded[tuple(hi)] &= m[tuple(lo)]
        eroded[tuple(lo)] &= m[tuple(hi)]
        first, last = [slice(None)] * m.ndim, [slice(None)] * m.ndim
        first[d], last[d] = 0, n - 1
        eroded[tuple(first)] = False
        eroded[tuple(last)] = False
    return m & ~eroded


def _crop_to_union(p: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Crop two non-empty masks to the bounding box of their union plus a one-voxel margin."""
    u = p | g
    slices = []
    for d in range(u.dim()):
        others = tuple(i for i in range(u.dim()) if i != d)
        idx = torch.nonzero(u.any(dim=others) if others else u).flatten()
        lo = max(int(idx[0]) - 1, 0)
        hi = min(int(idx[-1]) + 2, u.shape[d])
        slices.append(slice(lo, hi))
    return p[tuple(slices)], g[tuple(slices)]


def _case_distances(p: Tensor, g: Tensor, spacing: list[float]) -> tuple[Tensor, Tensor]:
    """d(P -> G) and d(G -> P) (float32, on the masks' device) for two non-empty bool masks."""
    if p.device.type == "cpu":
        # The mask logic of one case is a few dozen cheap passes: numpy runs them on this thread,
        # where torch's intra-op pool would pay a fork/join (milliseconds on a loaded host) each.
        pn, gn = _crop_to_union_np(p.numpy(), g.numpy())
        sp_np, sg_np = _surface_np(pn), _surface_np(gn)
        dt = edt(torch.from_numpy(np.stack([~sg_np, ~sp_np])), spacing).numpy()
        return torch.from_numpy(dt[0][sp_np]), torch.from_numpy(dt[1][sg_np])
    p, g = _crop_to_union(p, g)
    nsp = p.dim()
    sp = surface(p, nsp)
    sg = surface(g, nsp)
    # One batched transform for both directions: distances to G's surface, then to P's.
    dt = edt(torch.stack([~sg, ~sp]), spacing)
    return dt[0][sp], dt[1][sg]


def surface_distances(pred: Tensor, gt: Tensor, spacing: float | Sequence[float] | None = None) -> tuple[Tensor, Tensor]:
    """Distances from each surface voxel of ``pred`` to ``gt``'s surface, and from ``gt``'s to ``pred``'s.

    Args:
        pred: One binary mask, 2D or 3D (nonzero = foreground), not empty.
        gt: The other mask, same shape, not empty.
        spacing: Voxel size per dim (or one number); ``None`` for unit spacing.

    Returns:
        ``(d_pred_to_gt, d_gt_to_pred)``: 1D float32 tensors on the masks' device, in the order
        of the surface voxels in memory (medpy's ``__surface_distances(pred, gt)`` and
        ``(gt, pred)``).
    """
    cases = resolve_cases("surface_distances", pred, gt, spacing, None, None, False)
    if cases.pred.shape[0] != 1:
        raise ValueError(f"surface_distances: expects one 2D or 3D case, got shape {list(pred.shape)}")
    p, g = cases.masks(0, None)
    for name, m in (("pred", p), ("gt", g)):
        if not bool(m.any()):
            raise ValueError(f"surface_distances: {name} is empty: surface distances are undefined")
    return _case_distances(p, g, cases.spacing)


def _percentile_linear(x: Tensor, q: float) -> float:
    """``numpy.percentile(x, q)`` (method "linear"), with numpy's interpolation formula."""
    n = x.numel()
    pos = q / 100.0 * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    a = float(torch.kthvalue(x, lo + 1).values)
    b = float(torch.kthvalue(x, hi + 1).values) if hi != lo else a
    t = pos - lo
    diff = b - a
    return b - diff * (1.0 - t) if t >= 0.5 else a + diff * t


def _surface_metric(
    fn: str,
    reduce,
    pred: Tensor,
    gt: Tensor,
    spacing,
    num_classes: int | None,
    include_background: bool,
    spatial_dims: int | None,
    empty_policy: str,
    penalty: float | None,
) -> MetricResult:
    check_policy(fn, empty_policy)
    cases = resolve_cases(fn, pred, gt, spacing, spatial_dims, num_classes, include_background)
    if penalty is None:
        penalty = image_diagonal(cases.spatial_shape, cases.spacing)
    elif not (isinstance(penalty, (int, float)) and not isinstance(penalty, bool) and penalty >= 0):
        raise ValueError(f"{fn}: penalty must be a number >= 0 or None (image diagonal), got {penalty!r}")
    value, pred_empty, gt_empty = _per_case(cases, reduce)
    value = apply_policy(value, pred_empty, gt_empty, empty_policy, both=0.0, one=float(penalty))
    return MetricResult(value, pred_empty, gt_empty, empty_policy, fn)


def _per_case(cases: Cases, reduce) -> tuple[Tensor, Tensor, Tensor]:
    n_cls = 1 if cases.classes is None else len(cases.classes)
    n = cases.pred.shape[0]
    value = torch.zeros(n, n_cls, dtype=torch.float64)
    pred_empty = torch.zeros(n, n_cls, dtype=torch.bool)
    gt_empty = torch.zeros(n, n_cls, dtype=torch.bool)
    for i in range(n):
        for k in range(n_cls):
            p, g = cases.masks(i, None if cases.classes is None else k)
            if p.device.type == "cpu":  # see _case_distances
                pe, ge = not p.numpy().any(), not g.numpy().any()
            else:
                pe, ge = not bool(p.any()), not bool(g.any())
            pred_empty[i, k], gt_empty[i, k] = pe, ge
            if pe or ge:
                continue
            d_pg, d_gp = _case_distances(p, g, cases.spacing)
            value[i, k] = reduce(d_pg.double().cpu(), d_gp.double().cpu())
    shape = cases.out_shape
    return value.reshape(shape), pred_empty.reshape(shape), gt_empty.reshape(shape)


def hausdorff(
    pred: Tensor,
    gt: Tensor,
    spacing: float | Sequence[float] | None = None,
    *,
    percentile: float | None = None,
    num_classes: int | None = None,
    include_background: bool = False,
    spatial_dims: int | None = None,
    empty_policy: str = "penalty",
    penalty: float | None = None,
) -> MetricResult:
    """Symmetric Hausdorff distance (medpy ``hd``), or its ``percentile`` (medpy ``hd95`` for 95).

    Args:
        pred: Prediction ``(*batch, *spatial)``: binary mask (any dtype, nonzero = foreground) or,
            with ``num_classes``, an integer label map. CPU or CUDA.
        gt: Ground truth, same shape and kind.
        spacing: Voxel size per spatial dim, or one number; ``None`` = 1. A sequence's length
            gives the number of spatial dims.
        percentile: ``None`` for the maximum; else in ``[0, 100]``, the percentile of the union
            of both directed distance sets.
        num_classes: Number of classes of label maps; ``None`` for binary masks.
        include_background: Label maps only: score class 0 too.
        spatial_dims: Trailing spatial dims (2 or 3) when ``spacing`` does not say.
        empty_policy: ``"penalty"`` | ``"nan"`` | ``"zero"`` (see :mod:`sslseg.metrics.result`).
        penalty: Distance given to a case where exactly one mask is empty (``"penalty"`` policy);
            default: the image diagonal in physical units.

    Returns:
        :class:`MetricResult`, float64 values of shape ``(*batch)`` or ``(*batch, classes)``,
        in the units of ``spacing``.
    """
    if percentile is not None and not (isinstance(percentile, (int, float)) and 0 <= percentile <= 100):
        raise ValueError(f"hausdorff: percentile must be None or in [0, 100], got {percentile!r}")
    if percentile is None:
        def reduce(a: Tensor, b: Tensor) -> float:
            return max(float(a.max()), float(b.max()))
        name = "hausdorff"
    else:
        def reduce(a: Tensor, b: Tensor) -> float:
            return _percentile_linear(torch.cat([a, b]), float(percentile))
        name = "hd95" if percentile == 95 else f"hd{percentile:g}"
    return _surface_metric(name, reduce, pred, gt, spacing, num_classes, include_background, spatial_dims,
                           empty_policy, penalty)


def hd95(
    pred: Tensor,
    gt: Tensor,
    spacing: float | Sequence[float] | None = None,
    *,
    num_classes: int | None = None,
    include_background: bool = False,
    spatial_dims: int | None = None,
    empty_policy: str = "penalty",
    penalty: float | None = None,
) -> MetricResult:
    """95th percentile Hausdorff distance, as ``medpy.metric.binary.hd95(pred, gt, voxelspacing=spacing)``.

    The percentile of the union of both directed surface-distance sets; arguments as
    :func:`hausdorff`. Example::

        >>> r = sslseg.metrics.hd95(pred_labels, gt_labels, spacing=(2.5, 0.8, 0.8), num_classes=4)
        >>> r.value          # (B, 3) float64, mm
        >>> r.n_one_empty    # cases scored by the empty-mask penalty
    """
    return hausdorff(pred, gt, spacing, percentile=95, num_classes=num_classes, include_background=include_background,
                     spatial_dims=spatial_dims, empty_policy=empty_policy, penalty=penalty)


def asd(
    pred: Tensor,
    gt: Tensor,
    spacing: float | Sequence[float] | None = None,
    *,
    symmetric: bool = False,
    num_classes: int | None = None,
    include_background: bool = False,
    spatial_dims: int | None = None,
    empty_policy: str = "penalty",
    penalty: float | None = None,
) -> MetricResult:
    """Average surface distance: mean of ``d(pred -> gt)`` (medpy ``asd``, directed).

    ``symmetric=True`` gives the average symmetric surface distance: the mean over the union of
    both directions (medpy 0.5 ``assd``, MONAI ``compute_average_surface_distance(symmetric=True)``).
    Other arguments as :func:`hausdorff`.
    """
    if symmetric:
        def reduce(a: Tensor, b: Tensor) -> float:
            return float(torch.cat([a, b]).mean())
    else:
        def reduce(a: Tensor, b: Tensor) -> float:
            return float(a.mean())
    return _surface_metric("assd" if symmetric else "asd", reduce, pred, gt, spacing, num_classes, include_background,
                           spatial_dims, empty_policy, penalty)
