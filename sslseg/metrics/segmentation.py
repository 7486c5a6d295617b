"""All the metrics of a case set in one pass: each case's surface distances are computed once."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sslseg.metrics.cases import resolve_cases
from sslseg.metrics.overlap import _counts
from sslseg.metrics.result import MetricResult, apply_policy, check_policy, image_diagonal
from sslseg.metrics.surface import _case_distances, _percentile_linear

__all__ = ["METRICS", "segmentation_metrics"]

METRICS = ("dice", "jaccard", "hd95", "asd", "assd", "hausdorff")
_DISTANCE = {
    "hd95": lambda a, b: _percentile_linear(torch.cat([a, b]), 95.0),
    "asd": lambda a, b: float(a.mean()),
    "assd": lambda a, b: float(torch.cat([a, b]).mean()),
    "hausdorff": lambda a, b: max(float(a.max()), float(b.max())),
}


def segmentation_metrics(
    pred: Tensor,
    gt: Tensor,
    spacing: float | Sequence[float] | None = None,
    *,
    metrics: Sequence[str] = ("dice", "jaccard", "hd95", "asd"),
    num_classes: int | None = None,
    include_background: bool = False,
    spatial_dims: int | None = None,
    empty_policy: str = "penalty",
    penalty: float | None = None,
) -> dict[str, MetricResult]:
    """Several metrics at once (SSL4MIS's test set is Dice, Jaccard, HD95, ASD), sharing the work.

    Arguments as :func:`sslseg.metrics.hausdorff`; ``metrics`` names any of
    ``dice, jaccard, hd95, asd, assd, hausdorff``. Returns ``{name: MetricResult}`` with the
    values each single-metric function returns.
    """
    fn = "segmentation_metrics"
    check_policy(fn, empty_policy)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"{fn}: metrics must be a non-empty subset of {list(METRICS)}, got {list(metrics)}")
    cases = resolve_cases(fn, pred, gt, spacing, spatial_dims, num_classes, include_background)
    inter, ps, gs = (t.double() for t in _counts(cases))
    pred_empty, gt_empty = ps == 0, gs == 0
    out: dict[str, MetricResult] = {}
    if "dice" in metrics:
        v = apply_policy(2.0 * inter / (ps + gs), pred_empty, gt_empty, empty_policy, both=1.0, one=0.0)
        out["dice"] = MetricResult(v, pred_empty, gt_empty, empty_policy, "dice")
    if "jaccard" in metrics:
        v = apply_policy(inter / (ps + gs - inter), pred_empty, gt_empty, empty_policy, both=1.0, one=0.0)
        out["jaccard"] = MetricResult(v, pred_empty, gt_empty, empty_policy, "jaccard")
    dist = [m for m in metrics if m in _DISTANCE]
    if dist:
        if penalty is None:
            penalty = image_diagonal(cases.spatial_shape, cases.spacing)
        n_cls = 1 if cases.classes is None else len(cases.classes)
        flat_pe, flat_ge = pred_empty.reshape(-1, n_cls), gt_empty.reshape(-1, n_cls)
        values = {m: torch.zeros(flat_pe.shape, dtype=torch.float64) for m in dist}
        for i in range(flat_pe.shape[0]):
            for k in range(n_cls):
                if bool(flat_pe[i, k]) or bool(flat_ge[i, k]):
                    continue
                p, g = cases.masks(i, None if cases.classes is None else k)
                a, b = (d.double().cpu() for d in _case_distances(p, g, cases.spacing))
                for m in dist:
                    values[m][i, k] = _DISTANCE[m](a, b)
        for m in dist:
            v = apply_policy(values[m].reshape(pred_empty.shape), pred_empty, gt_empty, empty_policy,
                             both=0.0, one=float(penalty))
            out[m] = MetricResult(v, pred_empty, gt_empty, empty_policy, m)
    return out
