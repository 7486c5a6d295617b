"""Synthetic phantoms: the embedded default dataset (no download anywhere).

Three kinds, each deterministic from ``(seed, case index)`` so that case ``i`` is the same whatever
the number of cases:

* ``acdc``: cardiac short-axis stacks, 4 classes (background, RV, myocardium, LV), two frames per
  patient (ED and a contracted ES), spacing ``(10, 1.5, 1.5)`` mm, trained slice-wise (2D).
  Papillary muscles (dark, labelled LV), an RV free wall (dark, background), a bright descending
  aorta (blood-like, background), lungs, liver and fat make the task depend on shape and context.
* ``la``: left-atrium-like 3D blob with 2-4 pulmonary-vein stubs and often an appendage,
  2 classes, beside unlabelled blood pools (an LV and an aorta) of similar brightness.
* ``brats``: FLAIR-like 3D brain (cortex, white matter, ventricles) with a whole-tumour lesion
  (irregular oedema around a heterogeneous core), 2 classes, plus unlabelled hyperintense
  white-matter spots and periventricular caps as distractors; BraTS-style z-score over the brain.

Every kind varies shape, size, position, orientation, tissue intensities and contrast per case,
and adds a smooth multiplicative bias field, partial-volume blur and Rician noise.

A fourth kind, ``ct`` (abdomen-like CT in Hounsfield units, per-case spacing, unlabeled images;
see :mod:`sslseg.data.synthetic_ct`), is an nnU-Net raw folder rather than SSL4MIS data: options
``cases`` (labeled, 12), ``unlabeled`` (4), ``test`` (4), ``size`` (nominal in-plane voxels, 64),
``seed``.

Options (``synthetic:<kind>?k=v&...`` or keyword arguments of :func:`make_synthetic`):

=========  =======  ==============================================================
option     default  meaning
=========  =======  ==============================================================
cases      30 / 20  number of patients (acdc) or cases (la, brats)
size       80 / 64  in-plane size (acdc, +/- 1/8 per patient) or cube side (la, brats)
slices     8        slices per acdc volume (+/- 1 per patient when >= 3)
seed       0        generation seed
=========  =======  ==============================================================
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .errors import check_choice
from .layouts import DEFAULT_CLASSES, LA_FILE, Index
from .storage import MemoryVolume

KINDS = ("acdc", "la", "brats", "ct")
_KIND_CODE = {"acdc": 1, "la": 2, "brats": 3, "ct": 4}
_DEFAULTS = {
    "acdc": {"cases": 30, "size": 80, "slices": 8, "seed": 0},
    "la": {"cases": 20, "size": 64, "seed": 0},
    "brats": {"cases": 20, "size": 64, "seed": 0},
    "ct": {"cases": 12, "unlabeled": 4, "test": 4, "size": 64, "seed": 0},
}
#: Version of the synthetic:ct generator (bump when its output changes).
_CT_VERSION = 1
ACDC_SPACING = (10.0, 1.5, 1.5)
LA_SPACING = (1.0, 1.0, 1.0)
BRATS_SPACING = (1.0, 1.0, 1.0)


def synthetic_options(kind: str) -> dict[str, int]:
    """Default options of a synthetic kind (``cases``, ``size``, ``slices``, ``seed``; ``ct`` also
    ``unlabeled`` and ``test``)."""
    check_choice("kind", kind, KINDS)
    return dict(_DEFAULTS[kind])


def _resolve_options(kind: str, options: dict) -> dict[str, int]:
    defaults = synthetic_options(kind)
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(f"unknown synthetic:{kind} options {unknown}; accepted: {sorted(defaults)}")
    out = dict(defaults)
    for k, v in options.items():
        try:
            iv = int(v)
        except (TypeError, ValueError):
            raise ValueError(f"synthetic:{kind} option {k} must be an integer, got {v!r}") from None
        if isinstance(v, float) and iv != v:
            raise ValueError(f"synthetic:{kind} option {k} must be an integer, got {v!r}")
        out[k] = iv
    minimum = {"cases": 3, "size": 16, "slices": 1, "seed": 0, "unlabeled": 0, "test": 0}
    for k, lo in minimum.items():
        if k in out and out[k] < lo:
            raise ValueError(f"synthetic:{kind} option {k} must be >= {lo}, got {out[k]}")
    return out


# ------------------------------------------------------------------------------------ shared pieces
def _rng(seed: int, kind: str, case: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _KIND_CODE[kind], case]))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cells: int = 4) -> np.ndarray:
    """Zero-mean, unit-ish smooth random field (cubic-ish upsampling of a coarse grid)."""
    coarse = torch.from_numpy(rng.standard_normal((1, 1) + (cells,) * len(shape)).astype(np.float32))
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    field = F.interpolate(coarse, size=shape, mode=mode, align_corners=True)[0, 0].numpy()
    return field.astype(np.float32)


def _bias_field(rng: np.random.Generator, shape: tuple[int, ...], strength: float) -> np.ndarray:
    """Smooth multiplicative field, exp of a random quadratic polynomial (MRI coil inhomogeneity)."""
    axes = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    poly = np.zeros(shape, np.float32)
    for a in axes:
        poly += rng.uniform(-1, 1) * a + 0.5 * rng.uniform(-1, 1) * a * a
    if len(axes) >= 2:
        poly += 0.5 * rng.uniform(-1, 1) * axes[-1] * axes[-2]
    return np.exp(strength * poly / max(1.0, len(axes) * 0.75)).astype(np.float32)


def _rician(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of a complex signal with Gaussian noise: the noise model of MR magnitude images."""
    re = image + rng.normal(0.0, sigma, image.shape).astype(np.float32)
    im = rng.normal(0.0, sigma, image.shape).astype(np.float32)
    return np.sqrt(re * re + im * im).astype(np.float32)


