"""Cross Pseudo Supervision (Chen et al., CVPR 2021)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from sslseg.data import Batch
from sslseg.losses.segmentation import supervised_loss
from sslseg.methods.base import MethodConfig, SSLMethod, StepContext, StepOutput, register_method, split_labeled


@register_method("cps")
class CrossPseudoSupervision(SSLMethod):
    """Two differently initialised networks teach each other with hard pseudo-labels.

    Paper: Chen et al., "Semi-Supervised Semantic Segmentation with Cross Pseudo Supervision",
    CVPR 2021.

    Loss: ``L = sum_i 0.5 (CE + Dice)(f_i(x_l), y_l) + lambda(t) * [CE(f_1(x_u), argmax f_2(x_u)) +
    CE(f_2(x_u), argmax f_1(x_u))]`` (pseudo-labels detached, no confidence threshold), one backward
    on the sum. ``nets["model1"]`` is validated and exported (SSL4MIS validates both; the second
    is in the checkpoint).

    Difference from SSL4MIS: both networks come from the registry's initialisation with different
    derived seeds; SSL4MIS-3D additionally redraws conv weights with kaiming / xavier.
    """

    @dataclass
    class Config(MethodConfig):
        consistency: float = 0.1

    log_keys = ("loss_sup", "loss_cps")
    paper = "Chen et al., Semi-Supervised Semantic Segmentation with Cross Pseudo Supervision, CVPR 2021"

    def build(self) -> None:
        self.nets["model1"] = self.create_network()
        self.nets["model2"] = self.create_network()

    def eval_model(self):
        return self.nets["model1"]

    def step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        x = batch.images()
        (l1, u1), (l2, u2) = split_labeled(self.nets["model1"](x), batch), split_labeled(self.nets["model2"](x), batch)
        loss_sup = supervised_loss(l1, batch.labeled_label) + supervised_loss(l2, batch.labeled_label)
        u1, u2 = u1.float(), u2.float()
        pseudo1, pseudo2 = u1.detach().argmax(1), u2.detach().argmax(1)
        loss_cps = F.cross_entropy(u1, pseudo2) + F.cross_entropy(u2, pseudo1)
        loss = loss_sup + ctx.consistency_weight * loss_cps
        return StepOutput(loss, {"loss_sup": loss_sup.detach(), "loss_cps": loss_cps.detach()})
