"""Own data: synthetic:ct, unlabeled images, fingerprint, plan, resampling, preprocessing cache,
training from the cache, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from sslseg.data import DataError, Plan, fingerprint, load, make_synthetic, make_train_loader, plan, preprocess
from sslseg.data.planning import normalization_for, patch_and_batch, target_spacing
from sslseg.data.preprocess import cache_key, is_done
from sslseg.data.resample import resample_image, resample_label, resample_probabilities, resampled_shape
from sslseg.data.samplers import PatchSampler

SMALL = dict(num_cases=5, unlabeled=2, test=2, size=24)


@pytest.fixture(scope="module")
def ct_root(tmp_path_factory):
    return make_synthetic("ct", tmp_path_factory.mktemp("ct") / "ct", **SMALL)


@pytest.fixture
def ct_copy(tmp_path, ct_root):
    dst = tmp_path / "ct"
    shutil.copytree(ct_root, dst)
    return dst


# ---------------------------------------------------------------------------------- synthetic:ct
def test_synthetic_ct_folder(ct_root, tmp_path):
    meta = json.loads((ct_root / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"} and meta["file_ending"] == ".nii.gz" and meta["labels"]["background"] == 0
    assert len(list((ct_root / "imagesTr").glob("*.nii.gz"))) == 7 and len(list((ct_root / "labelsTr").glob("*"))) == 5
    assert len(list((ct_root / "imagesTs").glob("*"))) == 2 and len(list((ct_root / "labelsTs").glob("*"))) == 2
    spacings = set()
    for f in sorted((ct_root / "imagesTr").glob("*.nii.gz")):
        img = nib.load(str(f))
        zooms = img.header.get_zooms()
        assert 0.6 <= zooms[0] <= 1.0 and zooms[0] == zooms[1] and 1.0 <= zooms[2] <= 5.0
        assert img.get_data_dtype() == np.int16
        spacings.add(tuple(float(z) for z in zooms))
    assert len(spacings) > 3  # per-case spacing
    data = np.asarray(nib.load(str(ct_root / "imagesTr" / "ct001_0000.nii.gz")).dataobj)
    lab = np.asarray(nib.load(str(ct_root / "labelsTr" / "ct001.nii.gz")).dataobj)
    assert data.min() <= -900 and data.max() >= 300  # air and bone in HU
    assert 80 < data[lab == 1].mean() < 150  # contrast-enhanced liver
    # deterministic: the same seed writes the same voxels
    again = make_synthetic("ct", tmp_path / "again", **SMALL)
    assert np.array_equal(np.asarray(nib.load(str(again / "imagesTr" / "ct001_0000.nii.gz")).dataobj), data)
    with pytest.raises(ValueError, match="layout='nifti'"):
        make_synthetic("ct", tmp_path / "x", layout="ssl4mis")


def test_synthetic_ct_spec_is_a_dataset():
    ds = load("synthetic:ct?cases=4&unlabeled=1&test=1&size=20")
    assert ds.layout == "nifti" and ds.name == "synthetic:ct?cases=4&size=20&test=1&unlabeled=1"
    assert len(ds.unlabeled_cases) == 1 and ds.num_classes == 5 and len(ds.official["test"]) == 1


# ------------------------------------------------------------------------------ unlabeled images
def test_unlabeled_images_and_split_rule(ct_copy):
    # one more unlabeled image in imagesUnlabeled/
    (ct_copy / "imagesUnlabeled").mkdir()
    shutil.copy(ct_copy / "imagesTr" / "ct001_0000.nii.gz", ct_copy / "imagesUnlabeled" / "extra01_0000.nii.gz")
    ds = load(ct_copy)
    assert set(ds.unlabeled_cases) == {"ct006", "ct007", "extra01"}
    report = ds.validate(raise_on_error=False)
    assert report.ok and report.labeled == 7 and report.unlabeled == 3
    assert "7 labeled, 3 unlabeled" in str(report)
    s = ds.split(labeled=2, seed=1)
    assert set(s.test_cases) == {"ct008", "ct009"}  # imagesTs + labelsTs
    assert len(s.val_cases) == 1 and s.val_cases[0] not in ds.unlabeled_cases
    assert len(s.labeled_cases) == 2 and {"ct006", "ct007", "extra01"} <= set(s.unlabeled_cases)
    assert s.meta["unlabeled_images"] == 3 and "without a label is unlabeled" in s.meta["rule"]
    full = ds.split(labeled="all")
    assert len(full.labeled_cases) == 4 and set(full.unlabeled_cases) == {"ct006", "ct007", "extra01"}
    with pytest.raises(ValueError, match=r"labeled=9 asks for more labeled cases than exist.*4 left for training.*3 unlabeled"):
        ds.split(labeled=9)


def test_unlabeled_without_test_folder(ct_copy):
    shutil.rmtree(ct_copy / "imagesTs")
    shutil.rmtree(ct_copy / "labelsTs")
    ds = load(ct_copy)
    s = ds.split(labeled=1)
    unl = set(ds.unlabeled_cases)
    assert s.test_cases and not (set(s.test_cases) | set(s.val_cases) | set(s.labeled_cases)) & unl
    assert unl <= set(s.unlabeled_cases)


# ----------------------------------------------------------------------------------- fingerprint
def test_fingerprint_cached_and_recomputed_on_change(ct_copy):
    fp = fingerprint(load(ct_copy))
    assert len(fp.cases) == 9 and fp.channel_names == ["CT"] and fp.num_classes == 5
    ch = fp.channels[0]
    assert ch["percentile_00_5"] < ch["mean"] < ch["percentile_99_5"] and 50 < ch["mean"] < 200
    case = fp.cases["ct001"]
    assert len(case["shape"]) == 3 and len(case["spacing"]) == 3 and len(case["bbox"]) == 3 and case["labeled"]
    assert not fp.cases["ct006"]["labeled"]
    assert fp.cases["ct008"]["test"] and not fp.cases["ct001"]["test"]  # imagesTs: never used for planning
    assert len(fp.spacings()) == 7
    assert fingerprint(load(ct_copy)).hash == fp.hash  # cached
    # change a file: a new key, a new fingerprint
    img = nib.load(str(ct_copy / "imagesTr" / "ct001_0000.nii.gz"))
    arr = np.asarray(img.dataobj).copy()
    arr[arr > 90] += 50
    nib.save(nib.Nifti1Image(arr, img.affine, img.header), str(ct_copy / "imagesTr" / "ct001_0000.nii.gz"))
    fp2 = fingerprint(load(ct_copy))
    assert fp2.data_key != fp.data_key and fp2.channels[0]["mean"] != ch["mean"]


# ---------------------------------------------------------------------------------------- plan
def test_plan_rules(ct_root, tmp_path):
    p = plan(ct_root)
    assert p.normalization == ["ct"] and p.crop_to_nonzero and p.foreground_oversample == 0.33 and not p.identity
    assert p.dim in (2, 3) and len(p.patch_size) == p.dim and p.batch_size >= 2
    inside = p.median_shape if p.dim == 3 else p.median_shape[1:]
    assert all(ps <= max(m, 16) for ps, m in zip(p.patch_size, inside))
    assert all(ps % 16 == 0 for ps in p.patch_size)
    again = Plan.from_json(p.to_json(tmp_path / "plan.json"))
    assert again == p and Plan.from_json(tmp_path / "plan.json").hash == p.hash
    forced = plan(ct_root, overrides={"patch_size": [16, 32, 32]}, dim="3d")
    assert forced.patch_size == [16, 32, 32] and forced.dim == 3
    with pytest.raises(TypeError, match="unknown plan fields.*accepted"):
        plan(ct_root, overrides={"patch": [1]})
    with pytest.raises(ValueError, match="dim must be"):
        plan(ct_root, dim="4d")


def test_bigger_budget_never_smaller_patch():
    median = [60, 180, 170]
    prev = None
    for gb in (0.05, 0.2, 0.5, 1, 2, 4, 8, 16, 32, 80):
        patch, batch = patch_and_batch(median, 3, gb)
        assert all(p <= max(m, 16) for p, m in zip(patch, median)) and batch >= 2
        if prev is not None:
            assert all(a >= b for a, b in zip(patch, prev)), (gb, patch, prev)
        prev = patch
    assert prev == [48, 176, 160]  # the whole median shape fits at 80 GB (rounded down to 16s)


def test_target_spacing_anisotropic_and_normalization_choice():
    sp = np.array([[5.0, 0.8, 0.8], [5.0, 0.7, 0.7], [4.0, 0.9, 0.9], [1.0, 0.8, 0.8], [1.5, 0.8, 0.8]] * 2)
    target, axis = target_spacing(sp)
    assert axis == 0 and target[0] == pytest.approx(np.percentile(sp[:, 0], 10)) and target[1] == pytest.approx(0.8)
    iso, axis = target_spacing(np.array([[1.0, 0.8, 0.8], [1.2, 1.0, 1.0], [1.1, 0.9, 0.9]]))
    assert axis is None and iso == pytest.approx([1.1, 0.9, 0.9])
    assert [normalization_for(m) for m in ("CT", "ct", "T2", "MRI", "noNorm")] == ["ct", "ct", "zscore", "zscore", "none"]


def test_identity_plan_for_h5(synthetic_roots):
    p = plan(load(synthetic_roots["la"]))
    assert p.identity and p.normalization == ["none"] and not p.crop_to_nonzero and p.dim == 3


# ------------------------------------------------------------------------------------ resampling
def test_resample_round_trips():
    rng = np.random.default_rng(0)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in (12, 40, 36)], indexing="ij")
    label = ((zz**2 / 0.5 + yy**2 / 0.4 + xx**2 / 0.3) < 1).astype(np.uint8) + ((xx > 0.5) & (yy > 0.2)).astype(np.uint8) * 2
    image = (label * 100.0 + rng.normal(0, 1, label.shape))[None].astype(np.float32)
    sp, target = (4.0, 0.8, 0.8), (1.6, 1.0, 1.0)
    shape = resampled_shape(label.shape, sp, target)
    assert shape == (30, 32, 29)
    up = resample_image(image, sp, target)
    assert up.shape == (1, *shape) and up.dtype == np.float32
    back = resample_image(up, target, sp, new_shape=label.shape)
    assert back.shape == image.shape and np.corrcoef(back.ravel(), image.ravel())[0, 1] > 0.95
    for mode in ("linear", "nearest"):
        lab_t = resample_label(label, sp, target, mode=mode)
        lab_b = resample_label(lab_t, target, sp, new_shape=label.shape, mode=mode)
        assert lab_t.shape == shape and lab_b.shape == label.shape and set(np.unique(lab_b)) <= {0, 1, 2}
        for c in (1, 2):
            a, b = label == c, lab_b == c
            assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.85, (mode, c)
    probs = torch.softmax(torch.randn(3, *shape), 0)
    out = resample_probabilities(probs, label.shape)
    assert out.shape == (3, *label.shape) and torch.allclose(out.sum(0), torch.ones(label.shape), atol=1e-5)


# ------------------------------------------------------------------------------ preprocess cache
def test_preprocess_cache_memmap_and_staleness(ct_copy, tmp_path):
    ds = load(ct_copy)
    p = plan(ds, overrides={"patch_size": [16, 32, 32], "dim": 3})
    folder = preprocess(ds, p, jobs=2)
    key = cache_key(p)
    assert all(is_done(folder, v, key) for v in ds.volume_ids)
    geo = json.loads((folder / "ct001.json").read_text())
    assert geo["original_shape"] and geo["affine"] and geo["bbox"] and geo["spacing"] == pytest.approx(p.target_spacing)
    arr = np.load(folder / "ct001_image.npy", mmap_mode="r")
    assert isinstance(arr, np.memmap) and arr.dtype == np.float32 and arr.shape[1:] == tuple(geo["shape"])
    assert not (folder / "ct006_label.npy").exists()  # unlabeled: image only
    # a killed run: a case whose marker is missing is redone, the rest is kept
    (folder / "ct002.done").unlink()
    (folder / "ct002_image.npy").write_bytes(b"half")
    mtime = (folder / "ct001_image.npy").stat().st_mtime_ns
    preprocess(ds, p)
    assert is_done(folder, "ct002", key) and np.load(folder / "ct002_image.npy").ndim == 4
    assert (folder / "ct001_image.npy").stat().st_mtime_ns == mtime
    # another plan: another folder (never the stale one)
    p2 = p.replace(label_resampling="nearest")
    assert preprocess(ds, p2) != folder
    # the data change: the old plan is refused, a new plan gives a new key
    lab = ct_copy / "labelsTr" / "ct001.nii.gz"
    img = nib.load(str(lab))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header), str(lab))
    with pytest.raises(DataError, match="plan was made for other data"):
        preprocess(load(ct_copy), p)
    assert cache_key(plan(load(ct_copy))) != key


def test_training_from_cache_with_foreground_oversampling(ct_root):
    ds = load(ct_root)
    split = ds.split(labeled=2, seed=0)
    loader = make_train_loader(ds, split, patch_size=[16, 24, 24], labeled_bs=2, unlabeled_bs=2, seed=0)
    assert ds.plan is not None and ds.cache_dir is not None and ds.spacing == pytest.approx(tuple(ds.plan.target_spacing))
    batch = next(iter(loader))
    assert batch.labeled_image.shape == (2, 1, 16, 24, 24) and batch.unlabeled_image.shape == (2, 1, 16, 24, 24)
    assert abs(float(batch.labeled_image.mean())) < 3  # normalised, not HU
    vol = next(ds.iter_volumes(split.val_cases))
    assert vol.image.shape[1:] == vol.label.shape and vol.spacing == pytest.approx(tuple(ds.plan.target_spacing))
    # foreground rate: forced patches are centred on foreground; the centre voxel is labelled
    rec = ds.record(split.labeled_cases[0])
    size = (8, 8, 8)
    for prob, low, high in ((1.0, 0.99, 1.0), (0.0, 0.0, 0.5)):
        sampler = PatchSampler(size, prob)
        g = torch.Generator().manual_seed(0)
        hits = [sampler(rec, True, g)[1][4, 4, 4] > 0 for _ in range(200)]
        assert low <= np.mean(hits) <= high, (prob, np.mean(hits))
    import pickle

    clone = pickle.loads(pickle.dumps(rec))  # spawned DataLoader workers reopen the memory maps
    assert np.array_equal(clone.read_patch((0, 0, 0), size)[0], rec.read_patch((0, 0, 0), size)[0])
    sampler, g = PatchSampler(size, 0.33), torch.Generator().manual_seed(1)
    img, lab = sampler(ds.record(ds.unlabeled_cases[0]), False, g)
    assert lab is None and img.shape == (1, *size)


def test_nifti_without_plan_reads_as_stored(ct_root):
    ds = load(ct_root)
    split = ds.split(labeled=2, seed=0)
    loader = make_train_loader(ds, split, patch_size=[16, 24, 24], labeled_bs=1, unlabeled_bs=1, use_plan=False)
    batch = next(iter(loader))
    assert ds.plan is None and loader.samples.patch_sampler is None and batch.labeled_image.shape == (1, 1, 16, 24, 24)


def test_h5_layouts_unchanged_by_planning(synthetic_roots):
    ds = load(synthetic_roots["la"])
    split = ds.split(labeled=2, seed=0)
    loader = make_train_loader(ds, split, patch_size=16, labeled_bs=1, unlabeled_bs=1)
    assert ds.plan is None and loader.samples.patch_sampler is None


# ------------------------------------------------------------------------------------- bad input
def _bad(root, match):
    """The same error, naming the file, from check, load, fingerprint/plan and preprocess."""
    with pytest.raises(DataError, match=match):
        preprocess(load(root))
    with pytest.raises(DataError, match=match):
        plan(load(root))


def test_bad_geometry_label_values_and_affine(ct_copy):
    lab = ct_copy / "labelsTr" / "ct002.nii.gz"
    img = nib.load(str(lab))
    arr = np.asarray(img.dataobj)
    nib.save(nib.Nifti1Image(arr[:-2], img.affine), str(lab))
    _bad(ct_copy, r"ct002.nii.gz: label grid .* does not match the image grid")
    report = load(ct_copy).validate(raise_on_error=False)
    assert any(p.endswith("ct002.nii.gz") and "does not match" in m for p, m in report.problems)
    shifted = img.affine.copy()
    shifted[:3, 3] += 7.0
    nib.save(nib.Nifti1Image(arr, shifted), str(lab))
    _bad(ct_copy, r"ct002.nii.gz: label affine differs")
    assert any(p.endswith("ct002.nii.gz") and "affine differs" in m for p, m in load(ct_copy).validate(raise_on_error=False).problems)
    bad = arr.copy()
    bad[0, 0, 0] = 9
    nib.save(nib.Nifti1Image(bad, img.affine), str(lab))
    _bad(ct_copy, r"ct002.nii.gz: label values \[9\] outside the dataset's label set 0..4")


def test_bad_structure_is_a_load_error(ct_copy):
    ok = load(ct_copy)
    shutil.copy(ct_copy / "labelsTr" / "ct001.nii.gz", ct_copy / "labelsTr" / "ghost.nii.gz")
    with pytest.raises(DataError, match="ghost.nii.gz: label of case 'ghost' has no image"):
        load(ct_copy)
    (ct_copy / "labelsTr" / "ghost.nii.gz").unlink()
    shutil.copy(ct_copy / "imagesTr" / "ct001_0000.nii.gz", ct_copy / "imagesTr" / "ct001_0001.nii.gz")
    with pytest.raises(DataError, match=r"ct00\d: channel files \[0\] are not 0..1"):
        load(ct_copy)
    (ct_copy / "imagesTr" / "ct001_0001.nii.gz").unlink()
    meta = json.loads((ct_copy / "dataset.json").read_text())
    meta["numTraining"] = 11
    (ct_copy / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"dataset.json: numTraining is 11 but imagesTr/labelsTr hold 5 labeled"):
        load(ct_copy)
    meta["numTraining"], meta["file_ending"] = 5, ".nrrd"
    (ct_copy / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"dataset.json: file_ending '.nrrd'"):
        load(ct_copy)
    assert ok.num_classes == 5


# ------------------------------------------------------------------------------------------- CLI
def test_cli_plan_and_preprocess(ct_root, tmp_path):
    out = tmp_path / "plan.json"
    r = subprocess.run([sys.executable, "-m", "sslseg", "plan", str(ct_root), "--out", str(out),
                        "--set", "plan.patch_size=[16,32,32]", "--dim", "3d"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "target spacing" in r.stdout and Plan.from_json(out).patch_size == [16, 32, 32]
    r = subprocess.run([sys.executable, "-m", "sslseg", "preprocess", str(ct_root), "--plan", str(out), "--out",
                        str(tmp_path / "cache"), "--jobs", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cache" / "ct001.done").is_file() and "preprocessed 9 volumes" in r.stdout


def test_normalization_schemes():
    from sslseg.data.preprocess import normalize

    x = np.zeros((3, 4, 6, 6), np.float32)
    rng = np.random.default_rng(0)
    x[:, 1:3, 1:5, 1:5] = rng.normal(500, 50, (3, 2, 4, 4))
    mask = x[0] != 0
    props = {"mean": 500.0, "std": 50.0, "percentile_00_5": 420.0, "percentile_99_5": 580.0}
    p = Plan(target_spacing=[1, 1, 1], dim=3, patch_size=[16, 16, 16], batch_size=2, normalization=["ct", "zscore", "none"],
             use_mask_for_norm=[False, True, False], intensity_properties=[props] * 3)
    out = normalize(x, p, mask)
    assert out[0].min() == pytest.approx((420 - 500) / 50) and out[0].max() <= (580 - 500) / 50 + 1e-6  # clipped HU, dataset stats
    assert np.all(out[1][~mask] == 0) and abs(out[1][mask].mean()) < 1e-5 and out[1][mask].std() == pytest.approx(1, rel=1e-4)
    assert np.array_equal(out[2], x[2])


def test_2d_plan_trains_on_cached_slices(ct_root):
    p = plan(ct_root, dim="2d")
    assert p.dim == 2 and len(p.patch_size) == 2
    ds = load(ct_root, dim=2)
    split = ds.split(labeled=2, seed=0)
    loader = make_train_loader(ds, split, patch_size=[32, 32], labeled_bs=2, unlabeled_bs=2, seed=0, num_workers=1)
    batch = next(iter(loader))
    assert ds.plan.dim == 2 and batch.labeled_image.shape == (2, 1, 32, 32) and batch.labeled_label.shape == (2, 32, 32)
    # 2D plans keep each volume's own slice distance; the in-plane spacing is the plan's
    rec = ds.record(split.labeled_cases[0])
    assert rec.stored_spacing()[1:] == pytest.approx(tuple(p.target_spacing[1:]))
