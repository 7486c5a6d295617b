"""Sweeps: train and evaluate a grid of runs (methods x data x labeled x seeds x folds).

``sslseg sweep`` (and :func:`sweep`) expands the grid, gives every cell a run directory with a
stable name (``<sweep>/runs/<data>/<method>-l<labeled>-s<seed>[-f<fold>]``), writes a ``sweep.json``
manifest, and then either runs the cells on this machine, one or ``jobs`` at a time, or prints one
command line per unfinished cell for ``torchrun`` or Slurm (``emit``). A cell is two subprocesses,
``python -m sslseg fit ...`` then ``python -m sslseg evaluate RUN_DIR --split test``; a cell whose
evaluation file exists is finished and skipped, and a cell killed mid-training (``last.pt`` present)
continues with ``fit --resume``. Each run directory gets a ``sweep_run.json`` (commands, wall
and CPU times, status, the tail of the log on failure). ``sslseg report`` aggregates a sweep into tables.

Example:
    >>> sslseg.sweep.sweep("sweeps/acdc", methods=["supervised", "mean_teacher"],   # doctest: +SKIP
    ...                    data="synthetic:acdc", labeled=[3, 7], seeds=[0, 1, 2], iterations=2000)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

__all__ = ["Cell", "MANIFEST", "RUN_RECORD", "SWEEP_FORMAT", "data_tag", "emit_commands", "expand_grid",
           "load_manifest", "parse_labeled", "register_cli", "sweep"]

SWEEP_FORMAT = "sslseg-sweep/1"
MANIFEST = "sweep.json"
RUN_RECORD = "sweep_run.json"
RUN_LOG = "sweep.log"
EMIT_TARGETS = ("torchrun", "slurm")
# Options the grid itself sets on every run: setting them through ``options`` would fight the grid.
_GRID_KEYS = {"data": "data", "labeled": "labeled", "seed": "seeds", "fold": "folds", "iterations": "iterations",
              "device": "device"}
_TAIL_LINES = 40


# ------------------------------------------------------------------------------------------ the grid
@dataclass(frozen=True)
class Cell:
    """One run of a sweep.

    Attributes:
        method: Method name.
        data: Dataset spec (a folder or ``synthetic:<kind>[?options]``).
        labeled: Labeled cases: a count, a fraction in (0, 1), or None for all training cases
            (the fully supervised upper bound).
        seed: Seed of the split's labeled draw, the networks and the batches.
        fold: Cross-validation fold, or None for the dataset's own split.
    """

    method: str
    data: str
    labeled: int | float | None
    seed: int
    fold: int | None = None

    @property
    def labeled_tag(self) -> str:
        """``3``, ``0.25`` or ``all``."""
        return "all" if self.labeled is None else f"{self.labeled:g}"

    @property
    def name(self) -> str:
        """The run's path inside ``<sweep>/runs``: ``<data tag>/<method>-l<labeled>-s<seed>[-f<fold>]``."""
        fold = "" if self.fold is None else f"-f{self.fold}"
        return f"{data_tag(self.data)}/{self.method}-l{self.labeled_tag}-s{self.seed}{fold}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def data_tag(spec: str) -> str:
    """A short, stable, file-system-safe name for a data spec.

    ``synthetic:acdc?size=64&cases=20`` -> ``acdc-cases20-size64`` (options sorted, so the order
    they were written in does not matter); a folder -> its name plus a hash of its absolute path.
    """
    if spec.startswith("synthetic:"):
        kind, _, query = spec[len("synthetic:"):].partition("?")
        tag = kind + "".join(f"-{k}{v}" for k, v in sorted(parse_qsl(query, keep_blank_values=True)))
    else:
        path = Path(spec).expanduser().resolve()
        tag = f"{path.name}-{hashlib.sha1(str(path).encode()).hexdigest()[:6]}"
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", tag).strip("_.") or "data"


def parse_labeled(value: Any) -> int | float | None:
    """A labeled value of the grid: a case count (``3``), a fraction in (0, 1) (``0.1``) or
    ``"all"``/None (every training case labeled). Strings are parsed the same way."""
    original = value
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("all", "full"):
            return None
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                value = original
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"labeled values must be case counts (3), fractions in (0, 1) (0.1) or 'all', "
                         f"got {original!r}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"labeled case counts must be >= 1, got {original!r}")
        return value
    if not 0 < value < 1:
        # 1.0 reads as both "one case" and "every case": make the user say which.
        raise ValueError(f"labeled fractions must be in (0, 1) (use 'all' for every case, or an integer count), "
                         f"got {original!r}")
    return float(value)


