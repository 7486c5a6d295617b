"""Pseudo-label and mixing helpers shared by the self-training methods.

One place for what FixMatch, UniMatch, BCP (and any other method) need around hard pseudo-labels:

* :func:`pseudo_labels`: argmax of detached probabilities with a confidence mask; low-confidence
  voxels get :data:`IGNORE_INDEX` (never relabelled as background, as SSL4MIS's FixMatch does);
* :func:`masked_cross_entropy` / :func:`masked_dice_loss`: losses that skip ignored or masked
  voxels, with the normalisation each paper uses;
* :func:`random_box` / :func:`cutmix_box`: box masks for copy-paste (BCP) and CutMix (UniMatch);
* :func:`largest_component`: keep the largest connected component of each foreground class
  (BCP's optional post-processing of pseudo-labels).

Everything works on 2D ``(B, C, H, W)`` and 3D ``(B, C, D, H, W)`` tensors on any device, and
stays on the device (no host synchronisation) except :func:`largest_component`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sslseg.losses.segmentation import dice_loss

__all__ = [
    "IGNORE_INDEX",
    "PseudoLabels",
    "cutmix_box",
    "largest_component",
    "masked_cross_entropy",
    "masked_dice_loss",
    "pseudo_label_loss",
    "pseudo_labels",
    "random_box",
]

#: Label value of voxels that no loss may use (low confidence, outside a region).
IGNORE_INDEX = 255


@dataclass
class PseudoLabels:
    """Hard pseudo-labels of a batch.

    Attributes:
        labels: ``(B, *spatial)`` int64 argmax class; voxels below the threshold hold
            :data:`IGNORE_INDEX` (unless ``fill_ignored=False`` was asked for).
        confidence: ``(B, *spatial)`` float32 max class probability.
        mask: ``(B, *spatial)`` bool, True where ``confidence >= threshold``.
    """

    labels: Tensor
    confidence: Tensor
    mask: Tensor

    @property
    def ratio(self) -> Tensor:
        """Fraction of confident voxels (a 0-dim float tensor, for logging)."""
        return self.mask.float().mean()


def pseudo_labels(probs: Tensor, threshold: float | None = None, *, fill_ignored: bool = True) -> PseudoLabels:
    """Confidence-masked argmax pseudo-labels of ``probs`` (detached, computed in float32).

    Args:
        probs: ``(B, C, *spatial)`` class probabilities (softmax already applied).
        threshold: Keep voxels whose max probability is ``>= threshold``; None or 0 keeps all.
        fill_ignored: Write :data:`IGNORE_INDEX` into the labels of masked-out voxels.

    Returns:
        :class:`PseudoLabels` (labels, confidence, mask).

    Example:
        >>> p = torch.tensor([[[[0.97, 0.6]], [[0.03, 0.4]]]])  # (1, 2, 1, 2)
        >>> pseudo_labels(p, 0.95).labels.tolist()
        [[[0, 255]]]
    """
    if probs.dim() < 3:
        raise ValueError(f"pseudo_labels: probs must be (B, C, *spatial), got shape {list(probs.shape)}")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"pseudo_labels: threshold must be in [0, 1] or None, got {threshold}")
    with torch.no_grad():
        conf, labels = probs.detach().float().max(dim=1)
        if threshold:
            mask = conf >= threshold
            if fill_ignored:
                labels = labels.masked_fill(~mask, IGNORE_INDEX)
        else:
            mask = torch.ones_like(labels, dtype=torch.bool)
    return PseudoLabels(labels, conf, mask)


def masked_cross_entropy(logits: Tensor, target: Tensor, mask: Tensor | None = None, *,
                         normalize: str = "all") -> Tensor:
    """Cross-entropy over the voxels of ``mask`` (and not :data:`IGNORE_INDEX`), in float32.

    Args:
        logits: ``(B, C, *spatial)``.
        target: ``(B, *spatial)`` integer labels; :data:`IGNORE_INDEX` voxels contribute 0.
        mask: Optional ``(B, *spatial)`` bool/0-1 weights multiplied into the per-voxel loss.
        normalize: ``"all"`` divides by the number of voxels (FixMatch's and UniMatch's
            ``1/(mu B) sum 1[conf >= tau] H(...)``: masked voxels count in the denominator) or
            ``"valid"`` by the number of kept voxels (BCP's per-region mean; 0 if none).
    """
    if normalize not in ("all", "valid"):
        raise ValueError(f"masked_cross_entropy: normalize must be 'all' or 'valid', got {normalize!r}")
    target = target.long()
    valid = (target != IGNORE_INDEX).float()
    if mask is not None:
        valid = valid * mask.float()
    ce = F.cross_entropy(logits.float(), target.masked_fill(target == IGNORE_INDEX, 0), reduction="none")
    total = (ce * valid).sum()
    if normalize == "all":
        return total / ce.numel()
    return total / valid.sum().clamp_min(1.0)


def masked_dice_loss(probs: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """:func:`sslseg.losses.segmentation.dice_loss` over the voxels of ``mask`` only.

    Voxels outside ``mask`` (or labelled :data:`IGNORE_INDEX`) count for no class, in the
    prediction and the target alike (BCP's ``mask_DiceLoss``, UniMatch's ``DiceLoss(ignore=...)``).

    Args:
        probs: ``(B, C, *spatial)`` probabilities.
        target: ``(B, *spatial)`` integer labels.
        mask: Optional ``(B, *spatial)`` bool / 0-1 region to keep.
    """
    target = target.long()
    if mask is not None:
        target = target.masked_fill(~mask.bool(), IGNORE_INDEX)
    return dice_loss(probs.float(), target, ignore_index=IGNORE_INDEX)


PSEUDO_LOSSES = ("ce", "dice", "ce_dice")


def pseudo_label_loss(logits: Tensor, labels: Tensor, mask: Tensor | None = None, kind: str = "ce_dice") -> Tensor:
    """Loss of ``logits`` against hard pseudo-labels, skipping masked-out / ignored voxels.

    Args:
        logits: ``(B, C, *spatial)`` predictions of the student.
        labels: ``(B, *spatial)`` pseudo-labels (:data:`IGNORE_INDEX` voxels are skipped).
        mask: Optional ``(B, *spatial)`` bool confidence mask (False: skipped).
        kind: ``"ce"``: ``sum(mask * CE) / #voxels`` (FixMatch, UniMatch's natural-image code:
            skipped voxels count in the denominator); ``"dice"``: Dice over the kept voxels
            (UniMatch's medical code); ``"ce_dice"``: ``0.5 (CE + Dice)``, the form of the
            supervised loss.
    """
    if kind not in PSEUDO_LOSSES:
        raise ValueError(f"pseudo_label_loss: kind must be one of {PSEUDO_LOSSES}, got {kind!r}")
    ce = masked_cross_entropy(logits, labels, mask, normalize="all") if kind != "dice" else None
    if kind == "ce":
        return ce
    dice = masked_dice_loss(torch.softmax(logits.float(), 1), labels, mask)
    return dice if kind == "dice" else 0.5 * (ce + dice)


def random_box(size: tuple[int, ...], box: tuple[int, ...], *, device: torch.device | str | None = None,
               generator: torch.Generator | None = None) -> Tensor:
    """A ``size`` bool mask that is True inside one box of side ``box`` at a uniform random position.

    The position is drawn on the CPU (``generator`` or the global RNG), so it needs no device sync.
    """
    if len(size) != len(box):
        raise ValueError(f"random_box: box {tuple(box)} must have one side per axis of {tuple(size)}")
    mask = torch.zeros(size, dtype=torch.bool, device=device)
    sl = []
    for s, b in zip(size, box):
        if not 0 <= b <= s:
            raise ValueError(f"random_box: box side {b} does not fit in size {s}")
        start = int(torch.randint(0, s - b + 1, (1,), generator=generator))
        sl.append(slice(start, start + b))
    mask[tuple(sl)] = True
    return mask


def cutmix_box(size: tuple[int, ...], *, p: float = 0.5, area: tuple[float, float] = (0.02, 0.4),
               ratio: tuple[float, float] = (0.3, 1 / 0.3), device: torch.device | str | None = None,
               generator: torch.Generator | None = None) -> Tensor:
    """UniMatch's CutMix box: with probability ``p``, one box covering a fraction ``U(area)`` of the
    image, else an empty mask.

    In 2D this is UniMatch's ``obtain_cutmix_box``: aspect ratio ``r ~ U(ratio)``, height
    ``sqrt(A r)`` and width ``sqrt(A / r)``, except that sides too long for the image are clamped
    instead of redrawn (UniMatch loops until the box fits). In 3D each axis gets a log-uniform
    factor so that the ratio of any two sides lies in ``ratio``.

    Returns a ``size`` bool mask, True inside the box.
    """
    if float(torch.rand((), generator=generator)) >= p:
        return torch.zeros(size, dtype=torch.bool, device=device)
    volume = (area[0] + (area[1] - area[0]) * float(torch.rand((), generator=generator))) * math.prod(size)
    if len(size) == 2:
        r = ratio[0] + (ratio[1] - ratio[0]) * float(torch.rand((), generator=generator))
        raw = [math.sqrt(volume * r), math.sqrt(volume / r)]
    else:
        lo, hi = math.log(ratio[0]) / 2, math.log(ratio[1]) / 2
        logs = [lo + (hi - lo) * float(torch.rand((), generator=generator)) for _ in size]
        mean = sum(logs) / len(logs)
        base = volume ** (1.0 / len(size))
        raw = [base * math.exp(v - mean) for v in logs]
    sides = tuple(max(1, min(s, int(v))) for s, v in zip(size, raw))
    return random_box(size, sides, device=device, generator=generator)


def largest_component(labels: Tensor, num_classes: int) -> Tensor:
    """Keep, per sample and foreground class, only the largest connected component.

    BCP's ``get_ACDC_2DLargestCC`` / ``LargestCC_pancreas`` applied to pseudo-labels. Removed
    voxels become background (0); classes absent from a sample are left as they are. Runs on the
    CPU with ``scipy.ndimage.label`` and full connectivity (8-connected in 2D, 26 in 3D, as
    ``skimage.measure.label`` in BCP); one device-to-host copy per call.

    Args:
        labels: ``(B, *spatial)`` integer labels (no :data:`IGNORE_INDEX`).
        num_classes: Classes including background.
    """
    import numpy as np
    from scipy import ndimage

    arr = labels.detach().cpu().numpy()
    out = np.zeros_like(arr)
    structure = np.ones((3,) * (arr.ndim - 1), dtype=bool)
    for b in range(arr.shape[0]):
        for c in range(1, num_classes):
            comp, n = ndimage.label(arr[b] == c, structure=structure)
            if n == 0:
                continue
            sizes = np.bincount(comp.ravel())[1:]
            out[b][comp == int(np.argmax(sizes)) + 1] = c
    return torch.from_numpy(out).to(labels.device, labels.dtype)
