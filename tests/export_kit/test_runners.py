"""The deployment kit in export/: the numpy + onnxruntime runner and the C++ (libtorch) runner.

Both must reproduce ``sslseg.infer`` on files written by ``sslseg.export``: the ONNX runner with
identical labels and probabilities within 1e-4 (without importing torch), the C++ runner with
identical labels. The numpy re-implementations of the window grid, the Gaussian importance map and
PyTorch's resizing are also checked piece by piece against sslseg's own code.

The C++ runner is built once with CMake + Ninja into ``build/export-cpp-<hash of its sources and
the torch version>`` (gitignored), so reruns reuse it; a clean build takes about a minute on 2 cores.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sslseg
from sslseg.app.export import read_metadata
from sslseg.inference import importance_map, predict_slicewise, predict_volume, window_grid
from sslseg.models import create_model

ROOT = Path(__file__).resolve().parents[2]
ONNX_RUNNER = ROOT / "export" / "onnx" / "sslseg_onnx_infer.py"
CPP_DIR = ROOT / "export" / "cpp"
DATA = {2: "synthetic:acdc?cases=6&slices=2&size=32", 3: "synthetic:la?cases=4&size=32"}


def _runner_module():
    spec = importlib.util.spec_from_file_location("sslseg_onnx_infer", ONNX_RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


R = _runner_module()


def _env() -> dict[str, str]:
    """A clean environment for the runners: no PYTHONPATH, one thread."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1", "LC_ALL": "C"}


# ---- models, volumes, exports (built once per module) ---------------------------------------------------


def _case(dim: int):
    """A tiny network with its record and a raw volume of odd size (resizes / padded windows)."""
    if dim == 2:
        model = create_model("unet", 1, 4, seed=0, channels=[4, 8, 16, 32], dropout=[0.0] * 4)
        # Random BatchNorm statistics: an untrained 2D U-Net with unit statistics predicts one class.
        g = torch.Generator().manual_seed(0)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3, generator=g)
                m.running_var.uniform_(0.2, 1.0, generator=g)
        patch = [24, 24]
    else:
        model = create_model("unet_3d", 1, 2, seed=0, channels=[4, 8, 16, 32], dropout=0.0)
        patch = [16, 16, 16]
    model.eval()
    record = {"model": "unet" if dim == 2 else "unet_3d", "dim": dim, "patch_size": patch, "in_channels": 1,
              "num_classes": model.num_classes, "intensity": "zscore", "data": DATA[dim],
              "class_names": [f"c{k}" for k in range(model.num_classes)]}
    ds = sslseg.data.load(DATA[dim])
    image = ds.read_volume(ds.volume_ids[0], with_label=False).image.numpy()
    # Odd sizes: 2D slices 29 x 21 (resized to 24 x 24 and back); 3D 32 x 27 x 13 (several
    # overlapping windows, and the last axis is padded to the window). Raw-looking intensities.
    image = image[:, :, :29, :21] if dim == 2 else image[:, :, :27, :13]
    image = np.ascontiguousarray(image * 40.0 + 300.0, dtype=np.float32)
    return model, record, image


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """Per dim: model, record, raw volume, sslseg.infer's labels and probabilities, TorchScript file."""
    out = tmp_path_factory.mktemp("export_kit")
    cases = {}
    for dim in (2, 3):
        model, record, image = _case(dim)
        labels, probs = sslseg.infer(model, image, record=record, probabilities=True, device="cpu",
                                    amp="none")  # exported files are float32
        assert len(np.unique(labels.numpy())) > 1, "the test network must predict more than one class"
        ts_path = sslseg.export(model, out / f"m{dim}.pt", record=record).path
        np.save(out / f"v{dim}.npy", image)
        cases[dim] = dict(model=model, record=record, image=image, labels=labels.numpy(), probs=probs.numpy(),
                          ts=ts_path, npy=out / f"v{dim}.npy")
    cases["dir"] = out
    return cases


@pytest.fixture(scope="module")
def onnx_kit(kit):
    """``kit`` plus the ONNX exports (the slow part: torch.export + the ONNX translation)."""
    for dim in (2, 3):
        if "onnx" not in kit[dim]:
            kit[dim]["onnx"] = sslseg.export(kit[dim]["model"], kit["dir"] / f"m{dim}.onnx", record=kit[dim]["record"]).path
    return kit


# ---- the numpy pieces against sslseg's own ----------------------------------------------------------------


@pytest.mark.parametrize("spatial,roi", [((32, 27, 13), (16, 16, 16)), ((7, 40, 16), (8, 12, 16)),
                                         ((5, 5, 5), (8, 8, 8)), ((100, 64, 33), (32, 32, 32))])
