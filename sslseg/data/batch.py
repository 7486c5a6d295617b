"""The training batch: named labeled and unlabeled fields instead of ``x[:labeled_bs]`` slicing.

Unlabeled samples never carry labels: the batch has no field for them, and the loader does not
read their label files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

Tensor = torch.Tensor


@dataclass
class Batch:
    """One training batch from the two-stream sampler.

    Shapes use ``B_l`` labeled and ``B_u`` unlabeled samples, ``C`` channels and the patch
    ``P = (H, W)`` (2D) or ``(D, H, W)`` (3D).

    Attributes:
        labeled_image: ``(B_l, C, *P)`` float32, after geometric augmentation (the weak view).
        labeled_label: ``(B_l, *P)`` int64, transformed exactly like ``labeled_image``.
        unlabeled_image: ``(B_u, C, *P)`` float32 weak view, or None when ``unlabeled_bs == 0``.
        labeled_strong: strong view of ``labeled_image`` (photometric + cutout; still aligned with
            ``labeled_label``), or None unless strong augmentation was asked for.
        unlabeled_strong: first strong view of ``unlabeled_image`` (None unless asked for).
        unlabeled_strong2: second, independent strong view (``strong_views=2``, UniMatch).
        labeled_ids: sample ids (``<volume>`` or ``<volume>_slice_<k>``), for logging.
        unlabeled_ids: sample ids of the unlabeled samples.
        labeled_case_ids: case (patient) of each labeled sample.
        unlabeled_case_ids: case (patient) of each unlabeled sample.
        labeled_spacing: ``(B_l, len(P))`` float64 voxel spacing of the *output* patches in mm
            (resizing and axis swaps applied).
        unlabeled_spacing: ``(B_u, len(P))`` likewise, or None.
    """

    labeled_image: Tensor
    labeled_label: Tensor
    unlabeled_image: Tensor | None = None
    labeled_strong: Tensor | None = None
    unlabeled_strong: Tensor | None = None
    unlabeled_strong2: Tensor | None = None
    labeled_ids: tuple[str, ...] = ()
    unlabeled_ids: tuple[str, ...] = ()
    labeled_case_ids: tuple[str, ...] = ()
    unlabeled_case_ids: tuple[str, ...] = ()
    labeled_spacing: Tensor | None = None
    unlabeled_spacing: Tensor | None = None

    @property
    def labeled_bs(self) -> int:
        """Number of labeled samples."""
        return int(self.labeled_image.shape[0])

    @property
    def unlabeled_bs(self) -> int:
        """Number of unlabeled samples (0 without an unlabeled stream)."""
        return 0 if self.unlabeled_image is None else int(self.unlabeled_image.shape[0])

    @property
    def unlabeled_weak(self) -> Tensor | None:
        """Alias of ``unlabeled_image`` (the weak view) for FixMatch-style code."""
        return self.unlabeled_image

    def images(self) -> Tensor:
        """Labeled then unlabeled images in one tensor ``(B_l + B_u, C, *P)``."""
        if self.unlabeled_image is None:
            return self.labeled_image
        return torch.cat([self.labeled_image, self.unlabeled_image])

    def _map(self, fn) -> Batch:
        changes = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                changes[f.name] = fn(v)
        return replace(self, **changes)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Move every tensor to ``device``."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Pin every tensor (called by ``DataLoader(pin_memory=True)``)."""
        return self._map(lambda t: t.pin_memory())

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                parts.append(f"{f.name}={tuple(v.shape)}:{str(v.dtype).replace('torch.', '')}")
        return "Batch(" + ", ".join(parts) + ")"


def _stack(samples: Sequence[dict[str, Any]], key: str) -> Tensor | None:
    if not samples or key not in samples[0]:
        return None
    return torch.stack([s[key] for s in samples])


def _spacing(samples: Sequence[dict[str, Any]]) -> Tensor | None:
    if not samples or samples[0].get("spacing") is None:
        return None
    return torch.tensor([list(s["spacing"]) for s in samples], dtype=torch.float64)


def collate(samples: Sequence[dict[str, Any]]) -> Batch:
    """Build a :class:`Batch` from samples of :class:`~sslseg.data.TrainSamples`.

    Samples are routed by their ``labeled`` flag, not by position, so a batch can never treat a
    labeled sample as unlabeled or the reverse.
    """
    lab = [s for s in samples if s["labeled"]]
    unl = [s for s in samples if not s["labeled"]]
    if not lab:
        raise ValueError("a training batch needs at least one labeled sample, got none")
    if any("label" in s for s in unl):
        raise ValueError("an unlabeled sample carries a label; unlabeled samples must not expose labels")
    return Batch(
        labeled_image=torch.stack([s["image"] for s in lab]),
        labeled_label=torch.stack([s["label"] for s in lab]),
        unlabeled_image=_stack(unl, "image"),
        labeled_strong=_stack(lab, "strong0"),
        unlabeled_strong=_stack(unl, "strong0"),
        unlabeled_strong2=_stack(unl, "strong1"),
        labeled_ids=tuple(s["id"] for s in lab),
        unlabeled_ids=tuple(s["id"] for s in unl),
        labeled_case_ids=tuple(s["case"] for s in lab),
        unlabeled_case_ids=tuple(s["case"] for s in unl),
        labeled_spacing=_spacing(lab),
        unlabeled_spacing=_spacing(unl),
    )
