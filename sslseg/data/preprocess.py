"""``sslseg.data.preprocess(data, plan)``: the preprocessed, memory-mappable cache of a dataset.

Per volume, in this order (nnU-Net's): read as stored (with the geometry checks of
:func:`sslseg.data.fingerprint.read_raw`) -> crop to the nonzero bounding box -> normalise at the
original spacing (the plan's scheme per channel) -> resample to the target spacing (image: cubic
spline, anisotropic axis separately; label: the plan's ``label_resampling``) -> write
uncompressed ``.npy`` arrays that training opens with ``np.load(mmap_mode="r")``, so reading a
patch touches only the patch's pages, never the whole volume:

* ``<volume>_image.npy``: float32 ``(C, D, H, W)``;
* ``<volume>_label.npy``: uint8/int16 ``(D, H, W)`` (labeled volumes only);
* ``<volume>_fg.npy``: int32 ``(N, 4)`` rows ``(class, d, h, w)``, up to 10,000 seeded voxels per
  present class, for foreground-oversampled patches;
* ``<volume>.json``: the original geometry (shape, spacing, affine, crop bbox, shape after the
  crop) and the new one, to map predictions back later;
* ``<volume>.done``: written LAST, holding the cache key. A volume counts as preprocessed only if
  its marker holds the current key; every file is written to a temporary name and renamed, so a
  run killed half-way leaves no half-written volume that is read as good.

Location: ``<$SSLSEG_CACHE or ~/.cache/sslseg>/preprocessed/<hash of data key + plan hash>`` (or
``out``). A change of the data files or of the plan changes the key, so a stale cache is rebuilt,
never reused.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from .cache import atomic_save_npy, atomic_write_text, cache_root, save_json, stable_hash
from .errors import DataError
from .fingerprint import has_label, nonzero_bbox, read_raw
from .resample import resample_image, resample_label, resampled_shape
from .storage import VolumeRecord

if TYPE_CHECKING:
    from .dataset import CaseDataset
    from .planning import Plan

FG_SAMPLES = 10000
_FG_SEED = 1234


def cache_key(plan: Plan) -> str:
    """Key of a preprocessed dataset: the data files' hash and the plan's preprocessing hash."""
    return stable_hash([plan.data_key, plan.hash], 24)


def cache_dir(plan: Plan) -> Path:
    """Default cache folder of a plan (see the module docstring)."""
    return cache_root() / "preprocessed" / cache_key(plan)


def normalize(image: np.ndarray, plan: Plan, mask: np.ndarray | None) -> np.ndarray:
    """Apply the plan's per-channel normalisation to a cropped ``(C, ...)`` image (float32).

    ``ct``: clip to the dataset foreground [0.5, 99.5] percentiles, then z-score with the dataset
    foreground mean/std. ``zscore``: per volume, within ``mask`` when the plan says so (voxels
    outside stay 0), else over the whole crop. ``none``: unchanged.
    """
    out = np.empty(image.shape, np.float32)
    for c in range(image.shape[0]):
        x = image[c].astype(np.float32, copy=False)
        scheme = plan.normalization[c] if c < len(plan.normalization) else "zscore"
        if scheme == "ct":
            props = plan.intensity_properties[c]
            x = np.clip(x, props["percentile_00_5"], props["percentile_99_5"])
            out[c] = (x - props["mean"]) / max(props["std"], 1e-8)
        elif scheme == "zscore":
            use_mask = mask is not None and c < len(plan.use_mask_for_norm) and plan.use_mask_for_norm[c]
            if use_mask and mask.any():
                vals = x[mask]
                out[c] = np.where(mask, (x - vals.mean()) / max(float(vals.std()), 1e-8), 0.0)
            else:
                out[c] = (x - x.mean()) / max(float(x.std()), 1e-8)
        else:
            out[c] = x
    return out


def foreground_locations(label: np.ndarray, seed: int) -> np.ndarray:
    """``(N, 4)`` int32 rows ``(class, d, h, w)``: up to 10,000 seeded voxels per present class."""
    rows = []
    rng = np.random.default_rng(np.random.SeedSequence([_FG_SEED, seed]))
    for c in np.unique(label):
        if c <= 0:
            continue
        idx = np.argwhere(label == c)
        if len(idx) > FG_SAMPLES:
            idx = idx[np.sort(rng.choice(len(idx), FG_SAMPLES, replace=False))]
        rows.append(np.concatenate([np.full((len(idx), 1), c, np.int64), idx], axis=1))
    return np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, 4), np.int32)


def preprocess_image(image: np.ndarray, spacing: Sequence[float], plan: Plan) -> tuple[np.ndarray, dict[str, Any]]:
    """Crop, normalise and resample one raw ``(C, D, H, W)`` image as the plan says.

    The one image path of planned data: the cache is written with it, and inference
    (:func:`sslseg.inference.predict_volume` with a plan) runs new scans through it, so a scan
    is seen exactly as the training volumes were.

    Args:
        image: the image as stored (no normalisation), float.
        spacing: its voxel spacing ``(D, H, W)`` in mm.
        plan: the plan (not an identity plan).

    Returns:
        ``(image at the target spacing (C, d, h, w) float32, geometry)`` with geometry keys
        ``original_shape``, ``original_spacing``, ``bbox`` (crop box in the original grid),
        ``shape_after_crop``, ``shape`` and ``spacing`` (of the returned image).
    """
    image = np.asarray(image)
    if image.ndim != 4:
        raise ValueError(f"image must be (C, D, H, W), got shape {tuple(image.shape)}")
    spacing = tuple(float(s) for s in spacing)
    shape = [int(s) for s in image.shape[1:]]
    bbox = nonzero_bbox(image) if plan.crop_to_nonzero else [[0, s] for s in shape]
    image = image[(slice(None), *(slice(a, b) for a, b in bbox))]
    mask = None
    if plan.crop_to_nonzero and any(plan.use_mask_for_norm):
        mask = ndimage.binary_fill_holes(np.any(image != 0, axis=0))
    image = normalize(image, plan, mask)
    target = list(plan.target_spacing)
    if plan.dim == 2:
        target[0] = spacing[0]  # slice-wise training keeps each volume's own slice distance
    new_shape = resampled_shape(image.shape[1:], spacing, target)
    image = resample_image(image, spacing, target, new_shape=new_shape, order_z=plan.order_z)
    geometry = {"original_shape": shape, "original_spacing": list(spacing), "bbox": bbox,
                "shape_after_crop": [b - a for a, b in bbox], "shape": list(new_shape),
                "spacing": [float(t) for t in target]}
    return image, geometry


def preprocess_volume(rec: VolumeRecord, plan: Plan, index: int = 0) -> dict[str, Any]:
    """Preprocess one volume in memory: ``{"image", "label", "fg", "geometry"}``."""
    image, label, spacing = read_raw(rec, plan.num_classes)
    image, geo = preprocess_image(image, spacing, plan)
    if label is not None:
        label = label[tuple(slice(a, b) for a, b in geo["bbox"])]
        dtype = np.uint8 if plan.num_classes <= 255 else np.int16
        label = resample_label(label.astype(dtype), spacing, geo["spacing"], new_shape=geo["shape"],
                               mode=plan.label_resampling, num_classes=plan.num_classes)
    affine = rec.affine()
    geometry = {
        "volume": rec.id, "case": rec.case, "labeled": label is not None,
        "original_shape": geo["original_shape"], "original_spacing": geo["original_spacing"],
        "affine": None if affine is None else np.asarray(affine).tolist(),
        "bbox": geo["bbox"], "shape_after_crop": geo["shape_after_crop"],
        "shape": geo["shape"], "spacing": geo["spacing"],
        "classes_present": [] if label is None else [int(c) for c in np.unique(label) if c > 0],
    }
    fg = foreground_locations(label, index) if label is not None else np.zeros((0, 4), np.int32)
    return {"image": image, "label": label, "fg": fg, "geometry": geometry}


def _write_volume(out: Path, vid: str, result: dict[str, Any], key: str) -> None:
    marker = out / f"{vid}.done"
    if marker.exists():
        marker.unlink()  # being rewritten: not good until the new marker lands
    atomic_save_npy(out / f"{vid}_image.npy", result["image"])
    if result["label"] is not None:
        atomic_save_npy(out / f"{vid}_label.npy", result["label"])
    atomic_save_npy(out / f"{vid}_fg.npy", result["fg"])
    save_json(out / f"{vid}.json", result["geometry"])
    atomic_write_text(marker, key)


def is_done(out: Path, vid: str, key: str) -> bool:
    """True when volume ``vid`` was completely written under ``key``."""
    marker = out / f"{vid}.done"
    try:
        return marker.read_text() == key
    except OSError:
        return False


def _job(args: tuple) -> str:
    rec, plan, out, key, index = args
    _write_volume(Path(out), rec.id, preprocess_volume(rec, plan, index), key)
    return rec.id


@dataclass
class CachedVolume(VolumeRecord):
    """A preprocessed volume in the cache, read through memory maps.

    Attributes:
        folder: the cache folder.
        has_label: whether a label array exists (unlabeled images have none).
        target_spacing: spacing of the arrays (the plan's).
    """

    folder: Path = None  # type: ignore[assignment]
    has_label: bool = True
    target_spacing: tuple[float, ...] = ()
    _arrays: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def location(self) -> str:
        return str(self.folder / f"{self.id}_image.npy")

    def _array(self, what: str) -> np.ndarray:
        # Opened once per process: a memory map costs no memory until pages are touched.
        key = (what, os.getpid())
        arr = self._arrays.get(key)
        if arr is None:
            path = self.folder / f"{self.id}_{what}.npy"
            try:
                arr = np.load(path, mmap_mode="r") if what != "fg" else np.load(path)
            except (OSError, ValueError) as exc:
                raise DataError(f"{path}: unreadable preprocessed array ({exc}); delete the cache folder "
                                f"{self.folder} to rebuild it") from None
            self._arrays[key] = arr
        return arr

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_arrays"] = {}  # memory maps are reopened in each worker
        return state

    def shape(self) -> tuple[int, ...]:
        return tuple(self._array("image").shape[1:])

    def stored_spacing(self) -> tuple[float, ...] | None:
        return tuple(self.target_spacing)

    def geometry(self) -> dict[str, Any]:
        """The original geometry recorded by :func:`preprocess` (shape, spacing, affine, bbox)."""
        return json.loads((self.folder / f"{self.id}.json").read_text())

    def _label_or_raise(self) -> np.ndarray:
        if not self.has_label:
            raise DataError(f"{self.location}: volume {self.id!r} is unlabeled (no label array)")
        return self._array("label")

    def read(self, with_label: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        image = np.array(self._array("image"), dtype=np.float32)
        label = np.array(self._label_or_raise(), dtype=np.int64) if with_label else None
        return image, label

    def read_slice(self, k: int, with_label: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        image = np.array(self._array("image")[:, k], dtype=np.float32)
        label = np.array(self._label_or_raise()[k], dtype=np.int64) if with_label else None
        return image, label

    def read_patch(self, starts, size, with_label: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """The patch at ``starts`` (may lie partly outside: zero-padded) of ``size``; only its
        pages are read."""
        shape = self.shape()
        src = tuple(slice(max(0, a), min(s, a + p)) for a, p, s in zip(starts, size, shape))
        dst = tuple(slice(sl.start - a, sl.stop - a) for sl, a in zip(src, starts))
        img = self._array("image")
        image = np.zeros((img.shape[0], *size), np.float32)
        image[(slice(None), *dst)] = img[(slice(None), *src)]
        label = None
        if with_label:
            label = np.zeros(tuple(size), np.int64)
            label[dst] = self._label_or_raise()[src]
        return image, label

    def foreground(self) -> np.ndarray:
        """``(N, 4)`` rows ``(class, d, h, w)`` of sampled foreground voxels."""
        return self._array("fg") if self.has_label else np.zeros((0, 4), np.int32)


def _progress(total: int, desc: str, progress: bool | None):
    show = sys.stderr.isatty() if progress is None else bool(progress)
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional: no bar
        tqdm = None
    if tqdm is None or not show:
        return None
    return tqdm(total=total, desc=desc, unit="case", disable=not show)


def preprocess(data: CaseDataset | str | os.PathLike, plan: Plan | str | os.PathLike | None = None, *,
               out: str | os.PathLike | None = None, jobs: int = 1, progress: bool | None = None) -> Path:
    """Preprocess every volume of a dataset into the cache (see the module docstring).

    Volumes already preprocessed under the same key are skipped, so calling it again is cheap.

    Args:
        data: a dataset or a spec for :func:`sslseg.data.load`.
        plan: a :class:`Plan`, a ``plan.json`` path, or None to plan with defaults.
        out: cache folder (default: keyed by data and plan under the cache root).
        jobs: worker processes.
        progress: show a progress bar (default: when stderr is a terminal).

    Returns:
        The cache folder.

    Raises:
        DataError: a volume fails the checks (the message names the file).
    """
    from .dataset import load
    from .planning import Plan
    from .planning import plan as make_plan

    dataset = load(data)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an int >= 1, got {jobs!r}")
    if plan is None:
        plan = make_plan(dataset)
    elif not isinstance(plan, Plan):
        plan = Plan.from_json(plan)
    if plan.identity:
        raise ValueError(f"dataset {dataset.name!r} has an identity plan (already preprocessed data): nothing to preprocess")
    from .fingerprint import data_key

    current = data_key(dataset)
    if plan.data_key and plan.data_key != current:
        raise DataError(f"{dataset.root}: the plan was made for other data (data key {plan.data_key[:12]}..., the files "
                        f"now hash to {current[:12]}...): re-run `sslseg plan`")
    key = cache_key(plan)
    folder = Path(out) if out is not None else cache_dir(plan)
    folder.mkdir(parents=True, exist_ok=True)
    plan.to_json(folder / "plan.json")
    records = [dataset.record(v) for v in dataset.volume_ids]
    todo = [(rec, plan, str(folder), key, i) for i, rec in enumerate(records) if not is_done(folder, rec.id, key)]
    bar = _progress(len(todo), "preprocess", progress)
    try:
        if jobs == 1 or len(todo) <= 1:
            for args in todo:
                _job(args)
                if bar is not None:
                    bar.update(1)
        else:
            ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            with ctx.Pool(min(jobs, len(todo))) as pool:
                for _ in pool.imap_unordered(_job, todo):
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    atomic_write_text(folder / "key", key)
    return folder


def cached_records(dataset: CaseDataset, plan: Plan, folder: Path) -> dict[str, CachedVolume]:
    """Cache records of every volume of ``dataset`` (each must be done under the plan's key)."""
    key = cache_key(plan)
    out = {}
    for vid in dataset.volume_ids:
        if not is_done(folder, vid, key):
            raise DataError(f"{folder}: volume {vid!r} is not (completely) preprocessed for this plan; run "
                            f"`sslseg preprocess {dataset.root}`")
        rec = dataset.record(vid)
        spacing = json.loads((folder / f"{vid}.json").read_text())["spacing"]  # 2D plans keep each slice distance
        out[vid] = CachedVolume(vid, rec.case, folder=folder, has_label=has_label(rec), target_spacing=tuple(spacing))
    return out


__all__ = ["CachedVolume", "cache_dir", "cache_key", "cached_records", "foreground_locations", "is_done", "normalize",
           "preprocess", "preprocess_image", "preprocess_volume"]
