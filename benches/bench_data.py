"""Bench: batches per second of the training data pipelines (2D slices, 3D patches).

Cases (synthetic data, generated in-process; the h5 case reads files written by make_synthetic):
  acdc_2d_memory   synthetic:acdc in memory, 2D slices -> Augment2D -> patch 64x64, batch 4+4
  acdc_2d_h5       the same data in the SSL4MIS h5 layout on disk (reads data/slices/*.h5)
  acdc_2d_strong   acdc_2d_memory plus a strong view (StrongAugment) of every sample
  la_3d_memory     synthetic:la in memory, 64^3 volumes -> Augment3D -> patch 48^3, batch 2+2
  brats_3d_strong  synthetic:brats, patch 48^3, batch 2+2, with strong views

Baseline: ssl4mis_2d_h5, the SSL4MIS pipeline on the same h5 files (h5py read, numpy rot90/flip
or scipy.ndimage.rotate, scipy zoom order 0, per sample; same batch composition).

Each case runs with 0 and 2 DataLoader workers. A run draws ``warmup`` batches (worker start-up,
caches), then times ``batches`` batches; repeated ``repeats`` times, the best and median rates
are reported. Workers are single-threaded (PyTorch's default), the main process uses the
default thread count.

Usage: python benches/bench_data.py [--smoke] [--out PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import metadata, write_json  # noqa: E402

import sslseg.data as D  # noqa: E402


class _SSL4MISSlices(torch.utils.data.Dataset):
    """SSL4MIS's BaseDataSets + RandomGenerator on h5 slices (the baseline)."""

    def __init__(self, root: Path, names: list[str], patch: tuple[int, int]) -> None:
        self.root, self.names, self.patch = root, names, patch

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int):
        import h5py
        from scipy import ndimage

        with h5py.File(self.root / "data" / "slices" / f"{self.names[i]}.h5", "r") as f:
            image, label = f["image"][()], f["label"][()]
        if np.random.random() < 0.5:
            k = np.random.randint(0, 4)
            image, label = np.rot90(image, k), np.rot90(label, k)
            axis = np.random.randint(0, 2)
            image, label = np.flip(image, axis).copy(), np.flip(label, axis).copy()
        else:
            angle = np.random.randint(-20, 20)
            image = ndimage.rotate(image, angle, order=0, reshape=False)
            label = ndimage.rotate(label, angle, order=0, reshape=False)
        x, y = image.shape
        image = ndimage.zoom(image, (self.patch[0] / x, self.patch[1] / y), order=0)
        label = ndimage.zoom(label, (self.patch[0] / x, self.patch[1] / y), order=0)
        return torch.from_numpy(image.astype(np.float32))[None], torch.from_numpy(label.astype(np.int64))


def _ssl4mis_loader(root: Path, split: D.Split, ds: D.CaseDataset, patch, lbs, ubs, workers: int):
    def names(cases):
        return [f"{v}_slice_{k}" for v, k in ds.training_refs(cases)]

    lab, unl = names(split.labeled_cases), names(split.unlabeled_cases)
    data = _SSL4MISSlices(root, lab + unl, patch)
    sampler = D.TwoStreamBatchSampler(range(len(lab)), range(len(lab), len(lab) + len(unl)), lbs, ubs, with_seeds=False)
    return torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=workers, persistent_workers=workers > 0)


