"""Property tests: every op against its pure-PyTorch twin on shapes, strides, dtypes and geometries
drawn by hypothesis.

The profiles live in tests/conftest.py: ``default`` (CI) draws a fixed set of a few dozen examples
per op in a few seconds; ``--hypothesis-profile=long`` draws thousands. The tensors' values come
from a seeded generator (hypothesis draws the seed), so a failing example replays exactly.

Tolerances against the twin, per result dtype:
- ``edt``: bit-equal on the float32 path (isotropic spacing: integer squared distances and one
  IEEE sqrt), 1 float32 ulp on the float64 path (a compiler may contract ``f + (d * h)^2``).
- ``sw_gather``: bit-equal (a copy).
- ``sw_accumulate_``: 1e-6 (float32) / 1e-12 (float64) absolute and relative, as in
  test_sliding_window: the blend sums products of both signs, so a ulp count is not meaningful.
- ``ema_update_``: 2 ulps (of the teacher's dtype) of the magnitude ``|t| decay + |s| (1 - decay)``:
  the two terms may cancel, and the kernel and the twin may associate them differently.
- ``mc_softmax_accumulate_`` / ``mc_entropy_finalize_`` / ``predictive_entropy``: 2e-6 (float32
  accumulator) / 1e-12 (float64) on the mean, 4x that on the entropy, as in
  test_mc_uncertainty: the kernel's exp/log are polynomials within about an ulp of libm's.
"""

from __future__ import annotations

import math

import hypothesis.strategies as st
import torch
from hypothesis import given

import sslseg.ops
from sslseg.ops.edt import _reference as edt_reference
from sslseg.ops.edt import _use_float
from sslseg.ops.ema import _reference as ema_reference
from sslseg.ops.mc_uncertainty import _reference_accumulate as mc_reference_accumulate
from sslseg.ops.mc_uncertainty import _reference_finalize as mc_reference_finalize
from sslseg.ops.sliding_window import _reference_accumulate as sw_reference_accumulate
from sslseg.ops.sliding_window import _reference_gather as sw_reference_gather
from sslseg.ops.sliding_window import separable_importance
from tests._numerics import assert_close_ulps

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
MASK_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]
LAYOUTS = ["contiguous", "strided", "transposed"]
SEEDS = st.integers(0, 2**31 - 1)


