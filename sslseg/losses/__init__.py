"""Losses: segmentation (Dice / CE, consistency terms) and distance-transform losses.

Distance-transform targets and losses (:mod:`sslseg.losses.distance`, built on the exact EDT
:func:`sslseg.ops.edt`): DTC's normalised signed distance map, Kervadec's boundary loss, Karimi &
Salcudean's Hausdorff DT loss.
"""

from sslseg.losses.segmentation import (
    dice_loss,
    entropy_loss,
    softmax_mse_loss,
    supervised_loss,
    symmetric_kl_loss,
)
from sslseg.losses.distance import (
    boundary_distance_map,
    boundary_loss,
    hausdorff_distance_field,
    hausdorff_dt_loss,
    signed_distance_map,
)

__all__ = [
    # segmentation and consistency losses
    "dice_loss",
    "entropy_loss",
    "softmax_mse_loss",
    "supervised_loss",
    "symmetric_kl_loss",
    # distance-transform targets and losses
    "boundary_distance_map",
    "boundary_loss",
    "hausdorff_distance_field",
    "hausdorff_dt_loss",
    "signed_distance_map",
]
