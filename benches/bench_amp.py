"""Bench: does the default precision (``amp="auto"``) keep the Dice of float32?

Two settings, each trained twice per method and seed, once in float32 (``amp="none"``) and once in
the default precision (``amp="auto"``: bf16 autocast where the device computes bf16 natively; on a
machine without it both runs are float32 and the bench says so):

* ``learning``: the learning test's setting (tests/methods/test_learning.py): synthetic ACDC
  phantoms at 64x64, 2 labeled patients of 28, 400 steps of batch 8 (4 labeled), ``supervised``,
  ``mean_teacher`` and ``cps``;
* ``benchmark``: the benchmark's calibrated protocol (benches/bench_methods.py):
  ``synthetic:acdc?cases=30&size=80&slices=2`` at 80x80, 3 labeled patients, 800 steps of batch 8,
  validation every 100, ``supervised``;
* ``la``: the benchmark's 3D protocol: ``synthetic:la?cases=30&size=40``, 8 labeled cases, a
  half-width 3D U-Net on 32^3 patches (its bottleneck has depth 2), 75 steps of batch 4 (2
  labeled), ``supervised`` and ``mean_teacher``.

The 2D settings pin the contiguous memory format (``channels_last=False``), as their first records
were made before ``channels_last="auto"``.

Seeds 0, 1, 2. Every model is scored on its test split with the benchmark's protocol (``best_val``
checkpoint, mean over the foreground classes per volume, empty policy ``penalty``, no TTA), the
float32 model in float32 and the default-precision model in the default precision. Reported:

* training parity: per (setting, method), the paired test-Dice difference auto - fp32 over
  (test case, seed) pairs, with its 95% bootstrap interval (clusters: test cases);
* inference parity: each float32-trained model predicts its test volumes in float32 and in the
  default precision: the share of voxels whose label agrees (target >= 99.5%) and the change of
  the mean test Dice (target <= 0.002);
* the learning check under the default precision: mean_teacher and cps above supervised (final
  validation Dice, mean over the seeds, as the learning test measures it).

Before training, the bench probes the defect behind the one workaround of the rule
(:mod:`sslseg.utils.precision`: on the CPU, Conv3d layers on depth-2 feature maps train in float32
under bf16): a bf16 ``Conv3d`` weight gradient, computed 6 times on the same input, should be the
same 6 times. It reports how many differ and the largest difference under torch's autocast (the
defect: differing at depth 2, up to ~1e34 or NaN) and under sslseg's training autocast (none may
differ). When torch's column shows none on a new torch, the workaround can go.

One thread, runs one at a time. Results accumulate in ``benches/results/amp.json`` (rewritten after
every run, atomically; a later invocation skips the runs it holds), the table goes to
``benches/results/amp.md``. Run directories: ``runs/bench_amp/`` (ignored by git). ``--smoke``: a
tiny phantom, 2 steps, 1 seed, results to a temporary folder (CI).

Usage: python benches/bench_amp.py [--smoke] [--settings learning,benchmark,la] [--seeds 0 1 2]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import metadata, write_json  # noqa: E402

import sslseg  # noqa: E402
from sslseg.app.report import case_scores  # noqa: E402
from sslseg.metrics.statistics import paired_bootstrap  # noqa: E402
from sslseg.utils.precision import autocast, resolve_amp  # noqa: E402

SETTINGS = {
    "learning": dict(data="synthetic:acdc?cases=40&size=64&slices=6", labeled=2, iterations=400,
                     methods=["supervised", "mean_teacher", "cps"],
                     options=dict(batch_size=8, labeled_bs=4, patch_size=[64, 64], val_every=400, log_every=100,
                                  channels_last=False)),
    "benchmark": dict(data="synthetic:acdc?cases=30&size=80&slices=2", labeled=3, iterations=800,
                      methods=["supervised"], options=dict(batch_size=8, labeled_bs=4, val_every=100, log_every=50,
                                                          channels_last=False)),
    # The benchmark's 3D protocol: half-width 3D U-Net on 32^3 patches, whose bottleneck has depth 2
    # (on the CPU, the convolutions there train in float32 under bf16: sslseg.utils.precision).
    "la": dict(data="synthetic:la?cases=30&size=40", labeled=8, iterations=75, methods=["supervised", "mean_teacher"],
               options=dict(batch_size=4, labeled_bs=2, patch_size=[32, 32, 32], val_every=25, log_every=25,
                            model_options={"channels": [8, 16, 32, 64, 128]})),
}
SMOKE = {"smoke": dict(data="synthetic:acdc?cases=6&slices=2&size=32", labeled=2, iterations=2, methods=["supervised"],
                       options=dict(batch_size=4, labeled_bs=2, patch_size=[32, 32], val_every=2, log_every=2))}
PRECISIONS = ("none", "auto")
AGREEMENT_TARGET, DICE_TARGET = 0.995, 0.002


def _case_dice(result) -> dict[str, float]:
    """Per test case: the report's case score (mean over its volumes of each volume's mean foreground Dice)."""
    return {case: v for (case, _, _), v in case_scores({"rows": result.rows, "seed": 0, "fold": None}).items()}


def _label_agreement(run, amp: str) -> tuple[int, int]:
    """(agreeing voxels, voxels) of ``run``'s test volumes predicted in float32 and in ``amp``."""
    from sslseg.data import load
    from sslseg.data.fingerprint import read_raw
    from sslseg.data.splits import Split

    ds = load(run.config["engine"]["data"])
    split = Split.load(run.dir / "split.json")
    same = total = 0
    for case in split.test_cases:
        for vid in ds.volumes_of(case):
            rec = ds.raw_record(vid)
            image = read_raw(rec, ds.num_classes)[0]
            spacing = rec.spacing(default=None) or ds.spacing
            a = sslseg.infer(run, image, amp="none", spacing=spacing)
            b = sslseg.infer(run, image, amp=amp, spacing=spacing)
            same += int((a == b).sum())
            total += a.numel()
    return same, total


