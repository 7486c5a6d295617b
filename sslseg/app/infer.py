"""Inference on arrays and files: :func:`infer` and the ``sslseg infer`` command.

A trained network segments volumes as stored the way it was trained and evaluated, through the
model's :class:`~sslseg.inference.Preprocessing` (the one input path of ``sslseg.evaluate`` too):

* a model trained on a NIfTI folder with a plan: crop to nonzero, the plan's normalisation,
  resampling to the plan's spacing, slice-wise (2D) or sliding-window (3D) prediction, class
  probabilities resampled back onto the input's grid and uncropped, argmax;
* a model trained on SSL4MIS h5 layouts or phantoms (stored normalised): the input as it is;
* a model trained on a NIfTI folder without a plan: its per-volume mode (``zscore``/``minmax``).

``intensity=`` overrides the per-volume mode of a model without a plan (e.g. ``minmax`` to feed
a raw NIfTI scan to a model trained on ACDC h5 files). Files come back in their own format and
geometry (the label map always has the input's shape):

* NIfTI (``.nii``, ``.nii.gz``): the label map is written with the input's affine and header
  (voxel for voxel, ``uint8`` labels, ``int16`` beyond 256 classes); nnU-Net channel files
  ``case_0000.nii.gz``, ``case_0001.nii.gz``, ... are gathered from the first one and written as
  ``case.nii.gz``. Probabilities go to ``<name>_probs.nii.gz`` (``(x, y, z, K)`` float32).
* NRRD and MetaImage (``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``; read and written through SimpleITK,
  ``pip install 'sslseg[itk]'``): the label map is written in the input's format with its size,
  spacing, origin and direction (channel files gathered as for NIfTI); probabilities go to
  ``<name>_probs<ext>`` as a ``K``-component vector image. Detached headers (``.mhd``, ``.nhdr``)
  are written with their data file beside them, the header last.
* h5 (SSL4MIS layout, dataset ``image``): ``<name>.h5`` with ``label`` (and ``probabilities``).
* numpy (``.npy``, ``(D, H, W)`` or ``(C, D, H, W)``): ``<name>.npy`` labels, ``<name>_probs.npy``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sslseg.utils.precision import AMP_CHOICES

__all__ = ["INPUT_EXTENSIONS", "infer", "register_cli"]

#: File types :func:`infer` reads (and writes back).
INPUT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".h5", ".npy")
#: File types read and written through SimpleITK (the ``[itk]`` extra).
_ITK_EXTENSIONS = (".nrrd", ".nhdr", ".mha", ".mhd")
# A 3D input whose spacing differs from training by more than this (relative, per axis) is flagged:
# sslseg does not resample, and a network sees anatomy at the wrong scale.
_SPACING_TOLERANCE = 0.25


# ---- reading inputs ---------------------------------------------------------------------------------------


@dataclass
class _Case:
    """One volume to segment: its output name, format and the file(s) holding it."""

    name: str
    kind: str  # "nifti" | "itk" | "h5" | "npy"
    paths: list[Path]
    suffix: str  # the input's extension, reused for the output (".nii.gz", ".nii", ".mha", ".h5", ".npy", ...)


def _split_name(path: Path) -> tuple[str, str] | None:
    """``(stem, extension)`` for the file types :func:`infer` reads, else None."""
    for ext in INPUT_EXTENSIONS:
        if path.name.endswith(ext) and len(path.name) > len(ext):
            return path.name[: -len(ext)], ext
    return None


def _channel_files(first: Path, stem_case: str, ext: str, in_channels: int) -> list[Path]:
    """``case_0000`` plus its siblings ``case_0001``..., as many as the model takes."""
    paths = [first]
    for c in range(1, in_channels):
        p = first.with_name(f"{stem_case}_{c:04d}{ext}")
        if not p.is_file():
            raise FileNotFoundError(f"infer: {first} is channel 0 of a {in_channels}-channel case, but channel file "
                                    f"{p.name} does not exist (the model takes {in_channels} channels)")
        paths.append(p)
    return paths


def _collect_cases(inputs: Sequence[Path], in_channels: int) -> list[_Case]:
    """Expand directories, group nnU-Net channel files, and name each output."""
    from sslseg.data.layouts import CHANNEL_RE  # the data layer's nnU-Net channel-suffix convention

    files: list[Path] = []
    for p in inputs:
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith(".")
                           and _split_name(q) is not None)
            if not found:
                raise FileNotFoundError(f"infer: directory {p} holds no {'/'.join(INPUT_EXTENSIONS)} files")
            files.extend(found)
        elif p.is_file():
            if _split_name(p) is None:
                raise ValueError(f"infer: {p}: unknown file type (expected one of {list(INPUT_EXTENSIONS)})")
            files.append(p)
        else:
            raise FileNotFoundError(f"infer: input {p} does not exist")
    listed = {f.resolve() for f in files}
    cases: list[_Case] = []
    gathered: set[Path] = set()
    for f in files:
        if f.resolve() in gathered:
            continue
        stem, ext = _split_name(f)
        kind = "nifti" if ext.startswith(".nii") else "itk" if ext in _ITK_EXTENSIONS else ext[1:]
        m = CHANNEL_RE.match(stem) if kind in ("nifti", "itk") else None
        if m is not None and int(m.group("ch")) == 0:
            if in_channels > 1:
                paths = _channel_files(f, m.group("case"), ext, in_channels)
                gathered.update(q.resolve() for q in paths)
                cases.append(_Case(m.group("case"), kind, paths, ext))
                continue
            sibling = f.with_name(f"{m.group('case')}_0001{ext}")
            if not sibling.is_file() and sibling.resolve() not in listed:
                # nnU-Net's single-channel naming: case_0000.nii.gz -> case.nii.gz (case_0000.mha -> case.mha)
                cases.append(_Case(m.group("case"), kind, [f], ext))
                continue
        cases.append(_Case(stem, kind, [f], ext))
    return cases


def _read_case(case: _Case) -> tuple[np.ndarray, tuple[float, ...] | None, Any]:
    """``(image (C, D, H, W) float32, spacing or None, reference or None)``: the reference is the
    nibabel image of a NIfTI input, the :class:`~sslseg.data.storage.ItkImageFile` of an NRRD or
    MetaImage input (the geometry its outputs are written with)."""
    from sslseg.data.errors import DataError
    from sslseg.data.storage import H5Volume, NiftiVolume, open_image

    where = str(case.paths[0])
    try:
        if case.kind in ("nifti", "itk"):
            vol = NiftiVolume(id=case.name, case=case.name, image_paths=list(case.paths), intensity="none")
            image, _ = vol.read(with_label=False)
            return image, vol.stored_spacing(), open_image(case.paths[0])
        if case.kind == "h5":
            vol = H5Volume(id=case.name, case=case.name, path=case.paths[0])
            image, _ = vol.read(with_label=False)
            return image, vol.stored_spacing(), None
        array = np.load(case.paths[0], allow_pickle=False)
    except DataError:
        raise
    except Exception as exc:  # numpy raises ValueError / OSError / EOFError / UnpicklingError for bad files
        raise ValueError(f"infer: {where}: unreadable {case.kind} file ({type(exc).__name__}: {exc})") from None
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise ValueError(f"infer: {where}: expected a real-valued numeric array, got dtype {array.dtype}")
    return _as_volume(array, where), None, None


def _as_volume(array: np.ndarray, where: str) -> np.ndarray:
    """``(D, H, W)`` -> ``(1, D, H, W)``; ``(C, D, H, W)`` as is; anything else is an error."""
    if array.ndim == 3:
        array = array[None]
    elif array.ndim != 4:
        raise ValueError(f"infer: {where} must be a volume (D, H, W) or (C, D, H, W), got shape {list(array.shape)}"
                         f"{' (a single 2D image: add a slice axis, e.g. image[None])' if array.ndim == 2 else ''}")
    return np.ascontiguousarray(array, dtype=np.float32)


# ---- prediction -------------------------------------------------------------------------------------------


def _check_spacing(spacing: Any, name: str = "spacing") -> tuple[float, float, float] | None:
    if spacing is None:
        return None
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise TypeError(f"infer: {name} must be 3 numbers (D, H, W) in mm, got {spacing!r}") from None
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"infer: {name} must be 3 positive numbers (D, H, W) in mm, got {spacing!r}")
    return values  # type: ignore[return-value]


def _warn_spacing(where: str, spacing: Sequence[float] | None, record: dict[str, Any]) -> None:
    trained = record.get("spacing")
    if record.get("plan") is not None:
        return  # a planned model resamples every input to its plan's spacing
    if record["dim"] != 3 or spacing is None or not trained or len(trained) != len(spacing):
        return  # 2D networks see resized slices; without both spacings there is nothing to compare
    if any(abs(s - t) > _SPACING_TOLERANCE * t for s, t in zip(spacing, trained)):
        shown = tuple(round(s, 4) for s in spacing)
        warnings.warn(f"infer: {where}: voxel spacing {shown} mm differs from the training "
                      f"spacing {tuple(trained)} mm by more than {_SPACING_TOLERANCE:.0%}; sslseg does not resample, "
                      "so resample the input to the training spacing for reliable results", stacklevel=3)


def _predict(model, image: np.ndarray, record: dict[str, Any], *, preprocessing, spacing, probabilities: bool,
             tta: bool, device, where: str, autocast_dtype=None):
    """Labels ``(D, H, W)`` int64 (and probabilities ``(K, D, H, W)``) on ``device``, on the input's grid."""
    import torch

    from sslseg.inference.predict import check_image, predict_volume

    # The raw input is checked before normalisation, so that a NaN voxel is reported as one voxel and
    # not as the whole volume it would spread to.
    check_image(torch.from_numpy(image), int(record["in_channels"]), where)
    x = torch.from_numpy(image).to(device)
    kwargs = dict(dim=int(record["dim"]), patch_size=[int(p) for p in record["patch_size"]], tta=tta,
                  in_channels=int(record["in_channels"]), name=where, preprocessing=preprocessing, spacing=spacing,
                  autocast_dtype=autocast_dtype)
    if not probabilities:
        return predict_volume(model, x, output="labels", **kwargs), None
    probs = predict_volume(model, x, output="probs", **kwargs)
    if record["dim"] == 3 or preprocessing.resamples:
        return probs.argmax(0), probs  # labels are the argmax of the (blended, resampled) probabilities
    # 2D labels come from the network-resolution argmax (the evaluation protocol), probabilities
    # are resized bilinearly: two passes keep the labels equal to a run without probabilities.
    return predict_volume(model, x, output="labels", **kwargs), probs