def _soft(inside_distance: np.ndarray, width: float) -> np.ndarray:
    """Partial-volume occupancy from a signed distance (positive inside), ``width`` in voxels."""
    return (1.0 / (1.0 + np.exp(-inside_distance / max(width, 1e-3)))).astype(np.float32)


def _random_rotation(rng: np.random.Generator, max_angle: float) -> np.ndarray:
    """3x3 rotation from three Euler angles in ``[-max_angle, max_angle]``."""
    a, b, c = rng.uniform(-max_angle, max_angle, 3)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return (rz @ ry @ rx).astype(np.float32)


# ------------------------------------------------------------------------------------------- ACDC
def _acdc_patient(rng: np.random.Generator, size: int, slices: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Two frames (ED, ES) of one cardiac short-axis stack: images ``(D, H, W)``, labels uint8."""
    px = ACDC_SPACING[1]
    jit = size // 8 if size >= 48 else 0
    h = size + 2 * int(rng.integers(-jit // 2, jit // 2 + 1)) if jit else size
    w = size + 2 * int(rng.integers(-jit // 2, jit // 2 + 1)) if jit else size
    d = slices + int(rng.integers(-1, 2)) if slices >= 3 else slices
    ss = 2  # render at 2x and average: in-plane partial volume
    ys = (np.arange(h * ss, dtype=np.float32) + 0.5) / ss * px - h * px / 2
    xs = (np.arange(w * ss, dtype=np.float32) + 0.5) / ss * px - w * px / 2
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    scale = size * px / 120.0  # anatomy scales with the field of view (80 px = 120 mm)

    # Patient anatomy (mm), shared by both frames.
    center = rng.uniform(-8, 8, 2) * scale
    theta = math.pi + rng.uniform(-0.6, 0.6)  # RV direction, roughly image-left as in ACDC
    u = np.array([math.cos(theta), math.sin(theta)])
    r_lv = rng.uniform(15, 22) * scale
    wall = rng.uniform(5.5, 8.5) * scale
    ecc, rot = rng.uniform(0.82, 1.0), rng.uniform(0, math.pi)
    four = rng.uniform(0, 0.07, 2), rng.uniform(0, 2 * math.pi, 2)
    rv_a, rv_b = rng.uniform(1.15, 1.5), rng.uniform(0.6, 0.85)
    rv_off = rng.uniform(0.6, 0.85)
    rv_extent = rng.uniform(0.6, 0.9)
    drift = rng.uniform(-4, 4, 2) * scale
    pap_angles = theta + math.pi + rng.uniform(-0.9, -0.3), theta + math.pi + rng.uniform(0.3, 0.9)
    pap_r = rng.uniform(1.8, 3.2, 2) * scale
    body_a, body_b = rng.uniform(62, 75) * scale, rng.uniform(48, 58) * scale
    body_c = np.array([rng.uniform(-5, 5), rng.uniform(5, 15)]) * scale
    aorta_dir = np.array([math.cos(theta + 1.9), math.sin(theta + 1.9)])
    aorta_c = aorta_dir * rng.uniform(34, 42) * scale
    aorta_r = rng.uniform(7, 10) * scale
    liver_c = np.array([rng.uniform(20, 35), rng.uniform(20, 35)]) * scale
    fat_w = rng.uniform(1.5, 4.0) * scale
    inten = {
        "blood": rng.uniform(0.75, 0.95),
        "myo": rng.uniform(0.2, 0.34),
        "tissue": rng.uniform(0.3, 0.45),
        "fat": rng.uniform(0.55, 0.8),
        "lung": rng.uniform(0.02, 0.08),
        "liver": rng.uniform(0.3, 0.42),
        "aorta": rng.uniform(0.7, 1.0),
    }
    gamma = rng.uniform(0.75, 1.35)
    blur = rng.uniform(0.3, 0.8)
    through = rng.uniform(0.04, 0.14)
    noise = rng.uniform(0.02, 0.055)
    texture = _smooth_noise(rng, (h * ss, w * ss), cells=6) * 0.04

    images, labels = [], []
    for frame in range(2):
        es = frame == 1
        f_lv = rng.uniform(0.6, 0.72) if es else 1.0
        f_wall = rng.uniform(1.25, 1.5) if es else 1.0
        f_rv = rng.uniform(0.65, 0.82) if es else 1.0
        img = np.zeros((d, h, w), np.float32)
        lab = np.zeros((d, h, w), np.uint8)
        for k in range(d):
            s = k / max(d - 1, 1)  # 0 = base, 1 = apex
            c = center + drift * s
            y, x = yy - c[1], xx - c[0]
            # LV: perturbed ellipse in polar form.
            yr = -x * math.sin(rot) + y * math.cos(rot)
            xr = x * math.cos(rot) + y * math.sin(rot)
            dist = np.sqrt(xr * xr + (yr / ecc) ** 2)
            phi = np.arctan2(yr, xr)
            shape_mod = 1 + four[0][0] * np.cos(2 * phi + four[1][0]) + four[0][1] * np.cos(3 * phi + four[1][1])
            shrink = math.sqrt(max(0.0, 1 - (0.93 * s) ** 2))
            r_cav = r_lv * f_lv * shrink * shape_mod
            r_epi = r_cav + wall * f_wall * (0.85 + 0.15 * shrink)
            cav = dist < r_cav
            epi = dist < r_epi
            myo = epi & ~cav
            # Papillary muscles: dark like myocardium, labelled LV (as in ACDC).
            pap = np.zeros_like(cav)
            if s < 0.8:
                for ang, pr in zip(pap_angles, pap_r):
                    pc = 0.68 * r_lv * f_lv * shrink * np.array([math.cos(ang), math.sin(ang)])
                    pap |= ((x - pc[0]) ** 2 + (y - pc[1]) ** 2) < (pr * (1.1 if es else 1.0)) ** 2
                pap &= cav
            # RV: crescent between a larger offset ellipse and the LV epicardium.
            rv_cav = np.zeros_like(cav)
            rv_wall = np.zeros_like(cav)
            if s < rv_extent:
                g = math.sqrt(max(0.0, 1 - s / rv_extent)) * f_rv
                ru = x * u[0] + y * u[1]
                rvv = -x * u[1] + y * u[0]
                a, b = rv_a * (r_lv + wall) * g, rv_b * (r_lv + wall) * max(g, 0.35)
                off = rv_off * (r_lv + wall)
                ell = ((ru - off) / max(a, 1e-3)) ** 2 + (rvv / max(b, 1e-3)) ** 2
                rv_cav = (ell < 1) & (dist > r_epi + 2.0 * scale)
                rv_wall = (ell < (1 + 3.0 / max(b, 1.0)) ** 2) & ~rv_cav & ~epi
            fat = (dist < r_epi + fat_w) & ~epi & ~rv_cav & ~rv_wall & (np.cos(phi - theta) < 0.3)
            body = ((xx - body_c[0]) / body_a) ** 2 + ((yy - body_c[1]) / body_b) ** 2 < 1
            lungs = np.zeros_like(body)
            for side in (-1, 1):
                lx, ly = body_c[0] + side * 0.52 * body_a, body_c[1] + 0.08 * body_b
                lungs |= ((xx - lx) / (0.36 * body_a)) ** 2 + ((yy - ly) / (0.62 * body_b)) ** 2 < 1
            lungs &= body
            aorta = ((xx - c[0] - aorta_c[0]) ** 2 + (yy - c[1] - aorta_c[1]) ** 2) < aorta_r**2
            liver = (s > 0.5) & (((xx - liver_c[0]) / 40) ** 2 + ((yy - liver_c[1]) / 30) ** 2 < 1) & body
            canvas = np.zeros_like(xx)
            canvas[body] = inten["tissue"]
            canvas[lungs] = inten["lung"]
            canvas[liver] = inten["liver"]
            canvas[fat] = inten["fat"]
            canvas[aorta & ~lungs] = inten["aorta"]
            canvas[rv_wall] = inten["myo"] * 1.1
            canvas[myo] = inten["myo"]
            canvas[cav] = inten["blood"]
            canvas[rv_cav] = inten["blood"] * 0.95
            canvas[pap] = inten["myo"] * 1.05
            canvas = canvas + texture * body
            # Average ss x ss blocks: the image gets partial volume, the label takes centre samples.
            img[k] = canvas.reshape(h, ss, w, ss).mean(axis=(1, 3))
            lk = np.zeros(cav.shape, np.uint8)
            lk[rv_cav] = 1
            lk[myo] = 2
            lk[cav] = 3
            lab[k] = lk[ss // 2 :: ss, ss // 2 :: ss]
        img = ndimage.gaussian_filter(img, sigma=(0, blur, blur))
        if d > 1:  # thick slices: a little through-plane partial volume
            mixed = img.copy()
            mixed[1:] += through * (img[:-1] - img[1:])
            mixed[:-1] += through * (img[1:] - img[:-1])
            img = mixed
        img = np.clip(img, 0, None) ** gamma
        img = img * _bias_field(rng, (d, h, w), 0.35)
        img = _rician(rng, img, noise)
        lo, hi = float(img.min()), float(img.max())
        images.append(((img - lo) / (hi - lo if hi > lo else 1.0)).astype(np.float32))
        labels.append(lab)
    return images, labels


# --------------------------------------------------------------------------------------------- LA
def _grid(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r = np.arange(size, dtype=np.float32) - (size - 1) / 2
    return np.meshgrid(r, r, r, indexing="ij")


def _warp(rng: np.random.Generator, size: int, amp: float, cells: int = 4):
    """Coordinates displaced by a smooth random field (shape variability)."""
    z, y, x = _grid(size)
    return (
        z + amp * _smooth_noise(rng, (size,) * 3, cells),
        y + amp * _smooth_noise(rng, (size,) * 3, cells),
        x + amp * _smooth_noise(rng, (size,) * 3, cells),
    )


def _ellipsoid_sd(p, center, axes, rot: np.ndarray | None = None) -> np.ndarray:
    """Approximate signed distance (voxels, positive inside) of an ellipsoid."""
    q = [p[i] - center[i] for i in range(3)]
    if rot is not None:
        q = [rot[0, i] * q[0] + rot[1, i] * q[1] + rot[2, i] * q[2] for i in range(3)]
    f = np.sqrt(sum((q[i] / axes[i]) ** 2 for i in range(3)))
    return (1 - f) * float(min(axes))


def _tube_sd(p, a: np.ndarray, b: np.ndarray, radius: float) -> np.ndarray:
    """Signed distance of a capsule from ``a`` to ``b`` (positive inside)."""
    ab = b - a
    t = ((p[0] - a[0]) * ab[0] + (p[1] - a[1]) * ab[1] + (p[2] - a[2]) * ab[2]) / float(ab @ ab)
    t = np.clip(t, 0, 1)
    dist = np.sqrt(sum((p[i] - (a[i] + t * ab[i])) ** 2 for i in range(3)))
    return radius - dist


def _la_case(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    s = size / 64.0
    p = _warp(rng, size, rng.uniform(1.0, 2.5) * s)
    rot = _random_rotation(rng, 0.5)
    c = rng.uniform(-4, 4, 3) * s
    axes = np.array([rng.uniform(9, 12.5), rng.uniform(10, 15), rng.uniform(12, 17)]) * s
    sd = _ellipsoid_sd(p, c, axes, rot)
    # Pulmonary-vein stubs leave the posterior wall; an appendage often sits anteriorly.
    for _ in range(int(rng.integers(2, 5))):
        v = rng.standard_normal(3) + np.array([0.0, 1.4, 0.0])
        v /= np.linalg.norm(v)
        start = c + rot @ (axes * v) * 0.8
        end = start + rot @ v * rng.uniform(7, 13) * s + rng.uniform(-2, 2, 3) * s
        sd = np.maximum(sd, _tube_sd(p, start, end, rng.uniform(1.8, 3.2) * s))
    if rng.uniform() < 0.7:
        v = np.array([rng.uniform(-0.5, 0.5), -1.0, rng.uniform(0.3, 1.0)])
        v /= np.linalg.norm(v)
        ac = c + rot @ (axes * v) * 0.95
        sd = np.maximum(sd, _ellipsoid_sd(p, ac, np.array([3.5, 4.0, 6.0]) * s * rng.uniform(0.8, 1.2), rot))
    label = (sd > 0).astype(np.uint8)
    # Unlabelled blood pools of similar brightness: an LV below-front and an aorta tube.
    lv_c = c + np.array([rng.uniform(-6, 6), -axes[1] - rng.uniform(10, 15) * s, rng.uniform(-8, 8)])
    lv_sd = _ellipsoid_sd(p, lv_c, np.array([11, 10, 13]) * s * rng.uniform(0.85, 1.15))
    ao_x = c[2] + rng.choice([-1, 1]) * (axes[2] + rng.uniform(6, 10) * s)
    ao_a = np.array([-size / 2, c[1] + rng.uniform(-6, 6), ao_x])
    ao_b = np.array([size / 2, c[1] + rng.uniform(-10, 10), ao_x + rng.uniform(-6, 6)])
    ao_sd = _tube_sd(p, ao_a, ao_b, rng.uniform(4.5, 6.5) * s)
    tissue = rng.uniform(0.2, 0.35)
    img = tissue * (1 + 0.12 * _smooth_noise(rng, (size,) * 3, 5))
    lungs = _soft(np.abs(p[2]) - 0.36 * size, 1.5) * _soft(0.3 * size - np.abs(p[1] - 3 * s), 2.0)
    img = img * (1 - lungs) + rng.uniform(0.03, 0.08) * lungs
    # Thin atrial wall with patchy enhancement (LGE-MRI), around the blood pool.
    wall = _soft(sd + 1.8, 0.5) * (1 - _soft(sd, 0.5))
    patches = (_smooth_noise(rng, (size,) * 3, 8) > 0.6).astype(np.float32)
    img = img * (1 - wall) + wall * (rng.uniform(0.3, 0.4) + 0.35 * patches)
    for occ, value in (
        (_soft(lv_sd, 0.6), rng.uniform(0.55, 0.95)),
        (_soft(ao_sd, 0.6), rng.uniform(0.55, 0.95)),
        (_soft(sd, 0.6), rng.uniform(0.65, 0.9)),
    ):
        img = img * (1 - occ) + value * occ
    img = ndimage.gaussian_filter(img, rng.uniform(0.5, 1.0))
    img = img * _bias_field(rng, img.shape, 0.4)
    img = _rician(rng, img.astype(np.float32), rng.uniform(0.03, 0.07))
    img = (img - img.mean()) / (img.std() + 1e-8)  # UA-MT's mri_norm2 is a z-score
    return img.astype(np.float32), label


# ------------------------------------------------------------------------------------------ BraTS
def _brats_case(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    s = size / 64.0
    p = _warp(rng, size, rng.uniform(1.5, 3.0) * s)
    axes = np.array([0.34, 0.42, 0.36]) * size * rng.uniform(0.92, 1.05, 3)
    c = rng.uniform(-1.5, 1.5, 3) * s
    brain_sd = _ellipsoid_sd(p, c, axes)
    brain = _soft(brain_sd, 0.6)
    mask = brain_sd > -1.0
    # Cortex: a ribbon under the surface whose thickness varies (gyri).
    ribbon = 2.5 * s + 1.5 * s * _smooth_noise(rng, (size,) * 3, 7)
    gm = _soft(ribbon - brain_sd, 0.7)
    vents = np.zeros_like(brain_sd) - 1e3
    vent_axes = np.array([rng.uniform(5, 8), rng.uniform(2, 3.5), rng.uniform(4, 6.5)]) * s
    for side in (-1, 1):
        vc = c + np.array([rng.uniform(-1, 2), rng.uniform(-1, 1), side * rng.uniform(2.5, 4.5)]) * s
        vents = np.maximum(vents, _ellipsoid_sd(p, vc, vent_axes * rng.uniform(0.85, 1.15, 3)))
    csf = _soft(vents, 0.5)
    wm_val, gm_val = rng.uniform(0.3, 0.4), rng.uniform(0.4, 0.52)
    img = wm_val * (1 - gm) + gm_val * gm
    img = img * (1 + 0.05 * _smooth_noise(rng, (size,) * 3, 10))
    if rng.uniform() < 0.6:  # periventricular hyperintensity (unlabelled)
        cap = _soft(vents + 2.0 * s, 0.5) * (1 - csf) * (_smooth_noise(rng, (size,) * 3, 5) > 0.2)
        img = img * (1 - cap) + rng.uniform(0.6, 0.85) * cap
    img = img * (1 - csf) + rng.uniform(0.05, 0.15) * csf
    # Unlabelled small white-matter hyperintensities.
    for _ in range(int(rng.integers(1, 6))):
        lc = c + rng.uniform(-0.55, 0.55, 3) * axes
        spot = _soft(_ellipsoid_sd(p, lc, np.full(3, rng.uniform(1.0, 2.5) * s)), 0.5)
        img = img * (1 - spot) + rng.uniform(0.65, 0.95) * spot
    # Tumour: oedema (union of deformed ellipsoids) around a heterogeneous core.
    tc = c + rng.uniform(-0.45, 0.45, 3) * axes
    r_core = rng.uniform(3, 7) * s
    q = _warp(rng, size, rng.uniform(1.5, 3.5) * s, cells=5)
    edema_sd = np.zeros_like(brain_sd) - 1e3
    for _ in range(int(rng.integers(1, 4))):
        ec = tc + rng.uniform(-1, 1, 3) * r_core
        ea = (r_core + rng.uniform(2, 9, 3) * s)
        edema_sd = np.maximum(edema_sd, _ellipsoid_sd(q, ec, ea, _random_rotation(rng, 1.0)))
    core_sd = _ellipsoid_sd(q, tc, np.full(3, r_core) * rng.uniform(0.8, 1.2, 3))
    edema, core = _soft(edema_sd, 0.8), _soft(core_sd, 0.6)
    img = img * (1 - edema) + rng.uniform(0.7, 0.95) * edema
    img = img * (1 - core) + rng.uniform(0.45, 0.7) * core
    if rng.uniform() < 0.5:
        nec = _soft(core_sd - 0.5 * r_core, 0.5)
        img = img * (1 - nec) + rng.uniform(0.15, 0.3) * nec
    label = (((edema_sd > 0) | (core_sd > 0)) & (brain_sd > 0)).astype(np.uint8)
    img = ndimage.gaussian_filter(img * brain, rng.uniform(0.4, 0.9))
    img = img * _bias_field(rng, img.shape, 0.3)
    img = _rician(rng, img.astype(np.float32), rng.uniform(0.02, 0.05)) * mask
    # BraTS preprocessing: clip at the 99.9th percentile, z-score over brain voxels.
    inside = img[mask]
    img = np.minimum(img, np.percentile(inside, 99.9))
    mean, std = float(img[mask].mean()), float(img[mask].std())
    img = (img - mean) / (std + 1e-8)
    return img.astype(np.float32), label


# --------------------------------------------------------------------------------------- assembly
def _case_name(kind: str, i: int) -> str:
    return {"acdc": f"patient{i + 1:03d}", "la": f"LA{i + 1:03d}", "brats": f"BraTS19_SYN_{i + 1:03d}_1"}[kind]


def _official_lists(kind: str, n: int, seed: int) -> dict[str, list[str]]:
    """70/10/20 train/val/test (acdc, brats; like SSL4MIS) or 80/20 train/test (la; like UA-MT)."""
    names = [_case_name(kind, i) for i in range(n)]
    perm = np.random.default_rng(np.random.SeedSequence([seed, _KIND_CODE[kind], 10_000])).permutation(n)
    shuffled = [names[i] for i in perm]
    if kind == "la":
        n_test = max(1, int(round(0.2 * n)))
        return {"train": sorted(shuffled[n_test:]), "test": sorted(shuffled[:n_test])}
    n_val = max(1, int(round(0.1 * n)))
    n_test = max(1, int(round(0.2 * n)))
    return {
        "train": sorted(shuffled[n_val + n_test :]),
        "val": sorted(shuffled[:n_val]),
        "test": sorted(shuffled[n_val : n_val + n_test]),
    }


def _generate_one(kind: str, opts: dict[str, int], i: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = _rng(opts["seed"], kind, i)
    case = _case_name(kind, i)
    if kind == "acdc":
        imgs, labs = _acdc_patient(rng, opts["size"], opts["slices"])
        return [(f"{case}_frame{f + 1:02d}", im, lb) for f, (im, lb) in enumerate(zip(imgs, labs))]
    fn = _la_case if kind == "la" else _brats_case
    im, lb = fn(rng, opts["size"])
    return [(case, im, lb)]


@functools.lru_cache(maxsize=8)
def _generate(kind: str, items: tuple[tuple[str, int], ...]) -> tuple:
    """Generate (and memoise per process) every volume of a synthetic dataset."""
    opts = dict(items)
    out = []
    for i in range(opts["cases"]):
        for vid, im, lb in _generate_one(kind, opts, i):
            im.flags.writeable = False  # shared by every load(); readers hand out copies
            lb.flags.writeable = False
            out.append((vid, _case_name(kind, i), im, lb))
    return tuple(out)


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``synthetic:acdc?cases=12&size=64`` -> ``("acdc", {"cases": "12", "size": "64"})``."""
    body = spec[len("synthetic:") :] if spec.startswith("synthetic:") else spec
    kind, _, query = body.partition("?")
    check_choice("synthetic kind", kind, KINDS)
    pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False) if query else []
    options: dict[str, str] = {}
    for k, v in pairs:
        if k in options:
            raise ValueError(f"synthetic option {k!r} given twice in {spec!r}")
        options[k] = v
    return kind, options


