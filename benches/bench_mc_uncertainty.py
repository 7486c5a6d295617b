"""Bench: MC-dropout uncertainty (UA-MT), streaming ops against stack-then-reduce.

The non-network part of UA-MT's uncertainty: given T stochastic passes (logits), the mean softmax
and the predictive entropy -sum_c p log(p + 1e-6). Variants, on the same logits, timed round-robin:
  sslseg       sslseg.ops.predictive_entropy: fused softmax-accumulate per pass, fused finalise
  reference    the same streaming algorithm on the pure-PyTorch twins (softmax, add_, xlogy, sum)
  ssl4mis      SSL4MIS UA-MT: copy the passes into a preallocated (T*B, C, *S) buffer, softmax it,
               reshape to (T, B, C, *S), mean over T, entropy
  stack        torch.stack of the T outputs, softmax, mean over T, entropy

Peak extra memory is measured per variant in a fresh subprocess, with the passes produced one at a
time by a fake network (a copy of stored logits, freed when the variant lets go of it): on CPU the
resident-set peak above the baseline, with glibc's mmap threshold lowered so freed tensors return
to the OS; on CUDA torch.cuda.max_memory_allocated above the baseline.

Timing: round-robin, min and median; before each sample the bench waits for the shared host to be
quiet and redoes disturbed samples (bench_sliding_window.timed_sample).

Cases (issue 6): T=8, (12, 4, 256, 256) (SSL4MIS 2D UA-MT) and (2, 2, 112, 112, 80) (3D UA-MT).

Usage: python benches/bench_mc_uncertainty.py [--smoke] [--device cpu|cuda] [--threads N] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import add_load_argument, busy_load, load_suffix, metadata, write_json  # noqa: E402
from bench_sliding_window import QUIET, timed_sample  # noqa: E402

import sslseg.ops  # noqa: E402
from sslseg.ops.mc_uncertainty import _reference_accumulate, _reference_finalize  # noqa: E402

VARIANTS = ("sslseg", "reference", "ssl4mis", "stack")


def sslseg_variant(passes, T: int):
    return sslseg.ops.predictive_entropy(passes)


def reference_variant(passes, T: int):
    acc, n = None, 0
    for x in passes:
        if acc is None:
            acc = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        _reference_accumulate(acc, x, n == 0)
        n += 1
    return acc, _reference_finalize(acc, n, False, 1e-6)


def ssl4mis_variant(passes, T: int):
    """SSL4MIS train_uncertainty_aware_mean_teacher: each pass is copied into the buffer as it comes."""
    preds = None
    for t, x in enumerate(passes):
        b = x.shape[0]
        if preds is None:
            preds = torch.zeros((T * b, *x.shape[1:]), device=x.device)
        preds[t * b:(t + 1) * b] = x
        del x
    preds = F.softmax(preds, dim=1)
    preds = preds.reshape(T, b, *preds.shape[1:])
    preds = torch.mean(preds, dim=0)
    uncertainty = -1.0 * torch.sum(preds * torch.log(preds + 1e-6), dim=1, keepdim=True)
    return preds, uncertainty


def stack_variant(passes, T: int):
    p = F.softmax(torch.stack(list(passes)), dim=2).mean(0)
    return p, -torch.sum(p * torch.log(p + 1e-6), dim=1, keepdim=True)


FNS = {"sslseg": sslseg_variant, "reference": reference_variant, "ssl4mis": ssl4mis_variant, "stack": stack_variant}


def make_logits(shape, T, device):
    g = torch.Generator().manual_seed(0)
    return [(3 * torch.randn(shape, generator=g)).to(device) for _ in range(T)]


# ---- memory: one variant in a fresh process --------------------------------------------------------


_STORED: dict = {}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_memory(variant: str, shape, T: int, device: str) -> float:
    """MB of extra memory at the peak of one run (called in the child process)."""
    stored = _STORED.setdefault((tuple(shape), T, device), make_logits(shape, T, device))

    def fake_network():  # each pass: a fresh output tensor, as a forward pass would produce
        for x in stored:
            yield x.clone()

    FNS[variant](fake_network(), T)  # warm up (allocator, thread pool)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = FNS[variant](fake_network(), T)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak / 1e6
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    out = FNS[variant](fake_network(), T)
    peak[0] = max(peak[0], _rss_bytes())
    stop.set()
    th.join()
    del out
    return (peak[0] - base) / 1e6


def memory_in_subprocess(shape, T: int, device: str, threads: int | None) -> dict[str, float]:
    """Peak extra MB of every variant, measured one after the other in one fresh process."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    cmd = [sys.executable, __file__, "--mem-child", json.dumps([list(shape), T, device])]
    if threads:
        cmd += ["--threads", str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_case(name: str, shape, T: int, device: str, rounds: int, threads: int | None) -> dict:
    passes = make_logits(shape, T, device)
    m_ref, h_ref = stack_variant(passes, T)
    agree = {}
    for v in VARIANTS:
        m, h = FNS[v](passes, T)
        agree[v] = {"mean_max_abs_diff": (m - m_ref).abs().max().item(), "entropy_max_abs_diff": (h - h_ref).abs().max().item()}
    with torch.no_grad():
        for v in VARIANTS:  # warm up
            FNS[v](passes, T)
        samples = {v: [] for v in VARIANTS}
        for _ in range(rounds):  # round-robin, each sample after the host is quiet (bench_sliding_window)
            for v in VARIANTS:
                samples[v].append(timed_sample(lambda v=v: FNS[v](passes, T), device=device)[0] * 1e3)
        timings = {v: {"min_ms": min(x), "median_ms": statistics.median(x)} for v, x in samples.items()}
    memory = memory_in_subprocess(shape, T, device, threads)
    numel = torch.Size(shape).numel()
    analytic = {  # MB the algorithm itself must hold beyond one pass output (float32)
        "sslseg": 4 * numel * (1 + 1 / shape[1]) / 1e6,
        "stack": 4 * numel * (T + T + 1) / 1e6,
        "ssl4mis": 4 * numel * (T + T + 1) / 1e6,
    }
    return {"case": name, "shape": list(shape), "T": T, "timings": timings, "peak_extra_MB": memory,
            "agreement_vs_stack": agree, "analytic_MB": analytic}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, few rounds (CI)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    add_load_argument(p)
    p.add_argument("--out", default=None, help="JSON path (default benches/results/mc_uncertainty_<device>[_loadN].json)")
    p.add_argument("--mem-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mem_child:
        shape, T, device = json.loads(args.mem_child)
        with torch.no_grad():
            print(json.dumps({v: measure_memory(v, tuple(shape), T, device) for v in VARIANTS}))
        return 0
    sslseg.ops.require_ops()
    QUIET["on"] = not args.smoke and not args.load  # under --load the host is busy on purpose
    if args.smoke:
        cases = [("2d_smoke", (2, 4, 32, 32), 4), ("3d_smoke", (1, 2, 16, 16, 12), 4)]
        rounds = args.rounds or 3
    else:
        cases = [("2d_uamt", (12, 4, 256, 256), 8), ("3d_uamt", (2, 2, 112, 112, 80), 8)]
        rounds = args.rounds or 11
    with busy_load(args.load):
        results = [run_case(n, s, T, args.device, rounds, args.threads) for n, s, T in cases]
    print(f"MC-dropout uncertainty (mean softmax + entropy), device {args.device}, {torch.get_num_threads()} threads, "
          f"load {args.load}; non-network time min / median ms, ratio to sslseg (min), peak extra memory MB")
    print("| case | variant | time ms | x sslseg | peak extra MB | max abs diff (mean / entropy) vs stack |")
    print("|---|---|---|---|---|---|")
    for r in results:
        s = r["timings"]["sslseg"]["min_ms"]
        for v in VARIANTS:
            t = r["timings"][v]
            a = r["agreement_vs_stack"][v]
            print(f"| {r['case']} {tuple(r['shape'])} T={r['T']} | {v} | {t['min_ms']:.2f} / {t['median_ms']:.2f} | "
                  f"{t['min_ms'] / s:.2f}x | {r['peak_extra_MB'][v]:.1f} | "
                  f"{a['mean_max_abs_diff']:.1e} / {a['entropy_max_abs_diff']:.1e} |")
    for r in results:
        t, m = r["timings"], r["peak_extra_MB"]
        print(f"{r['case']}: sslseg {t['ssl4mis']['min_ms'] / t['sslseg']['min_ms']:.1f}x faster than ssl4mis, "
              f"{t['stack']['min_ms'] / t['sslseg']['min_ms']:.1f}x than stack; peak extra memory "
              f"{m['sslseg']:.0f} MB vs {m['ssl4mis']:.0f} (ssl4mis) / {m['stack']:.0f} (stack)")
    out = args.out or f"benches/results/mc_uncertainty_{args.device}{load_suffix(args.load)}{'_smoke' if args.smoke else ''}.json"
    write_json(out, {"bench": "mc_uncertainty", "meta": metadata(args.device, args.load), "load": args.load, "results": results})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
