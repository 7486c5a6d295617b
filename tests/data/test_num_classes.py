"""The class count of an SSL4MIS layout is checked against the labels, and can be given."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

import sslseg.data
from sslseg.data import DataError, make_synthetic
from sslseg.data.storage import H5Volume


def _acdc(root: Path, classes: int) -> Path:
    """A tiny ACDC-layout folder whose labels hold ``classes`` classes (the top ones merged down)."""
    make_synthetic("acdc", root, num_cases=10, size=32, slices=3)
    for path in sorted((root / "data").rglob("*.h5")):
        with h5py.File(path, "r+") as f:
            label = np.minimum(f["label"][()], classes - 1)
            del f["label"]
            f.create_dataset("label", data=label)
    return root


def _count_reads(monkeypatch) -> list[str]:
    reads: list[str] = []
    real = H5Volume.read

    def spy(self, *args, **kwargs):
        reads.append(self.location)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(H5Volume, "read", spy)
    return reads


def test_three_class_acdc_layout_is_refused_without_a_count(tmp_path):
    root = _acdc(tmp_path / "acdc3", 3)
    with pytest.raises(DataError, match=r"default is 4 classes.*largest value is 2 \(3 classes\).*num_classes=3"):
        sslseg.data.load(root).num_classes


def test_given_count_is_used(tmp_path):
    root = _acdc(tmp_path / "acdc3", 3)
    ds = sslseg.data.load(root, num_classes=3)
    assert ds.num_classes == 3 and len(ds.class_names) == 3


def test_four_class_layout_passes_and_the_scan_is_cached(tmp_path, monkeypatch):
    root = _acdc(tmp_path / "acdc4", 4)
    reads = _count_reads(monkeypatch)
    assert sslseg.data.load(root).num_classes == 4
    assert reads  # the first time, the labels are read
    reads.clear()
    assert sslseg.data.load(root).num_classes == 4
    assert reads == []  # then the cache (keyed by size and mtime) answers
    # A changed file is read again: here it loses class 3 everywhere, so the count no longer fits.
    for path in sorted((root / "data").rglob("*.h5")):
        with h5py.File(path, "r+") as f:
            label = np.minimum(f["label"][()], 2)
            del f["label"]
            f.create_dataset("label", data=label)
    with pytest.raises(DataError, match="num_classes=3"):
        sslseg.data.load(root).num_classes
    assert reads


def test_cli_sets_num_classes(tmp_path, capsys):
    from sslseg.app.cli import main

    root = _acdc(tmp_path / "acdc3", 3)
    common = ["fit", "supervised", "--data", str(root), "--labeled", "2", "--iterations", "1",
              "--set", "patch_size=[32,32]", "--set", "batch_size=2", "--set", "val_cases=1", "--set", "progress=false"]
    assert main([*common, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "num_classes=3" in err and "Traceback" not in err
    assert main([*common, "--set", "num_classes=3", "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    per_class = metrics["best_val"]["dice_per_class"]
    assert len(per_class) == 2  # two foreground classes, no empty third one scored as Dice 1
