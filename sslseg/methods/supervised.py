"""Supervised training on the labeled cases only: the lower bound (and, with all cases labeled, the upper bound)."""

from __future__ import annotations

from dataclasses import dataclass

from sslseg.data import Batch
from sslseg.losses.segmentation import supervised_loss
from sslseg.methods.base import MethodConfig, SSLMethod, StepContext, StepOutput, register_method


@register_method("supervised")
class Supervised(SSLMethod):
    """Fully supervised baseline: ``L = 0.5 * (CE + Dice)`` on labeled samples.

    Every sample of the batch is labeled (SSL4MIS's ``train_fully_supervised_{2D,3D}``); run it
    with ``labeled=<n>`` for the lower bound and with all training cases labeled for the upper
    bound.
    """

    @dataclass
    class Config(MethodConfig):
        pass

    uses_unlabeled = False
    log_keys = ("loss_sup",)
    paper = "Ronneberger et al., U-Net, MICCAI 2015 (supervised baseline)"

    def step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        loss = supervised_loss(self.nets["student"](batch.labeled_image), batch.labeled_label)
        return StepOutput(loss, {"loss_sup": loss.detach()})
