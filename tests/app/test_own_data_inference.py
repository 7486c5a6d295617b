"""One preprocessing for training, evaluation, inference: `infer` on a dataset's own files gives exactly
the label maps `evaluate` scores, on every layout; planned models predict on the scan's own grid."""

from __future__ import annotations

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

import sslseg
import sslseg.metrics
from sslseg.data import load, make_synthetic, plan, preprocess
from sslseg.data.fingerprint import read_raw
from sslseg.data.resample import resample_image, resample_label
from sslseg.data.storage import NiftiVolume
from sslseg.inference import Preprocessing, predict_volume
from sslseg.metrics import segmentation_metrics

ENGINE_2D = dict(batch_size=4, labeled_bs=2, val_every=2, log_every=1, patch_size=[32, 32], progress=False,
                 model_options=dict(channels=[4, 8], dropout=[0.0, 0.0]))
ENGINE_3D = dict(batch_size=2, val_every=2, log_every=1, progress=False, model_options=dict(channels=[4, 8]))
CT_SPEC = "synthetic:ct?cases=4&unlabeled=1&test=2&size=32"
CT_BIG = "synthetic:ct?cases=4&unlabeled=0&test=3&size=48"


def _scale_h5_images(root, factor: float) -> None:
    """Slabs of a larger normalised scan: every stored image scaled, so none spans [0, 1] any more."""
    for path in sorted(root.rglob("*.h5")):
        with h5py.File(path, "r+") as f:
            f["image"][...] = f["image"][...] * factor


def _evaluated_predictions(monkeypatch, run_dir) -> dict[str, torch.Tensor]:
    """Run `sslseg.evaluate` on the run's test split and capture the label maps it scores."""
    scored: list[torch.Tensor] = []
    real = sslseg.metrics.segmentation_metrics

    def capture(pred, target, *args, **kwargs):
        scored.append(pred.clone())
        return real(pred, target, *args, **kwargs)

    monkeypatch.setattr(sslseg.metrics, "segmentation_metrics", capture)
    result = sslseg.evaluate(run_dir, split="test", out=False)
    monkeypatch.setattr(sslseg.metrics, "segmentation_metrics", real)
    volume_ids = list(dict.fromkeys(r["volume_id"] for r in result.rows))
    assert len(volume_ids) == len(scored) > 0
    return dict(zip(volume_ids, scored))


def _read_output(path) -> np.ndarray:
    if path.name.endswith(".h5"):
        with h5py.File(path, "r") as f:
            return np.asarray(f["label"], dtype=np.int64)
    image, _ = NiftiVolume(id="p", case="p", image_paths=[path], intensity="none").read(with_label=False)
    return image[0].astype(np.int64)


def _layout(kind: str, tmp_path) -> tuple[str, dict]:
    if kind == "acdc_h5":
        root = make_synthetic("acdc", tmp_path / "acdc", num_cases=10, size=32, slices=2)
        _scale_h5_images(root, 0.92)  # image max 0.92: a min-max renormalisation would change the input
        return str(root), ENGINE_2D
    if kind in ("la_h5", "brats_h5"):
        root = make_synthetic(kind[:-3], tmp_path / kind, num_cases=5, size=32)
        return str(root), dict(ENGINE_3D, patch_size=[16, 16, 16])
    if kind == "nifti":
        return str(make_synthetic("la", tmp_path / "nifti", num_cases=5, size=32, layout="nifti")), ENGINE_3D
    if kind == "nifti_no_plan":
        root = make_synthetic("la", tmp_path / "nifti", num_cases=5, size=32, layout="nifti")
        return str(root), dict(ENGINE_3D, patch_size=[16, 16, 16], use_plan=False)
    return CT_SPEC, ENGINE_3D


