"""Evaluation metrics per case and class, in physical units, with an explicit empty-mask policy.

* Overlap: :func:`dice`, :func:`jaccard`.
* Surface distances (medpy's definitions, exact EDT): :func:`hd95`, :func:`hausdorff`,
  :func:`asd` (``symmetric=True`` for ASSD), :func:`surface_distances`, :func:`surface`.
* :func:`segmentation_metrics`: several at once, sharing each case's distances.

Inputs are binary masks (``num_classes=None``) or integer label maps (``num_classes=C``) with
leading batch dims; results are :class:`MetricResult` objects (values plus how many cases the
empty-mask policy scored; see :mod:`sslseg.metrics.result`).
"""

from sslseg.metrics.overlap import dice, jaccard
from sslseg.metrics.segmentation import METRICS, segmentation_metrics
from sslseg.metrics.result import EMPTY_POLICIES, MetricResult, image_diagonal
from sslseg.metrics.surface import asd, hausdorff, hd95, surface, surface_distances

__all__ = [
    "EMPTY_POLICIES",
    "METRICS",
    "MetricResult",
    "asd",
    "dice",
    "hausdorff",
    "hd95",
    "image_diagonal",
    "jaccard",
    "segmentation_metrics",
    "surface",
    "surface_distances",
]
