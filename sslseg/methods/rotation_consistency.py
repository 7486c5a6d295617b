"""Rotation-equivariance consistency: what SSL4MIS calls "Deep Co-Training" (2D)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sslseg.data import Batch
from sslseg.losses.segmentation import supervised_loss
from sslseg.methods.base import MethodConfig, SSLMethod, StepContext, StepOutput, register_method, split_labeled

__all__ = ["RotationConsistency", "rotation_consistency_loss"]


def rotation_consistency_loss(probs: Tensor, probs_rotated: Tensor, k: int) -> Tensor:
    """``0.5 [mean((sg(p_r) - rot_k(p))^2) + mean((p_r - sg(rot_k(p)))^2)]``.

    Args:
        probs: ``(B, C, H, W)`` probabilities of the unrotated images.
        probs_rotated: ``(B, C, W, H)`` or ``(B, C, H, W)`` probabilities of ``rot90(x, k)``.
        k: Quarter turns (``torch.rot90`` over the H, W axes).

    Each branch is pulled toward the other's detached value; the value equals
    ``mean((p_r - rot_k(p))^2)`` and the gradient is that of half of it on each side.
    """
    target = torch.rot90(probs, k, dims=(2, 3))
    return 0.5 * ((probs_rotated.detach() - target).pow(2).mean() + (probs_rotated - target.detach()).pow(2).mean())


@register_method("rotation_consistency")
class RotationConsistency(SSLMethod):
    """Rotation consistency: a network's prediction of a rotated image matches its rotated prediction.

    Paper: SSL4MIS cites Qiao et al., "Deep Co-Training for Semi-Supervised Image Recognition",
    ECCV 2018, but implements a transformation-equivariance regulariser on ONE network (spec
    section 2.10 and 8.14): there are no two view-specific networks and no adversarial examples. This
    class implements what SSL4MIS runs, under an honest name; its closest published form is
    transformation-consistent self-ensembling (Li et al., TCSM, TNNLS 2020).

    Each step draws ``k`` uniformly in ``{0, 1, 2, 3}`` (once for the batch) and
    ``L = 0.5 (CE + Dice)(f(x_l), y_l) + lambda(t) * 0.5 [mean((sg(p_r) - rot_k(p_u))^2) +
    mean((p_r - sg(rot_k(p_u)))^2)]`` with ``p_u = softmax(f(x_u))`` (from the full-batch pass) and
    ``p_r = softmax(f(rot90(x_u, k)))``. ``lambda(t)`` is the engine's sigmoid ramp-up of
    ``consistency`` (0.1).

    Differences from SSL4MIS: ``k`` comes from torch's RNG (checkpointed, so resumes are exact)
    rather than Python's ``random``. ``k = 0`` is kept, as in SSL4MIS (the term is then a plain
    dropout-consistency between two passes); ``exclude_identity=True`` draws ``k`` in ``{1, 2, 3}``.
    Odd ``k`` on a non-square patch transposes the patch: the network must accept ``(W, H)``.
    """

    @dataclass
    class Config(MethodConfig):
        consistency: float = 0.1
        exclude_identity: bool = False

    dims = (2,)
    log_keys = ("loss_sup", "loss_cons")
    paper = ("SSL4MIS 'Deep Co-Training' (rotation consistency on one network); cites Qiao et al., "
             "Deep Co-Training for Semi-Supervised Image Recognition, ECCV 2018")

    def step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        net = self.nets["student"]
        low = 1 if self.config.exclude_identity else 0
        k = int(torch.randint(low, 4, (1,)))  # CPU generator: no device sync
        logits_l, logits_u = split_labeled(net(batch.images()), batch)
        loss_sup = supervised_loss(logits_l, batch.labeled_label)
        probs_u = torch.softmax(logits_u.float(), 1)
        probs_r = torch.softmax(net(torch.rot90(batch.unlabeled_image, k, dims=(2, 3))).float(), 1)
        loss_cons = rotation_consistency_loss(probs_u, probs_r, k)
        loss = loss_sup + ctx.consistency_weight * loss_cons
        return StepOutput(loss, {"loss_sup": loss_sup.detach(), "loss_cons": loss_cons.detach()})
