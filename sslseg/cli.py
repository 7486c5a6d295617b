"""The ``sslseg`` command line (also ``python -m sslseg``).

Subcommands register themselves here, one function per area, so ``sslseg --help`` lists everything.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Sequence


def _cmd_ops(args: argparse.Namespace) -> int:
    import torch

    import sslseg.ops

    sslseg.ops.require_ops()
    info = sslseg.ops.build_info()
    print(f"sslseg._C built against torch {info['torch']}, CUDA kernels: {'yes' if info['cuda'] == '1' else 'no'}")
    print(f"running torch {torch.__version__} (CUDA {torch.version.cuda}), GPU available: {torch.cuda.is_available()}")
    for name in sslseg.ops.list_ops():
        keys = [k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(name, k)]
        print(f"  {name:32s} kernels: {', '.join(keys) or 'backend-independent'}")
    missing = sslseg.ops.missing_kernels("CUDA") if info["cuda"] == "1" else []
    if missing:
        print(f"ops without a CUDA kernel: {missing}", file=sys.stderr)
        return 1
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """What exists today, end to end: a student/teacher pair updated by the fused EMA op."""
    import torch
    from torch import nn

    import sslseg.ops

    sslseg.ops.require_ops()
    torch.manual_seed(args.seed)
    student = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 1)
    )
    teacher = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(8, 1, 32, 32)
    y = (x > 0.5).long()[:, 0] + (x > 1.0).long()[:, 0]
    t0 = time.perf_counter()
    for step in range(args.steps):
        loss = nn.functional.cross_entropy(student(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sslseg.ops.ema_update_(teacher, student, sslseg.ops.ema_decay(step, 0.99))
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            with torch.no_grad():
                t_loss = nn.functional.cross_entropy(teacher.eval()(x), y).item()
            teacher.train()
            print(f"step {step:4d}  student loss {loss.item():.4f}  teacher loss {t_loss:.4f}")
    print(f"{args.steps} steps in {time.perf_counter() - t0:.2f} s; teacher = fused EMA of the student")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sslseg", description="Semi-supervised medical image segmentation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("ops", help="show the compiled operators and their CPU/CUDA kernels")
    p.set_defaults(func=_cmd_ops)

    p = sub.add_parser("demo", help="a short end-to-end run of what exists on the embedded default data")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
