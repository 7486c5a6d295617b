"""Dual-Task Consistency (Luo et al., AAAI 2021)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sslseg.data import Batch
from sslseg.losses import signed_distance_map
from sslseg.losses.segmentation import supervised_loss
from sslseg.methods.base import MethodConfig, SSLMethod, StepContext, StepOutput, register_method, split_labeled

__all__ = ["DualTaskConsistency", "dtc_consistency", "sdf_targets", "sdf_to_mask"]

#: DTC's network, trained when the run's network has no signed-distance head.
DTC_NETWORK = "vnet_sdf"


def sdf_targets(labels: Tensor, num_classes: int) -> Tensor:
    """DTC's regression targets: the normalised signed distance map of each foreground class.

    ``(B, *S)`` integer labels -> ``(B, C - 1, *S)`` float32, channel ``c - 1`` being
    :func:`sslseg.losses.signed_distance_map` of ``labels == c`` (negative inside, positive
    outside, each side scaled to ``[-1, 0]`` / ``[0, 1]``, 0 on the inner boundary; voxel units).
    """
    classes = torch.arange(1, num_classes, device=labels.device).view(1, -1, *([1] * (labels.dim() - 1)))
    return signed_distance_map(labels.unsqueeze(1) == classes, spatial_dims=labels.dim() - 1)


def sdf_to_mask(sdf: Tensor, k: float) -> Tensor:
    """DTC's transform from a signed distance map to a soft mask: ``sigmoid(-k * sdf)``."""
    return torch.sigmoid(-k * sdf)


def dtc_consistency(probs: Tensor, sdf: Tensor, k: float) -> Tensor:
    """DTC's dual-task consistency: ``mean((sigmoid(-k * sdf) - p_fg)^2)``.

    Args:
        probs: ``(B, C, *S)`` softmax probabilities; the foreground classes ``1..C-1`` are compared.
        sdf: ``(B, C - 1, *S)`` predicted signed distance maps (``tanh`` outputs).
        k: Steepness of the transform (DTC: 1500).
    """
    fg = probs[:, 1:]
    if sdf.shape != fg.shape:
        raise ValueError(f"dtc: the sdf head must predict {fg.shape[1]} map(s) (one per foreground class) of shape "
                         f"{list(fg.shape)}, got {list(sdf.shape)}")
    return (sdf_to_mask(sdf, k) - fg).pow(2).mean()


@register_method("dtc")
class DualTaskConsistency(SSLMethod):
    """DTC: a segmentation head and a signed-distance head agree through a differentiable transform.

    Paper: Luo, Chen, Song & Wang, "Semi-supervised Medical Image Segmentation through Dual-task
    Consistency", AAAI 2021.

    Network: a segmentation network with a signed-distance head, ``forward_all(x) ->
    {"logits", "sdf"}`` (``vnet_sdf``: V-Net with a ``tanh`` head of ``C - 1`` maps). When the
    run names no network, DTC trains ``vnet_sdf``, its paper's network (``default_model``); a
    network named explicitly must have an ``"sdf"`` output.

    Loss, with ``z, s = f(x)`` on the whole batch, ``p = softmax(z)``, ``g = sdf_targets(y_l)``
    (normalised signed distance maps of the foreground classes, from the exact EDT)::

        L = 0.5 (CE + Dice)(z_l, y_l) + beta * mean((s_l - g)^2)
            + lambda(t) * mean((sigmoid(-k s) - p_fg)^2)

    with ``beta = 0.3``, ``k = 1500`` and the consistency over the whole batch (labeled and
    unlabeled), ramped to ``consistency = 1.0`` (DTC's defaults). Only 3D, like its network.

    Differences from the paper's code (``HiLab-git/DTC``, ``train_la_dtc.py``; SSL4MIS cites DTC
    but does not implement it):
      * ``C`` softmax classes with one distance map per foreground class instead of one sigmoid
        output (the same for binary tasks up to the parametrisation);
      * the segmentation loss is sslseg's ``0.5 (CE + Dice)``; DTC's code uses its Dice alone
        (it computes a BCE term but leaves it out of the loss);
      * poly learning-rate decay (the engine's) instead of DTC's step decay (x0.1 every 2500
        iterations);
      * targets from :func:`sslseg.losses.signed_distance_map` (exact EDT on the device; an
        all-foreground class gives -1 where DTC's ``compute_sdf`` divides by zero).
    """

    @dataclass
    class Config(MethodConfig):
        consistency: float = 1.0
        beta: float = 0.3
        k: float = 1500.0

    dims = (3,)
    log_keys = ("loss_sup", "loss_sdf", "loss_cons")
    default_model = {3: DTC_NETWORK}
    paper = "Luo et al., Semi-supervised Medical Image Segmentation through Dual-task Consistency, AAAI 2021"

    def build(self) -> None:
        net = self.create_network()
        if "sdf" not in getattr(net, "output_keys", ()):
            raise ValueError(
                f"dtc needs a network with a signed-distance head (forward_all 'sdf' output), such as "
                f"{DTC_NETWORK!r}; got {self.spec.model!r}"
            )
        self.nets["student"] = net

    def step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        cfg = self.config
        out = self.nets["student"].forward_all(batch.images())
        logits, sdf = out["logits"], out["sdf"].float()
        loss_sup = supervised_loss(split_labeled(logits, batch)[0], batch.labeled_label)
        target = sdf_targets(batch.labeled_label, logits.shape[1])
        loss_sdf = F.mse_loss(split_labeled(sdf, batch)[0], target)
        loss_cons = dtc_consistency(torch.softmax(logits.float(), 1), sdf, cfg.k)
        loss = loss_sup + cfg.beta * loss_sdf + ctx.consistency_weight * loss_cons
        return StepOutput(loss, {"loss_sup": loss_sup.detach(), "loss_sdf": loss_sdf.detach(),
                                 "loss_cons": loss_cons.detach()})
