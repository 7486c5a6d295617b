"""Bench: whole-volume inference, cases per second, eager vs TorchScript vs onnxruntime.

One case = one raw volume segmented end to end: per-volume normalisation, then slice-wise
inference (2D networks) or the Gaussian sliding window (3D networks, overlap 0.5, 4 windows per
forward pass), then the argmax. Variants, on the same volumes, timed round-robin in one process
(``_timing.time_round_robin``; one sample = all the volumes of the set):

  eager        ``sslseg.infer(model, volume, amp="none")`` with the ``nn.Module`` (sslseg's
               sliding-window ops), float32
  eager_auto   the same in the default precision (``amp="auto"``: bf16 autocast where the device
               computes bf16 natively, else float32 again)
  torchscript  ``sslseg.infer(torch.jit.load(file), volume)``: the file ``sslseg.export`` writes,
               in the same pipeline
  onnxruntime  ``export/onnx/sslseg_onnx_infer.py`` (``OnnxSegmenter.predict``): numpy
               normalisation, resizing and blending around an onnxruntime session on the file
               ``sslseg.export`` writes; no torch on that path

Cases (full run): 2D ``unet`` (SSL4MIS defaults, 4 classes) on ACDC-like volumes
(``synthetic:acdc``: ~80 x 80 slices, 7-9 per volume; patch 80 x 80, the training default there),
and 3D ``unet_3d`` (2 classes) on LA-like volumes (``synthetic:la``: 64^3; patch 48^3, so 8
overlapping windows per volume). Weights are random (seeded): timing does not depend on them.
GPU rows, when CUDA is available: eager and TorchScript on the GPU (``device="cuda"``), and
onnxruntime with ``CUDAExecutionProvider`` when onnxruntime-gpu is installed. The label maps of
every variant are compared with eager's (fraction of equal voxels, reported).

``--smoke`` uses tiny networks and volumes and 2 rounds (CI: seconds; most of it is the two ONNX
exports). ``--threads N`` sets both torch's and onnxruntime's intra-op threads (default: torch's
current count, i.e. ``OMP_NUM_THREADS``).

``--network-only``: why 3D TorchScript and onnxruntime trail eager on the CPU. The 3D network alone
on one batch of windows (4 x 1 x 48^3, what the sliding window feeds it), timed round-robin:
eager float32, eager under bf16 autocast, the exported TorchScript file as loaded, the same file
frozen and passed through ``torch.jit.optimize_for_inference``, and onnxruntime with the runner's
session options at each graph optimisation level. Writes
``benches/results/inference_network_3d.json``.

Usage: python benches/bench_inference.py [--smoke] [--network-only] [--threads N] [--rounds N] [--out PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import metadata, time_round_robin, write_json  # noqa: E402

import sslseg  # noqa: E402
from sslseg.models import create_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "export" / "onnx" / "sslseg_onnx_infer.py"

# name -> (model, model options, classes, data spec, patch, volumes per sample)
FULL = {
    "2d_acdc": ("unet", {}, 4, "synthetic:acdc", [80, 80], 4),
    "3d_la": ("unet_3d", {}, 2, "synthetic:la", [48, 48, 48], 2),
}
SMOKE = {
    "2d_acdc": ("unet", {"channels": [4, 8, 16, 32], "dropout": [0.0] * 4}, 4, "synthetic:acdc?cases=3&size=32&slices=2",
                [32, 32], 2),
    "3d_la": ("unet_3d", {"channels": [4, 8, 16, 32]}, 2, "synthetic:la?cases=3&size=32", [16, 16, 16], 2),
}


def _runner():
    spec = importlib.util.spec_from_file_location("sslseg_onnx_infer", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_case(name: str, spec: tuple, workdir: Path, rounds: int, threads: int, runner) -> list[dict]:
    model_name, options, classes, data, patch, n_cases = spec
    ds = sslseg.data.load(data)
    dim = 2 if model_name == "unet" else 3
    volumes = [ds.read_volume(v, with_label=False).image.numpy() for v in ds.volume_ids[:n_cases]]
    model = create_model(model_name, 1, classes, seed=0, **options).eval()
    record = {"model": model_name, "dim": dim, "patch_size": patch, "in_channels": 1, "num_classes": classes,
              "intensity": ds.intensity, "data": data}
    # The files are verified by the labels comparison below (and by sslseg.export's own tests).
    ts_path = sslseg.export(model, workdir / f"{name}.pt", record=record, verify=False).path
    onnx_path = sslseg.export(model, workdir / f"{name}.onnx", record=record, verify=False).path

    import onnxruntime as ort

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for dev in devices:
        eager = model.to(dev)
        scripted = torch.jit.load(str(ts_path), map_location=dev).eval()
        variants = {
            "eager": lambda m=eager, d=dev: [sslseg.infer(m, v, record=record, device=d, amp="none") for v in volumes],
            "eager_auto": lambda m=eager, d=dev: [sslseg.infer(m, v, record=record, device=d) for v in volumes],
            "torchscript": lambda m=scripted, d=dev: [sslseg.infer(m, v, record=record, device=d, amp="none")
                                                      for v in volumes],
        }
        provider = "CPUExecutionProvider" if dev == "cpu" else "CUDAExecutionProvider"
        note = None
        if provider in ort.get_available_providers():
            seg = runner.OnnxSegmenter(onnx_path, providers=[provider], threads=threads)
            variants["onnxruntime"] = lambda s=seg: [s.predict(v) for v in volumes]
        else:
            note = f"onnxruntime has no {provider} (install onnxruntime-gpu): no onnxruntime row"
        with torch.inference_mode():
            timings = time_round_robin(variants, device=dev, rounds=rounds, min_sample_s=0.0)
        reference = [np.asarray(lab) for lab in variants["eager"]()]
        for variant, fn in variants.items():
            labels = fn()
            same = sum(int((np.asarray(lab.cpu() if hasattr(lab, "cpu") else lab) == ref).sum())
                       for lab, ref in zip(labels, reference))
            total = sum(ref.size for ref in reference)
            t = timings[variant]
            rows.append({
                "case": name, "model": model_name, "data": data, "patch_size": patch, "device": dev,
                "variant": variant, "volumes": n_cases, "shapes": [list(v.shape) for v in volumes],
                "cases_per_s_best": n_cases / (t["min_ms"] / 1e3), "cases_per_s_median": n_cases / (t["median_ms"] / 1e3),
                "ms_per_case_min": t["min_ms"] / n_cases, "ms_per_case_median": t["median_ms"] / n_cases,
                "label_agreement_vs_eager": same / total, **({"note": note} if note else {}),
            })
        if note:
            print(note)
        model.to("cpu")
    return rows


def bench_network(spec: tuple, workdir: Path, rounds: int, threads: int) -> list[dict]:
    """The 3D network alone on one batch of 4 windows: eager, TorchScript and onnxruntime variants."""
    import onnxruntime as ort

    model_name, options, classes, data, patch, _ = spec
    model = create_model(model_name, 1, classes, seed=0, **options).eval()
    record = {"model": model_name, "dim": 3, "patch_size": patch, "in_channels": 1, "num_classes": classes,
              "intensity": "zscore", "data": data}
    ts_path = sslseg.export(model, workdir / "net3d.pt", record=record, verify=False).path
    onnx_path = sslseg.export(model, workdir / "net3d.onnx", record=record, verify=False).path
    x = torch.randn(4, 1, *patch, generator=torch.Generator().manual_seed(0))
    scripted = torch.jit.load(str(ts_path)).eval()
    frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.load(str(ts_path)).eval()))
    variants = {"eager": lambda: model(x)}
    variants["eager_bf16"] = lambda: _autocast_call(model, x)
    variants["torchscript"] = lambda: scripted(x)
    variants["torchscript_frozen"] = lambda: frozen(x)
    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all (runner default)": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    feed = {"x": x.numpy()}
    for label, level in levels.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.graph_optimization_level = level
        sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        variants[f"onnxruntime {label}"] = lambda s=sess, n=name: s.run(None, {n: feed["x"]})
    with torch.inference_mode():
        timings = time_round_robin(variants, rounds=rounds, min_sample_s=0.0)
        reference = model(x)
        for compiled in (scripted, frozen):
            torch.testing.assert_close(compiled(x), reference, atol=1e-3, rtol=1e-3)
    return [{"case": f"{model_name} {tuple(x.shape)}", "variant": k, **v,
             "x_eager": v["min_ms"] / timings["eager"]["min_ms"]} for k, v in timings.items()]


def _autocast_call(model, x):
    with torch.autocast("cpu", torch.bfloat16):
        return model(x)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny networks and volumes, 2 rounds (CI)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads of torch and onnxruntime")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--network-only", action="store_true",
                   help="the 3D network alone: eager, TorchScript (as loaded, frozen) and onnxruntime levels")
    p.add_argument("--out", default=None, help="JSON path (default benches/results/inference[_smoke].json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    rounds = args.rounds or (2 if args.smoke else 5)
    warnings.filterwarnings("ignore", module="torch")  # torch.jit / onnx exporter deprecation notices
    if args.network_only:
        spec = (SMOKE if args.smoke else FULL)["3d_la"]
        with tempfile.TemporaryDirectory() as tmp:
            rows = bench_network(spec, Path(tmp), rounds, threads)
        print(f"3D network alone, one batch of windows, {threads} thread(s), ms (best / median of {rounds} rounds)")
        for r in rows:
            print(f"  {r['variant']:32s} {r['min_ms']:9.1f} / {r['median_ms']:9.1f}   {r['x_eager']:.2f}x eager")
        out = args.out or f"benches/results/inference_network_3d{'_smoke' if args.smoke else ''}.json"
        write_json(out, {"bench": "inference_network_3d", "meta": metadata("cpu"), "threads": threads,
                         "rounds": rounds, "results": rows})
        print(f"wrote {out}")
        return 0
    runner = _runner()
    cases = SMOKE if args.smoke else FULL
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in cases.items():
            rows += bench_case(name, spec, Path(tmp), rounds, threads, runner)

    print(f"inference, cases per second (best / median of {rounds} rounds), {threads} thread(s)")
    print("| case | device | variant | cases/s | ms per case | vs eager | labels = eager |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(x for x in rows if x["case"] == r["case"] and x["device"] == r["device"] and x["variant"] == "eager")
        print(f"| {r['case']} {tuple(r['patch_size'])} | {r['device']} | {r['variant']} | "
              f"{r['cases_per_s_best']:.2f} / {r['cases_per_s_median']:.2f} | {r['ms_per_case_min']:.1f} | "
              f"{r['cases_per_s_best'] / base['cases_per_s_best']:.2f}x | {r['label_agreement_vs_eager']:.4%} |")
    out = args.out or f"benches/results/inference{'_smoke' if args.smoke else ''}.json"
    write_json(out, {"bench": "inference", "meta": metadata("cuda" if torch.cuda.is_available() else "cpu"),
                     "threads": threads, "rounds": rounds, "results": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
