"""sslseg.evaluate / `sslseg evaluate`, and engine validation on sslseg.metrics."""

from __future__ import annotations

import csv
import json
import math

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import sslseg
from sslseg.app.cli import main
from sslseg.data import DataError, load, make_synthetic
from sslseg.engine.validation import validate
from sslseg.app.evaluate import EvaluationResult, evaluate
from sslseg.metrics import image_diagonal

ACDC = "synthetic:acdc?cases=6&slices=2&size=32"
ENGINE = dict(batch_size=4, labeled_bs=2, val_every=2, log_every=1, patch_size=[32, 32], progress=False)
GEOMETRY_2D = {"dim": 2, "patch_size": [32, 32]}


class _Constant(nn.Module):
    """Fixed logits that predict class ``winner`` everywhere (background by default)."""

    def __init__(self, classes: int, winner: int = 0) -> None:
        super().__init__()
        self.classes, self.winner = classes, winner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], self.classes, *x.shape[2:])
        out[:, self.winner] = 1.0
        return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return sslseg.fit("supervised", ACDC, labeled=2, iterations=2, out_dir=tmp_path_factory.mktemp("run"),
                      engine_options=ENGINE)


@pytest.fixture()
def h5_root(tmp_path):
    """The tiny ACDC phantom written as SSL4MIS h5 files (with a stored spacing attribute)."""
    return make_synthetic("acdc", tmp_path / "acdc", num_cases=6, size=32, slices=2)


def _test_volumes(ds) -> list[str]:
    return [v for c in ds.split().test_cases for v in ds.volumes_of(c)]


