"""``sslseg report SWEEP_DIR``: a sweep's runs aggregated into tables and plots.

Every finished run of a sweep (see :mod:`sslseg.app.sweep`) holds ``evaluation_<split>.json``. For each
run the overall test means are taken (each volume's mean over its foreground classes, averaged over
the volumes; see :mod:`sslseg.app.evaluate`), then the runs of one (data, labeled, method) cell are
aggregated over seeds and folds: mean and sample standard deviation (``ddof=1``; 0 when there is a
single run). ``supervised`` at a labeled count is the lower bound of its group, ``supervised`` on
every training case (``labeled="all"``) the upper bound, and each method's Dice is compared with
the lower bound of its group.

Paired statistics (``paired_vs``, default ``supervised``): every other method is compared with the
reference method of its (data, labeled) group case by case. A run's score of a test case is the mean
over the case's volumes of each volume's mean Dice over its foreground classes; the pairs are
(test case, seed, fold) that both methods scored. The mean paired difference gets a 95% percentile
bootstrap interval (:func:`sslseg.metrics.statistics.paired_bootstrap`: 10000 resamples of the
pairs, or of whole test cases with ``bootstrap_by="case"``, seeded) and a verdict, ``better`` or
``worse`` only when the interval excludes 0, ``n.s.`` otherwise. Pairs that one side lacks (an
unfinished run, a case without a score under the ``"nan"`` empty policy) are left out and listed.

Outputs (in the sweep directory unless ``out`` is given): ``report.md``, ``report.csv``,
``forest_<data>_<labeled>.png`` (one per group with a comparison: each method's paired difference
and interval, sorted, a zero line and the all-labeled gap of the reference dashed),
``dice_vs_labeled.png`` (Dice against the number of labeled cases, one line per method, error bars
= std; only for data swept at two or more labeled counts) and ``overlays_<data>.png`` (one test
case's slice: image, ground truth and each method's prediction). The plots need matplotlib
(``pip install sslseg[plot]``); without it they are skipped with a note.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["METRICS", "SweepReport", "case_scores", "paired_comparisons", "plot_forest", "register_cli", "report",
           "runs_with_weights"]

METRICS = ("dice", "hd95", "asd", "jaccard")
_PAIRED_COLUMNS = ["paired_vs", "paired_delta", "paired_low", "paired_high", "paired_n", "paired_unmatched",
                   "paired_verdict"]
_CSV_COLUMNS = ["data", "labeled", "labeled_cases", "method", "role", "n", "runs_missing",
                *[f"{m}_{s}" for m in METRICS for s in ("mean", "std")],
                "delta_dice_vs_supervised", *_PAIRED_COLUMNS, "train_min_mean", "train_min_std", "runs"]
BOOTSTRAP_UNITS = ("pair", "case")


@dataclass
class SweepReport:
    """A sweep aggregated per (data, labeled, method).

    Attributes:
        rows: One dict per group, in table order: ``data``, ``labeled`` (``"3"``, ``"0.1"`` or
            ``"all"``), ``labeled_cases`` (mean labeled case count of its runs), ``method``,
            ``role`` (``"lower bound"``, ``"upper bound"`` or ``""``), ``n`` (finished runs),
            ``runs_missing``, ``<metric>_mean`` / ``<metric>_std`` for Dice, HD95, ASD and
            Jaccard, ``delta_dice_vs_supervised``, ``train_min_mean`` / ``train_min_std``.
            With paired statistics, the compared rows also hold ``paired_vs`` (the reference
            method), ``paired_delta``, ``paired_low`` / ``paired_high`` (the interval),
            ``paired_n`` (pairs), ``paired_unmatched`` (pairs left out) and ``paired_verdict``.
        runs: One dict per finished run with its metrics, seed, fold and training time.
        missing: Names of the sweep's runs without an evaluation (pending, failed, running).
        protocol: The evaluation settings shared by the runs (split, empty policy, units, TTA,
            checkpoint) and the sweep's fixed options per data.
        markdown: The report as markdown.
        files: Paths written.
        paired: One dict per compared (data, labeled, method), see :func:`paired_comparisons`.
    """

    rows: list[dict[str, Any]]
    runs: list[dict[str, Any]]
    missing: list[str]
    protocol: dict[str, Any]
    markdown: str = ""
    files: list[Path] = field(default_factory=list)
    paired: list[dict[str, Any]] = field(default_factory=list)

    def to_csv(self) -> str:
        """The table as CSV text (numbers unrounded, NaN as ``nan``)."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=_CSV_COLUMNS, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({**row, "runs": " ".join(row["runs"])})
        return buf.getvalue()


