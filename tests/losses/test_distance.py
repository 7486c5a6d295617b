"""sslseg.losses.distance: SDF (SSL4MIS compute_sdf), boundary loss (Kervadec), HD-DT loss (MONAI)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.ndimage import distance_transform_edt as distance

import sslseg.losses as L
from tests.devices import devices


def _blobs(shape, seed, frac=0.3, sigma=1.5):
    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return x > np.quantile(x, 1 - frac)


# ---- transcriptions of the reference code -------------------------------------------------------


def _find_boundaries_inner(mask: np.ndarray) -> np.ndarray:
    """skimage.segmentation.find_boundaries(mask, mode="inner"): connectivity 1, mode "reflect"."""
    label = mask.astype(np.uint8)
    fp = ndimage.generate_binary_structure(label.ndim, 1)
    boundaries = ndimage.grey_dilation(label, footprint=fp, mode="reflect") != ndimage.grey_erosion(label, footprint=fp, mode="reflect")
    return boundaries & (label != 0)


def ssl4mis_compute_sdf(img_gt: np.ndarray, out_shape) -> np.ndarray:
    """SSL4MIS code/utils/util.py compute_sdf (DTC's target)."""
    img_gt = img_gt.astype(np.uint8)
    normalized_sdf = np.zeros(out_shape)
    for b in range(out_shape[0]):
        posmask = img_gt[b].astype(bool)
        if posmask.any():
            negmask = ~posmask
            posdis = distance(posmask)
            negdis = distance(negmask)
            boundary = _find_boundaries_inner(posmask).astype(np.uint8)
            sdf = (negdis - np.min(negdis)) / (np.max(negdis) - np.min(negdis)) - (posdis - np.min(posdis)) / (
                np.max(posdis) - np.min(posdis))
            sdf[boundary == 1] = 0
            normalized_sdf[b] = sdf
    return normalized_sdf


def kervadec_one_hot2dist(seg: np.ndarray, resolution=None) -> np.ndarray:
    """Kervadec et al.'s boundary-loss utils.one_hot2dist for one (K, *spatial) one-hot image."""
    res = np.zeros_like(seg, dtype=np.float64)
    for k in range(len(seg)):
        posmask = seg[k].astype(bool)
        if posmask.any():
            negmask = ~posmask
            res[k] = distance(negmask, sampling=resolution) * negmask - (distance(posmask, sampling=resolution) - 1) * posmask
    return res


def monai_hausdorff_dt_loss(probs: torch.Tensor, onehot: torch.Tensor, alpha=2.0, include_background=False) -> torch.Tensor:
    """monai.losses.HausdorffDTLoss(alpha, include_background)(probs, onehot), reduction mean."""
    try:
        from monai.losses import HausdorffDTLoss
    except ImportError:  # pragma: no cover - MONAI is a bench/test extra; transcription otherwise
        HausdorffDTLoss = None
    if HausdorffDTLoss is not None:
        return HausdorffDTLoss(alpha=alpha, include_background=include_background)(probs, onehot)

    def field(img):
        out = torch.zeros_like(img)
        for b in range(len(img)):
            fg = (img[b] > 0.5).numpy()
            if fg.any() and not fg.all():
                out[b] = torch.from_numpy(np.stack([distance(c) + distance(~c) for c in fg])).float()
        return out

    if not include_background:
        probs, onehot = probs[:, 1:], onehot[:, 1:]
    terms = []
    for i in range(probs.shape[1]):
        p, t = probs[:, [i]], onehot[:, [i]]
        d = field(p.detach()) ** alpha + field(t.detach()) ** alpha
        terms.append(((p - t) ** 2 * d).mean(dim=tuple(range(2, p.dim())), keepdim=True))
    return torch.cat(terms, 1).mean()


# ---- signed distance map ------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 23, 19), (2, 14, 16, 11)], ids=["2d", "3d"])
def test_sdf_matches_ssl4mis(shape):
    masks = np.stack([_blobs(shape[1:], s) for s in range(shape[0])])
    masks[0] = False  # an empty mask stays 0
    ours = L.signed_distance_map(torch.from_numpy(masks), spatial_dims=len(shape) - 1)
    assert ours.dtype == torch.float32 and ours.shape == shape
    np.testing.assert_allclose(ours.numpy(), ssl4mis_compute_sdf(masks, shape), rtol=1e-6, atol=1e-6)
    assert ours.min() >= -1 and ours.max() <= 1


def test_sdf_channel_dim_full_mask_and_raw():
    m = np.zeros((2, 1, 12, 13), dtype=bool)
    m[0, 0, 3:8, 2:9] = True
    m[1] = True  # all foreground: no boundary, -1 (SSL4MIS would give NaN)
    ours = L.signed_distance_map(torch.from_numpy(m), spatial_dims=2)
    np.testing.assert_allclose(ours[0, 0].numpy(), ssl4mis_compute_sdf(m[0], (1, 12, 13))[0], rtol=1e-6, atol=1e-6)
    assert (ours[1] == -1).all()
    raw = L.signed_distance_map(torch.from_numpy(m[0, 0]), (2.0, 0.5), normalize=False)
    expected = distance(~m[0, 0], sampling=(2.0, 0.5)) - distance(m[0, 0], sampling=(2.0, 0.5))
    np.testing.assert_allclose(raw.numpy(), expected, rtol=1e-6)


# ---- boundary loss ------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", [None, (1.5, 0.5, 2.0)])
def test_boundary_distance_map_matches_kervadec(spacing):
    labels = np.zeros((2, 10, 12, 9), dtype=np.int64)
    labels[_blobs((2, 10, 12, 9), 1, frac=0.4)] = 1
    labels[_blobs((2, 10, 12, 9), 2, frac=0.15)] = 2
    labels[1][labels[1] == 2] = 1  # class 2 absent from image 1: zero map
    ours = L.boundary_distance_map(torch.from_numpy(labels), 3, spacing)
    assert ours.shape == (2, 3, 10, 12, 9) and ours.dtype == torch.float32
    for b in range(2):
        onehot = np.stack([labels[b] == c for c in range(3)])
        np.testing.assert_allclose(ours[b].numpy(), kervadec_one_hot2dist(onehot, spacing), rtol=1e-6, atol=1e-5)


def test_boundary_loss_value_and_gradient():
    torch.manual_seed(0)
    labels = torch.from_numpy(_blobs((2, 15, 17), 3).astype(np.int64))
    logits = torch.randn(2, 2, 15, 17, requires_grad=True)
    probs = logits.softmax(1)
    loss = L.boundary_loss(probs, labels)
    dist = L.boundary_distance_map(labels, 2)
    torch.testing.assert_close(loss, (probs[:, 1:] * dist[:, 1:]).mean())
    torch.testing.assert_close(L.boundary_loss(probs, dist), loss)  # precomputed maps
    assert not dist.requires_grad
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    full = torch.zeros(1, 6, 6, dtype=torch.int64)  # class 0 covers everything: zero map
    assert (L.boundary_distance_map(full, 2) == 0).all()


# ---- Hausdorff DT loss --------------------------------------------------------------------------


@pytest.mark.parametrize("include_background", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 16, 13), (2, 3, 9, 10, 8)], ids=["2d", "3d"])
def test_hausdorff_dt_loss_matches_monai(shape, include_background):
    torch.manual_seed(1)
    probs = torch.randn(shape).softmax(1)
    labels = torch.from_numpy(np.stack([_blobs(shape[2:], b, frac=0.4).astype(np.int64) + _blobs(shape[2:], 9 + b, frac=0.2)
                                        for b in range(shape[0])]))
    labels[1][labels[1] == 2] = 0  # an empty class map: zero field
    onehot = F.one_hot(labels, 3).movedim(-1, 1).float()
    expected = monai_hausdorff_dt_loss(probs, onehot, include_background=include_background)
    ours = L.hausdorff_dt_loss(probs, labels, include_background=include_background)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(L.hausdorff_dt_loss(probs, onehot, include_background=include_background), ours)
    per = L.hausdorff_dt_loss(probs, labels, include_background=include_background, reduction="none")
    assert per.shape == (2, 3 if include_background else 2)
    torch.testing.assert_close(per.mean(), ours)


