"""Segmentation losses shared by every method: Dice, CE + Dice, consistency terms."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from sslseg.utils.distributed import global_batch_sum

__all__ = [
    "dice_loss",
    "entropy_loss",
    "softmax_mse_loss",
    "supervised_loss",
    "symmetric_kl_loss",
]


def _check_pair(probs: Tensor, target: Tensor, fn: str) -> None:
    if probs.dim() < 3:
        raise ValueError(f"{fn}: probs must be (B, C, *spatial), got shape {list(probs.shape)}")
    if tuple(target.shape) != (probs.shape[0], *probs.shape[2:]):
        raise ValueError(
            f"{fn}: target must be (B, *spatial) = {[probs.shape[0], *probs.shape[2:]]} to match probs "
            f"{list(probs.shape)}, got {list(target.shape)}"
        )


def dice_loss(probs: Tensor, target: Tensor, *, squared: bool = True, smooth: float = 1e-5,
              ignore_index: int | None = None) -> Tensor:
    """Soft multi-class Dice loss, averaged over classes (background included).

    ``D_c = 1 - (2 sum(p_c g_c) + s) / (sum(p_c^2) + sum(g_c^2) + s)`` with sums over the whole
    batch and all voxels (V-Net style squared denominators, as SSL4MIS's ``DiceLoss``); with
    ``squared=False`` the denominators are ``sum(p_c) + sum(g_c)``.

    Args:
        probs: ``(B, C, *spatial)`` probabilities (softmax already applied).
        target: ``(B, *spatial)`` integer labels in ``[0, C)`` (or ``ignore_index``), or soft
            targets ``(B, C, *spatial)`` (floating).
        squared: Square the denominators.
        smooth: Added to numerator and denominator.
        ignore_index: Voxels with this label count for no class.

    Under DDP (inside the engine's training step) the sums cover the global batch: see
    :func:`sslseg.utils.distributed.global_batch_sum`.
    """
    valid = None
    if target.dim() == probs.dim() and target.is_floating_point():
        onehot = target.to(probs.dtype)
    else:
        _check_pair(probs, target, "dice_loss")
        target = target.long()
        if ignore_index is not None:
            valid = (target != ignore_index).unsqueeze(1).to(probs.dtype)
            target = target.masked_fill(target == ignore_index, 0)
        onehot = F.one_hot(target, probs.shape[1]).movedim(-1, 1).to(probs.dtype)
    p = probs if valid is None else probs * valid
    g = onehot if valid is None else onehot * valid
    dims = [0, *range(2, probs.dim())]
    inter = (p * g).sum(dims)
    denom = (p * p).sum(dims) + (g * g).sum(dims) if squared else p.sum(dims) + g.sum(dims)
    # The sums run over the whole batch: in a DDP training step they are summed over the ranks
    # (differentiably), so the loss is that of the global batch, not of each rank's shard.
    inter, denom = global_batch_sum(torch.stack([inter, denom])).unbind(0)
    return (1.0 - (2.0 * inter + smooth) / (denom + smooth)).mean()


def supervised_loss(logits: Tensor, target: Tensor, *, ignore_index: int | None = None) -> Tensor:
    """The supervised term of every method: ``0.5 * (CE(logits, y) + Dice(softmax(logits), y))``.

    Computed in float32 whatever the autocast dtype of ``logits``.
    """
    _check_pair(logits, target, "supervised_loss")
    logits = logits.float()
    ce = F.cross_entropy(logits, target.long(), ignore_index=-100 if ignore_index is None else ignore_index)
    return 0.5 * (ce + dice_loss(torch.softmax(logits, 1), target, ignore_index=ignore_index))


def softmax_mse_loss(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Mean over every element of ``(softmax(logits) - target_probs)^2`` (Mean Teacher's consistency)."""
    return (torch.softmax(logits.float(), 1) - target_probs.float()).pow(2).mean()


def entropy_loss(probs: Tensor, eps: float = 1e-6) -> Tensor:
    """Mean per-voxel entropy over classes, normalised by ``log(C)`` to lie in ``[0, 1]``."""
    c = probs.shape[1]
    return (-(probs * torch.log(probs + eps)).sum(1) / math.log(c)).mean()


def symmetric_kl_loss(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """R-Drop's symmetric KL between two predictions, over the CLASS axis (dim 1).

    ``0.5 * [KL(p_b || p_a) + KL(p_a || p_b)]`` averaged over voxels. SSL4MIS takes the softmax over
    the last axis (image width) instead, a bug (spec 8); this follows the paper.
    """
    la, lb = F.log_softmax(logits_a.float(), 1), F.log_softmax(logits_b.float(), 1)
    kl_ab = (lb.exp() * (lb - la)).sum(1)
    kl_ba = (la.exp() * (la - lb)).sum(1)
    return 0.5 * (kl_ab + kl_ba).mean()
