"""Bench: the benchmark table. Every method on synthetic ACDC (3 and 7 labeled patients) and on
synthetic LA (8 labeled cases), with ``supervised`` as the lower bound and ``supervised`` on every
training case as the upper bound, 3 seeds, one protocol; run through ``sslseg.sweep`` and
``sslseg.report``.

Protocol (identical for every run):
    * split by case (patient): the synthetic datasets' own train/validation/test lists (LA has
      none for validation: 10% of its training cases are held out, the same for every run); the
      labeled cases are drawn at random from the training cases with the run's seed (0, 1, 2);
    * checkpoint selected on the validation split only (``best_val``, mean foreground Dice);
    * scored on the test split per volume and foreground class: Dice, HD95 and ASD in mm (the
      phantoms' voxel spacing), empty-mask policy ``penalty`` (one side empty: Dice 0 and the image
      diagonal as distance; both empty: Dice 1, distance 0); no test-time augmentation;
    * each cell of the table: mean ± sample std over the 3 seeds.

Schedule, sized for this 2-core CPU machine: about 60-65 minutes for the whole table (135 runs)
with ``--jobs 2`` when nothing else runs, each run on one thread (see ESTIMATE below):
    * ACDC: ``synthetic:acdc?cases=30&size=64&slices=6`` (21 training patients, 3 validation,
      6 test; two frames per patient; 64x64 pixels of 1.5 mm, 6 slices of 10 mm). Slices are
      resized to the 32x32 training patch (SSL4MIS resizes ACDC slices to its patch too) and
      predictions back to 64x64, where they are scored. The methods' default 2D networks (U-Net
      16-32-64-128-256; CTCT's second branch is a Swin-UNet, which needs a multiple of 32), batch 8
      (4 labeled + 4 unlabeled; ``supervised`` trains on 8 labeled slices, as SSL4MIS's supervised
      script), ACDC_STEPS steps of SGD (lr 0.01, poly decay), validation every VAL_EVERY steps.
    * LA: ``synthetic:la?cases=30&size=40`` (24 training cases, of which 2 are held out for
      validation; 6 test; 40^3 voxels of 1 mm). 3D U-Net at half width (channels 8-16-32-64-128:
      full width costs twice as much per step on a CPU) for every method but DTC, which keeps its
      own V-Net with a signed-distance head (16 filters, as in its paper); random 32^3 patches,
      batch 4 (2 + 2), LA_STEPS steps, validation every VAL_EVERY steps; Gaussian sliding window
      (overlap 0.5) for validation and test.
    * Every other option is the method's and the engine's default (SSL4MIS's hyper-parameters;
      consistency weights ramp up over the whole run).
    * ``--scale F`` multiplies both step counts (and the time) by F, for a longer, closer to
      converged table when more time is available; the default (1) is the table of docs/benchmark.md.

These schedules are short and the runs are far from converged (single-run probes with this setup
reached test Dice 0.37 on ACDC after 75 steps and 0.62 on LA after 50 steps), so the table shows
early training, where consistency terms that ramp up over the run have had little time to act. The phantoms and
numbers are not comparable with published ACDC/LA results.

Outputs: ``benches/results/methods/`` (the sweep: one run directory per cell, ``sweep.json``,
``report.md``, ``report.csv``, ``dice_vs_labeled.png``, ``overlays_*.png``), and
``benches/results/methods.md`` + ``methods.json`` + ``methods_dice_vs_labeled.png`` (the table
and plot of docs/benchmark.md with this protocol, the schedule and the command). Re-running continues an
interrupted table (finished runs are skipped, killed runs resume); ``--report-only`` rebuilds the
table from what has finished.

Usage: python benches/bench_methods.py [--smoke] [--jobs N] [--scale F] [--device cpu|cuda] [--out DIR]
                                     [--report-only]
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import metadata, write_json  # noqa: E402

import sslseg  # noqa: E402
from sslseg.methods import list_methods  # noqa: E402
from sslseg.app.report import report  # noqa: E402
from sslseg.app.sweep import sweep  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ACDC = "synthetic:acdc?cases=30&size=64&slices=6"
LA = "synthetic:la?cases=30&size=40"
ACDC_STEPS, LA_STEPS, VAL_EVERY = 200, 75, 25
SEEDS = (0, 1, 2)
# Single-thread CPU time measured on this machine (sweep_run.json's CPU seconds, differences of
# 25- and 75/50-step runs, validation included): ACDC 0.07 (supervised), 0.10 (mean_teacher),
# 0.40 (ctct) s/step and ~12 s per run for process starts, data generation and the test
# evaluation; LA 0.65 (supervised), 0.73 (mean_teacher), 1.53 (uamt) s/step and ~12 s per run.
# Other methods scaled by their measured cost relative to mean_teacher: ACDC ~13.4 s and LA
# ~39 s per step of the whole grid, i.e. 93 x 12 + 200 x 13.4 + 42 x 12 + 75 x 39 = ~7200 CPU-s.
ESTIMATE = "about 120 CPU-minutes, i.e. about 60-65 minutes with --jobs 2 on 2 idle cores"


class Grid(NamedTuple):
    """One ``sslseg.sweep`` call: its data, labeled values, methods, steps and fixed options."""

    data: str
    labeled: list[Any]
    methods: list[str]
    iterations: int
    options: dict[str, Any]


def full_grids(scale: float = 1.0) -> list[Grid]:
    acdc = {"batch_size": 8, "labeled_bs": 4, "patch_size": [32, 32], "val_every": VAL_EVERY, "log_every": 25}
    la = {"batch_size": 4, "labeled_bs": 2, "patch_size": [32, 32, 32], "val_every": VAL_EVERY, "log_every": 25}
    half_width = {"model_options": {"channels": [8, 16, 32, 64, 128]}}
    la_methods = [m for m in list_methods(3) if m != "dtc"]
    acdc_steps, la_steps = max(1, round(ACDC_STEPS * scale)), max(1, round(LA_STEPS * scale))
    return [
        Grid(ACDC, [3, 7], list_methods(2), acdc_steps, acdc),
        Grid(ACDC, ["all"], ["supervised"], acdc_steps, acdc),
        Grid(LA, [8], la_methods, la_steps, {**la, **half_width}),
        Grid(LA, [8], ["dtc"], la_steps, la),  # its own V-Net (signed-distance head)
        Grid(LA, ["all"], ["supervised"], la_steps, {**la, **half_width}),
    ]


def smoke_grids() -> list[Grid]:
    """2 methods, 1 seed, 4 steps, tiny phantoms: the same path end to end, < 60 s on one core."""
    acdc = {"batch_size": 4, "labeled_bs": 2, "patch_size": [32, 32], "val_every": 2, "log_every": 2}
    la = {"batch_size": 2, "labeled_bs": 1, "patch_size": [32, 32, 32], "val_every": 2, "log_every": 2,
          "model_options": {"channels": [8, 16, 32, 64, 128]}}
    tiny = "synthetic:acdc?cases=6&slices=2&size=32"
    return [
        Grid(tiny, [2], ["supervised", "mean_teacher"], 4, acdc),
        Grid(tiny, ["all"], ["supervised"], 4, acdc),
        Grid("synthetic:la?cases=4&size=32", [1], ["supervised"], 2, la),
    ]


def _schedule_text(grids: list[Grid], seeds: tuple[int, ...], jobs: int) -> list[str]:
    lines = []
    for g in grids:
        opts = ", ".join(f"{k}={v}" for k, v in g.options.items())
        lines.append(f"- `{g.data}`, labeled {', '.join(str(v) for v in g.labeled)}: {', '.join(g.methods)}; "
                     f"{g.iterations} steps; {opts}")
    lines.append(f"- seeds {', '.join(map(str, seeds))}; {jobs} run(s) at a time, one thread each")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="2 methods, 1 seed, 4 steps, tiny data (CI)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    parser.add_argument("--device", default="cpu", help="device of every run (default cpu)")
    parser.add_argument("--out", default=None, help="sweep directory (default benches/results/methods[_smoke])")
    parser.add_argument("--report-only", action="store_true", help="aggregate what has finished; train nothing")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the step counts (and the time) by this factor (default 1: the table of docs/benchmark.md)")
    args = parser.parse_args()
    if args.scale <= 0:
        parser.error(f"--scale must be > 0, got {args.scale}")

    name = "methods_smoke" if args.smoke else ("methods" if args.scale == 1 else f"methods_x{args.scale:g}")
    grids, seeds = (smoke_grids(), (0,)) if args.smoke else (full_grids(args.scale), SEEDS)
    root = Path(args.out) if args.out else RESULTS / name
    t0 = time.perf_counter()
    if not args.report_only:
        for g in grids:
            sweep(root, methods=g.methods, data=g.data, labeled=g.labeled, seeds=seeds, iterations=g.iterations,
                  options={**g.options, "progress": False}, device=args.device, jobs=args.jobs, threads=1,
                  prune_checkpoints=True)  # last.pt is 3x a model; 135 of them would take gigabytes
    seconds = time.perf_counter() - t0
    result = report(root, device=args.device)
    command = ("python benches/bench_methods.py" + (" --smoke" if args.smoke else "")
               + (f" --jobs {args.jobs}" if args.jobs != 2 else "")
               + (f" --scale {args.scale:g}" if args.scale != 1 else ""))
    meta = metadata(args.device)
    train_min = sum(r["train_seconds"] for r in result.runs) / 60
    out_dir = RESULTS if root.resolve().is_relative_to(RESULTS) else root.parent
    # The sweep directory stays out of git; the plot docs/benchmark.md shows is copied next to the table.
    sweep_plot = next((p for p in result.files if p.name == "dice_vs_labeled.png"), None)
    plot = None
    if sweep_plot is not None:
        plot = f"{name}_dice_vs_labeled.png"
        shutil.copyfile(sweep_plot, out_dir / plot)
    for forest in (p for p in result.files if p.name.startswith("forest_") and p.suffix == ".png"):
        shutil.copyfile(forest, out_dir / f"{name}_{forest.name}")
    lines = [
        f"## Benchmark table{' (smoke test)' if args.smoke else ''}",
        "",
        f"Regenerate with `{command}` (sslseg {sslseg.__version__}, commit {meta['commit'] or '?'}, {meta['date']}; "
        f"{meta['machine']}, {meta['cpu_count']} cores, device {args.device}). "
        f"{len(result.runs)} runs evaluated, {len(result.missing)} missing; training time of all runs "
        f"{train_min:.1f} min" + (f", wall time of this invocation {seconds / 60:.1f} min." if not args.report_only
                                  else ".") + ("" if args.smoke or args.scale != 1 else f" Planned: {ESTIMATE}."),
        "",
        "Schedule:",
        *_schedule_text(grids, seeds, args.jobs),
        "",
        result.markdown.rstrip(),
        "",
        *([f"![Test Dice against labeled cases]({plot})", ""] if plot is not None else []),
    ]
    out_md = out_dir / f"{name}.md"
    out_md.write_text("\n".join(lines))
    # JSON has no NaN (the supervised rows' delta, metrics of an all-NaN group): null instead.
    rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items() if k != "runs"}
            for r in result.rows]
    write_json(out_md.with_suffix(".json"), {"meta": meta, "seconds": seconds, "rows": rows,
                                             "missing": result.missing})
    print("\n".join(lines))
    print(f"wrote {out_md} and {out_md.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
