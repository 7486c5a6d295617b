"""First contact with a GPU: build the CUDA kernels if needed, run the CUDA tests and every bench on the GPU.

One command, about 8 minutes on one GPU, a record of everything:

  1. build   rebuild the extension with ``SSLSEG_CUDA=ON`` when ``sslseg.ops.build_info()['cuda']``
             is not ``'1'`` (``pip install --no-build-isolation -e .``; ``TORCH_CUDA_ARCH_LIST`` is
             set to this GPU's compute capability unless already set)
  2. tests   ``pytest -m needs_cuda`` (every CUDA kernel against the CPU kernel and the twins)
  3. benches each ``benches/bench_*.py --device cuda`` at full size; ``bench_inference.py`` has no
             ``--device`` flag (it adds GPU rows when CUDA is available); ``bench_train.py`` for
             mean_teacher and cps; ``bench_methods.py`` only as ``--smoke`` (its full table is
             hours); ``bench_data.py`` is not run (the data pipeline is CPU-only: no GPU figure)

Each step runs in its own process with its own timeout, inside an overall budget; a failing or
timed-out step is recorded and the next one runs. Results: ``benches/results/gpu-<YYYY-MM-DD>.json``
and ``.md`` (environment: GPU, driver, CUDA, torch; per step: command, exit status, seconds, the
tail of its output, and the figures of the benches' own JSON files, which are written under
``benches/results/gpu-<YYYY-MM-DD>/``).

Usage:
    python benches/gpu_check.py             # needs a CUDA device (exit 2 without one)
    python benches/gpu_check.py --dry-run   # print the plan, run nothing (works without a GPU)

Only the standard library and torch are imported here; sslseg itself is only imported by the child
processes, so a rebuilt extension is the one they load.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benches" / "results"
TAIL_CHARS = 4000


# Benches that measure nothing on a GPU, and why.
NOT_ON_GPU = {
    "data": "no --device flag; the data pipeline (readers, cache, augmentation) runs on the CPU",
    "own_data": "no --device flag; preprocessing and the loader's read path run on the CPU",
    "resume": "a CPU determinism check (killed runs resumed bit-identically), minutes of CPU runs",
}


@dataclass
class Step:
    """One command of the check."""

    name: str
    argv: list[str]
    timeout_s: int
    env: dict[str, str] = field(default_factory=dict)
    json_out: Path | None = None  # the bench's own JSON file, parsed into the record
    note: str = ""


def _bench(name: str, timeout_s: int, out_dir: Path, *extra: str, device_flag: bool = True, note: str = "",
           out_name: str | None = None, out_is_dir: bool = False) -> Step:
    out = out_dir / (out_name or name) if out_is_dir else out_dir / f"{out_name or name}.json"
    argv = [sys.executable, f"benches/bench_{name}.py", *extra]  # the steps run in the repository root
    if device_flag:
        argv += ["--device", "cuda"]
    return Step(f"bench_{out_name or name}", argv + ["--out", str(out.relative_to(ROOT))], timeout_s,
                json_out=None if out_is_dir else out, note=note)


def plan(day: str, needs_build: bool | None, arch: str | None) -> tuple[list[Step], list[str]]:
    """The steps (and the benches left out, with why) of a check dated ``day``.

    Args:
        day: ``YYYY-MM-DD``, names the results.
        needs_build: Whether the extension lacks its CUDA kernels; None when unknown (dry run
            without a GPU): the build step is listed as conditional.
        arch: ``TORCH_CUDA_ARCH_LIST`` for the build (this GPU's capability), or None to leave it.
    """
    out_dir = RESULTS / f"gpu-{day}"
    steps: list[Step] = []
    if needs_build is not False:
        env = {"SSLSEG_CUDA": "ON"}
        if arch and "TORCH_CUDA_ARCH_LIST" not in os.environ:
            env["TORCH_CUDA_ARCH_LIST"] = arch
        build = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
        steps.append(Step("build", build, 360, env,
                          note="only when build_info()['cuda'] != '1'" if needs_build is None else ""))
    steps.append(Step("pytest_needs_cuda", [sys.executable, "-m", "pytest", "-q", "-m", "needs_cuda", "-p",
                                            "no:cacheprovider", "tests"], 240,
                      {"SSLSEG_REQUIRE_OPS": "1"}))
    steps += [
        _bench("edt", 45, out_dir),
        _bench("ema", 45, out_dir),
        _bench("mc_uncertainty", 45, out_dir),
        _bench("sliding_window", 60, out_dir),
        _bench("metrics", 45, out_dir),
        _bench("models", 120, out_dir),
        _bench("inference", 90, out_dir, device_flag=False, note="no --device flag: adds CUDA rows by itself"),
        _bench("train", 90, out_dir, "--methods", "mean_teacher,cps"),
        # bench_methods takes a sweep directory as --out, not a JSON file.
        _bench("methods", 60, out_dir, "--smoke", note="--smoke only: the full table (135 runs) takes hours",
               out_name="methods_smoke", out_is_dir=True),
    ]
    skipped = [f"bench_{name}.py: {why}" for name, why in NOT_ON_GPU.items()]
    # A bench added later is not left out silently: run it on the GPU if it takes --device.
    planned = {Path(s.argv[1]).name for s in steps if s.name.startswith("bench_")} | {
        f"bench_{name}.py" for name in NOT_ON_GPU}
    for path in sorted((ROOT / "benches").glob("bench_*.py")):
        if path.name in planned:
            continue
        if '"--device"' in path.read_text():
            steps.append(_bench(path.stem.removeprefix("bench_"), 60, out_dir, note="not known to gpu_check: defaults"))
        else:
            skipped.append(f"{path.name}: no --device flag (not known to gpu_check)")
    return steps, skipped


def _command(step: Step) -> str:
    return shlex.join([f"{k}={v}" for k, v in step.env.items()] + step.argv)


def _run(step: Step, budget_left: float) -> dict:
    """Run one step in its own process group; a timeout kills that group only."""
    timeout = max(1.0, min(step.timeout_s, budget_left))
    env = {**os.environ, **step.env}
    t0 = time.perf_counter()
    proc = subprocess.Popen(step.argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    timed_out = False
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    seconds = time.perf_counter() - t0
    record = {"step": step.name, "command": _command(step), "rc": proc.returncode, "seconds": round(seconds, 1),
              "timed_out": timed_out,
              "timeout_s": round(timeout), "tail": (output or "")[-TAIL_CHARS:], "note": step.note}
    if step.json_out is not None and step.json_out.is_file():
        try:
            record["figures"] = json.loads(step.json_out.read_text())
            record["json"] = os.path.relpath(step.json_out, ROOT)
        except (OSError, json.JSONDecodeError) as e:
            record["figures_error"] = f"{step.json_out}: {e}"
    if step.name == "pytest_needs_cuda":
        counts = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", output or "")
        record["figures"] = {kind: int(n) for n, kind in counts}
    return record


def _child_build_info() -> dict:
    """``sslseg.ops.build_info()`` read in a child process (this one must not load the extension)."""
    code = "import json, sslseg.ops; print(json.dumps(sslseg.ops.build_info()))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        return {"error": (r.stderr or r.stdout)[-1000:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _environment() -> dict:
    env: dict[str, object] = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
                              "gpu": torch.cuda.get_device_name(0), "gpu_count": torch.cuda.device_count(),
                              "capability": ".".join(map(str, torch.cuda.get_device_capability(0)))}
    smi = shutil.which("nvidia-smi")
    if smi:
        r = subprocess.run([smi, "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        if r.returncode == 0 and r.stdout.strip():
            driver, memory = (x.strip() for x in r.stdout.strip().splitlines()[0].split(",", 1))
            env.update(driver=driver, memory=memory)
    nvcc = shutil.which("nvcc")
    if nvcc:
        r = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30)
        env["nvcc"] = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    env["commit"] = r.stdout.strip()
    return env


def _markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU check {report['date']}", "",
             f"`{report['command']}`: {report['passed']}/{len(report['steps'])} steps exited 0 in "
             f"{report['seconds']:.0f} s.", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in env.items()]
    lines += ["", "| step | rc | seconds | note |", "|---|---|---|---|"]
    for s in report["steps"]:
        rc = "timeout" if s["timed_out"] else s["rc"]
        lines.append(f"| {s['step']} | {rc} | {s['seconds']} | {s.get('note', '')} |")
    lines += ["", "Not run: " + "; ".join(report["not_run"]), ""]
    for s in report["steps"]:
        lines += [f"## {s['step']}", "", f"`{s['command']}`", ""]
        if "json" in s:
            lines += [f"Figures: `{s['json']}`", ""]
        lines += ["```", s["tail"].rstrip()[-2000:], "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="print the plan and run nothing (no GPU needed)")
    p.add_argument("--budget", type=float, default=480.0,
                   help="seconds for all steps together, the build excepted (default 480)")
    args = p.parse_args(argv)
    if args.budget <= 0:
        p.error(f"--budget must be > 0 seconds, got {args.budget}")
    day = _dt.date.today().isoformat()
    has_gpu = torch.cuda.is_available()
    if args.dry_run:
        arch = ".".join(map(str, torch.cuda.get_device_capability(0))) if has_gpu else None
        needs = (_child_build_info().get("cuda") != "1") if has_gpu else None
        steps, skipped = plan(day, needs, arch)
        print(f"gpu_check plan ({'GPU: ' + torch.cuda.get_device_name(0) if has_gpu else 'no CUDA device here'}; "
              f"budget {args.budget:.0f} s for the steps after the build):")
        for i, s in enumerate(steps, 1):
            extra = f"  [{s.note}]" if s.note else ""
            print(f"  {i:2d}. {s.name} (timeout {s.timeout_s} s): {_command(s)}{extra}")
        for s in skipped:
            print(f"  not run: {s}")
        print(f"  writes {RESULTS / f'gpu-{day}.json'} and .md")
        return 0
    if not has_gpu:
        print(f"gpu_check: no CUDA device visible to torch {torch.__version__} (CUDA build: {torch.version.cuda}); "
              "run it on a machine with a GPU, or pass --dry-run to see the plan", file=sys.stderr)
        return 2

    t_start = time.perf_counter()
    info = _child_build_info()
    arch = ".".join(map(str, torch.cuda.get_device_capability(0)))
    steps, skipped = plan(day, info.get("cuda") != "1", arch)
    report: dict = {"date": day, "command": "python benches/gpu_check.py", "environment": _environment(),
                    "build_info_before": info, "steps": [], "not_run": list(skipped)}
    deadline = None
    for step in steps:
        if step.name != "build" and deadline is None:
            deadline = time.perf_counter() + args.budget
        left = float("inf") if deadline is None else deadline - time.perf_counter()
        if left <= 1:
            report["not_run"].append(f"{step.name}: the budget of {args.budget:.0f} s was spent")
            continue
        print(f"[gpu_check] {step.name} ...", flush=True)
        rec = _run(step, left)
        print(f"[gpu_check] {step.name}: rc {rec['rc']}{' (timed out)' if rec['timed_out'] else ''}, "
              f"{rec['seconds']} s", flush=True)
        report["steps"].append(rec)
        if step.name == "build":
            report["build_info_after"] = _child_build_info()
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    report["passed"] = sum(1 for s in report["steps"] if s["rc"] == 0)
    out = RESULTS / f"gpu-{day}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(_markdown(report))
    print(f"[gpu_check] {report['passed']}/{len(report['steps'])} steps exited 0 in {report['seconds']:.0f} s; "
          f"wrote {out} and {out.with_suffix('.md')}")
    return 0 if report["passed"] == len(report["steps"]) and not report["not_run"][len(skipped):] else 1


if __name__ == "__main__":
    sys.exit(main())
