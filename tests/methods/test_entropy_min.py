"""Entropy minimisation: the normalised entropy of the unlabeled predictions (optionally all)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sslseg.data import Batch
from sslseg.losses.segmentation import supervised_loss
from sslseg.methods import NetworkSpec, StepContext, get_method

from tests.methods._context import cpu_context


def _ctx(weight: float = 0.5) -> StepContext:
    return cpu_context(weight=weight)


class _Scale(nn.Module):
    """logits = (w_c * x) per class: deterministic."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w).view(1, -1, 1, 1))

    def forward(self, x):
        return self.w * x


def _method(**options):
    cls = get_method("entropy_min")
    spec = NetworkSpec(model="unet", in_channels=1, num_classes=4, dim=2, patch_size=(16, 16))
    method = cls(cls.Config(**options), spec)
    method.build()
    method.nets["student"] = _Scale([4.0, 0.0, 0.0, 0.0])
    return method


def _batch() -> Batch:
    # Labeled images are confident (x = 2), unlabeled ones give uniform predictions (x = 0).
    return Batch(labeled_image=torch.full((2, 1, 3, 3), 2.0), labeled_label=torch.zeros(2, 3, 3, dtype=torch.long),
                 unlabeled_image=torch.zeros(3, 1, 3, 3))


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p + 1e-6)).sum(1) / math.log(p.shape[1])


def test_entropy_of_unlabeled_samples_only_by_default():
    method, batch = _method(), _batch()
    out = method.step(batch, _ctx(0.5))
    # Uniform predictions on the unlabeled samples: normalised entropy 1 (up to the 1e-6 inside the log).
    assert out.logs["loss_ent"].item() == pytest.approx(1.0, abs=1e-5)
    sup = supervised_loss(method.nets["student"](batch.labeled_image), batch.labeled_label)
    assert out.loss.item() == pytest.approx(sup.item() + 0.5 * out.logs["loss_ent"].item(), rel=1e-6)


def test_include_labeled_reproduces_ssl4mis_whole_batch_entropy():
    method, batch = _method(include_labeled=True), _batch()
    out = method.step(batch, _ctx())
    p_l = torch.softmax(method.nets["student"](batch.labeled_image), 1)
    # Mean over 2 labeled (low entropy) and 3 unlabeled (entropy 1) samples of equal size.
    expected = (2 * _entropy(p_l).mean() + 3 * 1.0) / 5
    assert out.logs["loss_ent"].item() == pytest.approx(expected.item(), abs=1e-5)
    assert out.logs["loss_ent"].item() < 0.9


@pytest.mark.parametrize("include_labeled", [False, True])
def test_entropy_term_reaches_labeled_samples_only_when_asked(include_labeled):
    method = _method(include_labeled=include_labeled)
    method.nets["student"] = _Scale([1.0, 0.5, 0.0, -0.5])
    torch.manual_seed(0)
    x_l = torch.randn(2, 1, 3, 3, requires_grad=True)
    x_u = torch.randn(3, 1, 3, 3, requires_grad=True)
    y = torch.randint(0, 4, (2, 3, 3))
    batch = Batch(labeled_image=x_l, labeled_label=y, unlabeled_image=x_u)
    out = method.step(batch, _ctx())
    grad_l, grad_u = torch.autograd.grad(out.loss, [x_l, x_u])
    (sup_grad_l,) = torch.autograd.grad(supervised_loss(method.nets["student"](x_l), y), [x_l])
    assert grad_u.abs().sum() > 0
    assert torch.allclose(grad_l, sup_grad_l, atol=1e-7) is (not include_labeled)
