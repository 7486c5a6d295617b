"""What a run records besides checkpoints: ``history.jsonl``, TensorBoard scalars and overlays, ``progress.png``.

Only rank 0 of a distributed run writes (the engine builds the logger with ``enabled=False`` on
the other ranks). Values arrive already synchronised to the host once per logging window; nothing
here touches the device in the training hot loop.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["RunLogger", "label_overlay", "middle_slice_prediction", "plot_progress", "use_tensorboard"]

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


class RunLogger:
    """``history.jsonl`` rows and TensorBoard events of one run (a no-op where ``enabled`` is False).

    Args:
        run_dir: The run directory; TensorBoard events go to ``run_dir / "tb"``.
        enabled: False on ranks other than 0.
        tensorboard: Write TensorBoard events (resolved with :func:`use_tensorboard`).
        purge_step: On resume, the first step the resumed run logs: TensorBoard drops events at or
            after it that a killed run wrote after its last checkpoint.
        class_names: Names for the per-class validation tags (default ``class<c>``).
    """

    def __init__(self, run_dir: str | Path, *, enabled: bool, tensorboard: bool, purge_step: int | None = None,
                 class_names: Sequence[str] = ()) -> None:
        self.dir = Path(run_dir)
        self.enabled = enabled
        self.class_names = list(class_names)
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.dir / "tb"), purge_step=purge_step)

    @property
    def history_path(self) -> Path:
        return self.dir / "history.jsonl"

    def start(self, history: Sequence[Mapping[str, Any]]) -> None:
        """Rewrite ``history.jsonl`` from the checkpoint's history (rows a killed run logged after it are dropped)."""
        if not self.enabled:
            return
        tmp = self.dir / ".history.jsonl.tmp"
        tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
        os.replace(tmp, self.history_path)

    def log_train(self, row: Mapping[str, Any]) -> None:
        """Append a logging-window row (``step`` plus scalars) to the history and TensorBoard (``train/<key>``)."""
        if not self.enabled:
            return
        with open(self.history_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, row["step"])

    def _class_name(self, i: int) -> str:
        # Per-class lists cover the foreground classes 1..K-1.
        return self.class_names[i + 1] if i + 1 < len(self.class_names) else f"class{i + 1}"

    def log_validation(self, result: Mapping[str, Any], step: int) -> None:
        """Validation scalars as ``val/<metric>`` and ``val/<metric>/<class>`` (per-class lists)."""
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
        if self.writer is not None:
            self.writer.close()
            self.writer = None
