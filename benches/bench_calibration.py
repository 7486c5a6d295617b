"""Bench: calibrate the benchmark task before spending compute (issue 17, item 1).

For each candidate setting (data spec x steps x batch/patch), ``supervised`` is trained twice with
the same seed and schedule, once with 3 labeled training cases (patients) and once with every
training case labeled, and both are scored on the test split (checkpoint ``best_val``, per volume
mean over the foreground classes, empty-mask policy ``penalty``, no TTA: the protocol of
benches/bench_methods.py). A setting is a usable benchmark task when

    * the gap Dice(all labeled) - Dice(3 labeled) is at least ``TARGET_GAP`` (0.10): there is
      something for a semi-supervised method to recover, and
    * Dice(3 labeled) is clearly above chance: at least ``CHANCE_MARGIN`` above the Dice of the
      trivial predictor that labels every pixel with the class (``chance_dice``, mean over the
      test volumes and foreground classes), so that the 3-labeled run learned something.

Every run is one thread (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``), one at a time, in
this process. Results accumulate: after each finished run the JSON is rewritten (atomically) and a
later invocation skips the runs it already holds under the same protocol, so candidates can be
added and run in several invocations (``--only`` picks candidates by name, ``--seeds`` the seeds).

Outputs: ``benches/results/calibration.json`` (every run: setting, labeled, seed, test Dice,
per-class Dice, fit and evaluation seconds) and ``benches/results/calibration.md`` (the table:
setting, steps, Dice@3, Dice@all, gap, minutes, verdict), both written atomically; the table is
also printed. The run directories (weights included) go to ``runs/bench_calibration/`` (ignored by
git). ``--smoke`` (tiny phantom, 2 steps, well under a minute) writes
``benches/results/calibration_smoke.json`` (ignored by git) and its markdown to
``<tmp>/sslseg_bench_calibration/calibration_smoke.md``, and its runs to a temporary folder.

Usage: python benches/bench_calibration.py [--smoke] [--only NAME ...] [--seeds 0 1] [--list]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Mapping, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, NamedTuple  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import metadata, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WORK = Path(__file__).resolve().parents[1] / "runs" / "bench_calibration"
SMOKE_MD = Path(tempfile.gettempdir()) / "sslseg_bench_calibration" / "calibration_smoke.md"
TARGET_GAP = 0.10
CHANCE_MARGIN = 0.15
FEW = 3  # the few-labels end of the gap: 3 labeled training cases (ACDC's 5%)
SPLIT, EMPTY_POLICY, TTA = "test", "penalty", False
FORMAT = "sslseg-bench-calibration/1"


class Candidate(NamedTuple):
    """One setting: a name (``--only``), the data spec, the step count and fixed engine options."""

    name: str
    data: str
    iterations: int
    options: dict[str, Any]

    def protocol(self) -> dict[str, Any]:
        """What a stored run must match to be reused for this candidate."""
        return json.loads(json.dumps({"data": self.data, "iterations": self.iterations, "options": self.options,
                                      "split": SPLIT, "empty_policy": EMPTY_POLICY, "tta": TTA}, sort_keys=True))


def _acdc(batch: int, patch: int, steps: int) -> dict[str, Any]:
    return {"batch_size": batch, "labeled_bs": batch // 2, "patch_size": [patch, patch],
            "val_every": max(1, steps // 8), "log_every": max(1, steps // 8)}


# Ordered cheapest first. ``p32``: slices resized to a 32x32 patch (bench_methods' protocol,
# predictions resized back to the image size where they are scored); ``p64``: trained at the
# image's own resolution.
CANDIDATES = [
    Candidate("acdc64-s6-p32-i200", "synthetic:acdc?cases=30&size=64&slices=6", 200, _acdc(8, 32, 200)),
    Candidate("acdc64-s6-p32-i600", "synthetic:acdc?cases=30&size=64&slices=6", 600, _acdc(8, 32, 600)),
    Candidate("acdc64-s2-p32-i400", "synthetic:acdc?cases=30&size=64&slices=2", 400, _acdc(8, 32, 400)),
    Candidate("acdc64-c60-s6-p32-i400", "synthetic:acdc?cases=60&size=64&slices=6", 400, _acdc(8, 32, 400)),
    Candidate("acdc64-s6-p64-i400", "synthetic:acdc?cases=30&size=64&slices=6", 400, _acdc(8, 64, 400)),
    Candidate("acdc64-s6-p64-i800", "synthetic:acdc?cases=30&size=64&slices=6", 800, _acdc(8, 64, 800)),
    Candidate("acdc64-s2-p64-i400", "synthetic:acdc?cases=30&size=64&slices=2", 400, _acdc(8, 64, 400)),
    Candidate("acdc64-c60-s2-p64-i400", "synthetic:acdc?cases=60&size=64&slices=2", 400, _acdc(8, 64, 400)),
    Candidate("acdc80-s2-p80-i400", "synthetic:acdc?cases=30&size=80&slices=2", 400, _acdc(8, 80, 400)),
    Candidate("acdc80-s6-p80-i400", "synthetic:acdc?cases=30&size=80&slices=6", 400, _acdc(8, 80, 400)),
    Candidate("acdc80-s2-p80-i800", "synthetic:acdc?cases=30&size=80&slices=2", 800, _acdc(8, 80, 800)),
    Candidate("acdc64-s1-p32-i600", "synthetic:acdc?cases=30&size=64&slices=1", 600, _acdc(8, 32, 600)),
    Candidate("acdc64-s2-p32-i1200", "synthetic:acdc?cases=30&size=64&slices=2", 1200, _acdc(8, 32, 1200)),
    Candidate("acdc64-s3-p32-i1200", "synthetic:acdc?cases=30&size=64&slices=3", 1200, _acdc(8, 32, 1200)),
    Candidate("la32-i150", "synthetic:la?cases=30&size=32", 150,
              {"batch_size": 4, "labeled_bs": 2, "patch_size": [32, 32, 32], "val_every": 50, "log_every": 50,
               "model_options": {"channels": [8, 16, 32, 64, 128]}}),
]
SMOKE = [Candidate("smoke-acdc32", "synthetic:acdc?cases=6&size=32&slices=2", 2,
                   {"batch_size": 4, "labeled_bs": 2, "patch_size": [32, 32], "val_every": 2, "log_every": 2})]


# ------------------------------------------------------------------------------- pure functions
def chance_dice(label: np.ndarray, num_classes: int) -> float:
    """Mean over the foreground classes of the Dice of the trivial predictor that labels every
    voxel with that class: ``2|G| / (|G| + N)``; a class absent from ``label`` scores 0 (the
    penalty policy: predicted everywhere, absent in the ground truth)."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    label = np.asarray(label)
    n = label.size
    if n == 0:
        raise ValueError("empty label")
    scores = [2.0 * float((label == c).sum()) / (float((label == c).sum()) + n) for c in range(1, num_classes)]
    return float(np.mean(scores))


