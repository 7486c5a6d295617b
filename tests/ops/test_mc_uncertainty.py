"""sslseg.ops.predictive_entropy and its ops: kernels against reference twins, formula, op contract."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import sslseg.ops
from sslseg.ops import _loader
from sslseg.ops.mc_uncertainty import (
    _reference_accumulate,
    _reference_finalize,
    mc_entropy_finalize_,
    mc_softmax_accumulate_,
    predictive_entropy,
)
from tests.devices import devices

ACC = torch.ops.sslseg.mc_softmax_accumulate_.default
FIN = torch.ops.sslseg.mc_entropy_finalize_.default

# logits dtype -> tolerance against the twin (the kernel's exp/log are ~1 ulp polynomials).
DTYPES = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 2e-6, torch.bfloat16: 2e-6}
# odd sizes, one class, a spatial size that is not a multiple of the CPU chunk (256), 2D and 3D
SHAPES = [(2, 4, 17, 19), (3, 2, 5, 6, 7), (1, 1, 3, 3), (2, 14, 300), (1, 3, 16, 16, 16), (0, 3, 4, 4), (2, 3)]


def _logits(shape, device, dtype, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(device, dtype, shape):
    passes = [_logits(shape, device, dtype, seed=t) for t in range(3)]
    got = torch.empty(shape, dtype=_acc_dtype(dtype), device=device)
    want = torch.empty_like(got)
    for t, x in enumerate(passes):
        ACC(got, x, t == 0)
        _reference_accumulate(want, x, t == 0)
    tol = DTYPES[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for normalize in (False, True):
        if normalize and shape[1] < 2:
            continue
        g, w = got.clone(), want.clone()
        h_got = FIN(g, 3, normalize, 1e-6)
        h_want = _reference_finalize(w, 3, normalize, 1e-6)
        assert h_got.shape == (shape[0], 1, *shape[2:]) and h_got.dtype == got.dtype
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)
        torch.testing.assert_close(h_got, h_want, rtol=4 * tol, atol=4 * tol)


@pytest.mark.parametrize("device", devices())
def test_formula_against_stack_then_reduce_in_float64(device):
    """UA-MT as SSL4MIS writes it: stack T passes, softmax, mean over T, -sum p log(p + 1e-6)."""
    shape, T = (3, 4, 9, 11), 8
    passes = [_logits(shape, device, torch.float64, seed=t) for t in range(T)]
    mean, ent = predictive_entropy(iter(passes))
    p = torch.softmax(torch.stack(passes), dim=2).mean(0)
    h = -torch.sum(p * torch.log(p + 1e-6), dim=1, keepdim=True)
    torch.testing.assert_close(mean, p, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, h, rtol=1e-12, atol=1e-12)
    _, ent_n = predictive_entropy(passes, normalize=True)
    torch.testing.assert_close(ent_n, h / math.log(4), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", devices())
def test_float32_close_to_float64(device):
    shape = (2, 3, 40, 33)
    passes = [_logits(shape, device, torch.float64, seed=t, scale=10.0) for t in range(5)]
    m64, h64 = predictive_entropy(passes, eps=0.0)
    m32, h32 = predictive_entropy([x.float() for x in passes], eps=0.0)
    assert m32.dtype == h32.dtype == torch.float32
    torch.testing.assert_close(m32.double(), m64, rtol=0, atol=2e-7)
    torch.testing.assert_close(h32.double(), h64, rtol=0, atol=2e-6)


@pytest.mark.parametrize("device", devices())
def test_certain_and_uniform_extremes(device):
    # -inf logits give exact zeros: 0 log 0 = 0, also with eps = 0; equal logits give log C.
    x = torch.full((1, 3, 2, 2), -float("inf"), device=device)
    x[:, 1] = 0.0
    mean, ent = predictive_entropy([x, x], eps=0.0)
    # exp(-inf) = 0 and exp(0) = 1 exactly, so the probabilities are exactly 0 and 1: exact by construction.
    assert torch.equal(mean[:, 1], torch.ones_like(mean[:, 1])) and (mean[:, 0] == 0).all()
    assert torch.equal(ent, torch.zeros_like(ent))
    u = torch.zeros((2, 5, 3), device=device)
    _, ent_u = predictive_entropy([u], eps=0.0, normalize=True)
    torch.testing.assert_close(ent_u, torch.ones_like(ent_u), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", devices())
def test_predictive_entropy_inputs(device):
    shape = (2, 3, 6, 5)
    passes = [_logits(shape, device, torch.float32, seed=t) for t in range(4)]
    ref_mean, ref_ent = predictive_entropy(list(passes))
    # a generator, a tuple, a stacked (T, B, C, ...) tensor: same result
    # The same values through the same kernel (only the container differs): bit-equal.
    for src in ((x for x in passes), tuple(passes), torch.stack(passes)):
        mean, ent = predictive_entropy(src)
        torch.testing.assert_close(mean, ref_mean, rtol=0, atol=0)
        torch.testing.assert_close(ent, ref_ent, rtol=0, atol=0)
    # non-contiguous (channels_last) and bf16 passes; inputs requiring grad give grad-free outputs
    cl = [x.to(memory_format=torch.channels_last).requires_grad_() for x in passes]
    mean, ent = predictive_entropy(cl)
    torch.testing.assert_close(mean, ref_mean, rtol=0, atol=0)  # the kernel reads a contiguous copy: same values
    assert not mean.requires_grad and not ent.requires_grad
    mean_bf, _ = predictive_entropy([x.bfloat16() for x in passes])
    assert mean_bf.dtype == torch.float32
    torch.testing.assert_close(mean_bf, ref_mean, rtol=0, atol=2e-2)


def test_predictive_entropy_argument_errors():
    x = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match=r"logits is empty: need at least one pass"):
        predictive_entropy([])
    with pytest.raises(TypeError, match=r"logits\[1\] must be a Tensor, got str"):
        predictive_entropy([x, "no"])
    with pytest.raises(ValueError, match=r"logits\[1\] is \[1, 3, 3\] on cpu but logits\[0\] is \[1, 2, 3\] on cpu"):
        predictive_entropy([x, torch.zeros(1, 3, 3)])
    with pytest.raises(ValueError, match=r"logits\[0\] must be \(B, C, \*spatial\), got shape \[4\]"):
        predictive_entropy([torch.zeros(4)])
    with pytest.raises(ValueError, match=r"a tensor of logits must be \(T, B, C, \*spatial\), got shape \[2, 3\]"):
        predictive_entropy(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"eps must be a float >= 0, got -1"):
        predictive_entropy([x], eps=-1)
    with pytest.raises(RuntimeError, match=r"normalize=True needs at least 2 classes, got 1"):
        predictive_entropy([torch.zeros(1, 1, 3)], normalize=True)


# ---- op errors ------------------------------------------------------------------------------------

ACC_ERRORS = [
    ((torch.zeros(3), torch.zeros(3)), r"acc must be \(B, C, \*spatial\), got shape \[3\]"),
    ((torch.zeros(2, 0, 3), torch.zeros(2, 0, 3)), r"acc must have at least 1 class, got shape \[2, 0, 3\]"),
    ((torch.zeros(2, 3, dtype=torch.float16), torch.zeros(2, 3)), r"acc must be float32 or float64 \(the accumulator\), got float16"),
    ((torch.zeros(3, 2).t(), torch.zeros(2, 3)), r"acc must be contiguous"),
    ((torch.zeros(2, 3), torch.zeros(2, 4)), r"logits must have the shape of acc \[2, 3\], got \[2, 4\]"),
    ((torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int64)), r"logits must be float16, bfloat16, float32 or float64, got int64"),
]


@pytest.mark.parametrize("impl", ["op", "reference"])
@pytest.mark.parametrize(("args", "match"), ACC_ERRORS)
def test_accumulate_errors(impl, args, match):
    fn = ACC if impl == "op" else _reference_accumulate
    with pytest.raises(RuntimeError, match="mc_softmax_accumulate_: " + match):
        fn(*args, False)


FIN_ERRORS = [
    ((torch.zeros(2, 3, 4), 0, False, 1e-6), r"count must be >= 1 \(the number of accumulated passes\), got 0"),
    ((torch.zeros(2, 3, 4), 2, False, -1.0), r"eps must be >= 0, got -1"),
    ((torch.zeros(2, 1, 4), 2, True, 1e-6), r"normalize=True needs at least 2 classes, got 1"),
    ((torch.zeros(2, 3, 4, dtype=torch.bfloat16), 2, False, 1e-6), r"acc must be float32 or float64 \(the accumulator\), got bfloat16"),
]


@pytest.mark.parametrize("impl", ["op", "reference"])
@pytest.mark.parametrize(("args", "match"), FIN_ERRORS)
def test_finalize_errors(impl, args, match):
    fn = FIN if impl == "op" else _reference_finalize
    with pytest.raises(RuntimeError, match="mc_entropy_finalize_: " + match):
        fn(*args)


@pytest.mark.needs_cuda
def test_error_device_mismatch():
    with pytest.raises(RuntimeError, match=r"logits must be on the device of acc \(cuda:0\), got cpu"):
        ACC(torch.zeros(2, 3, device="cuda"), torch.zeros(2, 3), False)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
def test_cuda_matches_cpu(dtype):
    shape = (3, 5, 33, 65)
    passes = [_logits(shape, "cpu", dtype, seed=t) for t in range(3)]
    m_cpu, h_cpu = predictive_entropy(passes, normalize=True)
    m_gpu, h_gpu = predictive_entropy([x.cuda() for x in passes], normalize=True)
    tol = DTYPES[dtype] * 2
    torch.testing.assert_close(m_gpu.cpu(), m_cpu, rtol=tol, atol=tol)
    torch.testing.assert_close(h_gpu.cpu(), h_cpu, rtol=4 * tol, atol=4 * tol)


# ---- op contract ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    x = _logits((2, 3, 5, 7), device, torch.float32)
    acc = torch.rand((2, 3, 5, 7), device=device)
    torch.library.opcheck(ACC, (acc, x, False))
    torch.library.opcheck(ACC, (acc, x.to(torch.float16), True))
    torch.library.opcheck(FIN, (acc.clone(), 3, True, 1e-6))
    torch.library.opcheck(FIN, (acc.double(), 1, False, 0.0))


@pytest.mark.parametrize("device", devices())
def test_torch_compile_fullgraph_matches_eager(device):
    passes = [_logits((2, 4, 8, 8), device, torch.float32, seed=t) for t in range(3)]

    def fn(xs):
        acc = torch.empty_like(xs[0])
        torch.ops.sslseg.mc_softmax_accumulate_(acc, xs[0], True)
        for x in xs[1:]:
            torch.ops.sslseg.mc_softmax_accumulate_(acc, x, False)
        ent = torch.ops.sslseg.mc_entropy_finalize_(acc, len(xs), True, 1e-6)
        return acc, ent

    eager = fn(passes)
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)(passes)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_wrappers_and_fallback(monkeypatch):
    x = _logits((2, 3, 4), "cpu", torch.float32)
    acc = torch.empty(2, 3, 4)
    mc_softmax_accumulate_(acc, x, overwrite=True)
    ent = mc_entropy_finalize_(acc, 1)
    torch.testing.assert_close(acc, torch.softmax(x, 1), rtol=2e-6, atol=2e-6)
    monkeypatch.setattr(_loader, "_load", lambda: (False, "ImportError: simulated"))
    monkeypatch.delenv("SSLSEG_OPS", raising=False)  # the automatic rule, not a forced backend
    monkeypatch.setenv("SSLSEG_REQUIRE_OPS", "0")
    _loader._warn_fallback_once.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mean, ent_ref = predictive_entropy([x])
    torch.testing.assert_close(ent_ref, ent, rtol=1e-5, atol=1e-6)
    _loader._warn_fallback_once.cache_clear()


def test_registered_with_cpu_kernels():
    names = set(sslseg.ops.list_ops())
    assert {"sslseg::mc_softmax_accumulate_", "sslseg::mc_entropy_finalize_"} <= names
    missing = set(sslseg.ops.missing_kernels("CPU"))
    assert not {"sslseg::mc_softmax_accumulate_", "sslseg::mc_entropy_finalize_"} & missing
    if sslseg.ops.build_info()["cuda"] == "1":
        assert not {"sslseg::mc_softmax_accumulate_", "sslseg::mc_entropy_finalize_"} & set(sslseg.ops.missing_kernels("CUDA"))
