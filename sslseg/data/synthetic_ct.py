"""``synthetic:ct``: abdomen-like CT in Hounsfield units, written as an nnU-Net v2 raw folder.

Each case draws its own voxel spacing from clinical ranges (in-plane 0.6-1.0 mm, slices
1.0-5.0 mm), field of view and size, so the planner and the resampler have real work to do.
Tissues: air (-1000 HU) around the body and as bowel gas, subcutaneous and visceral fat
(about -100), muscle and soft tissue (40-60), a vertebral column with cortical bone (700) and
marrow (250) and discs, a contrast-filled aorta (unlabelled), and four labelled organs:

=====  ===========  ===========================  ==========
label  organ        size                         HU
=====  ===========  ===========================  ==========
1      liver        large                        100-130
2      spleen       medium                       110-140
3      kidney       two small ellipsoids         150-200
4      gallbladder  small (sometimes absent)     0-25
=====  ===========  ===========================  ==========

Then partial volume at organ borders, Gaussian noise (8-25 HU) and streaks radiating from the
spine, rounded to int16 as scanners store them. Layout: ``imagesTr/ct001_0000.nii.gz`` with
``labelsTr/ct001.nii.gz`` for the labelled training cases, the unlabelled training cases in
``imagesTr`` without a label file, the test cases in ``imagesTs`` + ``labelsTs``, and a
``dataset.json`` with ``channel_names {"0": "CT"}``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from .synthetic import _ellipsoid_sd as _ellipsoid
from .synthetic import _random_rotation as _rotation

CT_CLASSES = ("background", "liver", "spleen", "kidney", "gallbladder")


def _occupancy(sd: np.ndarray, width: float) -> np.ndarray:
    """Partial-volume fraction from a signed distance (mm, the shape helpers of
    :mod:`sslseg.data.synthetic` work in any unit), ``width`` about half a voxel."""
    return (1.0 / (1.0 + np.exp(-np.clip(sd / width, -30, 30)))).astype(np.float32)


def case_geometry(rng: np.random.Generator, size: int) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Shape ``(D, H, W)`` and spacing ``(D, H, W)`` mm of one case."""
    inplane = float(rng.uniform(0.6, 1.0))
    slice_mm = float(np.round(rng.uniform(1.0, 5.0) * 2) / 2)
    h = int(np.clip(round(size * rng.uniform(0.75, 1.5)), 16, 2 * size))
    w = int(np.clip(round(h * rng.uniform(0.9, 1.15)), 16, 2 * size))
    extent_z = h * inplane * rng.uniform(0.8, 1.3)
    d = int(np.clip(round(extent_z / slice_mm), 12, 2 * size))
    return (d, h, w), (slice_mm, inplane, inplane)