# ------------------------------------------------------------------------------------------ reading
def _training_seconds(run_dir: Path) -> float:
    """Wall time of the run's ``fit`` step(s) as the sweep measured it; for runs the sweep did not
    launch itself (emitted to torchrun/Slurm), the training loop's own time from ``history.jsonl``."""
    record_path = run_dir / "sweep_run.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("fit_seconds"):
            return float(record["fit_seconds"])
    seconds, previous = 0.0, 0
    history = run_dir / "history.jsonl"
    if history.is_file():
        for line in history.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                seconds += (row["step"] - previous) / max(row["it_per_s"], 1e-9)
                previous = row["step"]
    return seconds if seconds > 0 else math.nan


def _read_runs(root: Path, manifest: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    from sslseg.data.splits import Split
    from sslseg.app.evaluate import EvaluationResult

    runs, missing = [], []
    for name, entry in manifest["runs"].items():
        run_dir = root / entry["dir"]
        path = run_dir / f"evaluation_{entry['options']['split']}.json"
        if not path.is_file():
            missing.append(name)
            continue
        result = EvaluationResult.load(path)
        overall = result.summary["overall"]
        split = Split.load(run_dir / "split.json")
        runs.append({
            "name": name, "dir": run_dir, "method": entry["method"], "data": entry["data"],
            "labeled": "all" if entry["labeled"] is None else f"{entry['labeled']:g}",
            "labeled_cases": len(split.labeled_cases), "seed": entry["seed"], "fold": entry["fold"],
            **{m: overall[m]["mean"] if m in overall else math.nan for m in METRICS},
            "train_seconds": _training_seconds(run_dir),
            "settings": result.settings, "options": entry["options"], "rows": result.rows,
        })
    return runs, missing


# --------------------------------------------------------------------------------------- aggregation
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1; 0 for a single value) of the non-NaN values."""
    kept = [v for v in values if not math.isnan(v)]
    if not kept:
        return math.nan, math.nan
    return statistics.fmean(kept), (statistics.stdev(kept) if len(kept) > 1 else 0.0)


def _labeled_key(tag: str) -> tuple[int, float]:
    return (1, 0.0) if tag == "all" else (0, float(tag))


def _role(method: str, labeled: str) -> str:
    if method != "supervised":
        return ""
    return "upper bound" if labeled == "all" else "lower bound"


def aggregate(runs: Sequence[Mapping[str, Any]], manifest: Mapping[str, Any],
              missing: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Group finished runs by (data, labeled, method) and aggregate over seeds/folds."""
    data_order = list(dict.fromkeys(e["data"] for e in manifest["runs"].values()))
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["data"], run["labeled"], run["method"]), []).append(run)
    missing_by_group: dict[tuple[str, str, str], int] = {}
    for name in missing:
        e = manifest["runs"][name]
        key = (e["data"], "all" if e["labeled"] is None else f"{e['labeled']:g}", e["method"])
        missing_by_group[key] = missing_by_group.get(key, 0) + 1
    rows = []
    for key in sorted(groups, key=lambda k: (data_order.index(k[0]), _labeled_key(k[1]), k[2] != "supervised", k[2])):
        data, labeled, method = key
        members = sorted(groups[key], key=lambda r: (r["seed"], -1 if r["fold"] is None else r["fold"]))
        row: dict[str, Any] = {"data": data, "labeled": labeled, "method": method, "role": _role(method, labeled),
                               "labeled_cases": statistics.fmean(r["labeled_cases"] for r in members),
                               "n": len(members), "runs_missing": missing_by_group.get(key, 0),
                               "runs": [r["name"] for r in members]}
        for m in METRICS:
            row[f"{m}_mean"], row[f"{m}_std"] = _mean_std([r[m] for r in members])
        row["train_min_mean"], row["train_min_std"] = _mean_std([r["train_seconds"] / 60.0 for r in members])
        rows.append(row)
    lower = {(r["data"], r["labeled"]): r["dice_mean"] for r in rows if r["method"] == "supervised"}
    for row in rows:
        base = lower.get((row["data"], row["labeled"]))
        row["delta_dice_vs_supervised"] = (math.nan if base is None or row["method"] == "supervised"
                                           else row["dice_mean"] - base)
    return rows


# -------------------------------------------------------------------------------- paired statistics
def case_scores(run: Mapping[str, Any]) -> dict[tuple[Any, ...], float]:
    """One run's test Dice per case, keyed ``(case, seed, fold)``.

    A case's score is the mean over its volumes of each volume's mean Dice over its foreground
    classes (the run's overall Dice averages the same volume means). Classes the ``"nan"`` empty
    policy left out do not count; a case with no scored class at all gets no score.
    """
    by_volume: dict[str, tuple[str, list[float]]] = {}
    for row in run["rows"]:
        value = row.get("dice")
        entry = by_volume.setdefault(row["volume_id"], (row["case"], []))
        if isinstance(value, (int, float)) and not math.isnan(value):
            entry[1].append(float(value))
    by_case: dict[str, list[float]] = {}
    for case, values in by_volume.values():
        if values:
            by_case.setdefault(case, []).append(statistics.fmean(values))
    return {(case, run["seed"], run["fold"]): statistics.fmean(v) for case, v in by_case.items()}


