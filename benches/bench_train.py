"""Bench: training throughput (iterations/s) of every method through sslseg's one loop, in float32
and in the default precision (``amp="auto"``: bf16 autocast where the CPU or GPU computes bf16
natively), against the Mean Teacher and the Cross Pseudo Supervision loops written the SSL4MIS
way in float32 (SSL4MIS has no mixed precision) as the baselines.

The SSL4MIS-style baselines use the same networks, batches, optimizers and losses as sslseg's
``mean_teacher`` and ``cps`` but SSL4MIS's habits: a per-parameter Python EMA loop (parameters
only; mean teacher), two SGD optimizers stepped one after the other (CPS), a Dice loss computed
class by class with ``.item()`` per class, the losses ``.item()``-ed every step for logging, the
learning rate rewritten every step, and the contiguous memory format (sslseg's
``channels_last="auto"`` trains 2D networks on the CPU in channels_last; both precisions of
sslseg's columns use it).

Sizes: SSL4MIS trains 2D with batch 24 (12 labeled) of 256^2 and 3D with batch 4 (2 labeled) of
96^3. On a CPU those are scaled down by the printed factor (patch side), keeping the batch.

Each method is timed in both precisions, and the baseline beside them, over ``--rounds``
interleaved rounds (median), so a slow phase of a shared machine hits every column alike.
Every method is also put against the mean-teacher loop (``x MT loop``: one network trained, one
teacher forward); mean_teacher and cps against their own loop (``x own loop``). Targets:
mean_teacher >= 1.2x its loop in float32, and mean_teacher and cps >= 1.5x their loops in the
default precision.

Usage: python benches/bench_train.py [--smoke] [--methods a,b] [--steps N] [--rounds R] [--device cpu|cuda] [--out PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import metadata, write_json  # noqa: E402

from sslseg.engine import EngineConfig, Trainer  # noqa: E402
from sslseg.methods import get_method, list_methods  # noqa: E402
from sslseg.methods.mean_teacher import teacher_noise  # noqa: E402
from sslseg.utils.precision import resolve_amp  # noqa: E402

DATA = {2: "synthetic:acdc?cases=20&slices=8&size={size}", 3: "synthetic:la?cases=8&size={size}"}


def _engine(dim: int, patch: int, batch: int, steps: int, device: str, amp: str = "none",
            channels_last: bool | str = "auto") -> EngineConfig:
    size = patch if dim == 2 else max(patch + 8, 32)
    return EngineConfig(data=DATA[dim].format(size=size), labeled=0.5 if dim == 3 else 5, iterations=2 * steps,
                        batch_size=batch, labeled_bs=batch // 2, patch_size=[patch] * dim, val_every=10**9,
                        log_every=steps, progress=False, quiet=True, device=device, val_cases=1, amp=amp,
                        channels_last=channels_last)


def bench_method(name: str, dim: int, patch: int, batch: int, steps: int, device: str, tmp: Path,
                 amp: str = "none") -> float:
    """Iterations/s of sslseg's loop over ``steps`` steps after ``steps`` warm-up steps."""
    cls = get_method(name)
    run_dir = tempfile.mkdtemp(prefix=f"{name}{dim}-{amp}-", dir=tmp)
    run = Trainer(cls, _engine(dim, patch, batch, steps, device, amp), out_dir=run_dir).run()
    return run.history[-1]["it_per_s"]


def _ssl4mis_dice(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSL4MIS's DiceLoss: class by class, with ``.item()`` per class (its ``class_wise_dice``)."""
    loss = 0.0
    n = probs.shape[1]
    for c in range(n):
        g = (target == c).float()
        p = probs[:, c]
        d = 1 - (2 * (p * g).sum() + 1e-5) / ((p * p).sum() + (g * g).sum() + 1e-5)
        _ = 1.0 - d.item()  # SSL4MIS appends this to class_wise_dice every call
        loss = loss + d
    return loss / n


def _ssl4mis_trainer(method: str, dim: int, patch: int, batch: int, steps: int, device: str, tmp: Path) -> Trainer:
    """The networks, batches and optimizer of ``method``, built by sslseg in float32 and the contiguous
    memory format (as SSL4MIS trains); the baselines drive them with their own loop."""
    return Trainer(get_method(method), _engine(dim, patch, batch, steps, device, "none", channels_last=False),
                   out_dir=tempfile.mkdtemp(prefix=f"ssl4mis-{method}-", dir=tmp))


def _timed_steps(trainer: Trainer, steps: int, step) -> float:
    """Iterations/s of ``step(it, iterations, batch)`` over ``steps`` steps after ``steps`` warm-up steps."""
    batches = trainer.loader.forever()
    dev = trainer.device
    iters, t0 = 2 * steps, 0.0
    for it in range(iters):
        if it == steps:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        step(it, iters, next(batches).to(dev))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0)


