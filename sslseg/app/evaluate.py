"""``sslseg.evaluate`` and ``sslseg evaluate``: a trained model scored on a split, per case and class.

Every volume of the chosen cases is read as stored and predicted through the model's
preprocessing (:func:`sslseg.inference.predict_volume` with :class:`~sslseg.inference.Preprocessing`,
exactly what ``sslseg infer`` does to the same file: for a model trained with a plan, crop,
normalise, resample to the plan's spacing, predict, resample the probabilities back; 2D networks
slice by slice, 3D networks by Gaussian sliding window, optional flip test-time augmentation) and
scored on the volume's own grid against its own labels by :func:`sslseg.metrics.segmentation_metrics` per foreground class:
Dice, Jaccard, HD95 and ASD, distances in mm from the voxel spacing. Empty masks follow the
evaluation protocol (DESIGN.md section 5): ``"penalty"`` (default; both empty -> Dice 1, distance
0; exactly one empty -> Dice 0, distance = the image diagonal), or ``"nan"`` / ``"zero"`` to
reproduce published conventions. The policy, the units and every other choice are recorded in
the result, which is written as CSV (one row per volume and class) and JSON (everything).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sslseg.utils.precision import AMP_CHOICES

if TYPE_CHECKING:  # heavy imports stay out of `sslseg --help`
    import torch
    from torch import nn

__all__ = ["SPLITS", "EvaluationResult", "evaluate", "register_cli"]

SPLITS = ("test", "val", "train", "all")
_DEFAULT_METRICS = ("dice", "jaccard", "hd95", "asd")
_DISTANCES = ("hd95", "asd", "assd", "hausdorff")
_LABELS = {"dice": "Dice", "jaccard": "Jaccard", "hd95": "HD95", "asd": "ASD", "assd": "ASSD", "hausdorff": "HD"}
_FORMAT = "sslseg-evaluation/1"
_POLICY_RULES = {
    "penalty": "both empty: Dice/Jaccard 1, distances 0; exactly one empty: Dice/Jaccard 0, distances = penalty",
    "nan": "both or one empty: NaN, left out of the means",
    "zero": "both or one empty: 0 for every metric",
}


# ------------------------------------------------------------------------------------------ result
def _stats(values: Sequence[float]) -> dict[str, float | int]:
    """Mean, population std and count of the non-NaN values (NaN mean/std when there are none)."""
    kept = [v for v in values if not math.isnan(v)]
    if not kept:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    mean = math.fsum(kept) / len(kept)
    return {"mean": mean, "std": math.sqrt(math.fsum((v - mean) ** 2 for v in kept) / len(kept)), "n": len(kept)}


def _nan_to_none(obj: Any) -> Any:
    """JSON has no NaN: write null (read back as NaN by :meth:`EvaluationResult.load`)."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


def _write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
    os.replace(tmp, path)
    return path