def synthetic_index(spec: str) -> tuple[Index, str]:
    """Build the in-memory index of ``synthetic:<kind>[?options]``; returns (index, canonical name)."""
    kind, raw = parse_spec(spec)
    opts = _resolve_options(kind, raw)
    defaults = synthetic_options(kind)
    changed = {k: v for k, v in opts.items() if v != defaults[k]}
    name = f"synthetic:{kind}" + ("?" + "&".join(f"{k}={v}" for k, v in sorted(changed.items())) if changed else "")
    if kind == "ct":
        # CT phantoms are an nnU-Net raw folder (per-case spacing, unlabeled images, imagesTs):
        # written once into the cache and read like a user's folder, so they exercise the planner.
        from .layouts import index_nifti

        return index_nifti(materialise_ct(opts)), name
    volumes = _generate(kind, tuple(sorted(opts.items())))
    spacing = {"acdc": ACDC_SPACING, "la": LA_SPACING, "brats": BRATS_SPACING}[kind]
    index = Index("synthetic", Path("."), dim=2 if kind == "acdc" else 3, class_names=DEFAULT_CLASSES[kind])
    index.root = None  # type: ignore[assignment]
    for vid, case, im, lb in volumes:
        index.volumes[vid] = MemoryVolume(vid, case, image=im[None], label=lb, voxel_spacing=spacing)
    index.official = _official_lists(kind, opts["cases"], opts["seed"])
    return index, name


