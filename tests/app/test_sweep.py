"""Tests of ``sslseg.app.sweep``: the grid, run names, the manifest, skipping and resuming, emitted
command lines, local execution (one real tiny sweep) and every bad input."""

from __future__ import annotations

import json
import os
import shlex
import stat
from pathlib import Path

import pytest

import sslseg
from sslseg.app.cli import main
from sslseg.app.sweep import Cell, data_tag, expand_grid, load_manifest, parse_labeled, sweep

ACDC = "synthetic:acdc?cases=6&slices=2&size=32"
LA = "synthetic:la?cases=4&size=32"
TINY = {"batch_size": 4, "labeled_bs": 2, "val_every": 2, "log_every": 1, "patch_size": [32, 32], "progress": False}


def _plan(tmp_path: Path, **kw):
    """A dry-run sweep (manifest only) over tiny ACDC."""
    args = dict(methods=["supervised", "mean_teacher"], data=ACDC, labeled=[2, "all"], seeds=[0, 1], iterations=2,
                options=TINY, device="cpu", dry_run=True, verbose=False)
    args.update(kw)
    return sweep(tmp_path / "sw", **args)


# ------------------------------------------------------------------------------------------- grid
def test_grid_expands_in_order_and_filters_methods_by_dim():
    cells, skipped = expand_grid(["supervised", "cct", "dtc"], [ACDC, LA], [2, "all"], [0, 1], dims={ACDC: 2, LA: 3})
    assert len(cells) == 2 * 2 * 2 + 2 * 2 * 2  # (supervised, cct) on 2D and (supervised, dtc) on 3D
    assert {(c.method, c.data) for c in cells} == {("supervised", ACDC), ("cct", ACDC), ("supervised", LA), ("dtc", LA)}
    assert cells[0] == Cell("supervised", ACDC, 2, 0, None)
    assert cells[1] == Cell("supervised", ACDC, 2, 1, None)
    assert cells[2] == Cell("supervised", ACDC, None, 0, None)
    assert [(s["method"], s["data"]) for s in skipped] == [("dtc", ACDC), ("cct", LA)]
    assert "3D data only" in skipped[0]["reason"] and "2D data only" in skipped[1]["reason"]


def test_grid_folds_and_dims_from_the_data():
    cells, skipped = expand_grid(["supervised"], [LA], [1], [3], [0, 2])
    assert [(c.seed, c.fold) for c in cells] == [(3, 0), (3, 2)] and not skipped


def test_run_names_are_stable_and_file_system_safe(tmp_path):
    cell = Cell("mean_teacher", "synthetic:acdc?size=32&cases=6", 3, 1, 2)
    assert cell.name == "acdc-cases6-size32/mean_teacher-l3-s1-f2"
    # the order the options are written in does not change the name
    assert Cell("mean_teacher", "synthetic:acdc?cases=6&size=32", 3, 1, 2).name == cell.name
    assert Cell("cps", "synthetic:la", None, 0).name == "la/cps-lall-s0"
    assert Cell("cps", "synthetic:la", 0.25, 0).name == "la/cps-l0.25-s0"
    folder = tmp_path / "my data"
    tag = data_tag(str(folder))
    assert tag.startswith("my_data-") and tag == data_tag(str(folder)) and "/" not in tag
    assert data_tag(str(tmp_path / "other" / "my data")) != tag


def test_parse_labeled():
    assert parse_labeled(3) == 3 and parse_labeled("7") == 7 and parse_labeled(" all ") is None
    assert parse_labeled(None) is None and parse_labeled("0.25") == 0.25 and parse_labeled(0.1) == 0.1
    for bad, match in [(0, ">= 1"), ("-2", ">= 1"), (1.0, "use 'all'"), ("1.5", r"in \(0, 1\)"), ("abc", "counts"),
                       (True, "counts"), ([3], "counts")]:
        with pytest.raises(ValueError, match=match):
            parse_labeled(bad)