def _dataset_dim(spec: str) -> int:
    import sslseg.data

    return sslseg.data.load(spec).dim


def expand_grid(
    methods: Sequence[str],
    data: Sequence[str],
    labeled: Sequence[Any],
    seeds: Sequence[int],
    folds: Sequence[int] | None = None,
    *,
    dims: Mapping[str, int] | None = None,
) -> tuple[list[Cell], list[dict[str, str]]]:
    """Every cell of ``methods x data x labeled x seeds x folds``, in that nesting order.

    Methods that do not support a dataset's dimensionality (``cct`` on 3D, ``dtc`` on 2D) are left
    out and reported. ``dims`` maps data specs to 2/3 (looked up with ``sslseg.data.load`` when
    missing).

    Returns:
        ``(cells, skipped)`` where ``skipped`` holds ``{"method", "data", "reason"}`` notes.

    Raises:
        ValueError: an unknown method (with a did-you-mean hint), a bad labeled value, a negative
            seed or fold, or an empty list.
    """
    from sslseg.methods import get_method

    for argument, values in (("methods", methods), ("data", data), ("labeled", labeled), ("seeds", seeds)):
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
            raise ValueError(f"{argument} must be a non-empty list, got {values!r}")
    if folds is not None and (isinstance(folds, (str, bytes)) or not isinstance(folds, Sequence) or len(folds) == 0):
        raise ValueError(f"folds must be None or a non-empty list of fold indices, got {folds!r}")
    for argument, values in (("seeds", seeds), ("folds", folds or [])):
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 0]
        if bad:
            raise ValueError(f"{argument} must be non-negative integers, got {bad}")
    classes = {m: get_method(m) for m in dict.fromkeys(methods)}  # unknown names raise did-you-mean here
    labels = list(dict.fromkeys(parse_labeled(v) for v in labeled))
    dims = dict(dims or {})
    cells: list[Cell] = []
    skipped: list[dict[str, str]] = []
    for spec in dict.fromkeys(data):
        if not isinstance(spec, str) or not spec:
            raise ValueError(f"data entries must be non-empty dataset specs, got {spec!r}")
        dim = dims.get(spec) or _dataset_dim(spec)
        for method, cls in classes.items():
            if dim not in cls.dims:
                supported = "/".join(f"{d}D" for d in cls.dims)
                skipped.append({"method": method, "data": spec,
                                "reason": f"{method} supports {supported} data only; {spec} is {dim}D"})
                continue
            for lab in labels:
                for seed in dict.fromkeys(seeds):
                    for fold in (dict.fromkeys(folds) if folds is not None else [None]):
                        cells.append(Cell(method, spec, lab, int(seed), fold))
    return cells, skipped