@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _model_device(model):
    import torch

    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


# ---- writing outputs --------------------------------------------------------------------------------------


def _label_dtype(num_classes: int, kind: str):
    if num_classes <= 256:
        return np.uint8
    return np.int16 if kind in ("nifti", "itk") else np.int64


def _atomic(path: Path, write) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it into place."""
    # The temporary name keeps the extension: nibabel picks compression from it.
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{''.join(path.suffixes[-2:])}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _atomic_detached(path: Path, write) -> Path:
    """:func:`_atomic` for a detached header (``case.mhd`` + ``case.raw``, ``case.nhdr`` +
    ``case.raw.gz``): written under their final names in a temporary folder next to ``path``, then
    renamed into place data file first, header last, so a header never points at missing voxels."""
    tmp_dir = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp_dir.mkdir()
    try:
        write(tmp_dir / path.name)
        for q in sorted(tmp_dir.iterdir(), key=lambda q: q.name == path.name):
            os.replace(q, path.parent / q.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def _outputs(case: _Case, out: Path, probabilities: bool) -> list[Path]:
    labels = out / f"{case.name}{case.suffix}"
    if case.kind == "h5" or not probabilities:
        return [labels]
    probs_suffix = ".nii.gz" if case.kind == "nifti" else case.suffix  # NRRD/MetaImage: vector images
    return [labels, out / f"{case.name}_probs{probs_suffix}"]


def _write_case(case: _Case, paths: list[Path], labels: np.ndarray, probs: np.ndarray | None, reference: Any,
                num_classes: int, spacing: tuple[float, ...] | None) -> None:
    lab = labels.astype(_label_dtype(num_classes, case.kind))
    if case.kind == "nifti":
        from sslseg.data.storage import zyx_to_nifti

        spatial = tuple(reference.shape[:3]) if len(reference.shape) >= 3 else tuple(reference.shape[:2])
        _atomic(paths[0], lambda tmp: _save_nifti(tmp, zyx_to_nifti(lab, spatial), reference))
        if probs is not None:
            grid = spatial if len(spatial) == 3 else (*spatial, 1)
            _atomic(paths[1], lambda tmp: _save_nifti(tmp, zyx_to_nifti(probs.astype(np.float32), grid), reference))
    elif case.kind == "itk":
        save = _atomic_detached if case.suffix in (".mhd", ".nhdr") else _atomic
        save(paths[0], lambda tmp: _save_itk(tmp, lab, reference))
        if probs is not None:
            save(paths[1], lambda tmp: _save_itk(tmp, probs.astype(np.float32), reference))
    elif case.kind == "h5":
        import h5py

        def write_h5(tmp: Path) -> None:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("label", data=lab, compression="gzip")
                if probs is not None:
                    f.create_dataset("probabilities", data=probs.astype(np.float32), compression="gzip")
                if spacing is not None:
                    f.attrs["spacing"] = np.asarray(spacing, dtype=np.float64)

        _atomic(paths[0], write_h5)
    else:
        _atomic(paths[0], lambda tmp: np.save(tmp, lab))
        if probs is not None:
            _atomic(paths[1], lambda tmp: np.save(tmp, probs.astype(np.float32)))


def _save_nifti(path: Path, data: np.ndarray, reference: Any) -> None:
    """Write ``data`` with ``reference``'s affine and header (its geometry), in ``data``'s dtype."""
    header = reference.header.copy()
    header.set_data_dtype(data.dtype)
    image = type(reference)(data, reference.affine, header)
    # Labels and probabilities are stored as is: a scaling inherited from the input would rescale them.
    image.header.set_slope_inter(1.0, 0.0)
    image.to_filename(str(path))


def _save_itk(path: Path, data: np.ndarray, reference: Any) -> None:
    """Write ``(z, y, x)`` labels or ``(K, z, y, x)`` probabilities (a ``K``-component image) with
    the size, spacing, origin and direction of ``reference`` (an ``ItkImageFile``), through SimpleITK,
    which picks the format from ``path``'s extension."""
    from sslseg.data.storage import import_sitk

    sitk = import_sitk(path)
    vector = data.ndim == 4
    array = np.ascontiguousarray(data.transpose(1, 2, 3, 0) if vector else data)
    n = reference.ndim
    if n == 2:
        array = array[0]  # a 2D input was read as one slice
    image = sitk.GetImageFromArray(array, isVector=vector)
    # The reference's grid, restricted to the spatial axes written (a 4D input's 4th axis holds its channels).
    m = min(n, 3)
    image.SetSpacing(reference.spacing_xyz[:m])
    image.SetOrigin(reference.origin_xyz[:m])
    image.SetDirection(np.asarray(reference.direction).reshape(n, n)[:m, :m].ravel().tolist())
    expected = tuple(reference.shape[:m])
    if tuple(image.GetSize()) != expected:
        raise ValueError(f"infer: {path.name}: predicted grid {tuple(image.GetSize())} (x, y, z) differs from the "
                         f"input grid {expected}")
    sitk.WriteImage(image, str(path), True)


