"""UniMatch: the feature-perturbation stream, the two CutMixed strong streams and the loss weights."""

from __future__ import annotations


import pytest
import torch

import sslseg.methods.unimatch as um
from sslseg.data import Batch
from sslseg.methods import StepContext, get_method
from sslseg.methods.unimatch import feature_perturbation, mix_boxes
from sslseg.models import create_model

from tests.methods._context import cpu_context, tiny_method


def _ctx() -> StepContext:
    return cpu_context()


def _method(dim: int = 2, **options):
    return tiny_method("unimatch", dim, **options)


def _batch(dim: int = 2, n_l: int = 2, n_u: int = 3) -> Batch:
    g = torch.Generator().manual_seed(0)
    shape = (32, 32) if dim == 2 else (16, 16, 16)
    return Batch(labeled_image=torch.rand(n_l, 1, *shape, generator=g),
                 labeled_label=torch.randint(0, 3, (n_l, *shape), generator=g),
                 unlabeled_image=torch.rand(n_u, 1, *shape, generator=g),
                 unlabeled_strong=torch.rand(n_u, 1, *shape, generator=g),
                 unlabeled_strong2=torch.rand(n_u, 1, *shape, generator=g))


def test_class_asks_the_loader_for_two_strong_views_without_cutout():
    cls = get_method("unimatch")
    assert cls.strong_views == 2
    assert callable(cls.strong_aug) and cls.strong_aug.cutout_prob == 0.0


@pytest.mark.parametrize("model,shape,dim", [("unet", (2, 1, 32, 32), 2), ("unet_3d", (2, 1, 16, 16, 16), 3)])
def test_feature_perturbation_doubles_the_decoder_batch(model, shape, dim):
    opts = {"channels": (4, 8, 16, 32, 64)} if dim == 2 else {"channels": (4, 8, 16)}
    net = create_model(model, 1, 3, seed=0, **opts).eval()
    x = torch.rand(shape)
    with torch.no_grad():
        plain = net(x)
        torch.manual_seed(0)
        with feature_perturbation(net, 0.5, dim):
            out = net(x)
        again = net(x)  # the hook is removed afterwards
    assert out.shape[0] == 2 * x.shape[0]
    clean, fp = out.chunk(2)
    assert torch.allclose(clean, plain, atol=1e-5)  # first half: the unperturbed prediction
    assert not torch.allclose(fp, plain, atol=1e-3)  # second half: decoded from dropped-out features
    assert torch.equal(again, plain)
    # p = 0: the perturbed half is the clean prediction.
    with torch.no_grad(), feature_perturbation(net, 0.0, dim):
        c0, f0 = net(x).chunk(2)
    assert torch.allclose(c0, f0, atol=1e-5)


def test_feature_perturbation_needs_a_callable_encoder():
    net = create_model("vnet", 1, 2, seed=0)  # its encoder is a ModuleList of stages
    with pytest.raises(ValueError, match="feature_perturbation=False"):
        with feature_perturbation(net, 0.5, 3):
            pass


def test_mix_boxes_pastes_partners_inside_boxes():
    a, b = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
    boxes = torch.zeros(2, 4, 4, dtype=torch.bool)
    boxes[0, :2, :2] = True
    out = mix_boxes(a, b, boxes)
    assert out[0, 0, :2, :2].eq(1).all() and out[0].sum() == 4 and out[1].sum() == 0