@pytest.mark.parametrize("kind", ["acdc_h5", "la_h5", "brats_h5", "nifti", "nifti_no_plan", "synthetic_ct"])
def test_infer_on_own_files_equals_evaluate(kind, tmp_path, monkeypatch):
    data, options = _layout(kind, tmp_path)
    run = sslseg.fit("supervised", data, labeled=2, iterations=2, out_dir=tmp_path / "run", engine_options=options)
    planned = kind in ("nifti", "synthetic_ct")
    assert (run.record["plan"] is not None) == planned
    assert (run.dir / "plan.json").is_file() == planned
    if kind.endswith("_h5"):
        assert run.record["intensity"] == "none"  # stored normalised: what training saw, as it is
    scored = _evaluated_predictions(monkeypatch, run.dir)
    ds = load(data)
    files = [ds.raw_record(v).location for v in scored]
    # evaluate scores in float32 by default; infer in the default precision (bf16 where native):
    # the same precision on both sides, so the comparison is of the preprocessing paths alone.
    written = sslseg.infer(run.dir, files, tmp_path / "pred", amp="none")
    assert len(written) == len(scored)
    for (vid, expected), path in zip(scored.items(), written):
        got = _read_output(path)
        assert got.shape == tuple(expected.shape), vid
        assert np.array_equal(got, expected.numpy()), f"{kind}: infer and evaluate disagree on {vid}"


# ---- planned models on scans of any spacing --------------------------------------------------------------


