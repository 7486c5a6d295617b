"""``sslseg.export``: TorchScript / ONNX / pt2 files of a trained student, their metadata, their
verification (which must be able to fail), dynamic shapes, the whole-inference pipeline, the CLI
and bad input.

The runs are the tiny 2D and 3D runs of ``tests/app/test_infer.py`` (narrow networks, so
that tracing stays cheap); each (dim, format) file is exported once for the module.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import sslseg
from sslseg.app.cli import main
from sslseg.app.export import EXPORT_FORMAT, ExportVerificationError, read_metadata
from sslseg.inference import InferencePipeline, window_grid
from tests.app.test_infer import _volume

SUFFIX = {"torchscript": ".pt", "onnx": ".onnx", "pt2": ".pt2"}
METADATA_KEYS = {
    "format", "sslseg_version", "model", "method", "data", "dim", "in_channels", "num_classes", "class_names",
    "patch_size", "spacing", "intensity", "input_layout", "input_name", "output_name", "dynamic", "size_divisor",
    "input_size", "inference", "pipeline", "file_format", "plan",
}
TINY_RECORD = dict(dim=2, patch_size=[8, 8], in_channels=1, num_classes=2, intensity="none")


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory):  # noqa: F811
    """``get(dim, format)`` -> the ExportResult of that run in that format, exported on first use."""
    root = tmp_path_factory.mktemp("exports")
    cache = {}

    def get(dim: int, fmt: str):
        if (dim, fmt) not in cache:
            cache[(dim, fmt)] = sslseg.export(runs[dim], root / f"student{dim}d{SUFFIX[fmt]}")
        return cache[(dim, fmt)]

    return get


def _run_file(fmt: str, path):
    """Load an exported file the way a deployment would and return a callable on tensors."""
    if fmt == "torchscript":
        return torch.jit.load(str(path))
    if fmt == "pt2":
        return torch.export.load(path).module()
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"image": x.numpy()})[0])


@pytest.mark.parametrize("fmt", ["torchscript", "pt2", "onnx"])
@pytest.mark.parametrize("dim", [2, 3])
def test_export_is_verified_with_metadata(runs, exports, dim, fmt):  # noqa: F811
    run = runs[dim]
    result = exports(dim, fmt)
    assert result.path.is_file() and result.format == fmt
    assert [p.name for p in result.path.parent.iterdir() if p.name.startswith(".")] == []  # no temporary left
    # Random input, a real patch of the run's data, and a random input at another size.
    patch = run.record["patch_size"]
    assert [c["input"] for c in result.checks] == ["random", "real", "random"]
    assert result.checks[0]["shape"] == [2, 1, *patch]
    assert result.checks[2]["shape"] == [1, 1, *[p + d for p, d in zip(patch, run.model.size_divisor)]]
    assert 0 <= result.max_abs_diff <= 1e-4
    meta = read_metadata(result.path)
    assert meta == result.metadata and set(meta) == METADATA_KEYS
    assert meta["format"] == EXPORT_FORMAT and meta["sslseg_version"] == sslseg.__version__
    for key in ("model", "method", "data", "dim", "in_channels", "num_classes", "class_names", "patch_size",
                "spacing", "intensity"):
        assert meta[key] == run.record[key], key
    assert meta["input_layout"] == ("NCHW" if dim == 2 else "NCDHW")
    assert (meta["input_name"], meta["output_name"], meta["pipeline"]) == ("image", "logits", False)
    assert meta["dynamic"]["axes"] == [0, *range(2, 2 + dim)]
    assert meta["dynamic"]["spatial_multiple"] == list(run.model.size_divisor)


@pytest.mark.parametrize(("dim", "fmt"), [(2, "onnx"), (3, "onnx"), (2, "pt2"), (2, "torchscript")])
def test_reloaded_file_runs_at_other_shapes(runs, exports, dim, fmt):  # noqa: F811
    model = runs[dim].model
    run_file = _run_file(fmt, exports(dim, fmt).path)
    div = model.size_divisor
    shape = (3, 1, 4 * div[0], 2 * div[1]) if dim == 2 else (3, 1, 3 * div[0], 2 * div[1], 4 * div[2])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = model(x)
        got = run_file(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    if fmt == "onnx":
        import onnx

        graph = onnx.load(str(exports(dim, fmt).path)).graph
        assert [i.name for i in graph.input] == ["image"] and [o.name for o in graph.output] == ["logits"]
        dims = graph.input[0].type.tensor_type.shape.dim
        assert dims[1].dim_value == 1 and all(d.dim_param for i, d in enumerate(dims) if i != 1)
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer)


def test_static_export_fixes_the_input(tmp_path):
    result = sslseg.export(nn.Conv2d(1, 2, 3, padding=1), tmp_path / "static.onnx", record=TINY_RECORD, dynamic=False)
    import onnx

    dims = onnx.load(str(result.path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 1, 8, 8]
    assert result.metadata["dynamic"]["axes"] == [] and [c["shape"] for c in result.checks] == [[1, 1, 8, 8]]


def test_example_input_is_verified(tmp_path):
    example = torch.randn(1, 1, 12, 10)
    result = sslseg.export(nn.Conv2d(1, 2, 3, padding=1), tmp_path / "ex.pt", record=TINY_RECORD, example=example)
    assert result.checks[-1]["input"] == "example" and result.checks[-1]["shape"] == [1, 1, 12, 10]
    with pytest.raises(ValueError, match=r"needs example spatial sizes of at least 2 x the size divisor \[1, 1\], "
                                         r"got \[1, 10\]"):
        sslseg.export(nn.Conv2d(1, 2, 3, padding=1), tmp_path / "ex.onnx", record=TINY_RECORD,
                      example=torch.randn(1, 1, 1, 10))


class _Sneaky(nn.Module):
    """Different numbers once scripted or exported: what verification exists to catch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if torch.jit.is_scripting():
            return y + 0.5
        if torch.compiler.is_exporting():
            return y * 2
        return y


