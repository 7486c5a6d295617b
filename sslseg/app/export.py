"""Export a trained student to TorchScript, ONNX or a ``torch.export`` program, verified.

:func:`export` writes the evaluated network of a run (the student, stock layers only) with a JSON
metadata record (classes, patch size, spacing, input normalisation, the data plan, method, sslseg
version, which axes are dynamic), then proves the file works before it is put in place: the written file is
loaded back (``torch.jit.load``, an onnxruntime session, ``torch.export.load``) and run on a random
input, on a real patch of the run's data when that data can be loaded, and, for dynamic exports, on
a random input of another spatial size; each output is compared with the eager network in float32.
A difference above ``atol`` raises :class:`ExportVerificationError` and leaves no file behind.

Where the metadata lives: the TorchScript and ``.pt2`` archives hold it as the extra file
``sslseg.json``; ONNX models hold it in ``metadata_props`` under the key ``sslseg``.
:func:`read_metadata` reads it from any of the three without loading the network.

``pipeline=True`` (TorchScript) exports the whole inference instead of the network: a scripted
module ``forward(volume (C, D, H, W) raw) -> labels (D, H, W) int64`` that normalises, runs the
network slice-wise (2D) or with the Gaussian sliding window (3D, pure PyTorch, no sslseg operator,
so it loads in any libtorch), and takes the argmax, exactly as :func:`sslseg.infer` does
(:class:`sslseg.inference.InferencePipeline`). For a model trained with a plan the module is
``forward(volume, spacing)``: it contains the plan's crop to nonzero and normalisation and uncrops
the labels, but does not resample: it refuses a volume whose spacing is not the plan's target
spacing (the error names both). The network exports' runners (``export/``) do the same from the
``plan`` in the metadata.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["EXPORT_FORMAT", "ExportResult", "ExportVerificationError", "export", "read_metadata", "register_cli"]

#: Version tag of the metadata record; bump when its keys change incompatibly.
EXPORT_FORMAT = "sslseg-export/1"
_FORMATS = ("onnx", "torchscript", "pt2")
_SUFFIXES = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript", ".pt2": "pt2"}
_METADATA_FILE = "sslseg.json"  # extra file in TorchScript / pt2 archives
_METADATA_KEY = "sslseg"  # ONNX metadata_props key
_SPATIAL_NAMES = ("depth", "height", "width")


class ExportVerificationError(ValueError):
    """The exported file does not reproduce the eager network (the file was not written)."""


@dataclass
class ExportResult:
    """What :func:`export` wrote and how it was verified.

    Attributes:
        path: The exported file.
        format: ``onnx``, ``torchscript`` or ``pt2``.
        metadata: The metadata record stored in the file.
        checks: One entry per verification input: ``{"input": "random" | "real" | "example",
            "shape": [...], "max_abs_diff": float}`` (pipelines add ``"mismatched_voxels"``).
            Empty when ``verify=False``.
    """

    path: Path
    format: str
    metadata: dict[str, Any]
    checks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float | None:
        """Largest difference over the checks (None when not verified)."""
        return max((c["max_abs_diff"] for c in self.checks), default=None)

    def __str__(self) -> str:
        kind = f"{self.format}, pipeline" if self.metadata.get("pipeline") else self.format
        lines = [f"exported {self.metadata.get('model')} ({kind}) to {self.path}"]
        for c in self.checks:
            extra = f", {c['mismatched_voxels']} mismatched voxel(s)" if "mismatched_voxels" in c else ""
            lines.append(f"  verified on {c['input']} input {c['shape']}: max abs diff {c['max_abs_diff']:.3g}{extra}")
        if not self.checks:
            lines.append("  not verified")
        return "\n".join(lines)


# ---- metadata ---------------------------------------------------------------------------------------------


def _geometry(model, record: dict[str, Any]) -> tuple[list[int], list[int] | None]:
    """Per-axis size divisor and fixed input size (None when any multiple works)."""
    dim = int(record["dim"])
    divisor = getattr(model, "size_divisor", None)
    divisor = [int(d) for d in divisor] if divisor is not None else [1] * dim
    fixed = getattr(model, "input_size", None)
    return divisor, (None if fixed is None else [int(s) for s in fixed])


def _metadata(model, record: dict[str, Any], fmt: str, dynamic: bool, pipeline: bool) -> dict[str, Any]:
    from sslseg._version import __version__
    from sslseg.inference.pipeline import OVERLAP, SIGMA_SCALE, SLICE_BATCH_SIZE, SW_BATCH_SIZE

    dim = int(record["dim"])
    divisor, fixed = _geometry(model, record)
    # TorchScript runs any shape its code accepts; traced programs are as dynamic as asked.
    dynamic = dynamic or fmt == "torchscript"
    spatial_dynamic = dynamic and fixed is None
    axes = ([0] if dynamic else []) + (list(range(2, 2 + dim)) if spatial_dynamic else [])
    # torch.export specialises sizes 0 and 1, so a pt2 program needs at least 2 x the divisor.
    low = [d * (2 if fmt == "pt2" else 1) for d in divisor]
    meta = {
        "format": EXPORT_FORMAT,
        "sslseg_version": __version__,
        "model": record.get("model", type(model).__name__),
        "method": record.get("method"),
        "data": record.get("data"),
        "dim": dim,
        "in_channels": int(record["in_channels"]),
        "num_classes": int(record["num_classes"]),
        "class_names": list(record.get("class_names") or []),
        "patch_size": [int(p) for p in record["patch_size"]],
        "spacing": record.get("spacing"),
        "intensity": record.get("intensity", "zscore"),
        # The data plan (sslseg.data.Plan as a dict; None for data used as stored): crop, normalisation
        # and target spacing, which the runners apply (and whose spacing they enforce).
        "plan": record.get("plan"),
        "input_layout": "NCHW" if dim == 2 else "NCDHW",
        "input_name": "image",
        "output_name": "logits",
        "dynamic": {"axes": axes, "spatial_multiple": divisor, "spatial_min": low if spatial_dynamic else None},
        "size_divisor": divisor,
        "input_size": fixed,
        "inference": ({"mode": "slicewise", "slice_batch": SLICE_BATCH_SIZE, "resize": "bilinear", "labels_back": "nearest"}
                      if dim == 2 else
                      {"mode": "sliding_window", "overlap": OVERLAP, "blend": "gaussian", "sigma_scale": SIGMA_SCALE,
                       "sw_batch_size": SW_BATCH_SIZE, "activation": "softmax"}),
        "pipeline": pipeline,
        "file_format": fmt,
    }
    if pipeline:
        # The pipeline takes one raw volume and returns its label map.
        meta.update(input_layout="CDHW", output_name="labels", dynamic={"axes": [0, 1, 2, 3], "spatial_multiple": None,
                                                                        "spatial_min": None})
    return meta


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The sslseg metadata record of an exported file (TorchScript, ONNX or ``.pt2``).

    Reads only the record (the network is not loaded).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is unreadable, holds no sslseg metadata, or was written in another
            metadata format (the message names the sslseg version that wrote it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"read_metadata: {path} does not exist")
    text: str | None = None
    if zipfile.is_zipfile(path):  # TorchScript and pt2 archives
        try:
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if n.endswith(f"extra/{_METADATA_FILE}")]
                text = z.read(names[0]).decode() if names else None
        except (OSError, zipfile.BadZipFile) as exc:
            raise ValueError(f"read_metadata: {path}: unreadable archive ({exc})") from None
    else:
        import onnx

        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf's DecodeError and friends
            raise ValueError(f"read_metadata: {path}: not a TorchScript, pt2 or ONNX file ({type(exc).__name__}: "
                             f"{exc})") from None
        text = next((p.value for p in proto.metadata_props if p.key == _METADATA_KEY), None)
    if text is None:
        raise ValueError(f"read_metadata: {path} holds no sslseg metadata (not written by sslseg.export)")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"read_metadata: {path}: corrupt sslseg metadata ({exc})") from None
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt != EXPORT_FORMAT:
        raise ValueError(f"read_metadata: {path}: metadata format {fmt!r} (written by sslseg "
                         f"{meta.get('sslseg_version', '?') if isinstance(meta, dict) else '?'}); this sslseg reads "
                         f"{EXPORT_FORMAT!r}. Re-export the model with this version.")
    return meta


# ---- the exporters ----------------------------------------------------------------------------------------


def _dynamic_shapes(model, record: dict[str, Any], dynamic: bool):
    from torch.export import Dim

    if not dynamic:
        return None
    dim = int(record["dim"])
    divisor, fixed = _geometry(model, record)
    axes: dict[int, Any] = {0: Dim("batch", min=1)}
    if fixed is None:
        for i, (name, d) in enumerate(zip(_SPATIAL_NAMES[-dim:], divisor)):
            # Sizes stay multiples of what the network downsamples by: size = d * free integer.
            axes[2 + i] = Dim(name, min=1) if d == 1 else d * Dim(f"{name}_div{d}", min=1)
    return (axes,)


@contextlib.contextmanager
def _quiet_jit():
    """TorchScript was asked for by name: its deprecation notices would only be noise here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=FutureWarning)
        yield