def summarize(runs: Sequence[Mapping[str, Any]], candidates: Sequence[Candidate],
              *, target_gap: float = TARGET_GAP, chance_margin: float = CHANCE_MARGIN) -> list[dict[str, Any]]:
    """One row per candidate that has both a few-labeled and an all-labeled run of some seed.

    Dice@3 and Dice@all are means over the seeds that have both runs (paired); the gap is their
    difference; ``minutes`` the wall time of the pair(s), fit and evaluation. ``meets``: gap >=
    ``target_gap`` and Dice@3 >= chance + ``chance_margin``.
    """
    rows = []
    for cand in candidates:
        mine = [r for r in runs if r.get("candidate") == cand.name and r.get("protocol") == cand.protocol()]
        by_seed: dict[int, dict[str, Mapping[str, Any]]] = {}
        for r in mine:
            by_seed.setdefault(int(r["seed"]), {})[str(r["labeled"])] = r
        paired = {s: v for s, v in sorted(by_seed.items()) if str(FEW) in v and "all" in v}
        if not paired:
            continue
        few = [v[str(FEW)]["dice"] for v in paired.values()]
        full = [v["all"]["dice"] for v in paired.values()]
        chance = float(np.mean([v["all"].get("chance_dice", float("nan")) for v in paired.values()]))
        seconds = sum(v[k]["fit_seconds"] + v[k]["evaluate_seconds"] for v in paired.values() for k in (str(FEW), "all"))
        gaps = [b - a for a, b in zip(few, full)]
        d3, dall = float(np.mean(few)), float(np.mean(full))
        gap = dall - d3
        rows.append({"candidate": cand.name, "data": cand.data, "iterations": cand.iterations,
                     "batch": cand.options.get("batch_size"), "patch": cand.options.get("patch_size"),
                     "seeds": sorted(paired), "dice_few": d3, "dice_all": dall, "gap": gap,
                     "gap_min": float(min(gaps)), "gap_max": float(max(gaps)),
                     "dice_few_seeds": few, "dice_all_seeds": full, "chance": chance, "minutes": seconds / 60,
                     "meets": bool(gap >= target_gap and d3 >= chance + chance_margin)})
    return rows


