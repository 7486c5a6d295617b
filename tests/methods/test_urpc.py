"""URPC: the uncertainty-rectified weighting, the pyramid supervision and the plain evaluated network."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sslseg.data import Batch
from sslseg.losses.segmentation import supervised_loss
from sslseg.methods import NetworkSpec, StepContext, get_method
from sslseg.methods.urpc import urpc_consistency
from sslseg.models import create_model

from tests.methods._context import cpu_context


def _ctx() -> StepContext:
    return cpu_context(weight=0.5)


def _kl(a: list[float], b: list[float]) -> float:
    return sum(x * (math.log(x) - math.log(y)) for x, y in zip(a, b) if x > 0)


def test_consistency_on_known_probabilities():
    # One sample, two classes, two voxels, two scales. Voxel 0: the scales agree; voxel 1: they do not.
    p0 = [[0.5, 0.5], [0.9, 0.1]]  # [voxel][class]
    p1 = [[0.5, 0.5], [0.3, 0.7]]
    logits = [torch.tensor(p).log().T.reshape(1, 2, 2, 1) for p in (p0, p1)]
    mean = [[(a + b) / 2 for a, b in zip(v0, v1)] for v0, v1 in zip(p0, p1)]
    total = 0.0
    for p in (p0, p1):
        v = [_kl(mean[k], p[k]) for k in range(2)]
        w = [math.exp(-x) for x in v]
        d = [sum((m - q) ** 2 for m, q in zip(mean[k], p[k])) / 2 for k in range(2)]  # class mean
        # mean over (B, C, voxels) of d*w over mean over (B, voxels) of w, plus the mean KL.
        total += (sum(dk * wk for dk, wk in zip(d, w)) / 2) / (sum(w) / 2 + 1e-8) + sum(v) / 2
    expected = total / 2
    assert urpc_consistency(logits).item() == pytest.approx(expected, rel=1e-5)


def test_weighting_discounts_disagreeing_voxels():
    # The rectified term is a w-weighted mean: with w < 1 on the disagreeing voxel, that voxel's
    # squared difference counts less than in a plain mean.
    p0 = torch.tensor([[0.6, 0.4], [0.99, 0.01]]).log().T.reshape(1, 2, 2, 1)
    p1 = torch.tensor([[0.4, 0.6], [0.01, 0.99]]).log().T.reshape(1, 2, 2, 1)
    loss = urpc_consistency([p0, p1])
    probs = [p0.softmax(1), p1.softmax(1)]
    mean = (probs[0] + probs[1]) / 2
    v = [(mean * (mean.log() - p.log())).sum(1, keepdim=True) for p in probs]
    plain = sum(((mean - p) ** 2).mean() + vs.mean() for p, vs in zip(probs, v)) / 2
    assert loss.item() < plain.item()


def test_identical_predictions_cost_nothing_and_mean_detach_changes_only_gradients():
    torch.manual_seed(0)
    z = torch.randn(2, 3, 4, 4)
    assert urpc_consistency([z, z.clone(), z.clone()]).item() == pytest.approx(0.0, abs=1e-6)
    zs = [torch.randn(2, 3, 4, 4, requires_grad=True) for _ in range(3)]
    a, b = urpc_consistency(zs), urpc_consistency(zs, detach_mean=True)
    assert a.item() == pytest.approx(b.item())
    ga = torch.autograd.grad(a, zs[0])[0]
    gb = torch.autograd.grad(b, zs[0])[0]
    assert not torch.allclose(ga, gb)
    with pytest.raises(ValueError, match="at least 2"):
        urpc_consistency([z])


class _Pyramid(nn.Module):
    """forward_all with a main and three auxiliary predictions: fixed scalings of one conv."""

    output_keys = ("logits", "aux")

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 3, 1)
        self.scales = (1.0, 0.5, 2.0, -1.0)

    def forward_all(self, x):
        z = self.conv(x)
        return {"logits": z * self.scales[0], "aux": [z * s for s in self.scales[1:]]}


def test_step_supervises_every_scale_and_regularises_unlabeled_only():
    cls = get_method("urpc")
    spec = NetworkSpec(model="unet_urpc", in_channels=1, num_classes=3, dim=2, patch_size=(16, 16))
    method = cls(cls.Config(), spec)
    method.build()
    net = method.nets["student"] = _Pyramid()
    torch.manual_seed(1)
    batch = Batch(labeled_image=torch.randn(2, 1, 4, 4), labeled_label=torch.randint(0, 3, (2, 4, 4)),
                  unlabeled_image=torch.randn(3, 1, 4, 4))
    out = method.step(batch, _ctx())
    z_l = net.conv(batch.labeled_image).detach()
    z_u = net.conv(batch.unlabeled_image).detach()
    sup = sum(supervised_loss(z_l * s, batch.labeled_label) for s in net.scales) / 4
    cons = urpc_consistency([z_u * s for s in net.scales])
    assert out.logs["loss_sup"].item() == pytest.approx(sup.item(), rel=1e-5)
    assert out.logs["loss_cons"].item() == pytest.approx(cons.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(sup.item() + 0.5 * cons.item(), rel=1e-5)


@pytest.mark.parametrize("dim, plain, pyramid", [(2, "unet", "unet_urpc"), (3, "unet_3d", "unet_3d_urpc")])
def test_default_network_is_the_pyramid_variant_evaluated_as_itself(dim, plain, pyramid):
    cls = get_method("urpc")
    assert cls.default_model[dim] == pyramid
    spec = NetworkSpec(model=pyramid, in_channels=1, num_classes=2, dim=dim, patch_size=(16,) * dim, seed=3)
    method = cls(cls.Config(), spec)
    method.build()
    student = method.nets["student"]
    assert type(student) is type(create_model(pyramid, 1, 2))
    # The trained network is the evaluated one: its state dict is what best_val.pt records ...
    assert method.eval_model() is student
    # ... and in eval mode its forward is the main prediction, without the perturbed heads.
    student.eval()
    x = torch.randn(1, 1, *(32,) * dim)  # 3D: InstanceNorm needs more than one voxel at the bottleneck
    with torch.no_grad():
        torch.testing.assert_close(student(x), student.forward_all(x)["logits"])
    # A plain network has no pyramid heads: the error names its pyramid variant.
    plain_spec = NetworkSpec(model=plain, in_channels=1, num_classes=2, dim=dim, patch_size=(16,) * dim)
    with pytest.raises(ValueError, match=f"pyramid heads.*got '{plain}'; its pyramid variant is '{pyramid}'"):
        cls(cls.Config(), plain_spec).build()


def test_networks_with_aux_heads_are_used_as_they_are_and_others_rejected():
    cls = get_method("urpc")
    spec = NetworkSpec(model="unet_urpc", in_channels=1, num_classes=2, dim=2, patch_size=(16, 16))
    method = cls(cls.Config(), spec)
    method.build()
    assert method.eval_model() is method.nets["student"]
    spec = NetworkSpec(model="pnet", in_channels=1, num_classes=2, dim=2, patch_size=(16, 16))
    with pytest.raises(ValueError, match="pyramid heads"):
        cls(cls.Config(), spec).build()
