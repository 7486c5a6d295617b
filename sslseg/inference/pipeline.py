"""The whole inference as one scriptable module: :class:`InferencePipeline`.

``InferencePipeline(net, record)`` is ``forward(volume (C, D, H, W) raw, spacing=None) -> labels
(D, H, W) int64``: the model's input preprocessing, the network slice-wise (2D) or with the
Gaussian sliding window (3D), and the argmax, computing what :func:`~sslseg.inference.predict_volume`
computes with the settings below. It is written in plain PyTorch (no sslseg operator), so
``torch.jit.script`` turns it into a file any libtorch loads; :func:`sslseg.export` with
``pipeline=True`` writes it.

Models trained with a plan (:class:`sslseg.data.Plan`): the pipeline contains the plan's crop to
nonzero and its normalisation (``ct``, ``zscore`` over the crop, ``none``), and uncrops the labels
(background outside the crop), but **not** its resampling (a third-order spline has no scriptable
equivalent that would give the same voxels): it takes volumes at the plan's target spacing and
refuses any other spacing with an error naming both. Resample such scans first, or use
``sslseg infer``, which resamples. A plan z-scoring within a filled foreground mask (skull-stripped
MR) cannot be exported as a pipeline (hole filling is not scriptable either).
"""

# No `from __future__ import annotations`: TorchScript reads the pipeline's class-level attribute
# annotations and cannot resolve them from strings.
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslseg.inference.sliding import importance_map

__all__ = ["OVERLAP", "SIGMA_SCALE", "SLICE_BATCH_SIZE", "SPACING_RTOL", "SW_BATCH_SIZE", "InferencePipeline"]

# The inference settings of sslseg.infer (predict_volume's defaults), fixed in the pipeline.
#: Sliding-window overlap (3D).
OVERLAP = 0.5
#: Gaussian importance sigma, as a fraction of the window (3D).
SIGMA_SCALE = 0.125
#: Windows per network call (3D).
SW_BATCH_SIZE = 4
#: Slices per network call (2D).
SLICE_BATCH_SIZE = 16
#: Relative spacing difference a planned pipeline accepts: below it, resampling to the plan's spacing
#: keeps every axis's size (for axes under 500 voxels), i.e. it is the identity that the pipeline skips.
SPACING_RTOL = 1e-3