def materialise_ct(opts: dict[str, int]) -> Path:
    """The cached nnU-Net raw folder of ``synthetic:ct`` with ``opts`` (written on first use).

    Written into a temporary sibling and renamed, so an interrupted generation is never read.
    """
    import shutil

    from .cache import cache_root, stable_hash

    # The generator's version is part of the key: a changed generator never reuses old folders.
    root = cache_root() / "synthetic" / f"ct-{stable_hash([_CT_VERSION, sorted(opts.items())], 12)}"
    if (root / "dataset.json").is_file():
        return root
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _write_ct(tmp, opts)
    try:
        os.replace(tmp, root)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _write_ct(root: Path, opts: dict[str, int]) -> Path:
    from .synthetic_ct import write_ct_folder  # it builds on this module's shape helpers

    root.mkdir(parents=True, exist_ok=True)
    return write_ct_folder(root, opts, lambda i: _rng(opts["seed"], "ct", i), _write_nifti)


# ------------------------------------------------------------------------------------------ writer
def _write_h5(path: Path, image: np.ndarray, label: np.ndarray, spacing: tuple[float, ...]) -> None:
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=np.asarray(image, np.float32))
        f.create_dataset("label", data=np.asarray(label, np.uint8))
        f.attrs["spacing"] = np.asarray(spacing, np.float64)


