"""R-Drop: Regularized Dropout (Liang et al., NeurIPS 2021)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sslseg.data import Batch
from sslseg.losses.segmentation import supervised_loss, symmetric_kl_loss
from sslseg.methods.base import MethodConfig, SSLMethod, StepContext, StepOutput, register_method, split_labeled

__all__ = ["KL_REDUCTIONS", "RDrop"]

#: ``sum_classes``: KL summed over classes, mean over voxels (the paper's per-voxel KL);
#: ``ssl4mis``: mean over every element, classes included (SSL4MIS's scale, ``1/C`` of it).
KL_REDUCTIONS = ("sum_classes", "ssl4mis")


@register_method("rdrop")
class RDrop(SSLMethod):
    """R-Drop: two dropout passes of one network agree (symmetric KL over classes).

    Paper: Liang et al., "R-Drop: Regularized Dropout for Neural Networks", NeurIPS 2021.

    Loss, with ``z1`` and ``z2`` two forward passes of the same network on the same batch
    (different dropout masks; run as one pass over the batch stacked twice)::

        L = 0.5 (CE + Dice)(z1_l, y_l) + 0.5 (CE + Dice)(z2_l, y_l)
            + lambda(t) * 0.5 [KL(p2 || p1) + KL(p1 || p2)]

    with ``p_i = softmax(z_i)`` over the class axis, the KL summed over classes and averaged over
    samples and voxels (:func:`sslseg.losses.segmentation.symmetric_kl_loss`;
    ``kl_reduction="sum_classes"``, the paper's KL per voxel). Scale: SSL4MIS's
    ``compute_kl_loss`` takes a plain mean over every element, classes included, i.e. ``1/C``
    of this term, so at the same ``consistency`` the default weighs the KL about ``C`` times more
    (4x on ACDC); ``kl_reduction="ssl4mis"`` uses SSL4MIS's mean (still over the class axis'
    softmax). The KL covers every
    sample of the batch, labeled and unlabeled (the paper regularises every training sample; it
    needs no label). ``lambda(t)`` ramps to ``consistency = 4.0`` (SSL4MIS's default; the paper's
    ``alpha``).

    Differences from SSL4MIS (``train_regularized_dropout_{2D,3D}.py``):
      * one network run twice, as in the paper; SSL4MIS trains two independent networks (closer to
        mutual learning), which ``two_networks=True`` restores (``nets["model1"]`` and
        ``nets["model2"]``, ``model1`` validated and exported, as in CPS);
      * the softmax of the KL runs over classes; SSL4MIS's runs over the last axis (image width),
        a bug that is not reproduced;
      * the KL also covers labeled samples; SSL4MIS only unlabeled ones (``kl_labeled=False``);
      * in the one-network form the two passes run as one pass over the stacked batch, so they
        share BatchNorm batch statistics (two separate calls would not).
    """

    @dataclass
    class Config(MethodConfig):
        consistency: float = 4.0
        two_networks: bool = False
        kl_labeled: bool = True
        kl_reduction: str = "sum_classes"

        def __post_init__(self) -> None:
            if self.kl_reduction not in KL_REDUCTIONS:
                raise ValueError(f"rdrop: kl_reduction must be one of {KL_REDUCTIONS}, got {self.kl_reduction!r}")

    log_keys = ("loss_sup", "loss_kl")
    paper = "Liang et al., R-Drop: Regularized Dropout for Neural Networks, NeurIPS 2021"

    def build(self) -> None:
        if self.config.two_networks:
            self.nets["model1"] = self.create_network()
            self.nets["model2"] = self.create_network()
        else:
            self.nets["student"] = self.create_network()

    def eval_model(self):
        return self.nets["model1" if self.config.two_networks else "student"]

    def step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        x = batch.images()
        if self.config.two_networks:
            z1, z2 = self.nets["model1"](x), self.nets["model2"](x)
        else:
            z1, z2 = self.nets["student"](torch.cat([x, x])).chunk(2)
        (z1_l, z1_u), (z2_l, z2_u) = split_labeled(z1, batch), split_labeled(z2, batch)
        y = batch.labeled_label
        loss_sup = supervised_loss(z1_l, y) + supervised_loss(z2_l, y)
        loss_kl = symmetric_kl_loss(z1, z2) if self.config.kl_labeled else symmetric_kl_loss(z1_u, z2_u)
        if self.config.kl_reduction == "ssl4mis":
            loss_kl = loss_kl / z1.shape[1]  # the mean over classes of the per-class terms summed above
        loss = loss_sup + ctx.consistency_weight * loss_kl
        return StepOutput(loss, {"loss_sup": loss_sup.detach(), "loss_kl": loss_kl.detach()})
