"""Sliding-window inference ops: gather windows of a volume, and the fused weighted accumulate.

Both ops describe the windows by a *grid*: for each spatial dimension a strictly increasing list of
window starts. ``starts`` is the concatenation of the per-dimension lists and ``counts`` their
lengths. Window ``w`` (``0 <= w < B * prod(counts)``) belongs to batch element
``w // prod(counts)`` and sits at the grid position unravelled from ``w % prod(counts)`` in C
order (last spatial dimension fastest): the order of MONAI's ``dense_patch_slices`` and of
SSL4MIS's ``test_single_case``. Starts are in the coordinates of the tensor the op reads or
writes and may be negative or run past its end: voxels outside it are padding (gather) or are
skipped (accumulate), so a volume smaller than the window is never padded in memory.

``sw_accumulate_`` fuses three passes of the usual implementation (weighting, accumulation,
normalisation; and optionally the softmax over channels) into one pass over each window's
prediction:

* the first window that covers a voxel *writes* ``pred * importance`` (``out`` needs no zero
  fill), every later window *adds* it;
* when ``weight`` (the sum of the importance maps of all windows, see
  :func:`sslseg.inference.sliding_window`) is given, the last window that covers a voxel divides
  the sum by the weight, so the result is final once every window has been added.

"First" and "last" follow the window order, so the windows of one batch element must be added in
increasing order, each exactly once (any split into calls). Voxels no window covers are left
as they are. Neither op is differentiable (inference only): they have no autograd formula, and
their outputs never require grad.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sslseg.ops._loader import backend_for, dtype_name, has_ops

__all__ = ["dense_importance", "separable_importance", "sw_accumulate_", "sw_gather", "window_origin"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def sw_gather(
    volume: Tensor,
    roi_size: Sequence[int],
    starts: Sequence[int],
    counts: Sequence[int],
    window_begin: int,
    window_end: int,
    pad_value: float = 0.0,
    *,
    backend: str | None = None,
) -> Tensor:
    """Copy windows ``[window_begin, window_end)`` of ``volume`` into one contiguous batch.

    Args:
        volume: ``(B, C, H, W)`` or ``(B, C, H, W, D)``, float16/bfloat16/float32/float64, CPU or
            CUDA, any strides.
        roi_size: Window size, one entry per spatial dimension (each ``>= 1``).
        starts: Concatenated per-dimension window starts (strictly increasing per dimension),
            in volume coordinates; may be negative or run past the end.
        counts: Number of starts per spatial dimension (each ``>= 1``).
        window_begin: First window of the range, ``0 <= window_begin <= window_end``.
        window_end: One past the last window of the range, ``window_end <= B * prod(counts)``.
        pad_value: Value of window voxels outside the volume (constant padding).
        backend: ``"compiled"`` or ``"reference"`` for this call; None (default) follows
            :func:`sslseg.ops.backend`.

    Returns:
        ``(window_end - window_begin, C, *roi_size)``, contiguous, the dtype and device of
        ``volume``. Not differentiable.
    """
    args = (_ints(roi_size), _ints(starts), _ints(counts), int(window_begin), int(window_end), float(pad_value))
    if backend_for(backend) == "compiled":
        return torch.ops.sslseg.sw_gather.default(volume, *args)
    return _reference_gather(volume, *args)


def sw_accumulate_(
    out: Tensor,
    pred: Tensor,
    starts: Sequence[int],
    counts: Sequence[int],
    window_begin: int,
    *,
    importance: Tensor | None = None,
    weight: Tensor | None = None,
    softmax: bool = False,
    backend: str | None = None,
) -> None:
    """Blend the window predictions ``pred`` into ``out`` in place (see the module docstring).

    For window ``n`` of ``pred`` (grid window ``w = window_begin + n``, batch element ``b``) and
    every channel ``c`` and window voxel ``i`` that lands inside ``out`` at ``x = start(w) + i``:
    ``v = p[n, c, i] * importance[i]`` with ``p = softmax(pred, dim=1)`` if ``softmax`` else
    ``pred``; ``v += out[b, c, x]`` unless ``w`` is the first window
    covering ``x``; ``v /= weight[x]`` if ``weight`` is given and ``w`` is the last window
    covering ``x``; ``out[b, c, x] = v``. Arithmetic in ``out``'s dtype.

    Args:
        out: ``(B, C, *S)`` accumulator, float32 or float64 (2 or 3 spatial dims), any strides
            without self-overlap.
        pred: ``(N, C, *roi)`` window predictions, float16/bfloat16/float32/float64 (accumulated in
            ``out``'s dtype), same device as ``out``.
        starts: Concatenated per-dimension window starts, in ``out`` coordinates (see the module
            docstring).
        counts: Number of starts per spatial dimension.
        window_begin: Grid index of ``pred[0]``; ``window_begin + N <= B * prod(counts)``.
        importance: ``(*roi)`` blending weights in ``out``'s dtype, or their separable form
            (:func:`separable_importance`: 1-D, ``sum(roi) + 1`` entries, computed on the fly), or
            None for 1 everywhere.
        weight: ``(*S)`` sum of the importance maps over all windows, in ``out``'s dtype, or None to
            leave the sums unnormalised.
        softmax: Blend ``softmax(pred, dim=1)`` (computed in ``out``'s dtype) instead of ``pred``:
            probabilities blended without a separate softmax pass over the windows.
        backend: ``"compiled"`` or ``"reference"`` for this call; None (default) follows
            :func:`sslseg.ops.backend`.

    Not differentiable: inference only.
    """
    args = (_ints(starts), _ints(counts), int(window_begin), bool(softmax))
    if backend_for(backend) == "compiled":
        torch.ops.sslseg.sw_accumulate_.default(out, pred, importance, weight, *args)
    else:
        _reference_accumulate(out, pred, importance, weight, *args)


def _ints(seq: Sequence[int]) -> list[int]:
    return [int(x) for x in seq]


# ---- the grid, shared by the checks and the reference twins -------------------------------------


def _check_grid(op: str, nd: int, starts: list[int], counts: list[int]) -> list[list[int]]:
    if len(counts) != nd:
        raise RuntimeError(f"{op}: counts must have {nd} entries (one per spatial dim), got {len(counts)}")
    if any(c < 1 for c in counts):
        raise RuntimeError(f"{op}: counts must be >= 1, got {counts}")
    if len(starts) != sum(counts):
        raise RuntimeError(f"{op}: starts must hold sum(counts) = {sum(counts)} entries, got {len(starts)}")
    per_dim, pos = [], 0
    for d, c in enumerate(counts):
        s = starts[pos:pos + c]
        pos += c
        if any(b <= a for a, b in zip(s, s[1:])):
            raise RuntimeError(f"{op}: starts of spatial dim {d} must be strictly increasing, got {s}")
        per_dim.append(s)
    return per_dim


def window_origin(starts: Sequence[int], counts: Sequence[int], window: int) -> tuple[int, list[int]]:
    """Batch element and start (one per spatial dim) of grid window ``window``.

    The grid is the ops' (see the module docstring): ``window`` counts windows of every batch
    element in C order over the per-dimension starts. The window covers ``[start, start + roi)``
    along each spatial dim.
    """
    grid = _check_grid("window_origin", len(counts), _ints(starts), _ints(counts))
    if int(window) < 0:
        raise ValueError(f"window_origin: window must be >= 0, got {window}")
    b, k = _grid_position(grid, int(window))
    return b, [s[kd] for s, kd in zip(grid, k)]


def _grid_position(grid: list[list[int]], w: int) -> tuple[int, list[int]]:
    """Batch element of window ``w`` and its index into each dimension's starts."""
    per_batch = 1
    for s in grid:
        per_batch *= len(s)
    b, r = divmod(w, per_batch)
    k = []
    for s in reversed(grid):
        r, kd = divmod(r, len(s))
        k.append(kd)
    k.reverse()
    return b, k


def _window(grid: list[list[int]], roi: list[int], w: int) -> tuple[int, list[int], list[float], list[float]]:
    """Batch element, start, first_from and last_before of window ``w`` (see sliding_window.h)."""
    b, k = _grid_position(grid, w)
    start = [s[kd] for s, kd in zip(grid, k)]
    first_from = [s[kd - 1] + rd if kd > 0 else -float("inf") for s, kd, rd in zip(grid, k, roi)]
    last_before = [s[kd + 1] if kd + 1 < len(s) else float("inf") for s, kd in zip(grid, k)]
    return b, start, first_from, last_before


def _check_gather(volume: Tensor, roi_size: list[int], starts: list[int], counts: list[int], window_begin: int,
                  window_end: int) -> list[list[int]]:
    """The checks of the compiled kernel (csrc/ops/sliding_window.cpp), with the same messages."""
    if volume.dim() not in (4, 5):
        raise RuntimeError(
            f"sw_gather: volume must be (B, C, *spatial) with 2 or 3 spatial dims, got shape {list(volume.shape)}"
        )
    if volume.dtype not in _FLOAT_DTYPES:
        raise RuntimeError(
            f"sw_gather: volume must be float16, bfloat16, float32 or float64, got {dtype_name(volume.dtype)}"
        )
    nd = volume.dim() - 2
    if len(roi_size) != nd:
        raise RuntimeError(
            f"sw_gather: roi_size must have {nd} entries (one per spatial dim of volume), got {len(roi_size)}"
        )
    if any(r < 1 for r in roi_size):
        raise RuntimeError(f"sw_gather: roi_size entries must be >= 1, got {roi_size}")
    grid = _check_grid("sw_gather", nd, starts, counts)
    total = volume.shape[0]
    for c in counts:
        total *= c
    if not 0 <= window_begin <= window_end <= total:
        raise RuntimeError(
            f"sw_gather: windows [{window_begin}, {window_end}) must lie in [0, B * prod(counts)] = [0, {total}]"
        )
    return grid


def _check_accumulate(out: Tensor, pred: Tensor, importance: Tensor | None, weight: Tensor | None,
                      starts: list[int], counts: list[int], window_begin: int) -> list[list[int]]:
    """The checks of the compiled kernel (csrc/ops/sliding_window.cpp), with the same messages."""
    if out.dim() not in (4, 5):
        raise RuntimeError(
            f"sw_accumulate_: out must be (B, C, *spatial) with 2 or 3 spatial dims, got shape {list(out.shape)}"
        )
    if out.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(
            f"sw_accumulate_: out must be float32 or float64 (the accumulator), got {dtype_name(out.dtype)}"
        )
    nd = out.dim() - 2
    if pred.dim() != out.dim():
        raise RuntimeError(
            f"sw_accumulate_: pred must be (N, C, *roi) with the {nd} spatial dims of out, got shape {list(pred.shape)}"
        )
    if pred.shape[1] != out.shape[1]:
        raise RuntimeError(f"sw_accumulate_: pred must have the {out.shape[1]} channels of out, got {pred.shape[1]}")
    if pred.device != out.device:
        raise RuntimeError(f"sw_accumulate_: pred must be on the device of out ({out.device}), got {pred.device}")
    if pred.dtype not in _FLOAT_DTYPES:
        raise RuntimeError(
            f"sw_accumulate_: pred must be float16, bfloat16, float32 or float64, got {dtype_name(pred.dtype)}"
        )
    if any(s < 1 for s in pred.shape[2:]):
        raise RuntimeError(f"sw_accumulate_: pred's window size must be >= 1, got shape {list(pred.shape)}")
    sep_len = 1 + sum(pred.shape[2:])
    if importance is not None and importance.shape != pred.shape[2:] and list(importance.shape) != [sep_len]:
        raise RuntimeError(
            f"sw_accumulate_: importance must have the window shape {list(pred.shape[2:])} or be separable "
            f"(1-D, sum(roi) + 1 = {sep_len} entries), got {list(importance.shape)}"
        )
    if weight is not None and weight.shape != out.shape[2:]:
        raise RuntimeError(
            f"sw_accumulate_: weight must have the spatial shape of out {list(out.shape[2:])}, got {list(weight.shape)}"
        )
    for name, t in (("importance", importance), ("weight", weight)):
        if t is None:
            continue
        if t.dtype != out.dtype:
            raise RuntimeError(
                f"sw_accumulate_: {name} must have the dtype of out ({dtype_name(out.dtype)}), got {dtype_name(t.dtype)}"
            )
        if t.device != out.device:
            raise RuntimeError(f"sw_accumulate_: {name} must be on the device of out ({out.device}), got {t.device}")
    grid = _check_grid("sw_accumulate_", nd, starts, counts)
    total = out.shape[0]
    for c in counts:
        total *= c
    n = pred.shape[0]
    if not (0 <= window_begin and window_begin + n <= total):
        raise RuntimeError(
            f"sw_accumulate_: windows [{window_begin}, {window_begin + n}) must lie in [0, B * prod(counts)] = [0, {total}]"
        )
    return grid


def separable_importance(factors: Sequence[Tensor], floor: Tensor | float) -> Tensor:
    """Pack per-dimension factors and a floor into ``sw_accumulate_``'s separable importance.

    The map it stands for is ``max(((f0[i0] * f1[i1]) * f2[i2]), floor)`` (products rounded in
    that order, as MONAI builds its Gaussian map), computed by the kernel row by row instead of
    read from a window-sized tensor.
    """
    floor_t = torch.as_tensor(floor, dtype=factors[0].dtype, device=factors[0].device).reshape(1)
    return torch.cat([*(f.reshape(-1) for f in factors), floor_t])


def dense_importance(importance: Tensor, roi: Sequence[int]) -> Tensor:
    """The ``(*roi)`` map a separable importance (see :func:`separable_importance`) stands for."""
    factors = list(torch.split(importance[:-1], list(roi)))
    m = factors[0]
    for i in range(1, len(factors)):
        m = m.unsqueeze(-1) * factors[i][(None,) * i]
    return torch.maximum(m, importance[-1])


# ---- the reference twins, and the fake kernels ---------------------------------------------------


def _reference_gather(volume: Tensor, roi_size: list[int], starts: list[int], counts: list[int], window_begin: int,
                      window_end: int, pad_value: float) -> Tensor:
    """Pure-PyTorch twin of ``sw_gather``: same checks, same result (copies, so exact)."""
    grid = _check_gather(volume, roi_size, starts, counts, window_begin, window_end)
    out = torch.full((window_end - window_begin, volume.shape[1], *roi_size), pad_value, dtype=volume.dtype,
                     device=volume.device)
    spatial = volume.shape[2:]
    for i, w in enumerate(range(window_begin, window_end)):
        b, start, _, _ = _window(grid, roi_size, w)
        lo = [max(s, 0) for s in start]
        hi = [min(s + r, n) for s, r, n in zip(start, roi_size, spatial)]
        if any(a >= z for a, z in zip(lo, hi)):
            continue
        dst = tuple(slice(a - s, z - s) for a, z, s in zip(lo, hi, start))
        src = tuple(slice(a, z) for a, z in zip(lo, hi))
        out[(i, slice(None), *dst)] = volume[(b, slice(None), *src)]
    return out


def _reference_accumulate(out: Tensor, pred: Tensor, importance: Tensor | None, weight: Tensor | None,
                          starts: list[int], counts: list[int], window_begin: int, softmax: bool = False) -> None:
    """Pure-PyTorch twin of ``sw_accumulate_``: same checks, same arithmetic in ``out``'s dtype."""
    grid = _check_accumulate(out, pred, importance, weight, starts, counts, window_begin)
    roi = list(pred.shape[2:])
    spatial = out.shape[2:]
    nd = len(roi)
    for n in range(pred.shape[0]):
        b, start, first_from, last_before = _window(grid, roi, window_begin + n)
        lo = [max(s, 0) for s in start]
        hi = [min(s + r, m) for s, r, m in zip(start, roi, spatial)]
        if any(a >= z for a, z in zip(lo, hi)):
            continue
        local = tuple(slice(a - s, z - s) for a, z, s in zip(lo, hi, start))
        region = tuple(slice(a, z) for a, z in zip(lo, hi))
        v = pred[(n, slice(None), *local)].to(out.dtype)
        if importance is not None and importance.dim() == 1:
            importance = dense_importance(importance, roi)
        if softmax:
            v = torch.softmax(v, dim=0)
        if importance is not None:
            v = v * importance[local]
        # Per-voxel first / last flags: products of per-dimension conditions.
        first = torch.ones((), dtype=torch.bool, device=out.device)
        last = torch.ones((), dtype=torch.bool, device=out.device)
        for d in range(nd):
            x = torch.arange(lo[d], hi[d], device=out.device).view([-1 if e == d else 1 for e in range(nd)])
            first = first & (x >= first_from[d]) if first_from[d] != -float("inf") else first
            last = last & (x < last_before[d]) if last_before[d] != float("inf") else last
        dst = out[(b, slice(None), *region)]
        v = torch.where(first, v, dst + v)
        if weight is not None:
            v = torch.where(last, v / weight[region], v)
        dst.copy_(v)


if has_ops():

    @torch.library.register_fake("sslseg::sw_gather")
    def _sw_gather_fake(volume: Tensor, roi_size: list[int], starts: list[int], counts: list[int], window_begin: int,
                        window_end: int, pad_value: float) -> Tensor:
        torch._check(volume.dim() in (4, 5), lambda: "sw_gather: volume must have 2 or 3 spatial dims")
        torch._check(len(roi_size) == volume.dim() - 2, lambda: "sw_gather: roi_size must match volume's spatial dims")
        return volume.new_empty((window_end - window_begin, volume.shape[1], *roi_size))

    @torch.library.register_fake("sslseg::sw_accumulate_")
    def _sw_accumulate_fake(out: Tensor, pred: Tensor, importance: Tensor | None, weight: Tensor | None,
                            starts: list[int], counts: list[int], window_begin: int, softmax: bool = False) -> None:
        torch._check(pred.dim() == out.dim(), lambda: "sw_accumulate_: pred must have the spatial dims of out")
        torch._check(pred.shape[1] == out.shape[1], lambda: "sw_accumulate_: pred must have the channels of out")
        return None
