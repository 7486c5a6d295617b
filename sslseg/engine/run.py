"""A finished (or interrupted) training run, read back from its directory."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

import sslseg

__all__ = ["MODEL_FORMAT", "Run", "load_model"]

MODEL_FORMAT = "sslseg-model/1"  # best_val.pt; bump when its content changes incompatibly


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network saved in a ``best_val.pt`` (or a run directory) with its weights.

    Returns:
        ``(model in eval mode, record)`` where ``record`` holds the model name, classes, patch
        size, spacing, method and data of the run.
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
            raise ValueError(f"{path}: model file format {fmt!r}{written_by}; this sslseg {sslseg.__version__} reads "
                             f"{MODEL_FORMAT!r}. Load it with the sslseg version that wrote it, or retrain.")
        raise ValueError(f"{path}: not an sslseg model file (format {fmt!r}, expected {MODEL_FORMAT!r})")
    record = json.loads(ckpt["record"])
    record.setdefault("intensity", "zscore")  # files written before the key existed
    model = create_model(record["model"], record["in_channels"], record["num_classes"], **record["model_options"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), record


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
        record: Model name, classes, patch size, spacing, method and data.
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
        model, record = load_model(d / "best_val.pt", device=device)
        return cls(dir=d, config=config, metrics=metrics, history=history, model=model, record=record)
