"""Shared timing for benches: round-robin samples, min and median, environment metadata.

Variants are timed in turn inside each round, so slow drifts of a shared host (other jobs, turbo,
thermal) hit every variant alike; the minimum is the most repeatable figure on a noisy 2-core host,
the median is reported beside it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_round_robin(
    variants: dict[str, Callable[[], object]], *, device: str = "cpu", rounds: int = 15, min_sample_s: float = 0.004
) -> dict[str, dict[str, float]]:
    """Time each variant ``rounds`` times, interleaved; returns ms per call (min, median, iqr)."""
    inner: dict[str, int] = {}
    for name, fn in variants.items():  # warm up and choose calls per sample
        fn()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        one = max(time.perf_counter() - t0, 1e-7)
        inner[name] = max(1, min(10_000, int(min_sample_s / one)))
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            n = inner[name]
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - t0) / n * 1e3)
    out = {}
    for name, xs in samples.items():
        q = statistics.quantiles(xs, n=4) if len(xs) >= 4 else [min(xs), statistics.median(xs), max(xs)]
        out[name] = {"min_ms": min(xs), "median_ms": statistics.median(xs), "iqr_ms": q[2] - q[0], "calls_per_sample": inner[name]}
    return out


# A busy loop that also ends by itself once its parent is gone (the bench killed by a signal
# before its ``finally`` ran): the parent pid changes when the process is re-parented.
_BUSY_LOOP = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    pass\n"


@contextmanager
def busy_load(n: int) -> Iterator[int]:
    """Run ``n`` busy-loop processes (one core each, at most) while the block runs.

    The kernels' parallel regions are measured where cores are taken by other work (a data loader,
    a second training run, a CI job): a thread that is descheduled mid-region stalls the whole
    fork/join. The processes are killed and reaped on exit, whatever happens inside the block.
    Yields ``n`` (the load level, recorded in the JSON by the benches).
    """
    if n < 0:
        raise ValueError(f"busy_load: n must be >= 0, got {n}")
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-c", _BUSY_LOOP],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        if procs:
            time.sleep(0.5)  # let the interpreters start and reach their loop
        yield n
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def add_load_argument(parser) -> None:
    """``--load N``: the option every op bench shares (see :func:`busy_load`)."""
    parser.add_argument("--load", type=int, default=0, metavar="N",
                        help="run N busy-loop processes beside the measurement (default 0: quiet host)")


def load_suffix(n: int) -> str:
    """Suffix of a bench's default JSON name under ``--load N``: ``_load2`` (empty when quiet)."""
    return f"_load{n}" if n else ""


def metadata(device: str, load: int = 0) -> dict[str, object]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=False).stdout.strip()
    except OSError:
        commit = ""
    meta: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "commit": commit,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "device": device,
        "load": load,
    }
    if device.startswith("cuda"):
        meta["gpu"] = torch.cuda.get_device_name()
    return meta


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)
    return path
