"""sslseg.metrics surface distances (hd95, hausdorff, asd) against medpy, batching and empty policy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

import sslseg.metrics as M
from tests.devices import devices
from tests.metrics.medpy_reference import medpy_binary, transcription


def _blob(shape, seed, sigma=2.0, frac=0.35):
    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return x > np.quantile(x, 1 - frac)


def _pair(shape, seed):
    """A ground truth and a prediction that overlaps it, with a false-positive island."""
    gt = _blob(shape, seed)
    pred = ndimage.binary_dilation(gt) if seed % 2 else ndimage.binary_erosion(gt)
    pred = pred ^ (_blob(shape, seed + 100, frac=0.05) & ~gt)
    return pred, gt


PAIRS = [
    ((40, 47), (1.0, 1.0)),
    ((33, 41), (0.6, 1.7)),
    ((24, 30, 19), (1.0, 1.0, 1.0)),
    ((24, 30, 19), (0.8, 0.8, 2.5)),
]


@pytest.mark.parametrize(("shape", "spacing"), PAIRS, ids=[f"{s}-{sp}" for s, sp in PAIRS])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_medpy(shape, spacing, seed):
    p, g = _pair(shape, seed)
    tp, tg = torch.from_numpy(p), torch.from_numpy(g)
    checks = {
        "hd95": (M.hd95(tp, tg, spacing), medpy_binary.hd95(p, g, voxelspacing=spacing)),
        "hd": (M.hausdorff(tp, tg, spacing), medpy_binary.hd(p, g, voxelspacing=spacing)),
        "asd": (M.asd(tp, tg, spacing), medpy_binary.asd(p, g, voxelspacing=spacing)),
        "asd_reverse": (M.asd(tg, tp, spacing), medpy_binary.asd(g, p, voxelspacing=spacing)),
        "assd": (M.asd(tp, tg, spacing, symmetric=True), medpy_binary.assd(p, g, voxelspacing=spacing)),
    }
    for name, (ours, ref) in checks.items():
        assert ours.n_policy == 0
        assert ours.item() == pytest.approx(float(ref), rel=1e-6), name


def test_masks_touching_the_image_border():
    # Surfaces on the image border (medpy erodes with background outside the image), and a
    # union bounding box that reaches the border (the crop then has no margin there).
    g = np.zeros((20, 25, 18), dtype=bool)
    g[0:9, 3:25, 10:18] = True
    p = np.zeros_like(g)
    p[1:11, 0:20, 8:18] = True
    tp, tg = torch.from_numpy(p), torch.from_numpy(g)
    for sp in [(1.0, 1.0, 1.0), (3.0, 0.5, 1.25)]:
        assert M.hd95(tp, tg, sp).item() == pytest.approx(transcription.hd95(p, g, voxelspacing=sp), rel=1e-6)
        assert M.asd(tp, tg, sp).item() == pytest.approx(transcription.asd(p, g, voxelspacing=sp), rel=1e-6)
        assert M.hausdorff(tp, tg, sp).item() == pytest.approx(transcription.hd(p, g, voxelspacing=sp), rel=1e-6)


def test_one_sided_error_is_the_union_percentile():
    # gt = a sphere; pred = gt + a detached lobe: medpy's hd95 (percentile of the union) differs
    # from MONAI's (max of the directed percentiles); sslseg implements medpy's.
    z, y, x = np.ogrid[:40, :40, :40]
    gt = (z - 15) ** 2 + (y - 20) ** 2 + (x - 20) ** 2 <= 8**2
    pred = gt | ((z - 31) ** 2 + (y - 20) ** 2 + (x - 20) ** 2 <= 4**2)
    ours = M.hd95(torch.from_numpy(pred), torch.from_numpy(gt)).item()
    assert ours == pytest.approx(transcription.hd95(pred, gt), rel=1e-6)
    d_pg, d_gp = M.surface_distances(torch.from_numpy(pred), torch.from_numpy(gt))
    monai_style = max(np.percentile(d_pg.numpy(), 95), np.percentile(d_gp.numpy(), 95))
    assert ours < monai_style


def test_percentile_and_distances():
    p, g = _pair((30, 31), 3)
    tp, tg = torch.from_numpy(p), torch.from_numpy(g)
    d_pg, d_gp = M.surface_distances(tp, tg, (1.0, 2.0))
    from tests.metrics.medpy_reference import _surface_distances

    np.testing.assert_allclose(d_pg.numpy(), _surface_distances(p, g, (1.0, 2.0)), rtol=1e-6)
    np.testing.assert_allclose(d_gp.numpy(), _surface_distances(g, p, (1.0, 2.0)), rtol=1e-6)
    for q in [0, 37.5, 50, 99, 100]:
        expected = np.percentile(np.hstack([d_pg.numpy().astype(np.float64), d_gp.numpy()]), q)
        assert M.hausdorff(tp, tg, (1.0, 2.0), percentile=q).item() == pytest.approx(expected, rel=1e-12)


def test_batched_per_class_label_maps():
    rng = np.random.default_rng(0)
    shape = (2, 18, 21, 13)
    gt = np.zeros(shape, dtype=np.int64)
    pred = np.zeros(shape, dtype=np.int64)
    for c, frac in [(1, 0.45), (2, 0.15)]:
        for b in range(2):
            gt[b][_blob(shape[1:], 10 * b + c, frac=frac)] = c
            pred[b][_blob(shape[1:], 10 * b + c + 50, frac=frac) | ((gt[b] == c) & (rng.random(shape[1:]) < 0.9))] = c
    pred[1][pred[1] == 3] = 0
    gt[1][gt[1] == 2] = 1  # class 2 absent from case 1's ground truth: one-empty case
    spacing = (1.0, 0.7, 2.0)
    r = M.hd95(torch.from_numpy(pred), torch.from_numpy(gt), spacing, num_classes=4)
    assert r.value.shape == (2, 3) and r.value.dtype == torch.float64
    for b in range(2):
        for k, c in enumerate([1, 2, 3]):
            p, g = pred[b] == c, gt[b] == c
            if p.any() and g.any():
                assert r.value[b, k].item() == pytest.approx(transcription.hd95(p, g, voxelspacing=spacing), rel=1e-6)
            elif not p.any() and not g.any():
                assert r.value[b, k] == 0.0 and r.both_empty[b, k]
            else:
                assert r.value[b, k] == pytest.approx(M.image_diagonal(shape[1:], spacing)) and r.one_empty[b, k]
    assert r.n_both_empty == 2  # class 3 is nowhere
    assert r.n_one_empty == int(((pred == 2).any(axis=(1, 2, 3)) != (gt == 2).any(axis=(1, 2, 3))).sum())
    bg = M.asd(torch.from_numpy(pred), torch.from_numpy(gt), spacing, num_classes=4, include_background=True)
    assert bg.value.shape == (2, 4)
    assert bg.value[0, 0].item() == pytest.approx(transcription.asd(pred[0] == 0, gt[0] == 0, voxelspacing=spacing), rel=1e-6)


@pytest.mark.parametrize("policy", ["penalty", "nan", "zero"])
def test_empty_policy(policy):
    z = torch.zeros(12, 10, dtype=torch.bool)
    m = z.clone()
    m[3:6, 4:8] = True
    pred = torch.stack([z, m, z, m])
    gt = torch.stack([z, z, m, m])
    spacing = (2.0, 0.5)
    diag = math.hypot(12 * 2.0, 10 * 0.5)
    for fn in (M.hd95, M.hausdorff, M.asd):
        r = fn(pred, gt, spacing, empty_policy=policy)
        assert r.both_empty.tolist() == [True, False, False, False]
        assert r.one_empty.tolist() == [False, True, True, False]
        assert (r.n_both_empty, r.n_one_empty, r.n_policy) == (1, 2, 3)
        expected = {"penalty": [0.0, diag, diag], "nan": [math.nan] * 3, "zero": [0.0] * 3}[policy]
        torch.testing.assert_close(r.value[:3], torch.tensor(expected, dtype=torch.float64), equal_nan=True)
        assert r.value[3] == 0.0
    if policy == "penalty":
        assert M.hd95(pred, gt, spacing, penalty=99.0).value[1:3].tolist() == [99.0, 99.0]


def test_result_helpers():
    pred = torch.zeros(2, 6, 6, dtype=torch.bool)
    pred[1, 2:4, 2:4] = True
    gt = pred.clone()
    gt[0, 1, 1] = True
    r = M.hd95(pred, gt, spatial_dims=2, empty_policy="nan")
    assert math.isnan(r.value[0]) and r.mean().item() == 0.0
    with pytest.raises(ValueError, match=r"item\(\) needs a single value, the result has shape \(2,\)"):
        r.item()
    assert float(M.hd95(pred[1], gt[1])) == 0.0
    assert "n_one_empty=1" in repr(r)


def test_surface_extraction():
    m = np.zeros((7, 8, 9), dtype=bool)
    m[0:5, 2:7, 3:9] = True
    ours = M.surface(torch.from_numpy(m)).numpy()
    np.testing.assert_array_equal(ours, m ^ ndimage.binary_erosion(m, ndimage.generate_binary_structure(3, 1)))
    inner = M.surface(torch.from_numpy(m), image_border=False).numpy()
    eroded = ndimage.binary_erosion(m, ndimage.generate_binary_structure(3, 1), border_value=1)
    np.testing.assert_array_equal(inner, m & ~eroded)
    batched = M.surface(torch.from_numpy(np.stack([m, ~m])), spatial_dims=3).numpy()
    np.testing.assert_array_equal(batched[0], ours)


def test_segmentation_metrics_matches_single_functions():
    rng = np.random.default_rng(1)
    pred = torch.from_numpy(rng.integers(0, 3, (2, 14, 15)))
    gt = torch.from_numpy(rng.integers(0, 3, (2, 14, 15)))
    gt[1][gt[1] == 2] = 0
    out = M.segmentation_metrics(pred, gt, (1.0, 2.0), num_classes=3, metrics=("dice", "jaccard", "hd95", "asd", "assd", "hausdorff"))
    single = {
        "dice": M.dice(pred, gt, num_classes=3, spatial_dims=2),
        "jaccard": M.jaccard(pred, gt, num_classes=3, spatial_dims=2),
        "hd95": M.hd95(pred, gt, (1.0, 2.0), num_classes=3),
        "asd": M.asd(pred, gt, (1.0, 2.0), num_classes=3),
        "assd": M.asd(pred, gt, (1.0, 2.0), num_classes=3, symmetric=True),
        "hausdorff": M.hausdorff(pred, gt, (1.0, 2.0), num_classes=3),
    }
    for name, r in single.items():
        # Same distance maps and reductions on the same inputs (shared code path): bit-equal.
        torch.testing.assert_close(out[name].value, r.value, rtol=0, atol=0)
        assert out[name].n_one_empty == r.n_one_empty == 1


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: M.hd95(torch.zeros(4, 5), torch.zeros(4, 6)), ValueError, r"hd95: pred and gt must have the same shape, got \[4, 5\] and \[4, 6\]"),
        (lambda: M.hd95(torch.zeros(2, 4, 5, 6), torch.zeros(2, 4, 5, 6)), ValueError, r"hd95: cannot tell the spatial dims"),
        (lambda: M.asd(torch.zeros(4, 5), torch.zeros(4, 5), empty_policy="skip"), ValueError, r"asd: empty_policy must be one of \['penalty', 'nan', 'zero'\], got 'skip'"),
        (lambda: M.hd95(torch.zeros(4, 5), torch.zeros(4, 5), num_classes=3), TypeError, r"hd95: with num_classes, pred must be an integer label map, got torch.float32"),
        (lambda: M.hd95(torch.full((4, 5), 3), torch.zeros(4, 5, dtype=torch.int64), num_classes=3), ValueError, r"hd95: pred has labels outside \[0, 3\): min 3, max 3"),
        (lambda: M.hd95(torch.zeros(4, 5), torch.zeros(4, 5), (1.0, 0.0)), ValueError, r"hd95: spacing\[1\] must be finite and > 0, got 0.0"),
        (lambda: M.hausdorff(torch.zeros(4, 5), torch.zeros(4, 5), percentile=101), ValueError, r"percentile must be None or in \[0, 100\], got 101"),
        (lambda: M.hd95(torch.zeros(4, 5), torch.zeros(4, 5), penalty=-1.0), ValueError, r"hd95: penalty must be a number >= 0 or None"),
        (lambda: M.surface_distances(torch.zeros(4, 5), torch.ones(4, 5)), ValueError, r"surface_distances: pred is empty"),
        (lambda: M.hd95(np.zeros((4, 5)), torch.zeros(4, 5)), TypeError, r"hd95: pred must be a Tensor, got ndarray"),
        (lambda: M.segmentation_metrics(torch.zeros(4, 5), torch.zeros(4, 5), metrics=("dice", "hd100")), ValueError, r"metrics must be a non-empty subset of"),
    ],
)
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("device", devices())
def test_device_inputs(device):
    p, g = _pair((20, 22, 17), 5)
    tp, tg = torch.from_numpy(p).to(device), torch.from_numpy(g).to(device)
    r = M.hd95(tp, tg, (1.0, 1.5, 0.5))
    assert r.value.device.type == "cpu"
    assert r.item() == pytest.approx(transcription.hd95(p, g, voxelspacing=(1.0, 1.5, 0.5)), rel=1e-6)
    assert M.asd(tp, tg).item() == pytest.approx(transcription.asd(p, g), rel=1e-6)
