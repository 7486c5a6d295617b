"""What a run records besides checkpoints and what it prints.

Files: ``history.jsonl`` (one row per logging window), ``validation.jsonl`` (one record per
validation, appended and flushed when it happens), TensorBoard scalars and overlays, ``progress.png``.

Console (stdout, unless ``quiet``): a start header and one line per validation everywhere; off a
terminal (a batch job, ``nohup``, a pipe, a notebook's captured output), where no progress bar is
drawn, also one plain line per logging window.

Only rank 0 of a distributed run writes (the engine builds the logger with ``enabled=False`` on
the other ranks). Values arrive already synchronised to the host once per logging window; nothing
here touches the device in the training hot loop.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["RunLogger", "format_duration", "format_train_line", "format_validation_line", "label_overlay", "middle_slice_prediction", "plot_progress", "use_tensorboard"]

#: Overlay colours of classes 1, 2, ... (RGB in [0, 1]); class 0 (background) is not coloured.
CLASS_COLOURS = torch.tensor([
    [0.90, 0.10, 0.10], [0.10, 0.80, 0.20], [0.15, 0.35, 0.95], [0.95, 0.85, 0.10], [0.85, 0.20, 0.85],
    [0.10, 0.85, 0.85], [0.95, 0.55, 0.10], [0.55, 0.30, 0.85], [0.60, 0.90, 0.20],
])


def use_tensorboard(option: bool | None) -> bool:
    """Resolve the ``tensorboard`` engine option: None means "if the package is installed".

    Raises:
        ImportError: ``option`` is True and the ``tensorboard`` package is missing.
    """
    available = importlib.util.find_spec("tensorboard") is not None
    if option is True and not available:
        raise ImportError("tensorboard=True but the tensorboard package is not installed: "
                          "pip install tensorboard (or pip install 'sslseg[tensorboard]'), or set tensorboard=False")
    return available if option is None else bool(option)


def label_overlay(image: Tensor, labels: Tensor, alpha: float = 0.5) -> Tensor:
    """A grey image with its foreground labels blended in colour: ``(3, H, W)`` float32 in ``[0, 1]``.

    Args:
        image: ``(H, W)`` intensities (min-max scaled for display).
        labels: ``(H, W)`` integer labels; 0 stays grey, class ``c`` gets ``CLASS_COLOURS[c - 1]``
            (cycled beyond 9 classes).
        alpha: Colour weight inside labelled pixels.
    """
    if image.dim() != 2 or labels.shape != image.shape:
        raise ValueError(f"label_overlay: image and labels must be (H, W) of the same shape, "
                         f"got {list(image.shape)} and {list(labels.shape)}")
    image = image.detach().float().cpu()
    lo, hi = image.min(), image.max()
    grey = (image - lo) / (hi - lo).clamp_min(1e-8)
    rgb = grey.expand(3, *grey.shape)
    labels = labels.detach().long().cpu()
    colours = CLASS_COLOURS[(labels - 1).clamp_min(0) % len(CLASS_COLOURS)].permute(2, 0, 1)
    return torch.where(labels > 0, (1 - alpha) * rgb + alpha * colours, rgb).contiguous()


def middle_slice_prediction(model: nn.Module, volume: Any, *, dim: int, patch_size: Sequence[int],
                            autocast_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(image, ground truth, prediction)`` of the middle axial slice of a validation volume, each ``(H, W)``.

    2D networks predict that slice alone; 3D networks a slab of one patch depth centred on it (full
    context along the depth of one window, at a fraction of a whole-volume sliding window).
    """
    from sslseg.inference import predict_volume

    image = volume.image
    depth = image.shape[1]
    mid = depth // 2
    lo, hi = mid, mid + 1
    if dim == 3:
        hi = min(depth, max(0, mid - patch_size[0] // 2) + patch_size[0])
        lo = max(0, hi - patch_size[0])
    device = next(iter(model.parameters())).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            pred = predict_volume(model, image[:, lo:hi].to(device), dim=dim, patch_size=patch_size,
                                  autocast_dtype=autocast_dtype)
    finally:
        model.train(was_training)
    return image[0, mid], volume.label[mid], pred[mid - lo].cpu()


def plot_progress(run_dir: Path, history: Sequence[Mapping[str, Any]], validations: Sequence[Mapping[str, Any]]) -> None:
    """``progress.png``: training loss and validation Dice (skipped if matplotlib is absent)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot([h["step"] for h in history], [h["loss"] for h in history])
    ax[0].set(xlabel="step", ylabel="training loss", yscale="log")
    ax[1].plot([v["step"] for v in validations], [v["dice"] for v in validations], marker="o")
    ax[1].set(xlabel="step", ylabel="validation Dice (foreground mean)")
    fig.tight_layout()
    tmp = Path(run_dir) / ".progress.png.tmp"
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, Path(run_dir) / "progress.png")


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (``D days, H:MM:SS`` beyond a day); ``?`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    return str(datetime.timedelta(seconds=round(seconds)))


def _number(value: float) -> str:
    return f"{value:.3e}" if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4) else f"{value:.4f}"


def format_train_line(row: Mapping[str, Any], total: int) -> str:
    """One logging window: ``step 40/3000 | loss 0.41 loss_sup 0.39 ... | lr 9.9e-03 | lambda 0.002 | 5.1 it/s | ETA 0:09:40``.

    Args:
        row: A ``history.jsonl`` row (``step``, ``lr``, ``consistency_weight``, ``it_per_s`` and the
            method's logged terms, ``loss`` first).
        total: The run's number of steps (for the percentage and the ETA).
    """
    step, rate = int(row["step"]), float(row.get("it_per_s", float("nan")))
    fixed = ("step", "lr", "consistency_weight", "it_per_s")
    terms = " ".join(f"{k} {_number(float(v))}" for k, v in row.items()
                     if k not in fixed and isinstance(v, (int, float)) and not isinstance(v, bool))
    eta = (total - step) / rate if rate > 0 else float("nan")
    return (f"step {step}/{total} ({100 * step / total:.0f}%) | {terms} | lr {row['lr']:.2e} | "
            f"lambda {row.get('consistency_weight', 0.0):.4f} | {rate:.2f} it/s | ETA {format_duration(eta)}")


def format_validation_line(record: Mapping[str, Any], total: int, class_names: Sequence[str] = ()) -> str:
    """One validation: ``val step 200/3000 | Dice 0.8123 (RV 0.79, Myo 0.77, LV 0.88) | HD95 4.12 | best 0.8123 @ 200``.

    Args:
        record: A ``validation.jsonl`` record (``step``, ``dice``, ``dice_per_class``, optional
            ``hd95``, ``best_dice`` and ``best_step``).
        total: The run's number of steps.
        class_names: Class names, background first (default ``class<c>``).
    """
    per = record.get("dice_per_class") or []
    names = [class_names[i + 1] if i + 1 < len(class_names) else f"class{i + 1}" for i in range(len(per))]
    parts = [f"val step {int(record['step'])}/{total}",
             f"Dice {record['dice']:.4f} ({', '.join(f'{n} {d:.4f}' for n, d in zip(names, per))})"]
    if isinstance(record.get("hd95"), (int, float)):
        parts.append(f"HD95 {record['hd95']:.2f}")
    if "best_dice" in record:
        parts.append(f"best {record['best_dice']:.4f} @ step {record['best_step']}")
    return " | ".join(parts)


class RunLogger:
    """``history.jsonl`` rows and TensorBoard events of one run (a no-op where ``enabled`` is False).

    Args:
        run_dir: The run directory; TensorBoard events go to ``run_dir / "tb"``.
        enabled: False on ranks other than 0.
        tensorboard: Write TensorBoard events (resolved with :func:`use_tensorboard`).
        purge_step: On resume, the first step the resumed run logs: TensorBoard drops events at or
            after it that a killed run wrote after its last checkpoint.
        class_names: Names for the per-class validation tags (default ``class<c>``).
        total: The run's number of steps (progress and ETA of the console lines).
        quiet: Print nothing (the files are written all the same).
        plain: Print one line per logging window; default: when stdout is not a terminal.

    Attributes:
        bar: The progress bar the loop draws, if any: console lines go through ``bar.write`` so
            that they do not tear it.
    """

    def __init__(self, run_dir: str | Path, *, enabled: bool, tensorboard: bool, purge_step: int | None = None,
                 class_names: Sequence[str] = (), total: int = 0, quiet: bool = False,
                 plain: bool | None = None) -> None:
        self.dir = Path(run_dir)
        self.enabled = enabled
        self.class_names = list(class_names)
        self.total = int(total)
        self.console = enabled and not quiet
        self.plain = self.console and (not _isatty(sys.stdout) if plain is None else bool(plain))
        self.bar: Any = None
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.dir / "tb"), purge_step=purge_step)

    @property
    def history_path(self) -> Path:
        return self.dir / "history.jsonl"

    @property
    def validation_path(self) -> Path:
        return self.dir / "validation.jsonl"

    def start(self, history: Sequence[Mapping[str, Any]], validations: Sequence[Mapping[str, Any]] = ()) -> None:
        """Rewrite ``history.jsonl`` and ``validation.jsonl`` from the checkpoint's records (rows a
        killed run logged after it are dropped)."""
        if not self.enabled:
            return
        for path, rows in ((self.history_path, history), (self.validation_path, validations)):
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
            os.replace(tmp, path)

    def echo(self, text: str) -> None:
        """Print one console line (stdout, flushed; nothing when quiet or not rank 0)."""
        if not self.console:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def header(self, lines: Sequence[str]) -> None:
        """The start header: what is trained on what, where (see :meth:`Trainer._header_lines`)."""
        for line in lines:
            self.echo(line)

    def log_train(self, row: Mapping[str, Any]) -> None:
        """Append a logging-window row (``step`` plus scalars) to the history and TensorBoard (``train/<key>``);
        off a terminal, print it as one line."""
        if not self.enabled:
            return
        with open(self.history_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.plain:
            self.echo(format_train_line(row, self.total))
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, row["step"])

    def _class_name(self, i: int) -> str:
        # Per-class lists cover the foreground classes 1..K-1.
        return self.class_names[i + 1] if i + 1 < len(self.class_names) else f"class{i + 1}"

    def log_validation(self, result: Mapping[str, Any], step: int, best: Mapping[str, Any] | None = None) -> None:
        """Append the validation record to ``validation.jsonl`` (flushed now, so a running or killed
        run shows it), print its line, and write ``val/<metric>`` and ``val/<metric>/<class>`` scalars.

        Args:
            result: The validation result (``dice``, ``dice_per_class``, other metrics, ``cases``).
            step: The step it was taken after.
            best: The best validation so far, this one included (``dice``, ``step``).
        """
        if not self.enabled:
            return
        record = {"step": step, **{k: v for k, v in result.items() if k != "step"}}
        if best is not None:
            record["best_dice"], record["best_step"] = best["dice"], best["step"]
        with open(self.validation_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.echo(format_validation_line(record, self.total, self.class_names))
        if self.writer is None:
            return
        for key, value in result.items():
            if key in ("step", "cases"):
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"val/{key}", value, step)
            elif key.endswith("_per_class") and isinstance(value, list):
                for i, v in enumerate(value):
                    self.writer.add_scalar(f"val/{key[: -len('_per_class')]}/{self._class_name(i)}", v, step)
        self.writer.flush()

    def log_overlay(self, step: int, image: Tensor, label: Tensor, pred: Tensor, tag: str = "val/overlay") -> None:
        """One image ``[image | ground truth | prediction]`` (colour overlays) at ``step``."""
        if self.writer is None:
            return
        panel = torch.cat([label_overlay(image, torch.zeros_like(label)), label_overlay(image, label),
                           label_overlay(image, pred)], dim=2)
        self.writer.add_image(tag, panel, step, dataformats="CHW")
        self.writer.flush()

    def close(self) -> None:
        self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a replaced or closed stream: not a terminal
        return False
