"""BCP: the copy-paste mask, the mixed inputs, region losses and their weights, the two stages."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sslseg.data import Batch
from sslseg.losses.segmentation import dice_loss
from sslseg.methods import StepContext, get_method
from sslseg.methods.bcp import copy_paste_mask, region_loss

from tests.methods._context import cpu_context, tiny_method


def _ctx(step: int, iterations: int = 8) -> StepContext:
    return cpu_context(step=step, iterations=iterations)


def _method(dim: int = 2, **options):
    return tiny_method("bcp", dim, **options)


def _batch(dim: int = 2, n_l: int = 4, n_u: int = 4) -> Batch:
    g = torch.Generator().manual_seed(0)
    shape = (32, 32) if dim == 2 else (16, 16, 16)
    return Batch(labeled_image=torch.rand(n_l, 1, *shape, generator=g),
                 labeled_label=torch.randint(0, 3, (n_l, *shape), generator=g),
                 unlabeled_image=torch.rand(n_u, 1, *shape, generator=g) + 10.0)  # recognisable


@pytest.mark.parametrize("size", [(30, 24), (12, 15, 18)])
def test_copy_paste_mask_is_one_outside_a_two_thirds_box(size):
    m = copy_paste_mask(size)
    assert m.shape == size and m.dtype == torch.float32
    zeros = (m == 0).nonzero()
    assert (m == 0).sum().item() == math.prod(int(s * 2 / 3) for s in size)
    assert (zeros.max(0).values - zeros.min(0).values + 1).tolist() == [int(s * 2 / 3) for s in size]
    assert set(m.unique().tolist()) == {0.0, 1.0}


def test_region_loss_definition():
    torch.manual_seed(0)
    z = torch.randn(2, 3, 4, 4)
    y = torch.randint(0, 3, (2, 4, 4))
    region = torch.zeros(4, 4, dtype=torch.bool)
    region[1:3, :] = True
    ce = F.cross_entropy(z, y, reduction="none")
    ce_region = (ce * region).sum() / (region.sum() * 2)
    dice_region = dice_loss(torch.softmax(z, 1)[:, :, 1:3], y[:, 1:3])
    assert region_loss(z, y, region).item() == pytest.approx(0.5 * (ce_region + dice_region).item(), rel=1e-6)
    # Logits and labels outside the region are irrelevant.
    z2, y2 = z.clone(), y.clone()
    z2[:, :, 0] = 100 * torch.randn(2, 3, 4)
    y2[:, 3] = (y2[:, 3] + 1) % 3
    assert region_loss(z2, y2, region).item() == pytest.approx(region_loss(z, y, region).item(), rel=1e-6)


@pytest.mark.parametrize("dim", [2, 3])
def test_self_training_mixes_both_ways_and_weights_pseudo_pixels(dim):
    m = _method(dim, pretrain_fraction=0.0, u_weight=0.5)
    batch = _batch(dim)
    size = tuple(batch.labeled_image.shape[2:])
    mask = copy_paste_mask(size)
    m._mask = lambda like: mask  # a known mask
    seen = {}
    m.nets["student"].register_forward_hook(lambda mod, args, out: seen.update(student=args[0], z=out))
    m.teachers["teacher"].register_forward_hook(lambda mod, args, out: seen.update(teacher=(args[0], out)))
    out = m.step(batch, _ctx(0))
    x_l, x_u, y = batch.labeled_image, batch.unlabeled_image, batch.labeled_label
    # n = min(B_l, B_u) // 2 = 2 pairs: (x_0, u_0) inward and (x_2, u_2) outward, (x_1, u_1), (x_3, u_3).
    mix_in = x_u[[0, 1]] * mask + x_l[[0, 1]] * (1 - mask)  # labeled box pasted into unlabeled images
    mix_out = x_l[[2, 3]] * mask + x_u[[2, 3]] * (1 - mask)  # unlabeled box pasted into labeled images
    assert torch.equal(seen["student"], torch.cat([mix_in, mix_out]))
    # The teacher labels the raw unlabeled images (a first, u_a, then b, u_b).
    t_in, t_out = seen["teacher"]
    assert torch.equal(t_in, x_u[[0, 1, 2, 3]])
    plab = t_out.argmax(1)
    z_in, z_out = seen["z"].split([2, 2])
    inside = mask.bool()
    loss_sup = region_loss(z_in, y[[0, 1]], ~inside) + region_loss(z_out, y[[2, 3]], inside)
    loss_pseudo = region_loss(z_in, plab[[0, 1]], inside) + region_loss(z_out, plab[[2, 3]], ~inside)
    assert out.logs["loss_sup"].item() == pytest.approx(loss_sup.item(), rel=1e-5)
    assert out.logs["loss_pseudo"].item() == pytest.approx(loss_pseudo.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx((loss_sup + 0.5 * loss_pseudo).item(), rel=1e-5)


def test_u_weight_scales_only_the_pseudo_labelled_pixels():
    outs = {}
    for w in (0.0, 1.0):
        m = _method(pretrain_fraction=0.0, u_weight=w)
        torch.manual_seed(0)
        outs[w] = m.step(_batch(), _ctx(0))
    assert outs[0.0].logs["loss_sup"].item() == pytest.approx(outs[1.0].logs["loss_sup"].item(), rel=1e-6)
    assert outs[0.0].loss.item() == pytest.approx(outs[0.0].logs["loss_sup"].item(), rel=1e-6)
    assert outs[1.0].loss.item() == pytest.approx(
        outs[1.0].logs["loss_sup"].item() + outs[1.0].logs["loss_pseudo"].item(), rel=1e-6)


def test_pretraining_uses_labeled_images_only_then_copies_the_student_into_the_teacher():
    m = _method(pretrain_fraction=0.25)  # 2 of 8 steps
    assert m.pretrain_steps(8) == 2
    batch = _batch()
    batch.unlabeled_image = torch.full_like(batch.unlabeled_image, float("nan"))  # never read while pre-training
    seen = []
    m.nets["student"].register_forward_hook(lambda mod, args, out: seen.append((args[0], out)))
    mask = copy_paste_mask((32, 32))
    m._mask = lambda like: mask
    out = m.step(batch, _ctx(0))
    assert torch.isfinite(out.loss) and out.logs["loss_pseudo"].item() == 0.0
    x, y = batch.labeled_image, batch.labeled_label
    (inp, z), = seen
    assert torch.equal(inp, x[[0, 1]] * mask + x[[2, 3]] * (1 - mask))  # x_b's box pasted into x_a
    # Labels mixed the same way, weight 1 on both regions.
    expected = region_loss(z, y[[0, 1]], mask.bool()) + region_loss(z, y[[2, 3]], ~mask.bool())
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # At the switch the teacher is the student (BCP loads the pre-trained weights into both).
    with torch.no_grad():
        for p in m.nets["student"].parameters():
            p.add_(0.01)
    m.step(_batch(), _ctx(2))
    for t, s in zip(m.teachers["teacher"].parameters(), m.nets["student"].parameters()):
        assert torch.equal(t, s)


def test_ema_decay_is_constant_after_pretraining():
    m = _method(pretrain_fraction=0.25, ema_decay=0.9)
    teacher, student = m.teachers["teacher"], m.nets["student"]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in teacher.parameters()]
    m.after_step(_ctx(3))  # self-training step 3 > 2: decay 0.9, not Mean Teacher's warm-up (0.75)
    for b, t, s in zip(before, teacher.parameters(), student.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * s, atol=1e-6)
    # Without a pre-training stage the warm-up rule applies: step 0 copies the student.
    m0 = _method(pretrain_fraction=0.0)
    with torch.no_grad():
        for p in m0.nets["student"].parameters():
            p.add_(1.0)
    m0.after_step(_ctx(0))
    for t, s in zip(m0.teachers["teacher"].parameters(), m0.nets["student"].parameters()):
        assert torch.equal(t, s)


def test_largest_cc_option_filters_pseudo_labels(monkeypatch):
    import sslseg.methods.bcp as bcp

    calls = []
    real = bcp.largest_component
    monkeypatch.setattr(bcp, "largest_component", lambda lab, c: calls.append(c) or real(lab, c))
    m = _method(pretrain_fraction=0.0, largest_cc=True)
    assert torch.isfinite(m.step(_batch(), _ctx(0)).loss)
    assert calls == [3]


def test_odd_and_tiny_batches():
    m = _method(pretrain_fraction=0.0)
    out = m.step(_batch(n_l=1, n_u=3), _ctx(0))
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="mask_ratio"):
        get_method("bcp").Config(mask_ratio=1.0)