# ---- the public function ----------------------------------------------------------------------------------


def infer(
    model: Any,
    inputs: Any,
    out: str | os.PathLike | None = None,
    *,
    probabilities: bool = False,
    tta: bool = False,
    device: Any = None,
    intensity: str | None = None,
    record: dict[str, Any] | None = None,
    progress: bool | None = None,
    spacing: Sequence[float] | None = None,
    amp: str | None = "auto",
):
    """Segment volumes given as arrays or files with a trained network.

    Args:
        model: A :class:`~sslseg.engine.Run`, a run directory, a model file
            (``best_val.pt``), or an ``nn.Module`` returned by :func:`sslseg.engine.load_model`
            (e.g. ``run.model``); any other module needs ``record``.
        inputs: A volume (tensor or numpy array, ``(C, D, H, W)`` or ``(D, H, W)``, raw
            intensities), or files: a path, a list of paths, or a directory (every
            ``.nii``/``.nii.gz``/``.nrrd``/``.nhdr``/``.mha``/``.mhd``/``.h5``/``.npy`` in it).
        out: Output directory, required for files (created if missing).
        probabilities: Also return / write the class probabilities ``(K, D, H, W)``.
        tta: Flip test-time augmentation (see :func:`~sslseg.inference.predict_volume`).
        device: Device to run on. Default: the module's device, or CUDA when available for a
            model loaded from a path. A module on another device is moved there (in place).
        intensity: Override the per-volume normalisation of a model without a plan: ``zscore``,
            ``minmax``, or ``none`` for inputs that are already normalised (the default for
            models trained on SSL4MIS h5 files). A planned model refuses it (its plan normalises).
        record: Geometry and normalisation of a module that has none attached (keys ``dim``,
            ``patch_size``, ``in_channels``, ``num_classes``, ``intensity``).
        progress: Show a progress bar over files (default: only on a terminal).
        spacing: Voxel spacing ``(D, H, W)`` in mm of an array input, or of files that store none
            (``.npy``; h5 without a ``spacing`` attribute; NIfTI files always carry their own). A
            planned model needs it (the input is resampled to the plan's spacing
            and the prediction back); for other models a 3D input more than 25% off the training
            spacing triggers a warning, and h5 outputs store it.
        amp: Precision of the network's forward passes: ``"auto"`` (bf16 autocast where the
            device computes bf16 natively, else float32), ``"none"``, ``"bf16"`` or ``"fp16"``
            (CUDA); see :mod:`sslseg.utils.precision`. Probabilities and resampling stay float32.

    Returns:
        For an array: the label map ``(D, H, W)`` int64 tensor (on the input's device for a
        tensor, else on the CPU), or ``(labels, probabilities)``. For files: the list of written
        paths (label files, each followed by its ``_probs`` file when asked; h5 files hold both).

    Raises:
        ValueError: wrong dims or channel count, NaN/Inf voxels, unreadable or unknown files,
            missing ``out`` for files, a model file of another format version, a bad ``intensity``.
        TypeError: an unsupported ``model`` or ``inputs``.
        FileNotFoundError: a missing model, input or channel file.
    """
    import torch

    from sslseg.data.dataset import INTENSITY_MODES
    from sslseg.data.errors import check_choice

    from sslseg.engine.run import resolve_model

    from sslseg.inference.preprocessing import Preprocessing
    from sslseg.utils.precision import resolve_amp

    network, rec, _ = resolve_model(model, record=record, device=device, caller="infer", argument="model")
    if intensity is not None:
        check_choice("intensity", intensity, INTENSITY_MODES)
    preprocessing = Preprocessing.from_record(rec, intensity)
    spacing = _check_spacing(spacing)
    if device is not None:
        network.to(device)
    run_device = torch.device(device) if device is not None else _model_device(network)
    options = dict(preprocessing=preprocessing, probabilities=bool(probabilities), tta=bool(tta), device=run_device,
                   autocast_dtype=resolve_amp(amp, run_device).dtype)

    if isinstance(inputs, (torch.Tensor, np.ndarray)):
        if out is not None:
            raise ValueError("infer: out is for file inputs; an array input returns its prediction (got out="
                             f"{str(out)!r})")
        array = inputs.detach().cpu().numpy() if isinstance(inputs, torch.Tensor) else np.asarray(inputs)
        if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array) or array.dtype == np.bool_:
            raise TypeError(f"infer: inputs must hold real numbers, got dtype {array.dtype}")
        image = _as_volume(array, "inputs")
        _warn_spacing("inputs", spacing, rec)
        with _eval_mode(network):
            labels, probs = _predict(network, image, rec, where="inputs", spacing=spacing, **options)
        target = inputs.device if isinstance(inputs, torch.Tensor) else torch.device("cpu")
        labels = labels.to(target)
        return labels if probs is None else (labels, probs.to(target))

    if isinstance(inputs, (str, os.PathLike)):
        paths = [Path(inputs)]
    elif isinstance(inputs, (list, tuple)) and inputs and all(isinstance(p, (str, os.PathLike)) for p in inputs):
        paths = [Path(p) for p in inputs]
    else:
        empty = " (empty)" if isinstance(inputs, (list, tuple)) and not inputs else ""
        raise TypeError("infer: inputs must be a tensor/array volume, a path, a non-empty list of paths or a "
                        f"directory, got {type(inputs).__name__}{empty}")
    if out is None:
        raise ValueError("infer: out (an output directory) is required for file inputs")
    cases = _collect_cases(paths, int(rec["in_channels"]))
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"infer: out must be a directory, got the file {out}")
    planned = [_outputs(c, out, bool(probabilities)) for c in cases]
    _check_collisions(cases, planned)
    out.mkdir(parents=True, exist_ok=True)

    from tqdm.auto import tqdm

    written: list[Path] = []
    with _eval_mode(network):
        bar = tqdm(cases, desc="infer", unit="case", disable=None if progress is None else not progress)
        for case, targets in zip(bar, planned):
            image, stored_spacing, reference = _read_case(case)
            where = str(case.paths[0])
            if image.ndim != 4:  # an h5 image of one 2D slice
                raise ValueError(f"infer: {where} must hold a volume (D, H, W) or (C, D, H, W), got an image of "
                                 f"{image.ndim - 1} spatial dims (read as shape {list(image.shape)})")
            _warn_spacing(where, stored_spacing or spacing, rec)
            labels, probs = _predict(network, image, rec, where=where, spacing=stored_spacing or spacing, **options)
            _write_case(case, targets, labels.cpu().numpy(), None if probs is None else probs.cpu().numpy(), reference,
                        int(rec["num_classes"]), stored_spacing or spacing)
            written.extend(targets)
    return written