def _write_torchscript(module, tmp: Path, meta: dict[str, Any]) -> None:
    with _quiet_jit():
        scripted = torch.jit.script(module)
        torch.jit.save(scripted, str(tmp), _extra_files={_METADATA_FILE: json.dumps(meta)})


def _trace(model, example, record, dynamic):
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes(model, record, dynamic))


def _write_pt2(model, tmp: Path, meta: dict[str, Any], example, record, dynamic) -> None:
    torch.export.save(_trace(model, example, record, dynamic), tmp, extra_files={_METADATA_FILE: json.dumps(meta)})


def _write_onnx(model, tmp: Path, meta: dict[str, Any], example, record, dynamic, opset: int | None) -> None:
    import onnx

    program = torch.onnx.export(_trace(model, example, record, dynamic), (example,), dynamo=True, verbose=False,
                                input_names=["image"], output_names=["logits"], opset_version=opset)
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {_METADATA_KEY: json.dumps(meta)})
    # One self-contained file: the student is far below protobuf's 2 GB limit.
    onnx.save_model(proto, str(tmp), save_as_external_data=False)
    stored = onnx.load(str(tmp), load_external_data=False)
    external = [t.name for t in stored.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ValueError(f"export: ONNX file {tmp} references external data for {external[:3]}; expected one file")


# ---- running the written file -----------------------------------------------------------------------------


def _loader(fmt: str, path: Path):
    """A callable ``Tensor -> Tensor`` running the written file."""
    if fmt == "torchscript":
        with _quiet_jit():
            module = torch.jit.load(str(path), map_location="cpu")
        return lambda *args: module(*args)
    if fmt == "pt2":
        module = torch.export.load(path).module()
        return lambda x: module(x)
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(["logits"], {"image": x.numpy()})[0])


