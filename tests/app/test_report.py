"""Tests of ``sslseg.app.report``: aggregation against hand-computed means and stds on fabricated run
directories, the markdown and CSV content, the plots, and the errors."""

from __future__ import annotations

import csv
import io
import json
import math
import random
import shutil
import struct
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


def _case_evaluation(per_case: dict[str, float], order_seed: int | None = None) -> EvaluationResult:
    """An evaluation whose case ``c`` scores ``per_case[c]``: two volumes per case, two classes per
    volume scored ``v - 0.04`` and ``v + 0.04`` (volume 1) and ``v - 0.02`` / ``v + 0.02`` (volume
    2). ``order_seed`` shuffles the rows."""
    rows = []
    for case, v in per_case.items():
        for frame, spread in ((1, 0.04), (2, 0.02)):
            for cls, dice in ((1, v - spread), (2, v + spread)):
                rows.append({"case": case, "volume_id": f"{case}_frame0{frame}", "class": cls, "class_name": f"c{cls}",
                             "dice": dice, "jaccard": dice / (2 - dice), "hd95": 1.0, "asd": 0.5,
                             "pred_empty": False, "gt_empty": False})
    if order_seed is not None:
        random.Random(order_seed).shuffle(rows)
    mean = statistics.fmean(per_case.values())
    overall = {m: {"mean": v, "std": 0.0, "n": 2 * len(per_case)}
               for m, v in (("dice", mean), ("jaccard", mean / (2 - mean)), ("hd95", 1.0), ("asd", 0.5))}
    settings = {"split": "test", "empty_policy": "penalty", "units": "mm", "tta": False, "cases": list(per_case),
                "metrics": ["dice", "jaccard", "hd95", "asd"], "volumes": 2 * len(per_case)}
    return EvaluationResult(rows=rows, summary={"per_class": {}, "overall": overall},
                            empty={"per_class": {}, "total": {}}, settings=settings)


def _fabricate_cases(tmp_path: Path, scores, *, methods=("supervised", "fixmatch", "cps"),
                     labeled=(2, "all"), seeds=(0, 1, 2), shuffle_rows: bool = False) -> Path:
    """A sweep directory whose run (method, labeled tag, seed) scores ``scores(method, tag, seed)``
    per case (a dict; None: the run is not finished). No training."""
    root = tmp_path / "cases"
    manifest = sweep(root, methods=list(methods), data=ACDC, labeled=list(labeled), seeds=list(seeds),
                     iterations=2, options=TINY, device="cpu", dry_run=True, verbose=False)
    ds = sslseg.data.load(ACDC)
    for i, entry in enumerate(manifest["runs"].values()):
        tag = "all" if entry["labeled"] is None else f"{entry['labeled']:g}"
        run_dir = root / entry["dir"]
        run_dir.mkdir(parents=True, exist_ok=True)
        ds.split(labeled=entry["labeled"], seed=entry["seed"]).save(run_dir / "split.json")
        per_case = scores(entry["method"], tag, entry["seed"])
        if per_case is not None:
            _case_evaluation(per_case, order_seed=i if shuffle_rows else None).save(run_dir)
            (run_dir / "sweep_run.json").write_text(json.dumps({"fit_seconds": FIT_SECONDS}))
    return root


CASES = [f"case{c:02d}" for c in range(8)]


def _known_scores(method: str, tag: str, seed: int) -> dict[str, float] | None:
    """``supervised`` varies widely between cases; ``fixmatch`` adds exactly 0.1 to every one of its
    (case, seed) scores; ``cps`` adds Gaussian noise centred per seed (it sums to 0 over the 24 pairs)."""
    rng = random.Random(f"{tag}-{seed}")
    base = {c: rng.uniform(0.3, 0.8) for c in CASES}
    if tag == "all":
        return {c: v + 0.2 for c, v in base.items()} if method == "supervised" else None
    if method == "supervised":
        return base
    if method == "fixmatch":
        return {c: v + 0.1 for c, v in base.items()}
    noise = [rng.gauss(0.0, 0.05) for _ in CASES]
    centre = statistics.fmean(noise)
    return {c: v + e - centre for (c, v), e in zip(base.items(), noise)}


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


def _check_png(path: Path, min_bytes: int = 5000) -> tuple[int, int]:
    """A decodable PNG of non-trivial size; returns (width, height)."""
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    assert len(data) > min_bytes, f"{path.name}: only {len(data)} bytes"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 300 and height > 100
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width) and pixels[..., :3].std() > 0.05  # not a blank canvas
    return width, height


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
    forests = ["forest_acdc-cases6-size32-slices2_2.png", "forest_acdc-cases6-size32-slices2_all.png"]
    assert {*forests, "overlays_acdc-cases6-size32-slices2.png"} <= names
    # One labeled count (plus "all"): no Dice-vs-labeled plot, the forest plots show the group.
    assert "dice_vs_labeled.png" not in names and not (root / "dice_vs_labeled.png").exists()
    for name in (*forests, "overlays_acdc-cases6-size32-slices2.png"):
        _check_png(root / name)
    assert not list(root.glob(".*.tmp*"))  # atomic writes leave no temporary files
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


