"""UA-MT: the threshold, the uncertainty mask and its normaliser, and the MC passes of the teacher."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sslseg.data import Batch
from sslseg.utils.schedules import sigmoid_rampup
from sslseg.methods import NetworkSpec, StepContext, get_method
from sslseg.methods.uamt import uamt_threshold, uncertainty_masked_mse

from tests.methods._context import cpu_context


def _ctx(step: int = 0, iterations: int = 10, weight: float = 1.0) -> StepContext:
    return cpu_context(step=step, iterations=iterations, weight=weight)


class _Counting(nn.Module):
    """A deterministic 1x1 conv that counts its calls."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, weight.shape[0], 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(weight.view(-1, 1, 1, 1))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.conv(x)


def test_threshold_ramps_from_three_quarters_of_ln_c_to_ln_c():
    assert uamt_threshold(0, 100, 4) == pytest.approx((0.75 + 0.25 * math.exp(-5)) * math.log(4))
    assert uamt_threshold(100, 100, 4) == pytest.approx(math.log(4))
    assert uamt_threshold(50, 100, 4) == pytest.approx((0.75 + 0.25 * sigmoid_rampup(50, 100)) * math.log(4))
    # SSL4MIS: ln 2 for any number of classes; identical to the paper for 2 classes.
    assert uamt_threshold(100, 100, 4, ssl4mis=True) == pytest.approx(math.log(2))
    assert uamt_threshold(30, 100, 2, ssl4mis=True) == uamt_threshold(30, 100, 2)


def test_masked_mse_counts_only_confident_voxels_and_normalises_by_classes():
    # B=1, C=2, three voxels; the teacher is unsure about the last two.
    ps = torch.tensor([[[0.9, 0.2, 0.5], [0.1, 0.8, 0.5]]]).unsqueeze(-1)  # (1, 2, 3, 1)
    pt = torch.tensor([[[0.6, 0.2, 0.0], [0.4, 0.8, 1.0]]]).unsqueeze(-1)
    unc = torch.tensor([[[0.1, 0.7, 0.9]]]).unsqueeze(-1)  # (1, 1, 3, 1)
    loss, mask = uncertainty_masked_mse(ps, pt, unc, 0.5)
    assert mask.flatten().tolist() == [1.0, 0.0, 0.0]
    # Voxel 0 only: ((0.9-0.6)^2 + (0.1-0.4)^2) / (C * 1).
    assert loss.item() == pytest.approx((0.09 + 0.09) / 2)
    loss, mask = uncertainty_masked_mse(ps, pt, unc, 0.8)
    assert mask.flatten().tolist() == [1.0, 1.0, 0.0]
    assert loss.item() == pytest.approx((0.09 + 0.09 + 0.0) / (2 * 2))
    # Nothing confident: 0, not NaN.
    loss, _ = uncertainty_masked_mse(ps, pt, unc, 0.0)
    assert loss.item() == 0.0


def test_masked_mse_normaliser_with_four_classes():
    torch.manual_seed(0)
    ps, pt = torch.rand(2, 4, 3, 3).softmax(1), torch.rand(2, 4, 3, 3).softmax(1)
    unc = torch.rand(2, 1, 3, 3)
    paper, mask = uncertainty_masked_mse(ps, pt, unc, 0.5)
    ssl4mis, _ = uncertainty_masked_mse(ps, pt, unc, 0.5, normalizer=2.0)
    expected = ((ps - pt) ** 2 * mask).sum() / (4 * mask.sum())
    assert paper.item() == pytest.approx(expected.item())
    assert ssl4mis.item() == pytest.approx(2 * paper.item())


def _method(**options):
    cls = get_method("uamt")
    spec = NetworkSpec(model="unet", in_channels=1, num_classes=2, dim=2, patch_size=(16, 16), seed=0)
    method = cls(cls.Config(noise_std=0.0, **options), spec)
    method.build()
    # Deterministic stand-ins: logits = w * x per class.
    method.nets["student"] = _Counting(torch.tensor([1.0, -1.0]))
    method.teachers["teacher"] = _Counting(torch.tensor([2.0, -2.0]))
    return method


def _batch() -> Batch:
    x_l = torch.zeros(1, 1, 2, 2)
    # Unlabeled voxels: 0 (teacher p = 0.5: maximally unsure), 0.1, 1 and 3 (sure).
    x_u = torch.tensor([[[[0.0, 0.1], [1.0, 3.0]]]])
    return Batch(labeled_image=x_l, labeled_label=torch.zeros(1, 2, 2, dtype=torch.long), unlabeled_image=x_u)


def test_step_runs_t_teacher_passes_and_masks_by_predictive_entropy():
    method = _method(mc_passes=5)
    batch = _batch()
    ctx = _ctx(step=5, iterations=10)  # tau = (0.75 + 0.25 exp(-5/4)) ln 2 = 0.569
    out = method.step(batch, ctx)
    assert method.teachers["teacher"].calls == 1 + 5  # the target pass + T uncertainty passes
    x_u = batch.unlabeled_image
    q = torch.softmax(torch.cat([2 * x_u, -2 * x_u], 1), 1)
    entropy = -(q * torch.log(q + 1e-6)).sum(1, keepdim=True)
    mask = (entropy < (0.75 + 0.25 * math.exp(-5 / 4)) * math.log(2)).float()
    assert mask.flatten().tolist() == [0.0, 0.0, 1.0, 1.0]  # H = 0.693, 0.673 out; 0.090, 0.0025 in
    p = torch.softmax(torch.cat([x_u, -x_u], 1), 1)
    expected = ((p - q) ** 2 * mask).sum() / (2 * mask.sum())
    assert out.logs["loss_cons"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.logs["mask_ratio"].item() == pytest.approx(0.5)
    assert set(out.logs) == set(method.log_keys)


def test_threshold_switch_changes_the_mask_with_four_classes():
    cls = get_method("uamt")
    spec = NetworkSpec(model="unet", in_channels=1, num_classes=4, dim=2, patch_size=(16, 16))
    x_u = torch.tensor([[[[0.0, 0.3], [0.6, 2.0]]]])
    batch = Batch(labeled_image=torch.zeros(1, 1, 2, 2), labeled_label=torch.zeros(1, 2, 2, dtype=torch.long),
                  unlabeled_image=x_u)
    w = torch.tensor([1.5, 0.0, -0.5, -1.0])
    ratios = {}
    for ssl4mis in (False, True):
        method = cls(cls.Config(noise_std=0.0, ssl4mis_mask=ssl4mis), spec)
        method.build()
        method.nets["student"], method.teachers["teacher"] = _Counting(w), _Counting(w)
        ratios[ssl4mis] = method.step(batch, _ctx(step=10, iterations=10)).logs["mask_ratio"].item()
        q = torch.softmax(w.view(1, 4, 1, 1) * x_u, 1)
        entropy = -(q * torch.log(q + 1e-6)).sum(1)
        tau = math.log(2) if ssl4mis else math.log(4)
        assert ratios[ssl4mis] == pytest.approx((entropy < tau).float().mean().item())
    # ln 2 < ln 4: SSL4MIS's constant rejects voxels the paper's threshold keeps.
    assert ratios[True] < ratios[False] == 1.0