@pytest.mark.parametrize("suffix", [".pt", ".onnx"])
def test_verification_catches_a_mismatch(tmp_path, suffix):
    path = tmp_path / f"sneaky{suffix}"
    with pytest.raises(ExportVerificationError, match=r"differs from the eager network by .* \(> atol 0.0001\) on the "
                                                      r"random input \[2, 1, 8, 8\]; the file was not written"):
        sslseg.export(_Sneaky(), path, record=TINY_RECORD)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary
    if suffix == ".pt":  # without verification the (wrong) file is written: verification is what caught it
        result = sslseg.export(_Sneaky(), path, record=TINY_RECORD, verify=False)
        assert path.is_file() and result.checks == [] and result.max_abs_diff is None


@pytest.mark.parametrize("dim", [2, 3])
def test_pipeline_equals_infer(runs, dim, tmp_path):  # noqa: F811
    run = runs[dim]
    result = sslseg.export(run, tmp_path / "pipeline.pt", pipeline=True)
    assert [c["input"] for c in result.checks] == ["random", "real"]
    assert all(c["mismatched_voxels"] == 0 for c in result.checks)
    meta = read_metadata(result.path)
    assert meta["pipeline"] and meta["input_layout"] == "CDHW" and meta["output_name"] == "labels"
    pipeline = torch.jit.load(str(result.path))
    # A volume smaller than the window on one axis and larger on the others (padding + several windows).
    vol = _volume((5, 44, 20) if dim == 2 else (12, 30, 21), seed=8)
    assert torch.equal(pipeline(vol), sslseg.infer(run.model, vol, amp="none"))  # the file is float32
    with pytest.raises(Exception, match=r"must have 1 channel\(s\) on axis 0"):
        pipeline(_volume((4, 16, 16), channels=2))
    nan = vol.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(Exception, match="NaN or Inf"):
        pipeline(nan)


def test_pipeline_window_grid_matches_sliding_window(runs):  # noqa: F811
    pipeline = InferencePipeline(runs[3].model, runs[3].record)
    for roi in (1, 5, 16, 17):
        for size in range(roi, 3 * roi + 8):
            assert pipeline.window_starts(size, roi) == list(window_grid([size], [roi], 0.5).starts[0]), (size, roi)


def test_cli(runs, tmp_path, capsys):  # noqa: F811
    path = tmp_path / "cli.ts"
    assert main(["export", str(runs[2].dir), str(path)]) == 0
    out = capsys.readouterr().out
    assert f"exported unet (torchscript) to {path}" in out and "verified on real input" in out
    assert read_metadata(path)["file_format"] == "torchscript"
    assert main(["export", str(runs[2].dir), str(tmp_path / "x.model")]) == 2
    assert "cannot tell the format from the suffix" in capsys.readouterr().err


def test_bad_input(tmp_path):
    conv = nn.Conv2d(1, 2, 3, padding=1)
    with pytest.raises(ValueError, match="cannot tell the format from the suffix of 'a.bin'"):
        sslseg.export(conv, tmp_path / "a.bin", record=TINY_RECORD)
    with pytest.raises(ValueError, match="format must be one of"):
        sslseg.export(conv, tmp_path / "a.bin", format="tflite", record=TINY_RECORD)
    with pytest.raises(ValueError, match="pipeline=True exports a TorchScript module"):
        sslseg.export(conv, tmp_path / "a.onnx", pipeline=True, record=TINY_RECORD)
    with pytest.raises(ValueError, match=r"example must be a tensor \(B, 1, \*spatial\) with 2 spatial axes, "
                                         r"got \[1, 3, 8, 8\]"):
        sslseg.export(conv, tmp_path / "a.pt", record=TINY_RECORD, example=torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="atol must be a number >= 0"):
        sslseg.export(conv, tmp_path / "a.pt", record=TINY_RECORD, atol=-1)
    with pytest.raises(ValueError, match="the module carries no record"):
        sslseg.export(conv, tmp_path / "a.pt")
    with pytest.raises(FileNotFoundError, match="model .*nowhere does not exist"):
        sslseg.export(tmp_path / "nowhere", tmp_path / "a.pt")
    assert list(tmp_path.iterdir()) == []


def test_read_metadata_rejects_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_metadata(tmp_path / "missing.onnx")
    (tmp_path / "text.onnx").write_text("hello")
    with pytest.raises(ValueError, match=r"text\.onnx: not a TorchScript, pt2 or ONNX file"):
        read_metadata(tmp_path / "text.onnx")
    scripted = torch.jit.script(nn.Conv2d(1, 1, 1))
    torch.jit.save(scripted, str(tmp_path / "plain.pt"))
    with pytest.raises(ValueError, match="holds no sslseg metadata"):
        read_metadata(tmp_path / "plain.pt")
    future = {"format": "sslseg-export/99", "sslseg_version": "9.0"}
    torch.jit.save(scripted, str(tmp_path / "future.pt"), _extra_files={"sslseg.json": json.dumps(future)})
    with pytest.raises(ValueError, match=rf"format 'sslseg-export/99' \(written by sslseg 9.0\); this sslseg reads "
                                         rf"'{EXPORT_FORMAT}'"):
        read_metadata(tmp_path / "future.pt")


def test_export_leaves_the_model_untouched(runs, tmp_path):  # noqa: F811
    model = runs[2].model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    try:
        result = sslseg.export(model, tmp_path / "m.pt", verify=True)
        assert model.training  # the export ran on a copy in eval mode
    finally:
        model.eval()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert np.isfinite(result.max_abs_diff)