def conv3d_defect(repeats: int = 6) -> list[dict]:
    """Per feature-map shape: how many of ``repeats`` identical bf16 Conv3d weight gradients differ
    from the first, and by how much at most, under plain ``torch.autocast`` and under sslseg's
    training autocast (:func:`sslseg.utils.precision.autocast`, which routes the depth-2 cases to
    float32); exact arithmetic gives 0 and 0."""
    rows = []
    for shape in [(2, 8, 8), (2, 2, 2), (4, 8, 8), (8, 8, 8)]:
        row = {"shape": list(shape)}
        for name, context in (("torch", lambda: torch.autocast("cpu", torch.bfloat16)),
                              ("sslseg", lambda: autocast(torch.bfloat16, "cpu", dim=3, training=True))):
            torch.manual_seed(0)
            conv = torch.nn.Conv3d(32, 32, 3, padding=1)
            x = torch.randn(2, 32, *shape)
            grads = []
            for _ in range(repeats):
                conv.zero_grad()
                with context():
                    y = conv(x)
                y.float().square().mean().backward()
                grads.append(conv.weight.grad.clone())
            diff = max(float((g - grads[0]).abs().max()) for g in grads)
            row[name] = {"differing": sum(not torch.equal(grads[0], g) for g in grads[1:]),
                         "max_abs_difference": diff if diff == diff else "nan"}
        rows.append(row)
    return rows


