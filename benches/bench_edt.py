"""Bench: the exact Euclidean distance transform against scipy and the `edt` package.

Variants, on the same masks, timed round-robin in one process (min / median ms):
  sslseg_bool     sslseg.ops.edt on a bool mask (isotropic: the exact float32 path)
  sslseg_uint8    the same on a uint8 mask
  sslseg_aniso    bool mask, anisotropic spacing (2.5, 0.7, 0.7): the float64 path
  edt_uint8       `edt.edt(mask, parallel=T)` (seung-lab, the fastest public CPU EDT), uint8 input
  edt_bool        the same on bool input (edt converts it: slower)
  edt_aniso       `edt.edt(uint8, anisotropy=(2.5, 0.7, 0.7), parallel=T)`
  scipy           `scipy.ndimage.distance_transform_edt` (single-threaded, float64)
  reference       sslseg's pure-PyTorch twin (brute force per line; smallest case only)
sslseg runs with T torch threads and edt with parallel=T: equal thread counts (--threads, default 2).
With --device cuda, the sslseg variants run on the GPU (synchronised), the others stay on the CPU.

Masks: "blobs": Gaussian-smoothed white noise (sigma 4 voxels; 2 for the smaller case) thresholded
at its 70th percentile (30 % foreground), seed 0; shapes (160, 256, 256) and (80, 112, 112)
(D, H, W; W contiguous). Each variant's output is checked against scipy (max abs difference).

Usage: python benches/bench_edt.py [--smoke] [--device cpu|cuda] [--threads N] [--rounds R] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import add_load_argument, busy_load, load_suffix, metadata, time_round_robin, write_json  # noqa: E402

import sslseg.ops  # noqa: E402
from sslseg.ops.edt import _reference  # noqa: E402

try:
    import edt as edt_pkg
except ImportError:  # pragma: no cover - bench-only dependency
    edt_pkg = None

ANISO = (2.5, 0.7, 0.7)


def blobs(shape: tuple[int, ...], sigma: float, frac: float = 0.3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return x > np.quantile(x, 1.0 - frac)


def make_cases(smoke: bool) -> dict[str, tuple[np.ndarray, bool]]:
    """name -> (mask, run the reference twin)."""
    if smoke:
        return {"blobs_40x48x44": (blobs((40, 48, 44), 2.0), True), "blobs2d_8x96x96": (blobs((8, 96, 96), 2.0), False)}
    return {"blobs_112x112x80": (blobs((80, 112, 112), 2.0), True), "blobs_256x256x160": (blobs((160, 256, 256), 4.0), False)}


def run_case(name: str, mask: np.ndarray, with_reference: bool, device: str, threads: int, rounds: int) -> dict:
    is2d = name.startswith("blobs2d")
    spacing = [1.0, 1.0] if is2d else [1.0, 1.0, 1.0]
    mb = torch.from_numpy(mask).to(device)
    mu = mb.to(torch.uint8)
    u8 = mask.astype(np.uint8)
    op = torch.ops.sslseg.edt.default

    def scipy_fn() -> np.ndarray:
        if is2d:
            return np.stack([ndimage.distance_transform_edt(m) for m in mask])
        return ndimage.distance_transform_edt(mask)

    variants = {
        "sslseg_bool": lambda: op(mb, spacing),
        "sslseg_uint8": lambda: op(mu, spacing),
    }
    if not is2d:
        variants["sslseg_aniso"] = lambda: op(mb, list(ANISO))
    if edt_pkg is not None:
        if is2d:
            variants["edt_uint8"] = lambda: [edt_pkg.edt(m, parallel=threads) for m in u8]
            variants["edt_bool"] = lambda: [edt_pkg.edt(m, parallel=threads) for m in mask]
        else:
            variants["edt_uint8"] = lambda: edt_pkg.edt(u8, parallel=threads)
            variants["edt_bool"] = lambda: edt_pkg.edt(mask, parallel=threads)
            variants["edt_aniso"] = lambda: edt_pkg.edt(u8, anisotropy=ANISO, parallel=threads)
    variants["scipy"] = scipy_fn
    if with_reference:
        variants["reference"] = lambda: _reference(mb, spacing)

    # Agreement with scipy (float32 rounding of the float64 result).
    expected = scipy_fn().astype(np.float32)
    check = {"sslseg_bool": op(mb, spacing).cpu().numpy(), "sslseg_uint8": op(mu, spacing).cpu().numpy()}
    if not is2d:
        check["sslseg_aniso"] = op(mb, list(ANISO)).cpu().numpy()
    agree = {}
    for k, v in check.items():
        ref = expected if k != "sslseg_aniso" else ndimage.distance_transform_edt(mask, sampling=ANISO).astype(np.float32)
        agree[k] = {"max_abs_diff": float(np.abs(v - ref).max()), "equal": bool(np.array_equal(v, ref))}

    timings = time_round_robin(variants, device=device, rounds=rounds, min_sample_s=0.0)
    return {"case": name, "shape": list(mask.shape), "fg_fraction": float(mask.mean()), "timings": timings, "agreement": agree}


def _agreement(a: dict) -> str:
    return "==" if a["equal"] else "max|d|={:.2g} vs".format(a["max_abs_diff"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="small sizes, few rounds (CI)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch threads = edt parallel (default 2)")
    p.add_argument("--rounds", type=int, default=None)
    add_load_argument(p)
    p.add_argument("--out", default=None, help="JSON path (default benches/results/edt_<device>[_loadN][_smoke].json)")
    args = p.parse_args(argv)
    sslseg.ops.require_ops()
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (2 if args.smoke else 7)
    cases = make_cases(args.smoke)
    with busy_load(args.load):
        results = [run_case(n, m, ref, args.device, args.threads, rounds) for n, (m, ref) in cases.items()]

    print(f"EDT, device {args.device}, {args.threads} threads (torch) = parallel={args.threads} (edt), load {args.load}; "
          f"edt package {'present' if edt_pkg is not None else 'MISSING'}; min / median ms")
    order = ["sslseg_bool", "sslseg_uint8", "sslseg_aniso", "edt_uint8", "edt_bool", "edt_aniso", "scipy", "reference"]
    print("| variant | " + " | ".join(f"{r['case']} ({r['fg_fraction'] * 100:.0f} % fg)" for r in results) + " |")
    print("|" + "---|" * (len(results) + 1))
    for v in order:
        cells = []
        for r in results:
            t = r["timings"].get(v)
            cells.append("-" if t is None else f"{t['min_ms']:.1f} / {t['median_ms']:.1f}")
        print(f"| {v} | " + " | ".join(cells) + " |")
    for r in results:
        t = r["timings"]
        line = [f"{r['case']}:"]
        for ours, theirs in [("sslseg_uint8", "edt_uint8"), ("sslseg_bool", "edt_bool"), ("sslseg_bool", "edt_uint8"),
                             ("sslseg_aniso", "edt_aniso"), ("sslseg_bool", "scipy")]:
            if ours in t and theirs in t:
                line.append(f"{ours} {t[theirs]['min_ms'] / t[ours]['min_ms']:.2f}x faster than {theirs};")
        agree = ", ".join(f"{k} {_agreement(a)} scipy" for k, a in r["agreement"].items())
        print(" ".join(line) + " " + agree)
    out = args.out or f"benches/results/edt_{args.device}{load_suffix(args.load)}{'_smoke' if args.smoke else ''}.json"
    write_json(out, {"bench": "edt", "meta": metadata(args.device, args.load), "load": args.load, "threads": args.threads,
                     "edt_package": edt_pkg is not None, "results": results})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
