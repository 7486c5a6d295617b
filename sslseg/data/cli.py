"""``sslseg data ...`` subcommands (``make-synthetic``, ``check``, ``info``), ``sslseg plan`` and
``sslseg preprocess``.

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
    layout = args.layout or ("nifti" if args.kind == "ct" else "ssl4mis")
    print(f"wrote synthetic {args.kind} ({layout} layout) to {root} in {time.perf_counter() - t0:.1f} s")
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
    p.add_argument("kind", choices=("acdc", "la", "brats", "ct"))
    p.add_argument("out", help="output folder")
    p.add_argument("--cases", type=int, default=None, help="number of patients/cases (default: the kind's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=None, help="in-plane size (acdc) or cube side (la, brats)")
    p.add_argument("--slices", type=int, default=None, help="slices per acdc volume")
    p.add_argument("--layout", choices=("ssl4mis", "nifti"), default=None,
                   help="ssl4mis (default) or nifti; ct is always an nnU-Net raw folder")
    p.set_defaults(func=_make_synthetic)

    p = sub.add_parser("check", help="read every file once and report every problem (exit 1 if any)")
    _add_load_options(p)
    p.set_defaults(func=_check)

    p = sub.add_parser("info", help="summarise a dataset")
    _add_load_options(p)
    p.set_defaults(func=_info)

    p = subparsers.add_parser("plan", help="fingerprint a dataset and plan its preprocessing and training patch")
    p.add_argument("root", help="data folder or synthetic:<kind>[?options]")
    p.add_argument("--dim", choices=("auto", "2d", "3d"), default="auto")
    p.add_argument("--memory-gb", type=float, default=8.0, help="memory budget of one training process (GB)")
    p.add_argument("--out", default=None, help="write plan.json here (default: beside the preprocessed cache)")
    p.add_argument("--set", action="append", default=[], metavar="plan.KEY=VALUE",
                   help="override a plan field, e.g. --set plan.patch_size=[32,96,96] (repeatable)")
    p.set_defaults(func=_plan)

    p = subparsers.add_parser("preprocess", help="crop, normalise and resample a dataset into the memory-mapped cache")
    p.add_argument("root", help="data folder or synthetic:<kind>[?options]")
    p.add_argument("--plan", default=None, help="plan.json (default: plan with defaults)")
    p.add_argument("--out", default=None, help="cache folder (default: $SSLSEG_CACHE or ~/.cache/sslseg, keyed)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes")
    p.set_defaults(func=_preprocess)


def _overrides(pairs: list[str]) -> dict:
    """``plan.patch_size=[32,96,96]`` -> ``{"patch_size": [32, 96, 96]}`` (values parsed as JSON,
    else kept as text)."""
    import json

    out = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.startswith("plan."):
            raise ValueError(f"--set expects plan.KEY=VALUE, got {pair!r}")
        try:
            out[key[len("plan."):]] = json.loads(text)
        except json.JSONDecodeError:
            out[key[len("plan."):]] = text
    return out


def _plan(args: argparse.Namespace) -> int:
    from .dataset import load
    from .errors import DataError
    from .planning import plan
    from .preprocess import cache_dir

    try:
        ds = load(args.root)
        p = plan(ds, dim=args.dim, memory_gb=args.memory_gb, overrides=_overrides(args.set))
    except (DataError, ValueError, TypeError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{ds.name}: {len(ds.cases)} cases ({len(ds.unlabeled_cases)} unlabeled)")
    print(p.summary())
    if not p.identity:
        from pathlib import Path

        out = Path(args.out) if args.out else cache_dir(p) / "plan.json"
        p.to_json(out)
        print(f"wrote {out}")
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    from .dataset import load
    from .errors import DataError
    from .preprocess import preprocess

    t0 = time.perf_counter()
    try:
        ds = load(args.root)
        folder = preprocess(ds, args.plan, out=args.out, jobs=args.jobs)
    except (DataError, ValueError, TypeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"preprocessed {len(ds.volume_ids)} volumes of {ds.name} into {folder} in {time.perf_counter() - t0:.1f} s")
    return 0
