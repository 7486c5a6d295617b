"""sslseg.ops.sw_gather / sw_accumulate_: the kernels against their reference twins, and the op contract."""

from __future__ import annotations

import pytest
import torch

from sslseg.inference import window_grid
from sslseg.ops import sliding_window as sw
from sslseg.ops.sliding_window import _reference_accumulate, _reference_gather, sw_accumulate_, sw_gather
from tests.devices import devices

GATHER = torch.ops.sslseg.sw_gather.default
ACCUMULATE = torch.ops.sslseg.sw_accumulate_.default

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# (volume shape, roi, per-dim starts): windows partly or wholly outside the volume included.
GATHER_CASES = {
    "3d_padded": ((2, 3, 9, 10, 7), (4, 5, 3), ([-2, 1, 6], [0, 5, 8], [-1, 2, 5])),
    "3d_outside": ((1, 2, 5, 6, 7), (3, 3, 3), ([-4, 0, 4], [2, 7], [-3, 6])),
    "2d_odd": ((2, 1, 13, 11), (8, 6), ([0, 5], [-1, 3, 5])),
    "roi_larger": ((1, 2, 3, 4, 5), (6, 7, 8), ([-1], [-2], [-1])),
}


def _flat(per_dim):
    return [s for dim in per_dim for s in dim], [len(dim) for dim in per_dim]


