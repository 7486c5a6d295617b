"""Round trips: make_synthetic -> load -> split -> loader -> batches; eval volumes."""

from __future__ import annotations

import h5py
import pytest
import torch

from sslseg.data import Batch, load, make_eval_loader, make_train_loader

from ..devices import devices
from .conftest import TINY_SPEC


@pytest.mark.parametrize("kind,patch", [("acdc", (32, 32)), ("la", (16, 16, 16)), ("brats", (16, 16, 16))])
def test_round_trip_from_disk(synthetic_roots, kind, patch):
    ds = load(synthetic_roots[kind])
    split = ds.split(labeled=1, seed=0)
    loader = make_train_loader(ds, split, patch_size=patch, labeled_bs=2, unlabeled_bs=3, seed=0)
    batches = list(loader)
    assert len(batches) == len(loader) >= 1
    b = batches[0]
    assert isinstance(b, Batch) and b.labeled_bs == 2 and b.unlabeled_bs == 3
    assert b.labeled_image.shape == (2, 1, *patch) and b.labeled_label.shape == (2, *patch)
    assert b.unlabeled_image.shape == (3, 1, *patch)
    assert b.labeled_label.dtype == torch.int64 and b.labeled_label.max() < ds.num_classes
    assert not hasattr(b, "unlabeled_label")
    assert b.labeled_spacing.shape == (2, len(patch))
    # Samples come from the right cases.
    assert all(any(i.startswith(c) for c in split.labeled_cases) for i in b.labeled_ids)
    assert all(any(i.startswith(c) for c in split.unlabeled_cases) for i in b.unlabeled_ids)
    assert set(b.labeled_case_ids) <= set(split.labeled_cases)
    assert set(b.unlabeled_case_ids) <= set(split.unlabeled_cases)
    assert b.images().shape[0] == 5


def test_acdc_trains_on_slices_of_labeled_patients(synthetic_roots):
    ds = load(synthetic_roots["acdc"])
    split = ds.split(labeled=2, seed=1)
    loader = make_train_loader(ds, split, patch_size=32, labeled_bs=4, unlabeled_bs=4)
    expected = sum(ds.record(v).shape()[0] for c in split.labeled_cases for v in ds.volumes_of(c))
    assert loader.num_labeled_samples == expected
    assert len(loader) == expected // 4


def test_unlabeled_labels_are_never_read(copy_root):
    root = copy_root("brats")
    ds = load(root)
    split = ds.split(labeled=1, seed=0)
    for case in split.unlabeled_cases:  # remove the labels of every unlabeled case
        with h5py.File(root / "data" / f"{case}.h5", "a") as f:
            del f["label"]
    loader = make_train_loader(ds, split, patch_size=16, labeled_bs=1, unlabeled_bs=2)
    for batch in loader:
        assert batch.unlabeled_image.shape[0] == 2


def test_fully_supervised_and_strong_views():
    ds = load(TINY_SPEC["acdc"])
    full = ds.split(labeled=None)
    loader = make_train_loader(ds, full, patch_size=24, labeled_bs=3, unlabeled_bs=0, strong_aug=True)
    b = next(iter(loader))
    assert b.unlabeled_image is None and b.unlabeled_bs == 0 and b.labeled_strong.shape == b.labeled_image.shape
    with pytest.raises(ValueError, match="unlabeled_bs=2 but the split has no unlabeled cases"):
        make_train_loader(ds, full, patch_size=24, labeled_bs=3, unlabeled_bs=2)
    split = ds.split(labeled=2)
    b = next(iter(make_train_loader(ds, split, patch_size=24, labeled_bs=2, unlabeled_bs=2, strong_aug="randaugment", strong_views=2)))
    assert b.unlabeled_strong.shape == b.unlabeled_strong2.shape == b.unlabeled_image.shape
    assert not torch.equal(b.unlabeled_strong, b.unlabeled_strong2)
    with pytest.raises(ValueError, match="unknown strong_aug 'randaug'; did you mean 'randaugment'"):
        make_train_loader(ds, split, patch_size=24, labeled_bs=2, unlabeled_bs=2, strong_aug="randaug")


