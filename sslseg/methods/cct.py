"""Cross-Consistency Training (Ouali et al., CVPR 2020), 2D."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sslseg.data import Batch
from sslseg.losses.segmentation import supervised_loss
from sslseg.methods.base import MethodConfig, SSLMethod, StepContext, StepOutput, register_method, split_labeled

__all__ = ["CrossConsistencyTraining", "cct_consistency"]


def cct_consistency(main_logits: Tensor, aux_logits: list[Tensor], *, detach_main: bool = True) -> Tensor:
    """CCT's unsupervised loss: ``(1/K) sum_k mean((p_main - p_aux_k)^2)`` on softmax probabilities.

    With ``detach_main`` (the paper) the main prediction is a fixed target, so the loss trains the
    encoder through the auxiliary decoders only; without it (SSL4MIS) gradients also reach the
    main decoder.
    """
    if not aux_logits:
        raise ValueError("cct_consistency: needs at least one auxiliary prediction")
    p_main = torch.softmax(main_logits.float(), 1)
    if detach_main:
        p_main = p_main.detach()
    terms = [(torch.softmax(a.float(), 1) - p_main).pow(2).mean() for a in aux_logits]
    return torch.stack(terms).mean()


@register_method("cct")
class CrossConsistencyTraining(SSLMethod):
    """Cross-consistency training: auxiliary decoders on perturbed encoder features agree with the main decoder.

    Paper: Ouali, Hudelot & Tami, "Semi-Supervised Semantic Segmentation with Cross-Consistency
    Training", CVPR 2020.

    Network: ``unet_cct`` (one encoder, a main decoder and K = 3 auxiliary decoders that see
    every encoder feature perturbed by feature noise U(-0.3, 0.3), dropout(0.3) and feature
    dropout, in training mode only). When the run names no network, CCT trains ``unet_cct``
    (``default_model``); any model whose ``forward_all`` returns ``"aux"`` may be named instead. The
    trained network is the one validated, saved and exported: in eval mode its ``forward`` runs the
    encoder and the main decoder only (the auxiliary decoders are training-only).

    Loss: ``L = 0.5 (CE + Dice)(main(x_l), y_l) + lambda(t) * (1/K) sum_k mean((sg(p_main(x_u)) -
    p_aux_k(x_u))^2)`` with ``p = softmax`` and ``lambda(t)`` the engine's sigmoid ramp-up of
    ``consistency`` (0.1).

    Differences from SSL4MIS (``train_cross_consistency_training_2D.py``), following the paper:
      * the main prediction is a fixed target (``detach_main=True``): the unsupervised loss trains
        the encoder through the auxiliary decoders only. SSL4MIS backpropagates into the main
        decoder too (``detach_main=False`` reproduces it);
      * only the main decoder is supervised. SSL4MIS averages ``CE + Dice`` over the main and the
        three auxiliary decoders, ``(1/8) sum_{4 outputs} (CE + Dice)`` (``supervise_aux=True``
        reproduces it);
      * the consistency covers the unlabeled samples only, as in both.
    Differences from the paper kept from SSL4MIS: 3 auxiliary decoders with feature noise,
    dropout and feature dropout only (the paper has K = 30 with VAT, guided/intermediate masking
    and spatial dropout as well), perturbing every skip level of a U-Net rather than one encoder
    output; ``0.5 (CE + Dice)`` supervision instead of CE; MSE consistency and the sigmoid
    ramp-up as in the paper.
    """

    @dataclass
    class Config(MethodConfig):
        consistency: float = 0.1
        detach_main: bool = True
        supervise_aux: bool = False

    dims = (2,)
    log_keys = ("loss_sup", "loss_cons")
    default_model = {2: "unet_cct"}
    paper = ("Ouali et al., Semi-Supervised Semantic Segmentation with Cross-Consistency Training, "
             "CVPR 2020")

    def build(self) -> None:
        net = self.create_network()
        if "aux" not in getattr(net, "output_keys", ()):
            raise ValueError(
                f"cct needs a network with auxiliary decoders (forward_all(...)['aux']), such as 'unet_cct' "
                f"(the default); model {self.spec.model!r} has outputs {getattr(net, 'output_keys', ('logits',))}"
            )
        self.nets["student"] = net

    def step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        cfg = self.config
        out = self.nets["student"].forward_all(batch.images())
        main_l, main_u = split_labeled(out["logits"], batch)
        aux = [split_labeled(a, batch) for a in out["aux"]]
        loss_sup = supervised_loss(main_l, batch.labeled_label)
        if cfg.supervise_aux:
            loss_sup = (loss_sup + sum(supervised_loss(a_l, batch.labeled_label) for a_l, _ in aux)) / (1 + len(aux))
        loss_cons = cct_consistency(main_u, [a_u for _, a_u in aux], detach_main=cfg.detach_main)
        loss = loss_sup + ctx.consistency_weight * loss_cons
        return StepOutput(loss, {"loss_sup": loss_sup.detach(), "loss_cons": loss_cons.detach()})