def _values(shape, dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of ``t`` in a tensor with other strides: every other element of a wider buffer, or
    the transpose of a contiguous buffer (the last two dims swapped in memory)."""
    if layout == "strided" and t.dim() >= 1:
        wide = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t


# ---- edt ---------------------------------------------------------------------------------------


@st.composite
def _edt_case(draw):
    nsp = draw(st.sampled_from([2, 3]))
    batch = draw(st.lists(st.integers(0, 3), max_size=2))
    spatial = draw(st.lists(st.integers(0, 9), min_size=nsp, max_size=nsp))
    if draw(st.booleans()):  # isotropic, including non-unit spacings (the float32 path)
        spacing = [draw(st.sampled_from([1.0, 0.5, 2.0, 1.3]))] * nsp
    else:
        spacing = draw(st.lists(st.floats(0.2, 5.0, allow_nan=False), min_size=nsp, max_size=nsp))
    return (tuple(batch) + tuple(spatial), spacing, draw(st.sampled_from(MASK_DTYPES)), draw(st.floats(0.0, 1.0)),
            draw(st.sampled_from(LAYOUTS)), draw(SEEDS))


@given(_edt_case())
def test_edt_matches_reference(case):
    shape, spacing, dtype, p, layout, seed = case
    g = torch.Generator().manual_seed(seed)
    fg = torch.rand(shape, generator=g) < p
    # Integer masks hold values other than 0/1 too: any nonzero is foreground.
    mask = fg if dtype == torch.bool else torch.where(fg, torch.randint(1, 5, shape, generator=g), 0).to(dtype)
    mask = _laid_out(mask, layout)
    out = sslseg.ops.edt(mask, spacing)
    ref = edt_reference(mask, spacing)
    assert out.shape == mask.shape and out.dtype == torch.float32
    exact = _use_float(shape[len(shape) - len(spacing):], spacing)
    assert_close_ulps(out, ref, ulps=0 if exact else 1)


# ---- sliding window ------------------------------------------------------------------------------


@st.composite
def _grid(draw, spatial, roi):
    """Per-dim strictly increasing window starts, from before the volume to past its end."""
    counts, starts = [], []
    for n, r in zip(spatial, roi):
        s = sorted(draw(st.sets(st.integers(-r + 1, max(n - 1, 0)), min_size=1, max_size=3)))
        counts.append(len(s))
        starts += s
    return starts, counts


@st.composite
def _volume_case(draw):
    nd = draw(st.sampled_from([2, 3]))
    b, c = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    spatial = draw(st.lists(st.integers(1, 9), min_size=nd, max_size=nd))
    roi = draw(st.lists(st.integers(1, 6), min_size=nd, max_size=nd))
    starts, counts = draw(_grid(spatial, roi))
    return b, c, spatial, roi, starts, counts


@given(_volume_case(), st.sampled_from(FLOATS), st.sampled_from(LAYOUTS), st.floats(-3.0, 3.0), st.data())
def test_sw_gather_matches_reference(geometry, dtype, layout, pad_value, data):
    b, c, spatial, roi, starts, counts = geometry
    total = b * math.prod(counts)
    begin = data.draw(st.integers(0, total), label="window_begin")
    end = data.draw(st.integers(begin, total), label="window_end")  # begin == end: no window
    volume = _laid_out(_values((b, c, *spatial), dtype, data.draw(SEEDS, label="seed")), layout)
    got = sslseg.ops.sw_gather(volume, roi, starts, counts, begin, end, pad_value)
    want = sw_reference_gather(volume, roi, starts, counts, begin, end, pad_value)
    assert got.shape == want.shape and got.dtype == dtype and got.is_contiguous()
    assert_close_ulps(got, want, ulps=0)  # a copy: exact


@given(_volume_case(), st.sampled_from([torch.float32, torch.float64]), st.sampled_from(FLOATS),
       st.sampled_from(["none", "dense", "separable"]), st.booleans(), st.booleans(), st.sampled_from(LAYOUTS),
       st.data())
def test_sw_accumulate_matches_reference(geometry, out_dtype, pred_dtype, importance_kind, with_weight, softmax,
                                         layout, data):
    b, c, spatial, roi, starts, counts = geometry
    total = b * math.prod(counts)
    begin = data.draw(st.integers(0, total - 1), label="window_begin")
    n = data.draw(st.integers(1, total - begin), label="windows")
    seed = data.draw(SEEDS, label="seed")
    g = torch.Generator().manual_seed(seed)
    pred = _laid_out(_values((n, c, *roi), pred_dtype, seed, scale=2.0), layout)
    if importance_kind == "dense":
        importance = (torch.rand(roi, generator=g, dtype=torch.float64) + 0.1).to(out_dtype)
    elif importance_kind == "separable":
        factors = [(torch.rand(r, generator=g, dtype=torch.float64) + 0.05).to(out_dtype) for r in roi]
        importance = separable_importance(factors, 0.1)
    else:
        importance = None
    weight = (torch.rand(spatial, generator=g, dtype=torch.float64) + 0.5).to(out_dtype) if with_weight else None
    # Voxels whose first window lies before `begin` are read: start from the same finite values.
    start = _laid_out(_values((b, c, *spatial), out_dtype, seed + 1), layout)
    got, want = start.clone(), start.clone()
    sslseg.ops.sw_accumulate_(got, pred, starts, counts, begin, importance=importance, weight=weight,
                              softmax=softmax)
    sw_reference_accumulate(want, pred, importance, weight, starts, counts, begin, softmax)
    tol = 1e-6 if out_dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


# ---- ema -----------------------------------------------------------------------------------------

# (teacher, student) dtypes the op accepts: equal dtypes, and a float32 teacher for a low-precision
# student (mixed precision training), or the other way round.
EMA_DTYPES = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.float16, torch.float16),
              (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
              (torch.float16, torch.float32)]
_EMA_SHAPE = st.lists(st.integers(0, 7), max_size=3).map(tuple)  # () is a scalar, a 0 makes it empty


@given(st.lists(st.tuples(_EMA_SHAPE, st.sampled_from(EMA_DTYPES), st.sampled_from(LAYOUTS)), max_size=4),
       st.one_of(st.sampled_from([0.0, 1.0, 0.99]), st.floats(0.0, 1.0)), SEEDS)
def test_ema_update_matches_reference(tensors, decay, seed):
    got, want, students, before = [], [], [], []
    for i, (shape, (t_dtype, s_dtype), layout) in enumerate(tensors):
        teacher = _values(shape, t_dtype, seed + 2 * i)
        got.append(_laid_out(teacher, layout))  # the op updates non-contiguous teachers in place
        want.append(teacher.clone())
        before.append(teacher.double())
        students.append(_values(shape, s_dtype, seed + 2 * i + 1))
    sslseg.ops.ema_update_(got, students, decay)
    ema_reference(want, students, decay)
    for i, (a, e) in enumerate(zip(got, want)):
        # t * decay + s * (1 - decay) cancels when t and s have opposite signs: the bound is in ulps
        # of the terms' magnitude (the kernel and the twin may associate the terms differently).
        magnitude = before[i].abs() * decay + students[i].double().abs() * (1 - decay)
        assert_close_ulps(a, e, ulps=2, magnitude=magnitude,
                          msg=f"tensor {i} ({a.dtype} teacher, {students[i].dtype} student)")


# ---- MC-dropout uncertainty ----------------------------------------------------------------------

MC_TOL = {torch.float32: 2e-6, torch.float64: 1e-12}


@st.composite
def _mc_case(draw):
    b, c = draw(st.integers(0, 2)), draw(st.integers(1, 5))
    spatial = draw(st.lists(st.integers(0, 6), max_size=3))  # (B, C) alone is a valid shape too
    return ((b, c, *spatial), draw(st.sampled_from([torch.float32, torch.float64])), draw(st.sampled_from(FLOATS)),
            draw(st.integers(1, 4)), draw(st.floats(0.1, 20.0)), draw(st.sampled_from(LAYOUTS)), draw(SEEDS))


@given(_mc_case(), st.booleans(), st.sampled_from([0.0, 1e-6, 0.1]))
def test_mc_accumulate_and_finalize_match_reference(case, normalize, eps):
    shape, acc_dtype, logit_dtype, passes, scale, layout, seed = case
    normalize = normalize and shape[1] >= 2  # normalising divides by log(C)
    logits = [_laid_out(_values(shape, logit_dtype, seed + t, scale), layout) for t in range(passes)]
    got, want = torch.empty(shape, dtype=acc_dtype), torch.empty(shape, dtype=acc_dtype)
    for t, x in enumerate(logits):
        sslseg.ops.mc_softmax_accumulate_(got, x, overwrite=t == 0)
        mc_reference_accumulate(want, x, t == 0)
    tol = MC_TOL[acc_dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * passes)
    h_got = sslseg.ops.mc_entropy_finalize_(got, passes, normalize=normalize, eps=eps)
    h_want = mc_reference_finalize(want, passes, normalize, eps)
    assert h_got.shape == (shape[0], 1, *shape[2:]) and h_got.dtype == acc_dtype
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(h_got, h_want, rtol=4 * tol, atol=4 * tol)


@given(_mc_case())
def test_predictive_entropy_matches_reference(case):
    shape, _, logit_dtype, passes, scale, layout, seed = case
    logits = [_laid_out(_values(shape, logit_dtype, seed + t, scale), layout) for t in range(passes)]
    mean, entropy = sslseg.ops.predictive_entropy(iter(logits))
    acc = torch.empty(shape, dtype=torch.float64 if logit_dtype == torch.float64 else torch.float32)
    for t, x in enumerate(logits):
        mc_reference_accumulate(acc, x, t == 0)
    ref_entropy = mc_reference_finalize(acc, passes, False, 1e-6)
    tol = MC_TOL[acc.dtype]
    torch.testing.assert_close(mean, acc, rtol=tol, atol=tol)
    torch.testing.assert_close(entropy, ref_entropy, rtol=4 * tol, atol=4 * tol)
