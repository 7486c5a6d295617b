"""Bench: the fused EMA update against the paths users have today.

Variants, on the same tensors, timed round-robin in one process:
  sslseg          sslseg.ops.ema_update_(teacher_module, student_module): the fused kernel over the
                  module's cached tensor lists (what the training engine calls)
  sslseg_lists    torch.ops.sslseg.ema_update_ called with Python lists (lists converted per call)
  reference       sslseg's pure-PyTorch twin (per-tensor, fp32 accumulation)
  ssl4mis_loop    SSL4MIS's update: per parameter ``t.mul_(a).add_(s, alpha=1 - a)``
  foreach_lerp    ``torch._foreach_lerp_`` over the lists (timm ModelEmaV3's path)
  flat_lerp       one ``lerp_`` over a single flat buffer of the same total size: the lower bound

Cases: the SSL4MIS 2D UNet parameter list (16..256 channels, ~1.8M params, 82 tensors), the same
UNet at 64..1024 channels (~29M), and 500 small tensors of 1024 elements (an nn.ParameterList).
Parameters only (buffers excluded), so every variant moves the same bytes.

Usage: python benches/bench_ema.py [--smoke] [--device cpu|cuda] [--threads N] [--load N] [--out PATH]

--load N runs N busy-loop processes beside the measurement (a host whose cores are taken by other
work); the JSON records the level and the default name gets a _loadN suffix.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import add_load_argument, busy_load, load_suffix, metadata, time_round_robin, write_json  # noqa: E402

import sslseg.ops  # noqa: E402
from sslseg.ops.ema import _reference  # noqa: E402

DECAY = 0.99


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(),
        nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(),
    )


class UNetLike(nn.Module):
    """The parameter list of SSL4MIS's 2D UNet (encoder blocks, 1x1 + block per up-step, head)."""

    def __init__(self, widths: tuple[int, ...], in_channels: int = 1, num_classes: int = 4) -> None:
        super().__init__()
        self.enc = nn.ModuleList(_conv_block(a, b) for a, b in zip((in_channels, *widths[:-1]), widths))
        rev = widths[::-1]
        self.reduce = nn.ModuleList(nn.Conv2d(a, b, 1) for a, b in zip(rev[:-1], rev[1:]))
        self.dec = nn.ModuleList(_conv_block(2 * b, b) for b in rev[1:])
        self.head = nn.Conv2d(widths[0], num_classes, 3, padding=1)


def _many(count: int, size: int) -> nn.ParameterList:
    return nn.ParameterList(nn.Parameter(torch.randn(size)) for _ in range(count))


def make_cases(smoke: bool) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    if smoke:
        return {"unet2d_small": UNetLike((4, 8, 16)), "many_small_50x256": _many(50, 256)}
    return {
        "unet2d_ssl4mis": UNetLike((16, 32, 64, 128, 256)),
        "unet2d_wide_29M": UNetLike((64, 128, 256, 512, 1024)),
        "many_small_500x1024": _many(500, 1024),
    }


def run_case(name: str, student: nn.Module, device: str, rounds: int) -> dict:
    student = student.to(device)
    teacher = copy.deepcopy(student)
    s_list = [p.detach() for p in student.parameters()]
    t_list = [p.detach() for p in teacher.parameters()]
    numel = sum(t.numel() for t in t_list)
    flat_t = torch.randn(numel, device=device)
    flat_s = torch.randn(numel, device=device)
    w = 1.0 - DECAY
    op = torch.ops.sslseg.ema_update_.default

    def ssl4mis_loop() -> None:
        for t, s in zip(t_list, s_list):
            t.mul_(DECAY).add_(s, alpha=w)

    variants = {
        "sslseg": lambda: sslseg.ops.ema_update_(teacher, student, DECAY, include_buffers=False),
        "sslseg_lists": lambda: op(t_list, s_list, DECAY),
        "reference": lambda: _reference(t_list, s_list, DECAY),
        "ssl4mis_loop": ssl4mis_loop,
        "foreach_lerp": lambda: torch._foreach_lerp_(t_list, s_list, w),
        "flat_lerp": lambda: flat_t.lerp_(flat_s, w),
    }
    with torch.no_grad():
        timings = time_round_robin(variants, device=device, rounds=rounds)
    bound = timings["flat_lerp"]
    for t in timings.values():
        t["x_flat_min"] = t["min_ms"] / bound["min_ms"]
        t["x_flat_median"] = t["median_ms"] / bound["median_ms"]
    # Effective bandwidth of the fused op: read teacher + student, write teacher.
    nbytes = 3 * numel * t_list[0].element_size()
    timings["sslseg"]["GBps_min"] = nbytes / (timings["sslseg"]["min_ms"] * 1e-3) / 1e9
    return {"case": name, "tensors": len(t_list), "params": numel, "timings": timings}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, few rounds (CI)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=None)
    add_load_argument(p)
    p.add_argument("--out", default=None, help="JSON path (default benches/results/ema_<device>[_loadN].json)")
    args = p.parse_args(argv)
    sslseg.ops.require_ops()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.smoke else 21)
    cases = make_cases(args.smoke)
    with busy_load(args.load):
        results = [run_case(n, s, args.device, rounds) for n, s in cases.items()]

    order = ["sslseg", "sslseg_lists", "reference", "ssl4mis_loop", "foreach_lerp", "flat_lerp"]
    print(f"EMA update, decay {DECAY}, device {args.device}, {torch.get_num_threads()} threads, load {args.load}; "
          "min / median ms per update, ratio to flat_lerp (min-based)")
    header = "| variant | " + " | ".join(f"{r['case']} ({r['params'] / 1e6:.2f}M, {r['tensors']} t)" for r in results) + " |"
    print(header)
    print("|" + "---|" * (len(results) + 1))
    for v in order:
        cells = []
        for r in results:
            t = r["timings"].get(v)
            cells.append("-" if t is None else f"{t['min_ms']:.3f} / {t['median_ms']:.3f} ms, {t['x_flat_min']:.2f}x")
        print(f"| {v} | " + " | ".join(cells) + " |")
    for r in results:
        s, f = r["timings"]["sslseg"], r["timings"]["foreach_lerp"]
        print(f"{r['case']}: sslseg {s['x_flat_min']:.2f}x flat bound (target <= 1.3), "
              f"{f['min_ms'] / s['min_ms']:.2f}x faster than foreach_lerp, {s['GBps_min']:.1f} GB/s")
    out = args.out or f"benches/results/ema_{args.device}{load_suffix(args.load)}{'_smoke' if args.smoke else ''}.json"
    write_json(out, {"bench": "ema", "meta": metadata(args.device, args.load), "load": args.load, "decay": DECAY, "results": results})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
