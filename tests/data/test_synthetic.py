"""Synthetic phantoms: determinism, classes, spacing, options, on-disk layouts."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from sslseg.data import load, make_synthetic, synthetic_options

from .conftest import TINY_SPEC


@pytest.mark.parametrize("kind", ["acdc", "la", "brats"])
def test_deterministic_and_seeded(kind):
    a = load(TINY_SPEC[kind])
    b = load(TINY_SPEC[kind])
    vid = a.volume_ids[0]
    va, vb = a.read_volume(vid), b.read_volume(vid)
    assert np.array_equal(va.image, vb.image) and np.array_equal(va.label, vb.label)
    c = load(TINY_SPEC[kind] + "&seed=1")
    assert not np.array_equal(va.image, c.read_volume(vid).image)


def test_case_does_not_depend_on_case_count():
    small = load("synthetic:brats?cases=4&size=24")
    big = load("synthetic:brats?cases=6&size=24")
    vid = small.volume_ids[2]
    assert np.array_equal(small.read_volume(vid).image, big.read_volume(vid).image)


@pytest.mark.parametrize("kind,classes,dim,spacing", [
    ("acdc", 4, 2, (10.0, 1.5, 1.5)),
    ("la", 2, 3, (1.0, 1.0, 1.0)),
    ("brats", 2, 3, (1.0, 1.0, 1.0)),
])
def test_classes_dim_spacing(kind, classes, dim, spacing):
    ds = load(TINY_SPEC[kind])
    assert ds.num_classes == classes and ds.dim == dim and ds.spacing == spacing and ds.in_channels == 1
    seen = set()
    for v in ds.iter_volumes(ds.cases[:3]):
        assert v.image.dtype == torch.float32 and v.label.dtype == torch.int64
        assert v.image.shape[1:] == v.label.shape
        assert v.spacing == spacing
        assert np.isfinite(v.image.numpy()).all()
        seen |= set(np.unique(v.label.numpy()).tolist())
    assert seen == set(range(classes))  # every class appears


def test_variability_between_cases():
    ds = load(TINY_SPEC["acdc"])
    fg = [float((v.label > 0).float().mean()) for v in ds.iter_volumes(ds.cases[:6])]
    assert np.std(fg) > 0.005  # shapes and sizes vary from patient to patient
    shapes = {tuple(v.image.shape) for v in ds.iter_volumes(ds.cases)}
    assert len(shapes) > 1  # in-plane size and slice count vary too


def test_acdc_has_two_frames_per_patient_and_official_lists():
    ds = load(TINY_SPEC["acdc"])
    assert len(ds.cases) == 10
    assert all(len(ds.volumes_of(c)) == 2 for c in ds.cases)
    assert {k: len(v) for k, v in ds.official.items()} == {"train": 7, "val": 1, "test": 2}


def test_options_are_validated():
    with pytest.raises(TypeError, match="unknown synthetic:acdc options \\['cass'\\]"):
        load("synthetic:acdc?cass=3")
    with pytest.raises(ValueError, match="unknown synthetic kind 'acd'; did you mean 'acdc'"):
        load("synthetic:acd")
    with pytest.raises(ValueError, match="option cases must be an integer, got 'x'"):
        load("synthetic:la?cases=x")
    with pytest.raises(ValueError, match="option size must be >= 16, got 4"):
        load("synthetic:la?size=4")
    assert synthetic_options("acdc") == {"cases": 30, "size": 80, "slices": 8, "seed": 0}


def test_make_synthetic_acdc_layout(synthetic_roots):
    root = synthetic_roots["acdc"]
    lists = {n: (root / f"{n}.list").read_text().split() for n in ("train", "val", "test", "train_slices")}
    assert len(lists["train"]) == 14 and len(lists["val"]) == 2 and len(lists["test"]) == 4  # volumes (2 per patient)
    assert all((root / "data" / "slices" / f"{s}.h5").is_file() for s in lists["train_slices"])
    with h5py.File(root / "data" / f"{lists['val'][0]}.h5") as f:
        assert f["image"].ndim == 3 and f["label"].dtype == np.uint8
        assert tuple(f.attrs["spacing"]) == (10.0, 1.5, 1.5)
    # The on-disk data equals the in-memory phantom of the same options.
    mem = load(TINY_SPEC["acdc"]).read_volume(lists["test"][0])
    disk = load(root).read_volume(lists["test"][0])
    assert np.array_equal(mem.image.numpy(), disk.image.numpy()) and np.array_equal(mem.label, disk.label)


def test_make_synthetic_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown layout 'nifty'; did you mean 'nifti'"):
        make_synthetic("la", tmp_path, layout="nifty")
    with pytest.raises(ValueError, match="unknown kind 'brain'"):
        make_synthetic("brain", tmp_path)