# ---------------------------------------------------------------------------------------- options
def _yaml_text(value: Any) -> str:
    """A value as the YAML text ``fit --set key=VALUE`` parses back to the same value."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30)
    return text.removesuffix("...\n").strip()


def _check_options(options: Mapping[str, Any], method_names: Sequence[str]) -> dict[str, list[str]]:
    """Validate the fixed options; return the ``key=value`` settings of each method.

    An engine option goes to every run; a method option goes to the methods whose config has it
    (``ema_decay`` to mean_teacher, uamt, ...). A key no method of the grid accepts is an error.
    """
    from sslseg.engine.config import EngineConfig, update_dataclass
    from sslseg.methods import get_method

    engine_names = {f.name for f in dataclasses.fields(EngineConfig)}
    configs = {m: get_method(m).Config for m in method_names}
    method_keys = {m: {f.name for f in dataclasses.fields(c)} for m, c in configs.items()}
    engine_opts: dict[str, Any] = {}
    per_method: dict[str, dict[str, Any]] = {m: {} for m in method_names}
    for given, value in options.items():
        if not isinstance(given, str):
            raise TypeError(f"options keys must be option names (str), got {given!r}")
        # ``engine.key`` / ``method.key`` pick a side where both have the name (as ``fit --set`` does).
        scope, _, key = given.rpartition(".")
        if scope not in ("", "engine", "method"):
            raise TypeError(f"options: {given!r}: the only scopes are 'engine.' and 'method.'")
        if key in _GRID_KEYS and scope != "method":
            raise ValueError(f"options: {key!r} is set by the sweep itself; use its {_GRID_KEYS[key]!r} argument")
        if key in engine_names and scope != "method":
            engine_opts[key] = value
            continue
        takers = [m for m in method_names if key in method_keys[m]] if scope != "engine" else []
        if not takers:
            import difflib

            accepted = sorted(engine_names - set(_GRID_KEYS)) + sorted(set().union(*method_keys.values()))
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"options: unknown option {key!r}{hint}: it is neither an engine option nor an option of "
                            f"the methods {list(method_names)}; accepted: {', '.join(accepted)}")
        for m in takers:
            per_method[m][key] = value
    # Build the configs once so that bad values fail now, not an hour into the sweep.
    update_dataclass(EngineConfig(), engine_opts, where="sweep options (engine)")
    for m, values in per_method.items():
        update_dataclass(configs[m](), values, where=f"sweep options (method {m})")
    engine_set = [f"{k}={_yaml_text(v)}" for k, v in sorted(engine_opts.items())]
    return {m: engine_set + [f"method.{k}={_yaml_text(v)}" for k, v in sorted(per_method[m].items())]
            for m in method_names}


def _check_labeled_fits(cells: Sequence[Cell], options: Mapping[str, Any], datasets: Mapping[str, Any]) -> None:
    """Every (data, labeled, fold) the grid uses must split, so that errors show before any run starts."""
    folds = options.get("folds", 5)
    seen: set[tuple] = set()
    for cell in cells:
        key = (cell.data, cell.labeled, cell.fold)
        if key in seen:
            continue
        seen.add(key)
        try:
            datasets[cell.data].split(labeled=cell.labeled, seed=cell.seed, fold=cell.fold, folds=folds)
        except (ValueError, TypeError) as exc:
            fold = "" if cell.fold is None else f", fold={cell.fold}"
            raise ValueError(f"labeled={cell.labeled_tag}{fold} does not fit data {cell.data!r}: {exc}") from None


# --------------------------------------------------------------------------------------- commands
@dataclass(frozen=True)
class _Plan:
    """How one cell is run: its directory and the ``sslseg`` argument lists of each step."""

    cell: Cell
    dir: Path
    settings: tuple[str, ...]
    iterations: int | None
    device: str | None
    split: str
    empty_policy: str
    tta: bool

    @property
    def options(self) -> dict[str, Any]:
        """What makes two runs of the same cell the same run (compared when a sweep is re-run)."""
        return {"iterations": self.iterations, "set": list(self.settings), "split": self.split,
                "empty_policy": self.empty_policy, "tta": self.tta}

    @property
    def evaluation_file(self) -> Path:
        return self.dir / f"evaluation_{self.split}.json"

    def fit_args(self) -> list[str]:
        c = self.cell
        args = ["fit", c.method, "--data", c.data, "--seed", str(c.seed), "--out", str(self.dir)]
        # ``labeled=null`` is "every training case"; a count or a fraction goes through --labeled.
        args += ["--set", "labeled=null"] if c.labeled is None else ["--labeled", f"{c.labeled:g}"]
        if self.iterations is not None:
            args += ["--iterations", str(self.iterations)]
        if c.fold is not None:
            args += ["--set", f"fold={c.fold}"]
        if self.device is not None:
            args += ["--device", self.device]
        for s in self.settings:
            args += ["--set", s]
        return args

    def resume_args(self) -> list[str]:
        args = ["fit", self.cell.method, "--resume", str(self.dir)]
        if self.iterations is not None:
            args += ["--iterations", str(self.iterations)]
        if self.device is not None:
            args += ["--device", self.device]
        return args

    def evaluate_args(self) -> list[str]:
        args = ["evaluate", str(self.dir), "--split", self.split, "--empty-policy", self.empty_policy]
        if self.tta:
            args.append("--tta")
        if self.device is not None:
            args += ["--device", self.device]
        return args

    def state(self) -> str:
        """``finished`` (evaluated), ``trained`` (to evaluate), ``resume`` (killed, has last.pt) or ``new``."""
        if self.evaluation_file.is_file():
            return "finished"
        if (self.dir / "metrics.json").is_file():
            return "trained"
        if (self.dir / "last.pt").is_file():
            return "resume"
        return "new"

    def steps(self) -> list[tuple[str, list[str]]]:
        """The ``(kind, sslseg args)`` still to do for this cell."""
        state = self.state()
        steps: list[tuple[str, list[str]]] = []
        if state == "resume":
            steps.append(("resume", self.resume_args()))
        elif state == "new":
            steps.append(("fit", self.fit_args()))
        if state != "finished":
            steps.append(("evaluate", self.evaluate_args()))
        return steps


def _command_line(kind: str, args: list[str], *, emit: str, nproc_per_node: int, python: str) -> str:
    if kind != "evaluate" and (emit == "torchrun" or nproc_per_node > 1):
        # --standalone: a private rendezvous per run, so several printed lines can run at once.
        return shlex.join(["torchrun", "--standalone", "--nproc_per_node", str(nproc_per_node), "-m", "sslseg", *args])
    return shlex.join([python, "-m", "sslseg", *args])


def emit_commands(plans: Sequence[_Plan], emit: str, *, nproc_per_node: int = 1,
                  slurm_args: Sequence[str] = (), python: str = "python") -> list[str]:
    """One shell line per unfinished cell: ``torchrun ... fit ... && python -m sslseg evaluate ...``
    (``emit="torchrun"``) or ``mkdir -p RUN_DIR && sbatch ... --wrap '<the same>'`` (``emit="slurm"``)."""
    if emit not in EMIT_TARGETS:
        raise ValueError(f"emit must be one of {EMIT_TARGETS}, got {emit!r}")
    lines = []
    for plan in plans:
        steps = plan.steps()
        if not steps:
            continue
        body = " && ".join(_command_line(kind, args, emit=emit, nproc_per_node=nproc_per_node, python=python)
                           for kind, args in steps)
        if emit == "slurm":
            job = "sslseg-" + plan.cell.name.replace("/", "-")
            head = ["sbatch", f"--job-name={job}", f"--output={plan.dir / 'slurm-%j.out'}", *slurm_args]
            # Slurm opens the --output file before the job starts: its folder must exist at submission.
            lines.append(f"mkdir -p {shlex.quote(str(plan.dir))} && " + shlex.join(head) + " --wrap "
                         + shlex.quote(body))
        else:
            lines.append(body)
    return lines


# -------------------------------------------------------------------------------------- manifest
def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); fix or delete it") from None


def _run_status(plan: _Plan) -> str:
    state = plan.state()
    if state == "finished":
        return "finished"
    record = _read_json(plan.dir / RUN_RECORD) or {}
    status = record.get("status")
    if status in ("failed", "running"):
        return status
    return {"trained": "to_evaluate", "resume": "interrupted"}.get(state, "pending")


def load_manifest(sweep_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``<sweep_dir>/sweep.json``."""
    path = Path(sweep_dir) / MANIFEST
    manifest = _read_json(path)
    if manifest is None:
        raise FileNotFoundError(f"{sweep_dir} is not a sweep directory (no {MANIFEST}); create one with `sslseg sweep`")
    if manifest.get("format") != SWEEP_FORMAT:
        raise ValueError(f"{path}: sweep format {manifest.get('format')!r}, expected {SWEEP_FORMAT!r}")
    return manifest


