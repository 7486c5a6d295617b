"""Overlap metrics: Dice and Jaccard, per case and class, with the empty-mask policy."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from sslseg.metrics.cases import Cases, resolve_cases
from sslseg.metrics.result import MetricResult, apply_policy, check_policy

__all__ = ["dice", "jaccard"]


def _counts(cases: Cases) -> tuple[Tensor, Tensor, Tensor]:
    """|P & G|, |P|, |G| per case (and class), int64 on CPU, shape ``cases.out_shape``."""
    n = cases.pred.shape[0]
    p = cases.pred.reshape(n, -1)
    g = cases.gt.reshape(n, -1)
    if p.device.type == "cpu":
        # numpy counts on this thread: torch's intra-op pool costs a fork/join per op, which on a
        # loaded host dominates these few cheap passes (see surface._case_distances).
        pn, gn = p.numpy(), g.numpy()
        labels = [None] if cases.classes is None else cases.classes
        counts = np.zeros((3, n, len(labels)), dtype=np.int64)
        for k, c in enumerate(labels):
            pb, gb = (pn != 0, gn != 0) if c is None else (pn == c, gn == c)
            counts[0, :, k] = np.count_nonzero(pb & gb, axis=1)
            counts[1, :, k] = np.count_nonzero(pb, axis=1)
            counts[2, :, k] = np.count_nonzero(gb, axis=1)
        shape = cases.out_shape
        return tuple(torch.from_numpy(c).reshape(shape) for c in counts)  # type: ignore[return-value]
    if cases.classes is None:
        pb, gb = p != 0, g != 0
        inter, ps, gs = (pb & gb).sum(1), pb.sum(1), gb.sum(1)
    else:
        per = []
        for c in cases.classes:
            pb, gb = p == c, g == c
            per.append(torch.stack([(pb & gb).sum(1), pb.sum(1), gb.sum(1)]))
        inter, ps, gs = torch.stack(per, dim=-1).unbind(0)
    shape = cases.out_shape
    return inter.cpu().reshape(shape), ps.cpu().reshape(shape), gs.cpu().reshape(shape)


def _overlap(fn: str, pred, gt, num_classes, include_background, spatial_dims, empty_policy) -> MetricResult:
    check_policy(fn, empty_policy)
    cases = resolve_cases(fn, pred, gt, None if spatial_dims is None else [1.0] * spatial_dims, spatial_dims,
                          num_classes, include_background)
    inter, ps, gs = _counts(cases)
    inter, ps, gs = inter.double(), ps.double(), gs.double()
    if fn == "dice":
        value = 2.0 * inter / (ps + gs)
    else:
        value = inter / (ps + gs - inter)
    pred_empty, gt_empty = ps == 0, gs == 0
    value = apply_policy(value, pred_empty, gt_empty, empty_policy, both=1.0, one=0.0)
    return MetricResult(value, pred_empty, gt_empty, empty_policy, fn)


def dice(
    pred: Tensor,
    gt: Tensor,
    *,
    num_classes: int | None = None,
    include_background: bool = False,
    spatial_dims: int | None = None,
    empty_policy: str = "penalty",
) -> MetricResult:
    """Dice coefficient ``2 |P & G| / (|P| + |G|)`` per case (and class).

    Args:
        pred: Prediction, ``(*batch, *spatial)``: a binary mask (any dtype, nonzero = foreground)
            or, with ``num_classes``, an integer label map. Any device.
        gt: Ground truth, same shape and kind as ``pred``.
        num_classes: Number of classes of label maps; ``None`` for binary masks.
        include_background: Label maps only: score class 0 too (default: classes ``1..C-1``).
        spatial_dims: Trailing spatial dims (2 or 3); default: all dims of a 2D/3D input.
        empty_policy: ``"penalty"`` (both empty -> 1, one empty -> 0), ``"nan"`` or ``"zero"``;
            see :mod:`sslseg.metrics.result`.

    Returns:
        :class:`MetricResult` with float64 values of shape ``(*batch)`` or ``(*batch, classes)``.
        Equal to medpy's ``dc`` on non-empty cases.
    """
    return _overlap("dice", pred, gt, num_classes, include_background, spatial_dims, empty_policy)


def jaccard(
    pred: Tensor,
    gt: Tensor,
    *,
    num_classes: int | None = None,
    include_background: bool = False,
    spatial_dims: int | None = None,
    empty_policy: str = "penalty",
) -> MetricResult:
    """Jaccard index ``|P & G| / |P | G|`` per case (and class); arguments as :func:`dice`."""
    return _overlap("jaccard", pred, gt, num_classes, include_background, spatial_dims, empty_policy)
