"""Bench: bringing your own scans, on ``synthetic:ct`` (the data-layer half of issue 13).

Measured:
  1. preprocessing seconds per volume (crop, CT normalisation, resampling to the plan's spacing,
     memory-mappable .npy writes) with ``--jobs 1`` and ``--jobs 2``, each into an empty cache;
  2. training-batch reads per second, the loader's read path only (no network):
     ``cache``  the preprocessed volumes, memory-mapped: a patch per sample (one in three labeled
                patches centred on a foreground voxel), then flips / rot90 (``Augment3D``);
     ``nifti``  today's path without a plan: the NIfTI files decoded on the fly (with the
                loader's per-process LRU of 8 decoded volumes), per-volume z-score, a random crop
                of the whole volume, flips / rot90.
     Same split, same batch composition (labeled_bs + unlabeled_bs), same patch size, the same
     sequence of sample indices; one process, ``rounds`` interleaved rounds of ``batches``
     batches; best and median rate reported.
  3. label resampling, the choice in :mod:`sslseg.data.resample`: every labeled volume resampled
     to the plan's target spacing and back to its own grid, Dice vs the original label (mean over
     volumes of the mean over the foreground classes present, and for the smallest organ), for
     per-class linear + argmax and for nearest neighbour.

  4. test Dice and HD95 (``sslseg.evaluate``: each test scan predicted through the model's
     preprocessing and scored on its own grid, in mm) of ``supervised`` and ``cps`` trained with
     the plan (crop, CT normalisation, resampling to the plan's spacing, foreground-oversampled
     patches from the cache) against today's path (``use_plan=False``: the NIfTI files as stored,
     per-volume z-score, no resampling, uniform patches), with the same budget: iterations (40;
     ``--iterations``), the plan's patch and batch size, the default 3D U-Net (a narrow one and 4
     iterations for ``--smoke``), seed;
  5. spacing robustness: every test scan (image and label) resampled to 0.6x and 1.7x its own
     spacing, segmented by ``sslseg.infer`` with that spacing and scored against the equally
     resampled labels (label resampling: per-class linear + argmax); target: mean Dice within 0.02
     of the native-spacing Dice. Today's path is shown too (it feeds the network whatever grid
     the scan has).

Usage: python benches/bench_own_data.py [--smoke] [--iterations N] [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import metadata, write_json  # noqa: E402


def _batches(split_sizes: tuple[int, int], lbs: int, ubs: int, n: int, seed: int) -> list[list[tuple[int, int]]]:
    n_lab, n_unl = split_sizes
    rng = np.random.default_rng(seed)
    out = []
    for b in range(n):
        keys = [(int(i), int(rng.integers(1 << 31))) for i in rng.integers(0, n_lab, lbs)]
        keys += [(n_lab + int(i), int(rng.integers(1 << 31))) for i in rng.integers(0, n_unl, ubs)]
        out.append(keys)
    return out


def _label_round_trip(ds, plan) -> dict[str, dict[str, float]]:
    from sslseg.data.fingerprint import has_label, read_raw
    from sslseg.data.resample import resample_label

    out: dict[str, dict[str, list[float]]] = {m: {"mean": [], "smallest": []} for m in ("linear", "nearest")}
    for vid in ds.volume_ids:
        rec = ds.raw_record(vid)
        if not has_label(rec):
            continue
        _, lab, sp = read_raw(rec, plan.num_classes)
        for mode, acc in out.items():
            there = resample_label(lab, sp, plan.target_spacing, mode=mode, num_classes=plan.num_classes)
            back = resample_label(there, plan.target_spacing, sp, new_shape=lab.shape, mode=mode, num_classes=plan.num_classes)
            dice = {}
            for c in range(1, plan.num_classes):
                a, b = lab == c, back == c
                if a.any():
                    dice[c] = 2 * float((a & b).sum()) / float(a.sum() + b.sum())
            acc["mean"].append(float(np.mean(list(dice.values()))))
            if plan.num_classes - 1 in dice:
                acc["smallest"].append(dice[plan.num_classes - 1])
    return {m: {"mean_dice": float(np.mean(v["mean"])), "smallest_organ_dice": float(np.mean(v["smallest"])),
                "volumes": len(v["mean"])} for m, v in out.items()}


FACTORS = (1.0, 0.6, 1.7)


def _resampled_case(ds, vid: str, factor: float):
    """A test scan and its label as stored, or resampled to ``factor`` x its spacing."""
    from sslseg.data.fingerprint import read_raw
    from sslseg.data.resample import resample_image, resample_label

    image, label, spacing = read_raw(ds.raw_record(vid), ds.num_classes)
    if factor == 1.0:
        return image, label, spacing
    new = tuple(s * factor for s in spacing)
    return (resample_image(image, spacing, new), resample_label(label, spacing, new, num_classes=ds.num_classes), new)


def _train_and_score(root: Path, out: Path, *, split_labeled: int, patch: list[int], batch: int, iterations: int,
                     channels: list[int] | None) -> dict[str, dict]:
    """Parts 4 and 5: train each method with and without the plan, same budget; score on the test split."""
    import warnings

    import sslseg
    from sslseg.data import load
    from sslseg.metrics import segmentation_metrics

    ds = load(root)
    results: dict[str, dict] = {}
    for method in ("supervised", "cps"):
        for path in ("plan", "today"):
            engine = dict(iterations=iterations, batch_size=batch, patch_size=patch, val_every=iterations,
                          log_every=iterations, progress=False, device="cpu", use_plan=path == "plan",
                          model_options=dict(channels=channels) if channels else {})
            t0 = time.perf_counter()
            run = sslseg.fit(method, str(root), labeled=split_labeled, seed=0, out_dir=out / f"{method}-{path}",
                             engine_options=engine)
            train_s = time.perf_counter() - t0
            ev = sslseg.evaluate(run, split="test", metrics=("dice", "hd95"), out=False)
            test_vids = list(dict.fromkeys(r["volume_id"] for r in ev.rows))
            spacing_dice = {}
            for factor in FACTORS:
                dices = []
                for vid in test_vids:
                    image, label, spacing = _resampled_case(ds, vid, factor)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # today's path warns about the spacing: measured here
                        pred = sslseg.infer(run.model, image, spacing=spacing)
                    scores = segmentation_metrics(pred, torch.from_numpy(label.astype(np.int64)), list(spacing),
                                                  metrics=("dice",), num_classes=ds.num_classes, empty_policy="penalty")
                    dices.append(float(scores["dice"].value.mean()))
                spacing_dice[f"{factor:g}x"] = float(np.mean(dices))
            native = spacing_dice["1x"]
            results[f"{method}/{path}"] = {
                "dice": ev.summary["overall"]["dice"]["mean"], "hd95_mm": ev.summary["overall"]["hd95"]["mean"],
                "train_s": train_s, "test_volumes": len(test_vids), "spacing_dice": spacing_dice, "patch": patch,
                "batch": batch,
                "max_abs_diff_vs_native": max(abs(native - v) for v in spacing_dice.values()),
                "within_0.02": all(abs(v - native) <= 0.02 for v in spacing_dice.values()),
            }
    return results


def _print_trained(trained: dict[str, dict], iterations: int) -> None:
    first = next(iter(trained.values()))
    print(f"test split, {iterations} iterations, the plan's patch {first['patch']} and batch {first['batch']} "
          "(cps: half labeled), same network and seed for both paths")
    print(f"{'method / path':24s} {'Dice':>7s} {'HD95 mm':>8s} {'Dice ratio':>10s} {'train s':>8s}")
    for key, v in trained.items():
        base = trained[key.split("/")[0] + "/today"]["dice"]
        print(f"{key:24s} {v['dice']:7.4f} {v['hd95_mm']:8.2f} {v['dice'] / max(base, 1e-9):9.2f}x {v['train_s']:8.1f}")
    print(f"{'spacing robustness':24s} " + " ".join(f"{'Dice ' + f:>9s}" for f in ("1x", "0.6x", "1.7x"))
          + f" {'max |diff|':>10s} {'<=0.02':>7s}")
    for key, v in trained.items():
        d = v["spacing_dice"]
        print(f"{key:24s} " + " ".join(f"{d[f]:9.4f}" for f in ("1x", "0.6x", "1.7x"))
              + f" {v['max_abs_diff_vs_native']:10.4f} {'yes' if v['within_0.02'] else 'no':>7s}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny data, few batches (CI; well under a minute)")
    parser.add_argument("--out", default=None, help="JSON output (default benches/results/own_data[_smoke].json)")
    parser.add_argument("--iterations", type=int, default=None, help="training steps per run (default 4 smoke, 100 full)")
    args = parser.parse_args()
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="sslseg_bench_own_"))
    os.environ["SSLSEG_CACHE"] = str(tmp / "cache")  # fresh fingerprints and caches

    import sslseg.data as D
    from sslseg.data.loader import TrainSamples
    from sslseg.data.samplers import PatchSampler
    from sslseg.data.transforms import Augment3D

    if args.smoke:
        opts, patch, lbs, ubs, batches, rounds = dict(num_cases=4, unlabeled=2, test=1, size=24), (16, 32, 32), 2, 2, 4, 2
    else:
        opts, patch, lbs, ubs, batches, rounds = dict(num_cases=12, unlabeled=4, test=4, size=64), (32, 64, 64), 2, 2, 20, 5
    root = D.make_synthetic("ct", tmp / "ct", **opts)
    ds = D.load(root)
    t0 = time.perf_counter()
    plan = D.plan(ds)
    plan_s = time.perf_counter() - t0
    n_vol = len(ds.volume_ids)
    prep = {}
    for jobs in (1, 2):
        t0 = time.perf_counter()
        D.preprocess(ds, plan, out=tmp / f"cache_j{jobs}", jobs=jobs, progress=False)
        dt = time.perf_counter() - t0
        prep[f"jobs{jobs}"] = {"seconds": dt, "seconds_per_volume": dt / n_vol}

    split = ds.split(labeled=2 if args.smoke else 4, seed=0)
    raw = D.load(root)
    cached = D.load(root).prepare(plan, out=tmp / "cache_j1", progress=False)
    with torch.no_grad():
        nifti_samples = TrainSamples(raw, split.labeled_cases, split.unlabeled_cases, Augment3D(patch), seed=0)
        cache_samples = TrainSamples(cached, split.labeled_cases, split.unlabeled_cases, Augment3D(patch, foreground_prob=0.0),
                                     seed=0, patch_sampler=PatchSampler(patch, plan.foreground_oversample))
        sizes = (nifti_samples.n_labeled, len(nifti_samples) - nifti_samples.n_labeled)
        plan_keys = _batches(sizes, lbs, ubs, batches * rounds, seed=0)
        rates: dict[str, list[float]] = {"cache": [], "nifti": []}
        for r in range(rounds):
            keys = plan_keys[r * batches:(r + 1) * batches]
            for name, samples in (("nifti", nifti_samples), ("cache", cache_samples)):
                t0 = time.perf_counter()
                for k in keys:
                    D.collate(samples.__getitems__(k))
                rates[name].append(batches / (time.perf_counter() - t0))
    labels = _label_round_trip(raw, plan)
    iterations = args.iterations or (4 if args.smoke else 40)
    # The plan's patch and batch for both paths; the default 3D U-Net (a narrow one for --smoke).
    trained = _train_and_score(root, tmp / "runs", split_labeled=2 if args.smoke else 4, patch=list(plan.patch_size),
                               batch=plan.batch_size, iterations=iterations, channels=[4, 8] if args.smoke else None)
    reads = {name: {"best_batches_per_s": max(v), "median_batches_per_s": statistics.median(v)} for name, v in rates.items()}
    ratio = reads["cache"]["median_batches_per_s"] / reads["nifti"]["median_batches_per_s"]

    print(f"synthetic:ct {opts}: {n_vol} volumes, plan {plan.target_spacing} mm, patch {list(patch)} (plan: {plan.patch_size}), "
          f"planning {plan_s:.2f} s")
    print(f"{'preprocess':24s} {'s/volume':>10s} {'total s':>9s} {'speed-up':>9s}")
    for k, v in prep.items():
        print(f"{k:24s} {v['seconds_per_volume']:10.3f} {v['seconds']:9.2f} "
              f"{prep['jobs1']['seconds'] / v['seconds']:8.2f}x")
    print(f"{'reads (batch ' + str(lbs) + '+' + str(ubs) + ')':24s} {'best b/s':>10s} {'median b/s':>11s} {'ratio':>7s}")
    for name in ("nifti", "cache"):
        v = reads[name]
        print(f"{name:24s} {v['best_batches_per_s']:10.1f} {v['median_batches_per_s']:11.1f} "
              f"{v['median_batches_per_s'] / reads['nifti']['median_batches_per_s']:6.2f}x")
    print(f"{'label round trip':24s} {'mean Dice':>10s} {'smallest organ':>15s}")
    for mode, v in labels.items():
        print(f"{mode:24s} {v['mean_dice']:10.4f} {v['smallest_organ_dice']:15.4f}")
    _print_trained(trained, iterations)
    payload = {
        "bench": "own_data", "smoke": args.smoke, "options": opts, "volumes": n_vol, "patch": list(patch),
        "batch": [lbs, ubs], "plan": plan.to_dict(), "planning_s": plan_s, "preprocess": prep, "reads": reads,
        "cache_vs_nifti_ratio": ratio, "label_resampling_round_trip": labels, "iterations": iterations,
        "training": trained, "meta": metadata("cpu"), "total_s": time.perf_counter() - t_start,
    }
    out = args.out or str(Path(__file__).resolve().parent / "results" / ("own_data_smoke.json" if args.smoke else "own_data.json"))
    print(f"wrote {write_json(out, payload)} in {payload['total_s']:.1f} s")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