class _Manifest:
    """``sweep.json``: every cell the sweep has ever planned, merged across invocations."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / MANIFEST
        old = _read_json(self.path)
        if old is not None and old.get("format") != SWEEP_FORMAT:
            raise ValueError(f"{self.path}: sweep format {old.get('format')!r}, expected {SWEEP_FORMAT!r}")
        self.data: dict[str, Any] = old or {"format": SWEEP_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                            "runs": {}, "skipped": []}
        self.lock = threading.Lock()

    def add(self, plans: Sequence[_Plan], skipped: Sequence[dict[str, str]]) -> None:
        runs = self.data["runs"]
        for plan in plans:
            old = runs.get(plan.cell.name)
            if old is not None and old["options"] != plan.options:
                changed = sorted(k for k in plan.options if old["options"].get(k) != plan.options[k])
                raise ValueError(
                    f"run {plan.cell.name!r} already exists in {self.path} with different options {changed} "
                    f"(was {[old['options'].get(k) for k in changed]}, now {[plan.options[k] for k in changed]}); "
                    f"use a new sweep directory, or delete that run's directory and its entry")
        for plan in plans:
            runs[plan.cell.name] = {**plan.cell.to_dict(), "dir": str(plan.dir.relative_to(self.root)),
                                    "options": plan.options, "status": _run_status(plan)}
        notes = {json.dumps(s, sort_keys=True) for s in self.data["skipped"]}
        self.data["skipped"] += [s for s in skipped if json.dumps(s, sort_keys=True) not in notes]
        self.save()

    def update(self, plan: _Plan) -> None:
        with self.lock:
            self.data["runs"][plan.cell.name]["status"] = _run_status(plan)
            self.save()

    def save(self) -> None:
        from sslseg._version import __version__

        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.data["sslseg_version"] = __version__
        _write_json(self.path, self.data)


# ------------------------------------------------------------------------------------- execution
class _Processes:
    """Live child processes, so that an interrupted sweep stops them instead of orphaning them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live: set[subprocess.Popen] = set()
        self.stopping = False

    def run(self, argv: list[str], log: Path, env: dict[str, str]) -> tuple[int, float | None]:
        """Run ``argv`` with its output appended to ``log``; -> (exit code, CPU seconds or None)."""
        with open(log, "ab") as fh:
            fh.write(f"$ {shlex.join(argv)}\n".encode())
            fh.flush()
            with self.lock:
                if self.stopping:
                    return -1, None
                proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env)
                self.live.add(proc)
            try:
                if not hasattr(os, "wait4"):  # Windows: no per-child resource usage
                    return proc.wait(), None
                # wait4 reaps this child alone and reports its own CPU time, which (unlike wall
                # time) does not grow when other jobs share the cores: the figure to size schedules.
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
                return proc.returncode, usage.ru_utime + usage.ru_stime
            finally:
                with self.lock:
                    self.live.discard(proc)

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            procs = list(self.live)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _tail(path: Path, lines: int = _TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])[-4000:]


