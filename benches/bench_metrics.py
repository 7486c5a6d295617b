"""Bench: surface metrics (HD95, ASD) against medpy and MONAI, with their values.

Variants, on the same mask pair, timed round-robin in one process (min / median ms per call):
  sslseg_hd95     sslseg.metrics.hd95(pred, gt, spacing)
  sslseg_asd      sslseg.metrics.asd(pred, gt, spacing)             (directed pred -> gt, as medpy)
  sslseg_both     sslseg.metrics.segmentation_metrics(..., metrics=("hd95", "asd")): one distance pass
  medpy_hd95      medpy.metric.binary.hd95(pred, gt, voxelspacing=spacing)
  medpy_asd       medpy.metric.binary.asd(pred, gt, voxelspacing=spacing)
  monai_hd95      monai.metrics.compute_hausdorff_distance(percentile=95, spacing=spacing)
  monai_asd       monai.metrics.compute_average_surface_distance(symmetric=False, spacing=spacing)
sslseg runs with --threads torch threads (default 2); medpy and MONAI (scipy inside) use one.
With --device cuda, the sslseg variants take CUDA tensors.

Masks: LA-like (left-atrium-like) pairs: an ellipsoid whose radius is modulated by smooth noise
plus a "vein" lobe; the prediction is a shifted, differently-wobbled copy plus a small false
positive island. Shapes (D, H, W) = (80, 112, 112) and (160, 256, 256) (the same shapes scaled
x2), spacing (1.0, 0.625, 0.625) for the small one and (0.625, 0.3125, 0.3125) for the big one.

Values: medpy's hd95 (percentile of the union of both directions) is what sslseg implements;
MONAI's HD95 is the max of the two directed percentiles and can differ (reported, not asserted).

Usage: python benches/bench_metrics.py [--smoke] [--device cpu|cuda] [--threads N] [--rounds R] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import metadata, time_round_robin, write_json  # noqa: E402

import sslseg.metrics as M  # noqa: E402
import sslseg.ops  # noqa: E402

try:
    from medpy.metric import binary as medpy_binary
except ImportError:  # pragma: no cover - bench-only dependency
    medpy_binary = None
try:
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance
except ImportError:  # pragma: no cover - bench-only dependency
    compute_hausdorff_distance = compute_average_surface_distance = None


def _wobbly_ellipsoid(shape, center, radii, seed, amp=0.12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=max(2.0, min(shape) / 12))
    noise /= np.abs(noise).max() + 1e-12
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii))
    return r2 <= (1.0 + amp * noise) ** 2


def la_pair(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    d, h, w = shape
    c = np.array([d * 0.5, h * 0.5, w * 0.5])
    radii = np.array([d * 0.28, h * 0.22, w * 0.25])
    gt = _wobbly_ellipsoid(shape, c, radii, seed)
    vein = _wobbly_ellipsoid(shape, c + [0, -h * 0.22, w * 0.18], [d * 0.08, h * 0.12, w * 0.06], seed + 1, 0.05)
    gt |= vein
    shift = np.array([d * 0.012, h * 0.018, -w * 0.01])
    pred = _wobbly_ellipsoid(shape, c + shift, radii * 0.98, seed + 2) | np.roll(vein, (1, 1), axis=(0, 1))
    island = _wobbly_ellipsoid(shape, c + [d * 0.33, h * 0.3, 0], [d * 0.04, h * 0.03, w * 0.03], seed + 3, 0.0)
    return pred | island, gt


def make_cases(smoke: bool) -> dict[str, tuple[tuple[int, int, int], tuple[float, float, float]]]:
    if smoke:
        return {"la_32x48x48": ((32, 48, 48), (1.0, 0.625, 0.625))}
    return {"la_112x112x80": ((80, 112, 112), (1.0, 0.625, 0.625)),
            "la_256x256x160": ((160, 256, 256), (0.625, 0.3125, 0.3125))}


def run_case(name: str, shape, spacing, device: str, rounds: int) -> dict:
    pred, gt = la_pair(shape)
    tp, tg = torch.from_numpy(pred).to(device), torch.from_numpy(gt).to(device)
    sp = list(spacing)
    variants = {
        "sslseg_hd95": lambda: M.hd95(tp, tg, sp),
        "sslseg_asd": lambda: M.asd(tp, tg, sp),
        "sslseg_both": lambda: M.segmentation_metrics(tp, tg, sp, metrics=("hd95", "asd")),
    }
    values = {"sslseg_hd95": M.hd95(tp, tg, sp).item(), "sslseg_asd": M.asd(tp, tg, sp).item()}
    if medpy_binary is not None:
        variants["medpy_hd95"] = lambda: medpy_binary.hd95(pred, gt, voxelspacing=spacing)
        variants["medpy_asd"] = lambda: medpy_binary.asd(pred, gt, voxelspacing=spacing)
        values["medpy_hd95"] = float(medpy_binary.hd95(pred, gt, voxelspacing=spacing))
        values["medpy_asd"] = float(medpy_binary.asd(pred, gt, voxelspacing=spacing))
    if compute_hausdorff_distance is not None:
        cp, cg = torch.from_numpy(pred)[None, None], torch.from_numpy(gt)[None, None]
        variants["monai_hd95"] = lambda: compute_hausdorff_distance(cp, cg, include_background=True, percentile=95, spacing=sp)
        variants["monai_asd"] = lambda: compute_average_surface_distance(cp, cg, include_background=True, symmetric=False, spacing=sp)
        values["monai_hd95"] = float(variants["monai_hd95"]())
        values["monai_asd"] = float(variants["monai_asd"]())
    timings = time_round_robin(variants, device=device, rounds=rounds, min_sample_s=0.0)
    rel = {}
    for m in ("hd95", "asd"):
        if f"medpy_{m}" in values:
            rel[f"{m}_vs_medpy"] = abs(values[f"sslseg_{m}"] - values[f"medpy_{m}"]) / max(abs(values[f"medpy_{m}"]), 1e-12)
    return {"case": name, "shape": list(shape), "spacing": list(spacing), "gt_voxels": int(gt.sum()),
            "pred_voxels": int(pred.sum()), "dice": float(M.dice(tp, tg).item()), "timings": timings,
            "values": values, "rel_diff": rel}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="small sizes, few rounds (CI)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch threads for sslseg (default 2)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON path (default benches/results/metrics_<device>[_smoke].json)")
    args = p.parse_args(argv)
    sslseg.ops.require_ops()
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (2 if args.smoke else 5)
    results = [run_case(n, s, sp, args.device, rounds) for n, (s, sp) in make_cases(args.smoke).items()]

    print(f"Surface metrics, device {args.device}, sslseg {args.threads} threads; medpy "
          f"{'present' if medpy_binary else 'MISSING'}, MONAI {'present' if compute_hausdorff_distance else 'MISSING'}; "
          "min / median ms")
    order = ["sslseg_hd95", "sslseg_asd", "sslseg_both", "medpy_hd95", "medpy_asd", "monai_hd95", "monai_asd"]
    print("| variant | " + " | ".join(f"{r['case']} (Dice {r['dice']:.3f})" for r in results) + " |")
    print("|" + "---|" * (len(results) + 1))
    for v in order:
        cells = []
        for r in results:
            t = r["timings"].get(v)
            val = r["values"].get(v)
            cells.append("-" if t is None else f"{t['min_ms']:.1f} / {t['median_ms']:.1f}" + (f" (= {val:.4f})" if val is not None else ""))
        print(f"| {v} | " + " | ".join(cells) + " |")
    for r in results:
        t = r["timings"]
        parts = [f"{r['case']}:"]
        for m in ("hd95", "asd"):
            for peer in ("monai", "medpy"):
                if f"{peer}_{m}" in t:
                    parts.append(f"{m} {t[f'{peer}_{m}']['min_ms'] / t[f'sslseg_{m}']['min_ms']:.1f}x faster than {peer};")
        parts += [f"{k} rel diff {v:.1e};" for k, v in r["rel_diff"].items()]
        print(" ".join(parts))
    out = args.out or f"benches/results/metrics_{args.device}{'_smoke' if args.smoke else ''}.json"
    write_json(out, {"bench": "metrics", "meta": metadata(args.device), "threads": args.threads, "results": results})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
