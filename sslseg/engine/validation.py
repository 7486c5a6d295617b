"""Validation during training: the evaluation path on the validation split, never the test split."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from sslseg.inference.predict import predict_volume
from sslseg.metrics import segmentation_metrics

__all__ = ["VALIDATION_METRICS", "validate"]

#: What :func:`validate` computes by default: Dice (model selection), HD95 and ASD in mm.
VALIDATION_METRICS = ("dice", "hd95", "asd")


@torch.no_grad()
def validate(model: nn.Module, volumes: Iterable, *, dim: int, patch_size: Sequence[int], num_classes: int,
             device: torch.device, autocast_dtype: torch.dtype | None = None,
             metrics: Sequence[str] = VALIDATION_METRICS) -> dict[str, float | int | list[float]]:
    """Score ``model`` on ``volumes`` (``sslseg.data.Volume`` objects with labels).

    Each volume is predicted as in evaluation (:func:`sslseg.inference.predict_volume`) and scored
    per foreground class by :func:`sslseg.metrics.segmentation_metrics` with the volume's spacing
    and the ``"penalty"`` empty-mask policy (both empty: Dice 1, distance 0; one empty: Dice 0,
    distance = the image diagonal).

    Args:
        metrics: Names from :data:`sslseg.metrics.METRICS`; must include ``"dice"`` (the loop
            selects ``best_val`` on it).

    Returns:
        ``{"dice": mean over cases and foreground classes, "dice_per_class": [...], "cases": n}``
        plus, for every other metric ``m``, ``m`` (its mean) and ``m + "_per_class"``.
    """
    if "dice" not in metrics:
        raise ValueError(f"validate: metrics must include 'dice' (used to select best_val), got {list(metrics)}")
    was_training = model.training
    model.eval()
    per_case: dict[str, list[torch.Tensor]] = {m: [] for m in metrics}
    try:
        for vol in volumes:
            pred = predict_volume(model, vol.image.to(device), dim=dim, patch_size=patch_size,
                                  autocast_dtype=autocast_dtype, name=vol.volume_id)
            scores = segmentation_metrics(pred.cpu(), vol.label, list(vol.spacing), metrics=metrics,
                                          num_classes=num_classes, empty_policy="penalty")
            for m in metrics:
                per_case[m].append(scores[m].value)
    finally:
        model.train(was_training)
    if not per_case["dice"]:
        raise ValueError("validate: no validation volumes (the split's val_cases is empty)")
    result: dict[str, float | int | list[float]] = {}
    for m in metrics:
        table = torch.stack(per_case[m])  # (cases, foreground classes)
        result[m] = float(table.mean())
        result[f"{m}_per_class"] = [float(v) for v in table.mean(0)]
    result["cases"] = len(per_case["dice"])
    return result