def test_hausdorff_dt_loss_gradient_and_field():
    probs = torch.rand(1, 2, 8, 9).softmax(1).requires_grad_(True)
    labels = torch.zeros(1, 8, 9, dtype=torch.int64)
    labels[0, 2:5, 3:7] = 1
    L.hausdorff_dt_loss(probs, labels, alpha=1.0, spacing=(2.0, 1.0)).backward()
    assert probs.grad is not None and torch.isfinite(probs.grad).all()
    m = labels[0].bool()
    field = L.hausdorff_distance_field(m)
    np.testing.assert_allclose(field.numpy(), distance(m.numpy()) + distance(~m.numpy()), rtol=1e-6)
    assert (L.hausdorff_distance_field(torch.ones(4, 5, dtype=torch.bool)) == 0).all()


def test_errors():
    with pytest.raises(ValueError, match=r"boundary_loss: probs must be \(B, C, H, W\) or \(B, C, D, H, W\), got \[3, 4\]"):
        L.boundary_loss(torch.rand(3, 4), torch.zeros(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"boundary_loss: labels must be \(B, \*spatial\) = \[1, 4, 5\], got \[1, 5, 4\]"):
        L.boundary_loss(torch.rand(1, 2, 4, 5), torch.zeros(1, 5, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"hausdorff_dt_loss: reduction must be 'mean', 'sum' or 'none', got 'max'"):
        L.hausdorff_dt_loss(torch.rand(1, 2, 4, 5), torch.zeros(1, 4, 5, dtype=torch.int64), reduction="max")
    with pytest.raises(TypeError, match=r"boundary_distance_map: labels must be an integer tensor, got torch.float32"):
        L.boundary_distance_map(torch.zeros(1, 4, 5), 2)
    with pytest.raises(ValueError, match=r"signed_distance_map: cannot tell the spatial dims of shape \[2, 1, 4, 5\]"):
        L.signed_distance_map(torch.zeros(2, 1, 4, 5, dtype=torch.bool))


@pytest.mark.parametrize("device", devices())
def test_losses_on_device(device):
    torch.manual_seed(2)
    labels = torch.from_numpy(_blobs((2, 12, 10, 7), 4).astype(np.int64))
    probs = torch.randn(2, 2, 12, 10, 7).softmax(1)
    on_dev = (probs.to(device), labels.to(device))
    torch.testing.assert_close(L.hausdorff_dt_loss(*on_dev).cpu(), L.hausdorff_dt_loss(probs, labels))
    torch.testing.assert_close(L.boundary_loss(*on_dev).cpu(), L.boundary_loss(probs, labels))
    torch.testing.assert_close(L.signed_distance_map(on_dev[1], spatial_dims=3).cpu(), L.signed_distance_map(labels, spatial_dims=3))
