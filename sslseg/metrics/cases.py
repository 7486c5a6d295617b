"""How metric inputs become cases: binary masks or label maps, batch dims, spatial dims, spacing.

* Binary mode (``num_classes=None``): ``pred`` and ``gt`` are masks of any dtype, nonzero is
  foreground (as medpy reads them). One value per batch index.
* Label mode (``num_classes=C``): integer label maps with values in ``[0, C)``. One value per batch
  index and class; classes ``1..C-1`` (``0..C-1`` with ``include_background=True``).

The trailing spatial dims are ``len(spacing)`` when ``spacing`` is a sequence, else
``spatial_dims``, else every dim of a 2D or 3D input (a single case, as medpy takes it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Cases", "resolve_cases"]

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


@dataclass(frozen=True)
class Cases:
    """Normalised metric inputs."""

    pred: Tensor  # (N, *spatial): binary masks (any dtype) or label maps
    gt: Tensor
    batch_shape: tuple[int, ...]
    spatial_shape: tuple[int, ...]
    spacing: list[float]
    classes: list[int] | None  # None: binary mode

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.batch_shape if self.classes is None else (*self.batch_shape, len(self.classes))

    def masks(self, n: int, class_index: int | None) -> tuple[Tensor, Tensor]:
        """Binary (bool) prediction and ground truth of case ``n`` (and class ``classes[class_index]``)."""
        p, g = self.pred[n], self.gt[n]
        if self.classes is None:
            return (p if p.dtype == torch.bool else p != 0), (g if g.dtype == torch.bool else g != 0)
        c = self.classes[class_index]  # type: ignore[index]
        return p == c, g == c


def resolve_cases(
    fn: str,
    pred: Tensor,
    gt: Tensor,
    spacing: float | Sequence[float] | None,
    spatial_dims: int | None,
    num_classes: int | None,
    include_background: bool,
) -> Cases:
    """Validate (messages name ``fn``, the argument and the value) and normalise the inputs."""
    for name, t in (("pred", pred), ("gt", gt)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
    if pred.shape != gt.shape:
        raise ValueError(f"{fn}: pred and gt must have the same shape, got {list(pred.shape)} and {list(gt.shape)}")
    if pred.device != gt.device:
        raise ValueError(f"{fn}: pred and gt must be on the same device, got {pred.device} and {gt.device}")
    if spatial_dims is not None and (isinstance(spatial_dims, bool) or spatial_dims not in (2, 3)):
        raise ValueError(f"{fn}: spatial_dims must be 2 or 3, got {spatial_dims!r}")

    if spacing is None or isinstance(spacing, (int, float)) and not isinstance(spacing, bool):
        nsp = spatial_dims
        if nsp is None:
            if pred.dim() not in (2, 3):
                raise ValueError(
                    f"{fn}: cannot tell the spatial dims of inputs of shape {list(pred.shape)}: pass spatial_dims=2 or 3, "
                    "or a spacing sequence with one entry per spatial dim"
                )
            nsp = pred.dim()
        values = [1.0 if spacing is None else float(spacing)] * nsp
    elif isinstance(spacing, (Sequence, Tensor)) and not isinstance(spacing, str):
        values = [float(s) for s in spacing]
        if len(values) not in (2, 3):
            raise ValueError(f"{fn}: spacing must have 2 or 3 entries (one per spatial dim), got {len(values)}")
        if spatial_dims is not None and spatial_dims != len(values):
            raise ValueError(f"{fn}: spatial_dims={spatial_dims} disagrees with the {len(values)} entries of spacing")
    else:
        raise TypeError(f"{fn}: spacing must be None, a number or a sequence of numbers, got {type(spacing).__name__}")
    for i, s in enumerate(values):
        if not (math.isfinite(s) and s > 0.0):
            raise ValueError(f"{fn}: spacing[{i}] must be finite and > 0, got {s}")
    nsp = len(values)
    if pred.dim() < nsp:
        raise ValueError(f"{fn}: inputs must have at least {nsp} dims (batch dims, then {nsp} spatial dims), "
                         f"got shape {list(pred.shape)}")

    classes = None
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"{fn}: num_classes must be an int >= 1, got {num_classes!r}")
        for name, t in (("pred", pred), ("gt", gt)):
            if t.dtype not in _INT_DTYPES:
                raise TypeError(f"{fn}: with num_classes, {name} must be an integer label map, got {t.dtype}")
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
                raise ValueError(f"{fn}: {name} has labels outside [0, {num_classes}): "
                                 f"min {int(t.min())}, max {int(t.max())}")
        classes = list(range(0 if include_background else 1, num_classes))
        if not classes:
            raise ValueError(f"{fn}: no class to score: num_classes=1 and include_background=False")
    elif pred.dtype.is_complex or gt.dtype.is_complex:
        raise TypeError(f"{fn}: masks must be real (bool, integer or float), got {pred.dtype} and {gt.dtype}")

    spatial = tuple(pred.shape[pred.dim() - nsp:])
    batch = tuple(pred.shape[: pred.dim() - nsp])
    return Cases(pred.reshape(-1, *spatial), gt.reshape(-1, *spatial), batch, spatial, values, classes)
