"""Bench: the benchmark table. Every method on synthetic ACDC (3 and 7 labeled patients) and on
synthetic LA (8 labeled cases), with ``supervised`` as the lower bound and ``supervised`` on every
training case as the upper bound, 3 seeds, one protocol; each run through ``sslseg.sweep``, the
table through ``sslseg.report``, built from the committed result records of the finished runs.

Protocol (identical for every run):
    * split by case (patient): the synthetic datasets' own train/validation/test lists (LA has
      none for validation: 10% of its training cases are held out, the same for every run); the
      labeled cases are drawn at random from the training cases with the run's seed (0, 1, 2);
    * checkpoint selected on the validation split only (``best_val``, mean foreground Dice);
    * scored on the test split per volume and foreground class: Dice, HD95 and ASD in mm (the
      phantoms' voxel spacing), empty-mask policy ``penalty`` (one side empty: Dice 0 and the image
      diagonal as distance; both empty: Dice 1, distance 0); no test-time augmentation;
    * each cell of the table: mean ± sample std over the 3 seeds.

Schedule: about 470 CPU-minutes for the whole table (138 runs; about 4 hours with ``--jobs 2``
on this 2-core machine, each run on one thread; see ESTIMATE below), spread over sessions by
``--budget-min``:
    * ACDC: ``synthetic:acdc?cases=30&size=80&slices=2`` (21 training patients, 3 validation,
      6 test; two frames per patient; 80x80 pixels of 1.5 mm, 2 slices of 10 mm), trained and
      scored at its own 80x80 size. The setting is calibrated (``benches/bench_calibration.py``,
      ``benches/results/calibration.md``): ``supervised`` on all 21 patients beats 3 labeled
      patients by +0.12 test Dice over 3 seeds at 800 steps (+0.03 with the earlier 64x64 phantom
      resized to a 32x32 patch for 200 steps), and 3 labeled patients stay far above chance. The
      methods' default 2D networks (U-Net 16-32-64-128-256; CTCT's second branch is a Swin-UNet,
      trained on the patch rounded to 64x64), batch 8 (4 labeled + 4 unlabeled; ``supervised``
      trains on 8 labeled slices, as SSL4MIS's supervised script), ACDC_STEPS steps of SGD (lr
      0.01, poly decay), validation every ACDC_VAL_EVERY steps. 800 steps, not 400 (whose gap is
      as large): the slow starters (bcp's pre-training stage, urpc's pyramid, unimatch's
      full-weight strong losses) only pass ``supervised`` after several hundred steps.
    * LA: ``synthetic:la?cases=30&size=40`` (24 training cases, of which 2 are held out for
      validation; 6 test; 40^3 voxels of 1 mm). 3D U-Net at half width (channels 8-16-32-64-128:
      full width costs twice as much per step on a CPU) for every method but DTC; random 32^3
      patches, batch 4 (2 + 2), LA_STEPS steps, validation every LA_VAL_EVERY steps; Gaussian sliding
      window (overlap 0.5) for validation and test.
    * LA on DTC's network (the table's group ``synthetic:la?... [vnet]``): DTC keeps its own V-Net
      with a signed-distance head (``vnet_sdf``, 16 filters, as in its paper) and its own ramp (over
      the whole run: DTC's code ramps over 40 x 150 = 6000 steps, its iteration count), and is
      compared with ``supervised`` on the same V-Net without that head (``model=vnet``) at the same
      8 labeled cases, not with the half-width U-Nets of the other rows.
    * Every other option is the method's and the engine's default (SSL4MIS's hyper-parameters;
      consistency weights ramp up over the whole run).
    * ``--scale F`` multiplies both step counts (and the time) by F, for a longer, closer to
      converged table when more time is available; the default (1) is the table of docs/benchmark.md.

These schedules are CPU-sized, not converged; the phantoms and numbers are not comparable with
published ACDC/LA results.

Results that accumulate: a full table costs more CPU time than one session may have, so every
finished run leaves a small result record, and the table is built from the records:
    * ``--budget-min M`` runs only what fits in M minutes of wall time: each remaining run's time is
      estimated (from the measured times of finished records of the same data and method, else
      from FIT_MINUTES below), and runs are started in PRIORITY order (see ``priority``) while the
      estimated end of the next one stays within the budget; the first run that does not fit stops
      the queue. Runs whose record exists are skipped.
    * After each finished run, its record (``RECORD_FILES``: metrics, the test evaluation JSON and
      CSV with per-case rows, config, split, training history and timings; no weights) is copied
      into ``<records>/<group>/<method>-l<labeled>-s<seed>/`` with a ``record.json`` (the run's
      protocol: iterations, fixed options incl. batch and patch, split, empty policy, units, TTA),
      written to a temporary folder first and renamed into place. ``<group>`` is the data tag, the
      network variant if any, and the step count: ``acdc-cases30-size80-slices2-i800``.
    * The table (``<records>/table[_x<scale>]/``: ``sweep.json`` listing every planned run, the
      report's ``report.md``/``report.csv``/forest plots) holds every record whose protocol
      matches this invocation's; a planned run without one is a missing cell (``—`` with the number
      of missing seeds), and the table ends with the command that fills them. ``sslseg report
      <records>/table --no-overlays`` reads the same folder (records have no weights: overlays are
      skipped with a note).

Outputs: ``benches/results/methods/`` (the records and ``table/``), ``benches/results/methods.md`` +
``methods.json`` + ``methods_forest_*.png`` (the table of docs/benchmark.md, its protocol, schedule
and command), and the working sweep directories with the weights under ``runs/bench_methods/``
(``--out``; ignored by git). ``--report-only`` builds the table from the records and trains nothing.
``--smoke`` keeps its runs and records under ``benches/results/methods_smoke/work`` (ignored by git),
emptied at the start of each smoke run so that every run trains.

Usage: python benches/bench_methods.py [--smoke] [--jobs N] [--scale F] [--device cpu|cuda]
                                     [--budget-min M] [--out DIR] [--records DIR] [--report-only]
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import metadata, write_json  # noqa: E402

import sslseg  # noqa: E402
from sslseg.methods import list_methods  # noqa: E402
from sslseg.app.report import report  # noqa: E402
from sslseg.app.sweep import MANIFEST, SWEEP_FORMAT, data_tag, parse_labeled, sweep  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RECORDS = RESULTS / "methods"
WORK = Path(__file__).resolve().parents[1] / "runs" / "bench_methods"
ACDC = "synthetic:acdc?cases=30&size=80&slices=2"
LA = "synthetic:la?cases=30&size=40"
ACDC_STEPS, LA_STEPS, ACDC_VAL_EVERY, LA_VAL_EVERY = 800, 75, 100, 25
SEEDS = (0, 1, 2)
# Single-thread CPU time measured on this machine (sweep_run.json's CPU seconds, differences of
# 25- and 75/50-step runs, validation included): ACDC 0.07 (supervised), 0.10 (mean_teacher),
# 0.40 (ctct) s/step and ~12 s per run for process starts, data generation and the test
# evaluation; LA 0.65 (supervised), 0.73 (mean_teacher), 1.53 (uamt) s/step and ~12 s per run.
# Other methods scaled by their measured cost relative to mean_teacher: ACDC ~13.4 s and LA
# ~39 s per step of the whole grid, i.e. 93 x 12 + 200 x 13.4 + 45 x 12 + 75 x 40 = ~7300 CPU-s.
# With the calibrated ACDC protocol (800 steps at 80x80, 1.8x the per-step cost of 200 steps at
# 32x32: ACDC_COST below): ACDC 6 x 9.9 min x 4 x 1.8 + 3 x 1.8 = ~430, LA ~40 CPU-minutes.
ESTIMATE = "about 470 CPU-minutes, i.e. about 4 hours with --jobs 2 on 2 idle cores (spread it with --budget-min)"
# Minutes of ``sslseg fit`` per run at the default schedule (ACDC_STEPS / LA_STEPS steps, one
# thread, 2-core machine, --jobs 2): the table of commit 699d8de (benches/results/methods.json,
# mean over labeled counts and seeds). ``supervised[vnet]`` is taken as DTC's (the same V-Net
# body, without the signed-distance head and its EDT targets). Used to plan ``--budget-min`` until
# records of the same data and method have measured times.
FIT_MINUTES = {
    "acdc": {"supervised": 0.25, "adversarial": 1.53, "bcp": 0.54, "cct": 1.09, "cps": 0.89, "ctct": 2.32,
             "entropy_min": 0.26, "fixmatch": 0.35, "ict": 0.31, "mean_teacher": 0.31, "rdrop": 0.36,
             "rotation_consistency": 0.36, "uamt": 0.56, "unimatch": 0.47, "urpc": 0.28},
    "la": {"supervised": 0.59, "adversarial": 1.24, "bcp": 0.43, "cps": 1.08, "dtc": 0.55, "entropy_min": 0.60,
           "fixmatch": 0.93, "ict": 0.69, "mean_teacher": 0.69, "rdrop": 1.11, "uamt": 1.26, "unimatch": 1.44,
           "urpc": 0.62, "supervised[vnet]": 0.55},
}
# The steps FIT_MINUTES were measured at (the table of commit 699d8de), and the per-step cost of
# each data kind's current protocol relative to that table's: the calibrated ACDC protocol (80x80
# patches, 800 steps) costs 1.8x per step (supervised: 1.8 min per 800-step run in
# benches/results/calibration.json against 0.25 min per 200-step run at 32x32).
DEFAULT_STEPS = {"acdc": 200, "la": LA_STEPS}
COST_FACTOR = {"acdc": 1.8, "la": 1.0}
RUN_OVERHEAD_S = 12.0  # process starts, data generation and the test evaluation of one run
# Methods named by the benchmark's targets at the smallest labeled count of the first grid.
TARGET_METHODS = ("mean_teacher", "uamt", "cps", "fixmatch", "bcp", "unimatch")
RECORD_FORMAT = "sslseg-bench-record/1"
RECORD_META = "record.json"
SPLIT, EMPTY_POLICY, TTA, UNITS = "test", "penalty", False, "mm"
# What a record keeps of a run directory; the first five are required.
RECORD_FILES = ("metrics.json", f"evaluation_{SPLIT}.json", f"evaluation_{SPLIT}.csv", "config.yaml", "split.json",
                "history.jsonl", "sweep_run.json")
_REQUIRED = RECORD_FILES[:5]
MAX_RECORD_FILE_BYTES = 2 << 20  # a record file larger than this is not a small result: refused


class Grid(NamedTuple):
    """One group of runs: its data, labeled values, methods, steps and fixed options.

    ``variant`` names a network family that makes this a separate comparison group (``"vnet"``:
    DTC and ``supervised`` on its V-Net); its rows form their own table with their own reference.
    """

    data: str
    labeled: list[Any]
    methods: list[str]
    iterations: int
    options: dict[str, Any]
    variant: str = ""


def full_grids(scale: float = 1.0) -> list[Grid]:
    # No patch_size: the engine's default, the slices' own 80x80 (64x64 for CTCT's Swin-UNet, which
    # takes multiples of 32; an explicit 80x80 would refuse it).
    # float32 (amp="none") and the contiguous memory format, as SSL4MIS and the published tables
    # train, and as the first records of this protocol were made before amp="auto" and
    # channels_last="auto" became the defaults (benches/bench_amp.py measures the default precision
    # against float32 separately).
    acdc = {"batch_size": 8, "labeled_bs": 4, "val_every": ACDC_VAL_EVERY, "log_every": 50, "amp": "none",
            "channels_last": False}
    la = {"batch_size": 4, "labeled_bs": 2, "patch_size": [32, 32, 32], "val_every": LA_VAL_EVERY, "log_every": 25,
          "amp": "none", "channels_last": False}
    half_width = {"model_options": {"channels": [8, 16, 32, 64, 128]}}
    la_methods = [m for m in list_methods(3) if m != "dtc"]
    acdc_steps, la_steps = max(1, round(ACDC_STEPS * scale)), max(1, round(LA_STEPS * scale))
    return [
        Grid(ACDC, [3, 7], list_methods(2), acdc_steps, acdc),
        Grid(ACDC, ["all"], ["supervised"], acdc_steps, acdc),
        Grid(LA, [8], la_methods, la_steps, {**la, **half_width}),
        Grid(LA, ["all"], ["supervised"], la_steps, {**la, **half_width}),
        # DTC on its own V-Net with a signed-distance head, against supervised on the same V-Net.
        Grid(LA, [8], ["supervised"], la_steps, {**la, "model": "vnet"}, variant="vnet"),
        Grid(LA, [8], ["dtc"], la_steps, la, variant="vnet"),
    ]


def smoke_grids() -> list[Grid]:
    """The same path end to end on tiny phantoms (< 60 s on one core): 2D supervised and
    mean_teacher, and the 3D V-Net pair (supervised on ``vnet``, dtc on ``vnet_sdf``); 1 seed."""
    acdc = {"batch_size": 4, "labeled_bs": 2, "patch_size": [32, 32], "val_every": 2, "log_every": 2}
    la = {"batch_size": 2, "labeled_bs": 1, "patch_size": [32, 32, 32], "val_every": 2, "log_every": 2}
    tiny, tiny_la = "synthetic:acdc?cases=6&slices=2&size=32", "synthetic:la?cases=4&size=32"
    return [
        Grid(tiny, [2], ["supervised", "mean_teacher"], 4, acdc),
        Grid(tiny_la, [1], ["supervised"], 2, {**la, "model": "vnet", "model_options": {"n_filters": 4}},
             variant="vnet"),
        Grid(tiny_la, [1], ["dtc"], 2, {**la, "model_options": {"n_filters": 4}}, variant="vnet"),
    ]


# ---------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class BenchRun:
    """One run of the table: a method, labeled value and seed of a grid."""

    grid: Grid
    method: str
    labeled: int | float | None
    seed: int

    @property
    def labeled_tag(self) -> str:
        return "all" if self.labeled is None else f"{self.labeled:g}"

    @property
    def group(self) -> str:
        """The records folder of the run's data, network variant and step count."""
        variant = f"-{self.grid.variant}" if self.grid.variant else ""
        return f"{data_tag(self.grid.data)}{variant}-i{self.grid.iterations}"

    @property
    def name(self) -> str:
        return f"{self.method}-l{self.labeled_tag}-s{self.seed}"

    @property
    def key(self) -> str:
        """``<group>/<name>``: the record's path under the records folder."""
        return f"{self.group}/{self.name}"

    @property
    def table_data(self) -> str:
        """The data column of the table: the spec, with ``[variant]`` for a network-variant group."""
        return f"{self.grid.data} [{self.grid.variant}]" if self.grid.variant else self.grid.data

    @property
    def kind(self) -> str:
        """``acdc``, ``la``, ...: the synthetic kind (or folder name) of the data."""
        spec = self.grid.data
        return spec[len("synthetic:"):].partition("?")[0] if spec.startswith("synthetic:") else Path(spec).name

    @property
    def cost_key(self) -> str:
        return f"{self.method}[{self.grid.variant}]" if self.grid.variant else self.method

    def protocol(self) -> dict[str, Any]:
        """What a record must match to fill this run's cell."""
        return {"iterations": self.grid.iterations, "options": _plain(self.grid.options), "split": SPLIT,
                "empty_policy": EMPTY_POLICY, "tta": TTA, "units": UNITS}


