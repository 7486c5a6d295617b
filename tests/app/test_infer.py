"""``sslseg.infer`` on arrays and files (NIfTI, h5, npy), its CLI, and every bad input it rejects.

Two tiny runs (2D ACDC-like and 3D LA-like phantoms, narrow networks, 2 steps) are trained once
for the module; every check compares the file path with the array path, which is itself checked
against ``predict_volume`` on the normalised volume.
"""

from __future__ import annotations

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

import sslseg
from sslseg.app.cli import main
from sslseg.data.storage import normalize_intensity
from sslseg.engine.run import MODEL_FORMAT, model_record
from sslseg.inference import predict_volume
from sslseg.models import create_model
from sslseg.utils.precision import autocast_dtype

def _volume(shape, seed=0, channels=1) -> torch.Tensor:
    """A raw volume (CT-like offset and scale, so that normalisation matters)."""
    g = torch.Generator().manual_seed(seed)
    return 300.0 + 80.0 * torch.randn(channels, *shape, generator=g)


def _write_nifti(path, zyx: np.ndarray, affine: np.ndarray, dtype=np.float32, slope=None) -> np.ndarray:
    """Write a ``(z, y, x)`` array as NIfTI ``(x, y, z)``; return what a reader gets back, in ``(z, y, x)``."""
    img = nib.Nifti1Image(zyx.transpose(2, 1, 0).astype(dtype), affine)
    if slope is not None:
        img.header.set_slope_inter(*slope)
    img.to_filename(str(path))
    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32).transpose(2, 1, 0)


# Axes permuted and flipped, anisotropic (within the 25% that infer accepts without a spacing warning).
AFFINE = np.array([[0.0, 0.0, 1.2, -40.0], [0.0, 0.9, 0.0, 12.0], [-1.1, 0.0, 0.0, 7.0], [0, 0, 0, 1.0]])


# ---- arrays -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [2, 3])
def test_array_equals_predict_volume_on_normalised_input(runs, dim):
    run = runs[dim]
    vol = _volume((5, 40, 24) if dim == 2 else (20, 24, 18))
    labels = sslseg.infer(run.model, vol)
    x = torch.from_numpy(normalize_intensity(vol.numpy(), run.record["intensity"]))
    # infer's default precision is amp="auto": the rule of sslseg.utils.precision on this CPU
    expected = predict_volume(run.model, x, dim=dim, patch_size=run.record["patch_size"],
                              autocast_dtype=autocast_dtype("auto", "cpu"))
    assert labels.dtype == torch.int64 and labels.shape == vol.shape[1:]
    assert torch.equal(labels, expected)
    # (D, H, W) and numpy inputs give the same labels; a run, its directory and its model file too.
    assert torch.equal(sslseg.infer(run, vol[0].numpy()), labels)
    assert torch.equal(sslseg.infer(run.dir, vol), labels)
    assert torch.equal(sslseg.infer(run.dir / "best_val.pt", vol, device="cpu"), labels)


@pytest.mark.parametrize("dim", [2, 3])
def test_probabilities(runs, dim):
    run = runs[dim]
    vol = _volume((3, 36, 28) if dim == 2 else (18, 20, 16), seed=1)
    labels, probs = sslseg.infer(run.model, vol, probabilities=True)
    k = run.record["num_classes"]
    assert probs.shape == (k, *vol.shape[1:]) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(0), torch.ones(vol.shape[1:]), rtol=0, atol=1e-5)
    # Asking for probabilities never changes the labels.
    assert torch.equal(labels, sslseg.infer(run.model, vol))
    if dim == 3:
        assert torch.equal(labels, probs.argmax(0))


def test_tta_and_intensity_override(runs):
    run = runs[3]
    vol = _volume((16, 20, 16), seed=2)
    x = normalize_intensity(vol.numpy(), run.record["intensity"])
    # "none" passes data already normalised: the same labels as normalising the raw volume.
    assert torch.equal(sslseg.infer(run.model, torch.from_numpy(x), intensity="none"), sslseg.infer(run.model, vol))
    tta = sslseg.infer(run.model, vol, tta=True)
    expected = predict_volume(run.model, torch.from_numpy(x), dim=3, patch_size=run.record["patch_size"], tta=True,
                              autocast_dtype=autocast_dtype("auto", "cpu"))
    assert torch.equal(tta, expected)


