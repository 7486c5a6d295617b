"""R-Drop: two passes of one network, a symmetric KL over classes, and the two-network option."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from sslseg.data import Batch
from sslseg.losses.segmentation import supervised_loss
from sslseg.methods import NetworkSpec, StepContext, get_method

from tests.methods._context import cpu_context


def _ctx(weight: float = 4.0) -> StepContext:
    return cpu_context(weight=weight)


class _TwoMasks(nn.Module):
    """A conv whose output is scaled by a fixed "dropout mask" per position in the batch.

    Called on ``[x; x]`` it returns ``conv(x)`` for the first copy and ``conv(x) * m`` for the
    second: two different "dropout" passes, known in advance. Records its calls.
    """

    def __init__(self, classes: int, n: int):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, classes, 1)
        self.n = n
        self.mask = torch.rand(n, classes, 1, 1) * 2
        self.calls: list[int] = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        z = self.conv(x)
        if x.shape[0] == 2 * self.n:
            return torch.cat([z[: self.n], z[self.n:] * self.mask])
        return z

    def passes(self, x):
        z = self.conv(x)
        return z, z * self.mask


def _explicit_symmetric_kl(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """0.5 [KL(p2 || p1) + KL(p1 || p2)], KL over the class axis, mean over samples and voxels."""
    p1, p2 = z1.softmax(1), z2.softmax(1)
    kl21 = (p2 * (p2.log() - p1.log())).sum(1)
    kl12 = (p1 * (p1.log() - p2.log())).sum(1)
    return 0.5 * (kl21 + kl12).mean()


def _batch(n_l: int = 2, n_u: int = 3, classes: int = 4) -> Batch:
    torch.manual_seed(1)
    return Batch(labeled_image=torch.randn(n_l, 1, 4, 5), labeled_label=torch.randint(0, classes, (n_l, 4, 5)),
                 unlabeled_image=torch.randn(n_u, 1, 4, 5))


def _method(**options):
    cls = get_method("rdrop")
    spec = NetworkSpec(model="unet", in_channels=1, num_classes=4, dim=2, patch_size=(16, 16))
    method = cls(cls.Config(**options), spec)
    method.build()
    return method


@pytest.mark.parametrize("kl_labeled", [True, False])
def test_one_network_two_passes_kl_over_classes(kl_labeled):
    method = _method(kl_labeled=kl_labeled)
    batch = _batch()
    net = method.nets["student"] = _TwoMasks(4, 5)
    out = method.step(batch, _ctx())
    assert net.calls == [10]  # one call on the stacked batch
    z1, z2 = net.passes(batch.images())
    z1, z2 = z1.detach(), z2.detach()
    start = 0 if kl_labeled else 2
    kl = _explicit_symmetric_kl(z1[start:], z2[start:])
    sup = supervised_loss(z1[:2], batch.labeled_label) + supervised_loss(z2[:2], batch.labeled_label)
    assert out.logs["loss_kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert out.logs["loss_sup"].item() == pytest.approx(sup.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(sup.item() + 4.0 * kl.item(), rel=1e-5)
    # Over classes, not over the image width (SSL4MIS's softmax axis).
    width_kl = 0.5 * sum(
        (b.softmax(-1) * (b.log_softmax(-1) - a.log_softmax(-1))).mean() for a, b in ((z1, z2), (z2, z1))
    )
    assert out.logs["loss_kl"].item() != pytest.approx(width_kl.item(), rel=1e-3)


def test_real_network_passes_differ_by_dropout_only():
    method = _method()
    net = method.nets["student"]
    net.train()
    x = torch.randn(2, 1, 16, 16)
    z1, z2 = net(torch.cat([x, x])).split(2)
    assert not torch.allclose(z1, z2)  # different dropout masks
    net.eval()
    z1, z2 = net(torch.cat([x, x])).split(2)
    torch.testing.assert_close(z1, z2)


def test_two_networks_option():
    method = _method(two_networks=True)
    assert set(method.nets) == {"model1", "model2"} and method.eval_model() is method.nets["model1"]
    batch = _batch()
    nets = [_TwoMasks(4, 5), _TwoMasks(4, 5)]
    with torch.no_grad():
        nets[1].conv.weight.mul_(-1.0)
    method.nets["model1"], method.nets["model2"] = nets
    out = method.step(batch, _ctx(1.0))
    assert nets[0].calls == [5] and nets[1].calls == [5]
    x = batch.images()
    z1, z2 = nets[0].conv(x).detach(), nets[1].conv(x).detach()
    assert out.logs["loss_kl"].item() == pytest.approx(_explicit_symmetric_kl(z1, z2).item(), rel=1e-5)


def _ssl4mis_style_kl(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """SSL4MIS's compute_kl_loss reduction (plain mean over every element, classes included), with
    the softmax over the class axis: 0.5 [mean(kl_div(log p1, p2)) + mean(kl_div(log p2, p1))]."""
    a = torch.nn.functional.kl_div(z1.log_softmax(1), z2.softmax(1), reduction="none").mean()
    b = torch.nn.functional.kl_div(z2.log_softmax(1), z1.softmax(1), reduction="none").mean()
    return 0.5 * (a + b)


def test_kl_reduction_ssl4mis_is_ssl4mis_scale():
    method = _method(kl_reduction="ssl4mis")
    batch = _batch()
    net = method.nets["student"] = _TwoMasks(4, 5)
    out = method.step(batch, _ctx())
    z1, z2 = (z.detach() for z in net.passes(batch.images()))
    assert out.logs["loss_kl"].item() == pytest.approx(_ssl4mis_style_kl(z1, z2).item(), rel=1e-5)
    # The default is C (= 4) times that.
    assert _explicit_symmetric_kl(z1, z2).item() == pytest.approx(4 * _ssl4mis_style_kl(z1, z2).item(), rel=1e-5)


def test_kl_reduction_is_checked():
    with pytest.raises(ValueError, match="kl_reduction must be one of"):
        get_method("rdrop").Config(kl_reduction="mean")
