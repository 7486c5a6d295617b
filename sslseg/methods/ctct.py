"""Cross Teaching between CNN and Transformer (Luo et al., MIDL 2022), 2D."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sslseg.data import Batch
from sslseg.losses.segmentation import dice_loss, supervised_loss
from sslseg.methods.base import MethodConfig, SSLMethod, StepContext, StepOutput, register_method

__all__ = ["CrossTeachingCNNTransformer", "cross_teaching_loss"]


def cross_teaching_loss(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """``Dice(softmax(z_a), argmax z_b) + Dice(softmax(z_b), argmax z_a)``, pseudo-labels detached."""
    za, zb = logits_a.float(), logits_b.float()
    pa, pb = torch.softmax(za, 1), torch.softmax(zb, 1)
    return dice_loss(pa, zb.detach().argmax(1)) + dice_loss(pb, za.detach().argmax(1))


@register_method("ctct")
class CrossTeachingCNNTransformer(SSLMethod):
    """A CNN (``unet``) and a Swin-UNet teach each other with hard pseudo-labels.

    Paper: Luo et al., "Semi-Supervised Medical Image Segmentation via Cross Teaching between CNN
    and Transformer", MIDL 2022.

    Networks: ``nets["cnn"]`` (the run's model, ``unet`` by default; validated and exported) and
    ``nets["transformer"]`` (``transformer``, default ``swin_unet`` built for the training patch:
    ``img_size`` = the patch, which must be a multiple of 32). Both are trained by the engine's
    one SGD optimizer (SSL4MIS: two SGD optimizers with identical settings, the same thing).

    Loss: ``L = sum_{i in cnn, trans} 0.5 (CE + Dice)(f_i(x_l), y_l) + lambda(t) * [Dice(p_cnn(x_u),
    argmax p_trans(x_u)) + Dice(p_trans(x_u), argmax p_cnn(x_u))]``, pseudo-labels detached, no
    confidence threshold; the cross-teaching term is Dice only, as in the paper and SSL4MIS.
    ``lambda(t)`` is the engine's sigmoid ramp-up of ``consistency`` (0.1).

    Differences from SSL4MIS (``train_cross_teaching_between_cnn_transformer_2D.py``) and the
    paper:
      * no pretrained weights: the Swin-UNet starts from Swin's random initialisation (SSL4MIS and
        the paper load ImageNet Swin-T weights, which sslseg never downloads); expect the
        transformer to need more iterations than in the paper;
      * the Swin-UNet is built for the training patch (SSL4MIS ignores its ``img_size`` and always
        uses 224); SSL4MIS trains with patch 224 and batch 16 (8 labeled), the engine defaults
        to 256 / 24 (12): pass ``patch_size=[224, 224], batch_size=16, labeled_bs=8`` to match;
      * a single-channel image is embedded directly (SSL4MIS repeats it to 3 channels).
    """

    @dataclass
    class Config(MethodConfig):
        consistency: float = 0.1
        transformer: str = "swin_unet"
        transformer_options: dict[str, Any] = field(default_factory=dict)

    dims = (2,)
    log_keys = ("loss_sup", "loss_cross")
    paper = ("Luo et al., Semi-Supervised Medical Image Segmentation via Cross Teaching between CNN "
             "and Transformer, MIDL 2022")

    def build(self) -> None:
        from sslseg.models import create_model

        self.nets["cnn"] = self.create_network()
        opts = dict(self.config.transformer_options)
        if self.config.transformer == "swin_unet" and "img_size" not in opts:
            opts["img_size"] = tuple(self.spec.patch_size)
        # Not create_network(): the run's model_options belong to the CNN, not to the transformer.
        seed = self.spec.seed * 1000 + self._seed_counter
        self._seed_counter += 1
        self.nets["transformer"] = create_model(self.config.transformer, self.spec.in_channels,
                                                self.spec.num_classes, seed=seed, **opts)

    def eval_model(self) -> nn.Module:
        return self.nets["cnn"]

    def step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        x = batch.images()
        sizes = [batch.labeled_bs, batch.unlabeled_bs]
        z1_l, z1_u = self.nets["cnn"](x).split(sizes)
        z2_l, z2_u = self.nets["transformer"](x).split(sizes)
        loss_sup = supervised_loss(z1_l, batch.labeled_label) + supervised_loss(z2_l, batch.labeled_label)
        loss_cross = cross_teaching_loss(z1_u, z2_u)
        loss = loss_sup + ctx.consistency_weight * loss_cross
        return StepOutput(loss, {"loss_sup": loss_sup.detach(), "loss_cross": loss_cross.detach()})
