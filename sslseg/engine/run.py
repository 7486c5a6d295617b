"""A finished (or interrupted) training run, read back from its directory."""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from sslseg._version import __version__

__all__ = ["MODEL_FILES", "MODEL_FORMAT", "RECORD_KEYS", "Run", "load_model", "model_record", "resolve_model"]

MODEL_FORMAT = "sslseg-model/1"  # best_val.pt; bump when its content changes incompatibly
#: The model files a run directory holds: the best validation weights and the final weights.
MODEL_FILES = {"best_val": "best_val.pt", "last": "last_model.pt"}
#: What a record must hold for inference, evaluation and export.
RECORD_KEYS = ("dim", "patch_size", "in_channels", "num_classes")

# Model -> its record, for the networks load_model built. Kept outside the module (not an attribute)
# so that the network stays exactly what torch.jit.script / torch.export see, and weak so that
# dropping the network drops its record.
_RECORDS: weakref.WeakKeyDictionary[nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()


def model_record(model: nn.Module) -> dict[str, Any] | None:
    """The record of a network returned by :func:`load_model` (or held by a :class:`Run`), else None.

    This is what lets ``sslseg.infer(run.model, volume)`` and ``sslseg.export(run.model, ...)`` know
    the network's geometry (dim, patch size, channels, classes) and input normalisation.
    """
    return _RECORDS.get(model)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network saved in a ``best_val.pt`` (or a run directory) with its weights.

    Returns:
        ``(model in eval mode, record)`` where ``record`` holds the model name, classes, patch
        size, spacing, method and data of the run, the input normalisation (``intensity``) and
        the data plan (``plan``: a :class:`~sslseg.data.Plan` dict, None for data used as stored). The record stays attached to the model:
        :func:`model_record` returns it.
    """
    from sslseg.engine.checkpoint import load_checkpoint
    from sslseg.models import create_model

    path = Path(path)
    if path.is_dir():
        path = path / "best_val.pt"
    try:
        ckpt = load_checkpoint(path, map_location=device)
    except FileNotFoundError:
        raise
    except Exception as exc:  # a truncated file, a text file, a pickle with code: one clear line
        raise ValueError(f"{path}: cannot be read as an sslseg model file ({type(exc).__name__}: {exc})") from exc
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt != MODEL_FORMAT:
        written_by = ""
        if isinstance(ckpt, dict) and isinstance(ckpt.get("record"), str):
            written_by = f", written by sslseg {json.loads(ckpt['record']).get('sslseg_version', '?')}"
        if isinstance(fmt, str) and fmt.startswith("sslseg-model/"):
            raise ValueError(f"{path}: model file format {fmt!r}{written_by}; this sslseg {__version__} reads "
                             f"{MODEL_FORMAT!r}. Load it with the sslseg version that wrote it, or retrain.")
        raise ValueError(f"{path}: not an sslseg model file (format {fmt!r}, expected {MODEL_FORMAT!r})")
    record = json.loads(ckpt["record"])
    record.setdefault("intensity", "zscore")  # files written before the key existed
    if "plan" not in record:
        # Written before plans, when "intensity" named the dataset's convention (minmax for ACDC)
        # instead of what a scan as stored needs: h5 layouts and phantoms are read as they are.
        record["plan"] = None
        if _stored_normalised(record.get("data")):
            record["intensity"] = "none"
    model = create_model(record["model"], record["in_channels"], record["num_classes"], **record["model_options"])
    model.load_state_dict(ckpt["state_dict"])
    model = model.to(device).eval()
    _RECORDS[model] = record
    return model, record


def _stored_normalised(data: Any) -> bool:
    """True when a record's data spec names data stored normalised (SSL4MIS h5 layouts, phantoms)."""
    if not isinstance(data, str):
        return False
    if data.startswith("synthetic:"):
        return not data.split(":", 1)[1].startswith("ct")
    from sslseg.data.errors import DataError
    from sslseg.data.layouts import detect_layout

    try:
        return detect_layout(Path(data).expanduser()) != "nifti"
    except (DataError, OSError):
        return False  # the data are not here: keep the recorded mode


def resolve_model(model_or_path: Any, *, record: dict[str, Any] | None = None, device: Any = None,
                  checkpoint: str = "best_val", required: Sequence[str] = RECORD_KEYS,
                  caller: str = "load", argument: str = "model_or_path") -> tuple[nn.Module, dict[str, Any], Path | None]:
    """The network, its record and its model file from a run, a run directory, a model file or a module.

    Args:
        model_or_path: A :class:`Run`, a run directory, a model file (``best_val.pt``,
            ``last_model.pt``), or an ``nn.Module`` (whose record comes from ``record`` or from
            :func:`model_record`, i.e. a module :func:`load_model` returned).
        record: Keys overriding (or, for a bare module, making up) the record found with the model.
        device: Where to load a model file (default: CUDA when available, else the CPU). Modules
            and runs are returned where they are.
        checkpoint: For runs and run directories, which model file: ``best_val`` or ``last``.
        required: Record keys the caller needs.
        caller: Name used in error messages.
        argument: The caller's name for ``model_or_path``, used in error messages.

    Returns:
        ``(model, record, model file or None)``.

    Raises:
        TypeError: ``model_or_path`` or ``record`` of the wrong type.
        ValueError: an unknown checkpoint; a module without a record; a record missing ``required``
            keys; a model file that cannot be read or has another format version.
        FileNotFoundError: the path or the run's model file does not exist.
    """
    if checkpoint not in MODEL_FILES:
        raise ValueError(f"{caller}: checkpoint must be one of {list(MODEL_FILES)}, got {checkpoint!r}")
    if record is not None and not isinstance(record, dict):
        raise TypeError(f"{caller}: record must be a dict (a model record), got {type(record).__name__}")
    if isinstance(model_or_path, Run):
        model_or_path = model_or_path.model if checkpoint == "best_val" else model_or_path.dir
    file: Path | None = None
    if isinstance(model_or_path, (str, os.PathLike)):
        file = Path(model_or_path).expanduser()
        if file.is_dir():
            folder, file = file, file / MODEL_FILES[checkpoint]
            if not file.is_file():
                raise FileNotFoundError(f"{caller}: {folder} has no {file.name} (not a finished sslseg run directory)")
        elif not file.exists():
            raise FileNotFoundError(f"{caller}: model {file} does not exist (expected a run directory or a model file "
                                    "such as best_val.pt)")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model, found = load_model(file, device=device)
    elif isinstance(model_or_path, nn.Module):
        model, found = model_or_path, model_record(model_or_path)
    else:
        raise TypeError(f"{caller}: {argument} must be a Run, a run directory, a model file or an nn.Module, "
                        f"got {type(model_or_path).__name__}")
    if found is None and record is None:
        raise ValueError(f"{caller}: the module carries no record ({', '.join(required)}); load it with "
                         "sslseg.engine.load_model or pass record={...}")
    rec = {**(found or {}), **(record or {})}
    missing = [k for k in required if rec.get(k) is None]
    if missing:
        raise ValueError(f"{caller}: record is missing {missing} (it needs {list(required)}), got keys {sorted(rec)}")
    return model, rec, file


@dataclass
class Run:
    """A training run directory and what it holds.

    Attributes:
        dir: The run directory (``config.yaml``, ``split.json``, ``history.jsonl``, ``metrics.json``,
            ``best_val.pt``, ``last.pt``, ``progress.png``).
        config: The resolved config ``{"method_name", "engine", "method"}``.
        metrics: Validation metrics of the ``best_val`` and ``last`` checkpoints.
        history: Logged training values, one dict per logging window.
        model: The evaluated network (student, or the method's eval network) with its best
            validation weights, in eval mode.
        record: Model name, classes, patch size, spacing, method, data, input normalisation and
            data plan (see :func:`load_model`).
    """

    dir: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(repr=False)
    model: nn.Module = field(repr=False)
    record: dict[str, Any] = field(repr=False)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> Run:
        """Read a run directory written by :func:`sslseg.fit`."""
        d = Path(directory)
        if not (d / "config.yaml").is_file():
            raise FileNotFoundError(f"{d} is not an sslseg run directory (no config.yaml)")
        config = yaml.safe_load((d / "config.yaml").read_text())
        metrics = json.loads((d / "metrics.json").read_text()) if (d / "metrics.json").is_file() else {}
        history = []
        if (d / "history.jsonl").is_file():
            history = [json.loads(line) for line in (d / "history.jsonl").read_text().splitlines() if line.strip()]
        model, record = load_model(d / MODEL_FILES["best_val"], device=device)
        return cls(dir=d, config=config, metrics=metrics, history=history, model=model, record=record)