def _execute(plan: _Plan, *, python: str, env: dict[str, str], procs: _Processes,
             prune: bool = False) -> dict[str, Any]:
    """Run the remaining steps of one cell and keep ``sweep_run.json`` current."""
    plan.dir.mkdir(parents=True, exist_ok=True)
    record_path = plan.dir / RUN_RECORD
    record = _read_json(record_path) or {"format": "sslseg-sweep-run/1", "name": plan.cell.name,
                                         "cell": plan.cell.to_dict(), "attempts": []}
    record.update(options=plan.options, status="running", error_tail="")
    _write_json(record_path, record)
    log = plan.dir / RUN_LOG
    for kind, args in plan.steps():
        argv = [python, "-m", "sslseg", *args]
        t0 = time.perf_counter()
        started = time.strftime("%Y-%m-%dT%H:%M:%S")
        rc, cpu = procs.run(argv, log, env)
        seconds = time.perf_counter() - t0
        record["attempts"].append({"step": kind, "command": shlex.join(argv), "seconds": round(seconds, 3),
                                   "cpu_seconds": None if cpu is None else round(cpu, 3), "returncode": rc,
                                   "started": started, "threads": env.get("OMP_NUM_THREADS")})
        if rc != 0:
            record.update(status="failed", error_tail=_tail(log))
            break
    else:
        if plan.evaluation_file.is_file():
            record["status"] = "finished"
            if prune:  # the training state is only needed to resume; best_val.pt stays
                (plan.dir / "last.pt").unlink(missing_ok=True)
        else:  # every step exited 0 and still no result: say so rather than call it finished
            record.update(status="failed", error_tail=f"the steps succeeded but wrote no {plan.evaluation_file.name}\n"
                                                      + _tail(log))
    done = [a for a in record["attempts"] if a["returncode"] == 0]
    record["fit_seconds"] = round(sum(a["seconds"] for a in done if a["step"] in ("fit", "resume")), 3)
    record["evaluate_seconds"] = round(sum(a["seconds"] for a in done if a["step"] == "evaluate"), 3)
    fit_cpu = [a.get("cpu_seconds") or 0.0 for a in done if a["step"] in ("fit", "resume")]
    record["fit_cpu_seconds"] = round(sum(fit_cpu), 3)
    record["seconds"] = round(sum(a["seconds"] for a in record["attempts"]), 3)
    _write_json(record_path, record)
    return record


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _print(verbose: bool, *args: Any, file: Any = None) -> None:
    if verbose:
        print(*args, file=file, flush=True)


