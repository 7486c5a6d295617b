"""Rotation consistency ("Deep Co-Training" in SSL4MIS): the loss and the rotated second pass."""

from __future__ import annotations


import pytest
import torch

from sslseg.data import Batch
from sslseg.methods import NetworkSpec, StepContext, get_method
from sslseg.methods.rotation_consistency import rotation_consistency_loss

from tests.methods._context import cpu_context


def _ctx() -> StepContext:
    return cpu_context()


def _method(**options):
    cls = get_method("rotation_consistency")
    spec = NetworkSpec(model="unet", in_channels=1, num_classes=3, dim=2, patch_size=(32, 32), seed=0,
                       model_options={"channels": (4, 8, 16, 32, 64)})
    m = cls(cls.Config(**options), spec)
    m.build()
    return m


def _batch() -> Batch:
    g = torch.Generator().manual_seed(0)
    return Batch(labeled_image=torch.rand(2, 1, 32, 32, generator=g),
                 labeled_label=torch.randint(0, 3, (2, 32, 32), generator=g),
                 unlabeled_image=torch.rand(2, 1, 32, 32, generator=g))


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_loss_value_and_symmetric_gradient(k):
    torch.manual_seed(k)
    p = torch.softmax(torch.randn(2, 3, 4, 6), 1).requires_grad_(True)
    pr = torch.softmax(torch.randn(2, 3, *((6, 4) if k % 2 else (4, 6))), 1).requires_grad_(True)
    loss = rotation_consistency_loss(p, pr, k)
    full = (pr - torch.rot90(p, k, dims=(2, 3))).pow(2).mean()
    assert loss.item() == pytest.approx(full.item(), rel=1e-6)
    loss.backward()
    gp, gpr = torch.autograd.grad(0.5 * full, [p, pr])
    assert torch.allclose(p.grad, gp, atol=1e-7) and torch.allclose(pr.grad, gpr, atol=1e-7)
    # An equivariant prediction costs nothing.
    assert rotation_consistency_loss(p.detach(), torch.rot90(p.detach(), k, dims=(2, 3)), k).item() == 0.0


@pytest.mark.parametrize("exclude_identity", [False, True])
def test_second_pass_sees_the_rotated_unlabeled_images(exclude_identity):
    m = _method(exclude_identity=exclude_identity)
    batch = _batch()
    inputs = []
    m.nets["student"].register_forward_hook(lambda mod, args, out: inputs.append(args[0]))
    ks = set()
    torch.manual_seed(0)
    for _ in range(12):
        inputs.clear()
        out = m.step(batch, _ctx())
        full, rotated = inputs
        assert torch.equal(full, batch.images())
        matches = [k for k in range(4) if torch.equal(rotated, torch.rot90(batch.unlabeled_image, k, dims=(2, 3)))]
        assert len(matches) == 1
        ks.add(matches[0])
        assert out.loss.item() == pytest.approx(out.logs["loss_sup"].item() + 0.1 * out.logs["loss_cons"].item(),
                                                rel=1e-6)
    assert ks == ({1, 2, 3} if exclude_identity else {0, 1, 2, 3})