def bench_ssl4mis_mean_teacher(dim: int, patch: int, batch: int, steps: int, device: str, tmp: Path) -> float:
    """The same Mean Teacher step, the SSL4MIS way; iterations/s after ``steps`` warm-up steps."""
    trainer = _ssl4mis_trainer("mean_teacher", dim, patch, batch, steps, device, tmp)
    student, teacher = trainer.method.nets["student"], trainer.method.teachers["teacher"]
    opt, base_lr = trainer.optimizer, trainer.eng.base_lr

    def step(it: int, iters: int, b) -> None:
        x = b.images()
        out = student(x)
        probs = torch.softmax(out, 1)
        with torch.no_grad():
            ema_out = teacher(teacher_noise(b.unlabeled_image, 0.1, 0.2))
        n_l = b.labeled_bs
        loss_ce = F.cross_entropy(out[:n_l], b.labeled_label)
        loss_dice = _ssl4mis_dice(probs[:n_l], b.labeled_label)
        sup = 0.5 * (loss_ce + loss_dice)
        cons = torch.mean((probs[n_l:] - torch.softmax(ema_out, 1)) ** 2)
        loss = sup + 0.1 * cons
        opt.zero_grad()
        loss.backward()
        opt.step()
        alpha = min(1 - 1 / (it + 1), 0.99)
        for ema_param, param in zip(teacher.parameters(), student.parameters()):
            ema_param.data.mul_(alpha).add_(param.data, alpha=1 - alpha)
        lr = base_lr * (1.0 - it / iters) ** 0.9
        for g in opt.param_groups:
            g["lr"] = lr
        _ = (loss.item(), loss_ce.item(), loss_dice.item())  # SSL4MIS logs these every iteration

    return _timed_steps(trainer, steps, step)


def bench_ssl4mis_cps(dim: int, patch: int, batch: int, steps: int, device: str, tmp: Path) -> float:
    """The same CPS step, the SSL4MIS way (train_cross_pseudo_supervision_{2D,3D}.py): two networks,
    two SGD optimizers, hard pseudo-labels from each other; iterations/s after ``steps`` warm-up steps."""
    trainer = _ssl4mis_trainer("cps", dim, patch, batch, steps, device, tmp)
    nets = trainer.method.nets["model1"], trainer.method.nets["model2"]
    eng = trainer.eng
    opts = [torch.optim.SGD(n.parameters(), lr=eng.base_lr, momentum=eng.momentum, weight_decay=eng.weight_decay)
            for n in nets]

    def step(it: int, iters: int, b) -> None:
        x = b.images()
        n_l = b.labeled_bs
        out1, out2 = nets[0](x), nets[1](x)
        p1, p2 = torch.softmax(out1, 1), torch.softmax(out2, 1)
        sup1 = 0.5 * (F.cross_entropy(out1[:n_l], b.labeled_label) + _ssl4mis_dice(p1[:n_l], b.labeled_label))
        sup2 = 0.5 * (F.cross_entropy(out2[:n_l], b.labeled_label) + _ssl4mis_dice(p2[:n_l], b.labeled_label))
        pseudo1, pseudo2 = torch.argmax(p1[n_l:].detach(), 1), torch.argmax(p2[n_l:].detach(), 1)
        loss1 = sup1 + 0.1 * F.cross_entropy(out1[n_l:], pseudo2)
        loss2 = sup2 + 0.1 * F.cross_entropy(out2[n_l:], pseudo1)
        loss = loss1 + loss2
        for opt in opts:
            opt.zero_grad()
        loss.backward()
        for opt in opts:
            opt.step()
        lr = eng.base_lr * (1.0 - (it + 1) / iters) ** 0.9
        for opt in opts:
            for g in opt.param_groups:
                g["lr"] = lr
        _ = (loss1.item(), loss2.item())  # SSL4MIS logs both every iteration

    return _timed_steps(trainer, steps, step)


