"""Floating-point comparison in units in the last place (ulps), for results that may move with the CPU.

A kernel's result can change by an ulp with the instruction set (vector width, FMA contraction,
ATen's ``ATEN_CPU_CAPABILITY`` dispatch), so tests compare such results within a stated number of
ulps instead of bit for bit. Exact equality stays where it holds by construction (integer-valued
results, copies, the same kernel run twice); those places say why in a comment.
"""

from __future__ import annotations

import numpy as np
import torch

# The signed integer type of the same width as each floating dtype: its bit pattern, read as an
# integer, orders the finite floats of one sign.
_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
         torch.bfloat16: torch.int16}


def _as_tensor(x: torch.Tensor | np.ndarray | float, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, (np.ndarray, np.generic, float, int)):
        return torch.from_numpy(np.asarray(x))
    raise TypeError(f"assert_close_ulps: {name} must be a tensor, an array or a number, got {type(x).__name__}")


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """Map floats to int64 so that adjacent floats are adjacent integers (and -0.0 == +0.0)."""
    bits = x.contiguous().view(_BITS[x.dtype]).to(torch.int64)
    sign_bit = torch.iinfo(_BITS[x.dtype]).min
    # Negative floats have the sign bit set: their magnitude grows with the integer, so mirror them.
    return torch.where(bits < 0, sign_bit - bits, bits)


def ulp_distance(actual: torch.Tensor | np.ndarray, expected: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Element-wise distance in ulps of ``actual``'s dtype (``expected`` is rounded to it first).

    Returns an int64 tensor; equal non-finite values (same inf, both NaN) are at distance 0 and
    mismatched ones at ``iinfo(int64).max``.
    """
    a, e = _as_tensor(actual, "actual"), _as_tensor(expected, "expected")
    if a.dtype not in _BITS:
        raise TypeError(f"assert_close_ulps: actual must be a floating tensor ({sorted(map(str, _BITS))}), "
                        f"got {a.dtype}")
    if a.shape != e.shape:
        raise AssertionError(f"shape mismatch: actual {tuple(a.shape)}, expected {tuple(e.shape)}")
    e = e.to(a.dtype)  # one correctly rounded conversion: a float64 truth is compared at actual's precision
    oa, oe = _ordered(a), _ordered(e)
    same_sign = (oa >= 0) == (oe >= 0)
    far = torch.iinfo(torch.int64).max
    # Opposite signs: the distance is |oa| + |oe|; cap each term so the sum cannot overflow.
    cap = torch.tensor(far // 2, dtype=torch.int64)
    dist = torch.where(same_sign, (oa - oe).abs(), torch.minimum(oa.abs(), cap) + torch.minimum(oe.abs(), cap))
    finite = torch.isfinite(a) & torch.isfinite(e)
    # Non-finite values must match exactly (the same infinity, or NaN against NaN).
    nonfinite_match = (a == e) | (torch.isnan(a) & torch.isnan(e))
    return torch.where(finite, dist, torch.where(nonfinite_match, torch.zeros_like(dist), torch.full_like(dist, far)))


def assert_close_ulps(actual: torch.Tensor | np.ndarray, expected: torch.Tensor | np.ndarray, ulps: int,
                      msg: str = "", magnitude: torch.Tensor | None = None) -> None:
    """Assert every element of ``actual`` is within ``ulps`` units in the last place of ``expected``.

    Args:
        actual: The result under test (a floating tensor or array); its dtype sets the ulp size.
        expected: The value it should have, of the same shape; a wider dtype is rounded to ``actual``'s.
        ulps: How many ulps apart the two may be (0 means bit-equal up to the sign of zero).
        msg: Prefix of the failure message.
        magnitude: For results of sums whose terms may cancel: the sum of the terms' absolute values
            (broadcastable to ``actual``). The bound is then ``ulps`` ulps of that magnitude,
            ``ulps * eps(dtype) * magnitude``, since a one-ulp change of a term moves the result by
            that much however small the result is.

    Raises:
        AssertionError: Naming how many elements are off, the worst one, its index and both values.
    """
    if not isinstance(ulps, int) or ulps < 0:
        raise ValueError(f"assert_close_ulps: ulps must be a non-negative int, got {ulps!r}")
    if magnitude is not None:
        a = _as_tensor(actual, "actual")
        e = _as_tensor(expected, "expected").to(a.dtype)
        err = (a.double() - e.double()).abs()
        bound = ulps * torch.finfo(a.dtype).eps * _as_tensor(magnitude, "magnitude").double().abs()
        bad = ~((err <= bound) | (a == e) | (torch.isnan(a) & torch.isnan(e)))
        if bool(bad.any()):
            worst = int(torch.where(bad, err - bound, torch.zeros_like(err)).argmax())
            raise AssertionError(
                f"{msg + ': ' if msg else ''}{int(bad.sum())} of {a.numel()} elements differ by more than {ulps} "
                f"ulp(s) of the terms' magnitude; worst at flat index {worst}: actual {a.reshape(-1)[worst].item()!r}, "
                f"expected {e.reshape(-1)[worst].item()!r}, "
                f"allowed {bound.expand_as(err).reshape(-1)[worst].item():.3g}")
        return
    dist = ulp_distance(actual, expected)
    if dist.numel() == 0:
        return
    bad = dist > ulps
    if bool(bad.any()):
        a = _as_tensor(actual, "actual")
        e = _as_tensor(expected, "expected").to(a.dtype)
        worst = int(dist.argmax())
        index = tuple(int(i) for i in np.unravel_index(worst, tuple(dist.shape)))
        raise AssertionError(
            f"{msg + ': ' if msg else ''}{int(bad.sum())} of {dist.numel()} elements are more than {ulps} ulp(s) "
            f"apart; worst at {index}: actual {a.reshape(-1)[worst].item()!r}, expected "
            f"{e.reshape(-1)[worst].item()!r} ({int(dist.reshape(-1)[worst])} ulps, dtype {a.dtype})")
