"""Uncertainty Rectified Pyramid Consistency (Luo et al., MICCAI 2021 / MedIA 2022)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sslseg.data import Batch
from sslseg.losses.segmentation import supervised_loss
from sslseg.methods.base import MethodConfig, SSLMethod, StepContext, StepOutput, register_method, split_labeled

__all__ = ["UncertaintyRectifiedPyramidConsistency", "urpc_consistency"]

#: The pyramid variant of each plain network (URPC's default networks), named when a plain one is given.
PYRAMID_NETWORKS = {"unet": "unet_urpc", "unet_3d": "unet_3d_urpc"}


def urpc_consistency(logits: Sequence[Tensor], *, detach_mean: bool = False,
                     reduce_mean: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """URPC's uncertainty-rectified consistency over S predictions of the same (unlabeled) images.

    With ``p_s = softmax(z_s)`` and ``pbar = (1/S) sum_s p_s``::

        v_s = sum_c pbar_c (log pbar_c - log p_s,c)      # KL(pbar || p_s) per voxel, (B, 1, *S)
        w_s = exp(-v_s)
        L_s = mean((pbar - p_s)^2 * w_s) / (mean(w_s) + 1e-8) + mean(v_s)
        L   = (1/S) sum_s L_s

    The first mean runs over batch, classes and voxels (``w_s`` broadcast over classes), the others
    over batch and voxels: the first term is the ``w_s``-weighted mean over voxels of the
    class-averaged squared difference. ``pbar`` is not detached unless ``detach_mean``.

    Args:
        logits: S tensors ``(B, C, *spatial)`` at one resolution.
        detach_mean: Treat ``pbar`` as a constant target.
        reduce_mean: Applied to the normaliser ``mean(w_s)`` (the engine's differentiable
            ``ctx.all_reduce_mean`` under DDP), so that each rank divides by the whole batch's
            mean weight and the ranks' average loss is the whole batch's.
    """
    if len(logits) < 2:
        raise ValueError(f"urpc_consistency: needs at least 2 predictions, got {len(logits)}")
    log_probs = [torch.log_softmax(z.float(), 1) for z in logits]
    probs = [lp.exp() for lp in log_probs]
    mean = torch.stack(probs).mean(0)
    if detach_mean:
        mean = mean.detach()
    mean_log_mean = torch.special.xlogy(mean, mean)  # 0 log 0 = 0
    total = mean.new_zeros(())
    for p, lp in zip(probs, log_probs):
        v = (mean_log_mean - mean * lp).sum(1, keepdim=True)
        w = torch.exp(-v)
        w_mean = w.mean() if reduce_mean is None else reduce_mean(w.mean())
        total = total + ((mean - p).pow(2) * w).mean() / (w_mean + 1e-8) + v.mean()
    return total / len(logits)


@register_method("urpc")
class UncertaintyRectifiedPyramidConsistency(SSLMethod):
    """URPC: a network's predictions at several decoder scales agree, each voxel weighted by their agreement.

    Papers: Luo et al., "Efficient Semi-supervised Gross Target Volume of Nasopharyngeal Carcinoma
    Segmentation via Uncertainty Rectified Pyramid Consistency", MICCAI 2021; extended as
    "Semi-supervised Medical Image Segmentation via Uncertainty Rectified Pyramid Consistency",
    Medical Image Analysis 2022.

    Network: one network with pyramid heads, ``forward_all(x) -> {"logits", "aux"}`` giving S = 4
    full-resolution predictions ``z_0`` (main) and ``z_1..z_3`` (1/2, 1/4, 1/8 decoder scales,
    perturbed by feature noise / feature dropout / dropout in 2D and channel dropout in 3D). When
    the run names no network, URPC trains ``unet_urpc`` / ``unet_3d_urpc`` (``default_model``); a
    network named explicitly must have ``"aux"`` outputs. The trained network is the one validated,
    saved and exported: in eval mode its ``forward`` gives the main prediction only (the
    perturbations are off), and a run records its own name, so inference and export rebuild it.

    Loss::

        L = (1/S) sum_s 0.5 (CE + Dice)(z_s,l, y_l) + lambda(t) * urpc_consistency(z_0,u .. z_3,u)

    (the supervised part is SSL4MIS's ``(1/8) sum_s (CE + Dice)``); see :func:`urpc_consistency`.

    Differences from SSL4MIS (``train_uncertainty_rectified_pyramid_consistency_{2D,3D}.py``):
      * ``log p_s`` is ``log_softmax(z_s)`` (SSL4MIS: ``log(softmax(z_s))``, which is ``-inf`` where
        the softmax underflows);
      * ``pbar`` is not detached, as in SSL4MIS and in the authors' PyMIC implementation (the
        papers do not say); ``detach_mean=True`` makes it a constant target;
      * classes and defaults come from the data (SSL4MIS-3D hard-codes 3 classes, the GTV dataset,
        60k iterations, lr 0.1 and a 400-block ramp).

    Distributed (DDP): the normaliser ``mean(w_s)`` is averaged over the ranks, differentiably
    (``ctx.all_reduce_mean``), so the loss and its gradient are those of the whole batch.
    """

    @dataclass
    class Config(MethodConfig):
        consistency: float = 0.1
        detach_mean: bool = False

    log_keys = ("loss_sup", "loss_cons")
    default_model = {2: PYRAMID_NETWORKS["unet"], 3: PYRAMID_NETWORKS["unet_3d"]}
    paper = ("Luo et al., Efficient Semi-supervised Gross Target Volume of Nasopharyngeal Carcinoma Segmentation "
             "via Uncertainty Rectified Pyramid Consistency, MICCAI 2021")

    def build(self) -> None:
        name = self.spec.model
        net = self.create_network()
        if "aux" not in getattr(net, "output_keys", ()):
            hint = (f"; its pyramid variant is {PYRAMID_NETWORKS[name]!r}, the default" if name in PYRAMID_NETWORKS
                    else f", such as {', '.join(sorted(PYRAMID_NETWORKS.values()))}")
            raise ValueError(f"urpc needs a network with pyramid heads (forward_all 'aux' outputs); "
                             f"got {name!r}{hint}")
        self.nets["student"] = net

    def step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        out = self.nets["student"].forward_all(batch.images())
        preds = [split_labeled(z, batch) for z in (out["logits"], *out["aux"])]
        loss_sup = sum(supervised_loss(z_l, batch.labeled_label) for z_l, _ in preds) / len(preds)
        loss_cons = urpc_consistency([z_u for _, z_u in preds], detach_mean=self.config.detach_mean,
                                     reduce_mean=ctx.all_reduce_mean)
        loss = loss_sup + ctx.consistency_weight * loss_cons
        return StepOutput(loss, {"loss_sup": loss_sup.detach(), "loss_cons": loss_cons.detach()})
