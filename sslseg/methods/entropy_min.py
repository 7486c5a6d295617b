"""Entropy minimisation (Grandvalet & Bengio, NeurIPS 2004; Vu et al., ADVENT, CVPR 2019)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sslseg.data import Batch
from sslseg.losses.segmentation import entropy_loss, supervised_loss
from sslseg.methods.base import MethodConfig, SSLMethod, StepContext, StepOutput, register_method, split_labeled

__all__ = ["EntropyMinimization"]


@register_method("entropy_min")
class EntropyMinimization(SSLMethod):
    """Entropy minimisation: confident (low-entropy) predictions on unlabeled images.

    Papers: Grandvalet & Bengio, "Semi-supervised Learning by Entropy Minimization", NeurIPS 2004;
    for segmentation (and SSL4MIS's citation) Vu et al., "ADVENT: Adversarial Entropy
    Minimization for Domain Adaptation in Semantic Segmentation", CVPR 2019.

    Loss, with ``z = student(x)`` on the whole batch and ``p = softmax(z)``::

        L = 0.5 (CE + Dice)(z_l, y_l) + lambda(t) * mean_voxels( -sum_c p_u,c log(p_u,c + 1e-6) / ln C )

    The normalised entropy (ADVENT's ``1 / log C`` factor, in ``[0, 1]``) is averaged over the
    unlabeled samples and their voxels. One network, no teacher.

    Differences from SSL4MIS (``train_entropy_minimization_{2D,3D}.py``):
      * the entropy term covers the unlabeled samples only, as in both papers; SSL4MIS applies it
        to the whole batch, labeled samples included (``include_labeled=True`` restores that);
      * ``C`` is the dataset's number of classes; SSL4MIS hard-codes 4 (2D) and 2 (3D), the same
        for ACDC and BraTS.
    """

    @dataclass
    class Config(MethodConfig):
        consistency: float = 0.1
        include_labeled: bool = False

    log_keys = ("loss_sup", "loss_ent")
    paper = ("Grandvalet & Bengio, Semi-supervised Learning by Entropy Minimization, NeurIPS 2004; "
             "Vu et al., ADVENT, CVPR 2019")

    def step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        logits = self.nets["student"](batch.images())
        logits_l, logits_u = split_labeled(logits, batch)
        loss_sup = supervised_loss(logits_l, batch.labeled_label)
        z = logits if self.config.include_labeled else logits_u
        loss_ent = entropy_loss(torch.softmax(z.float(), 1))
        loss = loss_sup + ctx.consistency_weight * loss_ent
        return StepOutput(loss, {"loss_sup": loss_sup.detach(), "loss_ent": loss_ent.detach()})