def test_window_grid_matches_sslseg(spatial, roi):
    starts, before = R.window_grid(spatial, roi, 0.5)
    grid = window_grid(spatial, roi, 0.5)
    assert [tuple(s) for s in starts] == [tuple(s) for s in grid.starts]
    assert tuple(before) == tuple(grid.pad_before)


@pytest.mark.parametrize("roi", [(16, 16, 16), (7, 12, 33), (1, 5, 2)])
def test_gaussian_importance_matches_sslseg(roi):
    ours = R.gaussian_importance(roi)
    ref = importance_map(roi, "gaussian", 0.125).numpy()
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=3e-7, atol=0)


@pytest.mark.parametrize("src,dst", [((29, 21), (24, 24)), ((24, 24), (29, 21)), ((5, 80), (16, 7)), ((3, 3), (3, 3))])
def test_resizes_match_torch_interpolate(src, dst):
    x = np.random.default_rng(0).standard_normal((2, 3, *src)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x), size=dst, mode="bilinear", align_corners=False).numpy()
    np.testing.assert_allclose(R.resize_bilinear(x, dst), ref, rtol=0, atol=1e-6)
    lab = np.random.default_rng(1).integers(0, 5, (2, 1, *src))
    ref_lab = F.interpolate(torch.from_numpy(lab).float(), size=dst, mode="nearest").long().numpy()
    np.testing.assert_array_equal(R.resize_nearest(lab, dst), ref_lab)


def _affine_networks(classes: int):
    """The same per-voxel affine 'network' in torch and numpy: identical float32 logits."""
    a = np.linspace(-1.5, 2.0, classes, dtype=np.float32)
    b = np.linspace(0.3, -0.4, classes, dtype=np.float32)

    def torch_net(x: torch.Tensor) -> torch.Tensor:
        shape = (1, classes) + (1,) * (x.dim() - 2)
        return x * torch.from_numpy(a).view(shape) + torch.from_numpy(b).view(shape)

    def numpy_net(x: np.ndarray) -> np.ndarray:
        shape = (1, classes) + (1,) * (x.ndim - 2)
        return x * a.reshape(shape) + b.reshape(shape)

    return torch_net, numpy_net


def test_sliding_window_matches_predict_volume_with_padding_and_overlap():
    torch_net, numpy_net = _affine_networks(3)
    image = np.random.default_rng(2).standard_normal((1, 13, 20, 9)).astype(np.float32)
    patch = [8, 16, 12]  # overlap along D and H, padding along W
    ref = predict_volume(torch_net, torch.from_numpy(image), dim=3, patch_size=patch, output="probs").numpy()
    ours = R.sliding_window(numpy_net, image, patch)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(ours.argmax(0), predict_volume(torch_net, torch.from_numpy(image), dim=3,
                                                                 patch_size=patch).numpy())


def test_slicewise_matches_predict_slicewise():
    torch_net, numpy_net = _affine_networks(4)
    image = np.random.default_rng(3).standard_normal((1, 18, 29, 21)).astype(np.float32)  # 2 batches of slices
    labels, probs = R.predict_slicewise(numpy_net, image, [24, 24], probabilities=True)
    x = torch.from_numpy(image)
    np.testing.assert_array_equal(labels, predict_slicewise(torch_net, x, [24, 24]).numpy())
    ref = predict_slicewise(torch_net, x, [24, 24], output="probs").numpy()
    np.testing.assert_allclose(probs, ref, rtol=0, atol=2e-6)


# ---- the ONNX runner ----------------------------------------------------------------------------------


_NO_TORCH = ("import runpy, sys; sys.modules['torch'] = None; script = sys.argv[1]; sys.argv = sys.argv[1:]; "
             "runpy.run_path(script, run_name='__main__')")


@pytest.mark.parametrize("dim", [2, 3])
def test_onnx_runner_cli_equals_sslseg_infer_without_torch(onnx_kit, dim):
    case, out = onnx_kit[dim], onnx_kit["dir"]
    labels_path, probs_path = out / f"onnx_labels{dim}.npy", out / f"onnx_probs{dim}.npy"
    # torch is made unimportable in the runner's process: any `import torch` would fail.
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, str(ONNX_RUNNER), str(case["onnx"]), str(case["npy"]),
                           "--out", str(labels_path), "--probabilities", str(probs_path), "--threads", "1"],
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    labels, probs = np.load(labels_path), np.load(probs_path)
    assert labels.dtype == np.uint8  # auto: uint8 up to 256 classes, as `sslseg infer` writes .npy
    np.testing.assert_array_equal(labels.astype(np.int64), case["labels"])
    assert probs.dtype == np.float32 and probs.shape == case["probs"].shape
    np.testing.assert_allclose(probs, case["probs"], rtol=0, atol=1e-4)


