"""Tests of ``sslseg.metrics.statistics``: the paired bootstrap on inputs whose answer is known, the
pairing by key, determinism and the errors."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sslseg.metrics.statistics import pair_scores, paired_bootstrap


def _scores(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.4, 0.9, size=n)


def test_identical_scores_give_zero_difference_and_no_verdict():
    a = _scores(30, 0)
    out = paired_bootstrap(a, a.copy())
    assert out["mean_difference"] == 0.0
    assert out["low"] <= 0.0 <= out["high"]
    assert out["verdict"] == "n.s." and out["n_pairs"] == 30 and out["n_resamples"] == 10000


def test_a_shift_of_one_tenth_is_found_and_called_better():
    a = _scores(40, 1)
    b = a + 0.1 + np.random.default_rng(2).normal(0.0, 0.01, size=a.size)
    out = paired_bootstrap(a, b)
    assert out["mean_difference"] == pytest.approx(0.1, abs=0.005)
    assert 0.0 < out["low"] < out["mean_difference"] < out["high"]
    assert out["high"] - out["low"] < 0.02  # noise sd 0.01 over 40 pairs: a narrow interval
    assert out["verdict"] == "better"
    flipped = paired_bootstrap(b, a)
    assert flipped["verdict"] == "worse" and flipped["high"] < 0.0
    assert flipped["mean_difference"] == pytest.approx(-out["mean_difference"])


def test_the_pairing_matters_not_the_marginals():
    # Between-case spread (0.4..0.9) dwarfs the shift; an unpaired comparison could not see it.
    a = _scores(20, 3)
    out = paired_bootstrap(a, a + 0.02)
    assert out["verdict"] == "better" and out["low"] == pytest.approx(0.02)


def test_zero_mean_noise_gives_an_interval_containing_zero():
    a = _scores(50, 4)
    noise = np.random.default_rng(5).normal(0.0, 0.05, size=a.size)
    noise -= noise.mean()  # exactly zero mean difference
    out = paired_bootstrap(a, a + noise)
    assert out["mean_difference"] == pytest.approx(0.0, abs=1e-12)
    assert out["low"] < 0.0 < out["high"] and out["verdict"] == "n.s."


def test_interval_covers_about_95_percent_of_the_bootstrap_means():
    # The percentile interval of a normal sample's mean: about mean +- 1.96 sd / sqrt(n).
    a = np.zeros(400)
    b = np.random.default_rng(6).normal(0.0, 1.0, size=400)
    out = paired_bootstrap(a, b, n_resamples=20000)
    half = 1.96 * b.std() / math.sqrt(b.size)
    assert out["low"] == pytest.approx(b.mean() - half, abs=0.1 * half)
    assert out["high"] == pytest.approx(b.mean() + half, abs=0.1 * half)
    narrow = paired_bootstrap(a, b, n_resamples=20000, confidence=0.5)
    assert out["low"] < narrow["low"] < narrow["high"] < out["high"]


def test_same_seed_same_interval_other_seed_other_interval():
    a = _scores(25, 7)
    b = a + np.random.default_rng(8).normal(0.01, 0.05, size=a.size)
    first, again = paired_bootstrap(a, b, seed=3), paired_bootstrap(list(a), list(b), seed=3)
    assert first == again
    other = paired_bootstrap(a, b, seed=4)
    assert (other["low"], other["high"]) != (first["low"], first["high"])
    assert other["mean_difference"] == first["mean_difference"]


def test_chunked_resampling_gives_the_same_means(monkeypatch):
    import sslseg.metrics.statistics as stats

    a = _scores(30, 9)
    b = a + np.random.default_rng(10).normal(0.0, 0.05, size=a.size)
    whole = paired_bootstrap(a, b, n_resamples=500, seed=1)
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 31)  # one resample per chunk
    assert paired_bootstrap(a, b, n_resamples=500, seed=1) == whole


def test_clusters_resample_whole_cases():
    # Two cases x three seeds: per-case differences +0.2 and -0.1. Resampling cases can only give
    # means of +0.2, +0.05 or -0.1; resampling pairs gives values in between as well.
    a = np.zeros(6)
    b = np.array([0.2, 0.2, 0.2, -0.1, -0.1, -0.1])
    cases = ["p1", "p1", "p1", "p2", "p2", "p2"]
    out = paired_bootstrap(a, b, clusters=cases, n_resamples=2000)
    assert out["n_clusters"] == 2 and out["n_pairs"] == 6
    assert out["low"] == pytest.approx(-0.1) and out["high"] == pytest.approx(0.2)
    assert out["verdict"] == "n.s."
    # One cluster: no interval.
    lone = paired_bootstrap(a[:3], b[:3], clusters=cases[:3])
    assert math.isnan(lone["low"]) and math.isnan(lone["high"]) and lone["verdict"] == "n.s."
    assert lone["mean_difference"] == pytest.approx(0.2)


def test_a_single_pair_has_no_interval():
    out = paired_bootstrap([0.5], [0.9])
    assert out["mean_difference"] == pytest.approx(0.4) and out["n_pairs"] == 1
    assert math.isnan(out["low"]) and out["verdict"] == "n.s."


_pairs = st.integers(2, 25).flatmap(lambda n: st.tuples(
    st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n), st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n)))


@settings(max_examples=40, deadline=None)
@given(pairs=_pairs, shift=st.floats(-0.5, 0.5), seed=st.integers(0, 2**31))
def test_interval_moves_with_a_shift_and_flips_with_the_sides(pairs, shift, seed):
    a, b = pairs
    base = paired_bootstrap(a, b, n_resamples=300, seed=seed)
    moved = paired_bootstrap(a, [v + shift for v in b], n_resamples=300, seed=seed)
    assert moved["mean_difference"] == pytest.approx(base["mean_difference"] + shift, abs=1e-9)
    assert moved["low"] == pytest.approx(base["low"] + shift, abs=1e-9)
    assert moved["high"] == pytest.approx(base["high"] + shift, abs=1e-9)
    swapped = paired_bootstrap(b, a, n_resamples=300, seed=seed)
    assert swapped["low"] == pytest.approx(-base["high"], abs=1e-9)
    assert swapped["high"] == pytest.approx(-base["low"], abs=1e-9)
    assert {base["verdict"], swapped["verdict"]} in ({"n.s."}, {"better", "worse"})
    assert base["low"] <= base["high"]


@pytest.mark.parametrize("kwargs, error, match", [
    ({"a": [0.1, 0.2], "b": [0.1]}, ValueError, "same length, got 2 and 1"),
    ({"a": [], "b": []}, ValueError, "empty"),
    ({"a": [0.1, math.nan], "b": [0.1, 0.2]}, ValueError, "a holds 1 non-finite"),
    ({"a": [[0.1]], "b": [[0.1]]}, ValueError, "a must be one-dimensional"),
    ({"a": ["x"], "b": [0.1]}, TypeError, "a must be a sequence of numbers"),
    ({"a": [0.1, 0.2], "b": [0.1, 0.2], "n_resamples": 0}, ValueError, "n_resamples must be >= 1"),
    ({"a": [0.1, 0.2], "b": [0.1, 0.2], "n_resamples": 10.0}, TypeError, "n_resamples must be an integer"),
    ({"a": [0.1, 0.2], "b": [0.1, 0.2], "confidence": 95}, ValueError, "confidence must be in"),
    ({"a": [0.1, 0.2], "b": [0.1, 0.2], "seed": "0"}, TypeError, "seed must be an integer"),
    ({"a": [0.1, 0.2], "b": [0.1, 0.2], "clusters": ["p1"]}, ValueError, "1 labels for 2 pairs"),
])
def test_bootstrap_errors(kwargs, error, match):
    a, b = kwargs.pop("a"), kwargs.pop("b")
    with pytest.raises(error, match=match):
        paired_bootstrap(a, b, **kwargs)


def test_pairing_by_key_ignores_input_order():
    rng = random.Random(0)
    keys = [(f"patient{c:03d}", s) for c in range(1, 7) for s in (0, 1, 2)]
    ref = {k: 0.5 + 0.01 * i for i, k in enumerate(keys)}
    other = {k: v + (0.05 if k[1] == 0 else 0.01) for k, v in ref.items()}
    shuffled_ref = dict(rng.sample(list(ref.items()), len(ref)))
    shuffled_other = dict(rng.sample(list(other.items()), len(other)))
    p, q = pair_scores(ref, other), pair_scores(shuffled_ref, shuffled_other)
    assert p == q and p.complete and len(p.keys) == 18
    assert all(bv - av == pytest.approx(0.05 if k[1] == 0 else 0.01) for k, av, bv in zip(p.keys, p.a, p.b))
    assert paired_bootstrap(p.a, p.b) == paired_bootstrap(q.a, q.b)
    # Pairing by position after a shuffle keeps the mean difference but loses the pairing: the
    # interval widens and the clear gain (every pair +0.01 or more) is no longer seen.
    right = paired_bootstrap(p.a, p.b)
    misaligned = paired_bootstrap(list(ref.values()), list(shuffled_other.values()))
    assert misaligned["mean_difference"] == pytest.approx(right["mean_difference"])
    assert right["verdict"] == "better" and right["low"] >= 0.01
    assert misaligned["verdict"] == "n.s." and misaligned["low"] < 0.0
    assert misaligned["high"] - misaligned["low"] > 2 * (right["high"] - right["low"])


def test_unmatched_pairs_are_refused_or_listed():
    ref = {("p1", 0): 0.5, ("p2", 0): 0.6, ("p1", 1): 0.55}
    other = {("p1", 0): 0.7, ("p2", 0): 0.65, ("p3", 0): 0.1}
    with pytest.raises(ValueError, match=r"mean_teacher vs supervised: .*mean_teacher lacks 1 pair\(s\): "
                                         r"\('p1', 1\); supervised lacks 1 pair\(s\): \('p3', 0\)"):
        pair_scores(ref, other, a_name="supervised", b_name="mean_teacher")
    loose = pair_scores(ref, other, strict=False)
    assert loose.keys == [("p1", 0), ("p2", 0)] and loose.a == [0.5, 0.6] and loose.b == [0.7, 0.65]
    assert loose.only_a == [("p1", 1)] and loose.only_b == [("p3", 0)] and not loose.complete
    with pytest.raises(ValueError, match="cps has non-finite scores at \\[\\('p1', 0\\)\\]"):
        pair_scores(ref, {("p1", 0): math.nan}, b_name="cps", strict=False)