def test_paired_statistics_on_fabricated_runs(tmp_path):
    # One test case per run: the pairs are the seeds. mean_teacher - supervised at 2 labeled:
    # 0.2, 0.2, 0.35 (seeds 0, 1, 2); at "all" only seed 0 finished: one pair, 0.91 - 0.90 = +0.01
    # (the unpaired difference of the means, 0.91 - 0.92, has the other sign), no interval.
    root = _fabricate(tmp_path)
    result = report(root, plots=False, verbose=False)
    (at2,) = [p for p in result.paired if p["labeled"] == "2"]
    assert at2["method"] == "mean_teacher" and at2["reference"] == "supervised" and at2["n_pairs"] == 3
    assert at2["mean_difference"] == pytest.approx(0.25)
    # Resampling 3 pairs: all three equal to 0.2 has chance 8/27, all equal to 0.35 1/27, both > 2.5%.
    assert at2["low"] == pytest.approx(0.2) and at2["high"] == pytest.approx(0.35)
    assert at2["verdict"] == "better" and at2["unmatched"] == 0
    assert at2["gap"] == pytest.approx(0.92 - 0.50)
    (full,) = [p for p in result.paired if p["labeled"] == "all"]
    assert full["n_pairs"] == 1 and full["mean_difference"] == pytest.approx(0.01)
    assert math.isnan(full["low"]) and full["verdict"] == "n.s." and full["unmatched"] == 2
    assert "seed 1: 1 case (patient001); seed 2: 1 case (patient001)" == full["missing_in_method"]
    md = result.markdown
    assert "Paired Δ Dice vs `supervised`" in md and "10000 resamples" in md
    assert "| 2 | mean_teacher | +0.250 | [+0.200, +0.350] | 3 | better | 60% |" in md
    assert "| all | mean_teacher | +0.010 | n/a | 1 (2 unmatched) | n.s. |  |" in md
    assert "All-labeled gap of `supervised`: at 2: +0.420." in md
    assert ("- mean_teacher at all lacks pairs that `supervised` has: seed 1: 1 case (patient001); "
            "seed 2: 1 case (patient001)") in md
    rows = list(csv.DictReader(io.StringIO(result.to_csv())))
    assert rows[1]["method"] == "mean_teacher" and rows[1]["paired_vs"] == "supervised"
    assert float(rows[1]["paired_delta"]) == pytest.approx(0.25) and rows[1]["paired_verdict"] == "better"
    assert float(rows[1]["paired_low"]) == pytest.approx(0.2) and rows[1]["paired_n"] == "3"
    assert rows[0]["paired_verdict"] == ""  # the reference itself is not compared


def test_case_scores_average_classes_then_volumes():
    run = {"seed": 2, "fold": None, "rows": _case_evaluation({"p1": 0.6, "p2": 0.3}).rows}
    run["rows"].append({"case": "p3", "volume_id": "p3_frame01", "class": 1, "dice": math.nan})
    run["rows"].append({"case": "p2", "volume_id": "p2_frame03", "class": 1, "dice": 0.9})
    run["rows"].append({"case": "p2", "volume_id": "p2_frame03", "class": 2, "dice": math.nan})
    scores = report_module.case_scores(run)
    # p2: volumes 0.3, 0.3 and 0.9 (its NaN class left out); p3 has no scored class: no score.
    assert scores == {("p1", 2, None): pytest.approx(0.6), ("p2", 2, None): pytest.approx(0.5)}


def test_paired_verdicts_on_known_differences_and_row_order(tmp_path):
    root = _fabricate_cases(tmp_path / "a", _known_scores)
    result = report(root, plots=False, verbose=False)
    by_method = {p["method"]: p for p in result.paired if p["labeled"] == "2"}
    better, noise = by_method["fixmatch"], by_method["cps"]
    assert better["n_pairs"] == noise["n_pairs"] == 24 and better["unmatched"] == 0  # 8 cases x 3 seeds
    assert better["mean_difference"] == pytest.approx(0.1)
    assert better["low"] == pytest.approx(0.1) and better["high"] == pytest.approx(0.1)
    assert better["verdict"] == "better"
    assert noise["mean_difference"] == pytest.approx(0.0, abs=1e-12)
    assert noise["low"] < 0.0 < noise["high"] and noise["verdict"] == "n.s."
    assert better["gap"] == pytest.approx(_row(result, "supervised", "all")["dice_mean"]
                                          - _row(result, "supervised", "2")["dice_mean"])
    # fixmatch (the larger difference) is listed first (sorted by difference).
    md = result.markdown
    assert md.index("| 2 | fixmatch | +0.100 | [+0.100, +0.100] | 24 | better |") < md.index("| 2 | cps | +0.000 |")
    # The same scores with every evaluation's rows shuffled: pairing by (case, seed) gives the same answer.
    shuffled = report(_fabricate_cases(tmp_path / "b", _known_scores, shuffle_rows=True), plots=False,
                      verbose=False)
    assert [{k: v for k, v in p.items()} for p in shuffled.paired] == result.paired
    # Resampling whole cases (all seeds of a case together): the same mean, a verdict still for `better`.
    by_case = report(root, plots=False, verbose=False, bootstrap_by="case")
    (b,) = [p for p in by_case.paired if p["method"] == "fixmatch" and p["labeled"] == "2"]
    assert b["n_clusters"] == 8 and b["verdict"] == "better" and b["bootstrap_by"] == "case"
    assert "each test case (all its seeds together) drawn with replacement" in by_case.markdown


