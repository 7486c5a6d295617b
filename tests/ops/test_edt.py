"""sslseg.ops.edt: the kernel against scipy and its reference twin, and the op contract."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

import sslseg.ops
from sslseg.ops import _loader
from sslseg.ops.edt import _reference, _use_float, edt
from tests._numerics import assert_close_ulps
from tests.devices import devices

OP = torch.ops.sslseg.edt.default

INT_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]


def _random_mask(shape, p, seed, dtype=torch.bool):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(shape, generator=g) < p
    if dtype == torch.bool:
        return m
    # Integer masks with values other than 0/1: nonzero is foreground.
    vals = torch.randint(1, 5, shape, generator=g).to(dtype)
    return torch.where(m, vals, torch.zeros((), dtype=dtype))


def _assert_matches_reference(out: torch.Tensor, mask: torch.Tensor, spacing) -> None:
    """The kernel against its twin: bit-equal on the float32 path, within 1 ulp on the float64 path.

    Float32 path: squared distances are integers below 2^24 (exact in any order) and the one sqrt
    (and power-of-two-free scale) is an IEEE correctly rounded operation, so equality holds by
    construction. Float64 path: f + ((y - p) * h)^2 may be contracted into an FMA by the compiler on
    CPUs that have one (FMA is baseline on aarch64, and nvcc contracts by default), which moves
    the double by an ulp and the float32 result by at most one.
    """
    ref = _reference(mask.cpu(), list(spacing))
    if _use_float(mask.shape[mask.dim() - len(spacing):], list(spacing)):
        torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=0)
    else:
        assert_close_ulps(out, ref, ulps=1)


def _scipy(mask: torch.Tensor, spacing) -> np.ndarray:
    """scipy per batch element, rounded to float32; +inf for elements without background.

    At unit spacing scipy's double sqrt of an integer squared distance below 2^24, rounded to
    float32, equals the kernel's float32 sqrt (both IEEE correctly rounded): tests compare those
    bit for bit.
    """
    nsp = len(spacing)
    m = mask.cpu().numpy() != 0
    spatial = m.shape[m.ndim - nsp:]
    flat = m.reshape(-1, *spatial)
    out = np.empty(flat.shape, dtype=np.float32)
    for i, e in enumerate(flat):
        out[i] = np.inf if e.all() else ndimage.distance_transform_edt(e, sampling=spacing).astype(np.float32)
    return out.reshape(m.shape)


# (shape, spacing): 2D and 3D, batch dims, odd sizes, size-1 dims, isotropic (exact float32 path)
# and anisotropic (float64 path).
CASES = [
    ((7, 9), (1.0, 1.0)),
    ((3, 13, 6), (1.0, 1.0)),
    ((2, 2, 5, 8), (0.5, 1.75)),
    ((5, 6, 7), (1.0, 1.0, 1.0)),
    ((2, 9, 4, 11), (2.0, 2.0, 2.0)),
    ((2, 6, 7, 5), (2.5, 0.8, 0.7)),
    ((1, 1, 17), (1.0, 1.0)),
    ((3, 1, 12), (3.0, 0.5, 1.0)),
]


@pytest.mark.parametrize(("shape", "spacing"), CASES, ids=[f"{s}-{sp}" for s, sp in CASES])
@pytest.mark.parametrize("p", [0.1, 0.6, 0.97])
def test_matches_scipy_and_reference(shape, spacing, p):
    mask = _random_mask(shape, p, seed=hash((shape, p)) % 1000)
    out = OP(mask, list(spacing))
    assert out.dtype == torch.float32 and out.shape == mask.shape
    expected = _scipy(mask, spacing)
    if len(set(spacing)) == 1:
        # Isotropic: integer squared distances and one IEEE sqrt on both sides, times a power of two:
        # bit-equal to scipy's rounding by construction.
        np.testing.assert_array_equal(out.numpy(), expected)
    else:  # float64 inside; one float32 ulp for scipy's different summation order
        assert_close_ulps(out, expected, ulps=1)
    _assert_matches_reference(out, mask, spacing)


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
def test_mask_dtypes(dtype):
    mask = _random_mask((2, 6, 9, 7), 0.7, seed=3, dtype=dtype)
    out = edt(mask, (1.0, 1.0, 1.0))
    np.testing.assert_array_equal(out.numpy(), _scipy(mask, (1.0, 1.0, 1.0)))  # unit spacing: exact (see _scipy)


def test_blob_volume_and_ties():
    # Smooth blobs (long runs, many equidistant background voxels) on a larger 3D volume.
    rng = np.random.default_rng(0)
    x = ndimage.gaussian_filter(rng.standard_normal((40, 37, 29)), 2.0)
    mask = torch.from_numpy(x > 0)
    np.testing.assert_array_equal(edt(mask).numpy(), _scipy(mask, (1.0, 1.0, 1.0)))  # unit spacing: exact (see _scipy)
    # Exact ties: the centre of a box is equidistant from both sides of every axis.
    box = torch.zeros(9, 9, 9, dtype=torch.bool)
    box[1:8, 1:8, 1:8] = True
    out = edt(box)
    assert out[4, 4, 4] == 4.0
    np.testing.assert_array_equal(out.numpy(), _scipy(box, (1.0, 1.0, 1.0)))  # unit spacing: exact (see _scipy)


def test_float64_path_for_large_sizes():
    # Sizes > 2048 leave the exact float32 path (squared distances could exceed 2^24).
    mask = torch.ones(2, 2100, dtype=torch.bool)
    mask[0, 0] = False
    mask[1, 1500] = False
    out = edt(mask, spatial_dims=2)
    np.testing.assert_array_equal(out.numpy(), _scipy(mask, (1.0, 1.0)))  # unit spacing: exact (see _scipy)
    assert out[1, -1].item() == 599.0 and out[0, -1].item() == pytest.approx(float(np.hypot(1, 599)), rel=1e-7)


def test_special_masks():
    zeros = torch.zeros(2, 5, 6, dtype=torch.bool)
    assert torch.equal(edt(zeros, spatial_dims=2), torch.zeros(2, 5, 6))
    # An all-foreground element has no background: +inf there, other elements unaffected.
    mixed = torch.ones(2, 5, 6, dtype=torch.bool)
    mixed[1, 2, 3] = False
    out = edt(mixed, (1.0, 2.0))
    assert torch.isinf(out[0]).all() and (out[0] > 0).all()
    # Anisotropic (float64 path): within one float32 ulp of scipy.
    assert_close_ulps(out[1], ndimage.distance_transform_edt(mixed[1].numpy(), sampling=(1, 2)), ulps=1)
    # A single foreground voxel is at distance min(spacing) from the background.
    single = torch.zeros(4, 5, 6, dtype=torch.uint8)
    single[2, 3, 1] = 1
    out = edt(single, (3.0, 0.5, 2.0))
    assert out[2, 3, 1].item() == 0.5 and out.count_nonzero() == 1
    # A single background voxel: distance from it everywhere.
    one_bg = torch.ones(5, 5, 5, dtype=torch.bool)
    one_bg[0, 0, 0] = False
    idx = torch.stack(torch.meshgrid(*[torch.arange(5.0)] * 3, indexing="ij"))
    # The truth in float64, rounded once; torch's own float32 pow/sqrt moves with the CPU's vector
    # path, so the expectation is not computed at the result's precision. 1 ulp allows for it.
    assert_close_ulps(edt(one_bg), idx.double().pow(2).sum(0).sqrt(), ulps=1)


def test_all_one_reference_agrees():
    mask = torch.ones(3, 4, dtype=torch.bool)
    assert torch.isinf(_reference(mask, [1.0, 1.0])).all()
    assert torch.equal(OP(mask, [1.0, 1.0]), _reference(mask, [1.0, 1.0]))  # all +inf: exact


@pytest.mark.parametrize("device", devices())
def test_empty_and_non_contiguous(device):
    for shape in [(0, 4, 5), (2, 0, 5), (3, 4, 0)]:
        out = edt(torch.zeros(shape, dtype=torch.bool, device=device), spatial_dims=2)
        assert out.shape == shape and out.dtype == torch.float32 and out.device.type == device
    base = _random_mask((8, 10, 12), 0.6, seed=5).to(device)
    view = base.transpose(0, 2)[::2]  # non-contiguous, strided
    torch.testing.assert_close(edt(view), edt(view.contiguous()), rtol=0, atol=0)  # same kernel, same values
    # Unit spacing: exact (see _scipy).
    np.testing.assert_array_equal(edt(view).cpu().numpy(), _scipy(view.cpu(), (1.0, 1.0, 1.0)))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.5, 0.75, 0.75)], ids=["iso", "aniso"])
def test_matches_reference(device, spacing):
    mask = _random_mask((2, 7, 10, 9), 0.8, seed=11).to(device)
    out = OP(mask, list(spacing))
    assert out.device == mask.device
    _assert_matches_reference(out, mask, spacing)


def test_batch_elements_are_independent():
    mask = _random_mask((3, 2, 8, 9), 0.85, seed=2)
    out = edt(mask, (1.0, 2.0))
    for i in range(3):
        for j in range(2):
            # Same kernel on the same line data: batching must not change a bit.
            torch.testing.assert_close(out[i, j], edt(mask[i, j], (1.0, 2.0)), rtol=0, atol=0)


def test_not_differentiable():
    out = edt(torch.ones(4, 4, dtype=torch.bool).tril())
    assert not out.requires_grad and out.grad_fn is None


# ---- arguments and errors -----------------------------------------------------------------------


def test_spacing_and_spatial_dims_resolution():
    m3 = _random_mask((4, 5, 6), 0.7, seed=1)
    torch.testing.assert_close(edt(m3), OP(m3, [1.0, 1.0, 1.0]))  # 3D mask: all dims spatial
    torch.testing.assert_close(edt(m3, 2.0), OP(m3, [2.0, 2.0, 2.0]))  # one number for every dim
    torch.testing.assert_close(edt(m3, spatial_dims=2), OP(m3, [1.0, 1.0]))  # a batch of 2D masks
    torch.testing.assert_close(edt(m3, (1.0, 3.0)), OP(m3, [1.0, 3.0]))  # len(spacing) says 2D
    torch.testing.assert_close(edt(m3, torch.tensor([1.0, 2.0, 3.0])), OP(m3, [1.0, 2.0, 3.0]))


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(mask=torch.zeros(2, 3, 4, 5, dtype=torch.bool)), ValueError, r"cannot tell the spatial dims of a mask of shape \(2, 3, 4, 5\)"),
        (dict(mask=torch.zeros(4, 5, dtype=torch.bool), spatial_dims=3), ValueError, r"at least 3 dims .* got shape \(4, 5\)"),
        (dict(mask=torch.zeros(4, 5, dtype=torch.bool), spatial_dims=1), ValueError, r"spatial_dims must be 2 or 3, got 1"),
        (dict(mask=torch.zeros(4, 5, 6, dtype=torch.bool), spacing=(1.0, 2.0), spatial_dims=3), ValueError, r"spatial_dims=3 disagrees with the 2 entries"),
        (dict(mask=torch.zeros(4, 5, dtype=torch.bool), spacing=(1.0,)), ValueError, r"spacing must have 2 or 3 entries .* got 1"),
        (dict(mask=torch.zeros(4, 5, dtype=torch.bool), spacing=(1.0, -2.0)), ValueError, r"spacing\[1\] must be finite and > 0, got -2.0"),
        (dict(mask=torch.zeros(4, 5, dtype=torch.bool), spacing="1"), TypeError, r"spacing must be None, a number or a sequence"),
        (dict(mask=torch.zeros(4, 5)), TypeError, r"mask must be bool or an integer dtype .* got torch.float32; threshold"),
        (dict(mask=np.zeros((4, 5), dtype=bool)), TypeError, r"mask must be a Tensor, got ndarray"),
    ],
)
def test_wrapper_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        edt(**kwargs)


@pytest.mark.parametrize("impl", ["op", "reference"])
@pytest.mark.parametrize(
    ("mask", "spacing", "match"),
    [
        (torch.zeros(4, 5, dtype=torch.bool), [1.0], r"edt: spacing must have 2 or 3 entries \(one per spatial dim\), got 1"),
        (torch.zeros(2, 2, 2, 2, dtype=torch.bool), [1.0, 1.0, 1.0, 1.0], r"spacing must have 2 or 3 entries .* got 4"),
        (torch.zeros(5, dtype=torch.bool), [1.0, 1.0], r"edt: mask must have at least 2 dims \(batch dims, then 2 spatial dims\), got shape \[5\]"),
        (torch.zeros(4, 5), [1.0, 1.0], r"edt: mask must be bool or an integer dtype \(nonzero = foreground\), got (torch.)?float32"),
        (torch.zeros(4, 5, dtype=torch.bool), [1.0, 0.0], r"edt: spacing\[1\] must be finite and > 0, got 0"),
        (torch.zeros(4, 5, dtype=torch.bool), [float("inf"), 1.0], r"edt: spacing\[0\] must be finite and > 0, got inf"),
    ],
)
def test_op_errors_match_reference(impl, mask, spacing, match):
    fn = OP if impl == "op" else _reference
    with pytest.raises(RuntimeError, match=match):
        fn(mask, spacing)


# ---- op contract: opcheck, torch.compile, fallback, CUDA ----------------------------------------


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    torch.library.opcheck(OP, (_random_mask((2, 5, 7), 0.7, seed=0).to(device), [1.0, 2.0]))
    torch.library.opcheck(OP, (_random_mask((3, 4, 6), 0.7, seed=1, dtype=torch.uint8).to(device), [1.0, 1.0, 1.0]))


@pytest.mark.parametrize("device", devices())
def test_torch_compile_fullgraph_matches_eager(device):
    mask = _random_mask((2, 6, 9, 5), 0.7, seed=4).to(device)

    @torch.compile(fullgraph=True, dynamic=False)
    def f(m):
        return sslseg.ops.edt(m, (2.0, 1.0, 0.5))

    # The op is opaque to the compiler: the compiled graph calls the same kernel.
    torch.testing.assert_close(f(mask), edt(mask, (2.0, 1.0, 0.5)), rtol=0, atol=0)


def test_fallback_warns_once_then_uses_reference(monkeypatch):
    monkeypatch.setattr(_loader, "_load", lambda: (False, "ImportError: simulated"))
    monkeypatch.delenv("SSLSEG_OPS", raising=False)  # the automatic rule, not a forced backend
    monkeypatch.setenv("SSLSEG_REQUIRE_OPS", "0")
    _loader._warn_fallback_once.cache_clear()
    mask = _random_mask((5, 6), 0.7, seed=9)
    with pytest.warns(RuntimeWarning, match="compiled operators unavailable"):
        out = edt(mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        edt(mask)
    np.testing.assert_array_equal(out.numpy(), _scipy(mask, (1.0, 1.0)))  # unit spacing: exact (see _scipy)
    _loader._warn_fallback_once.cache_clear()


def test_registered_with_kernels():
    assert "sslseg::edt" in sslseg.ops.list_ops()
    assert "sslseg::edt" not in sslseg.ops.missing_kernels("CPU")
    if sslseg.ops.build_info()["cuda"] == "1":
        assert "sslseg::edt" not in sslseg.ops.missing_kernels("CUDA")


@pytest.mark.needs_cuda
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 0.7, 0.7)], ids=["iso", "aniso"])
def test_cuda_bit_identical_to_cpu_on_a_volume(spacing):
    # Large enough that the Z pass runs in several scratch chunks (lines * (n + 1) > 2^23).
    rng = np.random.default_rng(1)
    x = ndimage.gaussian_filter(rng.standard_normal((2, 96, 300, 310)).astype(np.float32), (0, 3, 3, 3))
    mask = torch.from_numpy(x > 0.05)
    cpu = edt(mask, spacing)
    cuda = edt(mask.cuda(), spacing)
    if len(set(spacing)) == 1:  # float32 path: integer arithmetic and IEEE sqrt on both devices
        torch.testing.assert_close(cuda.cpu(), cpu, rtol=0, atol=0)
    else:  # float64 path: nvcc contracts multiply-adds into FMAs by default
        assert_close_ulps(cuda, cpu, ulps=1)


@pytest.mark.needs_cuda
def test_cuda_special_cases_and_dtypes():
    for dtype in INT_DTYPES:  # unit spacing, float32 path: exact on both devices (integers, IEEE sqrt)
        mask = _random_mask((3, 5, 9, 6), 0.9, seed=7, dtype=dtype)
        torch.testing.assert_close(edt(mask.cuda()).cpu(), edt(mask), rtol=0, atol=0)
    ones = torch.ones(2, 3, 4, dtype=torch.bool, device="cuda")
    assert torch.isinf(edt(ones, spatial_dims=2)).all()
    big = torch.ones(1, 2100, dtype=torch.bool)
    big[0, 7] = False
    # Unit spacing on the float64 path: integer squares, no multiply-add to contract: exact.
    torch.testing.assert_close(edt(big.cuda(), spatial_dims=2).cpu(), edt(big, spatial_dims=2), rtol=0, atol=0)


@pytest.mark.needs_cuda
def test_cuda_uses_current_stream_and_device_guard():
    mask = _random_mask((4, 30, 40), 0.8, seed=8)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = edt(mask.cuda(), spatial_dims=2)
    stream.synchronize()
    torch.testing.assert_close(out.cpu(), edt(mask, spatial_dims=2), rtol=0, atol=0)  # unit spacing: exact
