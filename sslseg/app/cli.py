"""The ``sslseg`` command line (also ``python -m sslseg``).

Each area registers its subcommands here, so ``sslseg --help`` lists everything.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from sslseg.utils.precision import AMP_CHOICES

# Modules with a ``register_cli(subparsers)`` function, in the order of ``sslseg --help``.
_CLI_MODULES = (
    "sslseg.data.cli",
    "sslseg.app.infer",
    "sslseg.app.export",
    "sslseg.app.evaluate",
    "sslseg.app.sweep",
    "sslseg.app.report",
)


def _cmd_ops(args: argparse.Namespace) -> int:
    import torch

    import sslseg.ops

    sslseg.ops.require_ops()
    info = sslseg.ops.build_info()
    print(f"sslseg._C built against torch {info['torch']}, CUDA kernels: {'yes' if info['cuda'] == '1' else 'no'}")
    print(f"running torch {torch.__version__} (CUDA {torch.version.cuda}), GPU available: {torch.cuda.is_available()}")
    print(f"ops run on: {sslseg.ops.backend()} (SSLSEG_OPS=reference forces the pure-PyTorch twins)")
    for name in sslseg.ops.list_ops():
        keys = [k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(name, k)]
        print(f"  {name:36s} kernels: {', '.join(keys) or 'backend-independent'}")
    missing = sslseg.ops.missing_kernels("CUDA") if info["cuda"] == "1" else []
    if missing:
        print(f"ops without a CUDA kernel: {missing}", file=sys.stderr)
        return 1
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from sslseg.methods import get_method, list_methods

    for name in list_methods():
        cls = get_method(name)
        dims = "/".join(f"{d}D" for d in cls.dims)
        print(f"{name:22s} {dims:6s} {cls.paper}")
        print(f"{'':22s} options: {cls.describe() or '(none)'}")
    return 0


def _labeled_arg(text: str) -> float | str:
    """``--labeled``: ``all`` or a number (checked, with its message, by the engine)."""
    if text.strip().lower() == "all":
        return "all"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a case count, a fraction in (0, 1) or 'all', got {text!r}") from None


def _cmd_fit(args: argparse.Namespace) -> int:
    from sslseg.engine import EngineConfig, fit
    from sslseg.engine.config import load_yaml, parse_set
    from sslseg.methods import get_method

    cls = get_method(args.method)
    base_engine, base_method = EngineConfig(), cls.Config()
    engine_over, method_over = parse_set(args.set or [], base_engine, base_method)
    if args.quiet:
        engine_over["quiet"] = True
    run = fit(
        args.method,
        args.data,
        labeled=args.labeled,
        iterations=args.iterations,
        model=args.model,
        seed=args.seed,
        out_dir=args.out,
        device=args.device,
        amp=args.amp,
        resume=args.resume,
        config=args.config if args.config is None else load_yaml(args.config),
        engine_options=engine_over,
        **method_over,
    )
    if args.quiet:
        return 0
    best, last = run.metrics["best_val"], run.metrics["last"]
    print(f"run: {run.dir}")
    print(f"validation Dice (mean over foreground classes): best_val {best['dice']:.4f} at step {best['step']}, "
          f"last {last['dice']:.4f} at step {last['step']}")
    print(f"per class (best_val): {', '.join(f'{d:.4f}' for d in best['dice_per_class'])}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sslseg", description="Semi-supervised medical image segmentation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("fit", help="train with a semi-supervised method",
                       description="Train with a method (see `sslseg methods`). Engine and method options can be set "
                                   "with --set key=value (e.g. --set batch_size=8 --set ema_decay=0.999) or a YAML file.")
    p.add_argument("method", help="method name, e.g. mean_teacher, cps")
    p.add_argument("--data", default=None, help="data folder or synthetic:<acdc|la|brats> (default synthetic:acdc)")
    p.add_argument("--labeled", type=_labeled_arg, default=None,
                   help="labeled cases: a count (7), a fraction in (0, 1) (0.1) or 'all'")
    p.add_argument("--iterations", type=int, default=None, help="optimizer steps")
    p.add_argument("--model", default=None, help="network (see sslseg.list_models()); default unet / unet_3d")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", default=None, help="run directory")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--amp", default=None, choices=AMP_CHOICES,
                   help="mixed precision (default auto: bf16 where the CPU/GPU has it natively, else float32; "
                        "none forces float32)")
    p.add_argument("--config", default=None, help="YAML file {engine: {...}, method: {...}} (e.g. a run's config.yaml)")
    p.add_argument("--resume", default=None, help="run directory to continue from its last checkpoint")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="engine or method option (repeatable)")
    p.add_argument("--quiet", action="store_true",
                   help="print nothing while training (history.jsonl and validation.jsonl are written all the same)")
    p.set_defaults(func=_cmd_fit)

    p = sub.add_parser("methods", help="list the methods with their options and defaults")
    p.set_defaults(func=_cmd_methods)

    p = sub.add_parser("ops", help="show the compiled operators and their CPU/CUDA kernels")
    p.set_defaults(func=_cmd_ops)

    # Each area adds its own subcommands; these modules must stay cheap to import.
    for module in _CLI_MODULES:
        importlib.import_module(module).register_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Exit status: 0 on success; 2 for a user error (bad arguments or options, bad data such as a
    label out of range or NaN pixels, missing files), with one line on stderr and no traceback;
    1 for a training run whose loss became NaN/Inf (one line naming the step and the last good
    checkpoint).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        # User errors get one clear line, not a traceback.
        print(f"sslseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        # sslseg.engine.loop.NonFiniteLossError (caught by its base class, so that the command line
        # imports no torch before a command runs): not the user's input but the run itself failed.
        print(f"sslseg {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
