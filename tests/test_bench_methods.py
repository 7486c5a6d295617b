"""benches/bench_methods.py: the plan (priority order, the V-Net pair of DTC), the budget, the result
records (atomic, no weights, protocol-checked) and the table built from them with its missing cells.
Fabricated runs only: nothing is trained."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

import sslseg.data
from sslseg.app.evaluate import EvaluationResult
from sslseg.app.report import report

ROOT = Path(__file__).resolve().parents[1]
TINY = "synthetic:acdc?cases=6&slices=2&size=32"
OPTIONS = {"batch_size": 4, "labeled_bs": 2, "patch_size": [32, 32], "val_every": 2, "log_every": 2}
CASES = ("case00", "case01", "case02", "case03")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_methods", ROOT / "benches" / "bench_methods.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_methods"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_methods", None)


@pytest.fixture(scope="module")
def tiny():
    return sslseg.data.load(TINY)


def _grids(bench):
    return [bench.Grid(TINY, [2], ["supervised", "mean_teacher", "fixmatch"], 4, OPTIONS)]


def _fake_run(run_dir: Path, ds, run, per_case: dict[str, float]) -> Path:
    """A finished run directory as ``sslseg sweep`` leaves it: result files plus weights."""
    run_dir.mkdir(parents=True)
    rows = [{"case": c, "volume_id": f"{c}_frame01", "class": k, "class_name": f"c{k}", "dice": v,
             "jaccard": v / (2 - v), "hd95": 2.0, "asd": 1.0, "pred_empty": False, "gt_empty": False}
            for c, v in per_case.items() for k in (1, 2)]
    mean = statistics.fmean(per_case.values())
    overall = {m: {"mean": v, "std": 0.0, "n": len(per_case)}
               for m, v in (("dice", mean), ("jaccard", mean / (2 - mean)), ("hd95", 2.0), ("asd", 1.0))}
    settings = {"split": "test", "empty_policy": "penalty", "units": "mm", "tta": False, "cases": list(per_case),
                "metrics": ["dice", "jaccard", "hd95", "asd"], "volumes": len(per_case)}
    EvaluationResult(rows=rows, summary={"per_class": {}, "overall": overall}, empty={"per_class": {}, "total": {}},
                     settings=settings).save(run_dir)
    ds.split(labeled=run.labeled, seed=run.seed).save(run_dir / "split.json")
    (run_dir / "metrics.json").write_text(json.dumps({"best_val_dice": mean}))
    (run_dir / "config.yaml").write_text(f"method: {run.method}\n")
    (run_dir / "history.jsonl").write_text(json.dumps({"step": 4, "it_per_s": 2.0}) + "\n")
    (run_dir / "sweep_run.json").write_text(json.dumps({"fit_seconds": 30.0, "evaluate_seconds": 5.0}))
    for weights in ("best_val.pt", "last.pt", "last_model.pt"):
        (run_dir / weights).write_bytes(b"\0" * 4096)
    return run_dir


def _record(bench, tmp_path: Path, ds, run, records: Path, shift: float = 0.0) -> Path:
    scores = {c: 0.5 + 0.05 * i + shift for i, c in enumerate(CASES)}
    run_dir = _fake_run(tmp_path / "work" / run.key, ds, run, scores)
    return bench.write_record(run_dir, records, run, {"fit_seconds": 30.0, "evaluate_seconds": 5.0})


def test_full_plan_order_and_the_vnet_pair(bench):
    grids = bench.full_grids()
    runs = bench.plan_runs(grids, bench.SEEDS)
    assert len(runs) == len({r.key for r in runs}) == 138
    # Seed by seed; within seed 0: every supervised reference, then the target methods at ACDC 3.
    assert [r.seed for r in runs] == sorted(r.seed for r in runs)
    first = [r for r in runs if r.seed == 0]
    n_ref = sum(r.method == "supervised" for r in first)
    assert n_ref == 6 and all(r.method == "supervised" for r in first[:n_ref])
    targets = first[n_ref:n_ref + len(bench.TARGET_METHODS)]
    assert [r.method for r in targets] == list(bench.TARGET_METHODS)
    assert {(r.grid.data, r.labeled) for r in targets} == {(bench.ACDC, 3)}
    # DTC is compared with supervised on the same V-Net, same labeled count, steps and ramp.
    dtc = next(r for r in runs if r.method == "dtc")
    partner = [r for r in runs if r.group == dtc.group and r.method == "supervised"]
    assert dtc.grid.variant == "vnet" and dtc.table_data.endswith("[vnet]")
    assert {r.labeled for r in partner} == {8} and len(partner) == 3
    assert partner[0].grid.options["model"] == "vnet" and "model" not in dtc.grid.options
    assert partner[0].grid.iterations == dtc.grid.iterations
    assert not any("consistency_rampup" in g.options for g in grids)
    # The half-width U-Net rows of LA have no dtc, and their supervised rows are not the V-Net's.
    la_unet = [r for r in runs if r.grid.data == bench.LA and not r.grid.variant]
    assert "dtc" not in {r.method for r in la_unet}
    assert all(r.grid.options["model_options"] == {"channels": [8, 16, 32, 64, 128]} for r in la_unet)


def test_records_are_atomic_small_and_without_weights(bench, tmp_path, tiny, monkeypatch):
    run = bench.plan_runs(_grids(bench), (0,))[0]
    records = tmp_path / "records"
    dest = _record(bench, tmp_path, tiny, run, records)
    assert dest == records / "acdc-cases6-size32-slices2-i4" / "supervised-l2-s0"
    files = {p.name for p in dest.iterdir()}
    assert files == {*bench.RECORD_FILES, bench.RECORD_META}
    assert not any(p.suffix == ".pt" for p in dest.rglob("*"))
    meta = bench.read_record(records, run)
    assert meta["protocol"] == run.protocol() and meta["fit_seconds"] == 30.0
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]  # no temporary folder left behind
    with pytest.raises(ValueError, match="already exists"):
        bench.write_record(tmp_path / "work" / run.key, records, run)

    # A failure while copying leaves neither a half record nor a temporary folder.
    second = bench.plan_runs(_grids(bench), (1,))[0]
    run_dir = _fake_run(tmp_path / "work" / second.key, tiny, second, {"case00": 0.5})
    monkeypatch.setattr(bench, "MAX_RECORD_FILE_BYTES", 64)
    (run_dir / "history.jsonl").write_text("x" * 65)
    with pytest.raises(ValueError, match="small result files"):
        bench.write_record(run_dir, records, second)
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]
    monkeypatch.undo()
    (run_dir / "metrics.json").unlink()
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        bench.write_record(run_dir, records, second)


def test_budget_skips_recorded_runs_and_stops_the_queue(bench, tmp_path, tiny):
    runs = bench.plan_runs(_grids(bench), (0, 1))
    records = tmp_path / "records"
    for run in runs[:2]:
        _record(bench, tmp_path, tiny, run, records)
    rest = runs[2:]
    queue = bench.select_runs(runs, records, budget_s=None, jobs=1, estimate=lambda r: 60.0)
    assert queue.recorded == runs[:2] and queue.todo == rest and queue.later == []
    # 60 s each within 130 s: two rounds of two runs on 2 workers; on 1 worker the third would end at 180 s.
    queue = bench.select_runs(runs, records, budget_s=130.0, jobs=2, estimate=lambda r: 60.0)
    assert queue.todo == rest and queue.later == []
    queue = bench.select_runs(runs, records, budget_s=130.0, jobs=1, estimate=lambda r: 60.0)
    assert queue.todo == rest[:2] and queue.later == rest[2:] and queue.recorded == runs[:2]
    # The first run that does not fit stops the queue, even if a cheaper one behind it would fit.
    costs = {rest[0].key: 100.0, rest[1].key: 500.0}
    queue = bench.select_runs(runs, records, budget_s=300.0, jobs=1, estimate=lambda r: costs.get(r.key, 10.0))
    assert queue.todo == rest[:1] and queue.later == rest[1:]
    with pytest.raises(ValueError, match="budget"):
        bench.select_runs(runs, records, budget_s=0.0, jobs=1, estimate=lambda r: 1.0)
    with pytest.raises(ValueError, match="jobs"):
        bench.select_runs(runs, records, budget_s=None, jobs=0, estimate=lambda r: 1.0)


def test_a_record_of_another_protocol_is_refused_and_left_out(bench, tmp_path, tiny):
    runs = bench.plan_runs(_grids(bench), (0,))
    records = tmp_path / "records"
    _record(bench, tmp_path, tiny, runs[0], records)
    changed = [bench.Grid(TINY, [2], ["supervised", "mean_teacher", "fixmatch"], 4, {**OPTIONS, "batch_size": 8})]
    other = bench.plan_runs(changed, (0,))
    assert other[0].key == runs[0].key
    with pytest.raises(ValueError, match=r"another protocol .*options"):
        bench.select_runs(other, records, budget_s=None, jobs=1, estimate=lambda r: 1.0)
    manifest, notes = bench.table_manifest(other, records, records / "table")
    assert manifest["runs"][other[0].key]["status"] == "pending" and other[0].key in notes[0]


def test_estimates_from_the_table_then_from_measured_records(bench, tmp_path, tiny):
    acdc = [r for r in bench.plan_runs(bench.full_grids(), (0,)) if r.method == "ctct" and r.labeled == 3][0]
    # The table's minutes were measured at DEFAULT_STEPS; the protocol's steps and per-step cost scale them.
    full = 60 * bench.FIT_MINUTES["acdc"]["ctct"] * bench.COST_FACTOR["acdc"] * bench.ACDC_STEPS / bench.DEFAULT_STEPS["acdc"]
    assert bench.estimate_seconds(acdc, {}) == pytest.approx(bench.RUN_OVERHEAD_S + full)
    half = bench.plan_runs(bench.full_grids(0.5), (0,))
    acdc_half = [r for r in half if r.method == "ctct" and r.labeled == 3][0]
    assert bench.estimate_seconds(acdc_half, {}) == pytest.approx(bench.RUN_OVERHEAD_S + full / 2)
    runs = bench.plan_runs(_grids(bench), (0, 1))
    records = tmp_path / "records"
    _record(bench, tmp_path, tiny, runs[0], records)  # 30 s of fit for 4 steps, 5 s of evaluation
    measured = bench.measured_seconds(records, runs)
    same = next(r for r in runs if r.method == runs[0].method and r.seed != runs[0].seed)
    assert bench.estimate_seconds(same, measured) == pytest.approx(30.0 + 5.0)


def test_table_from_records_marks_missing_cells(bench, tmp_path, tiny, capsys):
    runs = bench.plan_runs(_grids(bench), (0, 1))
    records = tmp_path / "records"
    by_key = {r.key: r for r in runs}
    done = ["supervised-l2-s0", "supervised-l2-s1", "mean_teacher-l2-s0"]
    for name in done:
        run = by_key[f"acdc-cases6-size32-slices2-i4/{name}"]
        _record(bench, tmp_path, tiny, run, records, shift=0.1 if run.method == "mean_teacher" else 0.0)
    table = records / "table"
    manifest, notes = bench.table_manifest(runs, records, table)
    assert notes == []
    recorded = {k for k, e in manifest["runs"].items() if e["status"] == "finished"}
    assert len(recorded) == 3
    table.mkdir(parents=True)
    (table / "sweep.json").write_text(json.dumps(manifest))
    # The records read as runs: no weights needed (overlays are skipped with a note).
    result = report(table, device="cpu")
    assert "overlays skipped for 3 run(s) without weights" in capsys.readouterr().out
    rows = {r["method"]: r for r in result.rows}
    assert set(rows) == {"supervised", "mean_teacher"}
    assert rows["mean_teacher"]["n"] == 1 and rows["mean_teacher"]["runs_missing"] == 1
    assert rows["mean_teacher"]["delta_dice_vs_supervised"] == pytest.approx(0.1)
    assert "| 2 | mean_teacher | 0.675 ± 0.000 |" in result.markdown and "1 (1 missing)" in result.markdown
    missing = [r for r in runs if r.key not in recorded]
    command, minutes = bench.fill_command(missing, smoke=False, scale=1.0, jobs=2, estimate=lambda r: 60.0)
    assert minutes == pytest.approx(3 * 60 / 60 / 2)
    assert command == "python benches/bench_methods.py --jobs 2 --budget-min 2"
    text = "\n".join(bench.missing_markdown(runs, recorded, command, minutes))
    assert f"| {TINY} | 2 | fixmatch | — | 2 of 2 (seeds 0, 1) |" in text
    assert f"| {TINY} | 2 | mean_teacher | partial | 1 of 2 (seed 1) |" in text
    assert "supervised | " not in text.split("|---|---|---|---|---|")[1]
    assert f"`{command}`" in text and "3 of 6 planned runs have no record yet" in text


def test_report_only_without_records_trains_nothing(bench, tmp_path, capsys):
    work = tmp_path / "work"
    assert bench.main(["--smoke", "--report-only", "--out", str(work)]) == 0
    out = capsys.readouterr().out
    assert "No run has a record" in out and "--budget-min" in out
    assert not work.exists() and (tmp_path / "methods_smoke.md").is_file()
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--budget-min", "0", "--out", str(work)])
    assert "--budget-min must be > 0" in capsys.readouterr().err


def test_only_trains_the_matching_runs_in_priority_order(bench, tmp_path, capsys):
    runs = bench.plan_runs(bench.full_grids(), bench.SEEDS)
    chosen = bench.only_runs(runs, ["acdc-*/*-l3-*"])
    assert chosen and all("-l3-" in r.key and r.key.startswith("acdc-") for r in chosen)
    assert chosen == [r for r in runs if r in chosen]  # priority order kept: seed 0 first, supervised first
    assert chosen[0].method == "supervised" and chosen[0].seed == 0
    assert {r.seed for r in chosen} == set(bench.SEEDS)
    assert len(chosen) == len(bench.list_methods(2)) * len(bench.SEEDS)
    two = bench.only_runs(runs, ["*/cps-l3-s1", "*/supervised-l3-s1"])
    assert [r.key.split("/")[1] for r in two] == ["supervised-l3-s1", "cps-l3-s1"]
    assert bench.only_runs(runs, []) == runs
    with pytest.raises(ValueError, match=r"--only 'acdc-\*/nope-\*' matches no planned run; keys look like"):
        bench.only_runs(runs, ["acdc-*/nope-*"])
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--only", "nothing-*", "--out", str(tmp_path / "work")])
    assert "matches no planned run" in capsys.readouterr().err


def test_only_is_reported_with_the_counts(bench, tmp_path, capsys):
    work = tmp_path / "work"
    bench.main(["--smoke", "--only", "*/supervised-*", "--budget-min", "0.001", "--out", str(work)])
    out = capsys.readouterr().out
    assert "runs planned (2 chosen by --only): 0 recorded in" in out and "to run now" in out