def ct_case(rng: np.random.Generator, size: int, *, labeled: bool = True) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """One abdomen-like CT case: image int16 HU ``(D, H, W)``, label uint8, spacing ``(D, H, W)``."""
    shape, spacing = case_geometry(rng, size)
    d, h, w = shape
    axes = [(np.arange(n, dtype=np.float32) - (n - 1) / 2) * sp for n, sp in zip(shape, spacing)]
    p = np.meshgrid(*axes, indexing="ij")
    half_z, half_y, half_x = (n * sp / 2 for n, sp in zip(shape, spacing))
    A = half_x * rng.uniform(0.72, 0.9)  # body semi-axis left-right (mm)
    B = half_y * rng.uniform(0.55, 0.72)  # anterior-posterior
    Z = half_z
    off = np.array([0.0, rng.uniform(-0.05, 0.05) * half_y, rng.uniform(-0.05, 0.05) * half_x])
    body = _ellipsoid(p, off, (1e6, B, A))  # a cylinder along z
    img = np.full(shape, -1000.0, np.float32)
    soft = _occupancy(body, 0.6)
    fat_mm = rng.uniform(0.06, 0.14) * B
    muscle = _occupancy(body - fat_mm, 0.6)
    fat_hu, tissue_hu = rng.uniform(-120, -80), rng.uniform(35, 55)
    texture = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 2.0) * 30
    visceral = (texture > 12).astype(np.float32) * muscle
    img = img * (1 - soft) + fat_hu * soft
    img = img * (1 - muscle) + (tissue_hu + 0.3 * texture) * muscle
    img = img * (1 - visceral) + fat_hu * visceral

    # Spine: vertebral bodies (cortical shell, marrow) separated by discs; aorta in front of it.
    spine_c = off + np.array([0.0, 0.62 * B, 0.0])
    r_spine = rng.uniform(0.13, 0.18) * A
    spine_sd = _ellipsoid(p, spine_c, (1e6, r_spine, r_spine * 1.1))
    period = rng.uniform(0.35, 0.55) * Z
    disc = (np.abs(((p[0] + rng.uniform(0, period)) % period) - period / 2) < 0.08 * period).astype(np.float32)
    bone_occ = _occupancy(spine_sd, 0.5)
    marrow_occ = _occupancy(spine_sd - 0.25 * r_spine, 0.5)
    img = img * (1 - bone_occ) + rng.uniform(600, 900) * bone_occ
    img = img * (1 - marrow_occ) + rng.uniform(200, 300) * marrow_occ
    img = img * (1 - disc * bone_occ) + 80 * disc * bone_occ
    aorta_c = spine_c + np.array([0.0, -1.6 * r_spine, rng.uniform(-0.6, 0.2) * r_spine])
    aorta_occ = _occupancy(_ellipsoid(p, aorta_c, (1e6, 0.5 * r_spine, 0.5 * r_spine)), 0.5)
    img = img * (1 - aorta_occ) + rng.uniform(170, 260) * aorta_occ

    # Organs (label order = painting order; later ones sit on top).
    organs = []
    liver_c = off + np.array([rng.uniform(0.05, 0.3) * Z, rng.uniform(-0.2, 0.0) * B, -rng.uniform(0.35, 0.5) * A])
    organs.append((1, _ellipsoid(p, liver_c, (rng.uniform(0.5, 0.75) * Z, rng.uniform(0.5, 0.65) * B, rng.uniform(0.35, 0.45) * A),
                                 _rotation(rng, 0.3)), rng.uniform(100, 130)))
    spleen_c = off + np.array([rng.uniform(0.1, 0.35) * Z, rng.uniform(0.1, 0.3) * B, rng.uniform(0.5, 0.62) * A])
    organs.append((2, _ellipsoid(p, spleen_c, (rng.uniform(0.25, 0.4) * Z, rng.uniform(0.25, 0.35) * B, rng.uniform(0.14, 0.2) * A),
                                 _rotation(rng, 0.4)), rng.uniform(110, 140)))
    kidney_sd = np.full(shape, -1e3, np.float32)
    for side in (-1, 1):
        kc = off + np.array([rng.uniform(-0.35, -0.05) * Z, rng.uniform(0.35, 0.5) * B, side * rng.uniform(0.32, 0.42) * A])
        ka = (rng.uniform(0.22, 0.32) * Z + 4, rng.uniform(0.15, 0.2) * B, rng.uniform(0.1, 0.14) * A)
        kidney_sd = np.maximum(kidney_sd, _ellipsoid(p, kc, ka, _rotation(rng, 0.3)))
    organs.append((3, kidney_sd, rng.uniform(150, 200)))
    if rng.uniform() < 0.85:  # some patients have no gallbladder (cholecystectomy)
        gb_c = liver_c + np.array([rng.uniform(-0.35, -0.15) * Z, -rng.uniform(0.15, 0.3) * B, rng.uniform(0.15, 0.3) * A])
        gb_a = (rng.uniform(7, 11), rng.uniform(4, 6.5), rng.uniform(4, 6.5))
        organs.append((4, _ellipsoid(p, gb_c, gb_a, _rotation(rng, 0.5)), rng.uniform(0, 25)))
    label = np.zeros(shape, np.uint8)
    inside = body > 2.0
    for value, sd, hu in organs:
        sd = np.minimum(sd, body - 2.0)  # organs stay inside the body wall
        occ = _occupancy(sd, 0.5 * min(spacing))
        img = img * (1 - occ) + (hu + 0.15 * texture) * occ
        label[(sd > 0) & inside] = value
    # Bowel gas pockets (unlabelled air inside the body).
    for _ in range(int(rng.integers(2, 7))):
        gc = off + np.array([rng.uniform(-0.8, 0.8) * Z, rng.uniform(-0.7, 0.1) * B, rng.uniform(-0.4, 0.4) * A])
        gas_sd = np.where(label > 0, -1e3, _ellipsoid(p, gc, np.full(3, rng.uniform(2.5, 6.0))))
        gas = _occupancy(gas_sd, 0.5)
        img = img * (1 - gas) + rng.uniform(-950, -700) * gas

    # Streaks from the spine: bright/dark rays in each slice, then noise.
    theta = np.arctan2(p[1] - spine_c[1], p[2] - spine_c[2])
    radius = np.sqrt((p[1] - spine_c[1]) ** 2 + (p[2] - spine_c[2]) ** 2)
    streak = np.zeros(shape, np.float32)
    for _ in range(int(rng.integers(2, 6))):
        t0, sign = rng.uniform(-math.pi, math.pi), rng.choice([-1.0, 1.0])
        dt = np.angle(np.exp(1j * (theta - t0)))
        streak += sign * rng.uniform(20, 60) * np.exp(-(dt / 0.03) ** 2) * np.exp(-radius / (1.5 * A))
    img = img + streak * soft
    img = img + rng.normal(0.0, rng.uniform(8, 25), shape).astype(np.float32)
    image = np.clip(np.rint(img), -1024, 3071).astype(np.int16)
    return image, label, spacing


def write_ct_folder(root: Path, opts: dict[str, int], case_rng, write_nifti) -> Path:
    """Write every case of ``synthetic:ct`` under ``root`` (see the module docstring).

    Args:
        root: output folder.
        opts: resolved options (``cases``, ``unlabeled``, ``test``, ``size``, ``seed``).
        case_rng: ``i -> np.random.Generator`` (deterministic per case index).
        write_nifti: ``(path, array, spacing, dtype)`` writer.
    """
    n_lab, n_unl, n_test = opts["cases"], opts["unlabeled"], opts["test"]
    for i in range(n_lab + n_unl + n_test):
        name = f"ct{i + 1:03d}"
        image, label, spacing = ct_case(case_rng(i), opts["size"])
        test = i >= n_lab + n_unl
        img_dir, lab_dir = ("imagesTs", "labelsTs") if test else ("imagesTr", "labelsTr")
        write_nifti(root / img_dir / f"{name}_0000.nii.gz", image, spacing)
        if test or i < n_lab:
            write_nifti(root / lab_dir / f"{name}.nii.gz", label, spacing)
    meta = {
        "name": "synthetic-ct",
        "description": "abdomen-like CT phantoms in Hounsfield units (sslseg synthetic:ct)",
        "channel_names": {"0": "CT"},
        "labels": {name: i for i, name in enumerate(CT_CLASSES)},
        "numTraining": n_lab,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return root
