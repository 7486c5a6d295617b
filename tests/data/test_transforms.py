"""Augmentations: label integrity, alignment, seeding, shapes, devices."""

from __future__ import annotations

import pytest
import torch

from sslseg.data import (
    PHOTOMETRIC_OPS,
    Augment2D,
    Augment3D,
    CTAugment,
    RandAugment,
    StrongAugment,
    cutout,
    random_crop,
    resize,
    rotate2d,
)

from ..devices import devices


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pair2d(device, h=40, w=52):
    g = _gen(123)
    label = torch.zeros(h, w, dtype=torch.int64)
    label[5:20, 8:30] = 1
    label[22:35, 10:25] = 3
    label[10:14, 35:45] = 2
    image = label.float()[None] * 0.3 + 0.05 * torch.randn(1, h, w, generator=g)
    return image.to(device), label.to(device)


@pytest.mark.parametrize("device", devices())
def test_augment2d_label_integrity_and_shape(device):
    image, label = _pair2d(device)
    aug = Augment2D((32, 48))
    for seed in range(12):
        img, lab, sp = aug(image, label, generator=_gen(seed), spacing=(1.5, 1.5))
        assert img.shape == (1, 32, 48) and lab.shape == (32, 48) and lab.dtype == torch.int64
        assert img.device.type == device and lab.device.type == device
        assert set(lab.unique().tolist()) <= {0, 1, 2, 3}
        assert len(sp) == 2 and all(s > 0 for s in sp)


