"""Validation during training: the evaluation path on the validation split, never the test split."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["dice_per_class", "predict_volume", "validate"]


def predict_volume(model: nn.Module, image: Tensor, *, dim: int, patch_size: Sequence[int],
                   autocast_dtype: torch.dtype | None = None) -> Tensor:
    """Label map ``(D, H, W)`` of one ``(C, D, H, W)`` volume: slice-wise for 2D networks,
    sliding window (overlap 0.5, Gaussian weights) for 3D networks."""
    if dim == 2:
        from sslseg.inference.slicewise import predict_slicewise

        return predict_slicewise(model, image, patch_size, autocast_dtype=autocast_dtype)
    from sslseg.inference import sliding_window

    def predictor(x: Tensor) -> Tensor:
        if autocast_dtype is None:
            return model(x)
        with torch.autocast(device_type=x.device.type, dtype=autocast_dtype):
            return model(x).float()

    with torch.no_grad():
        logits = sliding_window(predictor, image[None].float(), patch_size, overlap=0.5, mode="gaussian")
    return logits[0].argmax(0)


def dice_per_class(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Dice of each foreground class ``1..K-1`` of two label maps; both empty -> 1, one empty -> 0."""
    out = torch.empty(num_classes - 1, dtype=torch.float64)
    for c in range(1, num_classes):
        p, g = pred == c, target == c
        denom = int(p.sum()) + int(g.sum())
        out[c - 1] = 1.0 if denom == 0 else 2.0 * int((p & g).sum()) / denom
    return out


@torch.no_grad()
def validate(model: nn.Module, volumes: Iterable, *, dim: int, patch_size: Sequence[int], num_classes: int,
             device: torch.device, autocast_dtype: torch.dtype | None = None) -> dict[str, float | list[float]]:
    """Mean foreground Dice of ``model`` over ``volumes`` (``sslseg.data.Volume`` objects with labels).

    Returns:
        ``{"dice": mean over cases and foreground classes, "dice_per_class": [...], "cases": n}``.
    """
    was_training = model.training
    model.eval()
    try:
        per_case = []
        for vol in volumes:
            pred = predict_volume(model, vol.image.to(device), dim=dim, patch_size=patch_size,
                                  autocast_dtype=autocast_dtype)
            per_case.append(dice_per_class(pred.cpu(), vol.label, num_classes))
    finally:
        model.train(was_training)
    if not per_case:
        raise ValueError("validate: no validation volumes (the split's val_cases is empty)")
    table = torch.stack(per_case)
    return {"dice": float(table.mean()), "dice_per_class": [float(v) for v in table.mean(0)], "cases": len(per_case)}
