"""DTC: signed-distance targets, the sdf -> mask transform, the dual-task consistency and its network."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sslseg.data import Batch
from sslseg.losses.segmentation import supervised_loss
from sslseg.methods import NetworkSpec, StepContext, get_method
from sslseg.methods.dtc import dtc_consistency, sdf_targets, sdf_to_mask

from tests.methods._context import cpu_context


def _ctx(weight: float = 0.5) -> StepContext:
    return cpu_context(weight=weight)


def test_sdf_targets_are_negative_inside_zero_on_the_boundary_positive_outside():
    # A 1 x 1 x 9 "volume": class 1 on voxels 2..6, class 2 on voxel 8.
    labels = torch.tensor([0, 0, 1, 1, 1, 1, 1, 0, 2]).view(1, 1, 1, 9)
    sdf = sdf_targets(labels, 3)
    assert sdf.shape == (1, 2, 1, 1, 9) and sdf.dtype == torch.float32
    s1 = sdf[0, 0, 0, 0].tolist()
    # Inside: distances to the background 1, 2, 3, 2, 1 scaled by their max (3); the inner
    # boundary (voxels 2 and 6) is 0. Outside: distances 2, 1, 1, 2 scaled by their max (2).
    assert s1 == pytest.approx([1.0, 0.5, 0.0, -2 / 3, -1.0, -2 / 3, 0.0, 0.5, 1.0])
    s2 = sdf[0, 1, 0, 0].tolist()
    assert s2[8] == 0.0 and s2[0] == pytest.approx(1.0) and all(v > 0 for v in s2[:8])
    # A class absent from the patch has an all-zero target.
    assert sdf_targets(torch.zeros(1, 2, 2, 2, dtype=torch.long), 2).abs().sum() == 0


def test_sdf_to_mask_and_consistency_on_known_tensors():
    k = 1500.0
    sdf = torch.tensor([-0.01, 0.0, 0.01])
    assert sdf_to_mask(sdf, k).tolist() == pytest.approx([1 / (1 + math.exp(-15)), 0.5, 1 / (1 + math.exp(15))])
    # Two classes: p_fg = [0.9, 0.5, 0.2]; masks from the sdf as above.
    probs = torch.tensor([[0.1, 0.5, 0.8], [0.9, 0.5, 0.2]]).view(1, 2, 1, 1, 3)
    loss = dtc_consistency(probs, sdf.view(1, 1, 1, 1, 3), k)
    masks = [1 / (1 + math.exp(-15)), 0.5, 1 / (1 + math.exp(15))]
    expected = sum((m - p) ** 2 for m, p in zip(masks, [0.9, 0.5, 0.2])) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="one per foreground class"):
        dtc_consistency(torch.rand(1, 3, 1, 1, 3), sdf.view(1, 1, 1, 1, 3), k)


class _DualHead(nn.Module):
    output_keys = ("logits", "sdf")

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.seg = nn.Conv3d(1, 2, 1)
        self.sdf = nn.Conv3d(1, 1, 1)

    def forward_all(self, x):
        return {"logits": self.seg(x), "sdf": torch.tanh(self.sdf(x))}


def test_step_combines_segmentation_sdf_regression_and_consistency():
    cls = get_method("dtc")
    spec = NetworkSpec(model="vnet_sdf", in_channels=1, num_classes=2, dim=3, patch_size=(16, 16, 16))
    method = cls(cls.Config(), spec)
    method.build()
    net = method.nets["student"] = _DualHead()
    labels = torch.zeros(2, 4, 4, 4, dtype=torch.long)
    labels[0, 1:3, 1:3, 1:3] = 1
    labels[1, :, :, 2:] = 1
    torch.manual_seed(1)
    batch = Batch(labeled_image=torch.randn(2, 1, 4, 4, 4), labeled_label=labels,
                  unlabeled_image=torch.randn(3, 1, 4, 4, 4))
    out = method.step(batch, _ctx(0.5))
    x = batch.images()
    with torch.no_grad():
        z, s = net.seg(x), torch.tanh(net.sdf(x))
    sup = supervised_loss(z[:2], labels)
    reg = F.mse_loss(s[:2], sdf_targets(labels, 2))
    cons = ((torch.sigmoid(-1500 * s) - z.softmax(1)[:, 1:]) ** 2).mean()  # whole batch
    assert out.logs["loss_sup"].item() == pytest.approx(sup.item(), rel=1e-5)
    assert out.logs["loss_sdf"].item() == pytest.approx(reg.item(), rel=1e-5)
    assert out.logs["loss_cons"].item() == pytest.approx(cons.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(sup.item() + 0.3 * reg.item() + 0.5 * cons.item(), rel=1e-5)


def test_network_choice():
    cls = get_method("dtc")
    assert cls.dims == (3,)
    # Without a named network the engine builds DTC's V-Net with an sdf head.
    assert cls.default_model == {3: "vnet_sdf"}
    spec = NetworkSpec(model=cls.default_model[3], in_channels=1, num_classes=2, dim=3, patch_size=(16, 16, 16))
    method = cls(cls.Config(), spec)
    method.build()
    assert "sdf" in method.nets["student"].output_keys
    # A named network without an sdf head is refused with a message that says why.
    spec = NetworkSpec(model="unet_3d", in_channels=1, num_classes=2, dim=3, patch_size=(16, 16, 16))
    with pytest.raises(ValueError, match="signed-distance head"):
        cls(cls.Config(), spec).build()
    spec = NetworkSpec(model="unet", in_channels=1, num_classes=2, dim=2, patch_size=(16, 16))
    with pytest.raises(ValueError, match="3D"):
        cls(cls.Config(), spec)