def test_evaluate_run_rows_summary_and_files(run):
    res = evaluate(run)
    ds = load(ACDC)
    test_cases = json.loads((run.dir / "split.json").read_text())["test_cases"]
    volumes = [v for c in test_cases for v in ds.volumes_of(c)]
    assert len(res.rows) == len(volumes) * (ds.num_classes - 1)
    assert res.settings["cases"] == test_cases and res.settings["volumes"] == len(volumes)
    assert res.settings["units"] == "mm" and res.settings["empty_policy"] == "penalty"
    assert res.settings["checkpoint"] == str(run.dir / "best_val.pt")
    for name, per in res.summary["per_class"].items():
        for m in ("dice", "jaccard", "hd95", "asd"):
            values = [r[m] for r in res.rows if r["class_name"] == name]
            assert per[m]["n"] == len(values)
            assert per[m]["mean"] == pytest.approx(np.mean(values))
            assert per[m]["std"] == pytest.approx(np.std(values))
    per_volume = [np.mean([r["dice"] for r in res.rows if r["volume_id"] == v]) for v in volumes]
    assert res.summary["overall"]["dice"]["mean"] == pytest.approx(np.mean(per_volume))
    assert res.summary["overall"]["dice"]["mean"] == pytest.approx(np.mean([r["dice"] for r in res.rows]))

    # Written into the run directory, atomically, and readable back.
    csv_path, json_path = run.dir / "evaluation_test.csv", run.dir / "evaluation_test.json"
    assert res.files == [csv_path, json_path]
    with open(csv_path, newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(res.rows)
    assert [float(r["hd95"]) for r in table] == [r["hd95"] for r in res.rows]
    assert table[0]["pred_empty"] in ("True", "False")
    doc = json.loads(json_path.read_text())
    assert doc["settings"]["units"] == "mm" and doc["empty"]["total"] == res.empty["total"]
    back = EvaluationResult.load(json_path)
    assert back.rows == res.rows and back.summary == res.summary and back.settings == res.settings
    assert "| **mean** |" in res.table() and "HD95 (mm)" in res.table()
    assert repr(res).startswith("EvaluationResult(split='test'")


def test_evaluate_run_dir_model_file_and_tta(run, tmp_path):
    by_dir = evaluate(str(run.dir), split="val", out=tmp_path)
    assert [p.name for p in by_dir.files] == ["evaluation_val.csv", "evaluation_val.json"]
    assert by_dir.settings["split_source"].endswith("split.json")
    by_file = evaluate(run.dir / "best_val.pt", split="val", tta=True)  # a model file: nothing written
    assert by_file.files == [] and by_file.settings["tta"] and by_file.settings["tta_passes"] == 4
    assert len(by_file.rows) == len(by_dir.rows)
    chosen = evaluate(run, cases=["patient001"], out=False, metrics=("dice",))
    assert {r["case"] for r in chosen.rows} == {"patient001"} and chosen.settings["split"] == "cases"
    assert set(chosen.rows[0]) == {"case", "volume_id", "class", "class_name", "dice", "pred_empty", "gt_empty"}


def test_evaluate_the_last_weights_as_well_as_best_val(run, tmp_path):
    import torch

    assert (run.dir / "last_model.pt").is_file()
    last = evaluate(run.dir, split="val", checkpoint="last", out=tmp_path)
    assert [p.name for p in last.files] == ["evaluation_val_last.csv", "evaluation_val_last.json"]
    assert last.settings["checkpoint"].endswith("last_model.pt") and last.settings["checkpoint_kind"] == "last"
    # last_model.pt holds the final weights: those of the eval network when training ended.
    final = torch.load(run.dir / "last.pt", weights_only=True)["networks"]
    saved = torch.load(run.dir / "last_model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(saved[k], v) for net in final.values() for k, v in net.items() if k in saved)
    with pytest.raises(ValueError, match="checkpoint must be one of"):
        evaluate(run.dir, split="val", checkpoint="final", out=False)


@pytest.mark.parametrize("policy", ["penalty", "nan", "zero"])
def test_empty_policies_score_the_empty_classes(policy):
    # Class 4 exists in no label (both empty); the model predicts background only (one empty where
    # the ground truth has the class).
    ds = load(ACDC, num_classes=5)
    res = evaluate(_Constant(5), ds, record=GEOMETRY_2D, empty_policy=policy)
    shapes = {v: ds.read_volume(v).label.shape for v in _test_volumes(ds)}
    for r in res.rows:
        assert r["pred_empty"]
        diagonal = image_diagonal(shapes[r["volume_id"]], ds.volume_spacing(r["volume_id"]))
        if policy == "nan":
            assert all(math.isnan(r[m]) for m in ("dice", "jaccard", "hd95", "asd"))
        elif policy == "zero":
            assert all(r[m] == 0.0 for m in ("dice", "jaccard", "hd95", "asd"))
        elif r["gt_empty"]:
            assert (r["dice"], r["jaccard"], r["hd95"], r["asd"]) == (1.0, 1.0, 0.0, 0.0)
        else:
            assert (r["dice"], r["jaccard"]) == (0.0, 0.0)
            assert r["hd95"] == pytest.approx(diagonal) and r["asd"] == pytest.approx(diagonal)
    n = len(shapes)
    assert res.empty["per_class"]["class4"] == {"both_empty": n, "one_empty": 0, "pred_empty_only": 0,
                                                "gt_empty_only": 0}
    assert res.empty["total"]["pred_empty_only"] == sum(not r["gt_empty"] for r in res.rows)
    assert res.settings["empty_policy"] == policy
    overall = res.summary["overall"]["dice"]
    if policy == "nan":
        assert overall["n"] == 0 and math.isnan(overall["mean"]) and "n/a (n=0)" in res.table()
    else:
        assert overall["n"] == n


@pytest.mark.filterwarnings("ignore:.*store no voxel spacing:UserWarning")
def test_units_are_voxels_without_stored_spacing_and_mm_with_the_argument(h5_root):
    for path in (h5_root / "data").glob("*.h5"):
        with h5py.File(path, "a") as f:
            del f.attrs["spacing"]
    ds = load(h5_root)
    vid = _test_volumes(ds)[0]
    shape = ds.read_volume(vid).label.shape
    voxels = evaluate(_Constant(4), ds, record=GEOMETRY_2D, metrics=("dice", "hd95"))
    assert voxels.settings["units"] == "voxels" and "voxels" in voxels.settings["spacing_source"]
    assert "HD95 (voxels)" in voxels.table()
    row = next(r for r in voxels.rows if r["volume_id"] == vid and not r["gt_empty"])
    assert row["hd95"] == pytest.approx(image_diagonal(shape, (1.0, 1.0, 1.0)))
    mm = evaluate(_Constant(4), ds, record=GEOMETRY_2D, metrics=("dice", "hd95"), spacing=(10, 1.5, 1.5))
    assert mm.settings["units"] == "mm" and mm.settings["spacing"] == [10.0, 1.5, 1.5]
    row = next(r for r in mm.rows if r["volume_id"] == vid and not r["gt_empty"])
    assert row["hd95"] == pytest.approx(image_diagonal(shape, (10.0, 1.5, 1.5)))


def test_3d_network_through_the_sliding_window():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1)).eval()
    ds = load("synthetic:la?cases=4&size=32")
    res = evaluate(net, ds, dim=3, patch_size=[16, 16, 16], tta=True, batch_size=2)
    assert len(res.rows) == len(_test_volumes(ds)) and res.settings["tta_passes"] == 8
    assert res.settings["units"] == "mm" and res.settings["overlap"] == 0.5
    assert 0.0 <= res.summary["overall"]["dice"]["mean"] <= 1.0


