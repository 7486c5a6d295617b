"""Uncertainty-Aware Mean Teacher (Yu et al., MICCAI 2019)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from sslseg.data import Batch
from sslseg.utils.schedules import sigmoid_rampup
from sslseg.losses.segmentation import supervised_loss
from sslseg.methods.base import StepContext, StepOutput, register_method, split_labeled
from sslseg.methods.mean_teacher import MeanTeacher, teacher_noise
from sslseg.ops import predictive_entropy

__all__ = ["UncertaintyAwareMeanTeacher", "uamt_threshold", "uncertainty_masked_mse"]


def uamt_threshold(step: int, iterations: int, num_classes: int, *, start: float = 0.75,
                   ssl4mis: bool = False) -> float:
    """UA-MT's uncertainty threshold ``tau(t) = (start + (1 - start) * rampup(t)) * U_max``.

    ``rampup(t) = sigmoid_rampup(t, iterations)`` (per step, over the whole run) and
    ``U_max = ln(num_classes)``, the largest possible entropy; with ``ssl4mis=True``,
    ``U_max = ln 2`` whatever the number of classes (SSL4MIS's binary constant).
    """
    u_max = math.log(2.0) if ssl4mis else math.log(num_classes)
    return (start + (1.0 - start) * sigmoid_rampup(step, iterations)) * u_max


def uncertainty_masked_mse(student_probs: Tensor, teacher_probs: Tensor, uncertainty: Tensor, threshold: float,
                           *, normalizer: float | None = None,
                           reduce_mean: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """UA-MT's consistency: the squared difference averaged over the confident voxels.

    ``m = [uncertainty < threshold]`` (one value per voxel, broadcast over classes) and
    ``L = sum(m * (p_s - p_t)^2) / (normalizer * sum(m) + 1e-16)``. With ``normalizer=None`` it is
    the number of classes ``C``, so ``L`` is the mean of the squared difference over the masked
    (voxel, class) elements; SSL4MIS uses ``normalizer=2`` for every ``C``.

    Args:
        student_probs: ``(B, C, *S)`` student softmax (differentiable).
        teacher_probs: ``(B, C, *S)`` teacher softmax (a constant).
        uncertainty: ``(B, 1, *S)`` per-voxel uncertainty (predictive entropy).
        threshold: Voxels with an uncertainty below it count.
        normalizer: Constant multiplying ``sum(m)``; None: ``C``.
        reduce_mean: Applied to ``sum(m)`` (the engine's ``ctx.all_reduce_mean`` under DDP): the
            mean of the ranks' counts, so that the average of the ranks' losses is the loss of the
            whole batch, ``sum over all ranks of m (p_s - p_t)^2 / (C * sum over all ranks of m)``.

    Returns:
        ``(loss, mask)``, the mask ``(B, 1, *S)`` as float.
    """
    mask = (uncertainty < threshold).to(student_probs.dtype)
    c = student_probs.shape[1] if normalizer is None else normalizer
    dist = (student_probs - teacher_probs).pow(2)
    count = mask.sum() if reduce_mean is None else reduce_mean(mask.sum())
    return (mask * dist).sum() / (c * count + 1e-16), mask


@register_method("uamt")
class UncertaintyAwareMeanTeacher(MeanTeacher):
    """Uncertainty-aware Mean Teacher: the student learns from the teacher only where the teacher is sure.

    Paper: Yu, Wang, Li, Fu & Heng, "Uncertainty-aware Self-ensembling Model for Semi-supervised 3D
    Left Atrium Segmentation", MICCAI 2019.

    Loss, with ``p = softmax(student(x))`` on the whole batch and an EMA teacher (Mean Teacher's
    rule, in training mode so dropout is active)::

        q   = softmax(teacher(x_u + noise))                    # the target, one noisy pass
        pbar = mean_{t=1..T} softmax(teacher(x_u + noise_t))   # T = mc_passes MC-dropout passes
        u   = -sum_c pbar_c log(pbar_c + 1e-6)                 # predictive entropy, per voxel
        tau = (0.75 + 0.25 * sigmoid_rampup(t, iterations)) * ln(C)
        m   = [u < tau]
        L   = 0.5 (CE + Dice)(p_l, y_l) + lambda(t) * sum(m (p_u - q)^2) / (C * sum(m))

    ``noise = clamp(0.1 N(0, 1), -0.2, 0.2)``, fresh for every pass. The T passes are streamed
    through :func:`sslseg.ops.predictive_entropy` (one accumulator whatever T is). After each
    optimizer step the teacher follows the student by EMA, ``decay_t = min(1 - 1/(t+1),
    ema_decay)``.

    Differences from SSL4MIS (``train_uncertainty_aware_mean_teacher_{2D,3D}.py``):
      * the threshold's maximum uncertainty is ``ln C`` (the paper's ``U_max``); SSL4MIS uses
        ``ln 2`` for any C, which with 4 classes (ACDC) keeps far more uncertain voxels;
      * the consistency is normalised by ``C * sum(m)`` (the mean over masked voxels and classes);
        SSL4MIS divides by ``2 * sum(m)``, the binary constant. ``ssl4mis_mask=True`` restores both
        (identical to the paper for 2 classes);
      * the T passes run one after another on ``B_u`` samples; SSL4MIS runs 4 passes on the
        unlabeled batch stacked twice (same function; BatchNorm batch statistics of a duplicated
        batch are the same);
      * as in :class:`~sslseg.methods.mean_teacher.MeanTeacher`, floating buffers are averaged by
        the EMA too (``ema_buffers``).

    Distributed (DDP): the mask count ``sum(m)`` is averaged over the ranks (``ctx.all_reduce_mean``)
    so that the normalisation is that of the whole batch, not of each rank's shard.
    """

    @dataclass
    class Config(MeanTeacher.Config):
        mc_passes: int = 8
        threshold_start: float = 0.75
        ssl4mis_mask: bool = False

        def __post_init__(self) -> None:
            if isinstance(self.mc_passes, bool) or not isinstance(self.mc_passes, int) or self.mc_passes < 1:
                raise ValueError(f"uamt: mc_passes must be an int >= 1, got {self.mc_passes!r}")
            if not 0.0 <= self.threshold_start <= 1.0:
                raise ValueError(f"uamt: threshold_start must be in [0, 1], got {self.threshold_start}")

    log_keys = ("loss_sup", "loss_cons", "mask_ratio")
    paper = ("Yu et al., Uncertainty-aware Self-ensembling Model for Semi-supervised 3D Left Atrium Segmentation, "
             "MICCAI 2019")

    def step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        cfg = self.config
        student, teacher = self.nets["student"], self.teachers["teacher"]
        logits = student(batch.images())
        logits_l, logits_u = split_labeled(logits, batch)
        loss_sup = supervised_loss(logits_l, batch.labeled_label)
        x_u = batch.unlabeled_image
        with torch.no_grad():
            target = torch.softmax(teacher(teacher_noise(x_u, cfg.noise_std, cfg.noise_clip)).float(), 1)
            passes = (teacher(teacher_noise(x_u, cfg.noise_std, cfg.noise_clip)) for _ in range(cfg.mc_passes))
            _, uncertainty = predictive_entropy(passes)
        tau = uamt_threshold(ctx.step, ctx.iterations, logits.shape[1], start=cfg.threshold_start,
                             ssl4mis=cfg.ssl4mis_mask)
        loss_cons, mask = uncertainty_masked_mse(torch.softmax(logits_u.float(), 1), target, uncertainty, tau,
                                                 normalizer=2.0 if cfg.ssl4mis_mask else None,
                                                 reduce_mean=ctx.all_reduce_mean)
        weight = ctx.consistency_weight if ctx.step >= cfg.consistency_start else 0.0
        loss = loss_sup + weight * loss_cons
        return StepOutput(loss, {"loss_sup": loss_sup.detach(), "loss_cons": loss_cons.detach(),
                                 "mask_ratio": mask.mean()})