def test_onnx_runner_api_accepts_dhw_and_returns_int64(onnx_kit):
    case = onnx_kit[3]
    seg = R.OnnxSegmenter(case["onnx"], threads=1)
    assert (seg.dim, seg.in_channels, seg.num_classes, seg.patch_size) == (3, 1, 2, [16, 16, 16])
    labels = seg.predict(case["image"][0])  # (D, H, W): one channel
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, case["labels"])


def _onnx_with_metadata(src: Path, dst: Path, value: str | None) -> Path:
    import onnx

    proto = onnx.load(str(src))
    del proto.metadata_props[:]
    if value is not None:
        onnx.helper.set_model_props(proto, {"sslseg": value})
    onnx.save(proto, str(dst))
    return dst


def test_onnx_runner_bad_inputs(onnx_kit, tmp_path, capsys):
    case = onnx_kit[2]
    model = str(case["onnx"])

    def fails(args, match):
        assert R.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("sslseg_onnx_infer: error:") and match in err, err

    out = str(tmp_path / "o.npy")
    np.save(tmp_path / "flat.npy", np.zeros((29, 21), np.float32))
    fails([model, str(tmp_path / "flat.npy"), "--out", out], "expected a volume (D, H, W) or (C, D, H, W), got shape [29, 21]")
    np.save(tmp_path / "two.npy", np.zeros((2, 2, 8, 8), np.float32))
    fails([model, str(tmp_path / "two.npy"), "--out", out], "takes 1 channel(s) on axis 0, got shape [2, 2, 8, 8]")
    nan = case["image"].copy()
    nan[0, 1, 3, 4] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    fails([model, str(tmp_path / "nan.npy"), "--out", out], "contains NaN (1 non-finite voxel(s)")
    (tmp_path / "junk.npy").write_bytes(b"not a numpy file")
    fails([model, str(tmp_path / "junk.npy"), "--out", out], "unreadable .npy file")
    fails([model, str(tmp_path / "missing.npy"), "--out", out], "input file not found")
    np.save(tmp_path / "bool.npy", np.zeros((1, 2, 8, 8), bool))
    fails([model, str(tmp_path / "bool.npy"), "--out", out], "expected a real-valued numeric array, got dtype bool")
    old = json.dumps({**R.OnnxSegmenter(model).metadata, "format": "sslseg-export/0"})
    fails([str(_onnx_with_metadata(case["onnx"], tmp_path / "old.onnx", old)), str(case["npy"]), "--out", out],
          "metadata format must be 'sslseg-export/1', got 'sslseg-export/0'")
    fails([str(_onnx_with_metadata(case["onnx"], tmp_path / "bare.onnx", None)), str(case["npy"]), "--out", out],
          "no 'sslseg' metadata")
    (tmp_path / "junk.onnx").write_bytes(b"\x00junk")
    fails([str(tmp_path / "junk.onnx"), str(case["npy"]), "--out", out], "cannot load the ONNX model")
    assert not (tmp_path / "o.npy").exists()


# ---- the C++ runner -----------------------------------------------------------------------------------


def _cpp_sources() -> list[Path]:
    csrc = ROOT / "csrc"
    return sorted(p for p in CPP_DIR.iterdir() if p.is_file()) + [
        csrc / "ops" / "cpu" / "sliding_window.cpp", csrc / "ops" / "sliding_window.h", csrc / "checks.h",
        csrc / "ops" / "mc_uncertainty.h"]


@pytest.fixture(scope="module")
def cpp_runner() -> Path:
    """Configure and build export/cpp with CMake + Ninja (cached by source hash)."""
    h = hashlib.sha256(f"{torch.__version__} {sys.executable}".encode())
    for p in _cpp_sources():
        h.update(p.name.encode() + p.read_bytes())
    build = ROOT / "build" / f"export-cpp-{h.hexdigest()[:12]}"
    exe = build / "sslseg_infer"
    if exe.is_file():
        return exe
    prefix = torch.utils.cmake_prefix_path
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for cmd in (["cmake", "-S", str(CPP_DIR), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_PREFIX_PATH={prefix}"],
                ["cmake", "--build", str(build)]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert exe.is_file()
    return exe


def _run_cpp(exe: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), *map(str, args), "--threads", "1"], capture_output=True, text=True, env=_env(),
                          timeout=120)