def _plain(value: Any) -> Any:
    """``value`` as JSON reads it back (tuples as lists, keys sorted): comparable with a record."""
    return json.loads(json.dumps(value, sort_keys=True))


def priority(run: BenchRun, grids: Sequence[Grid], seeds: Sequence[int]) -> tuple:
    """The fixed order runs are started in: seed by seed (every cell gets its first seed before any
    gets a second); within a seed, first every ``supervised`` reference (grid order), then the
    TARGET_METHODS at the first grid's smallest labeled count, then every other run in grid,
    labeled and method order."""
    g = grids.index(run.grid)
    labeled = [parse_labeled(v) for v in run.grid.labeled]
    first_count = g == 0 and run.labeled == labeled[0]
    tier = 0 if run.method == "supervised" else (1 if first_count and run.method in TARGET_METHODS else 2)
    method_pos = TARGET_METHODS.index(run.method) if tier == 1 else run.grid.methods.index(run.method)
    return (list(seeds).index(run.seed), tier, g, labeled.index(run.labeled), method_pos)


def only_runs(runs: Sequence[BenchRun], patterns: Sequence[str]) -> list[BenchRun]:
    """The runs whose key (``<group>/<method>-l<labeled>-s<seed>``) matches one of the shell-style
    ``patterns``, in their order; every run when ``patterns`` is empty.

    Raises:
        ValueError: a pattern that matches no planned run (a typo would otherwise train nothing).
    """
    if not patterns:
        return list(runs)
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(r.key, pattern) for r in runs):
            raise ValueError(f"--only {pattern!r} matches no planned run; keys look like {runs[0].key!r}")
    return [r for r in runs if any(fnmatch.fnmatchcase(r.key, p) for p in patterns)]


