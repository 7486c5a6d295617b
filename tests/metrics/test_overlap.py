"""sslseg.metrics.dice / jaccard against medpy, per class and batched, with the empty policy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sslseg.metrics as M
from tests.devices import devices
from tests.metrics.medpy_reference import medpy_binary


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int64, torch.float32])
def test_binary_matches_medpy(dtype):
    rng = np.random.default_rng(0)
    p, g = rng.random((3, 17, 19, 6)) < 0.4, rng.random((3, 17, 19, 6)) < 0.5
    d = M.dice(torch.from_numpy(p).to(dtype), torch.from_numpy(g).to(dtype), spatial_dims=3)
    j = M.jaccard(torch.from_numpy(p).to(dtype), torch.from_numpy(g).to(dtype), spatial_dims=3)
    assert d.value.shape == (3,) and d.value.dtype == torch.float64 and d.n_policy == 0
    for b in range(3):
        assert d.value[b].item() == pytest.approx(medpy_binary.dc(p[b], g[b]), rel=1e-12)
        assert j.value[b].item() == pytest.approx(medpy_binary.jc(p[b], g[b]), rel=1e-12)


@pytest.mark.parametrize("device", devices())
def test_label_maps_per_class(device):
    rng = np.random.default_rng(1)
    pred, gt = rng.integers(0, 4, (2, 3, 11, 13)), rng.integers(0, 4, (2, 3, 11, 13))
    gt[1, 2][gt[1, 2] == 3] = 1
    pred[1, 2][pred[1, 2] == 3] = 2  # class 3 empty on both sides for case (1, 2)
    tp, tg = torch.from_numpy(pred).to(device), torch.from_numpy(gt).to(device)
    d = M.dice(tp, tg, num_classes=4, spatial_dims=2)
    assert d.value.shape == (2, 3, 3)
    for idx in np.ndindex(2, 3):
        for k, c in enumerate([1, 2, 3]):
            p, g = pred[idx] == c, gt[idx] == c
            expected = 1.0 if not (p.any() or g.any()) else medpy_binary.dc(p, g)
            assert d.value[idx + (k,)].item() == pytest.approx(expected, rel=1e-12)
    assert d.n_both_empty == 1 and d.n_one_empty == 0
    with_bg = M.jaccard(tp, tg, num_classes=4, include_background=True, spatial_dims=2)
    assert with_bg.value.shape == (2, 3, 4)
    assert with_bg.value[0, 0, 0].item() == pytest.approx(medpy_binary.jc(pred[0, 0] == 0, gt[0, 0] == 0), rel=1e-12)


@pytest.mark.parametrize(("policy", "both", "one"), [("penalty", 1.0, 0.0), ("nan", math.nan, math.nan), ("zero", 0.0, 0.0)])
def test_empty_policy(policy, both, one):
    z = torch.zeros(5, 5, dtype=torch.bool)
    m = z.clone()
    m[1:3, 1:4] = True
    pred, gt = torch.stack([z, m, z, m]), torch.stack([z, z, m, m])
    for fn in (M.dice, M.jaccard):
        r = fn(pred, gt, spatial_dims=2, empty_policy=policy)
        torch.testing.assert_close(r.value, torch.tensor([both, one, one, 1.0], dtype=torch.float64), equal_nan=True)
        assert (r.n_both_empty, r.n_one_empty) == (1, 2)


def test_errors():
    with pytest.raises(ValueError, match=r"dice: pred and gt must have the same shape"):
        M.dice(torch.zeros(3, 4), torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"jaccard: empty_policy must be one of"):
        M.jaccard(torch.zeros(3, 4), torch.zeros(3, 4), empty_policy="ignore")
    with pytest.raises(ValueError, match=r"dice: no class to score: num_classes=1 and include_background=False"):
        M.dice(torch.zeros(3, 4, dtype=torch.int64), torch.zeros(3, 4, dtype=torch.int64), num_classes=1)
    with pytest.raises(ValueError, match=r"dice: gt has labels outside \[0, 2\): min -1, max 0"):
        M.dice(torch.zeros(3, 4, dtype=torch.int64), torch.tensor([[-1, 0, 0, 0]] * 3), num_classes=2)
