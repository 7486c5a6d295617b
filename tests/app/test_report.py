"""Tests of ``sslseg.app.report``: aggregation against hand-computed means and stds on fabricated run
directories, the markdown and CSV content, the plots, and the errors."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import statistics
from pathlib import Path

import pytest

import sslseg
import sslseg.app.report as report_module
from sslseg.app.cli import main
from sslseg.app.evaluate import EvaluationResult
from sslseg.app.report import report
from sslseg.app.sweep import sweep

ACDC = "synthetic:acdc?cases=6&slices=2&size=32"
TINY = {"batch_size": 4, "labeled_bs": 2, "val_every": 2, "log_every": 1, "patch_size": [32, 32], "progress": False}
# Overall test (Dice, HD95, ASD) of each fabricated run, by (method, labeled, seed).
SCORES = {
    ("supervised", "2", 0): (0.50, 8.0, 2.0), ("supervised", "2", 1): (0.60, 6.0, 1.0),
    ("supervised", "2", 2): (0.40, 10.0, 3.0),
    ("mean_teacher", "2", 0): (0.70, 4.0, 1.5), ("mean_teacher", "2", 1): (0.80, 3.0, 0.5),
    ("mean_teacher", "2", 2): (0.75, 5.0, 1.0),
    ("supervised", "all", 0): (0.90, 2.0, 0.4), ("supervised", "all", 1): (0.92, 1.0, 0.2),
    ("supervised", "all", 2): (0.94, 3.0, 0.3),
    ("mean_teacher", "all", 0): (0.91, 2.5, 0.4),  # seeds 1 and 2 "not finished"
}
FIT_SECONDS = 90.0


def _evaluation(dice: float, hd95: float, asd: float, **settings) -> EvaluationResult:
    summary = {"per_class": {}, "overall": {"dice": {"mean": dice, "std": 0.0, "n": 2},
                                            "jaccard": {"mean": dice / (2 - dice), "std": 0.0, "n": 2},
                                            "hd95": {"mean": hd95, "std": 0.0, "n": 2},
                                            "asd": {"mean": asd, "std": 0.0, "n": 2}}}
    rows = [{"case": "patient001", "volume_id": "patient001_frame01", "class": 1, "class_name": "RV", "dice": dice,
             "jaccard": 0.5, "hd95": hd95, "asd": asd, "pred_empty": False, "gt_empty": False}]
    base = {"split": "test", "empty_policy": "penalty", "units": "mm", "tta": False, "cases": ["patient001"],
            "metrics": ["dice", "jaccard", "hd95", "asd"], "volumes": 2}
    base.update(settings)
    return EvaluationResult(rows=rows, summary=summary, empty={"per_class": {}, "total": {}}, settings=base)


def _fabricate(tmp_path: Path, model_file: Path | None = None, **settings) -> Path:
    """A sweep directory whose runs hold evaluation files with the SCORES above (no training)."""
    root = tmp_path / "sw"
    manifest = sweep(root, methods=["supervised", "mean_teacher"], data=ACDC, labeled=[2, "all"], seeds=[0, 1, 2],
                     iterations=2, options=TINY, device="cpu", dry_run=True, verbose=False)
    ds = sslseg.data.load(ACDC)
    for entry in manifest["runs"].values():
        labeled = "all" if entry["labeled"] is None else f"{entry['labeled']:g}"
        key = (entry["method"], labeled, entry["seed"])
        run_dir = root / entry["dir"]
        run_dir.mkdir(parents=True, exist_ok=True)
        ds.split(labeled=entry["labeled"], seed=entry["seed"]).save(run_dir / "split.json")
        if key not in SCORES:
            continue
        _evaluation(*SCORES[key], **settings).save(run_dir)
        (run_dir / "sweep_run.json").write_text(json.dumps({"fit_seconds": FIT_SECONDS + 6 * entry["seed"]}))
        if model_file is not None:
            shutil.copy(model_file, run_dir / "best_val.pt")
    return root


def _row(result, method: str, labeled: str) -> dict:
    return next(r for r in result.rows if r["method"] == method and r["labeled"] == labeled)


def test_aggregation_matches_hand_computed_means_and_stds(tmp_path):
    root = _fabricate(tmp_path)
    result = report(root, plots=False, verbose=False)
    assert [(r["labeled"], r["method"]) for r in result.rows] == [
        ("2", "supervised"), ("2", "mean_teacher"), ("all", "supervised"), ("all", "mean_teacher")]
    sup, mt = _row(result, "supervised", "2"), _row(result, "mean_teacher", "2")
    assert sup["dice_mean"] == pytest.approx(0.5) and sup["dice_std"] == pytest.approx(0.1)  # sample std of .5 .6 .4
    assert sup["hd95_mean"] == pytest.approx(8.0) and sup["hd95_std"] == pytest.approx(2.0)
    assert sup["asd_mean"] == pytest.approx(2.0) and sup["asd_std"] == pytest.approx(1.0)
    assert mt["dice_mean"] == pytest.approx(0.75) and mt["dice_std"] == pytest.approx(0.05)
    assert mt["hd95_mean"] == pytest.approx(4.0) and mt["hd95_std"] == pytest.approx(1.0)
    assert mt["delta_dice_vs_supervised"] == pytest.approx(0.25)
    assert math.isnan(sup["delta_dice_vs_supervised"])
    assert sup["role"] == "lower bound" and mt["role"] == ""
    assert sup["train_min_mean"] == pytest.approx((90 + 96 + 102) / 3 / 60)
    assert sup["train_min_std"] == pytest.approx(statistics.stdev([1.5, 1.6, 1.7]))
    assert sup["labeled_cases"] == 2 and sup["n"] == 3
    full = _row(result, "supervised", "all")
    assert full["role"] == "upper bound" and full["dice_mean"] == pytest.approx(0.92)
    assert full["labeled_cases"] == len(sslseg.data.load(ACDC).split().train_cases)
    lone = _row(result, "mean_teacher", "all")
    assert lone["n"] == 1 and lone["dice_std"] == 0.0 and lone["runs_missing"] == 2
    assert lone["delta_dice_vs_supervised"] == pytest.approx(0.91 - 0.92)
    assert len(result.missing) == 2 and all("mean_teacher-lall" in m for m in result.missing)


def test_markdown_and_csv_content(tmp_path):
    root = _fabricate(tmp_path)
    out = tmp_path / "out"
    result = report(root, out, plots=False, verbose=False)
    assert {p.name for p in result.files} == {"report.md", "report.csv"}
    md = (out / "report.md").read_text()
    assert md == result.markdown
    assert "| 2 | supervised (lower bound) | 0.500 ± 0.100 | 8.00 ± 2.00 | 2.00 ± 1.00 |  | 1.6 ± 0.1 | 3 |" in md
    assert "| 2 | mean_teacher | 0.750 ± 0.050 | 4.00 ± 1.00 | 1.00 ± 0.50 | +0.250 |" in md
    assert "| all (4 cases) | supervised (upper bound) | 0.920 ± 0.020 |" in md
    assert "| 1 (2 missing) |" in md
    assert "empty-mask policy `penalty`" in md and "distances in mm" in md and "`test` split" in md
    assert "iterations=2, batch_size=4" in md
    assert "2 run(s) without an evaluation" in md
    rows = list(csv.DictReader(io.StringIO((out / "report.csv").read_text())))
    assert len(rows) == 4 and rows[1]["method"] == "mean_teacher"
    assert float(rows[1]["dice_mean"]) == pytest.approx(0.75)
    assert float(rows[1]["delta_dice_vs_supervised"]) == pytest.approx(0.25)
    assert rows[0]["role"] == "lower bound" and rows[0]["runs"].count("supervised-l2-s") == 3
    assert rows[0]["delta_dice_vs_supervised"] == "nan"


def test_plots_are_written_and_skipped_without_matplotlib(tmp_path, monkeypatch, capsys):
    # A real (2-step) model, so that the overlays predict with it.
    model_run = sslseg.fit("supervised", ACDC, labeled=2, iterations=2, seed=0, out_dir=tmp_path / "model",
                           device="cpu", engine_options=TINY)
    root = _fabricate(tmp_path, model_file=model_run.dir / "best_val.pt")
    result = report(root, verbose=False)
    names = {p.name for p in result.files}
    assert {"dice_vs_labeled.png", "overlays_acdc-cases6-size32-slices2.png"} <= names
    for name in ("dice_vs_labeled.png", "overlays_acdc-cases6-size32-slices2.png"):
        assert (root / name).read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setattr(report_module, "_pyplot", lambda: None)
    result = report(root, tmp_path / "noplot", verbose=True)
    assert {p.name for p in result.files} == {"report.md", "report.csv"}
    assert "matplotlib is not installed: plots skipped" in capsys.readouterr().out


def test_errors_and_cli(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="is not a sweep directory"):
        report(tmp_path, plots=False)
    empty = tmp_path / "empty"
    sweep(empty, methods=["supervised"], data=ACDC, labeled=[2], iterations=2, options=TINY, dry_run=True,
          verbose=False)
    with pytest.raises(ValueError, match="no run of .* has an evaluation file yet"):
        report(empty, plots=False)
    mixed = _fabricate(tmp_path)
    run = next(p for p in (mixed / "runs").rglob("evaluation_test.json"))
    _evaluation(0.5, 1.0, 1.0, empty_policy="nan").save(run.parent)
    with pytest.raises(ValueError, match="evaluated with different settings .*empty_policy"):
        report(mixed, plots=False)
    assert main(["report", str(empty), "--no-plots"]) == 2
    assert "has an evaluation file yet" in capsys.readouterr().err
