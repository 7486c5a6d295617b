"""benches/gpu_check.py: the plan covers every bench, and the script refuses to run without a GPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benches" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_dry_run_lists_every_bench():
    r = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for bench in sorted((ROOT / "benches").glob("bench_*.py")):
        # Every bench is either a step of the plan or named with the reason it is not run.
        assert f"benches/{bench.name}" in r.stdout or f"not run: {bench.name}" in r.stdout, bench.name
    assert "-m needs_cuda" in r.stdout
    assert "bench_train.py --methods mean_teacher,cps --device cuda" in r.stdout
    assert "bench_inference.py" in r.stdout and "gpu-" in r.stdout and ".json and .md" in r.stdout


def test_refuses_without_gpu():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # hides any GPU, so this holds on every machine
    r = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "no CUDA device" in r.stderr and "--dry-run" in r.stderr


def test_step_record_and_markdown(tmp_path):
    gc = _load()
    out = tmp_path / "bench.json"
    code = f"import json; print('hello'); json.dump({{'rows': [1, 2]}}, open({str(out)!r}, 'w'))"
    ok = gc._run(gc.Step("bench_x", [sys.executable, "-c", code], 60, json_out=out), budget_left=60)
    assert ok["rc"] == 0 and not ok["timed_out"] and "hello" in ok["tail"] and ok["figures"] == {"rows": [1, 2]}
    slow = gc._run(gc.Step("slow", [sys.executable, "-c", "import time; time.sleep(30)"], 60), budget_left=1)
    assert slow["timed_out"] and slow["rc"] != 0 and slow["seconds"] < 20
    report = {"date": "2026-01-01", "command": "python benches/gpu_check.py", "environment": {"gpu": "X"},
              "steps": [ok, slow], "not_run": ["bench_data.py: CPU only"], "seconds": 3.0, "passed": 1}
    md = gc._markdown(report)
    assert "| bench_x | 0 |" in md and "| slow | timeout |" in md and "bench_data.py: CPU only" in md
