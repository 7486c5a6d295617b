"""Exports of a model trained with a data plan: the plan is in the metadata; the TorchScript pipeline,
the ONNX runner and the C++ runner crop and normalise as the plan says and refuse scans at another
spacing (none of them resamples), with errors naming the expected and the given spacing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sslseg
from sslseg.app.export import read_metadata
from sslseg.data import load
from sslseg.data.fingerprint import read_raw
from sslseg.data.resample import resample_image
from tests.export_kit.test_runners import R, _run_cpp, cpp_runner  # noqa: F401 - the runner fixture

CT = "synthetic:ct?cases=4&unlabeled=1&test=2&size=32"


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """A tiny run on synthetic:ct (planned), a test scan resampled to the plan's spacing with an air
    border set to 0 (so the crop to nonzero crops), and sslseg.infer's labels for it."""
    root = tmp_path_factory.mktemp("planned")
    run = sslseg.fit("supervised", CT, labeled=2, iterations=2, out_dir=root / "run",
                     engine_options=dict(val_every=2, progress=False, model_options=dict(channels=[4, 8])))
    target = run.record["plan"]["target_spacing"]
    ds = load(CT)
    vid = ds.volumes_of(ds.split().test_cases[0])[0]
    image, _, spacing = read_raw(ds.raw_record(vid), with_label=False)
    scan = resample_image(image, spacing, target)
    scan[:, :, :2] = 0.0  # zero slabs: the nonzero box is smaller than the scan
    scan[:, :, :, -3:] = 0.0
    labels = sslseg.infer(run, scan, spacing=target, amp="none").numpy()  # exported files are float32
    np.save(root / "scan.npy", scan)
    return dict(run=run, target=target, scan=scan, labels=labels, spacing=spacing, image=image, dir=root)


def test_pipeline_contains_the_plan_and_refuses_other_spacings(planned):
    run, target, scan = planned["run"], planned["target"], planned["scan"]
    result = sslseg.export(run, planned["dir"] / "pipe.pt", pipeline=True)  # verified against sslseg.infer
    assert read_metadata(result.path)["plan"] == run.record["plan"]
    assert [c["input"] for c in result.checks] == ["random", "real"]
    module = torch.jit.load(str(result.path))
    got = module(torch.from_numpy(scan), [float(s) for s in target])
    np.testing.assert_array_equal(got.numpy(), planned["labels"])
    assert int(got[:, :2].max()) == 0  # outside the crop: background
    with pytest.raises(Exception, match=r"expected a volume at the plan's target spacing .* got spacing"):
        module(torch.from_numpy(planned["image"]), [float(s) for s in planned["spacing"]])
    with pytest.raises(Exception, match="pass the volume's spacing"):
        module(torch.from_numpy(scan))


def test_onnx_runner_applies_the_plan(planned):
    run, target, scan = planned["run"], planned["target"], planned["scan"]
    path = sslseg.export(run, planned["dir"] / "m.onnx").path
    seg = R.OnnxSegmenter(path)
    assert seg.plan == run.record["plan"]
    labels, probs = seg.predict(scan, spacing=target, probabilities=True)
    np.testing.assert_array_equal(labels, planned["labels"])
    assert probs.shape == (run.record["num_classes"], *scan.shape[1:]) and np.allclose(probs[0, :, :2], 1.0)
    with pytest.raises(R.RunnerError, match=r"expected a volume at the plan's target spacing .* got spacing"):
        seg.predict(planned["image"], spacing=planned["spacing"])
    with pytest.raises(R.RunnerError, match="--spacing"):
        seg.predict(scan)
    # The command line takes --spacing.
    out = planned["dir"] / "onnx_labels.npy"
    assert R.main([str(path), str(planned["dir"] / "scan.npy"), "--out", str(out), "--spacing", *map(str, target)]) == 0
    np.testing.assert_array_equal(np.load(out), planned["labels"])


def test_cpp_runner_applies_the_plan_through_the_pipeline(planned, cpp_runner):  # noqa: F811
    run, target, root = planned["run"], planned["target"], planned["dir"]
    pipe = root / "pipe.pt"
    if not pipe.is_file():
        sslseg.export(run, pipe, pipeline=True)
    spacing = ",".join(repr(float(s)) for s in target)
    proc = _run_cpp(cpp_runner, pipe, root / "scan.npy", "--out", root / "cpp.npy", "--spacing", spacing)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.load(root / "cpp.npy"), planned["labels"])
    wrong = ",".join(repr(float(s) * 1.5) for s in target)
    proc = _run_cpp(cpp_runner, pipe, root / "scan.npy", "--out", root / "x.npy", "--spacing", wrong)
    assert proc.returncode == 2 and "expected a volume at the plan's target spacing" in proc.stderr, proc.stderr
    proc = _run_cpp(cpp_runner, pipe, root / "scan.npy", "--out", root / "x.npy")
    assert proc.returncode == 2 and "give --spacing" in proc.stderr, proc.stderr
    network_only = sslseg.export(run, root / "net.pt").path
    proc = _run_cpp(cpp_runner, network_only, root / "scan.npy", "--out", root / "x.npy", "--spacing", spacing)
    assert proc.returncode == 2 and "sslseg export --pipeline" in proc.stderr, proc.stderr
