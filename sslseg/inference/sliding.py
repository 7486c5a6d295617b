"""Sliding-window inference on volumes larger (or smaller) than the network's window.

:func:`sliding_window` tiles a ``(B, C, *spatial)`` volume with overlapping windows, runs the
predictor on batches of windows and blends the window predictions into one output with a Gaussian
(or constant) importance map. With the default grid it returns what MONAI's
``sliding_window_inference`` returns for the same arguments; ``stride=`` selects SSL4MIS's
``test_single_case`` grid (windows every ``stride`` voxels, plain averaging with
``mode="constant"``, ``activation="softmax"``).

The blending runs on two ops (:mod:`sslseg.ops.sliding_window`): ``sw_gather`` copies a batch of
windows (padding included) into one tensor, and ``sw_accumulate_`` multiplies each window by the
importance map and writes or adds it into the output, dividing by the blending weight at the last
window that covers a voxel. The importance map and the weight map (the sum of the importance maps
of all windows) depend only on the geometry and are cached, so a call makes one pass over each
window's prediction and none over a count map. ``use_ops=False`` runs the same algorithm on the
pure-PyTorch reference twins (no custom op anywhere, e.g. to trace or export it).
"""

from __future__ import annotations

import ctypes
import math
import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sslseg.ops import backend, require_ops
from sslseg.ops.sliding_window import dense_importance, separable_importance, sw_accumulate_, sw_gather, window_origin

__all__ = ["SlidingWindowGrid", "clear_cache", "importance_map", "sliding_window", "window_grid"]

_MODES = ("gaussian", "constant")
_PADDING_MODES = ("constant", "reflect", "replicate", "circular")
_OUTPUTS = ("blend", "labels")


@dataclass(frozen=True)
class SlidingWindowGrid:
    """Window geometry of one call, in the coordinates of the (unpadded) volume.

    Attributes:
        spatial_size: Spatial size of the volume.
        roi_size: Window size.
        pad_before: Padding before the volume per dim (``(roi - size) // 2`` where the volume is
            smaller than the window, else 0; the rest goes after), as MONAI and SSL4MIS pad.
        starts: Per-dimension window starts in volume coordinates (negative where padded).
    """

    spatial_size: tuple[int, ...]
    roi_size: tuple[int, ...]
    pad_before: tuple[int, ...]
    starts: tuple[tuple[int, ...], ...]

    @property
    def counts(self) -> list[int]:
        return [len(s) for s in self.starts]

    @property
    def flat_starts(self) -> list[int]:
        return [s for dim in self.starts for s in dim]

    @property
    def num_windows(self) -> int:
        """Windows per batch element."""
        return math.prod(len(s) for s in self.starts)


def _per_dim(value, nd: int, name: str, kind: type) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != nd:
            raise ValueError(f"sliding_window: {name} must have {nd} entries (one per spatial dim), got {len(value)}")
        return list(value)
    if isinstance(value, kind) or (kind is float and isinstance(value, int)):
        return [value] * nd
    raise TypeError(f"sliding_window: {name} must be a {kind.__name__} or a sequence of {nd}, got {type(value).__name__}")