def _describe_keys(keys: Sequence[tuple[Any, ...]]) -> str:
    """``(case, seed, fold)`` keys summarised per seed (and fold): ``seed 1: 2 cases; seed 2: 1 case``."""
    groups: dict[str, list[str]] = {}
    for case, seed, fold in keys:
        label = f"seed {seed}" + ("" if fold is None else f" fold {fold}")
        groups.setdefault(label, []).append(str(case))
    parts = []
    for label, cases in groups.items():
        shown = ", ".join(cases[:3]) + (", ..." if len(cases) > 3 else "")
        parts.append(f"{label}: {len(cases)} case{'s' if len(cases) != 1 else ''} ({shown})")
    return "; ".join(parts)


def paired_comparisons(runs: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]], reference: str, *,
                       n_resamples: int = 10000, confidence: float = 0.95, seed: int = 0,
                       bootstrap_by: str = "pair") -> list[dict[str, Any]]:
    """Each method against ``reference`` in its (data, labeled) group, paired by (case, seed, fold).

    Args:
        runs: Finished runs as the report reads them (with their per-case ``rows``).
        rows: The aggregated table (:func:`aggregate`), for the all-labeled gap.
        reference: The method every other one is compared with (e.g. ``"supervised"``).
        n_resamples: Bootstrap resamples.
        confidence: Interval coverage.
        seed: Seed of every comparison's resampling.
        bootstrap_by: ``"pair"`` (resample (case, seed) pairs) or ``"case"`` (resample test cases,
            each with all its seeds).

    Returns:
        One dict per (data, labeled, method) with a finished reference in its group, in table
        order: ``data``, ``labeled``, ``method``, ``reference``, the keys of
        :func:`sslseg.metrics.statistics.paired_bootstrap` (``mean_difference``, ``low``,
        ``high``, ``n_pairs``, ``verdict``, ...), ``unmatched`` (pairs left out),
        ``missing_in_method`` / ``missing_in_reference`` (text, ``""`` when none), and ``gap``
        (the reference's mean Dice with every training case labeled minus at this labeled count;
        NaN without an all-labeled run of the reference, or at ``labeled="all"``). A group where no
        pair matches gets ``verdict`` ``"no pairs"`` and NaN statistics.

    Raises:
        ValueError: ``bootstrap_by`` is neither ``"pair"`` nor ``"case"``.
    """
    from sslseg.metrics.statistics import pair_scores, paired_bootstrap

    if bootstrap_by not in BOOTSTRAP_UNITS:
        raise ValueError(f"report: bootstrap_by must be one of {BOOTSTRAP_UNITS}, got {bootstrap_by!r}")
    scores: dict[tuple[str, str, str], dict[tuple[Any, ...], float]] = {}
    for run in runs:
        key = (run["data"], run["labeled"], run["method"])
        target = scores.setdefault(key, {})
        for k, v in case_scores(run).items():
            if k in target:
                raise ValueError(f"report: two runs of {run['method']} at labeled {run['labeled']} on {run['data']} "
                                 f"score case {k[0]!r} for seed {k[1]}, fold {k[2]}; cannot pair them")
            target[k] = v
    means = {(r["data"], r["labeled"], r["method"]): r["dice_mean"] for r in rows}
    out = []
    for row in rows:
        data, labeled, method = row["data"], row["labeled"], row["method"]
        if method == reference or (data, labeled, reference) not in scores:
            continue
        ref_scores, own = scores[(data, labeled, reference)], scores.get((data, labeled, method), {})
        pairing = pair_scores(ref_scores, own, strict=False, a_name=reference, b_name=method)
        full, low = means.get((data, "all", reference)), means.get((data, labeled, reference))
        entry: dict[str, Any] = {
            "data": data, "labeled": labeled, "method": method, "reference": reference,
            "unmatched": len(pairing.only_a) + len(pairing.only_b),
            "missing_in_method": _describe_keys(pairing.only_a), "missing_in_reference": _describe_keys(pairing.only_b),
            "gap": math.nan if labeled == "all" or full is None or low is None else full - low,
        }
        if pairing.keys:
            clusters = [k[0] for k in pairing.keys] if bootstrap_by == "case" else None
            entry.update(paired_bootstrap(pairing.a, pairing.b, n_resamples=n_resamples, confidence=confidence,
                                          seed=seed, clusters=clusters))
        else:
            entry.update({"mean_difference": math.nan, "low": math.nan, "high": math.nan, "n_pairs": 0,
                          "n_clusters": 0, "verdict": "no pairs", "n_resamples": n_resamples,
                          "confidence": confidence, "seed": seed})
        entry["bootstrap_by"] = bootstrap_by
        out.append(entry)
    return out


