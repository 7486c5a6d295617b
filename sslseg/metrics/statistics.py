"""Paired comparisons of two methods' scores: matching by key and a paired bootstrap interval.

* :func:`pair_scores`: match two ``{key: score}`` mappings (for instance keyed by
  ``(test case, seed)``) and say which keys either side lacks.
* :func:`paired_bootstrap`: the mean of the paired differences ``b - a`` and its percentile
  bootstrap interval, resampling the pairs (or clusters of pairs) with replacement, seeded; a
  verdict ``"better"`` / ``"worse"`` only when the interval excludes 0, ``"n.s."`` otherwise.

Pure numpy; nothing here reads files or knows about runs.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Pairing", "pair_scores", "paired_bootstrap"]

#: Resampled means are computed in chunks of at most this many drawn indices (bounds the memory).
_CHUNK_ELEMENTS = 2_000_000


@dataclass(frozen=True)
class Pairing:
    """Two score mappings matched by key.

    Attributes:
        keys: The keys both sides have, sorted.
        a: The reference's scores at ``keys``.
        b: The other side's scores at ``keys``.
        only_a: Keys only the reference has (the other side's missing pairs), sorted.
        only_b: Keys only the other side has (the reference's missing pairs), sorted.
    """

    keys: list[Hashable]
    a: list[float]
    b: list[float]
    only_a: list[Hashable] = field(default_factory=list)
    only_b: list[Hashable] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when every key has both scores."""
        return not self.only_a and not self.only_b


def _sort_key(key: Hashable) -> Any:
    # Keys may mix None with numbers or strings (a fold of None); sort on a text form as fallback.
    return repr(key)


def pair_scores(a: Mapping[Hashable, float], b: Mapping[Hashable, float], *, strict: bool = True,
                a_name: str = "a", b_name: str = "b") -> Pairing:
    """Match the scores of two sides by key.

    Args:
        a: Reference scores by key (e.g. ``{(case, seed): dice}``).
        b: The compared side's scores by the same kind of key.
        strict: Raise when a key is on one side only (default); otherwise return the common keys
            and list the others in :attr:`Pairing.only_a` / :attr:`Pairing.only_b`.
        a_name: Name of the reference in error messages (e.g. ``"supervised"``).
        b_name: Name of the compared side in error messages (e.g. ``"mean_teacher"``).

    Raises:
        ValueError: ``strict`` and some keys are unmatched (the message names the side that lacks
            them and the first few keys), or a score is not a finite number.
    """
    for name, scores in ((a_name, a), (b_name, b)):
        bad = [k for k, v in scores.items() if not isinstance(v, (int, float)) or not math.isfinite(v)]
        if bad:
            raise ValueError(f"pair_scores: {name} has non-finite scores at {bad[:5]}"
                             + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    only_a = sorted((k for k in a if k not in b), key=_sort_key)
    only_b = sorted((k for k in b if k not in a), key=_sort_key)
    if strict and (only_a or only_b):
        parts = []
        for lacking, keys in ((b_name, only_a), (a_name, only_b)):
            if keys:
                shown = ", ".join(map(str, keys[:5])) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
                parts.append(f"{lacking} lacks {len(keys)} pair(s): {shown}")
        raise ValueError(f"pair_scores: {b_name} vs {a_name}: unmatched keys; " + "; ".join(parts))
    keys = sorted((k for k in a if k in b), key=_sort_key)
    return Pairing(keys=keys, a=[float(a[k]) for k in keys], b=[float(b[k]) for k in keys],
                   only_a=only_a, only_b=only_b)


def _as_vector(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"paired_bootstrap: {name} must be a sequence of numbers") from exc
    if arr.ndim != 1:
        raise ValueError(f"paired_bootstrap: {name} must be one-dimensional, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"paired_bootstrap: {name} holds {int((~np.isfinite(arr)).sum())} non-finite value(s); "
                         "leave such pairs out before comparing")
    return arr


def paired_bootstrap(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *,
                     n_resamples: int = 10000, confidence: float = 0.95, seed: int = 0,
                     clusters: Sequence[Hashable] | None = None) -> dict[str, Any]:
    """Mean paired difference ``b - a`` with a percentile bootstrap interval.

    ``a[i]`` and ``b[i]`` are one pair (the same test case scored by the reference ``a`` and by the
    compared method ``b``). Each resample draws ``n`` pairs with replacement (or, with
    ``clusters``, draws whole clusters with replacement and keeps all their pairs) and takes the
    mean difference; the interval is the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2``
    quantiles of those means. The same ``seed`` gives the same interval.

    Args:
        a: Reference scores.
        b: Compared scores, same length as ``a``.
        n_resamples: Number of bootstrap resamples (>= 1).
        confidence: Interval coverage, in (0, 1).
        seed: Seed of the resampling.
        clusters: Optional cluster label per pair (e.g. the test case, so that the seeds of one
            case are resampled together); default: every pair on its own.

    Returns:
        ``{"mean_difference", "low", "high", "n_pairs", "n_clusters", "verdict", "n_resamples",
        "confidence", "seed"}``. ``verdict`` is ``"better"`` when ``low > 0``, ``"worse"`` when
        ``high < 0``, else ``"n.s."``. With one pair (or one cluster) there is no interval:
        ``low`` and ``high`` are NaN and the verdict is ``"n.s."``.

    Raises:
        ValueError: ``a`` and ``b`` differ in length, are empty or hold non-finite values;
            ``clusters`` has the wrong length; ``n_resamples`` < 1 or ``confidence`` outside (0, 1).
        TypeError: ``a`` or ``b`` is not numeric, or ``n_resamples`` / ``seed`` is not an integer.
    """
    x, y = _as_vector("a", a), _as_vector("b", b)
    if x.shape != y.shape:
        raise ValueError(f"paired_bootstrap: a and b must be pairs of the same length, got {x.size} and {y.size}")
    if x.size == 0:
        raise ValueError("paired_bootstrap: a and b are empty; there is nothing to compare")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)):
        raise TypeError(f"paired_bootstrap: n_resamples must be an integer, got {n_resamples!r}")
    if n_resamples < 1:
        raise ValueError(f"paired_bootstrap: n_resamples must be >= 1, got {n_resamples}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"paired_bootstrap: seed must be an integer, got {seed!r}")
    if not isinstance(confidence, (int, float)) or not 0.0 < confidence < 1.0:
        raise ValueError(f"paired_bootstrap: confidence must be in (0, 1), got {confidence!r}")
    diff = y - x
    if clusters is None:
        sums, counts = diff, np.ones_like(diff)
    else:
        labels = list(clusters)
        if len(labels) != diff.size:
            raise ValueError(f"paired_bootstrap: clusters must label every pair: {len(labels)} labels "
                             f"for {diff.size} pairs")
        index = {c: i for i, c in enumerate(dict.fromkeys(labels))}
        ids = np.array([index[c] for c in labels])
        sums = np.bincount(ids, weights=diff, minlength=len(index))
        counts = np.bincount(ids, minlength=len(index)).astype(np.float64)
    units = sums.size
    result: dict[str, Any] = {"mean_difference": float(diff.mean()), "low": math.nan, "high": math.nan,
                              "n_pairs": int(diff.size), "n_clusters": int(units), "verdict": "n.s.",
                              "n_resamples": int(n_resamples), "confidence": float(confidence), "seed": int(seed)}
    if units < 2:
        return result
    rng = np.random.default_rng(int(seed))
    means = np.empty(n_resamples, dtype=np.float64)
    step = max(1, _CHUNK_ELEMENTS // units)
    for start in range(0, n_resamples, step):
        stop = min(n_resamples, start + step)
        drawn = rng.integers(0, units, size=(stop - start, units))
        means[start:stop] = sums[drawn].sum(axis=1) / counts[drawn].sum(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    # Round-off in the resampled means must not turn identical scores into a "significant" 1e-17.
    tol = 1e-12 * max(1.0, float(np.abs(diff).max()))
    low, high = float(low), float(high)
    result["low"], result["high"] = low, high
    if low > tol:
        result["verdict"] = "better"
    elif high < -tol:
        result["verdict"] = "worse"
    return result
