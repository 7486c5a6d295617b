"""Pure functions of benches/bench_calibration.py: the chance level, the table rows and markdown."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benches" / "bench_calibration.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_calibration", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_calibration"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_calibration", None)


def test_chance_dice_known_values(bench):
    label = np.zeros((10, 10), np.uint8)
    label[:5] = 1  # class 1: 50 of 100 pixels -> 2*50/150; class 2 absent -> 0
    assert bench.chance_dice(label, 3) == pytest.approx((100 / 150 + 0.0) / 2)
    assert bench.chance_dice(np.ones((4, 4)), 2) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        bench.chance_dice(label, 1)


def _run(bench, cand, labeled, seed, dice, seconds=60.0):
    return {"candidate": cand.name, "labeled": str(labeled), "seed": seed, "protocol": cand.protocol(),
            "dice": dice, "chance_dice": 0.1, "fit_seconds": seconds, "evaluate_seconds": 0.0}


def test_summarize_pairs_seeds_and_applies_targets(bench):
    a = bench.Candidate("a", "synthetic:acdc?cases=6", 10, {"batch_size": 4, "patch_size": [32, 32]})
    b = bench.Candidate("b", "synthetic:acdc?cases=6", 20, {"batch_size": 4, "patch_size": [32, 32]})
    c = bench.Candidate("c", "synthetic:acdc?cases=6", 30, {})
    runs = [_run(bench, a, 3, 0, 0.50), _run(bench, a, "all", 0, 0.70),
            _run(bench, a, 3, 1, 0.60), _run(bench, a, "all", 1, 0.66),
            _run(bench, a, 3, 2, 0.10),  # seed 2 has no all-labeled run: not paired, left out
            _run(bench, b, 3, 0, 0.20), _run(bench, b, "all", 0, 0.80),  # big gap but near chance (0.1 + 0.15)
            _run(bench, c, 3, 0, 0.5)]  # unpaired: no row
    rows = {r["candidate"]: r for r in bench.summarize(runs, [a, b, c])}
    assert set(rows) == {"a", "b"}
    ra = rows["a"]
    assert ra["seeds"] == [0, 1]
    assert ra["dice_few"] == pytest.approx(0.55) and ra["dice_all"] == pytest.approx(0.68)
    assert ra["gap"] == pytest.approx(0.13)
    assert (ra["gap_min"], ra["gap_max"]) == pytest.approx((0.06, 0.20))
    assert ra["minutes"] == pytest.approx(4.0)
    assert ra["meets"] is True
    assert rows["b"]["gap"] == pytest.approx(0.6) and rows["b"]["meets"] is False  # 0.20 < chance + margin
    assert bench.summarize(runs, [a], target_gap=0.2)[0]["meets"] is False


def test_summarize_ignores_runs_of_another_protocol(bench):
    a = bench.Candidate("a", "synthetic:acdc?cases=6", 10, {})
    stale = bench.Candidate("a", "synthetic:acdc?cases=6", 99, {})
    runs = [_run(bench, stale, 3, 0, 0.5), _run(bench, a, "all", 0, 0.7)]
    assert bench.summarize(runs, [a]) == []


def test_markdown_table(bench):
    a = bench.Candidate("a", "synthetic:acdc?cases=6", 10, {"batch_size": 8, "patch_size": [64, 64]})
    runs = [_run(bench, a, 3, 0, 0.5), _run(bench, a, "all", 0, 0.75)]
    text = bench.markdown(bench.summarize(runs, [a]))
    row = next(line for line in text.splitlines() if line.startswith("| a |"))
    assert "| 10 | 8 / 64x64 | 0 | 0.500 | 0.750 | +0.250 | 0.100 | 2.0 | yes |" in row
    assert text.splitlines()[0].startswith("| setting |")
