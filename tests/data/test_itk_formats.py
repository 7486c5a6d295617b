"""NRRD and MetaImage files through SimpleITK (the ``[itk]`` extra): reading with NIfTI's array,
spacing and affine conventions, nnU-Net raw folders with ``file_ending: ".nrrd"``, ``sslseg infer``
writing the input's format and geometry, geometry checks, and the error when SimpleITK is missing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sslseg
from sslseg.app.cli import main
from sslseg.data import load
from sslseg.data.errors import DataError
from sslseg.data.storage import NiftiVolume, open_image

sitk = pytest.importorskip("SimpleITK")

# (D, H, W) spacing, i.e. ITK's (x, y, z) = (0.7, 0.8, 3.0); a rotated, flipped direction.
SPACING_DHW = (3.0, 0.8, 0.7)
ORIGIN = (-12.5, 40.0, 7.25)
DIRECTION = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def _itk_image(zyx: np.ndarray, spacing_dhw=SPACING_DHW, origin=ORIGIN, direction=DIRECTION):
    img = sitk.GetImageFromArray(zyx)
    img.SetSpacing(tuple(float(s) for s in spacing_dhw[::-1]))
    img.SetOrigin(tuple(float(o) for o in origin))
    img.SetDirection(tuple(float(d) for d in np.asarray(direction).ravel()))
    return img


def _write(path: Path, zyx: np.ndarray, **geometry) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(_itk_image(zyx, **geometry), str(path), True)
    return path


def _volume(shape, seed) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (200.0 + 50.0 * rng.standard_normal(shape)).astype(np.float32)


def _labels(shape, seed) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    d, h, w = shape
    lab[1 : d - 1, h // 4 : 3 * h // 4, w // 3 : w - 2] = 1
    lab[d // 2, 2:5, 2:5] = 1 + seed % 2
    return lab


# ------------------------------------------------------------------------------------------- reading
@pytest.mark.parametrize("ext", [".nrrd", ".mha", ".nhdr", ".mhd"])
def test_reader_matches_nifti_conventions(tmp_path, ext):
    zyx = _volume((5, 7, 9), seed=0)
    path = _write(tmp_path / f"case_0000{ext}", zyx)
    vol = NiftiVolume("case", "case", image_paths=[path], intensity="none")
    image, label = vol.read(with_label=False)
    assert label is None and image.shape == (1, 5, 7, 9) and image.dtype == np.float32
    assert np.array_equal(image[0], zyx)  # (z, y, x) as SimpleITK's array, no flip
    assert vol.shape() == (5, 7, 9)
    assert vol.stored_spacing() == pytest.approx(SPACING_DHW)
    # The affine maps array index (d, h, w) to the ITK physical point, in RAS (x and y negated).
    affine = vol.affine()
    ref = _itk_image(zyx)
    for d, h, w in [(0, 0, 0), (4, 6, 8), (2, 3, 1)]:
        lps = np.asarray(ref.TransformIndexToPhysicalPoint((w, h, d)))
        assert np.allclose(affine @ [d, h, w, 1], [-lps[0], -lps[1], lps[2], 1])
    # The same image written as NIfTI (by SimpleITK) reads back with the same array and affine.
    nii = tmp_path / "same.nii.gz"
    sitk.WriteImage(ref, str(nii))
    as_nifti = NiftiVolume("n", "n", image_paths=[nii], intensity="none")
    assert np.array_equal(as_nifti.read(with_label=False)[0], image)
    assert np.allclose(as_nifti.affine(), affine, atol=1e-5)
    assert as_nifti.stored_spacing() == pytest.approx(vol.stored_spacing())


def test_unreadable_file_names_it(tmp_path):
    bad = tmp_path / "broken.mha"
    bad.write_text("not a MetaImage header\n")
    with pytest.raises(DataError, match=r"broken\.mha: unreadable \.mha file"):
        open_image(bad)
    empty = tmp_path / "empty.nrrd"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.nrrd: file is empty"):
        open_image(empty)


def test_missing_simpleitk_names_file_and_extra(tmp_path, monkeypatch):
    path = _write(tmp_path / "scan.nrrd", _volume((3, 4, 5), seed=1))
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # `import SimpleITK` now raises ImportError
    vol = NiftiVolume("scan", "scan", image_paths=[path], intensity="none")
    with pytest.raises(DataError, match=r"scan\.nrrd: reading \.nrrd files needs SimpleITK.*pip install 'sslseg\[itk\]'"):
        vol.read(with_label=False)
    with pytest.raises(ImportError, match=r"sslseg\[itk\]"):
        vol.shape()
    # NIfTI files need no SimpleITK.
    nii = tmp_path / "scan.nii.gz"
    import nibabel as nib

    nib.Nifti1Image(np.zeros((5, 4, 3), np.float32), np.eye(4)).to_filename(str(nii))
    assert NiftiVolume("n", "n", image_paths=[nii]).shape() == (3, 4, 5)


# ----------------------------------------------------------------------------------- nnU-Net folders
def _raw_folder(root: Path, ext: str = ".nrrd", labeled=("c001", "c002", "c003", "c004"), unlabeled=("c005",)) -> Path:
    for i, case in enumerate((*labeled, *unlabeled)):
        shape = (6, 12 + i, 10)
        _write(root / "imagesTr" / f"{case}_0000{ext}", _volume(shape, seed=i))
        if case in labeled:
            _write(root / "labelsTr" / f"{case}{ext}", _labels(shape, seed=i))
    meta = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "organ": 1, "lesion": 2},
            "numTraining": len(labeled) + len(unlabeled), "file_ending": ext}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.mark.parametrize("ext", [".nrrd", ".mha"])
def test_raw_folder_loads_checks_and_splits(tmp_path, ext, capsys):
    root = _raw_folder(tmp_path / f"Dataset001{ext[1:]}", ext)
    ds = load(root)
    assert ds.layout == "nifti" and ds.num_classes == 3
    assert list(ds.unlabeled_cases) == ["c005"]
    report = ds.validate(raise_on_error=False)
    assert report.ok, str(report)
    assert report.labeled == 4 and report.unlabeled == 1 and report.files_checked == 9
    assert report.classes_seen == {0, 1, 2}
    split = ds.split(labeled="all", seed=0)
    assert len(split.val_cases) == 1 and len(split.labeled_cases) + len(split.test_cases) == 3
    assert list(split.unlabeled_cases) == ["c005"]
    assert "c005" not in {*split.labeled_cases, *split.val_cases, *split.test_cases}
    v = ds.read_volume("c002")
    assert tuple(v.image.shape) == (1, 6, 13, 10) and tuple(v.label.shape) == (6, 13, 10)
    assert tuple(v.spacing) == pytest.approx(SPACING_DHW)
    raw = _labels((6, 13, 10), seed=1)
    assert np.array_equal(v.label.numpy(), raw)
    assert main(["data", "check", str(root)]) == 0
    assert "4 labeled, 1 unlabeled" in capsys.readouterr().out


def test_detached_headers_list_their_data_files(tmp_path):
    from sslseg.data.fingerprint import data_key, record_files
    from sslseg.data.storage import image_files

    root = _raw_folder(tmp_path / "ds", ".mhd", labeled=("c001", "c002", "c003"), unlabeled=())
    ds = load(root)
    assert not [w for w in ds._index.warnings if "ignored" in w[1]]  # the .zraw files are not strays
    assert ds.validate(raise_on_error=False).ok
    files = record_files(ds.raw_record("c001"))
    assert [f.name for f in files] == ["c001_0000.mhd", "c001_0000.zraw", "c001.mhd", "c001.zraw"]
    key = data_key(ds)
    # New voxels behind an unchanged header change the data key (fingerprint, plan and cache follow).
    data = root / "imagesTr" / "c002_0000.zraw"
    other = root / "imagesTr" / "c003_0000.zraw"
    data.write_bytes(other.read_bytes() + b"\0")
    assert data_key(load(root)) != key
    nhdr = _write(tmp_path / "n" / "scan.nhdr", _volume((3, 4, 5), seed=2))
    assert [f.name for f in image_files(nhdr)] == ["scan.nhdr", "scan.raw.gz"]
    assert image_files(root / "imagesTr" / "c001_0000.mhd")[1].is_file()
    assert image_files(tmp_path / "x.nrrd") == [tmp_path / "x.nrrd"]


def test_raw_folder_test_images_and_file_ending(tmp_path):
    root = _raw_folder(tmp_path / "ds", ".nrrd", labeled=("c001", "c002", "c003"), unlabeled=())
    _write(root / "imagesTs" / "t001_0000.nrrd", _volume((6, 12, 10), seed=9))
    ds = load(root)
    assert not ds.unlabeled_cases and "t001" in ds._index.extra_images
    assert ds.validate(raise_on_error=False).ok
    # file_ending must agree with the files.
    meta = json.loads((root / "dataset.json").read_text())
    meta["file_ending"] = ".mha"
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"dataset.json: file_ending '.mha' does not match the files: .*c001_0000.nrrd"):
        load(root)
    meta["file_ending"] = ".png"
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"file_ending '.png' is not read by sslseg.*'.nrrd'"):
        load(root)
    # One case in two formats is ambiguous: refused, naming both files.
    meta["file_ending"] = ".nrrd"
    (root / "dataset.json").write_text(json.dumps(meta))
    _write(root / "labelsTr" / "c002.mha", _labels((6, 13, 10), seed=1))
    with pytest.raises(DataError, match=r"c002.nrrd: case file 'c002' exists twice, as c002.mha and c002.nrrd"):
        load(root)


def test_geometry_mismatch_is_refused_naming_the_label(tmp_path, capsys):
    root = _raw_folder(tmp_path / "ds", ".nrrd", labeled=("c001", "c002", "c003"), unlabeled=())
    # c002: label with another origin (same shape and spacing); c003: label with another shape.
    _write(root / "labelsTr" / "c002.nrrd", _labels((6, 13, 10), seed=1), origin=(0.0, 0.0, 0.0))
    _write(root / "labelsTr" / "c003.nrrd", _labels((6, 13, 10), seed=2))
    ds = load(root)
    problems = dict(ds.validate(raise_on_error=False).problems)
    assert "affine differs" in problems[str(root / "labelsTr" / "c002.nrrd")]
    assert "does not match label shape" in problems[str(root / "labelsTr" / "c003.nrrd")]
    assert main(["data", "check", str(root)]) == 1
    assert "c002.nrrd" in capsys.readouterr().out
    # Training-time reading (fingerprint, plan, preprocess) refuses the case, naming the file.
    from sslseg.data.fingerprint import read_raw

    with pytest.raises(DataError, match=r"labelsTr/c002\.nrrd: label affine differs from the image affine"):
        read_raw(ds.raw_record("c002"), 3)
    with pytest.raises(DataError, match=r"labelsTr/c003\.nrrd: label grid \(10, 13, 6\) does not match the image grid \(10, 14, 6\)"):
        read_raw(ds.raw_record("c003"), 3)
    # A label at another spacing is named too.
    _write(root / "labelsTr" / "c002.nrrd", _labels((6, 13, 10), seed=1), spacing_dhw=(2.0, 0.8, 0.7))
    problems = dict(load(root).validate(raise_on_error=False).problems)
    assert "label spacing" in problems[str(root / "labelsTr" / "c002.nrrd")]


# ---------------------------------------------------------------------------------------------- infer
def _assert_same_geometry(out: Path, src: Path, components: int = 1) -> None:
    a, b = sitk.ReadImage(str(out)), sitk.ReadImage(str(src))
    assert a.GetSize() == b.GetSize() and a.GetNumberOfComponentsPerPixel() == components
    assert np.allclose(a.GetSpacing(), b.GetSpacing()) and np.allclose(a.GetOrigin(), b.GetOrigin())
    assert np.allclose(a.GetDirection(), b.GetDirection())


@pytest.mark.parametrize("ext", [".mha", ".nrrd", ".mhd", ".nhdr"])
def test_infer_writes_input_format_and_geometry(runs, tmp_path, ext):
    run = runs[3]
    shape = (18, 20, 16)
    # The training phantoms are at 1 mm: an input close to that spacing, with a rotated direction.
    src = _write(tmp_path / "in" / f"scan_0000{ext}", _volume(shape, seed=4), spacing_dhw=(1.0, 1.1, 0.9))
    written = sslseg.infer(run.dir, src, tmp_path / "out", probabilities=True, device="cpu")
    assert written == [tmp_path / "out" / f"scan{ext}", tmp_path / "out" / f"scan_probs{ext}"]
    _assert_same_geometry(written[0], src)
    _assert_same_geometry(written[1], src, components=run.record["num_classes"])
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(written[0])))
    assert labels.dtype == np.uint8 and labels.shape == shape
    stored = sitk.GetArrayFromImage(sitk.ReadImage(str(src)))
    assert np.array_equal(labels, sslseg.infer(run.model, torch.from_numpy(stored)).numpy())
    probs = sitk.GetArrayFromImage(sitk.ReadImage(str(written[1])))
    assert probs.shape == (*shape, run.record["num_classes"])
    assert np.allclose(probs.sum(-1), 1.0, atol=1e-4)
    # Nothing temporary is left behind; detached headers have their data files beside them.
    leftovers = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("."))
    assert leftovers == []
    if ext in (".mhd", ".nhdr"):
        names = sorted(p.name for p in (tmp_path / "out").iterdir())
        data = {".mhd": ".zraw", ".nhdr": ".raw.gz"}[ext]
        assert names == sorted([f"scan{ext}", f"scan_probs{ext}", f"scan{data}", f"scan_probs{data}"])


def test_infer_cli_on_mha(runs, tmp_path, capsys):
    src = _write(tmp_path / "case.mha", _volume((16, 18, 14), seed=5), spacing_dhw=(1.0, 1.0, 1.0))
    assert main(["infer", str(runs[3].dir), str(src), "--out", str(tmp_path / "preds"), "--device", "cpu"]) == 0
    out = tmp_path / "preds" / "case.mha"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    _assert_same_geometry(out, src)


def test_infer_without_simpleitk(runs, tmp_path, monkeypatch):
    src = _write(tmp_path / "case.nrrd", _volume((16, 18, 14), seed=6))
    monkeypatch.setitem(sys.modules, "SimpleITK", None)
    with pytest.raises(DataError, match=r"case\.nrrd: reading \.nrrd files needs SimpleITK.*pip install 'sslseg\[itk\]'"):
        sslseg.infer(runs[3].dir, src, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out" / "case.nrrd").exists()
