"""``sslseg data ...`` subcommands: ``make-synthetic``, ``check``, ``info``.

The lead wires :func:`register_cli` into ``sslseg/cli.py``; each subcommand sets
``func(args) -> int`` (the exit status).
"""

from __future__ import annotations

import argparse
import sys
import time


def _make_synthetic(args: argparse.Namespace) -> int:
    from .synthetic import make_synthetic

    options = {k: v for k, v in (("size", args.size), ("slices", args.slices)) if v is not None}
    t0 = time.perf_counter()
    try:
        root = make_synthetic(args.kind, args.out, num_cases=args.cases, seed=args.seed, layout=args.layout, **options)
    except (TypeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote synthetic {args.kind} ({args.layout} layout) to {root} in {time.perf_counter() - t0:.1f} s")
    return 0


def _load(args: argparse.Namespace, strict: bool):
    from .dataset import load

    return load(
        args.root,
        layout=args.layout,
        num_classes=args.num_classes,
        spacing=tuple(args.spacing) if args.spacing else None,
        strict=strict,
    )


def _check(args: argparse.Namespace) -> int:
    from .errors import DataError

    try:
        ds = _load(args, strict=False)
        report = ds.validate(raise_on_error=False)
    except (DataError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{ds.name}: layout {ds.layout}, {len(ds.cases)} cases, {len(ds.volume_ids)} volumes")
    print(report)
    return 0 if report.ok else 1


def _info(args: argparse.Namespace) -> int:
    from .errors import DataError

    try:
        ds = _load(args, strict=True)
        print(ds.summary())
    except (DataError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _add_load_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="data folder (layout detected) or synthetic:<kind>[?options]")
    p.add_argument("--layout", choices=("acdc", "brats", "la", "nifti"), default=None, help="force the layout")
    p.add_argument("--num-classes", type=int, default=None, help="classes including background")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("D", "H", "W"), default=None, help="voxel spacing in mm")


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``data`` command group to ``sslseg``'s subparsers."""
    data = subparsers.add_parser("data", help="datasets: make synthetic data, check a data folder")
    sub = data.add_subparsers(dest="data_command", metavar="{make-synthetic,check,info}")
    sub.required = True

    p = sub.add_parser("make-synthetic", help="write synthetic phantoms in the SSL4MIS h5 (or NIfTI) layout")
    p.add_argument("kind", choices=("acdc", "la", "brats"))
    p.add_argument("out", help="output folder")
    p.add_argument("--cases", type=int, default=None, help="number of patients/cases (default: the kind's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=None, help="in-plane size (acdc) or cube side (la, brats)")
    p.add_argument("--slices", type=int, default=None, help="slices per acdc volume")
    p.add_argument("--layout", choices=("ssl4mis", "nifti"), default="ssl4mis")
    p.set_defaults(func=_make_synthetic)

    p = sub.add_parser("check", help="read every file once and report every problem (exit 1 if any)")
    _add_load_options(p)
    p.set_defaults(func=_check)

    p = sub.add_parser("info", help="summarise a dataset")
    _add_load_options(p)
    p.set_defaults(func=_info)