def test_augment2d_is_seeded_and_geometry_is_shared():
    image, label = _pair2d("cpu")
    aug = Augment2D(40, image_mode="nearest")
    a = aug(image, label, generator=_gen(7))
    b = aug(image, label, generator=_gen(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # same seed, same code: exact
    # With nearest resampling an image made from the label must stay exactly aligned with it.
    img_from_label = label.float()[None]
    for seed in range(8):
        img, lab, _ = aug(img_from_label, label, generator=_gen(seed))
        assert torch.equal(img[0].round().long(), lab)


def test_unlabeled_sample_passes_without_label():
    image, _ = _pair2d("cpu")
    img, lab, _ = Augment2D(32)(image, None, generator=_gen(0))
    assert lab is None and img.shape == (1, 32, 32)


def test_rotation_on_non_square_keeps_labels_and_shape():
    image, label = _pair2d("cpu", 30, 60)
    img, lab = rotate2d(image, label, 17.0)
    assert img.shape == image.shape and set(lab.unique().tolist()) <= {0, 1, 2, 3}
    img, lab = rotate2d(image, label, 0.0)
    assert torch.equal(lab, label)


def test_resize_labels_nearest():
    _, label = _pair2d("cpu")
    _, lab = resize(label.float()[None], label, (80, 104))
    assert set(lab.unique().tolist()) == set(label.unique().tolist())


@pytest.mark.parametrize("device", devices())
def test_augment3d_crop_flip_integrity(device):
    label = torch.zeros(20, 30, 26, dtype=torch.int64)
    label[8:12, 10:14, 5:9] = 1
    image = (label.float() + 0.1)[None].to(device)
    label = label.to(device)
    aug = Augment3D((16, 16, 16), foreground_prob=1.0)
    for seed in range(8):
        img, lab, sp = aug(image, label, generator=_gen(seed), spacing=(3.0, 1.0, 1.0))
        assert img.shape == (1, 16, 16, 16) and lab.shape == (16, 16, 16)
        assert (lab == 1).any()  # foreground-aware crop always sees the object
        assert torch.equal((img[0] - 0.1).round().long(), lab)  # same geometry on both
        assert sp[0] == 3.0  # rotations stay in-plane


def test_random_crop_pads_small_volumes_and_uniform_for_unlabeled():
    image = torch.ones(1, 5, 6, 7)
    img, lab = random_crop(image, None, (8, 8, 8), _gen(0), foreground_prob=1.0)
    assert img.shape == (1, 8, 8, 8) and lab is None
    assert img.sum() == 5 * 6 * 7  # zero padding


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("policy", [StrongAugment(), RandAugment(num_ops=3)])
def test_strong_views_change_image_only(device, policy):
    image, _ = _pair2d(device)
    out = policy(image, generator=_gen(3))
    assert out.shape == image.shape and out.device == image.device and torch.isfinite(out).all()
    assert not torch.equal(out, image)
    assert torch.equal(policy(image, generator=_gen(3)), out)  # same seed, same code: exact
    vol = torch.randn(1, 12, 14, 16, generator=_gen(1)).to(device)
    assert policy(vol, generator=_gen(4)).shape == vol.shape


@pytest.mark.parametrize("name", sorted(PHOTOMETRIC_OPS))
def test_every_photometric_op_is_finite(name):
    image, _ = _pair2d("cpu")
    for v in (0.0, 0.5, 1.0):
        out = PHOTOMETRIC_OPS[name].fn(image, v, _gen(0))
        assert out.shape == image.shape and torch.isfinite(out).all()


def test_cutout_touches_image_only():
    image = torch.ones(1, 20, 20)
    out = cutout(image, 0.5, _gen(0))
    assert (out == 0).sum() == 25 and image.min() == 1  # input untouched


def test_ctaugment_policies_rates_and_label_integrity():
    cta = CTAugment()
    image, label = _pair2d("cpu")
    g = _gen(0)
    for _ in range(10):
        weak = cta.policy(g, weak=True)
        strong = cta.policy(g)
        img, lab = CTAugment.apply(image, label, weak, g)
        assert set(lab.unique().tolist()) <= {0, 1, 2, 3} and img.shape == image.shape
        img2, lab2 = CTAugment.apply(img, lab, strong, g)
        assert torch.equal(lab2, lab)  # photometric ops leave the label alone
        cta.update_rates(strong, proximity=0.0)
    state = cta.state_dict()
    other = CTAugment()
    other.load_state_dict(state)
    assert all((other.rates[k] == cta.rates[k]).all() for k in cta.rates)
    assert any((cta.rates[k] < 1).any() for k in cta.rates)


def test_transform_errors():
    with pytest.raises(ValueError, match="patch_size must be 2 positive ints, got \\(32, 0\\)"):
        Augment2D((32, 0))
    with pytest.raises(ValueError, match="unknown image_mode 'cubic'"):
        Augment2D(32, image_mode="cubic")
    with pytest.raises(ValueError, match="label shape \\(4, 4\\) must equal the image's spatial shape \\(5, 5\\)"):
        Augment2D(8)(torch.zeros(1, 5, 5), torch.zeros(4, 4, dtype=torch.long), generator=_gen())
    with pytest.raises(ValueError, match="unknown augmentation op 'brightnes'; did you mean 'brightness'"):
        RandAugment(ops=["brightnes"])


# ------------------------------------------------------------------ SSL4MIS-exact 2D resampling
def test_zoom_order0_matches_scipy():
    import numpy as np
    from scipy import ndimage

    from sslseg.data.transforms import zoom_order0

    g = torch.Generator().manual_seed(0)
    for (h, w), (oh, ow) in [((80, 72), (64, 64)), ((7, 13), (13, 5)), ((256, 216), (224, 224))]:
        img = torch.rand(1, h, w, generator=g)
        lab = torch.randint(0, 4, (h, w), generator=g)
        out, lab_out = zoom_order0(img, lab, (oh, ow))
        ref = ndimage.zoom(img[0].numpy(), (oh / h, ow / w), order=0)
        ref_lab = ndimage.zoom(lab.numpy(), (oh / h, ow / w), order=0)
        assert ref.shape == (oh, ow)
        np.testing.assert_array_equal(out[0].numpy(), ref)  # copies of input values: exact
        np.testing.assert_array_equal(lab_out.numpy(), ref_lab)


def test_augment2d_ssl4mis_nearest_integer_angles(monkeypatch):
    import sslseg.data.transforms as T

    angles = []
    real = T.rotate2d
    monkeypatch.setattr(T, "rotate2d", lambda i, l, a, **kw: (angles.append((a, kw)), real(i, l, a, **kw))[1])
    aug = T.Augment2D.ssl4mis((24, 24))
    assert aug.image_mode == "nearest" and aug.exact_ssl4mis
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 50, (1, 30, 30), generator=g).float()
    lab = torch.randint(0, 3, (30, 30), generator=g)
    for _ in range(60):
        out, lab_out, _ = aug(img, lab, generator=g)
        assert out.shape == (1, 24, 24) and lab_out.shape == (24, 24)
        assert set(out.unique().tolist()) <= set(img.unique().tolist()) | {0.0}  # nearest: no blended values
    assert angles and all(a == int(a) and -20 <= a < 20 for a, _ in angles)
    assert all(kw["image_mode"] == "nearest" for _, kw in angles)
    # The default pipeline keeps real angles and bilinear images.
    angles.clear()
    for _ in range(20):
        T.Augment2D((24, 24))(img, lab, generator=g)
    assert any(a != int(a) for a, _ in angles)


def test_augment2d_exact_ssl4mis_needs_nearest():
    from sslseg.data.transforms import Augment2D

    with pytest.raises(ValueError, match="exact_ssl4mis=True.*image_mode='nearest'"):
        Augment2D((16, 16), exact_ssl4mis=True)