class InferencePipeline(nn.Module):
    """Normalisation + slice-wise / sliding-window inference + argmax, as one scriptable module.

    ``forward(volume)`` takes one raw ``(C, D, H, W)`` volume and returns its ``(D, H, W)`` int64
    label map, computing what :func:`sslseg.infer` computes: the same per-volume normalisation,
    the same slice batches and resizing (2D), the same window grid (MONAI's, overlap 0.5), window
    batches, softmax, Gaussian importance map and blending order (3D). Pure PyTorch: the scripted
    module needs no sslseg operator.

    Args:
        net: The segmentation network ``(N, C, *patch) -> (N, K, *patch)``.
        record: Its record (``dim``, ``patch_size``, ``in_channels``, ``num_classes``,
            ``intensity``, ``plan``).

    Raises:
        ValueError: the record's plan z-scores within a filled mask (see the module docstring).
    """

    intensity: str
    planned: bool
    target_spacing: List[float]
    crop: bool
    norms: List[str]
    ct_params: List[List[float]]
    spacing_rtol: float
    dim: int
    in_channels: int
    num_classes: int
    patch: List[int]
    overlap: float
    sw_batch_size: int
    slice_batch: int

    def __init__(self, net: nn.Module, record: Dict[str, Any]) -> None:
        super().__init__()
        self.net = net
        self.intensity = str(record.get("intensity", "zscore"))
        self.dim = int(record["dim"])
        self.in_channels = int(record["in_channels"])
        self.num_classes = int(record["num_classes"])
        self.patch = [int(p) for p in record["patch_size"]]
        self.overlap = OVERLAP
        self.sw_batch_size = SW_BATCH_SIZE
        self.slice_batch = SLICE_BATCH_SIZE
        self.spacing_rtol = SPACING_RTOL
        plan = record.get("plan")
        self.planned = plan is not None and not bool(plan.get("identity", False))
        self.target_spacing = [float(s) for s in plan["target_spacing"]] if self.planned else [1.0, 1.0, 1.0]
        self.crop = bool(plan["crop_to_nonzero"]) if self.planned else False
        self.norms = [str(n) for n in plan["normalization"]] if self.planned else []
        self.ct_params = []
        if self.planned:
            if any(plan.get("use_mask_for_norm") or []):
                raise ValueError("pipeline export: the model's plan z-scores within a filled foreground mask "
                                 f"(use_mask_for_norm={plan['use_mask_for_norm']}), which has no TorchScript "
                                 "equivalent; export the network alone (pipeline=False) and infer with sslseg")
            props = plan.get("intensity_properties") or []
            for c, n in enumerate(self.norms):
                p = props[c] if c < len(props) else {}
                self.ct_params.append([float(p["percentile_00_5"]), float(p["percentile_99_5"]), float(p["mean"]),
                                       float(p["std"])] if n == "ct" else [0.0, 0.0, 0.0, 1.0])
        # MONAI's Gaussian map of the fixed window, computed once by the sliding window's own code.
        imp = importance_map(self.patch, "gaussian", SIGMA_SCALE) if self.dim == 3 else torch.ones(1)
        self.register_buffer("importance", imp.clone())

    def normalize(self, volume: Tensor) -> Tensor:
        """``sslseg.data.storage.normalize_intensity``, per channel, in float32."""
        x = volume.float()
        if self.intensity == "none":
            return x
        out = torch.empty_like(x)
        for c in range(x.shape[0]):
            xc = x[c]
            if self.intensity == "zscore":
                std = xc.std(unbiased=False)
                out[c] = (xc - xc.mean()) / torch.where(std > 0, std, torch.ones_like(std))
            else:
                lo, hi = xc.min(), xc.max()
                out[c] = (xc - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))
        return out

    def check_spacing(self, spacing: Optional[List[float]]) -> None:
        """Refuse a volume whose spacing is not the plan's target spacing (see the module docstring)."""
        if spacing is None:
            raise ValueError("sslseg pipeline: the model was trained with a plan: pass the volume's spacing (D, H, W) "
                             "in mm, which must equal the plan's target spacing " + str(self.target_spacing))
        if len(spacing) != 3:
            raise ValueError("sslseg pipeline: spacing must be 3 numbers (D, H, W) in mm, got " + str(spacing))
        first = 1 if self.dim == 2 else 0  # 2D plans keep each volume's own slice distance
        for a in range(first, 3):
            if abs(spacing[a] - self.target_spacing[a]) > self.spacing_rtol * self.target_spacing[a]:
                raise ValueError("sslseg pipeline: expected a volume at the plan's target spacing "
                                 + str(self.target_spacing) + " mm (D, H, W), got spacing " + str(spacing)
                                 + " mm; the pipeline does not resample: resample the volume to the target spacing "
                                 "first, or segment it with `sslseg infer`, which does")

    def nonzero_box(self, volume: Tensor) -> List[List[int]]:
        """``sslseg.data.fingerprint.nonzero_bbox``: the box of voxels nonzero in any channel."""
        mask = (volume != 0).any(0)
        box: List[List[int]] = []
        others = [[1, 2], [0, 2], [0, 1]]
        for axis in range(3):
            dims = others[axis]
            hit = torch.nonzero(mask.any(dims[1]).any(dims[0])).flatten()
            size = mask.shape[axis]
            if hit.numel() == 0:
                box.append([0, size])
            else:
                box.append([int(hit[0]), int(hit[-1]) + 1])
        return box

    def plan_normalize(self, volume: Tensor) -> Tensor:
        """``sslseg.data.preprocess.normalize`` without a mask, per channel, in float32."""
        x = volume.float()
        out = torch.empty_like(x)
        for c in range(x.shape[0]):
            xc = x[c]
            scheme = self.norms[c] if c < len(self.norms) else "zscore"
            if scheme == "ct":
                p = self.ct_params[c]
                out[c] = (xc.clamp(p[0], p[1]) - p[2]) / max(p[3], 1e-8)
            elif scheme == "zscore":
                std = float(xc.std(unbiased=False))
                out[c] = (xc - xc.mean()) / max(std, 1e-8)
            else:
                out[c] = xc
        return out

    def window_starts(self, size: int, roi: int) -> List[int]:
        """Window starts along one padded axis, as ``sslseg.inference.window_grid`` (MONAI's grid)."""
        if roi == size:
            interval = roi
        else:
            interval = int(roi * (1 - self.overlap))
            if interval <= 0:
                interval = 1
        num = (size + interval - 1) // interval
        n = 1
        for k in range(num):
            if k * interval + roi >= size:
                n = k + 1
                break
        starts: List[int] = []
        for k in range(n):
            s = k * interval
            starts.append(s - max(s + roi - size, 0))
        return starts

    def slicewise(self, x: Tensor) -> Tensor:
        """``predict_slicewise(..., output="labels")``."""
        d, h, w = x.shape[1], x.shape[2], x.shape[3]
        ph, pw = self.patch[0], self.patch[1]
        slices = x.permute(1, 0, 2, 3)
        outs: List[Tensor] = []
        for start in range(0, d, self.slice_batch):
            s = slices[start:start + self.slice_batch]
            if h != ph or w != pw:
                s = F.interpolate(s, size=[ph, pw], mode="bilinear", align_corners=False)
            lab = self.net(s).float().argmax(1, keepdim=True).float()
            if h != ph or w != pw:
                lab = F.interpolate(lab, size=[h, w], mode="nearest")
            outs.append(lab[:, 0].long())
        return torch.cat(outs)

    def sliding(self, x: Tensor) -> Tensor:
        """``sliding_window(..., mode="gaussian", activation="softmax")`` then argmax."""
        spatial = [x.shape[1], x.shape[2], x.shape[3]]
        roi = self.patch
        padded = [max(s, r) for s, r in zip(spatial, roi)]
        before = [(p - s) // 2 for s, p in zip(spatial, padded)]
        pads: List[int] = []
        for i in [2, 1, 0]:
            pads += [before[i], padded[i] - spatial[i] - before[i]]
        v = F.pad(x[None], pads)
        windows: List[List[int]] = []
        for a in self.window_starts(padded[0], roi[0]):  # the last axis varies fastest, as in sliding_window
            for b in self.window_starts(padded[1], roi[1]):
                for c in self.window_starts(padded[2], roi[2]):
                    windows.append([a, b, c])
        acc = torch.zeros([self.num_classes, padded[0], padded[1], padded[2]], dtype=torch.float32, device=x.device)
        weight = torch.zeros([padded[0], padded[1], padded[2]], dtype=torch.float32, device=x.device)
        imp = self.importance.to(x.device)
        for i in range(0, len(windows), self.sw_batch_size):
            group = windows[i:i + self.sw_batch_size]
            batch = torch.cat([v[:, :, w[0]:w[0] + roi[0], w[1]:w[1] + roi[1], w[2]:w[2] + roi[2]] for w in group])
            probs = torch.softmax(self.net(batch).float(), dim=1)
            for j, w in enumerate(group):
                acc[:, w[0]:w[0] + roi[0], w[1]:w[1] + roi[1], w[2]:w[2] + roi[2]].add_(probs[j] * imp)
                weight[w[0]:w[0] + roi[0], w[1]:w[1] + roi[1], w[2]:w[2] + roi[2]].add_(imp)
        blended = acc / weight
        crop = blended[:, before[0]:before[0] + spatial[0], before[1]:before[1] + spatial[1],
                       before[2]:before[2] + spatial[2]]
        return crop.argmax(0)

    def forward(self, volume: Tensor, spacing: Optional[List[float]] = None) -> Tensor:
        """Label map ``(D, H, W)`` int64 of one raw ``(C, D, H, W)`` volume (``spacing`` in mm,
        ``(D, H, W)``: required by planned models, ignored by the others)."""
        if volume.dim() != 4:
            raise ValueError(f"sslseg pipeline: volume must be (C, D, H, W), got shape {list(volume.shape)}")
        if volume.shape[0] != self.in_channels:
            raise ValueError(f"sslseg pipeline: volume must have {self.in_channels} channel(s) on axis 0, got shape "
                             f"{list(volume.shape)}")
        if not bool(torch.isfinite(volume).all()):
            raise ValueError("sslseg pipeline: volume contains NaN or Inf voxels")
        with torch.no_grad():
            if not self.planned:
                x = self.normalize(volume)
                if self.dim == 2:
                    return self.slicewise(x)
                return self.sliding(x)
            self.check_spacing(spacing)
            box = self.nonzero_box(volume) if self.crop else [[0, volume.shape[1]], [0, volume.shape[2]],
                                                                [0, volume.shape[3]]]
            x = self.plan_normalize(volume[:, box[0][0]:box[0][1], box[1][0]:box[1][1], box[2][0]:box[2][1]])
            lab = self.slicewise(x) if self.dim == 2 else self.sliding(x)
            out = torch.zeros([volume.shape[1], volume.shape[2], volume.shape[3]], dtype=torch.long,
                              device=volume.device)
            out[box[0][0]:box[0][1], box[1][0]:box[1][1], box[2][0]:box[2][1]] = lab
            return out