def _rate(make_iter, warmup: int, batches: int, repeats: int) -> dict[str, float]:
    rates = []
    for _ in range(repeats):
        it = make_iter()
        for _ in range(warmup):
            next(it)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        rates.append(batches / (time.perf_counter() - t0))
        del it
    return {"best_batches_per_s": max(rates), "median_batches_per_s": statistics.median(rates)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, few batches (CI; < 30 s)")
    parser.add_argument("--out", default=None, help="JSON output (default benches/results/data[_smoke].json)")
    args = parser.parse_args(argv)

    if args.smoke:
        specs = {"acdc": "synthetic:acdc?cases=6&size=48&slices=4", "la": "synthetic:la?cases=4&size=32",
                 "brats": "synthetic:brats?cases=4&size=32"}
        p2, p3, warmup, batches, repeats = (32, 32), (24, 24, 24), 1, 4, 1
        workers_list = (0, 2)
    else:
        specs = {"acdc": "synthetic:acdc", "la": "synthetic:la", "brats": "synthetic:brats"}
        p2, p3, warmup, batches, repeats = (64, 64), (48, 48, 48), 3, 40, 3
        workers_list = (0, 2)

    t_start = time.perf_counter()
    gen = {}
    datasets = {}
    for kind, spec in specs.items():
        t0 = time.perf_counter()
        datasets[kind] = D.load(spec)
        gen[kind] = time.perf_counter() - t0
    tmp = tempfile.TemporaryDirectory()
    kind_opts = D.synthetic.parse_spec(specs["acdc"])[1]
    h5_root = D.make_synthetic("acdc", Path(tmp.name) / "acdc", **{k: int(v) for k, v in kind_opts.items()})
    h5_ds = D.load(h5_root)

    cases = {
        "acdc_2d_memory": (datasets["acdc"], p2, 4, 4, False),
        "acdc_2d_h5": (h5_ds, p2, 4, 4, False),
        "acdc_2d_strong": (datasets["acdc"], p2, 4, 4, True),
        "la_3d_memory": (datasets["la"], p3, 2, 2, False),
        "brats_3d_strong": (datasets["brats"], p3, 2, 2, True),
    }
    results = []
    for name, (ds, patch, lbs, ubs, strong) in cases.items():
        split = ds.split(labeled=max(1, len(ds.official.get("train", ds.cases)) // 4), seed=0)
        for workers in workers_list:
            loader = D.make_train_loader(ds, split, patch_size=patch, labeled_bs=lbs, unlabeled_bs=ubs,
                                         num_workers=workers, strong_aug=strong, batches_per_epoch=10_000)
            r = _rate(lambda: iter(loader.forever()), warmup, batches, repeats)
            r.update(case=name, workers=workers, patch=list(patch), batch=[lbs, ubs], strong=strong)
            r["samples_per_s"] = r["best_batches_per_s"] * (lbs + ubs)
            results.append(r)
            print(f"{name:18s} workers={workers}  {r['best_batches_per_s']:8.1f} batches/s (median {r['median_batches_per_s']:.1f})", flush=True)
    split = h5_ds.split(labeled=max(1, len(h5_ds.official["train"]) // 4), seed=0)
    for workers in workers_list:
        loader = _ssl4mis_loader(h5_root, split, h5_ds, p2, 4, 4, workers)
        loader.batch_sampler.batches_per_epoch = 10_000

        def endless(loader=loader):
            while True:
                yield from loader

        r = _rate(lambda: endless(), warmup, batches, repeats)
        r.update(case="ssl4mis_2d_h5 (baseline)", workers=workers, patch=list(p2), batch=[4, 4], strong=False)
        r["samples_per_s"] = r["best_batches_per_s"] * 8
        results.append(r)
        print(f"{'ssl4mis_2d_h5':18s} workers={workers}  {r['best_batches_per_s']:8.1f} batches/s (median {r['median_batches_per_s']:.1f})  [baseline]", flush=True)
    tmp.cleanup()

    out = args.out or str(Path(__file__).resolve().parent / "results" / ("data_smoke.json" if args.smoke else "data.json"))
    payload = {
        "bench": "data",
        "meta": metadata("cpu"),
        "smoke": args.smoke,
        "specs": specs,
        "generation_s": gen,
        "warmup_batches": warmup,
        "timed_batches": batches,
        "repeats": repeats,
        "results": results,
        "total_s": time.perf_counter() - t_start,
    }
    print(f"wrote {write_json(out, payload)} in {payload['total_s']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
