"""CTCT: the Dice-only cross-teaching term and the CNN + Swin-UNet pair."""

from __future__ import annotations


import pytest
import torch

from sslseg.data import Batch
from sslseg.losses.segmentation import dice_loss, supervised_loss
from sslseg.methods import NetworkSpec, StepContext, get_method
from sslseg.methods.ctct import cross_teaching_loss

from tests.methods._context import cpu_context

TINY_SWIN = {"embed_dim": 12, "num_heads": (1, 1, 1, 1)}


def _ctx(weight: float = 0.1) -> StepContext:
    return cpu_context(weight=weight)


def _method(**options):
    cls = get_method("ctct")
    spec = NetworkSpec(model="unet", in_channels=1, num_classes=3, dim=2, patch_size=(32, 32), seed=0,
                       model_options={"channels": (4, 8, 16, 32, 64)})
    options.setdefault("transformer_options", dict(TINY_SWIN))
    m = cls(cls.Config(**options), spec)
    m.build()
    return m


def test_cross_teaching_is_dice_against_the_other_networks_argmax():
    torch.manual_seed(0)
    za = torch.randn(2, 3, 5, 5, requires_grad=True)
    zb = torch.randn(2, 3, 5, 5, requires_grad=True)
    loss = cross_teaching_loss(za, zb)
    expected = dice_loss(torch.softmax(za, 1), zb.argmax(1)) + dice_loss(torch.softmax(zb, 1), za.argmax(1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # Symmetric; each side gets gradients through its own probabilities (the other's argmax is a constant).
    loss.backward()
    assert za.grad.abs().max() > 0 and zb.grad.abs().max() > 0
    assert cross_teaching_loss(zb, za).item() == pytest.approx(loss.item(), rel=1e-6)


def test_builds_cnn_and_swin_for_the_patch_without_leaking_cnn_options():
    m = _method()
    swin = m.nets["transformer"]
    assert type(swin).__name__ == "SwinUNet" and swin.input_size == (32, 32)
    assert m.eval_model() is m.nets["cnn"]
    # Both networks are trained by the engine's optimizer.
    n_params = sum(p.numel() for p in m.trainable_parameters())
    assert n_params == sum(p.numel() for p in m.nets["cnn"].parameters()) + sum(p.numel() for p in swin.parameters())
    # Different derived seeds, deterministic across builds.
    m2 = _method()
    assert all(torch.equal(a, b) for a, b in zip(swin.parameters(), m2.nets["transformer"].parameters()))


def test_step_loss_and_gradients_reach_both_networks():
    m = _method()
    g = torch.Generator().manual_seed(0)
    batch = Batch(labeled_image=torch.rand(2, 1, 32, 32, generator=g),
                  labeled_label=torch.randint(0, 3, (2, 32, 32), generator=g),
                  unlabeled_image=torch.rand(2, 1, 32, 32, generator=g))
    outs = {}
    for name in ("cnn", "transformer"):
        m.nets[name].register_forward_hook(lambda mod, args, out, name=name: outs.__setitem__(name, out))
    out = m.step(batch, _ctx(0.3))
    z1, z2 = outs["cnn"], outs["transformer"]
    sup = supervised_loss(z1[:2], batch.labeled_label) + supervised_loss(z2[:2], batch.labeled_label)
    cross = cross_teaching_loss(z1[2:], z2[2:])
    assert out.logs["loss_sup"].item() == pytest.approx(sup.item(), rel=1e-6)
    assert out.logs["loss_cross"].item() == pytest.approx(cross.item(), rel=1e-6)
    assert out.loss.item() == pytest.approx((sup + 0.3 * cross).item(), rel=1e-6)
    out.loss.backward()
    for name in ("cnn", "transformer"):
        assert any(p.grad is not None and p.grad.abs().max() > 0 for p in m.nets[name].parameters())
