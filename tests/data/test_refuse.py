"""Bad data is refused before training: out-of-range labels, NaN pixels, unreadable files, with the
file named; ``sslseg fit`` exits 2 with one line; the up-front check is cached by path, size, mtime."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import sslseg
from sslseg.data import load, make_synthetic
from sslseg.data.errors import DataError
from sslseg.data.validate import check_cases
from sslseg.engine import EngineConfig, Trainer


@pytest.fixture()
def acdc_root(tmp_path) -> Path:
    return make_synthetic("acdc", tmp_path / "acdc", num_cases=10, size=32, slices=3)


def _training_slices(root: Path) -> list[Path]:
    return sorted((root / "data" / "slices").glob("*.h5"))


def _edit(path: Path, key: str, edit) -> None:
    with h5py.File(path, "r+") as f:
        array = f[key][()]
        edit(array)
        del f[key]
        f.create_dataset(key, data=array)


def _trainer(root: Path, tmp_path: Path, **engine) -> Trainer:
    eng = EngineConfig(data=str(root), labeled=2, iterations=2, batch_size=2, val_every=2, progress=False,
                       tensorboard=False, quiet=True, **engine)
    return Trainer("mean_teacher", eng, out_dir=tmp_path / "run")


def test_label_out_of_range_is_refused_before_training(acdc_root, tmp_path, monkeypatch):
    bad = _training_slices(acdc_root)[-1]

    def nine(label):
        label[0, 0] = 9

    _edit(bad, "label", nine)
    with pytest.raises(DataError, match=rf"{bad.name}: label values \[9\] outside \[0, 4\)"):
        _trainer(acdc_root, tmp_path)
    # Refused while the trainer was being built: no run directory, nothing trained.
    assert not (tmp_path / "run").exists()


def test_nan_pixels_are_refused_before_step_one(acdc_root, tmp_path, monkeypatch):
    # The last slice of the last training volume: a short run would likely never draw it.
    bad = _training_slices(acdc_root)[-1]

    def nan(image):
        image[3, 4] = np.nan

    _edit(bad, "image", nan)
    steps = []
    monkeypatch.setattr(sslseg.methods.get_method("mean_teacher"), "step",
                        lambda self, batch, ctx: steps.append(ctx.step))
    with pytest.raises(DataError, match=rf"{bad.name}: image has 1 NaN/Inf value\(s\)"):
        _trainer(acdc_root, tmp_path).run()
    assert steps == []


def test_unreadable_file_is_named(acdc_root, tmp_path):
    bad = _training_slices(acdc_root)[0]
    bad.write_bytes(b"not an h5 file at all")
    with pytest.raises(DataError, match=rf"{bad.name}: unreadable h5 file"):
        _trainer(acdc_root, tmp_path)


def test_shape_mismatch_is_named(acdc_root, tmp_path):
    bad = _training_slices(acdc_root)[1]
    with h5py.File(bad, "r+") as f:
        label = f["label"][()]
        del f["label"]
        f.create_dataset("label", data=label[:-2])
    with pytest.raises(DataError, match=rf"{bad.name}: .*does not match label shape"):
        _trainer(acdc_root, tmp_path)


def test_fit_cli_exits_2_with_one_line(acdc_root, tmp_path):
    bad = _training_slices(acdc_root)[2]

    def nine(label):
        label[1, 1] = 9

    _edit(bad, "label", nine)
    env = dict(os.environ, OMP_NUM_THREADS="1", SSLSEG_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "sslseg", "fit", "mean_teacher", "--data", str(acdc_root), "--labeled", "2",
         "--iterations", "2", "--set", "batch_size=2", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("sslseg fit: error: ") and str(bad) in lines[0] and "outside [0, 4)" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "history.jsonl").exists()


def test_every_problem_is_counted_in_the_one_line(acdc_root):
    slices = _training_slices(acdc_root)

    def nine(label):
        label[0, 0] = 9

    for path in slices[:3]:
        _edit(path, "label", nine)
    ds = load(str(acdc_root))
    with pytest.raises(DataError, match=r"\(and 2 more problem\(s\); `sslseg data check .*` lists them all\)") as info:
        check_cases(ds, ds.cases)
    assert "\n" not in str(info.value)


def test_cache_makes_the_second_check_read_nothing(acdc_root, monkeypatch):
    monkeypatch.setenv("SSLSEG_CACHE", str(acdc_root.parent / "cache"))
    opened: list[str] = []
    real = h5py.File

    def counting(path, *args, **kwargs):
        opened.append(str(path))
        return real(path, *args, **kwargs)

    ds = load(str(acdc_root))
    cases = ds.official["train"] + ds.official["val"]
    assert ds.num_classes == 4  # resolved (and any label scan done) before counting
    monkeypatch.setattr(h5py, "File", counting)
    first = check_cases(ds, cases)
    assert first > 0 and len(opened) == first
    opened.clear()
    assert check_cases(ds, cases) == 0 and opened == []
    # A changed file (size or mtime) is read again, and only the volume it belongs to.
    bad = _training_slices(acdc_root)[0]
    monkeypatch.setattr(h5py, "File", real)

    def nan(image):
        image[0, 0] = np.inf

    _edit(bad, "image", nan)
    monkeypatch.setattr(h5py, "File", counting)
    with pytest.raises(DataError, match=rf"{bad.name}: image has 1 NaN/Inf"):
        check_cases(ds, cases)
    assert bad.as_posix() in opened and len(opened) < first
    # A bad verdict is cached too: refused again without reading.
    opened.clear()
    with pytest.raises(DataError, match=bad.name):
        check_cases(ds, cases)
    assert opened == []


def test_in_memory_data_is_checked(monkeypatch):
    ds = load("synthetic:acdc?cases=6&size=16&slices=2")
    vid = ds.volume_ids[0]
    rec = ds.raw_record(vid)
    label = np.array(rec.label)
    label[0, 0, 0] = 7
    monkeypatch.setattr(rec, "label", label)
    with pytest.raises(DataError, match=rf"<memory:{vid}>: label values \[7\] outside \[0, 4\)"):
        check_cases(ds, [rec.case])


def test_evaluate_refuses_a_bad_test_volume_before_scoring(acdc_root, tmp_path, monkeypatch):
    import sslseg.inference.predict

    run = sslseg.fit("supervised", str(acdc_root), labeled=2, iterations=1, out_dir=tmp_path / "run",
                     engine_options=dict(batch_size=2, val_every=1, progress=False, tensorboard=False, quiet=True,
                                         patch_size=[32, 32]))
    ds = load(str(acdc_root))
    test_cases = ds.load_split(run.dir / "split.json").test_cases
    bad = Path(ds.raw_record(ds.volumes_of(test_cases[-1])[0]).path)

    def nine(label):
        label[0, 0, 0] = 9

    _edit(bad, "label", nine)
    predicted = []
    original = sslseg.inference.predict.predict_volume
    monkeypatch.setattr(sslseg.inference.predict, "predict_volume",
                        lambda *a, **k: predicted.append(1) or original(*a, **k))
    with pytest.raises(DataError, match=rf"{bad.name}: label values \[9\] outside \[0, 4\)"):
        sslseg.evaluate(run.dir, split="test")
    assert predicted == []  # refused before the first case was scored