LOOPS = {"mean_teacher": bench_ssl4mis_mean_teacher, "cps": bench_ssl4mis_cps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--methods", default=None, help="comma-separated (default: all)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds, median taken (default 3; --smoke 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dims", default="2,3")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    cfg = {  # dim -> (patch, batch); SSL4MIS sizes on a GPU, scaled patches on a CPU
        2: (256 if gpu else 64, 24) if not args.smoke else (32, 4),
        3: (96 if gpu else 32, 4) if not args.smoke else (32, 2),
    }
    steps = args.steps or (2 if args.smoke else 10)
    rounds = args.rounds or (1 if args.smoke else 3)
    methods = args.methods.split(",") if args.methods else (["supervised", "mean_teacher"] if args.smoke else list_methods())
    dims = [int(d) for d in args.dims.split(",")]
    auto = resolve_amp("auto", args.device)
    print(f"default precision on {args.device}: {auto.describe()}")
    rows = []
    tmp_dir = tempfile.TemporaryDirectory(prefix="sslseg-bench-train-")
    tmp = Path(tmp_dir.name)
    for dim in dims:
        patch, batch = cfg[dim]
        full = 256 if dim == 2 else 96
        print(f"{dim}D: batch {batch} ({batch // 2} labeled), patch {patch}^{dim} (SSL4MIS {full}^{dim}: scale "
              f"{patch / full:.3g}); median of {rounds} interleaved round(s) of {steps} steps")
        names = [m for m in methods if dim in get_method(m).dims]
        times: dict[tuple[str, str], list[float]] = {}
        loops = [m for m in LOOPS if m == "mean_teacher" or m in names]
        for _ in range(rounds):
            for loop in loops:
                times.setdefault((f"ssl4mis_{loop}", "none"), []).append(LOOPS[loop](dim, patch, batch, steps,
                                                                                     args.device, tmp))
            for name in names:
                for amp in ("none", "auto"):
                    times.setdefault((name, amp), []).append(
                        bench_method(name, dim, patch, batch, steps, args.device, tmp, amp))
        own = {loop: statistics.median(times[(f"ssl4mis_{loop}", "none")]) for loop in loops}
        base = own["mean_teacher"]
        for loop in loops:
            rows.append({"method": f"ssl4mis_{loop}_loop", "dim": dim, "precision": "fp32", "it_per_s": own[loop],
                         "rounds": times[(f"ssl4mis_{loop}", "none")]})
            print(f"  {'SSL4MIS-style ' + loop + ' loop':34s} fp32 {own[loop]:8.3f} it/s")
        print(f"  {'method':34s} {'fp32 it/s':>9s} {'x MT loop':>9s} {'auto it/s':>10s} {'x MT loop':>9s} "
              f"{'auto/fp32':>9s} {'x own loop (fp32, auto)':>24s}")
        for name in names:
            fp32, dflt = statistics.median(times[(name, "none")]), statistics.median(times[(name, "auto")])
            mine = {"x_ssl4mis_own": fp32 / own[name]} if name in own else {}
            rows.append({"method": name, "dim": dim, "precision": "fp32", "it_per_s": fp32, "x_ssl4mis_mt": fp32 / base,
                         **mine, "rounds": times[(name, "none")]})
            mine = {"x_ssl4mis_own": dflt / own[name]} if name in own else {}
            rows.append({"method": name, "dim": dim, "precision": f"auto ({auto.chosen})", "it_per_s": dflt,
                         "x_ssl4mis_mt": dflt / base, "x_fp32": dflt / fp32, **mine, "rounds": times[(name, "auto")]})
            note = ""
            if name in own:
                note = (f"{fp32 / own[name]:9.2f}x, {dflt / own[name]:5.2f}x  <- targets: auto >= 1.5x"
                        + (", fp32 >= 1.2x" if name == "mean_teacher" else ""))
            print(f"  {name:34s} {fp32:9.3f} {fp32 / base:8.2f}x {dflt:10.3f} {dflt / base:8.2f}x "
                  f"{dflt / fp32:8.2f}x {note}")
    tmp_dir.cleanup()
    out = args.out or f"benches/results/train_{args.device}{'_smoke' if args.smoke else ''}.json"
    write_json(out, {"bench": "train", "meta": metadata(args.device), "steps": steps, "rounds": rounds, "sizes": cfg,
                     "default_precision": auto._asdict(), "results": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