def window_grid(
    spatial_size: Sequence[int],
    roi_size: Sequence[int],
    overlap: Sequence[float] | float = 0.5,
    stride: Sequence[int] | int | None = None,
) -> SlidingWindowGrid:
    """The windows :func:`sliding_window` uses for a volume of ``spatial_size``.

    Default (``stride=None``): MONAI's grid. Along each dim, the interval is
    ``int(roi * (1 - overlap))`` (at least 1; ``roi`` when the padded size equals ``roi``), windows
    start at multiples of it, and the last window is shifted back to end at the border.
    With ``stride``: SSL4MIS's grid, ``ceil((size - roi) / stride) + 1`` windows starting at
    ``min(k * stride, size - roi)``. In both, a dim smaller than the window is padded to it
    (``(roi - size) // 2`` before) and gets a single window.
    """
    nd = len(spatial_size)
    spatial = [int(s) for s in spatial_size]
    roi = [int(r) for r in roi_size]
    padded = [max(s, r) for s, r in zip(spatial, roi)]
    pad_before = [(p - s) // 2 for s, p in zip(spatial, padded)]
    starts: list[tuple[int, ...]] = []
    if stride is None:
        ov = _per_dim(overlap, nd, "overlap", float)
        for d in range(nd):
            if roi[d] == padded[d]:
                interval = roi[d]
            else:
                interval = int(roi[d] * (1 - ov[d]))
                interval = interval if interval > 0 else 1
            # monai.data.utils.dense_patch_slices
            num = int(math.ceil(float(padded[d]) / interval))
            scan = next((k for k in range(num) if k * interval + roi[d] >= padded[d]), None)
            n = scan + 1 if scan is not None else 1
            dim = []
            for k in range(n):
                s = k * interval
                s -= max(s + roi[d] - padded[d], 0)
                dim.append(s - pad_before[d])
            starts.append(tuple(dim))
    else:
        st = _per_dim(stride, nd, "stride", int)
        for d in range(nd):
            # SSL4MIS test_single_case
            n = math.ceil((padded[d] - roi[d]) / st[d]) + 1
            starts.append(tuple(min(st[d] * k, padded[d] - roi[d]) - pad_before[d] for k in range(n)))
    return SlidingWindowGrid(tuple(spatial), tuple(roi), tuple(pad_before), tuple(starts))


# ---- cached importance and weight maps ------------------------------------------------------------

_CACHE_SIZE = 4
_IMPORTANCE: OrderedDict = OrderedDict()
_WEIGHT: OrderedDict = OrderedDict()


def clear_cache() -> None:
    """Drop the cached importance and weight maps (they hold device memory: one float per voxel)."""
    _IMPORTANCE.clear()
    _WEIGHT.clear()


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def _cached(cache: OrderedDict, key, make: Callable[[], Tensor]) -> Tensor:
    if _tracing():  # never hand a traced/fake tensor to a later eager call, nor take one
        return make()
    hit = cache.get(key)
    if hit is not None:
        cache.move_to_end(key)
        return hit
    value = make()
    if type(value) is not torch.Tensor:  # a tensor subclass made under a tracer: not cached
        return value
    cache[key] = value
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return value


def importance_map(
    roi_size: Sequence[int],
    mode: str = "gaussian",
    sigma_scale: Sequence[float] | float = 0.125,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The blending weights of one window, ``(*roi_size)``: MONAI's ``compute_importance_map``.

    ``gaussian``: the outer product of 1D Gaussians with ``sigma = sigma_scale * roi`` centred on
    the window, computed in float32 on the CPU exactly as MONAI does; ``constant``: ones. Both
    are clamped below at ``max(min, 1e-3)``. Cached per (size, mode, sigma, device, dtype).
    """
    roi = tuple(int(r) for r in roi_size)
    sig = tuple(float(s) for s in _per_dim(sigma_scale, len(roi), "sigma_scale", float))
    key = (roi, mode, sig, torch.device(device), dtype)

    def make() -> Tensor:
        if mode == "constant":
            m = torch.ones(roi, dtype=torch.float)
            return torch.maximum(m, torch.tensor(1e-3)).to(device=device, dtype=dtype)
        factors, low = _gaussian_factors(roi, sig)
        return dense_importance(separable_importance(factors, low), roi).to(device=device, dtype=dtype)

    return _cached(_IMPORTANCE, key, make)


def _gaussian_factors(roi: tuple, sig: tuple) -> tuple[list[Tensor], Tensor]:
    """MONAI's 1-D Gaussians (float32, on the CPU) and the floor ``max(min(map), 1e-3)``.

    Products of positive floats round monotonically, so the minimum of the map is the product of
    the factors' minima, in the map's order. No ``.item()``: traceable by torch.export.
    """
    sigmas = [r * s for r, s in zip(roi, sig)]
    factors = []
    for i, r in enumerate(roi):
        x = torch.arange(start=-(r - 1) / 2.0, end=(r - 1) / 2.0 + 1, dtype=torch.float)
        factors.append(torch.exp(x**2 / (-2 * sigmas[i] ** 2)))
    low = factors[0].min()
    for f in factors[1:]:
        low = low * f.min()
    return factors, torch.clamp(low, min=1e-3)


def _separable_map(roi: tuple, sig: tuple, device: torch.device) -> Tensor:
    """The float32 Gaussian map in sw_accumulate_'s separable form, cached."""
    key = ("separable", roi, sig, torch.device(device))

    def make() -> Tensor:
        factors, low = _gaussian_factors(roi, sig)
        return separable_importance(factors, low).to(device)

    return _cached(_IMPORTANCE, key, make)


def _weight_map(grid: SlidingWindowGrid, mode: str, sigma: tuple, device: torch.device, dtype: torch.dtype,
                use_ops: bool) -> Tensor:
    """Sum of the importance maps of every window, ``(*spatial)``: MONAI's count map, cached."""
    key = (grid, mode, sigma, device, dtype, use_ops)

    def make() -> Tensor:
        imp = importance_map(grid.roi_size, mode, sigma, device=device, dtype=dtype)
        w = torch.empty((1, 1, *grid.spatial_size), dtype=dtype, device=device)
        windows = imp[None, None].expand(grid.num_windows, 1, *grid.roi_size)
        _accumulate(use_ops, w, windows, None, None, grid, 0)
        return w[0, 0]

    return _cached(_WEIGHT, key, make)


def _accumulate(use_ops: bool, out: Tensor, pred: Tensor, importance: Tensor | None, weight: Tensor | None,
                grid: SlidingWindowGrid, window_begin: int, starts: list[int] | None = None,
                softmax: bool = False) -> None:
    starts = grid.flat_starts if starts is None else starts
    sw_accumulate_(out, pred, starts, grid.counts, window_begin, importance=importance, weight=weight, softmax=softmax,
                   backend="compiled" if use_ops else "reference")


def _gather(use_ops: bool, volume: Tensor, grid: SlidingWindowGrid, starts: list[int], begin: int, end: int,
            pad_value: float) -> Tensor:
    if end - begin == 1:
        # One window inside the volume: a view, as MONAI passes it (no copy).
        b, start = window_origin(starts, grid.counts, begin)
        if all(s >= 0 and s + r <= n for s, r, n in zip(start, grid.roi_size, volume.shape[2:])):
            return volume[(slice(b, b + 1), slice(None), *(slice(s, s + r) for s, r in zip(start, grid.roi_size)))]
    return sw_gather(volume, grid.roi_size, starts, grid.counts, begin, end, float(pad_value),
                     backend="compiled" if use_ops else "reference")


def sliding_window(
    predictor: Callable[[Tensor], Tensor],
    volume: Tensor,
    roi_size: Sequence[int] | int,
    overlap: Sequence[float] | float = 0.5,
    mode: str = "gaussian",
    sigma_scale: Sequence[float] | float = 0.125,
    sw_batch_size: int = 4,
    padding_mode: str = "constant",
    cval: float = 0.0,
    *,
    stride: Sequence[int] | int | None = None,
    activation: str | Callable[[Tensor], Tensor] | None = None,
    output: str = "blend",
    streaming: bool = False,
    out: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    sw_device: torch.device | str | None = None,
    device: torch.device | str | None = None,
    use_ops: bool | None = None,
) -> Tensor:
    """Run ``predictor`` on overlapping windows of ``volume`` and blend the window outputs.

    Shapes: ``volume`` is ``(B, C_in, H, W)`` or ``(B, C_in, H, W, D)`` (any float dtype, CPU or
    CUDA); the predictor maps ``(N, C_in, *roi_size)`` to ``(N, K, *roi_size)`` (same window
    size; a model with several outputs must be wrapped to return one tensor); the result is
    ``(B, K, *spatial)`` (``output="blend"``) or ``(B, *spatial)`` int64 labels
    (``output="labels"``, the argmax over K). Any spatial sizes work, odd ones included.

    Windows: see :func:`window_grid` (MONAI's grid by default, SSL4MIS's with ``stride``). A
    volume smaller than the window along a dim is padded to the window (``(roi - size) // 2``
    voxels before, the rest after) with ``padding_mode`` (``constant`` uses ``cval``, without
    materialising the padded volume), and the output is cropped back to the volume's size.

    For the same arguments the blended output equals
    ``monai.inferers.sliding_window_inference(volume, roi_size, sw_batch_size, predictor, overlap,
    mode, sigma_scale, padding_mode, cval)`` (float32 volumes and predictions: the same values, in
    the same summation order; MONAI's own defaults are ``overlap=0.25, mode="constant"``). SSL4MIS's
    ``test_single_case`` is ``stride=(18, 18, 4), mode="constant", activation="softmax",
    output="labels"``.

    Cost: one pass over each window's prediction (weight, write or add, and normalise at the last
    window covering a voxel); no zero fill of the output, no count map per call. The importance
    map and the weight map (one float per voxel of the volume) are cached per geometry, so the
    first call for a new volume size makes one more pass over the windows; :func:`clear_cache`
    frees them. Windows are gathered into a batch by one op (a view when ``sw_batch_size=1``).

    Args:
        predictor: Callable on a batch of windows (a model in eval mode, usually). Runs under
            ``torch.no_grad()``.
        volume: ``(B, C_in, *spatial)`` with 2 or 3 spatial dims.
        roi_size: Window size, an int or one per spatial dim; entries ``<= 0`` or None take the
            volume's size along that dim (as MONAI).
        overlap: Fraction of overlap of neighbouring windows, in ``[0, 1)`` (float or per dim).
        mode: ``"gaussian"`` (weights fall off towards window edges) or ``"constant"`` (plain
            average).
        sigma_scale: Gaussian sigma as a fraction of the window size (float or per dim, > 0).
        sw_batch_size: Windows per predictor call (windows of several batch elements may share a
            call, as in MONAI).
        padding_mode: ``"constant"``, ``"reflect"``, ``"replicate"`` or ``"circular"``; only used
            where the volume is smaller than the window.
        cval: Padding value for ``padding_mode="constant"``.
        stride: Window step per dim (int or per dim) for SSL4MIS's grid; ``overlap`` is then unused.
        activation: Applied to each window's output before blending: ``"softmax"`` (over dim 1,
            fused into the blending op), ``"sigmoid"``, a callable, or None.
        output: ``"blend"`` (the blended predictions) or ``"labels"`` (their argmax over dim 1).
        streaming: Blend slab by slab along the first spatial dim: only two slabs of one window's
            depth are held in float32 (plus one float per voxel of cached weights), and finished
            planes go straight to the output (labels, or ``out``/``out_dtype``). For volumes
            whose ``(B, K, *spatial)`` float32 output does not fit in memory. Same values.
        out: Optional preallocated result: ``(B, K, *spatial)`` floating for ``"blend"`` (any
            float dtype, e.g. float16), ``(B, *spatial)`` integer for ``"labels"``. An ``out`` of
            the accumulator's dtype (float32, or float64 for float64 predictions) on ``device`` is
            blended into directly: reusing one across calls saves allocating (and page-faulting)
            a new output each time.
        out_dtype: Dtype of a newly allocated ``"blend"`` result (default: the accumulator's,
            float32, or float64 when the predictor returns float64).
        sw_device: Device the windows are moved to before the predictor (default: the volume's).
        device: Device of the output and of the blending (default: the volume's).
        use_ops: True: the compiled ops (error if missing); False: the pure-PyTorch reference
            twins, no custom op; None (default): :func:`sslseg.ops.backend` decides (the compiled
            ops when available, else the twins with a warning or an error under
            ``SSLSEG_REQUIRE_OPS=1``; the twins when ``SSLSEG_OPS=reference``).

    Returns:
        ``(B, K, *spatial)`` float (``"blend"``) or ``(B, *spatial)`` int64 (``"labels"``), on
        ``device``; ``out`` when given. Not differentiable.
    """
    if not isinstance(volume, Tensor):
        raise TypeError(f"sliding_window: volume must be a Tensor, got {type(volume).__name__}")
    if volume.dim() not in (4, 5):
        raise ValueError(
            f"sliding_window: volume must be (B, C, H, W) or (B, C, H, W, D), got shape {list(volume.shape)}"
        )
    if not volume.is_floating_point():
        raise ValueError(f"sliding_window: volume must be a float tensor, got {volume.dtype}")
    nd = volume.dim() - 2
    spatial = list(volume.shape[2:])
    roi = _per_dim(roi_size, nd, "roi_size", int) if not isinstance(roi_size, (list, tuple)) else list(roi_size)
    if len(roi) != nd:
        raise ValueError(f"sliding_window: roi_size must have {nd} entries (one per spatial dim), got {len(roi)}")
    roi = [int(s) if r is None or int(r) <= 0 else int(r) for r, s in zip(roi, spatial)]
    if mode not in _MODES:
        raise ValueError(f"sliding_window: mode must be one of {_MODES}, got {mode!r}")
    if padding_mode not in _PADDING_MODES:
        raise ValueError(f"sliding_window: padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
    if output not in _OUTPUTS:
        raise ValueError(f"sliding_window: output must be one of {_OUTPUTS}, got {output!r}")
    if isinstance(sw_batch_size, bool) or not isinstance(sw_batch_size, int) or sw_batch_size < 1:
        raise ValueError(f"sliding_window: sw_batch_size must be an int >= 1, got {sw_batch_size!r}")
    ov = _per_dim(overlap, nd, "overlap", float)
    if any(not 0 <= o < 1 for o in ov):
        raise ValueError(f"sliding_window: overlap must be in [0, 1), got {overlap!r}")
    sig = tuple(float(s) for s in _per_dim(sigma_scale, nd, "sigma_scale", float))
    if any(not s > 0 for s in sig):
        raise ValueError(f"sliding_window: sigma_scale must be > 0, got {sigma_scale!r}")
    if stride is not None and any(int(s) < 1 for s in _per_dim(stride, nd, "stride", int)):
        raise ValueError(f"sliding_window: stride must be >= 1, got {stride!r}")
    fused_softmax = isinstance(activation, str) and activation == "softmax"  # done by sw_accumulate_
    act = None if fused_softmax else _activation(activation)
    if use_ops is None:
        use_ops = backend() == "compiled"
    elif use_ops:
        require_ops()

    device = torch.device(device) if device is not None else volume.device
    sw_device = torch.device(sw_device) if sw_device is not None else volume.device
    grid = window_grid(spatial, roi, ov, stride)
    needs_pad = any(r > s for r, s in zip(roi, spatial))
    # Gather source: the volume itself (constant padding is done by the gather), or, for the other
    # padding modes, the padded volume (only where the volume is smaller than the window).
    src, src_starts = volume, grid.flat_starts
    if needs_pad and padding_mode != "constant":
        pads = []
        for d in reversed(range(nd)):
            extra = max(roi[d] - spatial[d], 0)
            pads += [grid.pad_before[d], extra - grid.pad_before[d]]
        src = F.pad(volume, pads, mode=padding_mode)
        src_starts = [s + p for s, p in zip(grid.flat_starts, _expand(grid.pad_before, grid.counts))]

    batch = volume.shape[0]
    total = batch * grid.num_windows
    with torch.no_grad():
        state = _Blend(grid, mode, sig, device, use_ops, output, streaming, out, out_dtype, batch, fused_softmax)
        if streaming:
            ranges = [(b * grid.num_windows + i, min(b * grid.num_windows + i + sw_batch_size,
                                                     (b + 1) * grid.num_windows))
                      for b in range(batch) for i in range(0, grid.num_windows, sw_batch_size)]
        else:
            ranges = [(i, min(i + sw_batch_size, total)) for i in range(0, total, sw_batch_size)]
        for begin, end in ranges:
            win = _gather(use_ops, src, grid, src_starts, begin, end, cval)
            pred = predictor(win.to(sw_device))
            pred = _check_pred(pred, end - begin, roi)
            if act is not None:
                pred = act(pred)
            state.add(pred.to(device), begin)
        return state.finish()


def _expand(per_dim: Sequence[int], counts: Sequence[int]) -> list[int]:
    return [v for v, c in zip(per_dim, counts) for _ in range(c)]


def _activation(activation) -> Callable[[Tensor], Tensor] | None:
    if activation is None:
        return None
    if activation == "softmax":
        return lambda t: torch.softmax(t, dim=1)
    if activation == "sigmoid":
        return torch.sigmoid
    if callable(activation):
        return activation
    raise ValueError(f"sliding_window: activation must be None, 'softmax', 'sigmoid' or a callable, got {activation!r}")


def _check_pred(pred, n: int, roi: list[int]) -> Tensor:
    if not isinstance(pred, Tensor):
        raise TypeError(
            f"sliding_window: predictor must return one Tensor, got {type(pred).__name__}; wrap a model with "
            "several outputs, e.g. predictor=lambda x: model(x)[0]"
        )
    if pred.dim() != len(roi) + 2 or pred.shape[0] != n or list(pred.shape[2:]) != roi:
        raise ValueError(
            f"sliding_window: predictor must map ({n}, C_in, *{roi}) to ({n}, K, *{roi}), got shape {list(pred.shape)}"
        )
    if not pred.is_floating_point():
        raise ValueError(f"sliding_window: predictor must return a float tensor, got {pred.dtype}")
    return pred


class _Blend:
    """Accumulator state of one call: the whole output, or two slabs when streaming."""

    def __init__(self, grid: SlidingWindowGrid, mode: str, sigma: tuple, device: torch.device, use_ops: bool,
                 output: str, streaming: bool, out: Tensor | None, out_dtype: torch.dtype | None, batch: int,
                 softmax: bool) -> None:
        self.grid, self.mode, self.sigma, self.device, self.use_ops = grid, mode, sigma, device, use_ops
        self.softmax = softmax
        self.output, self.streaming, self.out, self.out_dtype, self.batch = output, streaming, out, out_dtype, batch
        self.ready = False
        self.acc: Tensor | None = None
        self.result: Tensor | None = None
        self.plane = grid.num_windows // grid.counts[0]  # windows per position along dim 0

    def _init(self, pred: Tensor) -> None:
        dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
        g = self.grid
        self.dtype = dtype
        if self.mode == "constant":
            self.imp = None
        elif dtype == torch.float32:  # computed row by row in the kernel: no window-sized map to read
            self.imp = _separable_map(g.roi_size, self.sigma, self.device)
        else:  # float64 accumulator: MONAI's float32 map, cast
            self.imp = importance_map(g.roi_size, self.mode, self.sigma, device=self.device, dtype=dtype)
        self.weight = _weight_map(g, self.mode, self.sigma, self.device, dtype, self.use_ops)
        k = pred.shape[1]
        shape = (self.batch, k, *g.spatial_size)
        if self.output == "labels":
            want = (self.batch, *g.spatial_size)
            if self.out is not None:
                _check_out(self.out, want, integer=True)
        elif self.out is not None:
            _check_out(self.out, shape, integer=False)
        if not self.streaming:
            direct = (self.out is not None and self.output == "blend" and self.out.dtype == dtype
                      and self.out.device == self.device)
            # out of the accumulator's dtype: blended in place (no new buffer, no page faults)
            self.acc = self.out if direct else _empty(shape, dtype, self.device)
            return
        if self.out is not None:
            self.result = self.out
        elif self.output == "labels":
            self.result = _empty((self.batch, *g.spatial_size), torch.int64, self.device)
        else:
            self.result = _empty(shape, self.out_dtype or dtype, self.device)
        depth = min(g.roi_size[0], g.spatial_size[0])
        self.slabs = [torch.empty((1, k, depth, *g.spatial_size[1:]), dtype=dtype, device=self.device)
                      for _ in range(2)]
        self.depth = depth
        self.b = -1

    def add(self, pred: Tensor, begin: int) -> None:
        if not self.ready:
            self._init(pred)
            self.ready = True
        if not self.streaming:
            _accumulate(self.use_ops, self.acc, pred, self.imp, self.weight, self.grid, begin, softmax=self.softmax)
            return
        g = self.grid
        n_win = g.num_windows
        # Split the batch of windows (one batch element) at changes of the dim-0 grid position.
        i = 0
        while i < pred.shape[0]:
            w = begin + i
            b, local = divmod(w, n_win)
            k0 = local // self.plane
            j = min(pred.shape[0], i + (k0 + 1) * self.plane - local)
            self._advance(b, k0)
            starts = list(g.flat_starts)
            starts[:g.counts[0]] = [s - self.lo for s in starts[:g.counts[0]]]
            weight = self.weight[self.lo:self.lo + self.depth]
            _accumulate(self.use_ops, self.slabs[0], pred[i:j], self.imp, weight, g, local, starts, self.softmax)
            i = j

    def _advance(self, b: int, k0: int) -> None:
        if b != self.b:
            if self.b >= 0:
                self._emit(self.lo, self.grid.spatial_size[0])
            self.b, self.k0, self.lo = b, k0, max(self.grid.starts[0][k0], 0)
            return
        if k0 == self.k0:
            return
        new_lo = max(self.grid.starts[0][k0], 0)
        self._emit(self.lo, new_lo)  # every window covering these planes has been added
        keep = self.lo + self.depth - new_lo
        if keep > 0:
            self.slabs[1][:, :, :keep].copy_(self.slabs[0][:, :, new_lo - self.lo:])
        self.slabs.reverse()
        self.k0, self.lo = k0, new_lo

    def _emit(self, lo: int, hi: int) -> None:
        if hi <= lo:
            return
        done = self.slabs[0][0, :, :hi - lo]
        if self.output == "labels":
            self.result[self.b, lo:hi].copy_(_argmax1(done[None])[0])
        else:
            self.result[self.b, :, lo:hi].copy_(done)

    def finish(self) -> Tensor:
        if self.streaming:
            self._emit(self.lo, self.grid.spatial_size[0])
            return self.result
        res = self.acc
        if self.output == "labels":
            labels = _argmax1(res)
            if self.out is not None:
                return self.out.copy_(labels)
            return labels
        if self.out is not None:
            return res if res is self.out else self.out.copy_(res)
        if self.out_dtype is not None and self.out_dtype != res.dtype:
            return res.to(self.out_dtype)
        return res


#: Huge pages: a CPU buffer of at least this size is advised to the kernel as huge-page backed.
_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
_libc: ctypes.CDLL | None = None


def _empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.empty``, with the buffer advised as transparent-huge-page backed on Linux CPUs.

    A fresh output of a whole volume (64 MB for 2 classes of 224x224x160) is new memory: each 4 KiB
    page faults on its first write, which costs more than the blending itself (20 ms against 3 ms
    for that buffer with 2 MiB pages, measured here). ``madvise(MADV_HUGEPAGE)`` on the buffer's
    2 MiB-aligned interior, before anything writes to it, asks the kernel for huge pages (Linux
    with transparent huge pages in ``madvise`` or ``always`` mode; elsewhere it does nothing).
    The contents and the allocator are unchanged; what torch's ``THP_MEM_ALLOC_ENABLE=1`` does for
    every allocation of the process, this does for these buffers alone.
    """
    global _libc
    t = torch.empty(tuple(shape), dtype=dtype, device=device)
    if t.device.type != "cpu" or not sys.platform.startswith("linux") or t.nbytes < 2 * _HUGE_PAGE or _tracing():
        return t
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
    end = (t.data_ptr() + t.nbytes) // _HUGE_PAGE * _HUGE_PAGE
    if end > start:  # advice only: a refusal (EINVAL without THP) leaves a plain buffer
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)
    return t


def _argmax1(x: Tensor) -> Tensor:
    """``x.argmax(1)`` (first maximum wins) as K elementwise passes: torch's CPU argmax over a
    non-innermost dim of a few classes is ~50x slower than this on a (1, 2, 128, 128, 88) volume."""
    idx = _empty((x.shape[0], *x.shape[2:]), torch.int64, x.device).zero_()
    if x.shape[1] == 1:
        return idx
    best = x[:, 0]
    for c in range(1, x.shape[1]):
        xc = x[:, c]
        better = (xc > best) | (xc.isnan() & ~best.isnan())  # NaN counts as the maximum, as in argmax
        idx.masked_fill_(better, c)
        best = torch.where(better, xc, best)
    return idx


def _check_out(out: Tensor, shape: tuple, integer: bool) -> None:
    if list(out.shape) != list(shape):
        raise ValueError(f"sliding_window: out must have shape {list(shape)}, got {list(out.shape)}")
    if integer and (out.is_floating_point() or out.is_complex()):
        raise ValueError(f"sliding_window: out must be an integer tensor for output='labels', got {out.dtype}")
    if not integer and not out.is_floating_point():
        raise ValueError(f"sliding_window: out must be a float tensor for output='blend', got {out.dtype}")