def run_one(setting: dict, method: str, seed: int, amp: str, work: Path) -> dict:
    t0 = time.perf_counter()
    run = sslseg.fit(method, setting["data"], labeled=setting["labeled"], iterations=setting["iterations"],
                     seed=seed, device="cpu", amp=amp, out_dir=work / f"{method}-s{seed}-{amp}",
                     engine_options=dict(setting["options"], progress=False, quiet=True, tensorboard=False))
    fit_s = time.perf_counter() - t0
    result = sslseg.evaluate(run, split="test", amp=amp, out=False)
    row = {"method": method, "seed": seed, "amp": amp, "chosen": resolve_amp(amp, "cpu").chosen,
           "val_dice_last": run.metrics["last"]["dice"], "test_dice": result.summary["overall"]["dice"]["mean"],
           "test_case_dice": _case_dice(result), "fit_seconds": round(fit_s, 1)}
    if amp == "none":  # inference parity of the float32 model
        row["test_dice_inferred_auto"] = sslseg.evaluate(run, split="test", amp="auto", out=False
                                                         ).summary["overall"]["dice"]["mean"]
        row["voxels_agree"], row["voxels"] = _label_agreement(run, "auto")
    return row


def summarize(results: dict, settings: dict) -> tuple[list[str], dict]:
    lines, summary = [], {}
    auto = resolve_amp("auto", "cpu")
    lines.append(f"Default precision here: {auto.describe()}. One thread, seeds as listed; test Dice: mean over "
                 "foreground classes per volume, per case over its volumes.")
    lines += ["", "| setting | method | seeds | fp32 test Dice | auto test Dice | auto - fp32 [95% CI] | verdict | "
              "fit s fp32 / auto |", "|---|---|---|---|---|---|---|---|"]
    for name, setting in settings.items():
        for method in setting["methods"]:
            rows = {(r["seed"], r["amp"]): r for r in results.get(name, {}).values() if r["method"] == method}
            seeds = sorted({s for s, a in rows if all((s, p) in rows for p in PRECISIONS)})
            if not seeds:
                continue
            a, b, clusters = [], [], []
            for s in seeds:
                fp32, dflt = rows[(s, "none")]["test_case_dice"], rows[(s, "auto")]["test_case_dice"]
                for case in sorted(fp32):
                    a.append(fp32[case]), b.append(dflt[case]), clusters.append(case)
            boot = paired_bootstrap(a, b, clusters=clusters)
            mean = {p: statistics.fmean(rows[(s, p)]["test_dice"] for s in seeds) for p in PRECISIONS}
            secs = {p: statistics.fmean(rows[(s, p)]["fit_seconds"] for s in seeds) for p in PRECISIONS}
            summary[f"{name}/{method}"] = {"seeds": seeds, "fp32": mean["none"], "auto": mean["auto"], **boot,
                                           "fit_seconds": secs}
            lines.append(f"| {name} | {method} | {len(seeds)} | {mean['none']:.3f} | {mean['auto']:.3f} | "
                         f"{boot['mean_difference']:+.4f} [{boot['low']:+.4f}, {boot['high']:+.4f}] | "
                         f"{'within noise' if boot['verdict'] == 'n.s.' else boot['verdict']} | "
                         f"{secs['none']:.0f} / {secs['auto']:.0f} |")
    fp32_rows = [r for per in results.values() for r in per.values() if r["amp"] == "none" and "voxels" in r]
    if fp32_rows:
        agree = sum(r["voxels_agree"] for r in fp32_rows) / sum(r["voxels"] for r in fp32_rows)
        worst = min(r["voxels_agree"] / r["voxels"] for r in fp32_rows)
        ddice = max(abs(r["test_dice_inferred_auto"] - r["test_dice"]) for r in fp32_rows)
        summary["inference"] = {"models": len(fp32_rows), "agreement": agree, "worst_model_agreement": worst,
                                "max_abs_dice_change": ddice}
        lines += ["", f"Inference parity ({len(fp32_rows)} float32-trained models, test volumes predicted in float32 "
                      f"and in the default precision): labels agree on {agree:.4%} of voxels (worst model "
                      f"{worst:.4%}; target >= {AGREEMENT_TARGET:.1%}); largest change of a model's mean test Dice "
                      f"{ddice:.4f} (target <= {DICE_TARGET})."]
    learning = results.get("learning", {})
    if learning:
        val = {}
        for r in learning.values():
            if r["amp"] == "auto":
                val.setdefault(r["method"], []).append(r["val_dice_last"])
        means = {m: statistics.fmean(v) for m, v in val.items()}
        if {"supervised", "mean_teacher", "cps"} <= set(means):
            ok = means["mean_teacher"] > means["supervised"] and means["cps"] > means["supervised"]
            summary["learning_check_auto"] = {**means, "holds": ok}
            lines += ["", "Learning check under the default precision (final validation Dice, mean over seeds): "
                          + ", ".join(f"{m} {v:.3f}" for m, v in means.items())
                          + (": mean_teacher and cps above supervised." if ok else ": NOT above supervised.")]
    return lines, summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny phantom, 2 steps, 1 seed (CI)")
    p.add_argument("--settings", default="learning,benchmark,la", help="comma-separated: learning, benchmark, la")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--smoke: 0)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.smoke:
        settings, seeds = SMOKE, args.seeds or [0]
        tmp = Path(tempfile.mkdtemp(prefix="sslseg-bench-amp-"))
        out_json, out_md, work_root = tmp / "amp_smoke.json", tmp / "amp_smoke.md", tmp / "runs"
    else:
        names = args.settings.split(",")
        unknown = [n for n in names if n not in SETTINGS]
        if unknown:
            p.error(f"--settings: unknown {unknown}; choose from {', '.join(SETTINGS)}")
        settings, seeds = {n: SETTINGS[n] for n in names}, args.seeds or [0, 1, 2]
        out_json, out_md, work_root = Path("benches/results/amp.json"), Path("benches/results/amp.md"), Path("runs/bench_amp")
    doc = json.loads(out_json.read_text()) if out_json.is_file() else {"results": {}}
    results = doc["results"]
    defect = conv3d_defect()
    for row in defect:
        print(f"bf16 Conv3d weight gradient, feature map {row['shape']}: "
              + "; ".join(f"{k} autocast {row[k]['differing']} of 5 repeats differ (max |diff| "
                          f"{row[k]['max_abs_difference']})" for k in ("torch", "sslseg")), flush=True)
    for name, setting in settings.items():
        protocol = {k: setting[k] for k in ("data", "labeled", "iterations", "options")}
        held = results.setdefault(name, {})
        for method in setting["methods"]:
            for seed in seeds:
                for amp in PRECISIONS:
                    key = f"{method}-s{seed}-{amp}"
                    if key in held and held[key].get("protocol") == protocol:
                        continue
                    row = run_one(setting, method, seed, amp, work_root / name)
                    held[key] = {**row, "protocol": protocol}
                    print(f"{name} {key}: test Dice {row['test_dice']:.4f} ({row['chosen']}), fit {row['fit_seconds']} s",
                          flush=True)
                    write_json(out_json, {"bench": "amp", "meta": metadata("cpu"), "results": results})
    lines, summary = summarize(results, settings)
    lines += ["", "CPU bf16 Conv3d weight-gradient defect (6 identical computations per feature-map shape; "
                  "exact arithmetic gives 0 differing), under torch's autocast and under sslseg's training "
                  "autocast (depth-2 convolutions in float32):", ""]
    lines += [f"- {'x'.join(map(str, r['shape']))}: torch {r['torch']['differing']} of 5 differ (max |diff| "
              f"{r['torch']['max_abs_difference']}); sslseg {r['sslseg']['differing']} of 5 differ "
              f"(max |diff| {r['sslseg']['max_abs_difference']})" for r in defect]
    write_json(out_json, {"bench": "amp", "meta": metadata("cpu"), "results": results, "summary": summary,
                          "conv3d_bf16_defect": defect})
    text = "\n".join(["# Default precision (amp=auto) against float32", "", *lines, ""])
    tmp_md = out_md.with_suffix(".md.tmp")
    tmp_md.write_text(text)
    tmp_md.replace(out_md)
    print(text)
    print(f"wrote {out_json} and {out_md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