def _write_nifti(path: Path, array: np.ndarray, spacing: tuple[float, ...]) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    # Arrays are (D, H, W) = (z, y, x); NIfTI stores (x, y, z).
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    img = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine)
    img.header.set_zooms((spacing[2], spacing[1], spacing[0]))
    nib.save(img, str(path))


def make_synthetic(
    kind: str,
    out_dir: str | os.PathLike,
    num_cases: int | None = None,
    seed: int = 0,
    *,
    layout: str | None = None,
    **options: int,
) -> Path:
    """Write a synthetic dataset to disk, in the SSL4MIS layout of its kind or as NIfTI.

    ``ssl4mis`` layouts (read back by :func:`sslseg.data.load` like the real data):

    * ``acdc``: ``data/slices/<patient>_frameNN_slice_K.h5`` for training volumes,
      ``data/<patient>_frameNN.h5`` for every volume, ``train_slices.list``, ``train.list``,
      ``val.list``, ``test.list`` (70/10/20 patients).
    * ``brats``: ``data/<case>.h5`` with ``train.txt``, ``val.txt``, ``test.txt`` (70/10/20).
    * ``la``: ``2018LA_Seg_Training Set/<case>/mri_norm2.h5`` with ``train.list``, ``test.list`` (80/20).

    ``nifti``: ``imagesTr/<volume>_0000.nii.gz``, ``labelsTr/<volume>.nii.gz`` and a
    ``dataset.json`` (nnU-Net v2 style) with the voxel spacing in the headers.

    ``ct`` exists only as an nnU-Net raw folder (``layout="nifti"``, its default): labelled and
    unlabelled training images in ``imagesTr`` (the latter without a file in ``labelsTr``), test
    cases in ``imagesTs`` + ``labelsTs``, options ``cases`` (labelled, 12), ``unlabeled`` (4),
    ``test`` (4), ``size`` (nominal in-plane voxels, 64), ``seed``; see
    :mod:`sslseg.data.synthetic_ct`.

    Every h5 file also carries its voxel spacing as a ``spacing`` attribute (SSL4MIS files have
    none; the reader uses it when present).

    Args:
        kind: ``acdc``, ``la``, ``brats`` or ``ct``.
        out_dir: folder to write (created; existing files of the same names are overwritten).
        num_cases: number of patients/cases (default: the kind's default, see module docs).
        seed: generation seed.
        layout: ``ssl4mis`` or ``nifti`` (default: ``nifti`` for ``ct``, else ``ssl4mis``).
        **options: other generation options (``size``, ``slices``).

    Returns:
        ``out_dir`` as a ``Path``.

    Example:
        >>> import tempfile
        >>> root = make_synthetic("acdc", tempfile.mkdtemp(), num_cases=4, size=32, slices=2)
        >>> sorted(p.name for p in root.glob("*.list"))
        ['test.list', 'train.list', 'train_slices.list', 'val.list']
    """
    check_choice("kind", kind, KINDS)
    if layout is None:
        layout = "nifti" if kind == "ct" else "ssl4mis"
    check_choice("layout", layout, ("ssl4mis", "nifti"))
    if kind == "ct" and layout != "nifti":
        raise ValueError("synthetic ct is written as an nnU-Net raw folder only: use layout='nifti' (got 'ssl4mis')")
    if num_cases is not None:
        options["cases"] = num_cases
    options["seed"] = seed
    opts = _resolve_options(kind, options)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    if kind == "ct":
        return _write_ct(root, opts)
    volumes = _generate(kind, tuple(sorted(opts.items())))
    spacing = {"acdc": ACDC_SPACING, "la": LA_SPACING, "brats": BRATS_SPACING}[kind]
    lists = _official_lists(kind, opts["cases"], opts["seed"])

    if layout == "nifti":
        labels = {name: i for i, name in enumerate(DEFAULT_CLASSES[kind])}
        for vid, _case, im, lb in volumes:
            _write_nifti(root / "imagesTr" / f"{vid}_0000.nii.gz", im, spacing)
            _write_nifti(root / "labelsTr" / f"{vid}.nii.gz", lb, spacing)
        meta = {
            "name": f"synthetic-{kind}",
            "channel_names": {"0": "MRI"},
            "labels": labels,
            "numTraining": len(volumes),
            "file_ending": ".nii.gz",
        }
        (root / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
        return root

    def write_list(name: str, entries: list[str]) -> None:
        (root / name).write_text("".join(e + "\n" for e in entries))

    case_group = {c: g for g, cs in lists.items() for c in cs}
    if kind == "acdc":
        slice_names: list[str] = []
        vols_by_group: dict[str, list[str]] = {"train": [], "val": [], "test": []}
        for vid, case, im, lb in volumes:
            _write_h5(root / "data" / f"{vid}.h5", im, lb, spacing)
            group = case_group[case]
            vols_by_group[group].append(vid)
            if group == "train":
                for k in range(im.shape[0]):
                    name = f"{vid}_slice_{k}"
                    _write_h5(root / "data" / "slices" / f"{name}.h5", im[k], lb[k], spacing[1:])
                    slice_names.append(name)
        write_list("train_slices.list", slice_names)
        for g, vids in vols_by_group.items():
            write_list(f"{g}.list", vids)
    elif kind == "brats":
        for vid, _case, im, lb in volumes:
            _write_h5(root / "data" / f"{vid}.h5", im, lb, spacing)
        for g, cs in lists.items():
            write_list(f"{g}.txt", cs)
    else:
        for vid, _case, im, lb in volumes:
            _write_h5(root / "2018LA_Seg_Training Set" / vid / LA_FILE, im, lb, spacing)
        for g, cs in lists.items():
            write_list(f"{g}.list", cs)
    return root