def _check_collisions(cases: list[_Case], planned: list[list[Path]]) -> None:
    inputs = {p.resolve(): c for c in cases for p in c.paths}
    seen: dict[Path, _Case] = {}
    for case, targets in zip(cases, planned):
        for t in targets:
            key = t.resolve()
            if key in inputs:
                raise ValueError(f"infer: writing {t} would overwrite the input {inputs[key].paths[0]}; choose "
                                 "another out")
            if key in seen:
                raise ValueError(f"infer: inputs {seen[key].paths[0]} and {case.paths[0]} would both be written to "
                                 f"{t}; segment them into different out directories")
            seen[key] = case


# ---- command line -----------------------------------------------------------------------------------------


def _cmd_infer(args: argparse.Namespace) -> int:
    written = infer(args.model, args.inputs, args.out, probabilities=args.probabilities, tta=args.tta,
                    device=args.device, intensity=args.intensity, progress=None, spacing=args.spacing, amp=args.amp)
    for path in written:
        print(path)
    return 0


def register_cli(subparsers) -> None:
    """Add ``sslseg infer MODEL INPUT... --out DIR``."""
    p = subparsers.add_parser(
        "infer", help="segment NIfTI / NRRD / MetaImage / h5 / npy files with a trained model",
        description="Segment volumes with a trained model (a run directory or best_val.pt). Inputs are files or "
                    "directories (.nii, .nii.gz, .h5, .npy; .nrrd, .nhdr, .mha, .mhd with pip install 'sslseg[itk]'); "
                    "outputs keep each input's format and geometry.")
    p.add_argument("model", help="run directory or model file (best_val.pt)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="input files or directories")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--probabilities", action="store_true", help="also write class probabilities")
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help="precision of the forward passes (default auto: bf16 where the CPU/GPU has it natively)")
    p.add_argument("--intensity", default=None, choices=("zscore", "minmax", "none"),
                   help="override the per-volume normalisation of a model without a plan (none: inputs already "
                        "normalised, the default for models trained on h5 files)")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("D", "H", "W"), default=None,
                   help="voxel spacing in mm of inputs that store none (.npy, h5 without a spacing attribute); "
                        "needed by models trained with a plan, which resample every input to their spacing")
    p.set_defaults(func=_cmd_infer)
