"""Bad input: every problem is found, reported together, and names the file."""

from __future__ import annotations

import h5py
import nibabel as nib
import numpy as np
import pytest

from sslseg.data import DataValidationError, load


def _first_val(root, ext=".list"):
    return (root / f"val{ext}").read_text().split()[0]


def _problems(root, **kw):
    ds = load(root, strict=False, **kw)
    report = ds.validate(raise_on_error=False)
    return report


def test_clean_data_validates(synthetic_roots, nifti_root):
    for root in [*synthetic_roots.values(), nifti_root]:
        report = load(root).validate()
        assert report.ok and report.files_checked > 0


def test_every_h5_problem_reported_with_its_file(copy_root):
    root = copy_root("acdc")
    vols = sorted((root / "data").glob("*.h5"))
    v_shape, v_range, v_nan, v_key, v_empty, v_junk = vols[:6]
    with h5py.File(v_shape, "a") as f:  # image/label shape mismatch
        lab = f["label"][()]
        del f["label"]
        f["label"] = lab[:, :-1]
    with h5py.File(v_range, "a") as f:  # label out of range
        f["label"][0, 0, 0] = 7
    with h5py.File(v_nan, "a") as f:  # NaN image
        f["image"][0, 0, 0] = np.nan
    with h5py.File(v_key, "a") as f:  # missing key
        del f["image"]
    v_empty.write_bytes(b"")  # empty file
    v_junk.write_bytes(b"not an h5 file at all")  # unreadable
    report = _problems(root)
    text = str(report)
    expected = {
        v_shape: "does not match label shape",
        v_range: "label values [7] outside [0, 4)",
        v_nan: "image has 1 NaN/Inf value(s)",
        v_key: "missing h5 key(s) ['image']",
        v_empty: "file is empty (0 bytes)",
        v_junk: "unreadable h5 file",
    }
    for path, msg in expected.items():
        assert any(p == str(path) and msg in m for p, m in report.problems), (path, msg, text)
    with pytest.raises(DataValidationError, match="problem"):
        load(root, strict=False).validate()


def test_list_naming_missing_cases(copy_root):
    root = copy_root("brats")
    vid = _first_val(root, ".txt")
    (root / "data" / f"{vid}.h5").unlink()
    with pytest.raises(DataValidationError, match=f"val.txt: names case '{vid}' but .* does not exist"):
        load(root)
    report = _problems(root)
    assert [p for p in report.problems if p[0].endswith("val.txt")]


def test_acdc_missing_slice_leak_and_overlap(copy_root):
    root = copy_root("acdc")
    slices = (root / "train_slices.list").read_text().split()
    (root / "data" / "slices" / f"{slices[0]}.h5").unlink()
    val_vol = _first_val(root)
    with open(root / "train_slices.list", "a") as f:
        f.write(f"{val_vol}_slice_0\n")
    (root / "data" / "slices" / f"{val_vol}_slice_0.h5").write_bytes((root / "data" / "slices" / f"{slices[1]}.h5").read_bytes())
    test_vol = (root / "test.list").read_text().split()[0]
    with open(root / "train.list", "a") as f:
        f.write(test_vol + "\n")
    with pytest.raises(DataValidationError) as info:
        load(root)
    msg = str(info.value)
    assert f"names slice '{slices[0]}'" in msg
    assert f"training slices of volume '{val_vol}', which the val/test list holds out" in msg
    assert "is in both the train and the test list" in msg


def test_la_missing_case_and_unused_file(copy_root):
    root = copy_root("la")
    with open(root / "train.list", "a") as f:
        f.write("ghost\n")
    report = _problems(root)
    assert any(p.endswith("train.list") and "names case 'ghost'" in m for p, m in report.problems)


def test_nifti_problems(copy_root):
    root = copy_root("nifti")
    labels = sorted((root / "labelsTr").glob("*.nii.gz"))
    labels[0].unlink()  # image without label
    img = nib.load(str(labels[1]))
    data = np.asarray(img.dataobj).astype(np.float32)
    data[0, 0, 0] = 0.5
    nib.save(nib.Nifti1Image(data, img.affine), str(labels[1]))  # non-integer label
    small = nib.Nifti1Image(np.zeros((3, 3, 3), np.uint8), img.affine)
    nib.save(small, str(labels[2]))  # shape mismatch
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.uint8), np.eye(4)), str(root / "labelsTr" / "orphan.nii.gz"))
    report = _problems(root)
    msgs = "\n".join(f"{p}: {m}" for p, m in report.problems)
    assert "has no label" not in msgs and report.unlabeled == 1  # an image without label is unlabeled
    assert f"{labels[1]}: label has non-integer values (e.g. 0.5)" in msgs
    assert f"{labels[2]}: image shape" in msgs
    assert "orphan.nii.gz: label of case 'orphan' has no image" in msgs


def test_num_classes_override_catches_out_of_range(synthetic_roots):
    report = load(synthetic_roots["acdc"], num_classes=3).validate(raise_on_error=False)
    assert any("outside [0, 3)" in m for _, m in report.problems)
