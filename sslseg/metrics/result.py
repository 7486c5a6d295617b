"""Metric results, and the empty-mask policy of the evaluation protocol (docs/guide/evaluation.md).

A segmentation metric is undefined when the prediction or the ground truth is empty. sslseg never
crashes and never silently returns 0 there: the case is scored by an explicit policy and counted.

================  ==========================  ==========================  =====================
``empty_policy``  both empty                  exactly one empty           use
================  ==========================  ==========================  =====================
``"penalty"``     Dice/Jaccard 1, distance 0  Dice/Jaccard 0, distance =  default: honest means
                                              ``penalty`` (image diagonal
                                              in physical units)
``"nan"``         NaN                         NaN                         exclude the case
                                                                          (``nanmean``), as
                                                                          MONAI's metrics do
``"zero"``        0                           0                           SSL4MIS's
                                                                          ``calculate_metric_percase``
================  ==========================  ==========================  =====================

Every metric returns a :class:`MetricResult` that carries, beside the values, which cases were
empty on either side, so a report can say how many cases the policy scored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["EMPTY_POLICIES", "MetricResult", "image_diagonal"]

EMPTY_POLICIES = ("penalty", "nan", "zero")


@dataclass(frozen=True)
class MetricResult:
    """Values of one metric over a batch of cases (and classes), with the empty-mask bookkeeping.

    Attributes:
        value: float64 CPU tensor, shape ``(*batch)`` for binary masks or ``(*batch, classes)``
            for label maps (classes in the order the metric lists them).
        pred_empty: bool tensor of the same shape: the prediction has no voxel of the class.
        gt_empty: bool tensor of the same shape: the ground truth has no voxel of the class.
        policy: The empty-mask policy that scored the empty cases.
        name: The metric (``"dice"``, ``"hd95"``, ...).
    """

    value: Tensor
    pred_empty: Tensor
    gt_empty: Tensor
    policy: str
    name: str

    @property
    def both_empty(self) -> Tensor:
        return self.pred_empty & self.gt_empty

    @property
    def one_empty(self) -> Tensor:
        return self.pred_empty ^ self.gt_empty

    @property
    def n_both_empty(self) -> int:
        """Number of cases (x classes) where prediction and ground truth are both empty."""
        return int(self.both_empty.sum())

    @property
    def n_one_empty(self) -> int:
        """Number of cases (x classes) where exactly one of prediction and ground truth is empty."""
        return int(self.one_empty.sum())

    @property
    def n_policy(self) -> int:
        """Number of values that the empty-mask policy decided."""
        return int((self.pred_empty | self.gt_empty).sum())

    def mean(self, dim: int | Sequence[int] | None = None) -> Tensor:
        """Mean over ``dim`` (all by default), skipping NaN (the ``"nan"`` policy's exclusions)."""
        if dim is None:
            return torch.nanmean(self.value)
        return torch.nanmean(self.value, dim=dim)

    def item(self) -> float:
        """The single value of a one-case result."""
        if self.value.numel() != 1:
            raise ValueError(f"{self.name}: item() needs a single value, the result has shape {tuple(self.value.shape)}")
        return float(self.value.reshape(()))

    def __float__(self) -> float:
        return self.item()

    def __repr__(self) -> str:
        return (f"MetricResult(name={self.name!r}, value={self.value.tolist()}, policy={self.policy!r}, "
                f"n_both_empty={self.n_both_empty}, n_one_empty={self.n_one_empty})")


def image_diagonal(spatial_shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length of the image's diagonal in physical units: ``sqrt(sum((n_i * s_i)^2))``.

    The default distance penalty when exactly one mask is empty: no distance inside the image
    reaches it (the largest voxel-centre distance is ``sqrt(sum(((n_i - 1) s_i)^2))``).
    """
    return math.sqrt(sum((n * s) ** 2 for n, s in zip(spatial_shape, spacing)))


def check_policy(fn: str, empty_policy: str) -> None:
    if empty_policy not in EMPTY_POLICIES:
        raise ValueError(f"{fn}: empty_policy must be one of {list(EMPTY_POLICIES)}, got {empty_policy!r}")


def apply_policy(
    value: Tensor, pred_empty: Tensor, gt_empty: Tensor, policy: str, *, both: float, one: float
) -> Tensor:
    """Overwrite the empty cases of ``value``: ``both``/``one`` are the penalty-policy scores."""
    both_empty = pred_empty & gt_empty
    one_empty = pred_empty ^ gt_empty
    out = value.clone()
    if policy == "penalty":
        out[both_empty] = both
        out[one_empty] = one
    elif policy == "nan":
        out[both_empty | one_empty] = math.nan
    else:  # "zero"
        out[both_empty | one_empty] = 0.0
    return out