def markdown(rows: Sequence[Mapping[str, Any]], *, target_gap: float = TARGET_GAP,
             chance_margin: float = CHANCE_MARGIN) -> str:
    """The calibration table (one row per candidate) with its legend."""
    lines = ["| setting | data | steps | batch / patch | seeds | Dice@3 | Dice@all | gap | chance | minutes | meets |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        patch = "x".join(str(p) for p in r["patch"]) if r.get("patch") else "default"
        gap = f"{r['gap']:+.3f}"
        if len(r["seeds"]) > 1:
            gap += f" ({r['gap_min']:+.3f}..{r['gap_max']:+.3f})"
        lines.append(f"| {r['candidate']} | `{r['data']}` | {r['iterations']} | {r['batch']} / {patch} | "
                     f"{','.join(map(str, r['seeds']))} | {r['dice_few']:.3f} | {r['dice_all']:.3f} | {gap} | "
                     f"{r['chance']:.3f} | {r['minutes']:.1f} | {'yes' if r['meets'] else 'no'} |")
    legend = (f"`supervised`, labeled {FEW} training cases vs all; test Dice (checkpoint best_val, mean over "
              "foreground classes per volume, then over volumes; empty policy penalty; no TTA); with several "
              "seeds, means over the seeds and the range of the per-seed gap. chance: Dice of labelling every "
              f"pixel with the class. meets: gap >= {target_gap:.2f} and Dice@3 >= chance + {chance_margin:.2f}. "
              "minutes: wall time of the runs (fit + evaluation), one thread.")
    return "\n".join(lines + ["", legend]) + "\n"


# ---------------------------------------------------------------------------------------- runs
def _labeled(labeled: Any) -> int | None:
    """``"all"`` -> None (every training case labeled; 1.0 would mean one case); a count stays an int."""
    return None if labeled == "all" else int(labeled)


def split_chance(data: str, seed: int, labeled: Any) -> float:
    """``chance_dice`` averaged over the test volumes of the run's split."""
    import sslseg.data

    ds = sslseg.data.load(data)
    split = ds.split(labeled=_labeled(labeled), seed=seed)
    scores = []
    for case in split.test_cases:
        for vid in ds.volumes_of(case):
            lab = ds.read_volume(vid).label
            scores.append(chance_dice(np.asarray(lab), ds.num_classes))
    return float(np.mean(scores))


def run_one(cand: Candidate, labeled: Any, seed: int, work: Path, device: str) -> dict[str, Any]:
    """Train ``supervised`` and score it on the test split; the run's record for the JSON."""
    import sslseg

    out = work / cand.name / f"supervised-l{labeled}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    # ``labeled`` goes through engine_options: there None is "every training case" (as
    # ``--set labeled=null``), whereas fit(labeled=None) keeps the default count.
    run = sslseg.fit("supervised", cand.data, iterations=cand.iterations, seed=seed, out_dir=out, device=device,
                     engine_options={**cand.options, "labeled": _labeled(labeled), "progress": False, "quiet": True,
                                     "tensorboard": False})
    fit_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    res = sslseg.evaluate(run, split=SPLIT, empty_policy=EMPTY_POLICY, tta=TTA, metrics=("dice",))
    eval_s = time.perf_counter() - t1
    per_class = {c: v["dice"]["mean"] for c, v in res.summary["per_class"].items()}
    return {"candidate": cand.name, "labeled": str(labeled), "seed": seed, "protocol": cand.protocol(),
            "dice": float(res.summary["overall"]["dice"]["mean"]), "dice_per_class": per_class,
            "dice_std_volumes": float(res.summary["overall"]["dice"]["std"]),
            "best_val": run.metrics.get("best_val"), "chance_dice": split_chance(cand.data, seed, labeled),
            "fit_seconds": fit_s, "evaluate_seconds": eval_s, "dir": str(out)}


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny phantom, 2 steps (< 1 min); *_smoke outputs")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME", help="candidates to run (default all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds (default 0)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--list", action="store_true", help="list the candidates and exit")
    parser.add_argument("--report-only", action="store_true", help="rebuild the table from the JSON; train nothing")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    candidates = SMOKE if args.smoke else CANDIDATES
    if args.list:
        for c in candidates:
            print(f"{c.name}: {c.data}, {c.iterations} steps, {c.options}")
        return 0
    names = {c.name for c in candidates}
    if args.only:
        unknown = sorted(set(args.only) - names)
        if unknown:
            parser.error(f"unknown candidates {unknown}; --list shows them")
    chosen = [c for c in candidates if not args.only or c.name in args.only]
    out_json = RESULTS / ("calibration_smoke.json" if args.smoke else "calibration.json")
    out_md = SMOKE_MD if args.smoke else RESULTS / "calibration.md"
    tmp_work = Path(tempfile.mkdtemp(prefix="sslseg_bench_calibration_")) if args.smoke else None
    work = tmp_work or WORK

    stored: list[dict[str, Any]] = []
    if out_json.is_file() and not args.smoke:
        stored = json.loads(out_json.read_text()).get("runs", [])

    def save() -> None:
        rows = summarize(stored, candidates)
        write_json(out_json, {"format": FORMAT, "meta": metadata(args.device), "target_gap": TARGET_GAP,
                              "chance_margin": CHANCE_MARGIN, "few": FEW, "rows": rows, "runs": stored})
        _write_text(out_md, "## Calibration: supervised, 3 labeled vs all labeled\n\n" + markdown(rows))

    try:
        if not args.report_only:
            for cand in chosen:
                for seed in args.seeds:
                    for labeled in (FEW, "all"):
                        if any(r["candidate"] == cand.name and r["labeled"] == str(labeled) and r["seed"] == seed
                               and r["protocol"] == cand.protocol() for r in stored):
                            continue
                        rec = run_one(cand, labeled, seed, work, args.device)
                        stored[:] = [r for r in stored if not (r["candidate"] == cand.name and r["seed"] == seed
                                                               and r["labeled"] == str(labeled))] + [rec]
                        print(f"{time.strftime('%H:%M:%S')} {cand.name} labeled={labeled} seed={seed}: "
                              f"Dice {rec['dice']:.3f} (chance {rec['chance_dice']:.3f}) in "
                              f"{(rec['fit_seconds'] + rec['evaluate_seconds']) / 60:.2f} min", flush=True)
                        save()
        save()
    finally:
        if tmp_work is not None:
            shutil.rmtree(tmp_work, ignore_errors=True)
    print(markdown(summarize(stored, candidates)))
    print(f"wrote {out_json} and {out_md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