def plan_runs(grids: Sequence[Grid], seeds: Sequence[int]) -> list[BenchRun]:
    """Every run of ``grids x seeds``, in ``priority`` order.

    Raises:
        ValueError: two grids plan the same record (same group, method, labeled value and seed).
    """
    runs, seen = [], {}
    for grid in grids:
        for labeled in grid.labeled:
            for method in grid.methods:
                for seed in seeds:
                    run = BenchRun(grid, method, parse_labeled(labeled), int(seed))
                    if run.key in seen:
                        raise ValueError(f"two grids plan the record {run.key!r}: {seen[run.key]} and {grid}")
                    seen[run.key] = grid
                    runs.append(run)
    return sorted(runs, key=lambda r: priority(r, grids, seeds))


# ------------------------------------------------------------------------------------------ records
def read_record(records: Path, run: BenchRun) -> dict[str, Any] | None:
    """The ``record.json`` of ``run`` under ``records``, or None when there is none."""
    path = records / run.key / RECORD_META
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); delete that record folder to re-run it") from None
    if meta.get("format") != RECORD_FORMAT:
        raise ValueError(f"{path}: record format {meta.get('format')!r}, expected {RECORD_FORMAT!r}")
    return meta


def protocol_mismatch(meta: Mapping[str, Any], run: BenchRun) -> list[str]:
    """The protocol fields where a record differs from what ``run`` needs (empty: it matches)."""
    want, have = run.protocol(), meta.get("protocol", {})
    return sorted(k for k in want if have.get(k) != want[k])