@dataclass
class EvaluationResult:
    """What :func:`evaluate` measured.

    Attributes:
        rows: One dict per volume and foreground class: ``case``, ``volume_id``, ``class`` (index),
            ``class_name``, one value per metric (``dice``, ``jaccard``, ``hd95``, ``asd``;
            distances in ``settings["units"]``), ``pred_empty``, ``gt_empty``.
        summary: ``{"per_class": {class_name: {metric: {"mean", "std", "n"}}}, "overall": {metric:
            {"mean", "std", "n"}}}``. Per class: over the volumes. Overall: over the volumes, of each
            volume's mean over its foreground classes. ``std`` is the population std; NaN values
            (``"nan"`` policy) are left out and ``n`` counts what was kept.
        empty: Empty-mask counts, ``{"per_class": {class_name: counts}, "total": counts}`` with
            counts ``both_empty``, ``one_empty``, ``pred_empty_only`` (structure missed) and
            ``gt_empty_only`` (structure predicted where there is none).
        settings: How the numbers were made: split and its source, cases, empty policy and
            penalty, units and spacing source, TTA, metrics, model, method, data, checkpoint,
            sslseg versions.
        files: Paths written by :meth:`save` (empty until then).
    """

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    empty: dict[str, Any]
    settings: dict[str, Any]
    files: list[Path] = field(default_factory=list, compare=False)

    @property
    def metrics(self) -> list[str]:
        return list(self.settings["metrics"])

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write the per-volume x per-class table (``nan`` where the ``"nan"`` policy excluded a value)."""
        columns = ["case", "volume_id", "class", "class_name", *self.metrics, "pred_empty", "gt_empty"]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
        return _write_atomic(Path(path), buf.getvalue())

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write settings, summary, empty counts and rows as JSON (NaN written as null)."""
        doc = {"format": _FORMAT, "settings": self.settings, "summary": self.summary, "empty": self.empty,
               "rows": self.rows}
        return _write_atomic(Path(path), json.dumps(_nan_to_none(doc), indent=2, allow_nan=False) + "\n")

    def save(self, directory: str | os.PathLike) -> list[Path]:
        """Write ``evaluation_<split>.csv`` and ``evaluation_<split>.json`` into ``directory``
        (``evaluation_<split>_last.*`` for the final weights)."""
        d = Path(directory)
        stem = f"evaluation_{self.settings['split']}"
        if self.settings.get("checkpoint_kind") == "last":
            stem += "_last"
        self.files = [self.to_csv(d / f"{stem}.csv"), self.to_json(d / f"{stem}.json")]
        return list(self.files)

    @classmethod
    def load(cls, path: str | os.PathLike) -> EvaluationResult:
        """Read a result back from the JSON that :meth:`to_json` wrote."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: cannot be read as an sslseg evaluation JSON ({exc})") from exc
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
            found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise ValueError(f"{path}: not an sslseg evaluation file (format {found!r}, expected {_FORMAT!r})")
        metrics = doc["settings"]["metrics"]

        def nan(v: Any) -> Any:
            return math.nan if v is None else v

        rows = [{k: (nan(v) if k in metrics else v) for k, v in r.items()} for r in doc["rows"]]
        summary = {
            "per_class": {c: {m: {k: nan(v) for k, v in s.items()} for m, s in per.items()}
                          for c, per in doc["summary"]["per_class"].items()},
            "overall": {m: {k: nan(v) for k, v in s.items()} for m, s in doc["summary"]["overall"].items()},
        }
        return cls(rows=rows, summary=summary, empty=doc["empty"], settings=doc["settings"])

    def table(self) -> str:
        """A short markdown summary: settings line, mean +- std per class and overall, empty counts."""
        s = self.settings
        units = s["units"]
        policy = {"penalty": "one empty: Dice 0, distance = image diagonal", "nan": "empty cases left out",
                  "zero": "empty cases score 0"}[s["empty_policy"]]
        tta = f"on ({s['tta_passes']} flips)" if s["tta"] else "off"
        n_cases = len(s["cases"])
        head = (f"**sslseg evaluation**: split `{s['split']}` ({s['volumes']} volume(s) of {n_cases} case(s)), "
                f"empty policy `{s['empty_policy']}` ({policy}), distances in {units}, TTA {tta}")
        names = [f"{_LABELS.get(m, m)} ({units})" if m in _DISTANCES else _LABELS.get(m, m) for m in self.metrics]
        lines = [head, "", "| class | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        expected = s["volumes"]

        def cell(st: dict[str, Any]) -> str:
            if st["n"] == 0:
                return "n/a (n=0)"
            text = f"{st['mean']:.4f} ± {st['std']:.4f}"
            return text if st["n"] == expected else f"{text} (n={st['n']})"

        for name, per in self.summary["per_class"].items():
            lines.append(f"| {name} | " + " | ".join(cell(per[m]) for m in self.metrics) + " |")
        lines.append("| **mean** | " + " | ".join(cell(self.summary["overall"][m]) for m in self.metrics) + " |")
        total = self.empty["total"]
        detail = [f"{c}: {n['both_empty']}/{n['pred_empty_only']}/{n['gt_empty_only']}"
                  for c, n in self.empty["per_class"].items() if n["both_empty"] or n["one_empty"]]
        lines += ["", f"Empty masks (volume x class): both empty {total['both_empty']}, prediction only "
                      f"{total['pred_empty_only']}, ground truth only {total['gt_empty_only']}"
                  + (f" (both/prediction/ground truth per class: {', '.join(detail)})" if detail else "") + "."]
        return "\n".join(lines)

    def __repr__(self) -> str:
        s = self.settings
        parts = [f"split={s['split']!r}", f"volumes={s['volumes']}", f"classes={len(self.summary['per_class'])}"]
        for m in self.metrics:
            mean = self.summary["overall"][m]["mean"]
            parts.append(f"{m}={mean:.4f}" + (f" {s['units']}" if m in _DISTANCES else ""))
        parts += [f"empty_policy={s['empty_policy']!r}", f"one_empty={self.empty['total']['one_empty']}"]
        return f"EvaluationResult({', '.join(parts)})"


# ------------------------------------------------------------------------------------------ inputs
def _check_options(split: str, empty_policy: str, metrics: Sequence[str], spacing: Sequence[float] | None,
                   batch_size: int | None, tta: bool) -> tuple[list[str], list[float] | None]:
    from sslseg.data.errors import check_choice
    from sslseg.metrics import EMPTY_POLICIES, METRICS

    check_choice("split", split, SPLITS)
    check_choice("empty_policy", empty_policy, EMPTY_POLICIES)
    if isinstance(metrics, str) or not isinstance(metrics, Sequence) or not metrics:
        raise ValueError(f"evaluate: metrics must be a non-empty sequence of names from {list(METRICS)}, "
                         f"got {metrics!r}")
    for m in metrics:
        check_choice("metric", m, METRICS)
    if len(set(metrics)) != len(metrics):
        raise ValueError(f"evaluate: metrics has duplicates: {list(metrics)}")
    if not isinstance(tta, bool):
        raise TypeError(f"evaluate: tta must be True or False, got {tta!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"evaluate: batch_size must be a positive int or None, got {batch_size!r}")
    sp = None
    if spacing is not None:
        ok = isinstance(spacing, Sequence) and not isinstance(spacing, str) and len(spacing) == 3
        sp = [float(v) for v in spacing] if ok and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                       for v in spacing) else None
        if sp is None or not all(math.isfinite(v) and v > 0 for v in sp):
            raise ValueError(f"evaluate: spacing must be three positive numbers (D, H, W) in mm, got {spacing!r}")
    return list(metrics), sp


def _resolve_model(
    model_or_run: Any, device: str | torch.device | None, record: dict[str, Any] | None, dim: int | None,
    patch_size: Sequence[int] | None, checkpoint: str,
) -> tuple[nn.Module, dict[str, Any], Path | None, Path | None, torch.device]:
    """-> (model, record, run directory or None, model file or None, device)."""
    import torch

    from sslseg.engine.run import Run, resolve_model

    overrides = dict(record or {}) if isinstance(record, dict) else record
    if isinstance(overrides, dict):
        overrides.update({k: v for k, v in (("dim", dim), ("patch_size", None if patch_size is None else list(patch_size)))
                          if v is not None})
    elif dim is not None or patch_size is not None:
        overrides = {k: v for k, v in (("dim", dim), ("patch_size", None if patch_size is None else list(patch_size)))
                     if v is not None}
    try:
        model, rec, ckpt = resolve_model(model_or_run, record=overrides, device=device, checkpoint=checkpoint,
                                         required=("dim", "patch_size"), caller="evaluate",
                                         argument="model")
    except ValueError as exc:
        if "record" not in str(exc):
            raise
        raise ValueError(f"{exc}. A bare nn.Module needs its geometry: pass dim= (2 or 3) and patch_size= (the "
                         "training patch), or record= (e.g. the record returned by sslseg.engine.load_model)") from None
    run_dir = model_or_run.dir if isinstance(model_or_run, Run) else None
    if run_dir is None and ckpt is not None and (ckpt.parent / "split.json").is_file():
        run_dir = ckpt.parent
    if ckpt is None and isinstance(model_or_run, Run):
        ckpt = run_dir / "best_val.pt"
    if isinstance(rec.get("dim"), bool) or rec.get("dim") not in (2, 3):
        raise ValueError(f"evaluate: dim must be 2 or 3, got {rec.get('dim')!r}")
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    return model.to(device), rec, run_dir, ckpt, device


def _resolve_cases(ds: Any, split: str, cases: Sequence[str] | None, run_dir: Path | None) -> tuple[list[str], str]:
    """-> (case ids, where the case list came from)."""
    from sslseg.data.errors import DataError, did_you_mean

    if cases is not None:
        if isinstance(cases, str) or not isinstance(cases, Sequence):
            raise TypeError(f"evaluate: cases must be a sequence of case ids, got {type(cases).__name__}")
        known = set(ds.cases)
        for c in cases:
            if c not in known:
                raise ValueError(f"evaluate: cases: {did_you_mean(str(c), ds.cases, f'case of {ds.name!r}')}")
        chosen, source = list(cases), "cases argument"
    elif split == "all":
        chosen, source = list(ds.cases), "all cases of the dataset"
    else:
        source, sp = "dataset default split", None
        if run_dir is not None and (run_dir / "split.json").is_file():
            try:
                sp, source = ds.load_split(run_dir / "split.json"), f"{run_dir / 'split.json'}"
            except DataError as exc:  # another dataset than the run's: its own split applies
                warnings.warn(f"evaluate: the run's split does not fit {ds.name!r} ({exc}); using that dataset's "
                              "default split", stacklevel=3)
        if sp is None:
            sp = ds.split()
        chosen = list({"test": sp.test_cases, "val": sp.val_cases, "train": sp.train_cases}[split])
    if not chosen:
        raise ValueError(f"evaluate: no cases to evaluate: split {split!r} of {ds.name!r} is empty ({source})")
    return chosen, source


def _read(ds: Any, volume_id: str, num_classes: int) -> tuple[Any, Any, tuple[float, ...] | None]:
    """``(image, label, stored spacing or None)`` of a volume as stored (the model's preprocessing
    is applied by the prediction, as for ``sslseg infer``); any failure names the volume and its file."""
    import numpy as np
    import torch

    from sslseg.data.errors import DataError
    from sslseg.data.fingerprint import read_raw

    rec = ds.raw_record(volume_id)
    try:
        image, label, _ = read_raw(rec, num_classes)
    except Exception as exc:  # h5py/nibabel/OS errors: one line that names the file
        location = rec.location
        text = str(exc) if location in str(exc) else f"{location}: {exc}"
        raise DataError(f"evaluate: cannot read volume {volume_id!r}: {text}") from exc
    if label is None:
        raise DataError(f"evaluate: volume {volume_id!r} ({rec.location}) has no label to score against")
    return torch.from_numpy(image), torch.from_numpy(np.asarray(label, dtype=np.int64)), rec.spacing(default=None)


def _volume_spacing(ds: Any, volume_id: str, override: list[float] | None) -> tuple[list[float], str]:
    """-> (spacing, source): the argument, the data's (stored or given to load()), else voxels."""
    if override is not None:
        return override, "argument"
    stored = ds.raw_record(volume_id).spacing(default=())
    if stored:
        return [float(v) for v in stored], "data"
    return [1.0, 1.0, 1.0], "none"


