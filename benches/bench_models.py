"""Bench: training-step throughput of every registered network, eager vs ``torch.compile``.

One step = ``zero_grad`` + ``forward_all`` + a loss over every output (main, auxiliary, SDF) +
``backward``: what a semi-supervised method pays per student per iteration (no optimizer step, so
the figure is the network's). The eager and compiled callables share the model and the input and
are timed round-robin (``_timing.time_round_robin``); each sample is one step after warm-up.
Discriminators are timed on ``(softmax map, image)`` pairs.

Patches (full run): 2D 256x256 batch 24 (Swin-UNet built with ``img_size=256``); 3D 96^3 and
112x112x80 batch 2. ``--smoke`` uses tiny patches and compiles only ``--compile-models`` (default
``unet`` with the ``aot_eager`` backend) so that CI finishes in well under a minute on a CPU.

Usage:
    python benches/bench_models.py [--smoke] [--device cpu|cuda] [--models unet,unet_3d*]
        [--modes eager,compile] [--compile-backend inductor] [--amp] [--rounds N] [--out PATH]
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import metadata, time_round_robin, write_json  # noqa: E402

from sslseg.models import create_model, list_models, model_info  # noqa: E402

# (batch, spatial size) per dimension.
FULL = {2: [(24, (256, 256))], 3: [(2, (96, 96, 96)), (2, (112, 112, 80))]}
# --smoke: batch per dimension; the patch is the smallest the network accepts in training mode.
SMOKE_BATCH = {2: 2, 3: 1}
# SSL4MIS class counts: ACDC (4) in 2D, BraTS / LA (2) in 3D.
NUM_CLASSES = {2: 4, 3: 2}


def _options(name: str, size: tuple[int, ...]) -> dict:
    return {"img_size": size} if name == "swin_unet" else {}


def _smallest_patch(model: torch.nn.Module) -> tuple[int, ...]:
    """The smallest patch a network trains on: two bottleneck voxels along the first axis
    (InstanceNorm needs >= 2 per channel in training), one along the others, >= 16 per axis."""
    if getattr(model, "input_size", None) is not None:
        return tuple(model.input_size)
    divisor = getattr(model, "size_divisor", (1,) * model.dim)
    return tuple(max(16, 2 * d if axis == 0 else d) for axis, d in enumerate(divisor))


def _step_fn(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], discriminator: bool, fn=None):
    """A closure running one training step; ``fn`` replaces the forward (e.g. a compiled one)."""
    forward = fn or (model if discriminator else model.forward_all)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(inputs[0].device.type, dtype=torch.bfloat16, enabled=_AMP):
            out = forward(*inputs)
        if discriminator:
            loss = out.float().square().mean()
        else:
            loss = out["logits"].float().square().mean()
            for aux in out.get("aux", []):
                loss = loss + aux.float().square().mean()
            if "sdf" in out:
                loss = loss + out["sdf"].float().square().mean()
        loss.backward()

    return step


_AMP = False


def bench_one(
    name: str, batch: int, size: tuple[int, ...] | None, args: argparse.Namespace, compile_it: bool
) -> dict:
    """Time one network on one patch (``size=None``: the smallest it accepts, for --smoke)."""
    info = model_info(name)
    classes = NUM_CLASSES[info.dim]
    record: dict = {"model": name, "dim": info.dim, "batch": batch, "num_classes": classes}
    try:
        options = _options(name, size or (32,) * info.dim)
        model = create_model(name, 1, classes, seed=0, **options).to(args.device).train()
        size = size or _smallest_patch(model)
        record["size"] = list(size)
        record["params"] = sum(p.numel() for p in model.parameters())
        g = torch.Generator(device="cpu").manual_seed(0)
        image = torch.randn(batch, 1, *size, generator=g).to(args.device)
        discriminator = info.task == "discriminator"
        if discriminator:
            probs = torch.softmax(torch.randn(batch, classes, *size, generator=g), dim=1).to(args.device)
            inputs: tuple[torch.Tensor, ...] = (probs, image)
        else:
            inputs = (image,)
        variants = {"eager": _step_fn(model, inputs, discriminator)}
        compile_s = None
        if compile_it:
            target = model if discriminator else model.forward_all
            compiled = torch.compile(target, backend=args.compile_backend)
            step = _step_fn(model, inputs, discriminator, fn=compiled)
            t0 = time.perf_counter()
            step()  # compile outside the timed region
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            variants["compile"] = step
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        timings = time_round_robin(variants, device=args.device, rounds=args.rounds, min_sample_s=0.0)
        for mode, t in timings.items():
            t["samples_per_s"] = batch / (t["median_ms"] * 1e-3)
        record["timings"] = timings
        if compile_s is not None:
            record["compile_s"] = compile_s
            record["compile_backend"] = args.compile_backend
        if args.device.startswith("cuda"):
            record["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    except Exception as exc:  # keep benching the others; the error is part of the result
        record["error"] = f"{type(exc).__name__}: {exc}"
        if args.verbose:
            traceback.print_exc()
    finally:
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return record


def _select(patterns: str | None, names: list[str]) -> list[str]:
    if not patterns:
        return names
    chosen = [n for n in names if any(fnmatch.fnmatch(n, p.strip()) for p in patterns.split(","))]
    if not chosen:
        raise SystemExit(f"--models {patterns!r} matches no model; available: {', '.join(names)}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    global _AMP
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny patches, few rounds, compile one model (CI)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default=None, help="comma-separated names or globs (default: all)")
    p.add_argument("--modes", default="eager,compile", help="eager and/or compile")
    p.add_argument("--compile-models", default=None,
                   help="names/globs to also compile (default: all; with --smoke: unet)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; smoke aot_eager)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument("--rounds", type=int, default=None, help="timed steps per mode (default 10; smoke 2)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; smoke 1)")
    p.add_argument("--out", default=None, help="JSON path (default benches/results/models_<device>[_smoke].json)")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing models")
    args = p.parse_args(argv)
    _AMP = args.amp
    if args.threads:
        torch.set_num_threads(args.threads)
    args.rounds = args.rounds or (2 if args.smoke else 10)
    args.compile_backend = args.compile_backend or ("aot_eager" if args.smoke else "inductor")
    modes = {m.strip() for m in args.modes.split(",")}
    if not modes <= {"eager", "compile"}:
        raise SystemExit(f"--modes must be eager and/or compile, got {args.modes!r}")
    names = _select(args.models, list_models())
    compile_names: set[str] = set()
    if "compile" in modes:
        compile_names = set(_select(args.compile_models or ("unet" if args.smoke else None), names))
    if args.smoke and not args.threads:
        torch.set_num_threads(1)  # CI hosts are shared: spinning OpenMP threads only add noise here

    torch.manual_seed(0)
    started = time.perf_counter()
    results = []
    print(f"models: forward_all + backward, device {args.device}, {torch.get_num_threads()} threads, "
          f"amp {'bf16' if args.amp else 'off'}, {args.rounds} rounds; median ms / samples per s")
    print("| model | batch x patch | params | eager | compiled |")
    print("|---|---|---|---|---|")
    for name in names:
        dim = model_info(name).dim
        patches = [(SMOKE_BATCH[dim], None)] if args.smoke else FULL[dim]
        for batch, size in patches:
            r = bench_one(name, batch, size, args, compile_it=name in compile_names)
            results.append(r)
            patch = f"{batch} x {'x'.join(map(str, r.get('size', size or ())))}"
            if "error" in r:
                print(f"| {name} | {patch} | - | error: {r['error'][:80]} | |")
                continue
            cells = []
            for mode in ("eager", "compile"):
                t = r["timings"].get(mode)
                cells.append("-" if t is None else f"{t['median_ms']:.1f} ms, {t['samples_per_s']:.1f}/s")
            if "compile_s" in r:
                cells[1] += f" (compiled in {r['compile_s']:.0f} s, {r['compile_backend']})"
            print(f"| {name} | {patch} | {r['params'] / 1e6:.2f}M | {cells[0]} | {cells[1]} |", flush=True)
    out = args.out or f"benches/results/models_{args.device.split(':')[0]}{'_smoke' if args.smoke else ''}.json"
    meta = metadata(args.device)
    meta.update({"amp": "bf16" if args.amp else None, "rounds": args.rounds, "smoke": args.smoke})
    write_json(out, {"bench": "models", "meta": meta, "results": results})
    print(f"wrote {out} in {time.perf_counter() - started:.1f} s")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
