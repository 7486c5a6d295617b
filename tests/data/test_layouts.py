"""Layout readers: detection, ACDC/BraTS/LA h5, NIfTI folders, spacing and affine."""

from __future__ import annotations

import json
import warnings

import h5py
import nibabel as nib
import numpy as np
import pytest

from sslseg.data import DataError, detect_layout, load


@pytest.mark.parametrize("kind", ["acdc", "brats", "la"])
def test_detect_and_load(synthetic_roots, kind):
    root = synthetic_roots[kind]
    assert detect_layout(root) == kind
    ds = load(root)
    assert ds.layout == kind and len(ds.cases) > 0
    assert load(root, layout=kind).cases == ds.cases


def test_la_root_may_be_the_list_folder_or_its_parent(synthetic_roots, tmp_path):
    ds = load(synthetic_roots["la"])
    assert set(ds.official["train"]) | set(ds.official["test"]) == set(ds.cases)
    assert len(ds.official["test"]) == 1  # 80/20 of 5 cases


def test_detect_errors(tmp_path):
    with pytest.raises(DataError, match="data folder not found"):
        load(tmp_path / "missing")
    with pytest.raises(DataError, match="cannot detect the data layout"):
        load(tmp_path)
    with pytest.raises(ValueError, match="unknown layout 'acdcc'; did you mean 'acdc'"):
        load(tmp_path, layout="acdcc")


def test_h5_without_spacing_warns_once_and_override(copy_root):
    root = copy_root("brats")
    for p in (root / "data").glob("*.h5"):
        with h5py.File(p, "a") as f:
            del f.attrs["spacing"]
    ds = load(root)
    with pytest.warns(UserWarning, match="store no voxel spacing; using 1.0 mm"):
        assert ds.spacing == (1.0, 1.0, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds.read_volume(ds.volume_ids[0])  # said once, not per volume
    fixed = load(root, spacing=(2.0, 0.5, 0.5))
    assert fixed.spacing == (2.0, 0.5, 0.5)
    assert fixed.read_volume(fixed.volume_ids[0]).spacing == (2.0, 0.5, 0.5)
    with pytest.raises(ValueError, match="spacing must be three positive numbers"):
        load(root, spacing=(1.0, 0.0, 1.0))


def test_nifti_spacing_affine_and_transpose(nifti_root, synthetic_roots):
    ds = load(nifti_root)
    assert ds.layout == "nifti" and ds.num_classes == 2 and ds.class_names[1] == "whole tumour"
    vid = ds.volume_ids[0]
    v = ds.read_volume(vid)
    assert v.affine.shape == (4, 4) and v.spacing == (1.0, 1.0, 1.0)
    raw = nib.load(str(nifti_root / "labelsTr" / f"{vid}.nii.gz"))
    assert np.array_equal(v.label.numpy(), np.asarray(raw.dataobj).transpose(2, 1, 0))
    # The returned affine maps indices of the returned (z, y, x) array.
    idx = np.array([1, 2, 3, 1.0])
    assert np.allclose(v.affine @ idx, raw.affine @ np.array([3, 2, 1, 1.0]))
    # Same voxels as the h5 version, z-scored.
    h5 = load(synthetic_roots["brats"]).read_volume(vid)
    assert np.array_equal(v.label.numpy(), h5.label.numpy())


def test_nifti_anisotropic_spacing_and_2d(tmp_path):
    from sslseg.data import make_synthetic

    root = make_synthetic("acdc", tmp_path / "acdc", num_cases=4, size=32, slices=2, layout="nifti")
    ds = load(root, dim=2)
    assert ds.spacing == (10.0, 1.5, 1.5) and ds.dim == 2
    assert len(ds.cases) == 4 and all(len(ds.volumes_of(c)) == 2 for c in ds.cases)  # frames grouped


def _write_nii(path, array, zooms=(1.0, 1.0, 1.0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(array, np.diag([*zooms, 1.0]))
    nib.save(img, str(path))


def test_nifti_multichannel_msd_and_nnunet(tmp_path):
    rng = np.random.default_rng(0)
    lab = (rng.random((6, 7, 5)) > 0.7).astype(np.uint8)
    # nnU-Net naming: two channel files per case.
    for case in ("c1", "c2", "c3"):
        for ch in range(2):
            _write_nii(tmp_path / "nn" / "imagesTr" / f"{case}_{ch:04d}.nii.gz", rng.random((6, 7, 5)).astype(np.float32))
        _write_nii(tmp_path / "nn" / "labelsTr" / f"{case}.nii.gz", lab)
    ds = load(tmp_path / "nn")
    with pytest.warns(UserWarning, match="scanned the labels and found 2 classes"):
        assert ds.num_classes == 2
    assert ds.in_channels == 2 and ds.read_volume("c1").image.shape == (2, 5, 7, 6)
    # MSD: one 4D file per case, unlabeled imagesTs, macOS junk.
    for case in ("m1", "m2"):
        _write_nii(tmp_path / "msd" / "imagesTr" / f"{case}.nii.gz", rng.random((6, 7, 5, 3)).astype(np.float32))
        _write_nii(tmp_path / "msd" / "labelsTr" / f"{case}.nii.gz", lab)
    _write_nii(tmp_path / "msd" / "imagesTs" / "t1.nii.gz", rng.random((6, 7, 5, 3)).astype(np.float32))
    (tmp_path / "msd" / "imagesTr" / "._m1.nii.gz").write_bytes(b"junk")
    (tmp_path / "msd" / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "organ"}}))
    with pytest.warns(UserWarning, match="macOS '._' metadata file ignored"):
        ds = load(tmp_path / "msd")
    assert ds.in_channels == 3 and ds.num_classes == 2 and ds.extra_images == ("t1",)
    assert ds.read_volume("t1", with_label=False).image.shape == (3, 5, 7, 6)
    report = ds.validate()
    assert any("._m1.nii.gz" in w[0] for w in report.warnings)