@pytest.mark.needs_cuda
def test_cuda_matches_cpu(runs, tmp_path):
    vol = _volume((18, 20, 16), seed=9)
    cpu = sslseg.infer(runs[3].dir, vol, device="cpu")
    labels = sslseg.infer(runs[3].dir, vol.cuda(), device="cuda")
    assert labels.is_cuda and (labels.cpu() != cpu).float().mean() < 1e-3  # GPU convolutions round differently
    np.save(tmp_path / "v.npy", vol.numpy())
    written = sslseg.infer(runs[3].dir, tmp_path / "v.npy", tmp_path / "out", device="cuda")
    assert np.array_equal(np.load(written[0]), labels.cpu().numpy())


def test_record_is_attached_by_load_model(runs):
    run = runs[2]
    assert model_record(run.model) is run.record
    plain = create_model("unet", 1, 4, channels=[4, 8], dropout=[0.0, 0.0])
    assert model_record(plain) is None
    with pytest.raises(ValueError, match="carries no record"):
        sslseg.infer(plain, _volume((2, 16, 16)))
    # With an explicit record a bare module works.
    record = dict(run.record, model_options=dict(channels=[4, 8], dropout=[0.0, 0.0]))
    assert sslseg.infer(plain, _volume((2, 16, 16)), record=record).shape == (2, 16, 16)
    with pytest.raises(ValueError, match=r"record is missing \['patch_size'\]"):
        sslseg.infer(plain, _volume((2, 16, 16)), record={"dim": 2, "in_channels": 1, "num_classes": 4})


