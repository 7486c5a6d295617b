"""Bench: training runs killed with SIGKILL at random moments resume bit-identically.

For each trial (seeded), one method of a fixed set is trained with ``python -m sslseg fit`` in
deterministic mode on a tiny synthetic dataset (one intra-op thread, a checkpoint after every step),
killed with SIGKILL at a random moment, resumed with ``python -m sslseg fit METHOD --resume DIR``,
and its end state compared with an uninterrupted run of the same configuration:

  - ``last.pt``: every tensor (networks, optimizer and scaler state, method state such as EMA
    teachers, every RNG state) with ``torch.equal`` (same dtype and shape), the split, the history
    and validation records;
  - ``best_val.pt`` and ``last_model.pt``: every weight, the model record, the metrics;
  - ``history.jsonl`` and ``metrics.json``.

Wall-clock fields (``it_per_s``, anything named ``*seconds*`` or ``*time*``) are the only values
left out of the comparison.

Three kinds of kill moments, in turn (``KINDS``): inside a drawn training step (once that many steps
are logged, a drawn fraction of the reference's time per step later); during a checkpoint write: the
bench polls the run directory and kills as soon as a temporary checkpoint file
(``.<name>.pt.tmp<pid>``, sslseg/engine/checkpoint.py) appears after a drawn step; and a drawn time
from the process start to the reference's end (it may land in start-up, before any checkpoint:
then there is nothing to resume and the run starts again from scratch, as a user would; or in the
final writes). Whether a temporary file was left behind (the kill landed inside the write) is
counted and printed.

Usage:
    python benches/bench_resume.py            # 10 kills over 5 configurations (a few minutes)
    python benches/bench_resume.py --smoke    # 2 kills, 2D supervised and mean_teacher (CI)
    python benches/bench_resume.py --kills 30 --seed 1 --out benches/results/resume.json

Prints ``N/N identical`` and exits 1 when a resumed run differs (the first difference is named).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import metadata, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent

# Tiny networks on tiny synthetic data: the point is the state machinery, not the learning.
ENGINE_2D = {"batch_size": 4, "labeled_bs": 2, "val_every": 1, "log_every": 1, "patch_size": [32, 32],
             "progress": False, "deterministic": True, "seed": 3,
             "model_options": {"channels": [4, 8], "dropout": [0.0, 0.0]}}
ENGINE_3D = {"batch_size": 2, "labeled_bs": 1, "val_every": 1, "log_every": 1, "patch_size": [16, 16, 16],
             "progress": False, "deterministic": True, "seed": 3, "model_options": {"channels": [4, 8]}}
DATA_2D, DATA_3D = "synthetic:acdc?cases=6&slices=2&size=32", "synthetic:la?cases=8&size=32"


@dataclass(frozen=True)
class Config:
    """One training configuration the trials draw from."""

    method: str
    dim: int
    iterations: int

    @property
    def name(self) -> str:
        return f"{self.method}_{self.dim}d"

    def yaml(self) -> str:
        engine = dict(ENGINE_2D if self.dim == 2 else ENGINE_3D)
        engine.update(data=DATA_2D if self.dim == 2 else DATA_3D, labeled=2, iterations=self.iterations)
        # JSON is YAML: no YAML writer needed.
        return json.dumps({"engine": engine, "method": {}})


FULL = [Config("supervised", 2, 20), Config("mean_teacher", 2, 20), Config("cps", 2, 20),
        Config("fixmatch", 2, 20), Config("mean_teacher", 3, 10)]
SMOKE = [Config("supervised", 2, 6), Config("mean_teacher", 2, 6)]

_WALL_CLOCK = ("it_per_s", "seconds", "time")
# Kill moments, in turn: "step" a drawn moment inside a drawn training step (start-up and the final
# writes are most of a tiny run's time, so a drawn time would seldom land in training), "write"
# inside the checkpoint write after a drawn step, "start" a drawn time from the process start
# (before any checkpoint, during training or in the final writes).
KINDS = ("step", "write", "step", "write", "start")


def _child_env() -> dict[str, str]:
    # One intra-op thread: deterministic and frugal; no GPU even where one exists (CPU determinism).
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
            "PYTHONHASHSEED": "0"}


def _fit_argv(cfg: Config, run_dir: Path, cfg_file: Path, resume: bool) -> list[str]:
    if resume:
        return [sys.executable, "-m", "sslseg", "fit", cfg.method, "--resume", str(run_dir), "--device", "cpu"]
    return [sys.executable, "-m", "sslseg", "fit", cfg.method, "--config", str(cfg_file), "--out", str(run_dir),
            "--device", "cpu"]


def _tmp_files(run_dir: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(run_dir) if e.name.startswith(".") and ".pt.tmp" in e.name)
    except FileNotFoundError:
        return []


def _history_rows(run_dir: Path) -> int:
    try:
        with open(run_dir / "history.jsonl", "rb") as fh:
            return fh.read().count(b"\n")
    except FileNotFoundError:
        return 0


def _run_to_end(argv: list[str], timeout: float, iterations: int = 0) -> tuple[float, float, float]:
    """Run a child to its end; returns its wall time and when its first and its last training step
    were logged (``iterations`` steps; polled, so approximate)."""
    run_dir = Path(argv[argv.index("--out") + 1]) if "--out" in argv else None
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first_row = last_row = None
    while proc.poll() is None:
        rows = _history_rows(run_dir) if run_dir is not None else 0
        if first_row is None and rows >= 1:
            first_row = time.perf_counter() - t0
        if last_row is None and iterations and rows >= iterations:
            last_row = time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{' '.join(argv)} ran past {timeout:.0f} s")
        time.sleep(0.005)
    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}:\n{out[-3000:]}")
    total = time.perf_counter() - t0
    first_row = total if first_row is None else first_row
    return total, first_row, total if last_row is None else last_row


def _kill_at(argv: list[str], run_dir: Path, kind: str, when: float, timeout: float,
             step_s: float = 0.0) -> dict[str, Any]:
    """Start a run and SIGKILL it: ``when`` seconds after its start (kind "start"); when
    ``int(when)`` steps are logged, plus ``frac(when) * step_s`` seconds (kind "step"); or at the
    first temporary checkpoint file seen once ``when`` steps are logged (kind "write"). Returns
    what the kill left."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=_child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed, seen_tmp = False, []
    anchor, delay = (0.0, when) if kind == "start" else (None, (when % 1.0) * step_s)
    while proc.poll() is None:
        now = time.perf_counter() - t0
        if now > timeout:
            break
        if kind in ("start", "step"):
            if anchor is None and _history_rows(run_dir) >= int(when):
                anchor = now
            if anchor is not None and now - anchor >= delay:
                killed = True
        elif _history_rows(run_dir) >= when:
            seen_tmp = _tmp_files(run_dir)
            killed = bool(seen_tmp)
        if killed:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002 if kind == "start" else 0.0002)
    proc.wait()
    return {"killed": killed and proc.returncode == -signal.SIGKILL, "at_s": round(time.perf_counter() - t0, 3),
            "tmp_seen": seen_tmp, "tmp_left": _tmp_files(run_dir), "had_checkpoint": (run_dir / "last.pt").exists(),
            "history_rows": _history_rows(run_dir)}


