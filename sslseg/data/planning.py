"""``sslseg.data.plan(data)``: target spacing, normalisation, patch and batch size for a dataset.

Rules (the fingerprint gives the per-volume spacings, crop sizes and foreground intensities):

* **Target spacing**: the per-axis median of the training volumes' spacings (test volumes are
  never used for planning). When the median spacing is
  strongly anisotropic (coarsest axis more than 3x the finest, :data:`ANISOTROPY_THRESHOLD`), the
  coarse axis takes the 10th percentile of the volumes' spacings on that axis instead (nnU-Net's
  rule: resampling every case to a coarse median slice distance would throw away the through-plane
  detail of the finer cases), but never less than the largest in-plane spacing.
* **Normalisation** per channel, from ``dataset.json``'s ``channel_names``: ``CT`` -> ``ct`` (clip
  to the dataset's foreground 0.5 / 99.5 percentiles, then z-score with the dataset's foreground
  mean and std: Hounsfield units mean the same in every scan); ``noNorm``/``none`` -> ``none``;
  anything else -> ``zscore`` per volume (within the nonzero mask when cropping removes more than
  a quarter of the volume, as for skull-stripped MR; else over the whole crop).
* **Crop to nonzero**: always (a no-op for CT, whose air is -1000, not 0).
* **Dimensionality** (``dim="auto"``): 3D unless the median volume at the target spacing has
  fewer than 16 slices (too thin for four 2x poolings), then 2D (slice-wise).
* **Patch size**: grown from 16 voxels per axis towards the median shape at the target spacing,
  16 voxels (2^4, the U-Net's four poolings) at a time, always on the axis whose patch covers the
  smallest fraction of the median shape, as long as the patch stays inside the median shape
  and a batch of 2 fits the memory budget; growth stops at the first step that does not fit (so a
  bigger budget never yields a smaller patch). An axis whose median is under 16 voxels gets 16.
* **Memory model** of the default U-Net (widths 16-32-64-128-256, two conv blocks per level in
  the encoder and the decoder, each keeping conv, norm and activation outputs for the backward
  pass, doubled for their gradients): ``bytes/voxel = 4 * 12 * 2 * sum_l width_l / f^l`` with
  ``f = 8`` in 3D and 4 in 2D (about 2 kB per voxel in 3D). 75 % of ``memory_gb`` is the budget
  (the rest: weights, optimizer state, framework).
* **Batch size**: as many patches as the budget holds, at most what covers 5 % of the training
  voxels per step (nnU-Net's cap, avoids overfitting tiny datasets), at least 2.
* **Foreground oversampling**: 0.33 (one patch in three centred on a foreground voxel).

SSL4MIS h5 layouts and the in-memory phantoms are already preprocessed: their plan is the
*identity* (``identity=True``: no crop, no resampling, no renormalisation), so their training and
the fidelity of the SSL4MIS comparison are exactly as before.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .cache import save_json, stable_hash
from .errors import check_choice
from .resample import ANISOTROPY_THRESHOLD, anisotropic_axis, resampled_shape

if TYPE_CHECKING:
    from .dataset import CaseDataset
    from .fingerprint import Fingerprint

NORMALIZATIONS = ("ct", "zscore", "none")
UNET_WIDTHS = (16, 32, 64, 128, 256)
POOLINGS = len(UNET_WIDTHS) - 1
_ACT_TENSORS = 12  # 2 blocks (encoder + decoder) x 2 convs x (conv, norm, activation)
_GRAD_FACTOR = 2.0
_USABLE = 0.75
_MIN_SLICES_3D = 2 ** POOLINGS
_FORMAT_VERSION = 1


def bytes_per_voxel(dim: int) -> float:
    """Training memory per patch voxel of the default U-Net (see the module docstring)."""
    f = 8.0 if dim == 3 else 4.0
    return 4.0 * _ACT_TENSORS * _GRAD_FACTOR * sum(w / f**level for level, w in enumerate(UNET_WIDTHS))


@dataclass
class Plan:
    """How a dataset is preprocessed and trained on; saved as ``plan.json``.

    Attributes:
        target_spacing: ``(D, H, W)`` mm every volume is resampled to.
        dim: 3 (patches) or 2 (slices of the first axis).
        patch_size: training patch, ``dim`` entries.
        batch_size: patches per step.
        normalization: per channel ``ct``, ``zscore`` or ``none``.
        use_mask_for_norm: per channel, z-score within the nonzero mask only.
        intensity_properties: per channel dataset foreground ``mean``, ``std``,
            ``percentile_00_5``, ``percentile_99_5`` (used by ``ct``).
        crop_to_nonzero: crop every volume to its nonzero bounding box first.
        foreground_oversample: fraction of labeled patches centred on a foreground voxel.
        label_resampling: ``linear`` (per class, then argmax) or ``nearest``.
        order_z: interpolation order along the coarse axis of anisotropic data (0 or 1).
        anisotropic_axis: that axis, or None.
        median_shape: median volume shape at the target spacing.
        in_channels: image channels.
        num_classes: classes including background.
        class_names: names of the classes.
        memory_gb: the budget the patch and batch were sized for.
        fingerprint_hash: the fingerprint this plan was made from.
        data_key: the dataset files' hash.
        identity: True for already preprocessed data (SSL4MIS h5, phantoms): nothing is done.
    """

    target_spacing: list[float]
    dim: int
    patch_size: list[int]
    batch_size: int
    normalization: list[str]
    use_mask_for_norm: list[bool] = field(default_factory=list)
    intensity_properties: list[dict[str, float]] = field(default_factory=list)
    crop_to_nonzero: bool = True
    foreground_oversample: float = 0.33
    label_resampling: str = "linear"
    order_z: int = 0
    anisotropic_axis: int | None = None
    median_shape: list[int] = field(default_factory=list)
    in_channels: int = 1
    num_classes: int = 2
    class_names: list[str] = field(default_factory=list)
    memory_gb: float = 8.0
    fingerprint_hash: str = ""
    data_key: str = ""
    identity: bool = False
    format_version: int = _FORMAT_VERSION

    def __post_init__(self) -> None:
        self.target_spacing = [float(s) for s in self.target_spacing]
        self.patch_size = [int(p) for p in self.patch_size]
        if self.dim not in (2, 3):
            raise ValueError(f"plan dim must be 2 or 3, got {self.dim!r}")
        if len(self.patch_size) != self.dim or min(self.patch_size) < 1:
            raise ValueError(f"plan patch_size must be {self.dim} positive ints for dim={self.dim}, got {self.patch_size}")
        if len(self.target_spacing) != 3 or min(self.target_spacing) <= 0:
            raise ValueError(f"plan target_spacing must be three positive numbers (D, H, W), got {self.target_spacing}")
        for n in self.normalization:
            check_choice("normalization", n, NORMALIZATIONS)
        check_choice("label_resampling", self.label_resampling, ("linear", "nearest"))
        if not 0 <= self.foreground_oversample <= 1:
            raise ValueError(f"foreground_oversample must be in [0, 1], got {self.foreground_oversample}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")

    @property
    def hash(self) -> str:
        """Hash of everything that changes the preprocessed arrays (not patch or batch size)."""
        keys = ("target_spacing", "normalization", "use_mask_for_norm", "intensity_properties", "crop_to_nonzero",
                "label_resampling", "order_z", "identity", "data_key", "format_version")
        return stable_hash({k: getattr(self, k) for k in keys}, 16)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The plan as JSON text (also written to ``path`` if given)."""
        if path is not None:
            save_json(Path(path), self.to_dict())
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        accepted = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - accepted)
        if unknown:
            raise TypeError(f"unknown plan keys {unknown}; accepted: {sorted(accepted)}")
        return cls(**dict(d))

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> Plan:
        """Inverse of :meth:`to_json`: JSON text or a path to a ``plan.json``."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            path = Path(text_or_path)
            if not path.is_file():
                raise FileNotFoundError(f"plan file {path} not found")
            text = path.read_text()
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a valid plan JSON ({exc})") from None

    def replace(self, **overrides: Any) -> Plan:
        """A copy with fields overridden (unknown names are a ``TypeError`` listing the fields)."""
        d = self.to_dict()
        accepted = set(d)
        unknown = sorted(set(overrides) - accepted)
        if unknown:
            raise TypeError(f"unknown plan fields {unknown}; accepted: {sorted(accepted)}")
        d.update(overrides)
        return Plan.from_dict(d)

    def summary(self) -> str:
        """A few lines for ``sslseg plan``."""
        lines = [
            f"plan ({'identity: data used as stored' if self.identity else 'fingerprint ' + self.fingerprint_hash})",
            f"  target spacing (D, H, W) mm: {[round(s, 4) for s in self.target_spacing]}"
            + (f"  (anisotropic, axis {self.anisotropic_axis})" if self.anisotropic_axis is not None else ""),
            f"  median shape at target: {self.median_shape}",
            f"  {self.dim}D, patch {self.patch_size}, batch {self.batch_size} (memory {self.memory_gb:g} GB)",
            f"  normalization per channel: {self.normalization}, crop to nonzero: {self.crop_to_nonzero}",
            f"  foreground oversampling: {self.foreground_oversample}, label resampling: {self.label_resampling}",
        ]
        return "\n".join(lines)


def normalization_for(modality: str) -> str:
    """``CT`` -> ``ct``; ``noNorm``/``none`` -> ``none``; anything else -> ``zscore``."""
    m = str(modality).casefold()
    if m == "ct":
        return "ct"
    if m in ("nonorm", "none"):
        return "none"
    return "zscore"


def target_spacing(spacings: np.ndarray) -> tuple[list[float], int | None]:
    """Target spacing and its anisotropic axis from ``(N, 3)`` spacings (see the module rules)."""
    spacings = np.asarray(spacings, dtype=np.float64)
    target = np.median(spacings, axis=0)
    axis = anisotropic_axis(target)
    if axis is not None:
        others = [a for a in range(3) if a != axis]
        coarse = float(np.percentile(spacings[:, axis], 10))
        floor = float(max(target[others]))
        target[axis] = coarse if coarse > floor else floor + 1e-5
    return [float(t) for t in target], axis


def _memory(patch: list[int], batch: int, dim: int) -> float:
    return float(np.prod(patch)) * batch * bytes_per_voxel(dim)


def patch_and_batch(median_shape: list[int], dim: int, memory_gb: float, train_voxels: float | None = None
                    ) -> tuple[list[int], int]:
    """Patch and batch size from the median shape (``dim`` axes) and the memory budget."""
    step = 2 ** POOLINGS
    budget = memory_gb * 1e9 * _USABLE
    patch = [step] * dim
    while True:
        grow = [a for a in range(dim) if patch[a] + step <= median_shape[a]]
        if not grow:
            break
        a = min(grow, key=lambda i: (patch[i] / median_shape[i], -median_shape[i], i))
        trial = list(patch)
        trial[a] += step
        if _memory(trial, 2, dim) > budget:
            break
        patch = trial
    batch = int(budget // _memory(patch, 1, dim))
    if train_voxels is not None:
        batch = min(batch, int(round(0.05 * train_voxels / float(np.prod(patch)))))
    return patch, max(2, batch)


def plan(data: CaseDataset | str | os.PathLike, dim: int | str = "auto", memory_gb: float = 8.0, *,
         overrides: Mapping[str, Any] | None = None) -> Plan:
    """Plan a dataset (see the module docstring for every rule).

    Args:
        data: a dataset or a spec for :func:`sslseg.data.load`.
        dim: ``"auto"``, ``2``/``"2d"`` or ``3``/``"3d"``.
        memory_gb: memory budget of one training process on its device.
        overrides: plan fields to force, e.g. ``{"patch_size": [32, 96, 96]}``.

    Returns:
        The :class:`Plan`.

    Raises:
        DataError: a case fails the fingerprint's checks (the message names the file).
        TypeError: an override names no plan field.

    Example:
        >>> p = plan("synthetic:ct?cases=4&unlabeled=1&test=1&size=32")   # doctest: +SKIP
        >>> p.normalization
        ['ct']
    """
    from .dataset import load

    dataset = load(data)
    dim_value = {"auto": None, "2d": 2, "3d": 3, 2: 2, 3: 3}.get(dim if not isinstance(dim, bool) else None, "bad")
    if dim_value == "bad":
        raise ValueError(f"dim must be 'auto', '2d', '3d', 2 or 3, got {dim!r}")
    if isinstance(memory_gb, bool) or not isinstance(memory_gb, (int, float)) or not memory_gb > 0:
        raise ValueError(f"memory_gb must be a positive number, got {memory_gb!r}")
    p = _identity_plan(dataset, dim_value, memory_gb) if dataset.layout != "nifti" else _nifti_plan(dataset, dim_value, memory_gb)
    if overrides:
        p = p.replace(**dict(overrides))
    return p


def _nifti_plan(dataset: CaseDataset, dim: int | None, memory_gb: float) -> Plan:
    from .fingerprint import fingerprint

    fp: Fingerprint = fingerprint(dataset)
    spacings = fp.spacings()
    target, axis = target_spacing(spacings)
    crops = fp.shapes_after_crop()
    shapes = np.asarray([resampled_shape(c, s, target) for c, s in zip(crops, spacings)])
    median = [int(x) for x in np.median(shapes, axis=0)]
    if dim is None:
        dim = 3 if median[0] >= _MIN_SLICES_3D else 2
    labeled = [c["labeled"] and not c.get("test", False) for c in fp.cases.values()]
    train_voxels = float(np.prod(median)) * max(1, sum(labeled))
    patch, batch = patch_and_batch(median if dim == 3 else median[1:], dim, memory_gb, train_voxels)
    n_ch = len(fp.channels)
    names = fp.channel_names if len(fp.channel_names) == n_ch else ["unknown"] * n_ch
    norms = [normalization_for(n) for n in names]
    masked = fp.relative_size_after_crop() < 0.75
    props = [{k: ch[k] for k in ("mean", "std", "percentile_00_5", "percentile_99_5")} for ch in fp.channels]
    return Plan(target_spacing=target, dim=dim, patch_size=patch, batch_size=batch, normalization=norms,
                use_mask_for_norm=[n == "zscore" and masked for n in norms], intensity_properties=props,
                crop_to_nonzero=True, anisotropic_axis=axis, median_shape=median, in_channels=n_ch,
                num_classes=fp.num_classes, class_names=list(fp.class_names), memory_gb=float(memory_gb),
                fingerprint_hash=fp.hash, data_key=fp.data_key)


def _identity_plan(dataset: CaseDataset, dim: int | None, memory_gb: float) -> Plan:
    from .fingerprint import data_key

    dim = dim or dataset.dim
    shapes = np.asarray([dataset.record(v).shape() for v in dataset.volume_ids])
    median = [int(x) for x in np.median(shapes, axis=0)]
    patch, batch = patch_and_batch(median if dim == 3 else median[1:], dim, memory_gb)
    sp = list(dataset.spacing) if len(dataset.spacing) == 3 else [1.0, *dataset.spacing]
    return Plan(target_spacing=sp, dim=dim, patch_size=patch, batch_size=batch, normalization=["none"] * dataset.in_channels,
                use_mask_for_norm=[False] * dataset.in_channels, crop_to_nonzero=False, median_shape=median,
                in_channels=dataset.in_channels, num_classes=dataset.num_classes, class_names=list(dataset.class_names or ()),
                memory_gb=float(memory_gb), data_key=data_key(dataset), identity=True)


__all__ = ["ANISOTROPY_THRESHOLD", "NORMALIZATIONS", "Plan", "bytes_per_voxel", "normalization_for", "patch_and_batch",
           "plan", "target_spacing"]
