"""What a raw scan goes through before the network, and what its prediction goes through after.

One :class:`Preprocessing`, made from a model's record, is applied by
:func:`~sslseg.inference.predict_volume` for every path that starts from scans as stored
(``sslseg.evaluate``, ``sslseg.infer``, export verification), so each sees a scan exactly as
training did:

* **Planned data** (the record holds a non-identity :class:`~sslseg.data.Plan`, i.e. the model
  was trained on a NIfTI folder preprocessed into the cache): crop to the nonzero box, normalise
  and resample to the plan's spacing with :func:`sslseg.data.preprocess.preprocess_image` (the
  function that wrote the training cache); after the network, the class **probabilities** are
  resampled linearly back onto the cropped original grid and uncropped (background outside the
  crop), so labels come out on the scan's own grid.
* **Data stored preprocessed** (SSL4MIS h5 layouts, phantoms: ``intensity="none"``, the identity)
  or NIfTI folders read without a plan (per-volume ``zscore``/``minmax`` on read): the record's
  per-volume ``intensity`` mode, :func:`sslseg.data.storage.normalize_intensity`, the function
  the readers apply.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["Prepared", "Preprocessing"]

_INTENSITIES = ("zscore", "minmax", "none")


@dataclass
class Prepared:
    """A scan made ready for the network, with what is needed to map the prediction back.

    Attributes:
        image: the network's input ``(C, d, h, w)`` float32 (normalised, cropped, resampled).
        original_shape: the scan's spatial shape ``(D, H, W)``.
        bbox: the crop box ``[[start, stop], ...]`` in the scan's grid (the whole scan when not cropped).
        shape_after_crop: the crop's shape, which the probabilities are resampled back to.
    """

    image: Tensor
    original_shape: tuple[int, int, int]
    bbox: list[list[int]]
    shape_after_crop: tuple[int, int, int]

    @property
    def changes_grid(self) -> bool:
        """True when the network's grid is not the scan's (cropped or resampled)."""
        return tuple(self.image.shape[1:]) != self.original_shape


@dataclass(frozen=True)
class Preprocessing:
    """The input preprocessing of a trained model (see the module docstring).

    Attributes:
        plan: the model's plan (None: the data were used as stored or normalised per volume).
        intensity: per-volume normalisation when there is no plan: ``zscore``, ``minmax`` or
            ``none`` (data stored normalised, e.g. SSL4MIS h5).
    """

    plan: Any = None
    intensity: str = "none"

    def __post_init__(self) -> None:
        if self.intensity not in _INTENSITIES:
            raise ValueError(f"Preprocessing: intensity must be one of {list(_INTENSITIES)}, got {self.intensity!r}")
        if self.plan is not None:
            from sslseg.data.planning import Plan

            plan = self.plan
            if isinstance(plan, Mapping):
                plan = Plan.from_dict(plan)
            if not isinstance(plan, Plan):
                raise TypeError(f"Preprocessing: plan must be a sslseg.data.Plan or its dict, got {type(plan).__name__}")
            object.__setattr__(self, "plan", None if plan.identity else plan)

    @classmethod
    def from_record(cls, record: Mapping[str, Any], intensity: str | None = None) -> Preprocessing:
        """The preprocessing a model record describes.

        Args:
            record: a model record (``sslseg.engine.load_model``): ``plan`` (a plan dict or None)
                and ``intensity``.
            intensity: override of the per-volume mode (only for models without a plan).

        Raises:
            ValueError: ``intensity`` is given for a planned model (its plan fixes the normalisation).
        """
        plan = record.get("plan")
        pre = cls(plan=plan, intensity=str(record.get("intensity", "zscore")))
        if intensity is not None:
            if pre.plan is not None:
                raise ValueError(f"intensity={intensity!r}: this model was trained with a plan, whose normalisation "
                                 f"({pre.plan.normalization}) is applied to every input; intensity applies only to "
                                 "models without a plan")
            pre = dataclasses.replace(pre, intensity=intensity)
        return pre

    @property
    def resamples(self) -> bool:
        """True when predictions must be mapped back to the scan's grid (a plan is applied)."""
        return self.plan is not None

    def prepare(self, image: Tensor | np.ndarray, spacing: Sequence[float] | None, *, name: str | None = None,
                device: torch.device | str | None = None) -> Prepared:
        """Turn a raw ``(C, D, H, W)`` scan into the network's input.

        Args:
            image: the scan as stored (raw intensities).
            spacing: its voxel spacing ``(D, H, W)`` in mm; required with a plan.
            name: the scan's name for error messages.
            device: where the prepared image goes (default the input's device, CPU for numpy).
        """
        from sslseg.data.storage import normalize_intensity

        src_device = image.device if isinstance(image, Tensor) else torch.device("cpu")
        array = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
        array = np.asarray(array, dtype=np.float32)
        shape = tuple(int(s) for s in array.shape[1:])
        if self.plan is None:
            x = normalize_intensity(array, self.intensity)
            out = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            return Prepared(out.to(device or src_device), shape, [[0, s] for s in shape], shape)  # type: ignore[arg-type]
        from sslseg.data.preprocess import preprocess_image

        if spacing is None:
            where = f" of {name}" if name else ""
            raise ValueError(f"the model was trained with a plan (target spacing {self.plan.target_spacing} mm): the "
                             f"voxel spacing{where} is needed to resample it (pass spacing=(d, h, w) in mm)")
        x, geo = preprocess_image(array, spacing, self.plan)
        out = torch.from_numpy(np.ascontiguousarray(x))
        return Prepared(out.to(device or src_device), shape, geo["bbox"],  # type: ignore[arg-type]
                        tuple(geo["shape_after_crop"]))

    @staticmethod
    def restore(probabilities: Tensor, prepared: Prepared) -> Tensor:
        """Class probabilities ``(K, d, h, w)`` on the network's grid -> ``(K, D, H, W)`` on the scan's.

        Resampled linearly onto the crop's grid (:func:`sslseg.data.resample_probabilities`), then
        placed into the scan: outside the crop box the background has probability 1.
        """
        from sslseg.data.resample import resample_probabilities

        if not prepared.changes_grid:
            return probabilities
        probs = resample_probabilities(probabilities, prepared.shape_after_crop)
        if tuple(prepared.shape_after_crop) == prepared.original_shape:
            return probs
        full = torch.zeros((probs.shape[0], *prepared.original_shape), dtype=probs.dtype, device=probs.device)
        full[0] = 1.0
        full[(slice(None), *(slice(a, b) for a, b in prepared.bbox))] = probs
        return full