def _attach_paired(rows: Sequence[dict[str, Any]], paired: Sequence[Mapping[str, Any]]) -> None:
    by_key = {(p["data"], p["labeled"], p["method"]): p for p in paired}
    for row in rows:
        p = by_key.get((row["data"], row["labeled"], row["method"]))
        if p is not None:
            row.update({"paired_vs": p["reference"], "paired_delta": p["mean_difference"], "paired_low": p["low"],
                        "paired_high": p["high"], "paired_n": p["n_pairs"], "paired_unmatched": p["unmatched"],
                        "paired_verdict": p["verdict"]})


def _signed(value: float, digits: int = 3) -> str:
    # round() + 0.0 prints a tiny negative difference as +0.000 rather than -0.000
    return "n/a" if math.isnan(value) else f"{round(value, digits) + 0.0:+.{digits}f}"


def _paired_markdown(paired: Sequence[Mapping[str, Any]], data: str) -> list[str]:
    group = [p for p in paired if p["data"] == data]
    if not group:
        return []
    first = group[0]
    unit = "test case (all its seeds together)" if first["bootstrap_by"] == "case" else "(test case, seed) pair"
    lines = ["", f"Paired Δ Dice vs `{first['reference']}`: mean over (test case, seed) pairs of the difference in "
                 f"per-case Dice; {first['confidence']:.0%} percentile bootstrap interval ({first['n_resamples']} "
                 f"resamples, each {unit} drawn with replacement, seed {first['seed']}); `better` / `worse` only when "
                 "the interval excludes 0. Share of gap: Δ over the all-labeled gap of "
                 f"`{first['reference']}` (its Dice with every training case labeled minus at this labeled count).",
             "", "| labeled | method | Δ Dice (paired) | 95% interval | pairs | verdict | share of gap |",
             "|---|---|---|---|---|---|---|"]
    if not math.isclose(first["confidence"], 0.95):
        lines[-2] = lines[-2].replace("95% interval", f"{first['confidence']:.0%} interval")

    def order(p: Mapping[str, Any]) -> tuple[bool, float, str]:  # largest difference first, "no pairs" last
        d = p["mean_difference"]
        return (math.isnan(d), 0.0 if math.isnan(d) else -d, p["method"])

    gaps, unmatched = [], []
    for labeled in dict.fromkeys(p["labeled"] for p in group):
        members = sorted((p for p in group if p["labeled"] == labeled), key=order)
        for p in members:
            interval = "n/a" if math.isnan(p["low"]) else f"[{_signed(p['low'])}, {_signed(p['high'])}]"
            share = ("" if math.isnan(p["gap"]) or p["gap"] <= 0 or math.isnan(p["mean_difference"])
                     else f"{p['mean_difference'] / p['gap']:.0%}")
            pairs = f"{p['n_pairs']}" + (f" ({p['unmatched']} unmatched)" if p["unmatched"] else "")
            lines.append(f"| {labeled} | {p['method']} | {_signed(p['mean_difference'])} | {interval} | {pairs} | "
                         f"{p['verdict']} | {share} |")
            if p["missing_in_method"]:
                unmatched.append(f"{p['method']} at {labeled} lacks pairs that `{p['reference']}` has: "
                                 f"{p['missing_in_method']}")
            if p["missing_in_reference"]:
                unmatched.append(f"`{p['reference']}` at {labeled} lacks pairs that {p['method']} has: "
                                 f"{p['missing_in_reference']}")
        if not math.isnan(members[0]["gap"]):
            gaps.append(f"at {labeled}: {_signed(members[0]['gap'])}")
    if gaps:
        lines += ["", f"All-labeled gap of `{first['reference']}`: " + "; ".join(gaps) + "."]
    if unmatched:
        lines += ["", "Unmatched pairs, left out of the statistics:", "", *[f"- {n}" for n in unmatched]]
    return lines


# ------------------------------------------------------------------------------------------ markdown
def _fmt(mean: float, std: float, digits: int) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _protocol(runs: Sequence[Mapping[str, Any]], manifest: Mapping[str, Any]) -> dict[str, Any]:
    def values(key: str) -> list[Any]:
        return sorted({json.dumps(r["settings"].get(key)) for r in runs})

    protocol: dict[str, Any] = {k: [json.loads(v) for v in values(k)] for k in
                                ("split", "empty_policy", "units", "tta")}
    options: dict[str, list[str]] = {}
    for entry in manifest["runs"].values():
        o = entry["options"]
        text = f"iterations={o['iterations']}" + "".join(f", {s}" for s in o["set"])
        options.setdefault(entry["data"], [])
        if text not in options[entry["data"]]:
            options[entry["data"]].append(text)
    protocol["options"] = options
    return protocol


