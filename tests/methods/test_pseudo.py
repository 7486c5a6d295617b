"""Pseudo-label, masked-loss and box helpers shared by the self-training methods."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sslseg.losses.segmentation import dice_loss
from sslseg.methods._pseudo import (
    IGNORE_INDEX,
    cutmix_box,
    largest_component,
    masked_cross_entropy,
    masked_dice_loss,
    pseudo_label_loss,
    pseudo_labels,
    random_box,
)


def test_pseudo_labels_ignore_low_confidence_voxels():
    # (1, 3, 1, 4): confidences 0.96, 0.5, 0.95, 0.9 -> classes 0, 1, 2, 2
    p = torch.tensor([[0.96, 0.5, 0.025, 0.05], [0.02, 0.3, 0.025, 0.05], [0.02, 0.2, 0.95, 0.9]])
    p = p.view(1, 3, 1, 4)
    pl = pseudo_labels(p, 0.95)
    assert pl.labels.tolist() == [[[0, IGNORE_INDEX, 2, IGNORE_INDEX]]]
    assert pl.mask.tolist() == [[[True, False, True, False]]]
    assert torch.allclose(pl.confidence, torch.tensor([[[0.96, 0.5, 0.95, 0.9]]]))
    assert pl.ratio.item() == pytest.approx(0.5)
    # No threshold: plain argmax, nothing ignored (never relabelled as background).
    assert pseudo_labels(p).labels.tolist() == [[[0, 0, 2, 2]]]
    assert pseudo_labels(p, 0.95, fill_ignored=False).labels.tolist() == [[[0, 0, 2, 2]]]
    with pytest.raises(ValueError, match="threshold"):
        pseudo_labels(p, 1.5)


def test_masked_cross_entropy_normalisations():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5)
    target = torch.randint(0, 3, (2, 4, 5))
    keep = torch.rand(2, 4, 5) > 0.4
    ce = F.cross_entropy(logits, target, reduction="none")
    expected_all = (ce * keep).sum() / ce.numel()
    expected_valid = (ce * keep).sum() / keep.sum()
    assert masked_cross_entropy(logits, target, keep).item() == pytest.approx(expected_all.item(), rel=1e-6)
    valid = masked_cross_entropy(logits, target, keep, normalize="valid")
    assert valid.item() == pytest.approx(expected_valid.item(), rel=1e-6)
    # IGNORE_INDEX acts like a masked-out voxel.
    ignored = target.masked_fill(~keep, IGNORE_INDEX)
    assert masked_cross_entropy(logits, ignored).item() == pytest.approx(expected_all.item(), rel=1e-6)
    # Nothing kept: 0 (not NaN) in both modes.
    none = torch.zeros_like(keep)
    assert masked_cross_entropy(logits, target, none).item() == 0.0
    assert masked_cross_entropy(logits, target, none, normalize="valid").item() == 0.0


def test_masked_dice_equals_dice_on_the_kept_voxels():
    torch.manual_seed(1)
    probs = torch.softmax(torch.randn(1, 3, 1, 6), 1)
    target = torch.tensor([[[0, 1, 2, 1, 0, 2]]])
    keep = torch.tensor([[[True, True, False, True, False, True]]])
    idx = keep[0, 0].nonzero().squeeze(1)
    expected = dice_loss(probs[..., idx], target[..., idx])
    assert masked_dice_loss(probs, target, keep).item() == pytest.approx(expected.item(), rel=1e-6)
    # Predictions outside the kept voxels do not matter.
    other = probs.clone()
    other[..., ~keep[0, 0]] = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    assert masked_dice_loss(other, target, keep).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["ce", "dice", "ce_dice"])
def test_pseudo_label_loss_has_no_gradient_on_masked_voxels(kind):
    torch.manual_seed(2)
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    labels = torch.randint(0, 4, (2, 8, 8))
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[:, :4] = True
    loss = pseudo_label_loss(logits, labels, mask, kind)
    loss.backward()
    assert logits.grad[:, :, 4:].abs().max() == 0
    assert logits.grad[:, :, :4].abs().max() > 0
    ce = masked_cross_entropy(logits, labels, mask)
    dice = masked_dice_loss(torch.softmax(logits, 1), labels, mask)
    expected = {"ce": ce, "dice": dice, "ce_dice": 0.5 * (ce + dice)}[kind]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="kind"):
        pseudo_label_loss(logits, labels, mask, "mse")


def test_pseudo_label_loss_is_zero_when_nothing_is_confident():
    logits = torch.randn(1, 2, 4, 4, requires_grad=True)
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    loss = pseudo_label_loss(logits, labels, torch.zeros(1, 4, 4, dtype=torch.bool), "ce_dice")
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert logits.grad.abs().max() == 0


@pytest.mark.parametrize("size,box", [((10, 12), (4, 5)), ((6, 8, 10), (2, 3, 4))])
def test_random_box_has_the_requested_box(size, box):
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        m = random_box(size, box, generator=g)
        assert m.shape == size and m.dtype == torch.bool
        assert m.sum().item() == math.prod(box)
        idx = m.nonzero()
        extent = (idx.max(0).values - idx.min(0).values + 1).tolist()
        assert extent == list(box)
    with pytest.raises(ValueError):
        random_box((4, 4), (5, 1))


@pytest.mark.parametrize("size", [(64, 64), (32, 32, 32)])
def test_cutmix_box_area_and_probability(size):
    g = torch.Generator().manual_seed(0)
    assert not cutmix_box(size, p=0.0, generator=g).any()
    n = math.prod(size)
    for _ in range(30):
        m = cutmix_box(size, p=1.0, generator=g)
        idx = m.nonzero()
        extent = (idx.max(0).values - idx.min(0).values + 1)
        assert m.sum().item() == extent.prod().item()  # one box
        assert 0.005 * n <= m.sum().item() <= 0.45 * n
        e = extent.float()
        assert (e.max() / e.min()).item() <= 4.5  # side ratios in [0.3, 1/0.3], up to int() of short sides
    hits = sum(bool(cutmix_box(size, p=0.5, generator=g).any()) for _ in range(200))
    assert 70 < hits < 130


def test_largest_component_keeps_the_largest_blob_per_class():
    lab = torch.zeros(1, 8, 8, dtype=torch.long)
    lab[0, 0:3, 0:3] = 1  # 9 voxels
    lab[0, 6:8, 6:8] = 1  # 4 voxels: removed
    lab[0, 0, 7] = 2  # one voxel of class 2: the only one, kept
    lab[0, 4, 4] = 1
    lab[0, 3, 3] = 1  # diagonal neighbour of the 3x3 block: part of it (full connectivity)
    out = largest_component(lab, 3)
    expected = torch.zeros_like(lab)
    expected[0, 0:3, 0:3] = 1
    expected[0, 3, 3] = 1
    expected[0, 4, 4] = 1
    expected[0, 0, 7] = 2
    assert torch.equal(out, expected)
