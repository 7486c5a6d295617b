"""The CPU kernels give the same bits on one thread and on two.

Each kernel decides from the size of its work whether to open a parallel region (csrc/parallel.h):
the inputs here are large enough for two tasks of at least 0.5 ms of estimated serial work, so with
two threads the split path runs, and its result must equal the serial one bit for bit. (The other
tests in tests/ops check the kernels against their reference twins on small, serial inputs.)
"""

from __future__ import annotations

import pytest
import torch

import sslseg.ops
from sslseg.inference import window_grid

pytestmark = pytest.mark.skipif(not sslseg.ops.has_ops(), reason="sslseg ops not built")


def _on_threads(n: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def _serial_and_split(fn):
    return _on_threads(1, fn), _on_threads(2, fn)


def _assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y)


@pytest.mark.parametrize("t_dtype", [torch.float32, torch.float64], ids=str)
def test_ema_update(t_dtype):
    g = torch.Generator().manual_seed(0)
    # 6.3M elements in tensors of uneven sizes, so chunk edges fall inside tensors.
    sizes = [3_000_001, 17, 3_300_000]
    teacher0 = [torch.randn(n, generator=g).to(t_dtype) for n in sizes]
    student = [torch.randn(n, generator=g) for n in sizes]

    def run():
        teacher = [t.clone() for t in teacher0]
        torch.ops.sslseg.ema_update_(teacher, student, 0.99)
        return teacher

    _assert_same(*_serial_and_split(run))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_mc_uncertainty(dtype):
    g = torch.Generator().manual_seed(1)
    # float32: 2.4M accumulator elements (0.5 ns each); float64: 240K (10 ns each).
    shape = (2, 4, 300_000) if dtype == torch.float32 else (2, 2, 60_000)
    logits = [torch.randn(shape, generator=g).to(dtype) * 4 for _ in range(2)]

    def run():
        acc = torch.empty(shape, dtype=dtype)
        torch.ops.sslseg.mc_softmax_accumulate_(acc, logits[0], True)
        torch.ops.sslseg.mc_softmax_accumulate_(acc, logits[1], False)
        ent = torch.ops.sslseg.mc_entropy_finalize_(acc, 2, True, 1e-6)
        return [acc, ent]

    _assert_same(*_serial_and_split(run))


@pytest.mark.parametrize("shape", [(1, 64, 64, 64), (4, 256, 256)], ids=["3d", "2d"])
def test_edt(shape):
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(shape, generator=g) > 0.3
    nd = len(shape) - 1
    spacing = [1.0, 0.5, 2.0][:nd]  # anisotropic: the float64 path; unit spacing: the integer path

    def run():
        return [sslseg.ops.edt(mask, spacing=spacing), sslseg.ops.edt(mask, spatial_dims=nd)]

    _assert_same(*_serial_and_split(run))


def test_sliding_window():
    g = torch.Generator().manual_seed(3)
    spatial, roi, channels = (128, 120, 80), (96, 96, 64), 3
    grid = window_grid(spatial, roi, 0.25)
    starts, counts, n = grid.flat_starts, grid.counts, grid.num_windows
    volume = torch.randn((1, channels, *spatial), generator=g)
    imp = torch.rand(roi, generator=g) + 0.1

    def run():
        windows = torch.ops.sslseg.sw_gather(volume, list(roi), starts, counts, 0, n, 0.0)
        weight = torch.zeros((1, 1, *spatial))
        torch.ops.sslseg.sw_accumulate_(weight, imp[None, None].expand(n, 1, *roi).contiguous(), None, None,
                                        starts, counts, 0, False)
        out = torch.empty((1, channels, *spatial))
        torch.ops.sslseg.sw_accumulate_(out, windows * 3.0, imp, weight[0, 0], starts, counts, 0, True)
        return [windows, weight, out]

    _assert_same(*_serial_and_split(run))
