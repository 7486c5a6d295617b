#!/usr/bin/env python3
"""Segment volumes with an sslseg ONNX student, using only numpy and onnxruntime (no torch).

Command line::

    python sslseg_onnx_infer.py MODEL.onnx INPUT.npy --out LABELS.npy [--probabilities PROBS.npy]

As a module (copy this one file next to your code)::

    from sslseg_onnx_infer import OnnxSegmenter
    seg = OnnxSegmenter("student.onnx")
    labels = seg.predict(volume)                       # (D, H, W) int64
    labels, probs = seg.predict(volume, probabilities=True)   # + (K, D, H, W) float32

The model file is what ``sslseg export --format onnx`` writes: input ``image``, output ``logits``,
dynamic batch and spatial dims, and the metadata JSON under the ``metadata_props`` key ``sslseg``
(format ``sslseg-export/1``: ``dim``, ``in_channels``, ``num_classes``, ``patch_size``,
``intensity``, ...). The prediction reproduces ``sslseg.infer`` step by step:

1. The input, ``(C, D, H, W)`` or ``(D, H, W)`` (one channel), is cast to float32 and normalised
   per channel (``zscore``, ``minmax`` or ``none``, from the metadata), as
   ``sslseg.data.storage.normalize_intensity`` does.
2. 3D models: sliding window with MONAI's grid (window = ``patch_size``, overlap 0.5; a volume
   smaller than the window is zero-padded, ``(window - size) // 2`` before), 4 windows per run;
   each window's softmax is weighted by a Gaussian importance map (sigma = 0.125 * window, floored
   at ``max(min, 1e-3)``) and the sum is divided by the summed weights. Labels are the argmax of
   these blended probabilities.
3. 2D models: slice by slice along D, 16 slices per run; each slice is resized to ``patch_size``
   (bilinear, ``align_corners=False``, PyTorch's formula), labels are the argmax at the patch size
   resized back by nearest neighbour (PyTorch's ``mode="nearest"`` index rule), probabilities are
   the softmax resized back bilinearly.

Models trained with a plan (metadata ``plan``, a NIfTI folder preprocessed by sslseg): step 1 is
instead the plan's crop to the nonzero box and its per-channel normalisation (``ct``: clip to the
dataset's foreground 0.5/99.5 percentiles, z-score with its mean/std; ``zscore``; ``none``), and
the labels (probabilities) are put back into the whole volume with background outside the crop.
This runner does **not** resample: it takes volumes at the plan's target spacing only (give
``--spacing``; any other spacing is refused with an error naming both). Resample other scans
first, or segment them with ``sslseg infer``.

Results equal ``sslseg.infer`` on the PyTorch model up to floating point: identical labels except
at exact ties, probabilities within about 1e-6 (the network itself runs in onnxruntime).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "FORMAT",
    "OnnxSegmenter",
    "RunnerError",
    "gaussian_importance",
    "load_volume",
    "main",
    "check_plan_spacing",
    "nonzero_box",
    "normalize_intensity",
    "normalize_plan",
    "predict_slicewise",
    "resize_bilinear",
    "resize_nearest",
    "sliding_window",
    "window_grid",
]

#: The metadata format this runner reads.
FORMAT = "sslseg-export/1"
OVERLAP = 0.5  # sslseg.inference.predict_volume
SIGMA_SCALE = 0.125
WINDOW_BATCH = 4  # windows per run (3D)
SLICE_BATCH = 16  # slices per run (2D)
_INTENSITY_MODES = ("zscore", "minmax", "none")
#: Relative spacing difference accepted for planned models (sslseg.inference.pipeline.SPACING_RTOL).
SPACING_RTOL = 1e-3


class RunnerError(ValueError):
    """Bad input: an unreadable file, wrong dims or channels, NaN voxels, unknown metadata."""


# ---- pre-processing ---------------------------------------------------------------------------------------


def normalize_intensity(image: np.ndarray, mode: str) -> np.ndarray:
    """Per-channel normalisation of a ``(C, *S)`` float32 image: ``zscore``, ``minmax`` or ``none``.

    The same float32 arithmetic as ``sslseg.data.storage.normalize_intensity``, written out again
    here because this file must run where neither sslseg nor torch is installed.
    """
    if mode not in _INTENSITY_MODES:
        raise RunnerError(f"intensity must be one of {list(_INTENSITY_MODES)}, got {mode!r}")
    if mode == "none":
        return image
    out = np.empty_like(image)
    for c in range(image.shape[0]):
        x = image[c]
        if mode == "zscore":
            std = float(x.std())
            out[c] = (x - float(x.mean())) / (std if std > 0 else 1.0)
        else:
            lo, hi = float(x.min()), float(x.max())
            out[c] = (x - lo) / (hi - lo if hi > lo else 1.0)
    return out


def nonzero_box(image: np.ndarray) -> list[list[int]]:
    """``[[start, stop], ...]`` per spatial axis of the voxels nonzero in any channel (the whole
    volume if none is), as ``sslseg.data.fingerprint.nonzero_bbox``."""
    mask = np.any(image != 0, axis=0)
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append([int(hit[0]), int(hit[-1]) + 1] if hit.size else [0, int(mask.shape[axis])])
    return box


def normalize_plan(image: np.ndarray, plan: dict) -> np.ndarray:
    """A cropped ``(C, ...)`` float32 image normalised per channel as the plan says (``ct``: clip to
    the dataset's foreground percentiles, z-score with its mean/std; ``zscore``: per volume;
    ``none``), the float32 arithmetic of ``sslseg.data.preprocess.normalize`` without a mask."""
    out = np.empty(image.shape, np.float32)
    norms = plan["normalization"]
    for c in range(image.shape[0]):
        x = image[c]
        scheme = norms[c] if c < len(norms) else "zscore"
        if scheme == "ct":
            p = plan["intensity_properties"][c]
            x = np.clip(x, p["percentile_00_5"], p["percentile_99_5"])
            out[c] = (x - p["mean"]) / max(p["std"], 1e-8)
        elif scheme == "zscore":
            out[c] = (x - x.mean()) / max(float(x.std()), 1e-8)
        else:
            out[c] = x
    return out


def check_plan_spacing(plan: dict, spacing: Sequence[float] | None, dim: int, where: str) -> None:
    """Refuse a volume that is not at the plan's target spacing (this runner does not resample).

    Raises:
        RunnerError: no spacing, or one that differs from the target by more than :data:`SPACING_RTOL`.
    """
    target = [float(t) for t in plan["target_spacing"]]
    if spacing is None:
        raise RunnerError(f"{where}: the model was trained with a plan: give the volume's spacing (D, H, W) in mm "
                          f"(--spacing), which must equal the plan's target spacing {target}")
    spacing = [float(s) for s in spacing]
    if len(spacing) != 3 or not all(s > 0 for s in spacing):
        raise RunnerError(f"{where}: spacing must be 3 positive numbers (D, H, W) in mm, got {spacing}")
    axes = range(1, 3) if dim == 2 else range(3)  # 2D plans keep each volume's own slice distance
    if any(abs(spacing[a] - target[a]) > SPACING_RTOL * target[a] for a in axes):
        raise RunnerError(f"{where}: expected a volume at the plan's target spacing {target} mm (D, H, W), got "
                          f"spacing {spacing} mm; this runner does not resample: resample the volume to the target "
                          "spacing first, or segment it with `sslseg infer`, which does")


def as_volume(array: np.ndarray, where: str, in_channels: int) -> np.ndarray:
    """Check a raw input and return it as a contiguous ``(C, D, H, W)`` float32 array.

    Raises:
        RunnerError: non-numeric data, wrong number of dims or channels, empty, NaN or Inf voxels.
    """
    array = np.asarray(array)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise RunnerError(f"{where}: expected a real-valued numeric array, got dtype {array.dtype}")
    if array.ndim == 3:
        array = array[None]
    elif array.ndim != 4:
        raise RunnerError(f"{where}: expected a volume (D, H, W) or (C, D, H, W), got shape {list(array.shape)}")
    if array.shape[0] != in_channels:
        raise RunnerError(f"{where}: the model takes {in_channels} channel(s) on axis 0, got shape {list(array.shape)}")
    if array.size == 0:
        raise RunnerError(f"{where}: the volume is empty (shape {list(array.shape)})")
    image = np.ascontiguousarray(array, dtype=np.float32)
    finite = np.isfinite(image)
    if not finite.all():
        kind = "NaN" if np.isnan(image).any() else "Inf"
        raise RunnerError(f"{where}: the volume contains {kind} ({int((~finite).sum())} non-finite voxel(s) of {image.size})")
    return image


# ---- resizing with PyTorch's index rules (F.interpolate, float32) ----------------------------------------


def _linear_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of ``mode="bilinear", align_corners=False`` along one axis."""
    scale = np.float32(in_size) / np.float32(out_size)
    # scale * (i + 0.5) - 0.5 rounded once to float32: PyTorch's CPU kernels evaluate it as a fused
    # multiply-add (x86-64 with AVX2), and two roundings would move some weights by ~1e-6.
    src = (np.float64(scale) * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    w0 = np.float32(1) - w1
    return i0, i1, w0, w1


def resize_bilinear(x: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` for ``(N, C, H, W)`` float32."""
    h0, h1, hw0, hw1 = _linear_weights(x.shape[2], int(size[0]))
    w0i, w1i, ww0, ww1 = _linear_weights(x.shape[3], int(size[1]))
    top = x[:, :, h0]  # (N, C, H', W)
    bottom = x[:, :, h1]
    row0 = top[..., w0i] * ww0 + top[..., w1i] * ww1
    row1 = bottom[..., w0i] * ww0 + bottom[..., w1i] * ww1
    return (row0 * hw0[:, None] + row1 * hw1[:, None]).astype(np.float32, copy=False)


def _nearest_index(in_size: int, out_size: int) -> np.ndarray:
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, in_size - 1)


def resize_nearest(x: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """``F.interpolate(x, size, mode="nearest")`` for ``(N, C, H, W)`` arrays (any dtype)."""
    return x[:, :, _nearest_index(x.shape[2], int(size[0]))][..., _nearest_index(x.shape[3], int(size[1]))]


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    e = np.exp(np.maximum(x - m, np.float32(-88.0)))
    return e * (np.float32(1) / e.sum(axis=axis, keepdims=True))


# ---- 2D networks: slice by slice --------------------------------------------------------------------------


def predict_slicewise(network: Callable[[np.ndarray], np.ndarray], image: np.ndarray, patch_size: Sequence[int],
                      *, probabilities: bool = False, batch_size: int = SLICE_BATCH):
    """Labels ``(D, H, W)`` int64 (and probabilities ``(K, D, H, W)``) of a 2D network on a volume.

    Args:
        network: ``(N, C, *patch_size) float32 -> (N, K, *patch_size)`` logits.
        image: ``(C, D, H, W)`` normalised float32 volume.
        patch_size: ``(H, W)`` the network was trained at.
        probabilities: Also return the softmax, resized back bilinearly.
        batch_size: Slices per network call.
    """
    _, d, h, w = image.shape
    ph, pw = (int(p) for p in patch_size)
    resize = (h, w) != (ph, pw)
    slices = image.transpose(1, 0, 2, 3)  # (D, C, H, W)
    labels, probs = [], []
    for start in range(0, d, batch_size):
        x = np.ascontiguousarray(slices[start:start + batch_size])
        if resize:
            x = resize_bilinear(x, (ph, pw))
        logits = network(x).astype(np.float32, copy=False)
        lab = logits.argmax(axis=1)[:, None]
        labels.append((resize_nearest(lab, (h, w)) if resize else lab)[:, 0].astype(np.int64))
        if probabilities:
            p = _softmax(logits, axis=1)
            probs.append(resize_bilinear(p, (h, w)) if resize else p)
    lab_out = np.concatenate(labels)
    if not probabilities:
        return lab_out
    return lab_out, np.ascontiguousarray(np.concatenate(probs).transpose(1, 0, 2, 3))


# ---- 3D networks: sliding window --------------------------------------------------------------------------


def window_grid(spatial_size: Sequence[int], roi_size: Sequence[int], overlap: float = OVERLAP
                ) -> tuple[list[list[int]], list[int]]:
    """Window starts per axis (negative where the volume is padded) and the padding before it.

    MONAI's ``dense_patch_slices`` grid, as ``sslseg.inference.window_grid`` builds it: along each
    axis the step is ``int(roi * (1 - overlap))`` (at least 1), windows start at its multiples,
    and the last one is moved back to end at the border; an axis shorter than the window is padded
    to it, ``(roi - size) // 2`` before.
    """
    starts, pad_before = [], []
    for size, roi in zip((int(s) for s in spatial_size), (int(r) for r in roi_size)):
        padded = max(size, roi)
        before = (padded - size) // 2
        interval = roi if roi == padded else max(int(roi * (1 - overlap)), 1)
        num = int(math.ceil(float(padded) / interval))
        n = next((k + 1 for k in range(num) if k * interval + roi >= padded), 1)
        axis = []
        for k in range(n):
            s = k * interval
            s -= max(s + roi - padded, 0)
            axis.append(s - before)
        starts.append(axis)
        pad_before.append(before)
    return starts, pad_before


def gaussian_importance(roi_size: Sequence[int], sigma_scale: float = SIGMA_SCALE) -> np.ndarray:
    """MONAI's Gaussian importance map ``(*roi_size)`` float32, as sslseg blends windows.

    Per axis ``exp(x**2 / (-2 sigma**2))`` with ``x`` centred on the window and
    ``sigma = sigma_scale * roi``; the outer product, floored at ``max(min(map), 1e-3)``.
    """
    factors = []
    for r in (int(r) for r in roi_size):
        sigma = r * sigma_scale
        x = np.arange(-(r - 1) / 2.0, (r - 1) / 2.0 + 1, dtype=np.float32)
        arg = x**2 / np.float32(-2 * sigma**2)
        factors.append(np.exp(arg.astype(np.float64)).astype(np.float32))
    floor = factors[0].min()
    for f in factors[1:]:
        floor = floor * f.min()
    floor = max(floor, np.float32(1e-3))
    m = factors[0]
    for i, f in enumerate(factors[1:], start=1):
        m = m[..., None] * f.reshape((1,) * i + (-1,))
    return np.maximum(m, floor).astype(np.float32)


def sliding_window(network: Callable[[np.ndarray], np.ndarray], image: np.ndarray, roi_size: Sequence[int], *,
                   overlap: float = OVERLAP, sigma_scale: float = SIGMA_SCALE, batch_size: int = WINDOW_BATCH
                   ) -> np.ndarray:
    """Blended class probabilities ``(K, D, H, W)`` of a 3D network on a ``(C, D, H, W)`` volume.

    Each window's logits go through a softmax over classes, are multiplied by the Gaussian
    importance map and added up (windows in C order, as sslseg's kernel adds them); the sum is
    divided by the summed importance of the windows covering each voxel.
    """
    spatial = image.shape[1:]
    roi = [int(r) for r in roi_size]
    starts, before = window_grid(spatial, roi, overlap)
    # Zero padding where the volume is smaller than the window (sslseg's gather pads with 0).
    after = [max(r - s, 0) - b for r, s, b in zip(roi, spatial, before)]
    src = np.pad(image, [(0, 0)] + list(zip(before, after))) if any(before) or any(after) else image
    imp = gaussian_importance(roi, sigma_scale)
    windows = [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]
    out = weight = None
    for first in range(0, len(windows), batch_size):
        chunk = windows[first:first + batch_size]
        batch = np.stack([src[:, a + before[0]:a + before[0] + roi[0], b + before[1]:b + before[1] + roi[1],
                              c + before[2]:c + before[2] + roi[2]] for a, b, c in chunk])
        probs = _softmax(network(batch).astype(np.float32, copy=False), axis=1)
        if out is None:
            out = np.zeros((probs.shape[1], *spatial), dtype=np.float32)
            weight = np.zeros(spatial, dtype=np.float32)
        for p, (a, b, c) in zip(probs, chunk):
            # The part of the window inside the volume.
            lo = [max(s, 0) for s in (a, b, c)]
            hi = [min(s + r, n) for s, r, n in zip((a, b, c), roi, spatial)]
            dst = tuple(slice(x, y) for x, y in zip(lo, hi))
            crop = tuple(slice(x - s, y - s) for x, y, s in zip(lo, hi, (a, b, c)))
            out[(slice(None), *dst)] += p[(slice(None), *crop)] * imp[crop]
            weight[dst] += imp[crop]
    return out / weight[None]


# ---- the model --------------------------------------------------------------------------------------------


class OnnxSegmenter:
    """An sslseg ONNX student in an onnxruntime session, with its metadata.

    Args:
        model_path: The ``.onnx`` file written by ``sslseg export``.
        providers: onnxruntime execution providers (default ``["CPUExecutionProvider"]``).
        threads: Intra-op threads (default: onnxruntime's choice).

    Raises:
        RunnerError: the file is missing or not an ONNX model, or its metadata is missing or of
            another format.
    """

    def __init__(self, model_path: str | os.PathLike, *, providers: Sequence[str] | None = None,
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        path = Path(model_path)
        if not path.is_file():
            raise RunnerError(f"{path}: model file not found")
        options = ort.SessionOptions()
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise RunnerError(f"threads must be an int >= 1, got {threads!r}")
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as exc:  # onnxruntime raises its own exception types for invalid files
            raise RunnerError(f"{path}: cannot load the ONNX model ({type(exc).__name__}: {exc})") from None
        self.path = path
        self.metadata = self._read_metadata(self.session.get_modelmeta().custom_metadata_map, path)
        meta = self.metadata
        self.dim = int(meta["dim"])
        self.in_channels = int(meta["in_channels"])
        self.num_classes = int(meta["num_classes"])
        self.patch_size = [int(p) for p in meta["patch_size"]]
        self.intensity = str(meta["intensity"])
        plan = meta.get("plan")
        #: The data plan of a model trained on a planned NIfTI folder (None: intensity applies).
        self.plan = plan if isinstance(plan, dict) and not plan.get("identity", False) else None
        if self.plan is not None and any(self.plan.get("use_mask_for_norm") or []):
            raise RunnerError(f"{path}: the model's plan z-scores within a filled foreground mask, which this runner "
                              "does not implement; segment with `sslseg infer`")
        names = [i.name for i in self.session.get_inputs()]
        self.input_name = meta.get("input_name") or names[0]
        if self.input_name not in names:
            raise RunnerError(f"{path}: metadata names input {self.input_name!r}, the graph has {names}")
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = meta.get("output_name") or outputs[0]
        if self.output_name not in outputs:
            raise RunnerError(f"{path}: metadata names output {self.output_name!r}, the graph has {outputs}")

    @staticmethod
    def _read_metadata(props: dict, path: Path) -> dict:
        text = props.get("sslseg")
        if text is None:
            raise RunnerError(f"{path}: no 'sslseg' metadata in the model (metadata_props keys: {sorted(props)}); "
                              "export it with `sslseg export --format onnx`")
        try:
            meta = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RunnerError(f"{path}: the 'sslseg' metadata is not valid JSON ({exc})") from None
        if not isinstance(meta, dict):
            raise RunnerError(f"{path}: the 'sslseg' metadata must be a JSON object, got {type(meta).__name__}")
        if meta.get("format") != FORMAT:
            raise RunnerError(f"{path}: metadata format must be {FORMAT!r}, got {meta.get('format')!r}; "
                              "re-export the model with a matching sslseg version")
        missing = [k for k in ("dim", "in_channels", "num_classes", "patch_size", "intensity") if k not in meta]
        if missing:
            raise RunnerError(f"{path}: metadata is missing {missing}")
        dim = meta["dim"]
        if dim not in (2, 3):
            raise RunnerError(f"{path}: metadata dim must be 2 or 3, got {dim!r}")
        patch = meta["patch_size"]
        if not isinstance(patch, list) or len(patch) != dim or not all(isinstance(p, int) and p > 0 for p in patch):
            raise RunnerError(f"{path}: metadata patch_size must be {dim} positive ints, got {patch!r}")
        if meta["intensity"] not in _INTENSITY_MODES:
            raise RunnerError(f"{path}: metadata intensity must be one of {list(_INTENSITY_MODES)}, "
                              f"got {meta['intensity']!r}")
        return meta

    def network(self, x: np.ndarray) -> np.ndarray:
        """Logits ``(N, K, *spatial)`` of a float32 batch ``(N, C, *spatial)``."""
        (logits,) = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})
        if logits.shape[0] != x.shape[0] or logits.shape[1] != self.num_classes or logits.shape[2:] != x.shape[2:]:
            raise RunnerError(f"{self.path}: the model mapped input {list(x.shape)} to {list(logits.shape)}, expected "
                              f"({x.shape[0]}, {self.num_classes}, *{list(x.shape[2:])})")
        return logits

    def predict(self, image: np.ndarray, *, probabilities: bool = False, where: str = "image",
                spacing: Sequence[float] | None = None):
        """Segment one raw volume, as ``sslseg.infer`` does.

        Args:
            image: ``(C, D, H, W)`` or ``(D, H, W)`` raw intensities (any real dtype).
            probabilities: Also return the class probabilities ``(K, D, H, W)`` float32.
            where: Name of the volume in error messages.
            spacing: Voxel spacing ``(D, H, W)`` in mm; required for a model trained with a plan,
                and then it must be the plan's target spacing (this runner crops and normalises as
                the plan says, but does not resample).

        Returns:
            Labels ``(D, H, W)`` int64, or ``(labels, probabilities)``.

        Raises:
            RunnerError: wrong dims or channels, empty, non-numeric, NaN or Inf voxels; a planned
                model's volume without its spacing or at another spacing.
        """
        volume = as_volume(image, where, self.in_channels)
        if self.plan is None:
            return self._predict(normalize_intensity(volume, self.intensity), probabilities)
        check_plan_spacing(self.plan, spacing, self.dim, where)
        shape = volume.shape[1:]
        box = nonzero_box(volume) if self.plan.get("crop_to_nonzero", True) else [[0, s] for s in shape]
        inside = tuple(slice(a, b) for a, b in box)
        result = self._predict(normalize_plan(volume[(slice(None), *inside)], self.plan), probabilities)
        labels_crop, probs_crop = result if probabilities else (result, None)
        labels = np.zeros(shape, np.int64)  # background outside the crop, as sslseg.infer uncrops
        labels[inside] = labels_crop
        if not probabilities:
            return labels
        probs = np.zeros((self.num_classes, *shape), np.float32)
        probs[0] = 1.0
        probs[(slice(None), *inside)] = probs_crop
        return labels, probs

    def _predict(self, x: np.ndarray, probabilities: bool):
        if self.dim == 2:
            return predict_slicewise(self.network, x, self.patch_size, probabilities=probabilities)
        probs = sliding_window(self.network, x, self.patch_size)
        labels = probs.argmax(axis=0).astype(np.int64)
        return (labels, probs) if probabilities else labels


# ---- files and the command line ---------------------------------------------------------------------------


def load_volume(path: str | os.PathLike) -> np.ndarray:
    """The array in a ``.npy`` file (no pickles).

    Raises:
        RunnerError: the file is missing or not a readable ``.npy`` array.
    """
    path = Path(path)
    if not path.is_file():
        raise RunnerError(f"{path}: input file not found")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError / OSError / EOFError for bad files
        raise RunnerError(f"{path}: unreadable .npy file ({type(exc).__name__}: {exc})") from None


def _save(path: Path, array: np.ndarray) -> None:
    """``np.save`` to a temporary file next to ``path``, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _label_dtype(choice: str, num_classes: int) -> type:
    if choice == "auto":  # as `sslseg infer` writes .npy label maps
        return np.uint8 if num_classes <= 256 else np.int64
    if choice == "uint8" and num_classes > 256:
        raise RunnerError(f"--label-dtype uint8 holds at most 256 classes, the model has {num_classes}")
    return np.uint8 if choice == "uint8" else np.int64


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status (2 for bad arguments or input)."""
    parser = argparse.ArgumentParser(
        prog="sslseg_onnx_infer",
        description="Segment a volume with an sslseg ONNX model (numpy + onnxruntime only), as sslseg.infer does.")
    parser.add_argument("model", help="the .onnx file written by `sslseg export --format onnx`")
    parser.add_argument("input", help=".npy volume, (C, D, H, W) or (D, H, W), raw intensities")
    parser.add_argument("--out", required=True, help="where to write the label map (D, H, W) .npy")
    parser.add_argument("--probabilities", metavar="PROBS", help="also write the probabilities (K, D, H, W) float32 .npy")
    parser.add_argument("--label-dtype", choices=("auto", "uint8", "int64"), default="auto",
                        help="auto (default): uint8 up to 256 classes, else int64 (as `sslseg infer`)")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("D", "H", "W"), default=None,
                        help="voxel spacing in mm; required for models trained with a plan (must be the plan's "
                             "target spacing: this runner does not resample)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--provider", action="append", default=None,
                        help="onnxruntime execution provider (repeatable; default CPUExecutionProvider)")
    args = parser.parse_args(argv)
    try:
        seg = OnnxSegmenter(args.model, providers=args.provider, threads=args.threads)
        dtype = _label_dtype(args.label_dtype, seg.num_classes)
        image = load_volume(args.input)
        result = seg.predict(image, probabilities=args.probabilities is not None, where=str(args.input),
                             spacing=args.spacing)
        labels, probs = result if args.probabilities is not None else (result, None)
        _save(Path(args.out), labels.astype(dtype))
        if probs is not None:
            _save(Path(args.probabilities), probs.astype(np.float32, copy=False))
    except (RunnerError, OSError) as exc:
        print(f"sslseg_onnx_infer: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
