"""sslseg.inference.sliding_window: equal to MONAI's sliding_window_inference and to SSL4MIS's
test_single_case, streaming equal to the in-memory path, the pure-PyTorch path equal to the ops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference  # test-only dependency

from sslseg.inference import clear_cache, importance_map, sliding_window, window_grid
from tests.devices import devices


def _net(nd: int, k: int = 3, c_in: int = 1, device="cpu"):
    """A cheap position-dependent predictor: the rolls wrap around inside each window, so
    overlapping windows disagree near their borders (and the blending is exercised)."""
    g = torch.Generator().manual_seed(0)
    a, b, c, d = (torch.randn(1, k, *([1] * nd), generator=g).to(device) for _ in range(4))

    def net(x):
        x = x.sum(1, keepdim=True) if x.shape[1] != 1 else x
        return a * x + b * torch.roll(x, 1, -1) + c * torch.roll(x, -2, -2) + d

    return net


def _vol(shape, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device)


# (volume shape, roi, sw_batch_size, mode, overlap, extra kwargs)
MONAI_CASES = {
    "3d_odd_gaussian": ((1, 1, 23, 19, 17), (10, 8, 6), 4, "gaussian", 0.5, {}),
    "3d_batch2_constant": ((2, 1, 15, 21, 9), (8, 10, 6), 3, "constant", 0.25, {}),
    "2d_odd_gaussian_bs1": ((1, 1, 31, 27), (16, 12), 1, "gaussian", 0.5, {}),
    "2d_channels2": ((2, 2, 20, 13), (9, 9), 2, "gaussian", 0.6, {}),
    "roi_larger_cval": ((1, 1, 5, 6, 7), (8, 8, 8), 2, "gaussian", 0.5, {"cval": 0.5}),
    "roi_larger_one_dim": ((1, 1, 19, 4, 16), (8, 9, 8), 4, "gaussian", 0.5, {}),
    "replicate": ((1, 1, 12, 5, 9), (6, 8, 6), 3, "gaussian", 0.5, {"padding_mode": "replicate"}),
    "reflect": ((2, 1, 11, 4, 7), (6, 6, 6), 2, "constant", 0.5, {"padding_mode": "reflect"}),
    "circular": ((1, 1, 3, 12, 7), (6, 6, 6), 2, "gaussian", 0.5, {"padding_mode": "circular"}),
    "sigma_per_dim_roi_full": ((1, 1, 14, 11, 9), (6, -1, 5), 4, "gaussian", 0.5, {"sigma_scale": (0.1, 0.2, 0.3)}),
}


@pytest.mark.parametrize("case", list(MONAI_CASES))
def test_equals_monai(case):
    shape, roi, bs, mode, overlap, kw = MONAI_CASES[case]
    net = _net(len(shape) - 2, c_in=shape[1])
    vol = _vol(shape)
    with torch.no_grad():
        want = sliding_window_inference(vol, roi, bs, net, overlap, mode, **kw)
    got = sliding_window(net, vol, roi, overlap, mode, sw_batch_size=bs, **kw)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert (got - want).abs().max().item() <= 1e-5


def _ssl4mis_single_case(net, image, stride_xy, stride_z, patch_size, num_classes):
    """SSL4MIS test_3D_util.test_single_case (pad, stride grid, softmax per window, mean, argmax)."""
    w, h, d = image.shape
    pads = [max(p - s, 0) for s, p in zip(image.shape, patch_size)]
    image = np.pad(image, [(p // 2, p - p // 2) for p in pads], mode="constant", constant_values=0)
    ww, hh, dd = image.shape
    sx = math.ceil((ww - patch_size[0]) / stride_xy) + 1
    sy = math.ceil((hh - patch_size[1]) / stride_xy) + 1
    sz = math.ceil((dd - patch_size[2]) / stride_z) + 1
    score = np.zeros((num_classes,) + image.shape, dtype=np.float32)
    cnt = np.zeros(image.shape, dtype=np.float32)
    for x in range(sx):
        xs = min(stride_xy * x, ww - patch_size[0])
        for y in range(sy):
            ys = min(stride_xy * y, hh - patch_size[1])
            for z in range(sz):
                zs = min(stride_z * z, dd - patch_size[2])
                patch = torch.from_numpy(image[xs:xs + patch_size[0], ys:ys + patch_size[1], zs:zs + patch_size[2]][None, None].copy())
                with torch.no_grad():
                    prob = F.softmax(net(patch), dim=1).numpy()[0]
                score[:, xs:xs + patch_size[0], ys:ys + patch_size[1], zs:zs + patch_size[2]] += prob
                cnt[xs:xs + patch_size[0], ys:ys + patch_size[1], zs:zs + patch_size[2]] += 1
    score = score / cnt[None]
    crop = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pads, (w, h, d)))
    return np.argmax(score, axis=0)[crop], score[(slice(None), *crop)]


@pytest.mark.parametrize("shape", [(21, 17, 13), (9, 20, 7)], ids=str)
def test_equals_ssl4mis_stride_grid(shape):
    net, roi, stride = _net(3), (10, 8, 8), (4, 4, 3)
    vol = _vol((1, 1, *shape), seed=1)
    labels_ref, probs_ref = _ssl4mis_single_case(net, vol[0, 0].numpy(), stride[0], stride[2], roi, 3)
    kw = dict(stride=stride, mode="constant", activation="softmax", sw_batch_size=5)
    probs = sliding_window(net, vol, roi, **kw)
    labels = sliding_window(net, vol, roi, output="labels", **kw)
    np.testing.assert_allclose(probs[0].numpy(), probs_ref, rtol=0, atol=2e-6)
    assert labels.dtype == torch.int64 and labels.shape == (1, *shape)
    assert (labels[0].numpy() == labels_ref).all()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    ("shape", "roi", "bs"),
    [((2, 1, 23, 19, 17), (10, 8, 6), 4), ((1, 1, 5, 14, 9), (8, 6, 6), 3), ((2, 1, 33, 20), (12, 9), 5)],
    ids=["3d_batch2", "3d_padded", "2d"],
)
def test_streaming_equals_in_memory(device, shape, roi, bs):
    net = _net(len(shape) - 2, device=device)
    vol = _vol(shape, device)
    full = sliding_window(net, vol, roi, sw_batch_size=bs)
    stream = sliding_window(net, vol, roi, sw_batch_size=bs, streaming=True)
    torch.testing.assert_close(stream, full, rtol=0, atol=0)
    labels = sliding_window(net, vol, roi, sw_batch_size=bs, streaming=True, output="labels")
    assert torch.equal(labels, full.argmax(1))
    half = torch.empty(full.shape, dtype=torch.float16, device=device)
    res = sliding_window(net, vol, roi, sw_batch_size=bs, streaming=True, out=half)
    assert res is half
    torch.testing.assert_close(half, full.half(), rtol=0, atol=0)
    u8 = torch.empty(labels.shape, dtype=torch.uint8, device=device)
    sliding_window(net, vol, roi, sw_batch_size=bs, output="labels", out=u8)
    assert torch.equal(u8.long(), labels)


@pytest.mark.parametrize("device", devices())
def test_reference_path_equals_ops(device):
    net, vol = _net(3, device=device), _vol((2, 1, 17, 15, 11), device)
    clear_cache()
    a = sliding_window(net, vol, (8, 8, 6), sw_batch_size=3)
    b = sliding_window(net, vol, (8, 8, 6), sw_batch_size=3, use_ops=False)
    c = sliding_window(net, vol, (8, 8, 6), sw_batch_size=3, use_ops=False, streaming=True)
    # The kernel's pred * imp + num may become an FMA (aarch64, nvcc) and the blend cancels: 1e-6.
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # Same reference arithmetic, streamed: exact by construction.
    torch.testing.assert_close(c, b, rtol=0, atol=0)


def test_low_precision_predictions_accumulate_in_float32():
    net, vol = _net(3), _vol((1, 1, 16, 14, 12))
    full = sliding_window(net, vol, (8, 8, 6))
    half = sliding_window(lambda x: net(x).to(torch.bfloat16), vol, (8, 8, 6))
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=2e-2, atol=2e-2)
    f16 = sliding_window(net, vol, (8, 8, 6), out_dtype=torch.float16)
    assert f16.dtype == torch.float16
    d = sliding_window(lambda x: net(x).double(), vol, (8, 8, 6))
    assert d.dtype == torch.float64


def test_window_grid_and_importance_map():
    g = window_grid((224, 224, 160), (112, 112, 80), 0.5)
    assert g.starts == ((0, 56, 112), (0, 56, 112), (0, 40, 80)) and g.num_windows == 27
    g = window_grid((5, 20), (8, 8), 0.5)  # padded dim: one window starting before the volume
    assert g.pad_before == (1, 0) and g.starts == ((-1,), (0, 4, 8, 12))
    s = window_grid((128, 128, 88), (112, 112, 80), stride=(18, 18, 4))  # SSL4MIS: 2 x 2 x 3 windows
    assert s.starts == ((0, 16), (0, 16), (0, 4, 8))
    m = importance_map((9, 7), "gaussian", 0.125)
    assert m.shape == (9, 7) and m.dtype == torch.float32 and m.min() >= 1e-3 and m[4, 3] == m.max()
    assert importance_map((9, 7), "gaussian", 0.125) is m  # cached
    assert (importance_map((4, 4), "constant") == 1).all()


def test_argument_errors():
    net, vol = _net(3), _vol((1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match=r"volume must be \(B, C, H, W\) or \(B, C, H, W, D\), got shape \[8, 8, 8\]"):
        sliding_window(net, vol[0, 0], (4, 4, 4))
    with pytest.raises(ValueError, match=r"roi_size must have 3 entries \(one per spatial dim\), got 2"):
        sliding_window(net, vol, (4, 4))
    with pytest.raises(ValueError, match=r"mode must be one of \('gaussian', 'constant'\), got 'linear'"):
        sliding_window(net, vol, 4, mode="linear")
    with pytest.raises(ValueError, match=r"overlap must be in \[0, 1\), got 1.0"):
        sliding_window(net, vol, 4, overlap=1.0)
    with pytest.raises(ValueError, match=r"sw_batch_size must be an int >= 1, got 0"):
        sliding_window(net, vol, 4, sw_batch_size=0)
    with pytest.raises(ValueError, match=r"padding_mode must be one of"):
        sliding_window(net, vol, 4, padding_mode="edge")
    with pytest.raises(ValueError, match=r"output must be one of \('blend', 'labels'\), got 'probs'"):
        sliding_window(net, vol, 4, output="probs")
    with pytest.raises(ValueError, match=r"sigma_scale must be > 0, got 0"):
        sliding_window(net, vol, 4, sigma_scale=0)
    with pytest.raises(TypeError, match=r"predictor must return one Tensor, got tuple; wrap a model"):
        sliding_window(lambda x: (net(x), net(x)), vol, 4)
    with pytest.raises(ValueError, match=r"predictor must map \(4, C_in, \*\[4, 4, 4\]\) to \(4, K, \*\[4, 4, 4\]\), got shape \[4, 3, 2, 2, 2\]"):
        sliding_window(lambda x: net(x)[..., ::2, ::2, ::2], vol, 4)
    with pytest.raises(ValueError, match=r"out must have shape \[1, 3, 8, 8, 8\], got \[1, 3, 8, 8\]"):
        sliding_window(net, vol, 4, out=torch.empty(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"out must be an integer tensor for output='labels'"):
        sliding_window(net, vol, 4, output="labels", out=torch.empty(1, 8, 8, 8))


@pytest.mark.needs_cuda
def test_cuda_matches_cpu_and_devices():
    net_cpu, vol = _net(3), _vol((2, 1, 23, 19, 17))
    want = sliding_window(net_cpu, vol, (10, 8, 6), sw_batch_size=4)
    net_gpu = _net(3, device="cuda")
    got = sliding_window(net_gpu, vol.cuda(), (10, 8, 6), sw_batch_size=4)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        monai_gpu = sliding_window_inference(vol.cuda(), (10, 8, 6), 4, net_gpu, 0.5, "gaussian")
    assert (got - monai_gpu).abs().max().item() <= 1e-5
    # windows on the GPU, blending and output on the CPU
    mixed = sliding_window(net_gpu, vol, (10, 8, 6), sw_batch_size=4, sw_device="cuda", device="cpu")
    assert mixed.device.type == "cpu"
    torch.testing.assert_close(mixed, want, rtol=1e-5, atol=1e-5)
    stream = sliding_window(net_gpu, vol.cuda(), (10, 8, 6), sw_batch_size=4, streaming=True, output="labels")
    assert torch.equal(stream, got.argmax(1))


def test_pure_torch_path_exports():
    """use_ops=False uses no custom op: torch.export sees only aten ops and reproduces the result."""
    net = torch.nn.Conv2d(1, 2, 3, padding=1).eval()

    class SW(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            return sliding_window(self.net, x, (8, 8), sw_batch_size=2, use_ops=False)

    x = _vol((1, 1, 12, 10))
    ep = torch.export.export(SW(), (x,))
    targets = [str(n.target) for m in ep.graph_module.modules() if isinstance(m, torch.fx.GraphModule)
               for n in m.graph.nodes]
    assert any("aten" in t for t in targets) and not any("sslseg" in t for t in targets)
    x2 = _vol((1, 1, 12, 10), seed=3)
    torch.testing.assert_close(ep.module()(x2), sliding_window(net, x2, (8, 8), sw_batch_size=2), rtol=0, atol=0)


def test_labels_argmax_matches_torch_ties_and_nan():
    from sslseg.inference.sliding import _argmax1

    x = torch.randint(0, 3, (2, 4, 5, 6)).float()  # many ties: the first maximum wins
    x[0, 2, 1, 1] = float("nan")
    x[1, :, 2, 2] = float("nan")
    assert torch.equal(_argmax1(x), x.argmax(1))
    assert torch.equal(_argmax1(x[:, :1]), torch.zeros(2, 5, 6, dtype=torch.int64))


def test_fresh_volume_buffers_are_advised_as_huge_pages(monkeypatch):
    """Big CPU buffers get madvise(MADV_HUGEPAGE) on their 2 MiB-aligned interior, before any write;
    small ones, and everything while tracing, are plain torch.empty."""
    import sys

    import sslseg.inference.sliding as sliding

    calls = []

    class FakeLibc:
        def madvise(self, start, length, advice):
            calls.append((start.value, length.value, advice))
            return 0

    monkeypatch.setattr(sliding, "_libc", FakeLibc())
    t = sliding._empty((1, 2, 128, 128, 64), torch.float32, torch.device("cpu"))  # 8 MiB
    assert t.shape == (1, 2, 128, 128, 64) and t.dtype == torch.float32
    if sys.platform.startswith("linux"):
        (start, length, advice), = calls
        huge = sliding._HUGE_PAGE
        assert advice == 14 and start % huge == 0 and length % huge == 0 and length > 0
        assert t.data_ptr() <= start and start + length <= t.data_ptr() + t.nbytes
    else:
        assert calls == []
    calls.clear()
    sliding._empty((4, 4), torch.float32, torch.device("cpu"))
    assert calls == []
    t.fill_(3.0)
    assert float(t.sum()) == 3.0 * t.numel()
    # The blend of a volume is the same through these buffers (the kernel writes every voxel).
    vol = torch.randn(1, 1, 40, 36, 30)
    net = lambda x: torch.cat([x, -x], 1)  # noqa: E731
    a = sliding_window(net, vol, roi_size=(16, 16, 16), sw_batch_size=2)
    monkeypatch.setattr(sliding, "_HUGE_PAGE", 1 << 12)  # every buffer above 8 KiB goes through madvise
    b = sliding_window(net, vol, roi_size=(16, 16, 16), sw_batch_size=2)
    assert torch.equal(a, b) and calls