def write_record(run_dir: Path, records: Path, run: BenchRun, timing: Mapping[str, Any] | None = None) -> Path:
    """Copy a finished run's small result files into ``<records>/<group>/<name>/`` atomically.

    The files (``RECORD_FILES``; never weights) go to a temporary sibling folder with a
    ``record.json`` (run, protocol, timings, sslseg version), which is then renamed into place, so
    a record folder is either complete or absent.

    Raises:
        FileNotFoundError: ``run_dir`` lacks one of the required files (an unfinished run).
        ValueError: a file is larger than MAX_RECORD_FILE_BYTES, the evaluation's protocol is not
            the bench's, or the record already exists.
    """
    from sslseg.app.evaluate import EvaluationResult

    dest = records / run.key
    if dest.exists():
        raise ValueError(f"the record {dest} already exists; delete it to replace it")
    missing = [f for f in _REQUIRED if not (run_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{run_dir} is not a finished run: it lacks {missing}")
    settings = EvaluationResult.load(run_dir / f"evaluation_{SPLIT}.json").settings
    evaluated = {"split": settings.get("split"), "empty_policy": settings.get("empty_policy"),
                 "tta": settings.get("tta"), "units": settings.get("units")}
    expected = {"split": SPLIT, "empty_policy": EMPTY_POLICY, "tta": TTA, "units": UNITS}
    if evaluated != expected:
        raise ValueError(f"{run_dir}: evaluated with {evaluated}, the bench's protocol is {expected}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name in RECORD_FILES:
            src = run_dir / name
            if not src.is_file():
                continue
            size = src.stat().st_size
            if size > MAX_RECORD_FILE_BYTES:
                raise ValueError(f"{src} is {size} bytes: a record keeps small result files only "
                                 f"(at most {MAX_RECORD_FILE_BYTES} bytes each)")
            shutil.copyfile(src, tmp / name)
        meta = {"format": RECORD_FORMAT, "key": run.key, "method": run.method, "data": run.grid.data,
                "variant": run.grid.variant, "labeled": run.labeled, "seed": run.seed, "protocol": run.protocol(),
                "sslseg_version": sslseg.__version__, "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
                **dict(timing or {})}
        (tmp / RECORD_META).write_text(json.dumps(meta, indent=2) + "\n")
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def measured_seconds(records: Path, runs: Sequence[BenchRun]) -> dict[tuple[str, str], tuple[float, float]]:
    """Per (data + variant, method): mean fit seconds per step and mean evaluation seconds of the
    finished records found for ``runs`` (any step count)."""
    found: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for path in records.glob(f"*/*/{RECORD_META}"):
        try:
            meta = json.loads(path.read_text())
        except ValueError:
            continue
        fit, evaluate, steps = meta.get("fit_seconds"), meta.get("evaluate_seconds"), meta.get("protocol", {}).get(
            "iterations")
        if meta.get("format") != RECORD_FORMAT or not fit or not steps:
            continue
        key = (f"{meta.get('data')}|{meta.get('variant', '')}", meta.get("method"))
        found.setdefault(key, []).append((fit / steps, float(evaluate or 0.0)))
    wanted = {(f"{r.grid.data}|{r.grid.variant}", r.method) for r in runs}
    return {k: (sum(a for a, _ in v) / len(v), sum(b for _, b in v) / len(v)) for k, v in found.items() if k in wanted}


def estimate_seconds(run: BenchRun, measured: Mapping[tuple[str, str], tuple[float, float]]) -> float:
    """Wall seconds of ``run`` on one thread: from measured records of the same data and method
    when there are some, else FIT_MINUTES scaled to the run's steps plus RUN_OVERHEAD_S (a method
    the table does not list: the most expensive one of its data kind)."""
    got = measured.get((f"{run.grid.data}|{run.grid.variant}", run.method))
    if got is not None:
        per_step, evaluate = got
        return per_step * run.grid.iterations + evaluate
    table = FIT_MINUTES.get(run.kind, {})
    minutes = table.get(run.cost_key, table.get(run.method, max(table.values(), default=2.5)))
    steps = DEFAULT_STEPS.get(run.kind, run.grid.iterations)
    return RUN_OVERHEAD_S + 60.0 * minutes * COST_FACTOR.get(run.kind, 1.0) * run.grid.iterations / steps


class Queue(NamedTuple):
    """What one invocation does: runs to start (in order), runs already recorded, runs left over."""

    todo: list[BenchRun]
    recorded: list[BenchRun]
    later: list[BenchRun]


def select_runs(runs: Sequence[BenchRun], records: Path, *, budget_s: float | None, jobs: int,
                estimate: Callable[[BenchRun], float]) -> Queue:
    """Split ``runs`` (in priority order) into those to start now, those with a record, and those
    left for a later invocation.

    The runs without a record are given to ``jobs`` workers in order (each to the worker free
    first); a run whose estimated end passes ``budget_s`` stops the queue: it and every later run
    wait for the next invocation. ``budget_s=None``: no limit.

    Raises:
        ValueError: ``jobs`` < 1 or ``budget_s`` <= 0; a record in a planned run's place made under
            another protocol (it would block its cell: delete or move it).
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an int >= 1, got {jobs!r}")
    if budget_s is not None and not budget_s > 0:
        raise ValueError(f"budget must be > 0 minutes, got {budget_s / 60:g}")
    todo, recorded, later = [], [], []
    free = [0.0] * jobs
    stopped = False
    for run in runs:
        meta = read_record(records, run)
        if meta is not None:
            diff = protocol_mismatch(meta, run)
            if diff:
                raise ValueError(f"the record {records / run.key} was made under another protocol (differs in "
                                 f"{diff}); delete or move it to run this cell again")
            recorded.append(run)
            continue
        if stopped:
            later.append(run)
            continue
        worker = min(range(jobs), key=free.__getitem__)
        end = free[worker] + estimate(run)
        if budget_s is not None and end > budget_s:
            stopped = True
            later.append(run)
            continue
        free[worker] = end
        todo.append(run)
    return Queue(todo, recorded, later)


# ---------------------------------------------------------------------------------------- execution
def run_one(run: BenchRun, work: Path, records: Path, *, device: str) -> dict[str, Any]:
    """Train and evaluate one run in its own sweep directory under ``work`` (killed runs resume),
    then write its record. Returns the sweep's run entry (``status``) and the record path."""
    root = work / run.group / run.name
    manifest = sweep(root, methods=[run.method], data=run.grid.data, labeled=[run.labeled_tag], seeds=[run.seed],
                     iterations=run.grid.iterations, options={**run.grid.options, "progress": False}, device=device,
                     jobs=1, threads=1, split=SPLIT, empty_policy=EMPTY_POLICY, tta=TTA,
                     prune_checkpoints=True, verbose=False)  # last.pt is 3x a model: only best_val.pt stays
    entry = next(iter(manifest["runs"].values()))
    if entry["status"] != "finished":
        return {"status": entry["status"], "log": str(root / entry["dir"] / "sweep.log")}
    run_dir = root / entry["dir"]
    timing = json.loads((run_dir / "sweep_run.json").read_text())
    record = write_record(run_dir, records, run, {k: timing.get(k) for k in
                                                  ("fit_seconds", "evaluate_seconds", "fit_cpu_seconds")})
    return {"status": "finished", "record": str(record), "seconds": timing.get("seconds")}


def execute(queue: Queue, work: Path, records: Path, *, device: str, jobs: int, budget_s: float | None,
            estimate: Callable[[BenchRun], float]) -> tuple[list[BenchRun], list[BenchRun], list[BenchRun]]:
    """Run ``queue.todo`` in order, ``jobs`` at a time. Before a run starts, its estimate is checked
    against the time left of the budget again (runs may take longer than estimated): a run that
    no longer fits is left for later. Returns (finished, failed, not started)."""
    t0 = time.perf_counter()
    lock = threading.Lock()
    pending = list(queue.todo)
    finished, failed, not_started = [], [], []

    def worker() -> None:
        while True:
            with lock:
                if not pending:
                    return
                run = pending.pop(0)
                if budget_s is not None and time.perf_counter() - t0 + estimate(run) > budget_s:
                    not_started.append(run)
                    not_started.extend(pending)
                    pending.clear()
                    return
            started = time.perf_counter()
            try:
                result = run_one(run, work, records, device=device)
            except Exception as exc:  # noqa: BLE001 - one broken run must not stop the others
                result = {"status": f"failed ({type(exc).__name__}: {exc})"}
            with lock:
                (finished if result["status"] == "finished" else failed).append(run)
                done = len(finished) + len(failed)
                where = result.get("record") or result.get("log") or ""
                print(f"[{done}/{len(queue.todo)}] {run.key}: {result['status']} in "
                      f"{time.perf_counter() - started:.0f} s (estimated {estimate(run):.0f} s) {where}", flush=True)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(worker) for _ in range(jobs)]
        try:
            for fut in futures:
                fut.result()
        except BaseException:  # Ctrl-C: the running runs end with their processes; start no other
            with lock:
                not_started.extend(pending)
                pending.clear()
            raise
    return finished, failed, not_started


# --------------------------------------------------------------------------------------------- table
def table_manifest(runs: Sequence[BenchRun], records: Path, table_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """An ``sslseg sweep`` manifest (for ``sslseg report``) of every planned run: a run whose record
    matches its protocol points at it; the others point where no evaluation exists and count as
    missing. Returns the manifest and notes on records left out (another protocol)."""
    notes, entries = [], {}
    rel = Path(os.path.relpath(records, table_dir))
    for run in runs:
        meta = read_record(records, run)
        diff = [] if meta is None else protocol_mismatch(meta, run)
        if diff:
            notes.append(f"{run.key}: made under another protocol (differs in {', '.join(diff)})")
        settings = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in sorted(run.grid.options.items())]
        entries[run.key] = {
            "method": run.method, "data": run.table_data, "labeled": run.labeled, "seed": run.seed, "fold": None,
            "dir": str(rel / (f"{run.key}.other-protocol" if diff else run.key)),
            "options": {"iterations": run.grid.iterations, "set": settings, "split": SPLIT,
                        "empty_policy": EMPTY_POLICY, "tta": TTA},
            "status": "finished" if meta is not None and not diff else "pending"}
    manifest = {"format": SWEEP_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "runs": entries,
                "skipped": [], "note": "written by benches/bench_methods.py: the runs are result records (no weights)"}
    return manifest, notes


def fill_command(missing: Sequence[BenchRun], *, smoke: bool, scale: float, jobs: int,
                 estimate: Callable[[BenchRun], float], records_arg: str | None = None) -> tuple[str, float]:
    """The command that runs the missing cells, and their estimated wall minutes with ``jobs``."""
    minutes = sum(estimate(r) for r in missing) / 60 / jobs
    command = ("python benches/bench_methods.py" + (" --smoke" if smoke else "")
               + (f" --scale {scale:g}" if scale != 1 else "") + f" --jobs {jobs}"
               + (f" --records {records_arg}" if records_arg else "")
               + f" --budget-min {max(1, math.ceil(minutes * 1.2))}")
    return command, minutes


def missing_markdown(runs: Sequence[BenchRun], recorded: set[str], command: str, minutes: float) -> list[str]:
    """The cells with missing seeds: Dice ``—`` when no seed of the cell is recorded (the cell is
    absent from the table above), ``partial`` otherwise; the count of missing seeds; then the
    command that fills them. ``recorded``: keys of the runs whose record matches."""
    cells: dict[tuple[str, str, str], list[tuple[int, bool]]] = {}
    for run in runs:
        cells.setdefault((run.table_data, run.labeled_tag, run.method), []).append((run.seed, run.key in recorded))
    rows = []
    for (data, labeled, method), seeds in cells.items():
        absent = [s for s, done in seeds if not done]
        if absent:
            dice = "—" if len(absent) == len(seeds) else "partial"
            rows.append(f"| {data} | {labeled} | {method} | {dice} | {len(absent)} of {len(seeds)} "
                        f"(seed{'s' if len(absent) > 1 else ''} {', '.join(map(str, absent))}) |")
    if not rows:
        return ["", f"Every planned cell has its records ({len(runs)} runs)."]
    n_missing = sum(1 for r in runs if r.key not in recorded)
    return ["", f"Missing cells: {n_missing} of {len(runs)} planned runs have no record yet (Dice `—`: no seed "
                "recorded, the cell is absent from the table above; `partial`: its row above has fewer seeds).", "",
            "| data | labeled | method | Dice | seeds missing |", "|---|---|---|---|---|", *rows, "",
            f"Fill them, in priority order (about {minutes:.0f} min of wall time in all): `{command}`. "
            "A smaller `--budget-min` runs the first ones; the next invocation continues."]


def _schedule_text(grids: Sequence[Grid], seeds: Sequence[int], jobs: int) -> list[str]:
    lines = []
    for g in grids:
        opts = ", ".join(f"{k}={v}" for k, v in g.options.items())
        data = f"`{g.data}`" + (f" [{g.variant}]" if g.variant else "")
        lines.append(f"- {data}, labeled {', '.join(str(v) for v in g.labeled)}: {', '.join(g.methods)}; "
                     f"{g.iterations} steps; {opts}")
    lines.append(f"- seeds {', '.join(map(str, seeds))}; {jobs} run(s) at a time, one thread each")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="2D supervised/mean_teacher and the 3D V-Net pair, 1 seed, a few steps, tiny data (CI)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    parser.add_argument("--device", default="cpu", help="device of every run (default cpu)")
    parser.add_argument("--out", default=None,
                        help="working folder of the runs, weights included (default runs/bench_methods; --smoke: "
                             "benches/results/methods_smoke/work; keep it out of git)")
    parser.add_argument("--records", default=None,
                        help="folder of the result records the table is built from (default benches/results/methods; "
                             "with --smoke or --out: <out>/records)")
    parser.add_argument("--budget-min", type=float, default=None, metavar="M",
                        help="start only the runs whose estimated end fits in M minutes of wall time, in priority "
                             "order (default: every run without a record)")
    parser.add_argument("--report-only", action="store_true", help="build the table from the records; train nothing")
    parser.add_argument("--only", action="append", default=[], metavar="PATTERN",
                        help="train only the runs whose key matches this shell pattern (repeatable), in priority "
                             "order, e.g. 'acdc-*/*-l3-*' for every seed of the 3-labeled ACDC cells; the table "
                             "still shows every planned run")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the step counts (and the time) by this factor (default 1: the table of "
                             "docs/benchmark.md)")
    args = parser.parse_args(argv)
    if not args.scale > 0:
        parser.error(f"--scale must be > 0, got {args.scale:g}")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.budget_min is not None and not args.budget_min > 0:
        parser.error(f"--budget-min must be > 0 minutes, got {args.budget_min:g}")

    name = "methods_smoke" if args.smoke else ("methods" if args.scale == 1 else f"methods_x{args.scale:g}")
    grids, seeds = (smoke_grids(), (0,)) if args.smoke else (full_grids(args.scale), SEEDS)
    work = Path(args.out) if args.out else (RESULTS / name / "work" if args.smoke else WORK)
    records = Path(args.records) if args.records else (work / "records" if args.smoke or args.out else RECORDS)
    table_dir = records / ("table" if args.scale == 1 else f"table_x{args.scale:g}")
    out_dir = RESULTS if args.out is None or work.resolve().is_relative_to(RESULTS) else work.parent
    if args.smoke and args.out is None and not args.report_only:
        # CI's check of the whole path: its default folder starts empty, so that every run trains.
        shutil.rmtree(work, ignore_errors=True)
    runs = plan_runs(grids, seeds)
    measured = measured_seconds(records, runs)

    def estimate(run: BenchRun) -> float:
        return estimate_seconds(run, measured)

    t0 = time.perf_counter()
    failed: list[BenchRun] = []
    if not args.report_only:
        budget_s = None if args.budget_min is None else 60.0 * args.budget_min
        try:
            chosen = only_runs(runs, args.only)
        except ValueError as exc:
            parser.error(str(exc))
        queue = select_runs(chosen, records, budget_s=budget_s, jobs=args.jobs, estimate=estimate)
        only = f" ({len(chosen)} chosen by --only)" if args.only else ""
        print(f"{len(runs)} runs planned{only}: {len(queue.recorded)} recorded in {records}, {len(queue.todo)} to run "
              f"now (estimated {sum(map(estimate, queue.todo)) / 60 / args.jobs:.1f} min with --jobs {args.jobs})"
              + (f", {len(queue.later)} left for later (budget {args.budget_min:g} min)" if queue.later else ""),
              flush=True)
        if queue.todo:
            _, failed, _ = execute(queue, work, records, device=args.device, jobs=args.jobs, budget_s=budget_s,
                                   estimate=estimate)
    seconds = time.perf_counter() - t0

    manifest, notes = table_manifest(runs, records, table_dir)
    recorded = {r.key for r in runs if manifest["runs"][r.key]["status"] == "finished"}
    missing = [r for r in runs if r.key not in recorded]
    records_arg = args.records or (str(records) if args.out else None)
    command, minutes = fill_command(missing, smoke=args.smoke, scale=args.scale, jobs=args.jobs, estimate=estimate,
                                    records_arg=records_arg)
    meta = metadata(args.device)
    lines = [f"## Benchmark table{' (smoke test)' if args.smoke else ''}", ""]
    if not recorded:
        lines += [f"No run has a record in `{records}` yet: nothing to tabulate.",
                  *missing_markdown(runs, recorded, command, minutes), ""]
        out_md = _write_text(out_dir / f"{name}.md", "\n".join(lines))
        print("\n".join(lines))
        print(f"wrote {out_md}")
        return 1 if failed else 0
    write_json(table_dir / MANIFEST, manifest)
    result = report(table_dir, overlays=False, device=args.device, verbose=False)
    regenerate = "python benches/bench_methods.py" + (" --smoke" if args.smoke else "") + (
        f" --scale {args.scale:g}" if args.scale != 1 else "") + (f" --records {records_arg}" if records_arg else "") \
        + " --report-only"
    train_min = sum(r["train_seconds"] for r in result.runs if not math.isnan(r["train_seconds"])) / 60
    plots = []  # the record folders' plots are copied next to the table that docs/benchmark.md shows
    for plot in (p for p in result.files if p.suffix == ".png"):
        plots.append(f"{name}_{plot.name}")
        shutil.copyfile(plot, out_dir / plots[-1])
    lines += [
        f"Built from {len(recorded)} result records of {len(runs)} planned runs in `{_shown(records)}` by "
        f"`{regenerate}` (sslseg {sslseg.__version__}, commit {meta['commit'] or '?'}, {meta['date']}; "
        f"{meta['machine']}, {meta['cpu_count']} cores, device {args.device}). Training time of the recorded runs "
        f"{train_min:.1f} min" + ("" if args.report_only else f"; wall time of this invocation {seconds / 60:.1f} min")
        + "." + ("" if args.smoke or args.scale != 1 else f" Planned for the whole table: {ESTIMATE}."),
        "",
        "Schedule:",
        *_schedule_text(grids, seeds, args.jobs),
        "",
        "Each data set is one table, with `supervised` at the same labeled count as its reference. The "
        "`[vnet]` group compares DTC, which trains its own V-Net with a signed-distance head (`vnet_sdf`) and "
        "its own consistency ramp (over the whole run), with `supervised` on the same V-Net without that head "
        "(`model=vnet`) at the same labeled count; the other 3D rows use the half-width 3D U-Net.",
        "",
        result.markdown.rstrip(),
        *missing_markdown(runs, recorded, command, minutes),
        *(["", "Records left out: " + "; ".join(notes) + "."] if notes else []),
        "",
        *[f"![{p}]({p})" for p in plots],
        "",
    ]
    out_md = _write_text(out_dir / f"{name}.md", "\n".join(lines))
    # JSON has no NaN (the supervised rows' delta, metrics of an all-NaN group): null instead.
    rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items() if k != "runs"}
            for r in result.rows]
    write_json(out_md.with_suffix(".json"), {"meta": meta, "seconds": seconds, "rows": rows,
                                             "missing": [r.key for r in missing], "fill_command": command})
    print("\n".join(lines))
    print(f"wrote {out_md} and {out_md.with_suffix('.json')}")
    if failed:
        print(f"{len(failed)} run(s) failed: {[r.key for r in failed]}; their logs are under {work}")
    return 1 if failed else 0


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
