"""Run logging: history.jsonl, TensorBoard scalars and overlays, progress.png."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from sslseg.engine import fit
from sslseg.engine.logger import CLASS_COLOURS, label_overlay, use_tensorboard

TINY = "synthetic:acdc?cases=6&slices=2&size=32"
OPTS = dict(batch_size=4, labeled_bs=2, val_every=2, val_cases=1, log_every=1, patch_size=[32, 32], progress=False,
            model_options={"channels": [4, 8, 16, 32, 64]})


def _events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_tensorboard_scalars_and_overlays(tmp_path):
    run = fit("mean_teacher", TINY, labeled=2, iterations=4, out_dir=tmp_path / "every3",
              engine_options=dict(OPTS, tensorboard=True, image_every=3))
    acc = _events(run.dir)
    scalars = set(acc.Tags()["scalars"])
    history = [json.loads(line) for line in (run.dir / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    # Every value of a history row is a scalar, and every validation metric (overall and per class).
    assert {f"train/{k}" for k in history[0] if k != "step"} <= scalars
    assert {"train/loss", "train/lr", "train/consistency_weight", "train/loss_cons", "train/it_per_s"} <= scalars
    class_names = run.record["class_names"][1:] or ["class1", "class2", "class3"]
    assert {"val/dice", *(f"val/dice/{c}" for c in class_names)} <= scalars
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([h["loss"] for h in history])
    assert [e.step for e in acc.Scalars("val/dice")] == [2, 4]
    images = acc.Images("val/overlay")
    assert [e.step for e in images] == [3] and images[0].width == 3 * 32 and images[0].height == 32
    assert (run.dir / "progress.png").stat().st_size > 0

    # Default: an overlay at each validation.
    run = fit("supervised", TINY, labeled=2, iterations=2, out_dir=tmp_path / "default",
              engine_options=dict(OPTS, tensorboard=True))
    assert [e.step for e in _events(run.dir).Images("val/overlay")] == [2]


def test_tensorboard_off_writes_no_events(tmp_path):
    run = fit("supervised", TINY, labeled=2, iterations=2, out_dir=tmp_path, engine_options=dict(OPTS, tensorboard=False))
    assert not (run.dir / "tb").exists() and (run.dir / "history.jsonl").is_file()


def test_tensorboard_option_without_the_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert use_tensorboard(None) is False and use_tensorboard(False) is False
    with pytest.raises(ImportError, match=r"pip install tensorboard \(or pip install 'sslseg\[tensorboard\]'\)"):
        use_tensorboard(True)
    monkeypatch.undo()
    assert use_tensorboard(None) is True  # installed in the test environment


def test_label_overlay_blends_class_colours():
    image = torch.linspace(0, 10, 12).reshape(3, 4)
    labels = torch.zeros(3, 4, dtype=torch.long)
    labels[0, 0], labels[2, 3] = 1, 2
    out = label_overlay(image, labels, alpha=0.5)
    assert out.shape == (3, 3, 4) and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    grey = (image - image.min()) / (image.max() - image.min())
    assert torch.allclose(out[:, 1, 1], grey[1, 1].expand(3))  # background stays grey
    assert torch.allclose(out[:, 0, 0], 0.5 * grey[0, 0] + 0.5 * CLASS_COLOURS[0])
    assert torch.allclose(out[:, 2, 3], 0.5 * grey[2, 3] + 0.5 * CLASS_COLOURS[1])
    with pytest.raises(ValueError, match=r"must be \(H, W\) of the same shape, got \[3, 4\] and \[4, 3\]"):
        label_overlay(image, labels.T)