def test_spacing_far_from_training_warns(runs):
    with pytest.warns(UserWarning, match="differs from the training spacing"):
        sslseg.infer(runs[3].model, _volume((16, 16, 16)), spacing=(3.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing must be 3 positive numbers"):
        sslseg.infer(runs[3].model, _volume((16, 16, 16)), spacing=(1.0, -1.0, 1.0))


# ---- files ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [2, 3])
def test_nifti_keeps_geometry(runs, dim, tmp_path):
    run = runs[dim]
    shape = (4, 30, 26) if dim == 2 else (18, 20, 16)
    src = tmp_path / "in" / "case.nii.gz"
    src.parent.mkdir()
    # Stored as int16 with a scaling: the reader applies it, the written labels must not inherit it.
    stored = _write_nifti(src, np.rint(_volume(shape, seed=3).numpy()[0] / 2), AFFINE, np.int16, slope=(2.0, 5.0))
    written = sslseg.infer(run.dir, src, tmp_path / "out", probabilities=True, device="cpu")
    assert written == [tmp_path / "out" / "case.nii.gz", tmp_path / "out" / "case_probs.nii.gz"]
    out = nib.load(str(written[0]))
    ref = nib.load(str(src))
    assert out.shape == ref.shape and np.array_equal(out.affine, ref.affine)
    assert out.header.get_zooms() == ref.header.get_zooms() and out.get_data_dtype() == np.uint8
    labels = np.asarray(out.dataobj).transpose(2, 1, 0)
    assert np.array_equal(labels, sslseg.infer(run.model, torch.from_numpy(stored)).numpy())
    probs = nib.load(str(written[1]))
    assert probs.shape == (*ref.shape, run.record["num_classes"]) and np.array_equal(probs.affine, ref.affine)


def test_h5_npy_and_directory(runs, tmp_path):
    run = runs[3]
    vol = _volume((18, 20, 16), seed=4)
    inp = tmp_path / "in"
    inp.mkdir()
    np.save(inp / "a.npy", vol.numpy())  # (C, D, H, W)
    np.save(inp / "b.npy", vol.numpy()[0].astype(np.int16))  # (D, H, W), integer
    with h5py.File(inp / "c.h5", "w") as f:
        f["image"] = vol.numpy()[0]
        f.attrs["spacing"] = [1.0, 1.0, 1.0]
    (inp / "notes.txt").write_text("ignored: not an image type")
    written = sslseg.infer(run.model, inp, tmp_path / "out", probabilities=True, progress=False)
    names = [p.name for p in written]
    assert names == ["a.npy", "a_probs.npy", "b.npy", "b_probs.npy", "c.h5"]
    expected = sslseg.infer(run.model, vol).numpy()
    assert np.array_equal(np.load(written[0]), expected) and np.load(written[0]).dtype == np.uint8
    assert np.array_equal(np.load(written[2]), sslseg.infer(run.model, vol.to(torch.int16)).numpy())
    assert np.load(written[1]).shape == (2, *vol.shape[1:])
    with h5py.File(written[4]) as f:
        assert np.array_equal(f["label"][()], expected)
        assert f["probabilities"].shape == (2, *vol.shape[1:])
        assert list(f.attrs["spacing"]) == [1.0, 1.0, 1.0]


def test_nnunet_channel_files_are_gathered(runs, tmp_path):
    record = dict(runs[2].record, in_channels=2)
    net = create_model("unet", 2, 4, channels=[4, 8, 16], dropout=[0.0, 0.0, 0.0]).eval()
    vol = _volume((3, 32, 24), seed=5, channels=2)
    inp = tmp_path / "in"
    inp.mkdir()
    ch0 = _write_nifti(inp / "pat_0000.nii.gz", vol[0].numpy(), AFFINE)
    ch1 = _write_nifti(inp / "pat_0001.nii.gz", vol[1].numpy(), AFFINE)
    written = sslseg.infer(net, inp, tmp_path / "out", record=record)
    assert [p.name for p in written] == ["pat.nii.gz"]  # nnU-Net naming: the channel suffix is dropped
    got = np.asarray(nib.load(str(written[0])).dataobj).transpose(2, 1, 0)
    expected = sslseg.infer(net, torch.from_numpy(np.stack([ch0, ch1])), record=record)
    assert np.array_equal(got, expected.numpy())
    # Given as the first channel file, the case is gathered the same way.
    assert sslseg.infer(net, inp / "pat_0000.nii.gz", tmp_path / "out2", record=record)[0].name == "pat.nii.gz"
    (inp / "pat_0001.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"channel file pat_0001\.nii\.gz does not exist"):
        sslseg.infer(net, inp / "pat_0000.nii.gz", tmp_path / "out3", record=record)


def test_cli(runs, tmp_path, capsys):
    vol = _volume((3, 32, 32), seed=6)
    np.save(tmp_path / "x.npy", vol.numpy())
    assert main(["infer", str(runs[2].dir), str(tmp_path / "x.npy"), "--out", str(tmp_path / "out"),
                 "--probabilities", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "out" / "x.npy"), str(tmp_path / "out" / "x_probs.npy")]
    assert np.array_equal(np.load(tmp_path / "out" / "x.npy"), sslseg.infer(runs[2].model, vol).numpy())
    assert main(["infer", str(runs[2].dir), str(tmp_path / "missing.npy"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---- bad input --------------------------------------------------------------------------------------------


def test_bad_arrays(runs):
    model = runs[3].model
    with pytest.raises(ValueError, match=r"has 2 channel\(s\).*the model takes 1"):
        sslseg.infer(model, _volume((16, 16, 16), channels=2))
    with pytest.raises(ValueError, match=r"must be a volume \(D, H, W\) or \(C, D, H, W\), got shape \[16, 16\]"):
        sslseg.infer(model, torch.zeros(16, 16))
    with pytest.raises(ValueError, match=r"got shape \[1, 1, 16, 16, 16\]"):
        sslseg.infer(model, torch.zeros(1, 1, 16, 16, 16))
    nan = _volume((16, 16, 16))
    nan[0, 3, 4, 5] = float("nan")
    with pytest.raises(ValueError, match=r"contains NaN \(1 non-finite voxel"):
        sslseg.infer(model, nan)
    inf = _volume((16, 16, 16))
    inf[0, 0, 0, :2] = float("inf")
    with pytest.raises(ValueError, match=r"contains Inf \(2 non-finite voxel"):
        sslseg.infer(model, inf)
    with pytest.raises(TypeError, match="real numbers, got dtype bool"):
        sslseg.infer(model, torch.zeros(1, 16, 16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown intensity 'zscor'; did you mean 'zscore'"):
        sslseg.infer(model, _volume((16, 16, 16)), intensity="zscor")
    with pytest.raises(ValueError, match="out is for file inputs"):
        sslseg.infer(model, _volume((16, 16, 16)), out="somewhere")
    with pytest.raises(TypeError, match="inputs must be a tensor/array volume, a path"):
        sslseg.infer(model, [1, 2, 3])
    with pytest.raises(TypeError, match="model must be a Run"):
        sslseg.infer(42, _volume((16, 16, 16)))


def test_bad_files(runs, tmp_path):
    run = runs[3]
    good = tmp_path / "good.npy"
    np.save(good, _volume((16, 16, 16)).numpy())
    with pytest.raises(ValueError, match="out \\(an output directory\\) is required"):
        sslseg.infer(run.model, good)
    text = tmp_path / "text.npy"
    text.write_text("not an array")
    with pytest.raises(ValueError, match=r"text\.npy: unreadable npy file"):
        sslseg.infer(run.model, text, tmp_path / "out")
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ValueError, match=r"broken\.nii\.gz: unreadable NIfTI file"):
        sslseg.infer(run.model, broken, tmp_path / "out")
    h5 = tmp_path / "nokey.h5"
    with h5py.File(h5, "w") as f:
        f["data"] = np.zeros((4, 4, 4))
    with pytest.raises(ValueError, match=r"nokey\.h5: missing h5 key 'image'"):
        sslseg.infer(run.model, h5, tmp_path / "out")
    nan = tmp_path / "nan.npy"
    arr = _volume((16, 16, 16)).numpy()
    arr[0, 1, 1, 1] = np.nan
    np.save(nan, arr)
    with pytest.raises(ValueError, match=r"nan\.npy contains NaN"):
        sslseg.infer(run.model, nan, tmp_path / "out")
    (tmp_path / "scan.png").write_text("x")
    with pytest.raises(ValueError, match=r"scan\.png: unknown file type"):
        sslseg.infer(run.model, tmp_path / "scan.png", tmp_path / "out")
    (tmp_path / "scan.mha").write_text("x")
    with pytest.raises(ValueError, match=r"scan\.mha: unreadable \.mha file"):
        sslseg.infer(run.model, tmp_path / "scan.mha", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="input .*missing.nii.gz does not exist"):
        sslseg.infer(run.model, tmp_path / "missing.nii.gz", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no .nii.gz/.nii/.nrrd/.nhdr/.mha/.mhd/.h5/.npy files"):
        sslseg.infer(run.model, tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ValueError, match="would overwrite the input"):
        sslseg.infer(run.model, good, tmp_path)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bad_model_files(runs, tmp_path):
    vol = _volume((16, 16, 16))
    text = tmp_path / "best_val.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read as an sslseg model file"):
        sslseg.infer(text, vol)
    ckpt = torch.load(runs[3].dir / "best_val.pt", weights_only=True)
    ckpt["format"] = "sslseg-model/99"
    future = tmp_path / "future.pt"
    torch.save(ckpt, future)
    with pytest.raises(ValueError, match=rf"format 'sslseg-model/99', written by sslseg .*reads '{MODEL_FORMAT}'"):
        sslseg.infer(future, vol)
    with pytest.raises(FileNotFoundError, match="model .*nowhere does not exist"):
        sslseg.infer(tmp_path / "nowhere", vol)