class _IntensityBayes(nn.Module):
    """A deterministic stand-in network: the log likelihood of the voxel's locally averaged
    normalised intensity under each class, from a histogram of the training volumes (an intensity-only
    classifier: what it gets right depends on the grid it sees, not on learned shapes)."""

    def __init__(self, edges: torch.Tensor, log_likelihood: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("edges", edges)
        self.register_buffer("table", log_likelihood)  # (bins, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        smooth = torch.nn.functional.avg_pool3d(x[:, :1], 3, stride=1, padding=1, count_include_pad=False)
        idx = torch.bucketize(smooth[:, 0].contiguous(), self.edges).clamp(0, self.table.shape[0] - 1)
        return self.table[idx].permute(0, 4, 1, 2, 3)


@pytest.fixture(scope="module")
def ct_model(tmp_path_factory):
    """The synthetic:ct plan and an intensity-histogram stand-in fitted on its cached training volumes."""
    p = plan(CT_BIG)
    folder = preprocess(CT_BIG, p, out=tmp_path_factory.mktemp("cache"))
    ds = load(CT_BIG).prepare(p, out=folder)
    edges = torch.linspace(-4, 4, 81)
    counts = torch.ones(len(edges) + 1, p.num_classes)  # +1: a uniform prior in empty bins
    for vid in ds.volume_ids:
        if not ds.record(vid).has_label:
            continue
        image, label = ds.record(vid).read()
        smooth = torch.nn.functional.avg_pool3d(torch.from_numpy(image)[None], 3, stride=1, padding=1,
                                                count_include_pad=False)[0, 0]
        idx = torch.bucketize(smooth.contiguous(), edges)
        counts.index_put_((idx.flatten(), torch.from_numpy(label).flatten()), torch.ones(idx.numel()), accumulate=True)
    # Likelihoods (a uniform class prior): the background's many voxels would otherwise win every bin.
    net = _IntensityBayes(edges, (counts / counts.sum(0, keepdim=True)).log()).eval()
    record = {"dim": 3, "patch_size": [16, 32, 32], "in_channels": 1, "num_classes": p.num_classes,
              "plan": p.to_dict(), "intensity": "none"}
    return net, record, load(CT_BIG)


def _test_case(ds, i: int = 0):
    vid = [v for v in ds.volume_ids if v in set(ds.volumes_of(ds.split().test_cases[i]))][0]
    return read_raw(ds.raw_record(vid), ds.num_classes) + (ds.raw_record(vid),)


def test_planned_prediction_has_the_scan_geometry(ct_model, tmp_path):
    net, record, ds = ct_model
    image, label, spacing, rec = _test_case(ds)
    assert max(spacing) / min(spacing) > 1.5  # an anisotropic scan, unlike the plan's grid
    pre = Preprocessing.from_record(record)
    prepared = pre.prepare(torch.from_numpy(image), spacing)
    assert prepared.changes_grid and tuple(prepared.image.shape[1:]) != tuple(image.shape[1:])
    labels = predict_volume(net, torch.from_numpy(image), dim=3, patch_size=record["patch_size"], preprocessing=pre,
                            spacing=spacing)
    assert labels.shape == label.shape and labels.dtype == torch.int64
    probs = predict_volume(net, torch.from_numpy(image), dim=3, patch_size=record["patch_size"], preprocessing=pre,
                           spacing=spacing, output="probs")
    assert probs.shape == (record["num_classes"], *label.shape)
    assert torch.allclose(probs.sum(0), torch.ones(()), atol=1e-4) and torch.equal(probs.argmax(0), labels)
    # Files: written on the input's grid with its affine, through the same path.
    src = rec.location
    out = sslseg.infer(net, src, tmp_path / "p", record=record)[0]
    ref, got = nib.load(src), nib.load(out)
    assert got.shape == ref.shape and np.allclose(got.affine, ref.affine)
    assert np.array_equal(_read_output(out), labels.numpy())
    # The array path needs the spacing a planned model resamples from.
    with pytest.raises(ValueError, match="spacing"):
        sslseg.infer(net, image, record=record)
    with pytest.raises(ValueError, match="trained with a plan"):
        sslseg.infer(net, image, record=record, spacing=spacing, intensity="zscore")


def test_uncropped_outside_the_nonzero_box_is_background(ct_model):
    net, record, _ = ct_model
    rng = np.random.default_rng(0)
    image = np.zeros((1, 12, 40, 40), np.float32)
    image[:, 2:10, 5:30, 8:36] = rng.normal(100, 30, (1, 8, 25, 28))
    labels = sslseg.infer(net, image, record=record, spacing=(3.0, 0.7, 0.7))
    assert labels.shape == (12, 40, 40)
    outside = np.ones((12, 40, 40), bool)
    outside[2:10, 5:30, 8:36] = False
    assert int(labels[torch.from_numpy(outside)].max()) == 0


def _dice(pred: torch.Tensor, label: np.ndarray, spacing, num_classes: int) -> float:
    scores = segmentation_metrics(pred, torch.from_numpy(label.astype(np.int64)), list(spacing), metrics=("dice",),
                                  num_classes=num_classes, empty_policy="nan")
    return float(torch.nanmean(scores["dice"].value))


def test_resampled_scans_get_the_native_dice(ct_model):
    """A scan resampled to 0.6x and 1.7x its spacing, scored against the equally resampled labels,
    gets about the Dice of the native scan: the plan maps every spacing onto the training grid."""
    net, record, ds = ct_model
    pre = Preprocessing.from_record(record)
    dices: dict[float, list[float]] = {1.0: [], 0.6: [], 1.7: []}
    for i in range(len(ds.split().test_cases)):
        image, label, spacing, _ = _test_case(ds, i)
        for factor in dices:
            new_sp = tuple(s * factor for s in spacing)
            img = resample_image(image, spacing, new_sp) if factor != 1.0 else image
            lab = resample_label(label, spacing, new_sp, mode="nearest") if factor != 1.0 else label
            pred = predict_volume(net, torch.from_numpy(img), dim=3, patch_size=record["patch_size"],
                                  preprocessing=pre, spacing=new_sp)
            assert pred.shape == lab.shape
            dices[factor].append(_dice(pred, lab, new_sp, record["num_classes"]))
    native = float(np.mean(dices[1.0]))
    # The intensity-only stand-in finds part of the organs (about 0.18); a prediction that the mapping
    # back to the scan's grid misplaced would lose much of it (flipped: about half, shifted 4 voxels: a third).
    assert native > 0.1, dices
    for factor in (0.6, 1.7):
        assert abs(float(np.mean(dices[factor])) - native) < 0.03, (factor, dices)


def test_files_that_store_no_spacing_take_the_spacing_argument(ct_model, tmp_path):
    net, record, ds = ct_model
    image, _, spacing, _ = _test_case(ds)
    np.save(tmp_path / "scan.npy", image)
    with pytest.raises(ValueError, match="spacing"):
        sslseg.infer(net, tmp_path / "scan.npy", tmp_path / "o", record=record)
    out = sslseg.infer(net, tmp_path / "scan.npy", tmp_path / "o", record=record, spacing=spacing)[0]
    expected = predict_volume(net, torch.from_numpy(image), dim=3, patch_size=record["patch_size"],
                              preprocessing=Preprocessing.from_record(record), spacing=spacing)
    np.testing.assert_array_equal(np.load(out), expected.numpy())