# ------------------------------------------------------------------------------------- bad input
def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown method 'mean_techer'. Did you mean 'mean_teacher'"):
        _plan(tmp_path, methods=["mean_techer"])
    with pytest.raises(ValueError, match="grid is empty: no method of \\['cct', 'ctct'\\]"):
        _plan(tmp_path, methods=["cct", "ctct"], data=LA, options={})
    with pytest.raises(ValueError, match="labeled fractions must be in"):
        _plan(tmp_path, labeled=[1.0])
    with pytest.raises(ValueError, match="labeled=40 does not fit data .*between 1 and the number of training cases"):
        _plan(tmp_path, labeled=[40])
    with pytest.raises(ValueError, match="seeds must be non-negative integers"):
        _plan(tmp_path, seeds=[-1])
    with pytest.raises(ValueError, match="labeled must be a non-empty list"):
        _plan(tmp_path, labeled=[])
    with pytest.raises(TypeError, match="unknown option 'bach_size' \\(did you mean 'batch_size'\\?\\)"):
        _plan(tmp_path, options={"bach_size": 4})
    with pytest.raises(ValueError, match="'seed' is set by the sweep itself; use its 'seeds' argument"):
        _plan(tmp_path, options={"seed": 4})
    with pytest.raises(ValueError, match="EngineConfig: batch_size must be None or an int > 0, got -4"):
        _plan(tmp_path, options={"batch_size": -4})
    with pytest.raises(ValueError, match="jobs must be an int >= 1, got 0"):
        _plan(tmp_path, jobs=0)
    with pytest.raises(ValueError, match="unknown emit 'ssh'"):
        _plan(tmp_path, emit="ssh")
    with pytest.raises(ValueError, match=r"folds must be fold indices in \[0, 3\)"):
        _plan(tmp_path, folds=[0, 3], options={**TINY, "folds": 3})
    assert not (tmp_path / "sw").exists()  # nothing was written for a bad sweep
    # the CLI turns these into one line and exit code 2
    assert main(["sweep", "--out", str(tmp_path / "c"), "--methods", "supervised", "--data", ACDC,
                 "--labeled", "2,x", "--dry-run"]) == 2


def test_method_options_go_to_the_methods_that_have_them(tmp_path):
    manifest = _plan(tmp_path, options={**TINY, "ema_decay": 0.9})
    runs = manifest["runs"]
    mt = runs[Cell("mean_teacher", ACDC, 2, 0).name]["options"]["set"]
    sup = runs[Cell("supervised", ACDC, 2, 0).name]["options"]["set"]
    assert "method.ema_decay=0.9" in mt and not any("ema_decay" in s for s in sup)
    assert "patch_size=[32, 32]" in mt and "progress=false" in sup


# ------------------------------------------------------------------------------- manifest + emit
def test_manifest_and_emitted_commands(tmp_path):
    manifest = _plan(tmp_path, emit="torchrun", nproc_per_node=2, dry_run=False)
    assert len(manifest["runs"]) == 8 and len(manifest["commands"]) == 8
    on_disk = load_manifest(tmp_path / "sw")
    assert on_disk["runs"].keys() == manifest["runs"].keys()
    assert all(r["status"] == "pending" for r in on_disk["runs"].values())
    line = manifest["commands"][0]
    fit, evaluate = line.split(" && ")
    argv = shlex.split(fit)
    assert argv[:6] == ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "sslseg"]
    assert argv[6:8] == ["fit", "supervised"] and argv[argv.index("--data") + 1] == ACDC
    assert argv[argv.index("--labeled") + 1] == "2" and argv[argv.index("--out") + 1].endswith("supervised-l2-s0")
    run_dir = argv[argv.index("--out") + 1]
    assert shlex.split(evaluate) == ["python", "-m", "sslseg", "evaluate", run_dir, "--split", "test",
                                     "--empty-policy", "penalty", "--device", "cpu"]
    everything = [ln for ln in manifest["commands"] if "supervised-lall-s0" in ln][0]
    assert "--set labeled=null" in everything and "--labeled" not in everything

    slurm = _plan(tmp_path, emit="slurm", slurm_args="--gres=gpu:1 --time=1:00:00", dry_run=False)["commands"]
    mkdir, submit = slurm[0].split(" && ", 1)
    assert shlex.split(mkdir) == ["mkdir", "-p", run_dir] and Path(run_dir).is_absolute()
    argv = shlex.split(submit)
    assert argv[0] == "sbatch" and "--gres=gpu:1" in argv and "--time=1:00:00" in argv
    assert argv[1].startswith("--job-name=sslseg-acdc-") and argv[2] == f"--output={run_dir}/slurm-%j.out"
    wrapped = argv[argv.index("--wrap") + 1]
    assert wrapped.startswith("python -m sslseg fit supervised ") and " && python -m sslseg evaluate " in wrapped
    assert wrapped.endswith("--device cpu")


def test_emit_skips_finished_and_resumes_killed_runs(tmp_path):
    manifest = _plan(tmp_path, dry_run=True)
    root = tmp_path / "sw"
    dirs = {name: root / entry["dir"] for name, entry in manifest["runs"].items()}
    names = list(dirs)
    finished, killed, trained = names[0], names[1], names[2]
    for name in (finished, killed, trained):
        dirs[name].mkdir(parents=True)
    (dirs[finished] / "evaluation_test.json").write_text("{}")
    (dirs[killed] / "last.pt").write_bytes(b"")
    (dirs[trained] / "metrics.json").write_text("{}")
    lines = _plan(tmp_path, emit="torchrun", dry_run=False)["commands"]
    assert len(lines) == 7 and not any(str(dirs[finished]) + " " in ln for ln in lines)
    resume = [ln for ln in lines if f"--resume {dirs[killed]}" in ln]
    assert len(resume) == 1 and "--data" not in resume[0] and "--iterations 2" in resume[0]
    evaluate_only = [ln for ln in lines if f"evaluate {dirs[trained]} " in ln]
    assert len(evaluate_only) == 1 and " fit " not in evaluate_only[0]
    statuses = load_manifest(root)["runs"]
    assert statuses[finished]["status"] == "finished" and statuses[killed]["status"] == "interrupted"
    assert statuses[trained]["status"] == "to_evaluate"