# ------------------------------------------------------------------------------------------ evaluate
def _summarize(rows: list[dict[str, Any]], classes: list[str], metrics: list[str],
               volume_means: dict[str, list[float]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """-> (summary, empty counts) of the rows; see :class:`EvaluationResult`."""

    def counts(selected: list[dict[str, Any]]) -> dict[str, int]:
        pred_only = sum(r["pred_empty"] and not r["gt_empty"] for r in selected)
        gt_only = sum(r["gt_empty"] and not r["pred_empty"] for r in selected)
        return {"both_empty": sum(r["pred_empty"] and r["gt_empty"] for r in selected),
                "one_empty": pred_only + gt_only, "pred_empty_only": pred_only, "gt_empty_only": gt_only}

    by_class = {c: [r for r in rows if r["class_name"] == c] for c in classes}
    summary = {"per_class": {c: {m: _stats([r[m] for r in sel]) for m in metrics} for c, sel in by_class.items()},
               "overall": {m: _stats(volume_means[m]) for m in metrics}}
    return summary, {"per_class": {c: counts(sel) for c, sel in by_class.items()}, "total": counts(rows)}


def evaluate(
    model: Any,
    data: Any = None,
    *,
    split: str = "test",
    cases: Sequence[str] | None = None,
    spacing: Sequence[float] | None = None,
    empty_policy: str = "penalty",
    tta: bool = False,
    device: str | torch.device | None = None,
    out: str | os.PathLike | bool | None = None,
    metrics: Sequence[str] = _DEFAULT_METRICS,
    batch_size: int | None = None,
    overlap: float = 0.5,
    record: dict[str, Any] | None = None,
    dim: int | None = None,
    patch_size: Sequence[int] | None = None,
    checkpoint: str = "best_val",
    amp: str | None = "none",
) -> EvaluationResult:
    """Score a trained model per case and class on a split, with the evaluation protocol's empty policy.

    Args:
        model: A :class:`sslseg.Run`, a run directory (its ``best_val.pt``), a model file
            written by ``sslseg fit`` (``best_val.pt``), or an ``nn.Module`` (then pass ``record=``
            or ``dim=`` and ``patch_size=``, and ``data=``).
        data: A dataset spec (folder or ``synthetic:...``) or a loaded ``CaseDataset``; default the
            data the model was trained on (its record).
        split: ``"test"``, ``"val"``, ``"train"`` (labeled + unlabeled) or ``"all"``. For a run
            (or a model file beside a ``split.json``) the run's saved split is used, so ``test``
            is the run's own held-out cases; otherwise the dataset's default split.
        cases: Explicit case ids instead of ``split``.
        spacing: ``(D, H, W)`` mm for every volume, overriding the data's. Otherwise each volume's
            own; files that store none (SSL4MIS h5) are scored in voxels, and the result says so.
        empty_policy: ``"penalty"`` (default), ``"nan"`` or ``"zero"``; see
            :mod:`sslseg.metrics.result`.
        tta: Average softmax probabilities over flips of the spatial axes (see
            :func:`sslseg.inference.predict_volume`).
        device: Where the model runs; default the model's device (a model file: CUDA if
            available). The model is moved there.
        out: Folder for ``evaluation_<split>.csv`` and ``.json``; default the run directory when a
            run is evaluated, else nothing is written; ``False`` writes nothing.
        metrics: Any of ``dice, jaccard, hd95, asd, assd, hausdorff``.
        batch_size: Slices (2D) or windows (3D) per forward pass.
        overlap: Sliding-window overlap (3D).
        record: The model record of a bare ``nn.Module`` (``dim``, ``patch_size``, ``num_classes``, ...).
        dim: Spatial dims of the network (2: slice-wise, 3: sliding window); overrides the record.
        patch_size: The training patch; overrides the record.
        checkpoint: For a run or run directory: ``best_val`` (the weights selected on validation,
            the default) or ``last`` (the final weights, ``last_model.pt``); the protocol reports both.
        amp: Precision of the network's forward passes: ``"none"`` (default: float32, so that a
            score does not depend on the machine that computed it), ``"auto"`` (bf16 autocast where
            the device computes bf16 natively; it moved a model's mean test Dice by up to 0.008 on
            the phantoms, ``benches/bench_amp.py``), ``"bf16"`` or ``"fp16"`` (CUDA); see
            :mod:`sslseg.utils.precision`. Probabilities, resampling and metrics are float32.

    Returns:
        The :class:`EvaluationResult` (``.table()`` for a markdown summary).

    Raises:
        ValueError: bad arguments; a model file that cannot be read or was written by an
            incompatible sslseg; data that does not fit the model (classes, channels); a volume
            that cannot be read or contains NaN.
        FileNotFoundError: the run directory or model file does not exist.

    Example:
        >>> run = sslseg.fit("mean_teacher", "synthetic:acdc", labeled=7)          # doctest: +SKIP
        >>> res = sslseg.evaluate(run, split="test", tta=True)                    # doctest: +SKIP
        >>> print(res.table())                                                    # doctest: +SKIP
    """
    import torch

    from sslseg._version import __version__
    from sslseg.data import load
    from sslseg.data.validate import check_cases
    from sslseg.inference.predict import predict_volume
    from sslseg.inference.preprocessing import Preprocessing
    from sslseg.metrics import segmentation_metrics
    from sslseg.utils.precision import resolve_amp

    metric_names, spacing_override = _check_options(split, empty_policy, metrics, spacing, batch_size, tta)
    if out is not None and not isinstance(out, (str, os.PathLike, bool)):
        raise TypeError(f"evaluate: out must be a folder path, None or False, got {type(out).__name__}")
    if out is True:
        raise ValueError("evaluate: out must be a folder path, None or False, got True")
    network, rec, run_dir, ckpt, device = _resolve_model(model, device, record, dim, patch_size, checkpoint)
    precision = resolve_amp(amp, device)

    if data is None:
        data = rec.get("data")
        if data is None:
            raise ValueError("evaluate: data= is required: the model carries no record of its training data")
    ds = load(data)
    num_classes = ds.num_classes
    if rec.get("num_classes") is not None and rec["num_classes"] != num_classes:
        raise ValueError(f"evaluate: the model predicts {rec['num_classes']} classes, dataset {ds.name!r} has "
                         f"{num_classes}")
    if rec.get("in_channels") is not None and rec["in_channels"] != ds.in_channels:
        raise ValueError(f"evaluate: the model takes {rec['in_channels']} input channel(s), dataset {ds.name!r} "
                         f"has {ds.in_channels}")
    case_ids, split_source = _resolve_cases(ds, split, cases, run_dir)
    # Bad files (labels out of range, NaN/Inf images, shape mismatches) are refused before any case
    # is scored, with the file named; verdicts are cached as for fit.
    check_cases(ds, case_ids)
    split_name = split if cases is None else "cases"
    names = list(ds.class_names or rec.get("class_names") or [f"class{i}" for i in range(num_classes)])
    in_channels = rec.get("in_channels")
    preprocessing = Preprocessing.from_record(rec)

    rows: list[dict[str, Any]] = []
    volume_ids: list[str] = []
    sources: set[str] = set()
    volume_means: dict[str, list[float]] = {m: [] for m in metric_names}
    was_training = network.training
    network.eval()
    try:
        for case in case_ids:
            for vid in ds.volumes_of(case):
                image, label, stored_spacing = _read(ds, vid, num_classes)
                volume_ids.append(vid)
                where = f"volume {vid!r} ({ds.raw_record(vid).location})"
                vsp, source = _volume_spacing(ds, vid, spacing_override)
                sources.add(source)
                # The scan as stored, through the model's preprocessing (the plan's crop, normalisation
                # and resampling, mapped back): scored on its own grid with its own spacing.
                pred = predict_volume(network, image.to(device), dim=rec["dim"], patch_size=list(rec["patch_size"]),
                                      tta=tta, overlap=overlap, sw_batch_size=batch_size, in_channels=in_channels,
                                      name=where, preprocessing=preprocessing, autocast_dtype=precision.dtype,
                                      spacing=stored_spacing or (vsp if source != "none" else None)).cpu()
                try:
                    scores = segmentation_metrics(pred, label, vsp, metrics=metric_names, num_classes=num_classes,
                                                  empty_policy=empty_policy)
                except ValueError as exc:
                    raise ValueError(f"evaluate: {where}: {exc}") from exc
                first = scores[metric_names[0]]
                for k in range(num_classes - 1):
                    row: dict[str, Any] = {"case": case, "volume_id": vid, "class": k + 1, "class_name": names[k + 1]}
                    row.update({m: float(scores[m].value[k]) for m in metric_names})
                    row.update(pred_empty=bool(first.pred_empty[k]), gt_empty=bool(first.gt_empty[k]))
                    rows.append(row)
                for m in metric_names:
                    volume_means[m].append(float(torch.nanmean(scores[m].value)))
    finally:
        network.train(was_training)

    summary, empty = _summarize(rows, names[1:], metric_names, volume_means)
    units = "mm" if "none" not in sources else ("voxels" if sources == {"none"} else "mixed")
    if units == "mixed":
        warnings.warn("evaluate: some volumes store no voxel spacing: their distances are in voxels, the others in "
                      "mm; pass spacing= to score all in mm", stacklevel=2)
    spacing_source = {"argument": "spacing argument", "data": "the data (stored or given to sslseg.data.load)",
                      "none": "none stored: distances in voxels"}
    settings = {
        "split": split_name,
        "split_source": split_source,
        "cases": case_ids,
        "volumes": len(volume_ids),
        "metrics": metric_names,
        "empty_policy": empty_policy,
        "empty_rule": _POLICY_RULES[empty_policy],
        "penalty": f"image diagonal of each volume ({units})" if empty_policy == "penalty" else None,
        "units": units,
        "spacing": spacing_override,
        "spacing_source": "; ".join(spacing_source[s] for s in sorted(sources)),
        "tta": tta,
        "tta_passes": (4 if rec["dim"] == 2 else 8) if tta else 1,
        "overall": "mean over volumes of each volume's mean over its foreground classes",
        "std": "population (ddof=0)",
        "dim": rec["dim"],
        "patch_size": list(rec["patch_size"]),
        "overlap": overlap if rec["dim"] == 3 else None,
        "model": rec.get("model"),
        "preprocessing": ("plan: crop, normalise, resample to " f"{preprocessing.plan.target_spacing} mm, "
                          "probabilities resampled back; scored on each volume's own grid and spacing")
        if preprocessing.plan is not None else f"per-volume intensity {preprocessing.intensity!r}",
        "method": rec.get("method"),
        "data": ds.name,
        "class_names": names,
        "checkpoint": str(ckpt) if ckpt is not None else None,
        "checkpoint_kind": checkpoint,
        "run_dir": str(run_dir) if run_dir is not None else None,
        "device": str(device),
        "sslseg_version": __version__,
        "model_sslseg_version": rec.get("sslseg_version"),
    }
    result = EvaluationResult(rows=rows, summary=summary, empty=empty, settings=settings)
    target = out if isinstance(out, (str, os.PathLike)) else None
    if out is None and _is_run(model):
        target = run_dir
    if target is not None:
        result.save(target)
    return result


def _is_run(model_or_run: Any) -> bool:
    """A Run or a run directory (not a bare module or model file): results go into the run by default."""
    from sslseg.engine.run import Run

    return isinstance(model_or_run, Run) or (isinstance(model_or_run, (str, os.PathLike))
                                             and Path(model_or_run).expanduser().is_dir())


# ------------------------------------------------------------------------------------------ CLI
def _cmd_evaluate(args: argparse.Namespace) -> int:
    target = Path(args.model).expanduser()
    out = args.out if args.out is not None else (target if target.is_dir() else target.parent)
    result = evaluate(str(target), args.data, split=args.split, spacing=args.spacing, empty_policy=args.empty_policy,
                      tta=args.tta, device=args.device, out=out, batch_size=args.batch_size, checkpoint=args.checkpoint,
                      amp=args.amp)
    print(result.table())
    for path in result.files:
        print(f"wrote {path}")
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``sslseg evaluate``."""
    p = sub.add_parser(
        "evaluate",
        help="score a trained model per case and class (Dice, Jaccard, HD95, ASD)",
        description="Evaluate a run directory (its best_val.pt and saved split) or a model file on a split. Writes "
                    "evaluation_<split>.csv (one row per volume and class) and .json (settings, summary, empty-mask "
                    "counts, rows) into the run directory (or --out) and prints a markdown summary.",
    )
    p.add_argument("model", metavar="RUN_DIR_OR_MODEL", help="run directory or model file (best_val.pt)")
    p.add_argument("--data", default=None, help="dataset spec (default: the data the model was trained on)")
    p.add_argument("--split", default="test", choices=SPLITS, help="cases to evaluate (default test)")
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    p.add_argument("--checkpoint", default="best_val", choices=("best_val", "last"),
                   help="for a run directory: the best validation weights (default) or the final ones")
    p.add_argument("--empty-policy", default="penalty", choices=("penalty", "nan", "zero"),
                   help="scoring of empty masks (default penalty: Dice 0 / image diagonal when one side is empty)")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("D", "H", "W"), default=None,
                   help="voxel spacing in mm for every volume (default: the data's; h5 files store none -> voxels)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--batch-size", type=int, default=None, help="slices (2D) or windows (3D) per forward pass")
    p.add_argument("--amp", default="none", choices=AMP_CHOICES,
                   help="precision of the forward passes (default none: float32, scores comparable across machines; "
                        "auto: bf16 where the CPU/GPU has it natively)")
    p.add_argument("--out", default=None, help="output folder (default: the run directory / the model's folder)")
    p.set_defaults(func=_cmd_evaluate)