def _markdown(rows: Sequence[Mapping[str, Any]], protocol: Mapping[str, Any], missing: Sequence[str],
              skipped: Sequence[Mapping[str, str]], units: str, paired: Sequence[Mapping[str, Any]] = (),
              paired_note: str = "") -> str:
    def one(values: list[Any]) -> str:
        return ", ".join(str(v) for v in values) if values else "n/a"

    tta = one(["on" if v else "off" for v in protocol["tta"]])
    lines = [
        "Checkpoint: `best_val` (selected on validation Dice only); evaluated on the "
        f"`{one(protocol['split'])}` split; metrics per volume and foreground class, averaged over classes, "
        f"then volumes; distances in {units}; empty-mask policy `{one(protocol['empty_policy'])}`; TTA {tta}. "
        "Each cell: mean ± sample std over seeds/folds (n runs). Δ Dice: difference to `supervised` at the "
        "same labeled count. Train time: wall time of `sslseg fit` per run.",
    ]
    by_data: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_data.setdefault(row["data"], []).append(row)
    for data, group in by_data.items():
        lines += ["", f"**{data}** ({'; '.join(protocol['options'].get(data, []))})", "",
                  f"| labeled | method | Dice | HD95 ({units}) | ASD ({units}) | Δ Dice vs supervised | "
                  "train time (min) | n |", "|---|---|---|---|---|---|---|---|"]
        for r in group:
            cases = f"{r['labeled_cases']:g} cases"
            labeled = f"all ({cases})" if r["labeled"] == "all" else (
                r["labeled"] if "." not in r["labeled"] else f"{r['labeled']} ({cases})")
            method = f"{r['method']} ({r['role']})" if r["role"] else r["method"]
            d = r["delta_dice_vs_supervised"]
            # round() + 0.0 prints a tiny negative difference as +0.000 rather than -0.000
            delta = "" if math.isnan(d) else f"{round(d, 3) + 0.0:+.3f}"
            n = f"{r['n']}" + (f" ({r['runs_missing']} missing)" if r["runs_missing"] else "")
            lines.append(f"| {labeled} | {method} | {_fmt(r['dice_mean'], r['dice_std'], 3)} | "
                         f"{_fmt(r['hd95_mean'], r['hd95_std'], 2)} | {_fmt(r['asd_mean'], r['asd_std'], 2)} | "
                         f"{delta} | {_fmt(r['train_min_mean'], r['train_min_std'], 1)} | {n} |")
        lines += _paired_markdown(paired, data)
    if paired_note:
        lines += ["", paired_note]
    if skipped:
        lines += ["", "Not run: " + "; ".join(s["reason"] for s in skipped) + "."]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        lines += ["", f"{len(missing)} run(s) without an evaluation (pending, running or failed): {shown}."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- plots
def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save_figure(fig: Any, path: Path) -> Path:
    """Write ``fig`` as PNG through a temporary file and ``os.replace``: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def plot_dice_vs_labeled(rows: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """Dice against labeled cases, one line per method (error bars: std over seeds/folds), one
    panel per dataset swept at two or more labeled counts (a single count is a vertical smear;
    the forest plots show it instead); the full-label upper bound as a dashed line.

    None without matplotlib or when no dataset has two labeled counts.
    """
    plt = _pyplot()
    if plt is None:
        return None
    counts_by_data: dict[str, set[str]] = {}
    for r in rows:
        if r["labeled"] != "all":
            counts_by_data.setdefault(r["data"], set()).add(r["labeled"])
    datasets = [d for d in dict.fromkeys(r["data"] for r in rows) if len(counts_by_data.get(d, ())) >= 2]
    if not datasets:
        return None
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 4.5), squeeze=False)
    for ax, data in zip(axes[0], datasets):
        group = [r for r in rows if r["data"] == data]
        methods = list(dict.fromkeys(r["method"] for r in group))
        cmap = plt.get_cmap("tab20")
        # Dark tab20 shades first, then the light ones: neighbouring methods stay distinguishable.
        colours = [cmap(i) for i in (*range(0, 20, 2), *range(1, 20, 2))]
        for i, method in enumerate(methods):
            pts = sorted((r["labeled_cases"], r["dice_mean"], r["dice_std"]) for r in group
                         if r["method"] == method and r["labeled"] != "all")
            style = (dict(color="black", linewidth=2.5) if method == "supervised"
                     else dict(color=colours[i % 20], marker="osD^v<>"[i % 7]))
            if pts:
                xs, ys, es = zip(*pts)
                ax.errorbar(xs, ys, yerr=es, capsize=3, label=method, **{"marker": "o", **style})
        for r in group:
            if r["labeled"] == "all":
                ax.axhline(r["dice_mean"], linestyle="--" if r["method"] == "supervised" else ":", color="grey",
                           label=f"{r['method']}, all {r['labeled_cases']:g} cases")
        counts = sorted({r["labeled_cases"] for r in group if r["labeled"] != "all"})
        if counts:
            ax.set_xticks(counts)  # ticks at the labeled counts of the grid, not at fractions of a case
            pad = 0.5 + 0.1 * (counts[-1] - counts[0])
            ax.set_xlim(counts[0] - pad, counts[-1] + pad)
        ax.set(title=data, xlabel="labeled cases", ylabel="test Dice (mean over classes)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    try:
        return _save_figure(fig, path)
    finally:
        plt.close(fig)


_VERDICT_COLOURS = {"better": "tab:green", "worse": "tab:red", "n.s.": "tab:gray"}


def plot_forest(paired: Sequence[Mapping[str, Any]], data: str, labeled: str, path: Path) -> Path | None:
    """Forest plot of one (data, labeled) group: one row per method, sorted by paired Δ Dice (largest
    on top), its interval as a horizontal bar (green: better, red: worse, grey: n.s.), a zero line
    and, where the reference has an all-labeled run, the all-labeled gap as a dashed line.

    Args:
        paired: Entries of :func:`paired_comparisons`.
        data: The data spec of the group.
        labeled: The labeled tag of the group (``"3"``, ``"0.1"``, ``"all"``).
        path: The PNG to write (atomically).

    Returns:
        ``path``, or None without matplotlib or when the group has no comparison with pairs.
    """
    plt = _pyplot()
    if plt is None:
        return None
    group = [p for p in paired if p["data"] == data and p["labeled"] == labeled and p["n_pairs"] > 0]
    if not group:
        return None
    group.sort(key=lambda p: (p["mean_difference"], p["method"]))  # bottom to top: the best ends on top
    reference, gap = group[0]["reference"], group[0]["gap"]
    fig, ax = plt.subplots(figsize=(7.0, 1.2 + 0.38 * len(group)))
    for y, p in enumerate(group):
        colour = _VERDICT_COLOURS.get(p["verdict"], "tab:gray")
        d = p["mean_difference"]
        if not math.isnan(p["low"]):
            ax.errorbar(d, y, xerr=[[d - p["low"]], [p["high"] - d]], fmt="o", color=colour, capsize=3,
                        markersize=5, linewidth=1.6)
        else:  # a single pair or case: a point without an interval
            ax.plot(d, y, "o", color=colour, markerfacecolor="white", markersize=5)
    ax.axvline(0.0, color="black", linewidth=1.0)
    if not math.isnan(gap):
        ax.axvline(gap, color="tab:blue", linestyle="--", linewidth=1.2,
                   label=f"all-labeled gap of {reference} ({_signed(gap)})")
        ax.legend(fontsize=7, loc="best")
    ax.set_yticks(range(len(group)))
    ax.set_yticklabels([f"{p['method']} ({p['n_pairs']})" for p in group], fontsize=8)
    ax.set_ylim(-0.7, len(group) - 0.3)
    conf = f"{group[0]['confidence']:.0%}"
    ax.set_xlabel(f"paired Δ test Dice vs {reference}, {conf} bootstrap interval (number of pairs after the name)",
                  fontsize=8)
    title = "all labeled" if labeled == "all" else f"{labeled} labeled"
    ax.set_title(f"{data}: {title}", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    try:
        return _save_figure(fig, path)
    finally:
        plt.close(fig)


def _overlay(ax: Any, image: Any, label: Any, num_classes: int, title: str) -> None:
    import numpy as np

    plt = _pyplot()
    ax.imshow(image, cmap="gray")
    if label is not None:
        colours = plt.get_cmap("tab10")
        rgba = np.zeros(label.shape + (4,), dtype=np.float32)
        for c in range(1, num_classes):
            rgba[label == c] = (*colours((c - 1) % 10)[:3], 0.45)
        ax.imshow(rgba)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def plot_overlays(runs: Sequence[Mapping[str, Any]], data: str, path: Path, *, device: str = "cpu") -> Path | None:
    """One test case of ``data``: its image, ground truth and each method's prediction on one slice.

    The runs shown are those at the smallest labeled count (where methods differ most), first seed
    and fold. The slice is the middle one of the ground truth's extent along the first axis (the
    volume's middle slice when the ground truth is empty). None without matplotlib.
    """
    plt = _pyplot()
    if plt is None:
        return None
    import torch

    import sslseg.data
    from sslseg.engine import load_model
    from sslseg.inference import predict_volume

    group = [r for r in runs if r["data"] == data]
    if not group:
        raise ValueError(f"plot_overlays: no finished runs of data {data!r}")
    smallest = min({r["labeled"] for r in group}, key=_labeled_key)
    first = min(((r["seed"], -1 if r["fold"] is None else r["fold"]) for r in group if r["labeled"] == smallest))
    chosen = sorted((r for r in group if r["labeled"] == smallest
                     and (r["seed"], -1 if r["fold"] is None else r["fold"]) == first),
                    key=lambda r: (r["method"] != "supervised", r["method"]))
    case = chosen[0]["settings"]["cases"][0]
    ds = sslseg.data.load(data)
    vol = next(ds.iter_volumes([case]))
    fg = vol.label > 0
    if bool(fg.any()):
        index = torch.nonzero(fg.flatten(1).any(1)).flatten()
        k = int(index[len(index) // 2])
    else:
        k = vol.label.shape[0] // 2
    panels = [("image", None), ("ground truth", vol.label[k].numpy())]
    for run in chosen:
        model, record = load_model(run["dir"], device=device)
        pred = predict_volume(model, vol.image.to(device), dim=record["dim"], patch_size=record["patch_size"]).cpu()
        dice = [r["dice"] for r in run["rows"] if r["volume_id"] == vol.volume_id]
        score = f"\nDice {statistics.fmean(dice):.3f}" if dice else ""
        panels.append((f"{run['method']}{score}", pred[k].numpy()))
    cols = min(6, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.5 * rows), squeeze=False)
    image = vol.image[0, k].numpy()
    for ax, (title, label) in zip(axes.flat, panels):
        _overlay(ax, image, label, ds.num_classes, title)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{data}: {vol.volume_id}, slice {k}, labeled {smallest}, seed {first[0]}", fontsize=9)
    fig.tight_layout()
    try:
        return _save_figure(fig, path)
    finally:
        plt.close(fig)


def runs_with_weights(runs: Sequence[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], str]:
    """The runs whose directory holds the weights the overlays predict with (``best_val.pt``), and a
    note naming the data whose runs have none (result records without weights, such as those of
    ``benches/bench_methods.py``; ``""`` when every run has its weights). Overlays of those runs are
    skipped; the tables do not need weights."""
    kept = [r for r in runs if (Path(r["dir"]) / "best_val.pt").is_file()]
    without = list(dict.fromkeys(r["data"] for r in runs if not (Path(r["dir"]) / "best_val.pt").is_file()))
    if not without:
        return kept, ""
    count = len(runs) - len(kept)
    return kept, (f"overlays skipped for {count} run(s) without weights (no best_val.pt: result records) of "
                  f"{', '.join(without)}")


# ---------------------------------------------------------------------------------------------- API
def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def report(sweep_dir: str | os.PathLike, out: str | os.PathLike | None = None, *, plots: bool = True,
           overlays: bool = True, device: str = "cpu", verbose: bool = True,
           paired_vs: str | None = "supervised", n_resamples: int = 10000, bootstrap_by: str = "pair",
           bootstrap_seed: int = 0) -> SweepReport:
    """Aggregate a sweep into ``report.md``, ``report.csv`` and plots.

    Args:
        sweep_dir: A directory written by :func:`sslseg.app.sweep.sweep` (holds ``sweep.json``).
        out: Where to write (default ``sweep_dir``).
        plots: Write ``forest_<data>_<labeled>.png`` and ``dice_vs_labeled.png`` (needs
            matplotlib; skipped with a note otherwise).
        overlays: Also write ``overlays_<data>.png`` (predicts one test volume per method). Runs
            without weights (result records, no ``best_val.pt``) are left out of them, with a note.
        device: Device for the overlay predictions.
        verbose: Print notes (skipped plots, missing runs) and the written paths.
        paired_vs: The reference method of the paired statistics (default ``supervised``); None
            for none. A method the sweep does not hold gives a note in the report, not an error.
        n_resamples: Bootstrap resamples per comparison.
        bootstrap_by: ``"pair"`` (resample (test case, seed) pairs) or ``"case"`` (resample test
            cases with all their seeds).
        bootstrap_seed: Seed of the resampling (the same for every comparison).

    Returns:
        The :class:`SweepReport` (rows, runs, missing runs, protocol, markdown, files, paired).

    Raises:
        FileNotFoundError: ``sweep_dir`` has no ``sweep.json``.
        ValueError: no run of the sweep has been evaluated yet, the runs were evaluated with
            different protocols (units, empty policy, split or TTA), or ``bootstrap_by`` /
            ``n_resamples`` is invalid.
    """
    if bootstrap_by not in BOOTSTRAP_UNITS:
        raise ValueError(f"report: bootstrap_by must be one of {BOOTSTRAP_UNITS}, got {bootstrap_by!r}")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"report: n_resamples must be a positive integer, got {n_resamples!r}")
    from sslseg.app.sweep import data_tag, load_manifest

    root = Path(sweep_dir)
    manifest = load_manifest(root)
    runs, missing = _read_runs(root, manifest)
    if not runs:
        raise ValueError(f"report: no run of {root} has an evaluation file yet ({len(missing)} pending); "
                         f"run `sslseg sweep` first")
    protocol = _protocol(runs, manifest)
    mixed = {k: v for k, v in protocol.items() if k != "options" and len(v) > 1}
    if mixed:
        raise ValueError(f"report: the runs of {root} were evaluated with different settings {mixed}; "
                         f"a table must compare runs under one protocol")
    rows = aggregate(runs, manifest, missing)
    paired: list[dict[str, Any]] = []
    paired_note = ""
    if paired_vs is not None:
        planned = sorted({e["method"] for e in manifest["runs"].values()})
        if paired_vs not in planned:
            paired_note = (f"No paired statistics: `{paired_vs}` is not a method of this sweep "
                           f"(methods: {', '.join(planned)}).")
        else:
            paired = paired_comparisons(runs, rows, paired_vs, n_resamples=n_resamples, seed=bootstrap_seed,
                                        bootstrap_by=bootstrap_by)
            _attach_paired(rows, paired)
            if not paired:
                paired_note = f"No paired statistics: no group has a finished `{paired_vs}` run and another method."
        if paired_note and verbose:
            print(f"report: {paired_note}")
    units = protocol["units"][0] if protocol["units"] else "mm"
    markdown = _markdown(rows, protocol, missing, manifest.get("skipped", []), units, paired, paired_note)
    result = SweepReport(rows=rows, runs=[{k: v for k, v in r.items() if k != "rows"} for r in runs],
                         missing=list(missing), protocol=protocol, markdown=markdown, paired=paired)
    target = Path(out) if out is not None else root
    result.files += [_write_text(target / "report.md", markdown), _write_text(target / "report.csv", result.to_csv())]
    if plots:
        if _pyplot() is None:
            if verbose:
                print("report: matplotlib is not installed: plots skipped (pip install 'sslseg[plot]')")
        else:
            for data, labeled in dict.fromkeys((p["data"], p["labeled"]) for p in paired):
                written = plot_forest(paired, data, labeled, target / f"forest_{data_tag(data)}_{labeled}.png")
                if written is not None:
                    result.files.append(written)
            path = plot_dice_vs_labeled(rows, target / "dice_vs_labeled.png")
            if path is not None:
                result.files.append(path)
            if overlays:
                weighted, note = runs_with_weights(runs)
                if note and verbose:
                    print(f"report: {note}")
                for data in dict.fromkeys(r["data"] for r in rows):
                    if not any(r["data"] == data for r in weighted):
                        continue
                    written = plot_overlays(weighted, data, target / f"overlays_{data_tag(data)}.png", device=device)
                    if written is not None:
                        result.files.append(written)
    if verbose and missing:
        print(f"report: {len(missing)} run(s) have no evaluation yet and are left out: {missing[:5]}"
              + (" ..." if len(missing) > 5 else ""))
    return result


def _cmd_report(args: argparse.Namespace) -> int:
    paired_vs = None if args.paired_vs.lower() == "none" else args.paired_vs
    result = report(args.sweep_dir, args.out, plots=not args.no_plots, overlays=not args.no_overlays,
                    device=args.device, paired_vs=paired_vs, n_resamples=args.bootstrap_resamples,
                    bootstrap_by=args.bootstrap_by, bootstrap_seed=args.bootstrap_seed)
    print(result.markdown)
    for path in result.files:
        print(f"wrote {path}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``sslseg report`` to ``sslseg``'s subparsers."""
    p = subparsers.add_parser(
        "report", help="aggregate a sweep into a markdown + CSV table and plots",
        description="Aggregate the evaluated runs of a sweep directory per data x labeled x method (mean ± std over "
                    "seeds/folds of Dice, HD95, ASD and training time, delta to supervised, paired bootstrap "
                    "difference to a reference method) into report.md and report.csv, and draw forest plots, Dice "
                    "against labeled cases and example overlays (matplotlib).")
    p.add_argument("sweep_dir", metavar="SWEEP_DIR", help="a directory written by `sslseg sweep`")
    p.add_argument("--out", default=None, help="output folder (default: SWEEP_DIR)")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--no-overlays", action="store_true", help="skip the example overlays (they run each model once)")
    p.add_argument("--device", default="cpu", help="device for the overlay predictions (default cpu)")
    p.add_argument("--paired-vs", default="supervised", metavar="METHOD",
                   help="reference method of the paired statistics: each method's Dice difference to it per "
                        "(test case, seed), with a 95%% bootstrap interval and a forest plot (default supervised; "
                        "'none' to skip)")
    p.add_argument("--bootstrap-resamples", type=int, default=10000, metavar="N",
                   help="bootstrap resamples per comparison (default 10000)")
    p.add_argument("--bootstrap-by", choices=BOOTSTRAP_UNITS, default="pair",
                   help="resample (test case, seed) pairs, or whole test cases with all their seeds (default pair)")
    p.add_argument("--bootstrap-seed", type=int, default=0, metavar="SEED", help="seed of the resampling (default 0)")
    p.set_defaults(func=_cmd_report)