def _randn(shape, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("case", list(GATHER_CASES))
def test_gather_matches_reference(device, dtype, case):
    shape, roi, per_dim = GATHER_CASES[case]
    starts, counts = _flat(per_dim)
    vol = _randn(shape, device, dtype)
    total = shape[0] * torch.tensor(counts).prod().item()
    for begin, end in [(0, total), (1, min(4, total)), (total - 1, total), (2 % total, 2 % total)]:
        got = GATHER(vol, list(roi), starts, counts, begin, end, 1.5)
        want = _reference_gather(vol, list(roi), starts, counts, begin, end, 1.5)
        assert got.shape == (end - begin, shape[1], *roi) and got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # a gather is a copy: exact


@pytest.mark.parametrize("device", devices())
def test_gather_non_contiguous_volume_and_values(device):
    base = _randn((2, 11, 3, 9, 8), device, torch.float32)
    vol = base.permute(0, 2, 1, 3, 4)[..., ::2]  # (2, 3, 11, 9, 4), strided last dim
    starts, counts = _flat(([-1, 5], [0, 4], [-2, 1]))
    got = GATHER(vol, [7, 5, 4], starts, counts, 0, 16, 0.0)
    want = _reference_gather(vol, [7, 5, 4], starts, counts, 0, 16, 0.0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # copies: exact
    # window 5 = batch 0, grid (1, 0, 1): start (5, 0, 1); in-volume part [5, 11) x [0, 5) x [1, 4)
    torch.testing.assert_close(got[5, :, :6, :, :3], vol[0, :, 5:11, 0:5, 1:4], rtol=0, atol=0)
    assert (got[5, :, 6:] == 0).all() and (got[5, :, :, :, 3:] == 0).all()


@pytest.mark.parametrize("device", devices())
def test_gather_empty(device):
    vol = _randn((1, 2, 4, 4), device, torch.float32)
    assert GATHER(vol, [2, 2], [0, 2, 0, 2], [2, 2], 3, 3, 0.0).shape == (0, 2, 2, 2)
    vol0 = torch.zeros((0, 2, 4, 4), device=device)
    assert GATHER(vol0, [2, 2], [0, 2, 0, 2], [2, 2], 0, 0, 0.0).shape == (0, 2, 2, 2)


# ---- accumulate ----------------------------------------------------------------------------------

# (out shape, roi, overlap): grids from sslseg.inference.window_grid (MONAI's), in out coordinates.
ACC_CASES = {
    "3d_odd": ((2, 3, 11, 9, 7), (5, 4, 3), 0.5),
    "3d_overlap_0.25": ((1, 2, 13, 10, 9), (6, 5, 4), 0.25),
    "2d_odd": ((2, 2, 17, 13), (8, 6), 0.5),
    "roi_larger": ((1, 2, 3, 9, 5), (6, 4, 8), 0.5),  # padded along two dims
}


def _grid(shape, roi, overlap):
    g = window_grid(shape[2:], roi, overlap)
    return g.flat_starts, g.counts, g.num_windows


def _blend_naive(pred, imp, starts, counts, out_shape, roi, dtype, softmax=False):
    """sum_w pred_w * imp / sum_w imp with zeros + adds over the clipped windows."""
    if softmax:
        pred = torch.softmax(pred.to(dtype), dim=1)
    num = torch.zeros(out_shape, dtype=dtype, device=pred.device)
    den = torch.zeros(out_shape[2:], dtype=dtype, device=pred.device)
    per_dim, pos = [], 0
    for c in counts:
        per_dim.append(starts[pos:pos + c])
        pos += c
    grid = [list(s) for s in per_dim]
    per_batch = len(pred) // out_shape[0]
    for w in range(len(pred)):
        b, start, _, _ = sw._window(grid, list(roi), w)
        lo = [max(s, 0) for s in start]
        hi = [min(s + r, n) for s, r, n in zip(start, roi, out_shape[2:])]
        loc = tuple(slice(a - s, z - s) for a, z, s in zip(lo, hi, start))
        reg = tuple(slice(a, z) for a, z in zip(lo, hi))
        num[(b, slice(None), *reg)] += pred[(w, slice(None), *loc)].to(dtype) * imp[loc]
        if b == 0:
            den[reg] += imp[loc]
    assert per_batch * out_shape[0] == len(pred)
    return num / den


def _imp(roi, device, dtype):
    g = torch.Generator().manual_seed(7)
    return (torch.rand(roi, generator=g, dtype=torch.float64) + 0.1).to(device=device, dtype=dtype)


def _weight(imp, starts, counts, spatial, n_windows, fn):
    w = torch.full((1, 1, *spatial), float("nan"), dtype=imp.dtype, device=imp.device)
    fn(w, imp[None, None].expand(n_windows, 1, *imp.shape), None, None, starts, counts, 0)
    return w[0, 0]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("pred_dtype", FLOATS, ids=str)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", list(ACC_CASES))
@pytest.mark.parametrize("softmax", [False, True], ids=["blend", "softmax"])
def test_accumulate_matches_reference(device, pred_dtype, out_dtype, case, softmax):
    shape, roi, overlap = ACC_CASES[case]
    starts, counts, per_batch = _grid(shape, roi, overlap)
    n = shape[0] * per_batch
    pred = _randn((n, shape[1], *roi), device, pred_dtype, seed=1)
    imp = _imp(roi, device, out_dtype)
    weight = _weight(imp, starts, counts, shape[2:], per_batch, ACCUMULATE)
    weight_ref = _weight(imp, starts, counts, shape[2:], per_batch, _reference_accumulate)
    # Sums of the same importance values, one IEEE addition per window in window order on both sides
    # (no products to contract into FMAs): exact by construction.
    torch.testing.assert_close(weight, weight_ref, rtol=0, atol=0)
    got = torch.full(shape, float("nan"), dtype=out_dtype, device=device)  # write-first: no zero fill needed
    want = got.clone()
    for begin in range(0, n, 3):  # calls of 3 windows, crossing batch elements
        ACCUMULATE(got, pred[begin:begin + 3], imp, weight, starts, counts, begin, softmax)
        _reference_accumulate(want, pred[begin:begin + 3], imp, weight, starts, counts, begin, softmax)
    tol = 1e-6 if out_dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    naive = _blend_naive(pred, imp, starts, counts, shape, roi, out_dtype, softmax)
    torch.testing.assert_close(got, naive, rtol=tol * 10, atol=tol * 10)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", ["3d_odd", "2d_odd", "roi_larger"])
def test_separable_importance_equals_dense(device, case):
    shape, roi, overlap = ACC_CASES[case]
    starts, counts, per_batch = _grid(shape, roi, overlap)
    n = shape[0] * per_batch
    g = torch.Generator().manual_seed(9)
    factors = [torch.rand(r, generator=g) + 0.05 for r in roi]
    sep = sw.separable_importance(factors, 0.2).to(device)
    dense = sw.dense_importance(sep, roi)
    m = factors[0]
    for i in range(1, len(roi)):
        m = m.unsqueeze(-1) * factors[i][(None,) * i]
    # MONAI's construction: the same IEEE products in the same order, then a max: exact.
    torch.testing.assert_close(dense.cpu(), torch.clamp(m, min=0.2), rtol=0, atol=0)
    pred = _randn((n, shape[1], *roi), device, torch.float32, seed=6)
    weight = _weight(dense, starts, counts, shape[2:], per_batch, ACCUMULATE)
    results = []
    for imp in (sep, dense):
        for fn in (ACCUMULATE, _reference_accumulate):
            out = torch.empty(shape, device=device)
            fn(out, pred, imp, weight, starts, counts, 0)
            results.append(out)
    # One kernel fed the separable or the dense map: the map's values are the same products in the
    # same order, so the blend is bit-equal. Kernel against twin: pred * imp + num may be contracted
    # into an FMA where the compiler targets one (aarch64), and the sum cancels (pred has both signs),
    # so the twin is held to the accumulate tolerance of test_accumulate_matches_reference
    # (1e-6, about 8 float32 ulps at magnitude 1) rather than to a ulp count.
    torch.testing.assert_close(results[2], results[0], rtol=0, atol=0)
    for r in (results[1], results[3]):
        torch.testing.assert_close(r, results[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", devices())
def test_accumulate_without_importance_or_weight(device):
    shape, roi = (1, 2, 9, 8), (5, 4)
    starts, counts, n = _grid(shape, roi, 0.5)
    pred = _randn((n, 2, *roi), device, torch.float32, seed=3)
    got = torch.empty(shape, device=device)
    ACCUMULATE(got, pred, None, None, starts, counts, 0)
    ones = torch.ones(roi, device=device)
    sums = _blend_naive(pred, ones, starts, counts, shape, roi, torch.float32)
    cnt = _weight(ones, starts, counts, shape[2:], n, ACCUMULATE)
    torch.testing.assert_close(got, sums * cnt, rtol=1e-6, atol=1e-6)  # unnormalised sums


@pytest.mark.parametrize("device", devices())
def test_accumulate_non_contiguous_out_and_pred(device):
    shape, roi = (2, 3, 10, 9, 7), (6, 5, 4)
    starts, counts, per_batch = _grid(shape, roi, 0.5)
    n = 2 * per_batch
    base_pred = _randn((n, 3, 4, 5, 6), device, torch.float32, seed=4)
    pred = base_pred.permute(0, 1, 4, 3, 2)  # (n, 3, 6, 5, 4), reversed strides
    imp = _imp(roi, device, torch.float32)
    weight = _weight(imp, starts, counts, shape[2:], per_batch, ACCUMULATE)
    big = torch.zeros((2, 5, 10, 9, 14), device=device)
    got = big[:, 1:4, :, :, ::2]  # strided channel and last dim
    want = torch.empty(shape, device=device)
    ACCUMULATE(got, pred, imp, weight, starts, counts, 0)
    _reference_accumulate(want, pred, imp, weight, starts, counts, 0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert (big[:, 0] == 0).all() and (big[..., 1::2] == 0).all()  # nothing written outside the view
    ACCUMULATE(got, pred, imp, weight, starts, counts, 0, True)
    _reference_accumulate(want, pred, imp, weight, starts, counts, 0, True)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.sum(1), torch.ones_like(got[:, 0]), rtol=1e-5, atol=1e-5)  # probabilities


@pytest.mark.parametrize("device", devices())
def test_accumulate_empty(device):
    out = torch.zeros((1, 2, 4, 4), device=device)
    ACCUMULATE(out, torch.zeros((0, 2, 2, 2), device=device), None, None, [0, 2, 0, 2], [2, 2], 4)
    assert (out == 0).all()


# ---- errors ----------------------------------------------------------------------------------------


def _vol(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


GATHER_ERRORS = [
    ((_vol(2, 3, 4), [2], [0], [1], 0, 1), r"volume must be \(B, C, \*spatial\) with 2 or 3 spatial dims, got shape \[2, 3, 4\]"),
    ((_vol(1, 1, 4, 4, dtype=torch.int64), [2, 2], [0, 0], [1, 1], 0, 1), r"volume must be float16, bfloat16, float32 or float64, got int64"),
    ((_vol(1, 1, 4, 4, 4), [2, 2], [0, 0, 0], [1, 1, 1], 0, 1), r"roi_size must have 3 entries \(one per spatial dim of volume\), got 2"),
    ((_vol(1, 1, 4, 4), [0, 2], [0, 0], [1, 1], 0, 1), r"roi_size entries must be >= 1, got \[0, 2\]"),
    ((_vol(1, 1, 4, 4), [2, 2], [0, 0], [2], 0, 1), r"counts must have 2 entries \(one per spatial dim\), got 1"),
    ((_vol(1, 1, 4, 4), [2, 2], [0, 0], [1, 0], 0, 1), r"counts must be >= 1, got \[1, 0\]"),
    ((_vol(1, 1, 4, 4), [2, 2], [0, 0, 2], [2, 2], 0, 1), r"starts must hold sum\(counts\) = 4 entries, got 3"),
    ((_vol(1, 1, 4, 4), [2, 2], [0, 2, 1, 1], [2, 2], 0, 1), r"starts of spatial dim 1 must be strictly increasing, got \[1, 1\]"),
    ((_vol(2, 1, 4, 4), [2, 2], [0, 2, 0, 2], [2, 2], 3, 9), r"windows \[3, 9\) must lie in \[0, B \* prod\(counts\)\] = \[0, 8\]"),
    ((_vol(2, 1, 4, 4), [2, 2], [0, 2, 0, 2], [2, 2], 3, 2), r"windows \[3, 2\) must lie in"),
]


@pytest.mark.parametrize("impl", ["op", "reference"])
@pytest.mark.parametrize(("args", "match"), GATHER_ERRORS)
def test_gather_errors(impl, args, match):
    fn = GATHER if impl == "op" else _reference_gather
    with pytest.raises(RuntimeError, match="sw_gather: " + match):
        fn(*args, 0.0)


def _acc_args(out=None, pred=None, imp=None, weight=None, starts=(0, 2, 0, 2), counts=(2, 2), begin=0):
    out = _vol(1, 2, 4, 4) if out is None else out
    pred = _vol(1, 2, 2, 2) if pred is None else pred
    return out, pred, imp, weight, list(starts), list(counts), begin


ACC_ERRORS = [
    (_acc_args(out=_vol(2, 4)), r"out must be \(B, C, \*spatial\) with 2 or 3 spatial dims, got shape \[2, 4\]"),
    (_acc_args(out=_vol(1, 2, 4, 4, dtype=torch.float16)), r"out must be float32 or float64 \(the accumulator\), got float16"),
    (_acc_args(pred=_vol(1, 2, 2, 2, 2)), r"pred must be \(N, C, \*roi\) with the 2 spatial dims of out, got shape \[1, 2, 2, 2, 2\]"),
    (_acc_args(pred=_vol(1, 3, 2, 2)), r"pred must have the 2 channels of out, got 3"),
    (_acc_args(pred=_vol(1, 2, 2, 2, dtype=torch.int32)), r"pred must be float16, bfloat16, float32 or float64, got int32"),
    (_acc_args(pred=_vol(1, 2, 0, 2)), r"pred's window size must be >= 1, got shape \[1, 2, 0, 2\]"),
    (_acc_args(imp=_vol(2, 3)), r"importance must have the window shape \[2, 2\] or be separable \(1-D, sum\(roi\) \+ 1 = 5 entries\), got \[2, 3\]"),
    (_acc_args(imp=_vol(4)), r"importance must have the window shape \[2, 2\] or be separable .* got \[4\]"),
    (_acc_args(imp=_vol(2, 2, dtype=torch.float64)), r"importance must have the dtype of out \(float32\), got float64"),
    (_acc_args(weight=_vol(4, 5)), r"weight must have the spatial shape of out \[4, 4\], got \[4, 5\]"),
    (_acc_args(weight=_vol(4, 4, dtype=torch.float64)), r"weight must have the dtype of out \(float32\), got float64"),
    (_acc_args(counts=(2, 2, 1)), r"counts must have 2 entries \(one per spatial dim\), got 3"),
    (_acc_args(starts=(2, 0, 0, 2)), r"starts of spatial dim 0 must be strictly increasing, got \[2, 0\]"),
    (_acc_args(pred=_vol(2, 2, 2, 2), begin=3), r"windows \[3, 5\) must lie in \[0, B \* prod\(counts\)\] = \[0, 4\]"),
    (_acc_args(begin=-1), r"windows \[-1, 0\) must lie in"),
]


@pytest.mark.parametrize("impl", ["op", "reference"])
@pytest.mark.parametrize(("args", "match"), ACC_ERRORS)
def test_accumulate_errors(impl, args, match):
    fn = ACCUMULATE if impl == "op" else _reference_accumulate
    with pytest.raises(RuntimeError, match="sw_accumulate_: " + match):
        fn(*args)


@pytest.mark.needs_cuda
def test_errors_device_mismatch():
    out = torch.zeros((1, 2, 4, 4), device="cuda")
    with pytest.raises(RuntimeError, match=r"sw_accumulate_: pred must be on the device of out \(cuda:0\), got cpu"):
        ACCUMULATE(out, torch.zeros((1, 2, 2, 2)), None, None, [0, 2, 0, 2], [2, 2], 0)
    with pytest.raises(RuntimeError, match=r"sw_accumulate_: weight must be on the device of out \(cuda:0\), got cpu"):
        ACCUMULATE(out, torch.zeros((1, 2, 2, 2), device="cuda"), None, torch.ones(4, 4), [0, 2, 0, 2], [2, 2], 0)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("pred_dtype", FLOATS, ids=str)
def test_cuda_matches_cpu(pred_dtype):
    shape, roi = (2, 3, 21, 18, 13), (8, 7, 6)
    starts, counts, per_batch = _grid(shape, roi, 0.5)
    vol = _randn(shape, "cpu", pred_dtype, seed=5)
    n = 2 * per_batch
    win_cpu = GATHER(vol, list(roi), starts, counts, 0, n, 0.25)
    win_gpu = GATHER(vol.cuda(), list(roi), starts, counts, 0, n, 0.25)
    torch.testing.assert_close(win_gpu.cpu(), win_cpu, rtol=0, atol=0)  # copies: exact
    imp = _imp(roi, "cpu", torch.float32)
    w_cpu = _weight(imp, starts, counts, shape[2:], per_batch, ACCUMULATE)
    w_gpu = _weight(imp.cuda(), starts, counts, shape[2:], per_batch, ACCUMULATE)
    # Additions in window order on both devices (the CUDA kernel uses no atomics): exact.
    torch.testing.assert_close(w_gpu.cpu(), w_cpu, rtol=0, atol=0)
    for softmax in (False, True):
        out_cpu, out_gpu = torch.empty(shape), torch.empty(shape, device="cuda")
        ACCUMULATE(out_cpu, win_cpu, imp, w_cpu, starts, counts, 0, softmax)
        ACCUMULATE(out_gpu, win_gpu, imp.cuda(), w_gpu, starts, counts, 0, softmax)
        torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-6, atol=1e-6)


# ---- op contract: wrappers, opcheck, torch.compile -----------------------------------------------


@pytest.mark.parametrize("device", devices())
def test_wrappers_match_ops(device):
    shape, roi = (1, 2, 9, 7), (4, 4)
    starts, counts, n = _grid(shape, roi, 0.5)
    vol = _randn(shape, device, torch.float32)
    win = sw_gather(vol, roi, starts, counts, 0, n)
    torch.testing.assert_close(win, GATHER(vol, list(roi), starts, counts, 0, n, 0.0))
    a, b = torch.empty(shape, device=device), torch.empty(shape, device=device)
    sw_accumulate_(a, win, starts, counts, 0)
    ACCUMULATE(b, win, None, None, starts, counts, 0)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, vol * _weight(torch.ones(roi, device=device), starts, counts, shape[2:], n, ACCUMULATE))


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    shape, roi = (2, 2, 7, 6, 5), (4, 3, 5)
    starts, counts, per_batch = _grid(shape, roi, 0.5)
    vol = _randn(shape, device, torch.float32)
    torch.library.opcheck(GATHER, (vol, list(roi), starts, counts, 1, 5, 0.5))
    pred = _randn((4, 2, *roi), device, torch.float32, seed=2)
    imp = _imp(roi, device, torch.float32)
    weight = _weight(imp, starts, counts, shape[2:], per_batch, ACCUMULATE)
    out = _randn(shape, device, torch.float32, seed=3)
    torch.library.opcheck(ACCUMULATE, (out, pred, imp, weight, starts, counts, 0))
    torch.library.opcheck(ACCUMULATE, (out, pred.to(torch.bfloat16), None, None, starts, counts, 2))
    torch.library.opcheck(ACCUMULATE, (out, pred, imp, weight, starts, counts, 0, True))


@pytest.mark.parametrize("device", devices())
def test_torch_compile_fullgraph_matches_eager(device):
    shape, roi = (1, 2, 9, 8, 6), (5, 4, 4)
    starts, counts, n = _grid(shape, roi, 0.5)
    vol = _randn(shape, device, torch.float32)
    imp = _imp(roi, device, torch.float32)
    weight = _weight(imp, starts, counts, shape[2:], n, ACCUMULATE)

    def blend(v, out):
        win = torch.ops.sslseg.sw_gather(v, list(roi), starts, counts, 0, n, 0.0)
        torch.ops.sslseg.sw_accumulate_(out, win * 2.0, imp, weight, starts, counts, 0)
        return out.sum()

    eager_out, compiled_out = torch.empty(shape, device=device), torch.empty(shape, device=device)
    eager = blend(vol, eager_out)
    compiled = torch.compile(blend, fullgraph=True, dynamic=False)(vol, compiled_out)
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eager_out, 2 * vol, rtol=1e-5, atol=1e-5)  # blending a constant field


def test_registered_with_cpu_kernels():
    import sslseg.ops

    names = sslseg.ops.list_ops()
    assert {"sslseg::sw_gather", "sslseg::sw_accumulate_"} <= set(names)
    missing = sslseg.ops.missing_kernels("CPU")
    assert "sslseg::sw_gather" not in missing and "sslseg::sw_accumulate_" not in missing
    if sslseg.ops.build_info()["cuda"] == "1":
        missing = sslseg.ops.missing_kernels("CUDA")
        assert "sslseg::sw_gather" not in missing and "sslseg::sw_accumulate_" not in missing
