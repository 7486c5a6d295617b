"""Cross Teaching between CNN and Transformer (Luo et al., MIDL 2022), 2D."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sslseg.data import Batch
from sslseg.losses.segmentation import dice_loss, supervised_loss
from sslseg.methods.base import MethodConfig, SSLMethod, StepContext, StepOutput, register_method, split_labeled
from sslseg.models import model_info
from sslseg.models._registry import fit_input_size

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
    ``img_size`` = the patch, which must be a multiple of 32; the engine's default patch is rounded
    down to one, :meth:`fit_patch`). The run's ``model_options`` are the CNN's; the transformer gets
    ``transformer_options`` only. Both are trained by the engine's one SGD optimizer (SSL4MIS: two
    SGD optimizers with identical settings, the same thing).

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
        to the first volume's in-plane size (at most 256, rounded down to a multiple of 32 for the
        Swin-UNet) and batch 24 (12): pass ``patch_size=[224, 224], batch_size=16, labeled_bs=8``
        to match;
      * a single-channel image is embedded directly (SSL4MIS repeats it to 3 channels).
    """

    @dataclass
    class Config(MethodConfig):
        consistency: float = 0.1
        transformer: str = "swin_unet"
        transformer_options: dict[str, Any] = field(default_factory=dict)

        def __post_init__(self) -> None:
            info = model_info(self.transformer)  # an unknown name: did-you-mean error listing the models
            if info.dim != 2 or info.task != "segmentation":
                raise ValueError(f"ctct: transformer must be a 2D segmentation model, got {self.transformer!r} "
                                 f"({info.dim}D {info.task})")
            if not isinstance(self.transformer_options, dict):
                raise TypeError(f"ctct: transformer_options must be a dict, got {self.transformer_options!r}")

    dims = (2,)
    log_keys = ("loss_sup", "loss_cross")
    paper = ("Luo et al., Semi-Supervised Medical Image Segmentation via Cross Teaching between CNN "
             "and Transformer, MIDL 2022")

    @classmethod
    def fit_patch(cls, patch: tuple[int, ...], config: MethodConfig, model: str,
                  model_options: dict[str, Any]) -> tuple[int, ...]:
        fitted = fit_input_size(config.transformer, super().fit_patch(patch, config, model, model_options),
                                config.transformer_options)
        if fit_input_size(model, fitted, model_options) != fitted:
            raise ValueError(f"ctct: no patch at most {list(patch)} suits both {model!r} and "
                             f"{config.transformer!r}; pass patch_size explicitly")
        return fitted

    def build(self) -> None:
        self.nets["cnn"] = self.create_network()
        # The run's model_options belong to the CNN, not to the transformer.
        self.nets["transformer"] = self.create_network(self.config.transformer, inherit_options=False,
                                                       **self.config.transformer_options)

    def eval_model(self) -> nn.Module:
        return self.nets["cnn"]

    def step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        x = batch.images()
        z1_l, z1_u = split_labeled(self.nets["cnn"](x), batch)
        z2_l, z2_u = split_labeled(self.nets["transformer"](x), batch)
        loss_sup = supervised_loss(z1_l, batch.labeled_label) + supervised_loss(z2_l, batch.labeled_label)
        loss_cross = cross_teaching_loss(z1_u, z2_u)
        loss = loss_sup + ctx.consistency_weight * loss_cross
        return StepOutput(loss, {"loss_sup": loss_sup.detach(), "loss_cross": loss_cross.detach()})
