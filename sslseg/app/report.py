"""``sslseg report SWEEP_DIR``: a sweep's runs aggregated into tables and plots.

Every finished run of a sweep (see :mod:`sslseg.app.sweep`) holds ``evaluation_<split>.json``. For each
run the overall test means are taken (each volume's mean over its foreground classes, averaged over
the volumes; see :mod:`sslseg.app.evaluate`), then the runs of one (data, labeled, method) cell are
aggregated over seeds and folds: mean and sample standard deviation (``ddof=1``; 0 when there is a
single run). ``supervised`` at a labeled count is the lower bound of its group, ``supervised`` on
every training case (``labeled="all"``) the upper bound, and each method's Dice is compared with
the lower bound of its group.

Outputs (in the sweep directory unless ``out`` is given): ``report.md``, ``report.csv``,
``dice_vs_labeled.png`` (Dice against the number of labeled cases, one line per method, error bars
= std) and ``overlays_<data>.png`` (one test case's slice: image, ground truth and each method's
prediction). The plots need matplotlib (``pip install sslseg[plot]``); without it they are skipped
with a note.
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

__all__ = ["METRICS", "SweepReport", "register_cli", "report"]

METRICS = ("dice", "hd95", "asd", "jaccard")
_CSV_COLUMNS = ["data", "labeled", "labeled_cases", "method", "role", "n", "runs_missing",
                *[f"{m}_{s}" for m in METRICS for s in ("mean", "std")],
                "delta_dice_vs_supervised", "train_min_mean", "train_min_std", "runs"]


@dataclass
class SweepReport:
    """A sweep aggregated per (data, labeled, method).

    Attributes:
        rows: One dict per group, in table order: ``data``, ``labeled`` (``"3"``, ``"0.1"`` or
            ``"all"``), ``labeled_cases`` (mean labeled case count of its runs), ``method``,
            ``role`` (``"lower bound"``, ``"upper bound"`` or ``""``), ``n`` (finished runs),
            ``runs_missing``, ``<metric>_mean`` / ``<metric>_std`` for Dice, HD95, ASD and
            Jaccard, ``delta_dice_vs_supervised``, ``train_min_mean`` / ``train_min_std``.
        runs: One dict per finished run with its metrics, seed, fold and training time.
        missing: Names of the sweep's runs without an evaluation (pending, failed, running).
        protocol: The evaluation settings shared by the runs (split, empty policy, units, TTA,
            checkpoint) and the sweep's fixed options per data.
        markdown: The report as markdown.
        files: Paths written.
    """

    rows: list[dict[str, Any]]
    runs: list[dict[str, Any]]
    missing: list[str]
    protocol: dict[str, Any]
    markdown: str = ""
    files: list[Path] = field(default_factory=list)

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
              skipped: Sequence[Mapping[str, str]], units: str) -> str:
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


def plot_dice_vs_labeled(rows: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """Dice against labeled cases, one line per method (error bars: std over seeds/folds), one
    panel per dataset; the full-label upper bound as a dashed line. None without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    datasets = list(dict.fromkeys(r["data"] for r in rows))
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- API
def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def report(sweep_dir: str | os.PathLike, out: str | os.PathLike | None = None, *, plots: bool = True,
           overlays: bool = True, device: str = "cpu", verbose: bool = True) -> SweepReport:
    """Aggregate a sweep into ``report.md``, ``report.csv`` and plots.

    Args:
        sweep_dir: A directory written by :func:`sslseg.app.sweep.sweep` (holds ``sweep.json``).
        out: Where to write (default ``sweep_dir``).
        plots: Write ``dice_vs_labeled.png`` (needs matplotlib; skipped with a note otherwise).
        overlays: Also write ``overlays_<data>.png`` (predicts one test volume per method).
        device: Device for the overlay predictions.
        verbose: Print notes (skipped plots, missing runs) and the written paths.

    Returns:
        The :class:`SweepReport` (rows, runs, missing runs, protocol, markdown, files).

    Raises:
        FileNotFoundError: ``sweep_dir`` has no ``sweep.json``.
        ValueError: no run of the sweep has been evaluated yet, or the runs were evaluated
            with different protocols (units, empty policy, split or TTA).
    """
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
    units = protocol["units"][0] if protocol["units"] else "mm"
    markdown = _markdown(rows, protocol, missing, manifest.get("skipped", []), units)
    result = SweepReport(rows=rows, runs=[{k: v for k, v in r.items() if k != "rows"} for r in runs],
                         missing=list(missing), protocol=protocol, markdown=markdown)
    target = Path(out) if out is not None else root
    result.files += [_write_text(target / "report.md", markdown), _write_text(target / "report.csv", result.to_csv())]
    if plots:
        path = plot_dice_vs_labeled(rows, target / "dice_vs_labeled.png")
        if path is None:
            if verbose:
                print("report: matplotlib is not installed: plots skipped (pip install 'sslseg[plot]')")
        else:
            result.files.append(path)
            if overlays:
                for data in dict.fromkeys(r["data"] for r in rows):
                    written = plot_overlays(runs, data, target / f"overlays_{data_tag(data)}.png", device=device)
                    if written is not None:
                        result.files.append(written)
    if verbose and missing:
        print(f"report: {len(missing)} run(s) have no evaluation yet and are left out: {missing[:5]}"
              + (" ..." if len(missing) > 5 else ""))
    return result


def _cmd_report(args: argparse.Namespace) -> int:
    result = report(args.sweep_dir, args.out, plots=not args.no_plots, overlays=not args.no_overlays,
                    device=args.device)
    print(result.markdown)
    for path in result.files:
        print(f"wrote {path}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``sslseg report`` to ``sslseg``'s subparsers."""
    p = subparsers.add_parser(
        "report", help="aggregate a sweep into a markdown + CSV table and plots",
        description="Aggregate the evaluated runs of a sweep directory per data x labeled x method (mean ± std over "
                    "seeds/folds of Dice, HD95, ASD and training time, delta to supervised) into report.md and "
                    "report.csv, and plot Dice against labeled cases and example overlays (matplotlib).")
    p.add_argument("sweep_dir", metavar="SWEEP_DIR", help="a directory written by `sslseg sweep`")
    p.add_argument("--out", default=None, help="output folder (default: SWEEP_DIR)")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--no-overlays", action="store_true", help="skip the example overlays (they run each model once)")
    p.add_argument("--device", default="cpu", help="device for the overlay predictions (default cpu)")
    p.set_defaults(func=_cmd_report)
