"""2D networks on 3D volumes: slice by slice, batched, at the training patch size."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["predict_slicewise"]


@torch.no_grad()
def predict_slicewise(
    model: nn.Module,
    image: Tensor,
    patch_size: Sequence[int],
    *,
    batch_size: int = 16,
    output: str = "labels",
    autocast_dtype: torch.dtype | None = None,
) -> Tensor:
    """Segment a volume with a 2D network, one slice (first spatial axis) at a time.

    Each slice is resized (bilinear) to ``patch_size``, the network's logits are computed in
    batches of ``batch_size`` slices, and the result is brought back to the slice size: labels by
    nearest neighbour (``output="labels"``, as the evaluation protocol prescribes), probabilities
    by bilinear interpolation (``output="probs"``).

    Args:
        model: A 2D network ``(B, C_in, H, W) -> (B, K, H, W)`` (eval mode is the caller's choice).
        image: ``(C_in, D, H, W)`` volume on the model's device.
        patch_size: ``(H, W)`` the network was trained at.
        batch_size: Slices per forward pass.
        output: ``labels`` -> ``(D, H, W)`` int64; ``probs`` -> ``(K, D, H, W)`` float32.
        autocast_dtype: Run the network under autocast with this dtype (e.g. ``torch.bfloat16``).
    """
    if image.dim() != 4:
        raise ValueError(f"predict_slicewise: image must be (C, D, H, W), got shape {list(image.shape)}")
    if output not in ("labels", "probs"):
        raise ValueError(f"predict_slicewise: output must be 'labels' or 'probs', got {output!r}")
    ph, pw = (int(s) for s in patch_size)
    c, d, h, w = image.shape
    slices = image.permute(1, 0, 2, 3)  # (D, C, H, W)
    outs = []
    for start in range(0, d, batch_size):
        x = slices[start:start + batch_size].float()
        if (h, w) != (ph, pw):
            x = F.interpolate(x, size=(ph, pw), mode="bilinear", align_corners=False)
        if autocast_dtype is not None:
            with torch.autocast(device_type=x.device.type, dtype=autocast_dtype):
                logits = model(x)
        else:
            logits = model(x)
        logits = logits.float()
        if output == "labels":
            lab = logits.argmax(1, keepdim=True).float()
            if (h, w) != (ph, pw):
                lab = F.interpolate(lab, size=(h, w), mode="nearest")
            outs.append(lab[:, 0].long())
        else:
            probs = torch.softmax(logits, 1)
            if (h, w) != (ph, pw):
                probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)
            outs.append(probs)
    if output == "labels":
        return torch.cat(outs)  # (D, H, W)
    return torch.cat(outs).permute(1, 0, 2, 3).contiguous()  # (K, D, H, W)