def test_paired_statistics_deterministic_and_seeded(tmp_path):
    root = _fabricate_cases(tmp_path, _known_scores)
    first = report(root, plots=False, verbose=False)
    again = report(root, plots=False, verbose=False)
    assert first.paired == again.paired and first.markdown == again.markdown
    other = report(root, plots=False, verbose=False, bootstrap_seed=5)
    noise = [(p["low"], p["high"]) for r in (first, other) for p in r.paired if p["method"] == "cps"]
    assert noise[0] != noise[1]


def test_unmatched_pairs_are_listed_with_method_and_cases(tmp_path):
    def scores(method, tag, seed):
        base = _known_scores(method, tag, seed)
        if method == "fixmatch" and tag == "2" and base is not None:
            base = {c: v for c, v in base.items() if c not in ("case03", "case05")}  # two cases not scored
        if method == "cps" and tag == "2" and seed == 1:
            return None  # a run that has not finished
        return base

    root = _fabricate_cases(tmp_path, scores)
    result = report(root, plots=False, verbose=False)
    by_method = {p["method"]: p for p in result.paired if p["labeled"] == "2"}
    assert by_method["fixmatch"]["n_pairs"] == 18 and by_method["fixmatch"]["unmatched"] == 6
    assert by_method["cps"]["n_pairs"] == 16 and by_method["cps"]["unmatched"] == 8
    md = result.markdown
    assert "| 2 | fixmatch | +0.100 | [+0.100, +0.100] | 18 (6 unmatched) | better |" in md
    assert ("- fixmatch at 2 lacks pairs that `supervised` has: seed 0: 2 cases (case03, case05); "
            "seed 1: 2 cases (case03, case05); seed 2: 2 cases (case03, case05)") in md
    assert "- cps at 2 lacks pairs that `supervised` has: seed 1: 8 cases (case00, case01, case02, ...)" in md


def test_paired_vs_options_and_cli(tmp_path, capsys):
    root = _fabricate(tmp_path)
    assert main(["report", str(root), "--no-plots", "--paired-vs", "mean_teacher", "--bootstrap-resamples", "500"]) == 0
    out = capsys.readouterr().out
    assert "Paired Δ Dice vs `mean_teacher`" in out and "500 resamples" in out
    assert "| 2 | supervised | -0.250 | [-0.350, -0.200] | 3 | worse |" in out
    assert main(["report", str(root), "--no-plots", "--paired-vs", "none"]) == 0
    assert "Paired" not in capsys.readouterr().out
    assert main(["report", str(root), "--no-plots", "--paired-vs", "cps"]) == 0
    assert "No paired statistics: `cps` is not a method of this sweep (methods: mean_teacher, supervised)" in (
        capsys.readouterr().out)
    with pytest.raises(SystemExit):
        main(["report", str(root), "--no-plots", "--bootstrap-by", "volume"])
    assert "invalid choice: 'volume'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="bootstrap_by must be one of"):
        report(root, plots=False, bootstrap_by="volume")
    with pytest.raises(ValueError, match="n_resamples must be a positive integer, got 0"):
        report(root, plots=False, n_resamples=0)
    result = report(root, plots=False, verbose=False, paired_vs=None)
    assert result.paired == [] and "paired_delta" not in result.rows[1]


def test_forest_plots_and_dice_vs_labeled_with_several_counts(tmp_path):
    root = _fabricate_cases(tmp_path, _known_scores, labeled=(1, 2, "all"))
    result = report(root, overlays=False, verbose=False)
    names = {p.name for p in result.files}
    tag = "acdc-cases6-size32-slices2"
    assert {f"forest_{tag}_1.png", f"forest_{tag}_2.png", "dice_vs_labeled.png"} <= names
    assert f"forest_{tag}_all.png" not in names  # only supervised at "all": nothing to compare
    for name in (f"forest_{tag}_1.png", f"forest_{tag}_2.png", "dice_vs_labeled.png"):
        _check_png(root / name)
    # Two rows (fixmatch, cps) fit a short figure; the forest plot grows with the number of methods.
    assert _check_png(root / f"forest_{tag}_2.png")[1] < 400
    assert not list(root.glob(".*.tmp*"))