def _fingerprint(loader, n):
    out = []
    for _, b in zip(range(n), loader.forever()):
        out.append((b.labeled_ids, b.unlabeled_ids, float(b.labeled_image.sum()), float(b.unlabeled_image.sum())))
    return out


def test_reproducible_independent_of_workers_and_resumable():
    ds = load(TINY_SPEC["acdc"])
    split = ds.split(labeled=2, seed=0)
    kw = dict(patch_size=24, labeled_bs=2, unlabeled_bs=2, seed=3, batches_per_epoch=3)
    ref = _fingerprint(make_train_loader(ds, split, **kw), 7)
    assert _fingerprint(make_train_loader(ds, split, num_workers=2, **kw), 7) == ref
    resumed = make_train_loader(ds, split, **kw)
    got = [(b.labeled_ids, b.unlabeled_ids, float(b.labeled_image.sum()), float(b.unlabeled_image.sum()))
           for _, b in zip(range(3), resumed.forever(start_step=4))]
    assert got == ref[4:7]
    other = _fingerprint(make_train_loader(ds, split, **{**kw, "seed": 4}), 7)
    assert other != ref


def test_epochs_differ():
    ds = load(TINY_SPEC["la"])
    loader = make_train_loader(ds, ds.split(labeled=2), patch_size=16, labeled_bs=1, unlabeled_bs=1)
    e0 = [float(b.labeled_image.sum()) for b in loader]
    e1 = [float(b.labeled_image.sum()) for b in loader]
    assert loader.epoch == 2 and e0 != e1


def test_eval_volumes_carry_ids_and_spacing(synthetic_roots):
    ds = load(synthetic_roots["acdc"])
    split = ds.split(labeled=2)
    vols = list(make_eval_loader(ds, split.test_cases))
    assert len(vols) == 2 * len(split.test_cases)
    v = vols[0]
    assert v.image.ndim == 4 and v.label.shape == v.image.shape[1:]
    assert v.case_id in split.test_cases and v.volume_id.startswith(v.case_id)
    assert v.spacing == (10.0, 1.5, 1.5) and v.affine is None


def test_loader_argument_errors():
    ds = load(TINY_SPEC["acdc"])
    split = ds.split(labeled=2)
    with pytest.raises(ValueError, match="patch_size must be 2 positive ints, got \\(24, 24, 24\\)"):
        make_train_loader(ds, split, patch_size=(24, 24, 24), labeled_bs=2, unlabeled_bs=2)
    with pytest.raises(ValueError, match="strong_views must be 1 or 2, got 3"):
        make_train_loader(ds, split, patch_size=24, labeled_bs=2, unlabeled_bs=2, strong_views=3)
    with pytest.raises(TypeError, match="split must be a sslseg.data.Split"):
        make_train_loader(ds, {"labeled_cases": []}, patch_size=24, labeled_bs=2, unlabeled_bs=2)


def test_distributed_ranks_see_disjoint_labeled_samples():
    ds = load(TINY_SPEC["acdc"])
    split = ds.split(labeled=4, seed=0)
    ids = []
    for rank in range(2):
        loader = make_train_loader(ds, split, patch_size=24, labeled_bs=2, unlabeled_bs=1, distributed=(2, rank))
        ids.append({i for b in loader for i in b.labeled_ids})
    assert ids[0] and ids[1] and not ids[0] & ids[1]


@pytest.mark.parametrize("device", devices())
def test_batch_moves_to_device(device):
    ds = load(TINY_SPEC["la"])
    loader = make_train_loader(ds, ds.split(labeled=2), patch_size=16, labeled_bs=1, unlabeled_bs=1,
                               pin_memory=device == "cuda")
    b = next(iter(loader)).to(device)
    assert b.labeled_image.device.type == device and b.unlabeled_image.device.type == device
    assert b.labeled_label.dtype == torch.int64 and b.labeled_ids