def sweep(
    out: str | os.PathLike,
    *,
    methods: Sequence[str] | str,
    data: Sequence[str] | str,
    labeled: Sequence[Any] | Any,
    seeds: Sequence[int] | int = (0,),
    folds: Sequence[int] | None = None,
    iterations: int | None = None,
    options: Mapping[str, Any] | None = None,
    device: str | None = None,
    jobs: int = 1,
    threads: int | None = None,
    split: str = "test",
    empty_policy: str = "penalty",
    tta: bool = False,
    emit: str | None = None,
    nproc_per_node: int = 1,
    slurm_args: Sequence[str] = (),
    python: str | None = None,
    dry_run: bool = False,
    prune_checkpoints: bool = False,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train and evaluate every cell of ``methods x data x labeled x seeds x folds``.

    Args:
        out: The sweep directory (``sweep.json`` and ``runs/``). Re-running a sweep in the same
            directory skips finished runs, resumes interrupted ones and adds new cells.
        methods: Method names, or ``"all"`` for every registered method. Methods that do not
            support a dataset's dimensionality are skipped with a note in the manifest.
        data: One dataset spec or several.
        labeled: Labeled values: counts (``3``), fractions in (0, 1) or ``"all"`` (every
            training case; with ``supervised`` this is the full-label upper bound).
        seeds: Seeds (each seeds the labeled draw, the networks and the batches).
        folds: Cross-validation folds (indices; ``options["folds"]`` sets their number,
            default 5), or None for the dataset's own train/val/test split.
        iterations: Optimizer steps of every run (None: the engine's default).
        options: Fixed options for every run: engine options (``batch_size``, ``patch_size``,
            ``val_every``, ...) and method options (``ema_decay``, ...; given to the methods that
            have them). Values are Python values (``[64, 64]``, ``0.99``).
        device: ``cpu`` / ``cuda`` for every run (None: the engine's default).
        jobs: Local runs at a time. Each gets ``OMP_NUM_THREADS = cores // jobs``, at most the
            caller's own ``OMP_NUM_THREADS`` when that is set.
        threads: Threads per local run (overrides the rule above).
        split: The split each run is evaluated on (``test``; checkpoints are selected on ``val``).
        empty_policy: Empty-mask policy of the evaluation (``penalty``, ``nan`` or ``zero``).
        tta: Flip test-time augmentation in the evaluation.
        emit: ``"torchrun"`` or ``"slurm"``: run nothing; put one command line per unfinished run
            in the returned manifest's ``"commands"`` (the CLI prints them).
        nproc_per_node: Processes per run for ``torchrun`` (also used for Slurm lines when > 1).
        slurm_args: Extra ``sbatch`` arguments (``["--gres=gpu:1", "--time=02:00:00"]``).
        python: Interpreter for the runs (default: this one; ``python`` in emitted lines).
        dry_run: Write the manifest and return without running anything.
        prune_checkpoints: Delete each run's ``last.pt`` (the training state, 3x the model's
            size) once the run is evaluated; ``best_val.pt`` is kept. A pruned run cannot be
            continued with more iterations.
        verbose: Print the plan and one line per finished run.

    Returns:
        The manifest (``sweep.json`` content): ``runs`` by name with status, ``skipped`` notes,
        and ``commands`` when ``emit`` is given.

    Raises:
        ValueError / TypeError: bad arguments, an empty grid, labeled values that a dataset
            cannot split, options no run accepts, or a re-run whose options differ from the
            runs already in ``out``.
    """
    import sslseg.data
    from sslseg.data.errors import check_choice
    from sslseg.methods import list_methods

    if isinstance(methods, str):
        methods = list_methods() if methods == "all" else [methods]
    data = [data] if isinstance(data, str) else list(data)
    labeled = [labeled] if isinstance(labeled, (str, int, float)) or labeled is None else list(labeled)
    seeds = [seeds] if isinstance(seeds, int) and not isinstance(seeds, bool) else list(seeds)
    for name, value in (("jobs", jobs), ("nproc_per_node", nproc_per_node), ("threads", threads)):
        if value is None and name == "threads":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if iterations is not None and (isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1):
        raise ValueError(f"iterations must be None or an int >= 1, got {iterations!r}")
    check_choice("split", split, ("test", "val", "train", "all"))
    check_choice("empty_policy", empty_policy, ("penalty", "nan", "zero"))
    if emit is not None:
        check_choice("emit", emit, EMIT_TARGETS)
    if isinstance(slurm_args, str):
        slurm_args = shlex.split(slurm_args)
    options = dict(options or {})

    bad = [d for d in data if not isinstance(d, str) or not d]
    if bad or not data:
        raise ValueError(f"data must be one or more non-empty dataset specs, got {data!r}")
    datasets = {spec: sslseg.data.load(spec) for spec in dict.fromkeys(data)}
    cells, skipped = expand_grid(list(methods), data, labeled, seeds, folds,
                                 dims={spec: ds.dim for spec, ds in datasets.items()})
    # Emitted command lines go to stdout (to be redirected into a script): notes go to stderr then.
    notes = sys.stderr if emit is not None else None
    for note in skipped:
        _print(verbose, f"skipped: {note['reason']}", file=notes)
    if not cells:
        raise ValueError(f"the grid is empty: no method of {list(methods)} supports the data {data}")
    settings = _check_options(options, list(dict.fromkeys(c.method for c in cells)))
    if folds is not None:
        nfolds = options.get("folds", 5)
        bad = [f for f in folds if f >= nfolds]
        if bad:
            raise ValueError(f"folds must be fold indices in [0, {nfolds}) (options['folds']={nfolds}), got {bad}")
    _check_labeled_fits(cells, options, datasets)

    # Absolute paths: emitted lines may run from another directory (a Slurm node, a tmux pane).
    root = Path(out).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    plans = [_Plan(c, root / "runs" / c.name, tuple(settings[c.method]), iterations, device, split, empty_policy, tta)
             for c in cells]
    manifest = _Manifest(root)
    manifest.add(plans, skipped)
    states = [p.state() for p in plans]
    todo = [p for p, s in zip(plans, states) if s != "finished"]
    _print(verbose, f"sweep {root}: {len(plans)} runs, {states.count('finished')} finished, "
                    f"{states.count('resume')} to resume, {states.count('trained')} to evaluate, "
                    f"{states.count('new')} new", file=notes)
    result = dict(manifest.data)
    if emit is not None:
        result["commands"] = emit_commands(todo, emit, nproc_per_node=nproc_per_node, slurm_args=slurm_args,
                                           python=python or "python")
        return result
    if dry_run or not todo:
        return result

    python = python or sys.executable
    env = dict(os.environ)
    per_job = threads or max(1, _cpu_count() // jobs)
    if threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        # A caller who limited threads (a shared machine) is not overridden upwards.
        per_job = max(1, min(per_job, int(os.environ["OMP_NUM_THREADS"])))
    env.update(OMP_NUM_THREADS=str(per_job), MKL_NUM_THREADS=str(per_job))
    env.setdefault("PYTHONUNBUFFERED", "1")
    procs = _Processes()

    def one(plan: _Plan) -> dict[str, Any]:
        record = _execute(plan, python=python, env=env, procs=procs, prune=prune_checkpoints)
        manifest.update(plan)
        return record

    finished = 0
    futures: dict[Any, _Plan] = {}
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = {pool.submit(one, p): p for p in todo}
        for fut in as_completed(futures):
            plan, record = futures[fut], fut.result()
            finished += 1
            note = "" if record["status"] == "finished" else f"  FAILED: see {plan.dir / RUN_LOG}"
            _print(verbose, f"[{finished}/{len(todo)}] {plan.cell.name}: {record['status']} "
                            f"in {record['seconds']:.0f} s{note}")
    except BaseException:
        for fut in futures:
            fut.cancel()
        procs.stop()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    result = dict(manifest.data)
    failed = [n for n, r in result["runs"].items() if r["status"] == "failed"]
    if failed:
        _print(verbose, f"{len(failed)} run(s) failed: {failed}; their sweep_run.json has the error tail; "
                        f"re-run the same command to retry them")
    return result


# -------------------------------------------------------------------------------------------- CLI
def _split_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"--{what} must be a comma-separated list, got {text!r}")
    return items


def _int_list(text: str, what: str) -> list[int]:
    out = []
    for t in _split_list(text, what):
        try:
            out.append(int(t))
        except ValueError:
            raise ValueError(f"--{what} must be comma-separated integers, got {t!r} in {text!r}") from None
    return out


def _parse_settings(pairs: Sequence[str]) -> dict[str, Any]:
    import yaml

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        options[key] = yaml.safe_load(text)
    return options


def _cmd_sweep(args: argparse.Namespace) -> int:
    manifest = sweep(
        args.out,
        methods=args.methods if args.methods == "all" else _split_list(args.methods, "methods"),
        data=args.data,
        labeled=_split_list(args.labeled, "labeled"),
        seeds=_int_list(args.seeds, "seeds"),
        folds=None if args.folds is None else _int_list(args.folds, "folds"),
        iterations=args.iterations,
        options=_parse_settings(args.set or []),
        device=args.device,
        jobs=args.jobs,
        threads=args.threads,
        split=args.split,
        empty_policy=args.empty_policy,
        tta=args.tta,
        emit=args.emit,
        nproc_per_node=args.nproc_per_node,
        slurm_args=shlex.split(args.slurm_args or ""),
        dry_run=args.dry_run,
        prune_checkpoints=args.prune_checkpoints,
    )
    if args.emit is not None:
        for line in manifest["commands"]:
            print(line)
        return 0
    return 1 if any(r["status"] == "failed" for r in manifest["runs"].values()) else 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``sslseg sweep`` to ``sslseg``'s subparsers."""
    p = subparsers.add_parser(
        "sweep", help="train and evaluate a grid of runs (methods x data x labeled x seeds x folds)",
        description="Run every cell of the grid (python -m sslseg fit, then evaluate on the test split), here one "
                    "or --jobs at a time, or print one command per run (--emit torchrun|slurm). Re-running the same "
                    "command skips finished runs and resumes interrupted ones. Aggregate with `sslseg report`.")
    p.add_argument("--out", default="sweep", help="sweep directory (default ./sweep)")
    p.add_argument("--methods", required=True, help="comma-separated method names, or 'all'")
    p.add_argument("--data", nargs="+", default=["synthetic:acdc"], metavar="SPEC",
                   help="dataset spec(s): folders or synthetic:<kind>[?options] (default synthetic:acdc)")
    p.add_argument("--labeled", required=True, help="comma-separated labeled values: counts (3,7), fractions (0.1) "
                                                     "or 'all' (every training case)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--folds", default=None, help="comma-separated cross-validation folds (number of folds: "
                                                 "--set folds=K, default 5); default: the dataset's own split")
    p.add_argument("--iterations", type=int, default=None, help="optimizer steps of every run")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="engine or method option for every run (repeatable); method options go to the methods "
                        "that have them")
    p.add_argument("--device", default=None, help="cpu, cuda, ... for every run")
    p.add_argument("--jobs", type=int, default=1, help="local runs at a time (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads per local run (default cores // jobs, at most $OMP_NUM_THREADS if set)")
    p.add_argument("--split", default="test", choices=("test", "val", "train", "all"),
                   help="split to evaluate each run on (default test)")
    p.add_argument("--empty-policy", default="penalty", choices=("penalty", "nan", "zero"),
                   help="empty-mask policy of the evaluation (default penalty)")
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation in the evaluation")
    p.add_argument("--emit", default=None, choices=EMIT_TARGETS,
                   help="print one command line per unfinished run instead of running")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes per run for torchrun (default 1)")
    p.add_argument("--slurm-args", default=None,
                   help="extra sbatch arguments, written with '=': --slurm-args='--gres=gpu:1 --time=2:00:00'")
    p.add_argument("--dry-run", action="store_true", help="write sweep.json and print the plan only")
    p.add_argument("--prune-checkpoints", action="store_true",
                   help="delete each run's last.pt (training state) once it is evaluated; best_val.pt is kept")
    p.set_defaults(func=_cmd_sweep)
