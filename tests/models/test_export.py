"""Every network scripts, exports with ``torch.export`` and runs in onnxruntime with eager's numbers.

All networks are scriptable: no tracing fallback is needed. The ONNX model is produced by the
dynamo exporter from the same ``ExportedProgram`` that the ``torch.export`` check runs, so each
network is traced once. These checks run the default architectures at each case's smallest
``export_size``, which keeps the file within the CI budget.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from sslseg.models import list_models
from tests.models.cases import CASES, build, example_input

SEGMENTATION = list_models(task="segmentation")
# onnxruntime must reproduce eager within this (the bar).
ONNX_ATOL = 1e-4


@pytest.fixture(scope="module", params=SEGMENTATION)
def exported(request) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.export.ExportedProgram]:
    """(eval model, input, eager logits, ExportedProgram) of one network.

    Module-scoped and parametrised, so pytest runs both tests below for one network before building
    the next: each network is exported once and only one is held in memory.
    """
    name = request.param
    model = build(name).eval()
    x = example_input(name, CASES[name].export_size, batch=1)
    with torch.no_grad():
        expected = model(x)
        program = torch.export.export(model, (x,))
    return model, x, expected, program


@pytest.mark.parametrize("name", SEGMENTATION)
def test_torchscript_round_trip(name):
    model = build(name).eval()
    x = example_input(name, CASES[name].export_size, batch=1)
    scripted = torch.jit.script(model)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
    # The geometry attributes survive scripting (sliding-window and export code read them).
    assert tuple(loaded.size_divisor) == model.size_divisor
    assert loaded.dim == model.dim


def test_torch_export_matches_eager(exported):
    model, x, expected, program = exported
    module = program.module()
    y = torch.flip(x, dims=[-1])  # a second input: nothing about the traced one was baked in
    with torch.no_grad():
        torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(module(y), model(y), rtol=1e-5, atol=1e-5)


def test_onnx_matches_eager(exported):
    import onnxruntime as ort  # a declared test dependency: missing it is a failure, not a skip

    _, x, expected, program = exported
    onnx_program = torch.onnx.export(program, (x,), dynamo=True, verbose=False)
    session = ort.InferenceSession(onnx_program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert got.shape == tuple(expected.shape)
    diff = float(np.abs(got - expected.numpy()).max())
    assert diff <= ONNX_ATOL, f"onnxruntime differs from eager by {diff:.2e}"


@pytest.mark.parametrize("name", ["unet_3d", "swin_unet"])
def test_torch_export_save_load(name):
    """Serialisation of an ExportedProgram, for one 3D and one 2D network: the layers are the same
    stock ops everywhere, and ``torch.export.load`` is too slow to repeat for every model."""
    model = build(name).eval()
    x = example_input(name, CASES[name].export_size, batch=1)
    with torch.no_grad():
        program = torch.export.export(model, (x,))
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        buffer.seek(0)
        torch.testing.assert_close(torch.export.load(buffer).module()(x), model(x), rtol=1e-5, atol=1e-5)