def _strip_clock(value: Any) -> Any:
    """JSON values without wall-clock fields (strings holding JSON are parsed first)."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return value
    if isinstance(value, dict):
        return {k: _strip_clock(v) for k, v in value.items() if not any(c in str(k) for c in _WALL_CLOCK)}
    if isinstance(value, list):
        return [_strip_clock(v) for v in value]
    return value


def _first_difference(a: Any, b: Any, where: str) -> str | None:
    """The path of the first difference between two checkpoint trees, or None when bit-identical."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{where}: tensor vs {type(b).__name__ if isinstance(a, torch.Tensor) else type(a).__name__}"
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{where}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
        if not torch.equal(a, b):
            diff = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else "n/a"
            return f"{where}: values differ (max abs difference {diff})"
        return None
    a, b = _strip_clock(a), _strip_clock(b)
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return f"{where}: keys differ: {sorted(set(a) ^ set(b))}"
        for k in a:
            found = _first_difference(a[k], b[k], f"{where}.{k}")
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{where}: lengths {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{where}[{i}]")
            if found:
                return found
        return None
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return None
    return None if a == b else f"{where}: {a!r} vs {b!r}"


def compare_runs(reference: Path, resumed: Path) -> str | None:
    """The first difference between two finished run directories, or None when they are identical."""
    for name in ("last.pt", "best_val.pt", "last_model.pt"):
        a, b = reference / name, resumed / name
        if not b.is_file():
            return f"{name}: missing in the resumed run"
        found = _first_difference(torch.load(a, weights_only=True), torch.load(b, weights_only=True), name)
        if found:
            return found
    for name in ("history.jsonl", "metrics.json"):
        a, b = (reference / name).read_text(), (resumed / name).read_text()
        if name.endswith(".jsonl"):
            a, b = [json.loads(x) for x in a.splitlines()], [json.loads(x) for x in b.splitlines()]
        found = _first_difference(a, b, name)
        if found:
            return found
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="2 kills, 2D supervised and mean_teacher (CI)")
    p.add_argument("--kills", type=int, default=None, help="number of killed runs (default 10; smoke 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default 0)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds allowed to one run (default 300)")
    p.add_argument("--out", default=None, help="JSON path (default benches/results/resume[_smoke].json)")
    p.add_argument("--keep", action="store_true", help="keep the run directories (printed) for inspection")
    args = p.parse_args(argv)
    kills = args.kills if args.kills is not None else (2 if args.smoke else 10)
    if kills < 1:
        p.error(f"--kills must be >= 1, got {kills}")
    configs = SMOKE if args.smoke else FULL
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="sslseg-bench-resume-"))
    t_start = time.perf_counter()
    trials: list[dict[str, Any]] = []
    try:
        references: dict[str, tuple[Path, float, float, float]] = {}
        for i in range(kills):
            cfg = configs[i % len(configs)]
            cfg_file = work / f"{cfg.name}.yaml"
            if cfg.name not in references:
                cfg_file.write_text(cfg.yaml())
                ref_dir = work / f"{cfg.name}_reference"
                timing = _run_to_end(_fit_argv(cfg, ref_dir, cfg_file, resume=False), args.timeout, cfg.iterations)
                references[cfg.name] = (ref_dir, *timing)
                print(f"{cfg.name}: uninterrupted run {timing[0]:.1f} s (steps 1 to {cfg.iterations} logged "
                      f"from {timing[1]:.1f} s to {timing[2]:.1f} s)", flush=True)
            ref_dir, total, first, last = references[cfg.name]
            run_dir = work / f"{cfg.name}_trial{i}"
            kind = KINDS[i % len(KINDS)]
            # "time" draws within the reference's training steps, "start" within its whole life (0.95: a run
            # may be a little faster than the reference; a kill after its end kills nothing).
            if kind == "write":
                when = rng.randint(1, cfg.iterations - 1)
            elif kind == "step":  # after a drawn logged step, a drawn fraction of one step's time later
                when = rng.randint(1, cfg.iterations - 1) + rng.random()
                step_s = (last - first) / max(cfg.iterations - 1, 1)
            else:
                when = rng.uniform(0.0, 0.95 * total)
            t0 = time.perf_counter()
            kill = _kill_at(_fit_argv(cfg, run_dir, cfg_file, resume=False), run_dir, kind, when, args.timeout,
                            step_s if kind == "step" else 0.0)
            difference = None
            try:
                if not kill["killed"]:  # the run ended first: it is compared as it is
                    how = "finished before the kill"
                elif kill["had_checkpoint"]:
                    how = "resumed"
                    _run_to_end(_fit_argv(cfg, run_dir, cfg_file, resume=True), args.timeout)
                else:  # killed before the first checkpoint: nothing to resume, start again
                    how = "restarted (no checkpoint yet)"
                    shutil.rmtree(run_dir, ignore_errors=True)
                    _run_to_end(_fit_argv(cfg, run_dir, cfg_file, resume=False), args.timeout)
            except RuntimeError as e:  # a resume that fails is a failed trial, reported with its output
                difference = f"{how} run failed: {e}"
            difference = difference or compare_runs(ref_dir, run_dir)
            trial = {"trial": i, "config": cfg.name, "kind": kind, "when": round(when, 3), **kill, "how": how,
                     "identical": difference is None, "difference": difference,
                     "seconds": round(time.perf_counter() - t0, 1)}
            trials.append(trial)
            at = f"at {kill['at_s']:.2f} s" + (f" (in step {int(when) + 1})" if kind == "step" else "")
            where = (at if kind != "write" else
                     f"writing {', '.join(kill['tmp_seen']) or '?'} after step {when}")
            left = f", left {', '.join(kill['tmp_left'])}" if kill["tmp_left"] else ""
            status = "identical" if difference is None else f"DIFFERS: {difference}"
            print(f"  [{i + 1}/{kills}] {cfg.name}: SIGKILL {where} ({kill['history_rows']} steps logged{left}); "
                  f"{how}: {status}", flush=True)
            if not args.keep and difference is None:
                shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"run directories kept in {work}")
    same = sum(t["identical"] for t in trials)
    mid_write = sum(bool(t["tmp_left"]) for t in trials)
    seconds = time.perf_counter() - t_start
    early = sum(t["how"].startswith("restarted") for t in trials)
    missed = sum(not t["killed"] for t in trials)
    print(f"{same}/{len(trials)} identical ({mid_write} killed inside a checkpoint write, {early} before the first "
          f"checkpoint{f', {missed} ended before their kill' if missed else ''}; {seconds:.0f} s)")
    out = Path(args.out) if args.out else RESULTS / ("resume_smoke.json" if args.smoke else "resume.json")
    write_json(out, {"bench": "resume", "meta": metadata("cpu"), "seed": args.seed, "kills": kills,
                     "identical": same, "killed_mid_write": mid_write, "seconds": round(seconds, 1),
                     "configs": [c.name for c in configs], "trials": trials})
    return 0 if same == len(trials) else 1


if __name__ == "__main__":
    sys.exit(main())