@pytest.mark.parametrize("dim", [2, 3])
def test_streams_inputs_pseudo_labels_and_weights(dim, monkeypatch):
    m = _method(dim, threshold=0.0)
    batch = _batch(dim)
    n_u = batch.unlabeled_bs
    spatial = tuple(batch.unlabeled_image.shape[2:])
    boxes = []
    for k in range(2):  # known CutMix boxes: sample 0 gets a box, the others none
        b = torch.zeros(n_u, *spatial, dtype=torch.bool)
        b[0, : spatial[0] // 2] = True
        boxes.append(b if k == 0 else b.roll(1, 0))  # view 2: the box is on sample 1
    it = iter(boxes)
    m._boxes = lambda n, size, device: next(it)
    inputs, losses = [], []
    m.nets["student"].register_forward_hook(lambda mod, args, out: inputs.append((args[0], out)))
    real = um.pseudo_label_loss

    def spy(logits, labels, mask, kind):
        value = real(logits, labels, mask, kind)
        losses.append((logits, labels, mask, value))
        return value

    monkeypatch.setattr(um, "pseudo_label_loss", spy)
    out = m.step(batch, _ctx())
    (x_weak, z_weak), (x_strong, z_strong) = inputs
    # Pass 1: labeled + weak unlabeled, decoded twice (clean, feature-perturbed).
    assert torch.equal(x_weak, torch.cat([batch.labeled_image, batch.unlabeled_image]))
    assert z_weak.shape[0] == 2 * x_weak.shape[0]
    # Pass 2: the two strong views, CutMixed with the next sample's view of the same kind.
    partner = [1, 2, 0]
    s1 = torch.where(boxes[0].unsqueeze(1), batch.unlabeled_strong[partner], batch.unlabeled_strong)
    s2 = torch.where(boxes[1].unsqueeze(1), batch.unlabeled_strong2[partner], batch.unlabeled_strong2)
    assert torch.equal(x_strong, torch.cat([s1, s2]))
    # Pseudo-labels: the weak clean prediction; inside a box, the partner's.
    z_w = z_weak[: x_weak.shape[0]][batch.labeled_bs:]
    plab = z_w.argmax(1)
    (l1, p1, m1, v1), (l2, p2, m2, v2), (lfp, pfp, mfp, vfp) = losses
    assert torch.equal(p1, torch.where(boxes[0], plab[partner], plab))
    assert torch.equal(p2, torch.where(boxes[1], plab[partner], plab))
    assert torch.equal(pfp, plab) and mfp.all()  # threshold 0: every voxel confident
    assert torch.equal(lfp, z_weak[x_weak.shape[0]:][batch.labeled_bs:])  # FP stream: perturbed half
    assert torch.equal(torch.cat([l1, l2]), z_strong)
    # L = (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2
    expected = 0.5 * (out.logs["loss_sup"] + 0.25 * v1 + 0.25 * v2 + 0.5 * vfp)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.logs["loss_strong"].item() == pytest.approx(0.5 * (v1 + v2).item(), rel=1e-6)
    assert out.logs["loss_fp"].item() == pytest.approx(vfp.item(), rel=1e-6)


def test_threshold_masks_unconfident_voxels():
    m = _method(threshold=1.0)  # softmax never reaches 1 here: nothing is confident
    out = m.step(_batch(), _ctx())
    assert out.logs["mask_ratio"].item() == 0.0
    assert out.logs["loss_strong"].item() == pytest.approx(0.0, abs=1e-6)
    assert out.logs["loss_fp"].item() == pytest.approx(0.0, abs=1e-6)
    assert out.loss.item() == pytest.approx(0.5 * out.logs["loss_sup"].item(), rel=1e-6)


def test_without_feature_perturbation():
    m = _method(feature_perturbation=False, threshold=0.0)
    out = m.step(_batch(), _ctx())
    assert out.logs["loss_fp"].item() == 0.0 and out.logs["loss_strong"].item() > 0
    assert out.loss.item() == pytest.approx(
        0.5 * (out.logs["loss_sup"].item() + 0.5 * out.logs["loss_strong"].item()), rel=1e-6)


def test_one_unlabeled_sample_takes_a_labeled_partner(monkeypatch):
    # With one unlabeled sample, rolling the batch would mix it with itself: the partner is labeled
    # sample 0, pasted with its ground truth (confident) as the target inside the box.
    m = _method(2, threshold=1.0)  # nothing confident outside the boxes
    batch = _batch(2, n_l=2, n_u=1)
    box = torch.zeros(1, 32, 32, dtype=torch.bool)
    box[0, :16] = True
    m._boxes = lambda n, size, device: box
    inputs, losses = [], []
    m.nets["student"].register_forward_hook(lambda mod, args, out: inputs.append(args[0]))
    real = um.pseudo_label_loss

    def spy(logits, labels, mask, kind):
        losses.append((labels, mask))
        return real(logits, labels, mask, kind)

    monkeypatch.setattr(um, "pseudo_label_loss", spy)
    m.step(batch, _ctx())
    s = torch.where(box.unsqueeze(1), batch.labeled_image[:1], batch.unlabeled_strong)
    s2 = torch.where(box.unsqueeze(1), batch.labeled_image[:1], batch.unlabeled_strong2)
    assert torch.equal(inputs[1], torch.cat([s, s2]))
    assert not torch.equal(s, torch.where(box.unsqueeze(1), batch.unlabeled_strong, batch.unlabeled_strong))
    (p1, m1), (p2, m2), _ = losses
    for p, mk in ((p1, m1), (p2, m2)):
        assert torch.equal(p[box], batch.labeled_label[0][box[0]])
        assert torch.equal(mk, box)  # confident inside the box (ground truth) only


def test_one_unlabeled_sample_and_no_labeled_one_is_refused():
    m = _method(2)
    with pytest.raises(ValueError, match="CutMix needs a partner.*1 unlabeled and 0 labeled"):
        m.step(_batch(2, n_l=0, n_u=1), _ctx())