def test_rerun_with_other_options_is_refused_and_new_cells_merge(tmp_path):
    _plan(tmp_path)
    with pytest.raises(ValueError, match="already exists .* with different options \\['iterations'\\]"):
        _plan(tmp_path, iterations=5)
    manifest = _plan(tmp_path, seeds=[0, 1, 2])  # more seeds: added to the same sweep
    assert len(manifest["runs"]) == 12


# ----------------------------------------------------------------------------------- execution
def _fake_python(tmp_path: Path, body: str) -> str:
    script = tmp_path / "fake_python"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_failed_runs_record_the_error_tail_and_threads(tmp_path):
    python = _fake_python(tmp_path, 'echo "threads=$OMP_NUM_THREADS"; echo "boom: bad things" >&2; exit 3')
    manifest = _plan(tmp_path, methods=["supervised"], labeled=[2], seeds=[0, 1], dry_run=False, jobs=2, threads=None,
                     python=python)
    assert [r["status"] for r in manifest["runs"].values()] == ["failed", "failed"]
    record = json.loads((tmp_path / "sw" / next(iter(manifest["runs"].values()))["dir"] / "sweep_run.json").read_text())
    assert record["status"] == "failed" and "boom: bad things" in record["error_tail"]
    expected = max(1, min(len(os.sched_getaffinity(0)) // 2, int(os.environ.get("OMP_NUM_THREADS", "64"))))
    assert f"threads={expected}" in record["error_tail"]
    assert record["attempts"][0]["step"] == "fit" and record["attempts"][0]["returncode"] == 3
    assert len(record["attempts"]) == 1  # evaluation is not tried after a failed fit
    # steps that exit 0 without writing the evaluation are a failure too, not "finished"
    ok = _fake_python(tmp_path, "exit 0")
    manifest = _plan(tmp_path, methods=["supervised"], labeled=[2], seeds=[0], dry_run=False, python=ok)
    record = json.loads((tmp_path / "sw" / next(iter(manifest["runs"].values()))["dir"] / "sweep_run.json").read_text())
    assert record["status"] == "failed" and "wrote no evaluation_test.json" in record["error_tail"]
    assert len(record["attempts"]) == 3  # the earlier failed fit, then fit + evaluate


def test_real_tiny_sweep_runs_resumes_and_skips(tmp_path):
    root = tmp_path / "sw"
    # A mean_teacher run killed after its step-2 checkpoint: trained for 2 of the sweep's 4 steps.
    killed = root / "runs" / Cell("mean_teacher", ACDC, 2, 0).name
    sslseg.fit("mean_teacher", ACDC, labeled=2, iterations=2, seed=0, out_dir=killed, device="cpu",
               engine_options=TINY)
    (killed / "metrics.json").unlink()
    args = ["sweep", "--out", str(root), "--methods", "supervised,mean_teacher", "--data", ACDC, "--labeled", "2",
            "--seeds", "0", "--iterations", "4", "--device", "cpu", "--jobs", "1", "--prune-checkpoints"]
    args += [a for k, v in TINY.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    assert main(args) == 0
    manifest = load_manifest(root)
    assert {r["status"] for r in manifest["runs"].values()} == {"finished"}
    for name, entry in manifest["runs"].items():
        run_dir = root / entry["dir"]
        record = json.loads((run_dir / "sweep_run.json").read_text())
        assert record["status"] == "finished" and record["fit_seconds"] > 0 and record["evaluate_seconds"] > 0
        evaluation = json.loads((run_dir / "evaluation_test.json").read_text())
        assert evaluation["settings"]["split"] == "test" and evaluation["settings"]["empty_policy"] == "penalty"
        history = [json.loads(x) for x in (run_dir / "history.jsonl").read_text().splitlines()]
        assert history[-1]["step"] == 4
        assert (run_dir / "best_val.pt").is_file() and not (run_dir / "last.pt").exists()  # pruned
        steps = [a["step"] for a in record["attempts"]]
        assert steps == (["resume", "evaluate"] if "mean_teacher" in name else ["fit", "evaluate"])
    # the resumed run kept its first two logged steps
    assert [json.loads(x)["step"] for x in (killed / "history.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    # a second invocation finds everything finished and runs nothing
    before = (killed / "sweep_run.json").read_text()
    assert main(args) == 0
    assert (killed / "sweep_run.json").read_text() == before