def _crop_or_pad(x, size: list[int]):
    """Centre crop / zero pad the trailing axes of ``x`` to ``size``."""
    n = len(size)
    for i, s in enumerate(size):
        axis = x.dim() - n + i
        have = x.shape[axis]
        if have > s:
            x = x.narrow(axis, (have - s) // 2, s)
    pads: list[int] = []
    for i in reversed(range(n)):
        extra = max(size[i] - x.shape[x.dim() - n + i], 0)
        pads += [extra // 2, extra - extra // 2]
    return F.pad(x, pads) if any(pads) else x


def _real_volume(record: dict[str, Any]):
    """``(image as stored (C, D, H, W), spacing or None)`` of the first volume of the record's
    dataset, or None when the data are not here."""
    data = record.get("data")
    if not data:
        return None
    try:
        import sslseg.data
        from sslseg.data.fingerprint import read_raw

        ds = sslseg.data.load(data)
        rec = ds.raw_record(ds.volume_ids[0])
        image, _, _ = read_raw(rec, with_label=False)
        return torch.from_numpy(image), rec.spacing(default=None)
    except Exception:  # noqa: BLE001 - data moved, deleted, or on another machine: verify without it
        return None


def _network_view(record: dict[str, Any], real) -> torch.Tensor | None:
    """A real volume as the network sees it (the model's preprocessing applied), or None."""
    from sslseg.inference.preprocessing import Preprocessing

    if real is None:
        return None
    image, spacing = real
    pre = Preprocessing.from_record(record)
    if pre.resamples and spacing is None:
        return None
    return pre.prepare(image, spacing).image.float()


def _verification_inputs(model, record: dict[str, Any], trace_input, example, dynamic: bool,
                         real_volume) -> list[tuple[str, Any]]:
    """Random input of the traced shape, a real patch, another size when dynamic, the example."""
    spatial = list(trace_input.shape[2:])
    divisor, fixed = _geometry(model, record)
    gen = torch.Generator().manual_seed(0)
    inputs = [("random", torch.randn(trace_input.shape, generator=gen))]
    if real_volume is not None:
        vol = real_volume if int(record["dim"]) == 3 else real_volume[:, real_volume.shape[1] // 2]  # 2D: middle slice
        real = _crop_or_pad(vol, spatial)[None]
        if not dynamic:  # a static program takes exactly the traced batch
            real = real.expand(trace_input.shape[0], *real.shape[1:])
        inputs.append(("real", real.contiguous()))
    if dynamic and fixed is None:
        other = [s + d for s, d in zip(spatial, divisor)]
        inputs.append(("random", torch.randn(1, trace_input.shape[1], *other, generator=gen)))
    if example is not None:
        inputs.append(("example", example))
    return inputs


def _verify_network(model, run_file, inputs, fmt: str, atol: float, path: Path) -> list[dict[str, Any]]:
    checks = []
    for kind, x in inputs:
        with torch.no_grad():
            expected = model(x).float()
            got = run_file(x).float()
        if got.shape != expected.shape:
            raise ExportVerificationError(f"export: {fmt} file {path} returns shape {list(got.shape)} for {kind} input "
                                          f"{list(x.shape)}, the eager network {list(expected.shape)}")
        diff = float((got - expected).abs().max())
        checks.append({"input": kind, "shape": list(x.shape), "max_abs_diff": diff})
        if not diff <= atol:  # also catches NaN
            raise ExportVerificationError(f"export: {fmt} file {path} differs from the eager network by {diff:.3g} "
                                          f"(> atol {atol:g}) on the {kind} input {list(x.shape)}; the file was not "
                                          "written")
    return checks


def _verify_pipeline(model, record, run_file, real, path: Path) -> list[dict[str, Any]]:
    from sslseg.app.infer import infer

    patch = [int(p) for p in record["patch_size"]]
    channels = int(record["in_channels"])
    gen = torch.Generator().manual_seed(0)
    if int(record["dim"]) == 3:
        # Padding on the first axis, several windows on the others.
        shape = [max(patch[0] * 3 // 4, 1), patch[1] + patch[1] // 2, patch[2] + patch[2] // 3]
    else:
        shape = [3, patch[0] + 8, max(patch[1] - 8, 1)]  # resized up and down
    plan = record.get("plan")
    planned = plan is not None and not plan.get("identity", False)
    spacing = [float(s) for s in plan["target_spacing"]] if planned else None
    random = 100.0 + 20.0 * torch.randn(channels, *shape, generator=gen)
    if planned:  # a zero border: the crop to nonzero and the uncrop are exercised
        random = F.pad(random[:, 1:-1, 2:-2, 2:-2], [2, 2, 2, 2, 1, 1]) if min(shape) > 4 else random
    volumes = [("random", random)]
    if real is not None:
        image, real_spacing = real
        if planned and real_spacing is not None:
            from sslseg.data.resample import resample_image

            # The pipeline takes scans at the plan's spacing: the real scan, resampled to it.
            image = torch.from_numpy(resample_image(image.numpy(), real_spacing, spacing))
            volumes.append(("real", image))
        elif not planned:
            volumes.append(("real", image))
    checks = []
    for kind, vol in volumes:
        expected = infer(model, vol, record=record, device="cpu", spacing=spacing, amp="none")  # the file is float32
        with torch.no_grad():
            got = run_file(vol) if spacing is None else run_file(vol, spacing)
        if got.shape != expected.shape:
            raise ExportVerificationError(f"export: pipeline {path} returns shape {list(got.shape)} for {kind} volume "
                                          f"{list(vol.shape)}, sslseg.infer {list(expected.shape)}")
        differ = got != expected
        checks.append({"input": kind, "shape": list(vol.shape), "max_abs_diff": float((got - expected).abs().max()),
                       "mismatched_voxels": int(differ.sum())})
        if bool(differ.any()):
            raise ExportVerificationError(f"export: pipeline {path} disagrees with sslseg.infer on "
                                          f"{int(differ.sum())} of {differ.numel()} voxels of the {kind} volume "
                                          f"{list(vol.shape)}; the file was not written")
    return checks


# ---- the public function ----------------------------------------------------------------------------------


def export(
    model: Any,
    path: str | os.PathLike,
    format: str | None = None,
    *,
    dynamic: bool = True,
    verify: bool = True,
    pipeline: bool = False,
    record: dict[str, Any] | None = None,
    example: Any = None,
    opset: int | None = None,
    atol: float = 1e-4,
) -> ExportResult:
    """Export the evaluated network of a run (the student) and verify the written file.

    Args:
        model: A :class:`~sslseg.engine.Run`, a run directory, a model file
            (``best_val.pt``), or an ``nn.Module`` from :func:`sslseg.engine.load_model` (any
            other module needs ``record``). The network is copied to the CPU in float32; the
            argument is not modified.
        path: Output file. Its folder is created if needed.
        format: ``onnx``, ``torchscript`` or ``pt2``; default from the suffix (``.onnx``;
            ``.pt``/``.ts``; ``.pt2``).
        dynamic: Batch and spatial axes dynamic (spatial sizes stay multiples of the network's
            ``size_divisor``; a network built for one size keeps it). ``False`` fixes the input to
            ``(1, C, *patch_size)`` (ONNX and pt2; TorchScript is always shape-generic).
        verify: Load the written file back and compare it with the eager network (see the module
            docstring). Without it the file is written unchecked.
        pipeline: TorchScript only: export normalisation + slice-wise / sliding-window inference +
            argmax as one module ``(C, D, H, W) -> (D, H, W)``, verified to equal
            :func:`sslseg.infer`.
        record: The network's record when the module carries none (keys ``dim``, ``patch_size``,
            ``in_channels``, ``num_classes``; ``intensity``, ``class_names``, ... are recorded when
            present).
        example: Input ``(B, C, *spatial)`` to trace with (default: random at the patch size);
            it is also one of the verification inputs. A dynamic ONNX/pt2 export needs spatial
            sizes of at least 2 x the size divisor (a batch of 1 is traced as 2).
        opset: ONNX opset version (default: the exporter's).
        atol: Largest accepted absolute difference of the logits.

    Returns:
        An :class:`ExportResult` (path, format, metadata, checks).

    Raises:
        ValueError: unknown format or suffix, a pipeline in another format than TorchScript, a
            bad ``example`` or ``atol``.
        ExportVerificationError: the written file does not reproduce the eager network (nothing
            is left at ``path``).
    """
    from sslseg.engine.run import resolve_model
    from sslseg.inference.pipeline import InferencePipeline

    path = Path(path)
    if format is None:
        suffix = path.suffix.lower()
        if suffix not in _SUFFIXES:
            raise ValueError(f"export: cannot tell the format from the suffix of {path.name!r}; use one of "
                             f"{sorted(_SUFFIXES)} or pass format= ({', '.join(_FORMATS)})")
        format = _SUFFIXES[suffix]
    if format not in _FORMATS:
        raise ValueError(f"export: format must be one of {list(_FORMATS)}, got {format!r}")
    if pipeline and format != "torchscript":
        raise ValueError(f"export: pipeline=True exports a TorchScript module (.pt/.ts), got format {format!r}")
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not atol >= 0:
        raise ValueError(f"export: atol must be a number >= 0, got {atol!r}")

    source, rec, _ = resolve_model(model, record=record, device="cpu", caller="export", argument="model")
    network = copy.deepcopy(source).to(device="cpu", dtype=torch.float32).eval()
    dim, channels = int(rec["dim"]), int(rec["in_channels"])
    patch = [int(p) for p in rec["patch_size"]]
    if example is not None:
        if not isinstance(example, torch.Tensor) or example.dim() != dim + 2 or example.shape[1] != channels:
            raise ValueError(f"export: example must be a tensor (B, {channels}, *spatial) with {dim} spatial axes, got "
                             f"{list(example.shape) if isinstance(example, torch.Tensor) else type(example).__name__}")
        example = example.detach().to("cpu", torch.float32)
        divisor, fixed = _geometry(network, rec)
        if dynamic and format != "torchscript" and fixed is None and any(
                s < 2 * d for s, d in zip(example.shape[2:], divisor)):
            # torch.export specialises a size of 1 x the divisor; such an example cannot trace dynamic sizes.
            raise ValueError(f"export: a dynamic export needs example spatial sizes of at least 2 x the size divisor "
                             f"{divisor}, got {list(example.shape[2:])}")
    # torch.export specialises a batch of 1: a dynamic export is traced with 2.
    if example is None:
        if dynamic and format != "torchscript" and _geometry(network, rec)[1] is None:
            # torch.export specialises a size of 1 x the divisor (a patch of 16 for a 16-divisible
            # UNet has a bottleneck of size 1): trace such axes at 2 x the divisor instead.
            patch = [max(p, 2 * d) for p, d in zip(patch, _geometry(network, rec)[0])]
        trace_input = torch.randn(2 if dynamic else 1, channels, *patch)
    else:
        trace_input = example.repeat(2, *[1] * (dim + 1)) if dynamic and example.shape[0] == 1 else example
    meta = _metadata(network, rec, format, dynamic, pipeline)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")  # same folder: os.replace is atomic
    try:
        if pipeline:
            _write_torchscript(InferencePipeline(network, rec), tmp, meta)
        elif format == "torchscript":
            _write_torchscript(network, tmp, meta)
        elif format == "pt2":
            _write_pt2(network, tmp, meta, trace_input, rec, dynamic)
        else:
            _write_onnx(network, tmp, meta, trace_input, rec, dynamic, opset)
        checks: list[dict[str, Any]] = []
        if verify:
            run_file = _loader("torchscript" if pipeline else format, tmp)
            real = _real_volume(rec)
            if pipeline:
                checks = _verify_pipeline(network, rec, run_file, real, path)
            else:
                inputs = _verification_inputs(network, rec, trace_input, example, dynamic or format == "torchscript",
                                              _network_view(rec, real))
                checks = _verify_network(network, run_file, inputs, format, float(atol), path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return ExportResult(path=path, format=format, metadata=meta, checks=checks)


# ---- command line -----------------------------------------------------------------------------------------


def _cmd_export(args: argparse.Namespace) -> int:
    result = export(args.model, args.path, format=args.format, dynamic=not args.static, verify=not args.no_verify,
                    pipeline=args.pipeline)
    print(result)
    return 0


def register_cli(subparsers) -> None:
    """Add ``sslseg export RUN_OR_MODEL PATH``."""
    p = subparsers.add_parser(
        "export", help="export a trained student to ONNX / TorchScript / pt2 (verified)",
        description="Export the evaluated network of a run with its metadata, then load the file back and compare it "
                    "with the eager network (onnxruntime for ONNX).")
    p.add_argument("model", metavar="RUN_OR_MODEL", help="run directory or model file (best_val.pt)")
    p.add_argument("path", metavar="PATH", help="output file: .onnx, .pt / .ts (TorchScript) or .pt2")
    p.add_argument("--format", default=None, choices=_FORMATS, help="default: from the suffix of PATH")
    p.add_argument("--no-verify", action="store_true", help="write without loading the file back to check it")
    p.add_argument("--pipeline", action="store_true",
                   help="TorchScript: normalisation + slice-wise / sliding-window inference + argmax in one module")
    p.add_argument("--static", action="store_true", help="fixed input (1, C, *patch_size) instead of dynamic axes")
    p.set_defaults(func=_cmd_export)