@pytest.mark.parametrize("dim", [2, 3])
def test_cpp_runner_equals_sslseg_infer(kit, cpp_runner, dim):
    case, out = kit[dim], kit["dir"]
    labels_path, probs_path = out / f"cpp_labels{dim}.npy", out / f"cpp_probs{dim}.npy"
    proc = _run_cpp(cpp_runner, case["ts"], case["npy"], "--out", labels_path, "--probabilities", probs_path,
                    "--label-dtype", "int64")
    assert proc.returncode == 0, proc.stderr
    labels = np.load(labels_path)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, case["labels"])
    probs = np.load(probs_path)
    assert probs.dtype == np.float32 and probs.shape == case["probs"].shape
    # Bit-identical where the pytest process runs the kernels on one thread too; 1e-6 leaves room for
    # convolution kernels whose summation order depends on the thread count.
    np.testing.assert_allclose(probs, case["probs"], rtol=0, atol=1e-6)


def test_cpp_runner_raw_fortran_and_pipeline_inputs(kit, cpp_runner, tmp_path):
    case = kit[3]
    raw = tmp_path / "v.f32"
    case["image"].tofile(raw)
    shape = ",".join(str(s) for s in case["image"].shape)
    proc = _run_cpp(cpp_runner, case["ts"], "--raw", raw, "--shape", shape, "--out", tmp_path / "raw.npy")
    assert proc.returncode == 0, proc.stderr
    labels = np.load(tmp_path / "raw.npy")
    assert labels.dtype == np.uint8  # auto
    np.testing.assert_array_equal(labels, case["labels"])
    # A Fortran-ordered float64 .npy of the same values reads as the same float32 volume.
    np.save(tmp_path / "f64.npy", np.asfortranarray(case["image"].astype(np.float64)))
    proc = _run_cpp(cpp_runner, case["ts"], tmp_path / "f64.npy", "--out", tmp_path / "f64_labels.npy")
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "f64_labels.npy"), case["labels"])
    # A whole-inference TorchScript module (sslseg export --pipeline) runs as it is.
    pipe = sslseg.export(case["model"], tmp_path / "pipe.pt", record=case["record"], pipeline=True).path
    proc = _run_cpp(cpp_runner, pipe, case["npy"], "--out", tmp_path / "pipe.npy")
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "pipe.npy"), case["labels"])


def test_cpp_runner_bad_inputs(kit, cpp_runner, tmp_path):
    case = kit[3]
    model, out = case["ts"], tmp_path / "o.npy"

    def fails(args, match):
        proc = _run_cpp(cpp_runner, *args)
        assert proc.returncode == 2 and proc.stderr.startswith("sslseg_infer: error:") and match in proc.stderr, (
            proc.returncode, proc.stderr)

    np.save(tmp_path / "two.npy", np.zeros((2, 4, 8, 8), np.float32))
    fails([model, tmp_path / "two.npy", "--out", out], "takes 1 channel(s) on axis 0, got shape [2, 4, 8, 8]")
    np.save(tmp_path / "flat.npy", np.zeros((8, 8), np.float32))
    fails([model, tmp_path / "flat.npy", "--out", out], "expected a volume (D, H, W) or (C, D, H, W), got shape [8, 8]")
    nan = case["image"].copy()
    nan[0, 0, 0, :2] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    fails([model, tmp_path / "nan.npy", "--out", out], "contains NaN (2 non-finite voxel(s)")
    (tmp_path / "junk.npy").write_bytes(b"garbage, not numpy")
    fails([model, tmp_path / "junk.npy", "--out", out], "not a .npy file")
    fails([model, tmp_path / "missing.npy", "--out", out], "cannot open file")
    fails([model, "--raw", tmp_path / "junk.npy", "--shape", "1,2,3,4", "--out", out], "must hold 96 bytes, got 18")
    fails([model, case["npy"]], "--out LABELS.npy is required")
    fails([model, case["npy"], "--out", out, "--label-dtype", "int8"], "--label-dtype must be auto, int64 or uint8")
    meta = read_metadata(model)
    scripted = torch.jit.load(str(model))
    torch.jit.save(scripted, str(tmp_path / "old.pt"), _extra_files={"sslseg.json": json.dumps({**meta, "format": "x/0"})})
    fails([tmp_path / "old.pt", case["npy"], "--out", out], "metadata format must be 'sslseg-export/1', got 'x/0'")
    torch.jit.save(scripted, str(tmp_path / "bare.pt"))
    fails([tmp_path / "bare.pt", case["npy"], "--out", out], "no sslseg.json metadata inside")
    fails([case["npy"], case["npy"], "--out", out], "cannot load a TorchScript model")
    assert not out.exists()
