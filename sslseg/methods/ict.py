"""Interpolation Consistency Training (Verma et al., IJCAI 2019)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sslseg.data import Batch
from sslseg.losses.segmentation import softmax_mse_loss, supervised_loss
from sslseg.methods.base import MethodConfig, SSLMethod, StepContext, StepOutput, register_method, split_labeled

__all__ = ["InterpolationConsistency", "ict_pairs", "mix"]

_PAIRINGS = ("permutation", "halves")


def ict_pairs(n_unlabeled: int, pairing: str, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Indices ``(i0, i1)`` of the unlabeled samples mixed together (sample ``i0[k]`` with ``i1[k]``).

    ``"permutation"`` (the ICT paper): every unlabeled sample with a random permutation of the
    batch, ``i0 = [0, B_u)`` and ``i1 = randperm(B_u)`` (a sample may meet itself).
    ``"halves"`` (SSL4MIS): the first half with the second, ``i0 = [0, n)`` and ``i1 = [n, 2n)``
    with ``n = B_u // 2`` (an odd last sample is left out); needs ``B_u >= 2``.
    """
    if pairing == "permutation":
        return torch.arange(n_unlabeled), torch.randperm(n_unlabeled, generator=generator)
    if pairing == "halves":
        n = n_unlabeled // 2
        if n == 0:
            raise ValueError(f"ict: pairing='halves' needs at least 2 unlabeled samples per batch, got {n_unlabeled}")
        return torch.arange(n), torch.arange(n, 2 * n)
    raise ValueError(f"ict: pairing must be one of {_PAIRINGS}, got {pairing!r}")


def mix(a: Tensor, b: Tensor, lam: Tensor) -> Tensor:
    """``(1 - lam) * a + lam * b`` with one ``lam`` per sample (``lam``: ``(B,)``)."""
    lam = lam.to(a.dtype).view(-1, *([1] * (a.dim() - 1)))
    return (1 - lam) * a + lam * b


@register_method("ict")
class InterpolationConsistency(SSLMethod):
    """ICT: the student's prediction of a mix of two unlabeled images matches the mix of the teacher's predictions.

    Paper: Verma et al., "Interpolation Consistency Training for
    Semi-Supervised Learning", IJCAI 2019.

    Loss, with an EMA teacher ``f'`` (Mean Teacher's rule) and pairs ``(u0, u1)`` of unlabeled
    images (:func:`ict_pairs`), one ``lam ~ Beta(alpha, alpha)`` per pair::

        x_m = (1 - lam) u0 + lam u1
        q_m = (1 - lam) softmax(f'(u0)) + lam softmax(f'(u1))      # teacher under no_grad, no noise
        z   = f([x_l ; x_m])
        L   = 0.5 (CE + Dice)(z_l, y_l) + lambda(t) * mean((softmax(z_m) - q_m)^2)

    The mean runs over pairs, classes and voxels. The student sees the labeled images and the
    mixed ones, never the raw unlabeled images (as in SSL4MIS). The teacher stays in training mode
    (``teacher_train_mode``), as in SSL4MIS.

    Differences from SSL4MIS (``train_interpolation_consistency_training_{2D,3D}.py``):
      * pairs are every unlabeled sample with a random permutation of the batch, as in the paper,
        and work for any ``B_u``; SSL4MIS mixes the first half of the unlabeled batch with the
        second (``pairing="halves"``), splitting at ``B_l / 2`` in 2D (so it needs
        ``B_u = B_l``) and at 1 in 3D (so it needs ``B_u = 2``);
      * one ``lam`` per pair, as SSL4MIS-2D (the paper's code draws one per batch; SSL4MIS-3D has
        a single pair);
      * the teacher runs once on the unlabeled images of the pairs (SSL4MIS: once per half);
      * ``alpha`` is a float (SSL4MIS declares ``--ict_alpha`` as an int);
      * floating buffers (BatchNorm statistics) are averaged by the EMA too (``ema_buffers``).
    """

    @dataclass
    class Config(MethodConfig):
        ema_decay: float = 0.99
        consistency: float = 0.1
        alpha: float = 0.2
        pairing: str = "permutation"
        teacher_train_mode: bool = True
        ema_buffers: bool = True

        def __post_init__(self) -> None:
            if not self.alpha > 0:
                raise ValueError(f"ict: alpha must be > 0 (Beta(alpha, alpha)), got {self.alpha}")
            if self.pairing not in _PAIRINGS:
                raise ValueError(f"ict: pairing must be one of {_PAIRINGS}, got {self.pairing!r}")

    log_keys = ("loss_sup", "loss_cons")
    paper = "Verma et al., Interpolation Consistency Training for Semi-Supervised Learning, IJCAI 2019"

    def build(self) -> None:
        cfg = self.config
        self.nets["student"] = self.create_network()
        self.add_ema_teacher(decay=cfg.ema_decay, include_buffers=cfg.ema_buffers, train_mode=cfg.teacher_train_mode)

    def draw_mix(self, n_unlabeled: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(i0, i1, lam)`` for one batch: the pairs and one ``Beta(alpha, alpha)`` draw per pair (CPU RNG)."""
        i0, i1 = ict_pairs(n_unlabeled, self.config.pairing)
        alpha = torch.tensor(float(self.config.alpha))
        lam = torch.distributions.Beta(alpha, alpha).sample((i0.numel(),))
        return i0, i1, lam

    def step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        x_u = batch.unlabeled_image
        i0, i1, lam = self.draw_mix(x_u.shape[0])
        used = int(torch.maximum(i0.max(), i1.max())) + 1  # CPU tensors: no device sync
        dev = x_u.device
        i0, i1, lam = i0.to(dev), i1.to(dev), lam.to(dev)
        with torch.no_grad():
            q = torch.softmax(self.teachers["teacher"](x_u[:used]).float(), 1)
            target = mix(q[i0], q[i1], lam)
        x_m = mix(x_u[i0], x_u[i1], lam)
        z_l, z_m = split_labeled(self.nets["student"](torch.cat([batch.labeled_image, x_m])), batch)
        loss_sup = supervised_loss(z_l, batch.labeled_label)
        loss_cons = softmax_mse_loss(z_m, target)
        loss = loss_sup + ctx.consistency_weight * loss_cons
        return StepOutput(loss, {"loss_sup": loss_sup.detach(), "loss_cons": loss_cons.detach()})
