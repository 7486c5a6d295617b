"""DAN: the adversarial term, the discriminator's own step and targets, with B_u != B_l."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sslseg.data import Batch
from sslseg.methods import NetworkSpec, StepContext, get_method
from sslseg.methods.adversarial import discriminator_targets

from tests.methods._context import cpu_context


class _Conv(nn.Module):
    """Deterministic segmenter stand-in (no dropout, no BatchNorm)."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = (nn.Conv2d if dim == 2 else nn.Conv3d)(1, classes, 1)

    def forward(self, x):
        return self.conv(x)


def _setup(dim: int = 2, n_l: int = 1, n_u: int = 3, classes: int = 3):
    cls = get_method("adversarial")
    size = (16,) * dim
    spec = NetworkSpec(model="unet" if dim == 2 else "unet_3d", in_channels=1, num_classes=classes, dim=dim,
                       patch_size=size)
    method = cls(cls.Config(), spec)
    method.build()
    method.nets["student"] = _Conv(dim, classes)
    torch.manual_seed(0)
    batch = Batch(labeled_image=torch.randn(n_l, 1, *size), labeled_label=torch.randint(0, classes, (n_l, *size)),
                  unlabeled_image=torch.randn(n_u, 1, *size))
    return method, batch


def _ctx(record: list | None = None) -> StepContext:
    def backward(loss):
        if record is not None:
            record.append(loss.detach())
        loss.backward()

    return cpu_context(weight=1.0, backward=backward)


def test_targets_follow_the_batch_counts():
    assert discriminator_targets(2, 3).tolist() == [1, 1, 0, 0, 0]
    assert discriminator_targets(3, 1).tolist() == [1, 1, 1, 0]


def test_networks_optimizers_and_discriminator_kind():
    method, _ = _setup()
    disc = method.nets["discriminator"]
    disc_params = {id(p) for p in disc.parameters()}
    trained = list(method.trainable_parameters())
    assert trained and not any(id(p) in disc_params for p in trained)  # the engine's SGD: segmenter only
    opt = method.extra_optimizers()["discriminator"]
    assert isinstance(opt, torch.optim.Adam) and opt is method.extra_optimizers()["discriminator"]
    assert {id(p) for g in opt.param_groups for p in g["params"]} == disc_params
    assert opt.param_groups[0]["lr"] == 1e-4 and tuple(opt.param_groups[0]["betas"]) == (0.9, 0.99)
    assert disc.dim == 2
    method3, _ = _setup(dim=3, n_l=1, n_u=2)
    assert method3.nets["discriminator"].dim == 3


@pytest.mark.parametrize("n_l, n_u", [(1, 3), (3, 1), (2, 2)])
def test_adversarial_term_pushes_unlabeled_predictions_towards_labeled(n_l, n_u):
    method, batch = _setup(n_l=n_l, n_u=n_u)
    method.train()
    disc = method.nets["discriminator"]
    assert not disc.training  # eval (no dropout) during the segmenter step
    out = method.step(batch, _ctx())
    probs_u = torch.softmax(method.nets["student"](batch.unlabeled_image), 1)
    expected = F.cross_entropy(disc(probs_u, batch.unlabeled_image), torch.ones(n_u, dtype=torch.long))
    assert out.logs["loss_adv"].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("n_l, n_u", [(1, 3), (2, 1)])
def test_discriminator_step_uses_labeled_vs_unlabeled_targets(n_l, n_u):
    method, batch = _setup(n_l=n_l, n_u=n_u)
    method.train()
    disc, student = method.nets["discriminator"], method.nets["student"]
    method.extra_optimizers()
    out = method.step(batch, _ctx())
    out.loss.backward()  # leaves gradients on D too; the discriminator step must drop them
    d_before = copy.deepcopy(disc)
    s_before = [p.detach().clone() for p in student.parameters()]
    recorded: list[torch.Tensor] = []
    torch.manual_seed(123)
    method.after_step(_ctx(recorded))
    # Same dropout draws: the discriminator in train mode on the whole batch, segmenter in eval.
    torch.manual_seed(123)
    x = batch.images()
    d_before.train()
    with torch.no_grad():
        probs = torch.softmax(student(x), 1)
    logits = d_before(probs, x)
    targets = torch.tensor([1] * n_l + [0] * n_u)
    expected = F.cross_entropy(logits, targets)
    assert len(recorded) == 1 and recorded[0].item() == pytest.approx(expected.item(), rel=1e-5)
    # Adam moved D with the gradient of L_D alone; the segmenter was not touched.
    d_opt = torch.optim.Adam(d_before.parameters(), lr=1e-4, betas=(0.9, 0.99))
    d_opt.zero_grad()
    expected.backward()
    d_opt.step()
    for a, b in zip(disc.parameters(), d_before.parameters()):
        torch.testing.assert_close(a, b)
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), s_before))
    assert student.training and not disc.training  # modes restored for the next segmenter step


def test_after_step_without_step_is_an_error():
    method, _ = _setup()
    with pytest.raises(RuntimeError, match="without a preceding step"):
        method.after_step(_ctx())