def test_cli_evaluate(run, tmp_path, capsys):
    assert main(["evaluate", str(run.dir), "--split", "val", "--empty-policy", "zero", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| **mean** |" in printed and f"wrote {tmp_path / 'evaluation_val.json'}" in printed
    doc = json.loads((tmp_path / "evaluation_val.json").read_text())
    assert doc["settings"]["empty_policy"] == "zero" and doc["settings"]["split"] == "val"
    bad = tmp_path / "best_val.pt"
    bad.write_text("not a model")
    assert main(["evaluate", str(bad)]) == 2
    assert "cannot be read as an sslseg model file" in capsys.readouterr().err


def test_model_files_that_cannot_be_used(run, tmp_path):
    text = tmp_path / "text" / "best_val.pt"
    text.parent.mkdir()
    text.write_text("hello")
    with pytest.raises(ValueError, match="cannot be read as an sslseg model file"):
        evaluate(text)
    ckpt = torch.load(run.dir / "best_val.pt", weights_only=True)
    ckpt["format"] = "sslseg-model/99"
    future = tmp_path / "future.pt"
    torch.save(ckpt, future)
    with pytest.raises(ValueError, match=r"model file format 'sslseg-model/99', written by sslseg 0\.1\.0"):
        evaluate(future)
    with pytest.raises(ValueError, match="sslseg-train-state/1"):
        evaluate(run.dir / "last.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="no best_val.pt"):
        evaluate(tmp_path)


def test_data_that_does_not_fit_the_model(run):
    with pytest.raises(ValueError, match="the model predicts 4 classes, dataset .* has 5"):
        evaluate(run, load(ACDC, num_classes=5), out=False)
    with pytest.raises(ValueError, match=r"takes 2 input channel\(s\), dataset .* has 1"):
        evaluate(_Constant(4), ACDC, record={**GEOMETRY_2D, "in_channels": 2})
    wrong_channels = _Constant(4)
    wrong_channels.in_channels = 3
    with pytest.raises(ValueError, match=r"has 1 channel\(s\).*the model takes 3"):
        evaluate(wrong_channels, ACDC, **GEOMETRY_2D)
    with pytest.raises(ValueError, match="dim must be 2 or 3, got 4"):
        evaluate(_Constant(4), ACDC, dim=4, patch_size=[32, 32])
    with pytest.raises(ValueError, match="needs its geometry"):
        evaluate(_Constant(4), ACDC)


def test_nan_and_unreadable_volumes_are_named(h5_root):
    ds = load(h5_root)
    first = _test_volumes(ds)[0]
    with h5py.File(h5_root / "data" / f"{first}.h5", "a") as f:
        f["image"][0, 0, 0] = np.nan
    # Refused by the up-front check of the cases to score, which names the file.
    with pytest.raises(DataError, match=rf"{first}\.h5: image has 1 NaN/Inf value"):
        evaluate(_Constant(4), ds, record=GEOMETRY_2D)
    (h5_root / "data" / f"{first}.h5").write_text("garbage")
    with pytest.raises(DataError, match=rf"{first}\.h5: .*(unreadable|not an HDF5)"):
        evaluate(_Constant(4), ds, record=GEOMETRY_2D)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"split": "tests"}, ValueError, "did you mean 'test'"),
    ({"empty_policy": "none"}, ValueError, "unknown empty_policy 'none'"),
    ({"spacing": (1.0, 2.0)}, ValueError, r"spacing must be three positive numbers"),
    ({"spacing": (1.0, 0.0, 1.0)}, ValueError, r"spacing must be three positive numbers"),
    ({"metrics": ("dice", "hd99")}, ValueError, "unknown metric 'hd99'"),
    ({"batch_size": 0}, ValueError, "batch_size must be a positive int"),
    ({"tta": "yes"}, TypeError, "tta must be True or False"),
    ({"cases": ["patient999"]}, ValueError, "unknown case of"),
    ({"out": True}, ValueError, "out must be a folder path"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        evaluate(_Constant(4), ACDC, record=GEOMETRY_2D, **kwargs)


def test_bad_model_argument():
    with pytest.raises(TypeError, match="model must be a Run, a run directory"):
        evaluate(42, ACDC)


def test_validate_uses_the_metrics_with_the_penalty_policy():
    ds = load(ACDC)
    volumes = list(ds.iter_volumes(ds.split().val_cases))
    result = validate(_Constant(4), volumes, dim=2, patch_size=[32, 32], num_classes=4, device=torch.device("cpu"))
    assert result["cases"] == len(volumes)
    assert result["dice"] == 0.0 and result["dice_per_class"] == [0.0, 0.0, 0.0]  # every class is in every label
    diagonals = [image_diagonal(v.label.shape, v.spacing) for v in volumes]
    assert result["hd95"] == pytest.approx(np.mean(diagonals)) and result["asd"] == pytest.approx(np.mean(diagonals))
    assert len(result["hd95_per_class"]) == 3
    with pytest.raises(ValueError, match="must include 'dice'"):
        validate(_Constant(4), volumes, dim=2, patch_size=[32, 32], num_classes=4, device=torch.device("cpu"),
                 metrics=("hd95",))
