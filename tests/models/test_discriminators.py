"""Discriminators: ``forward(probs, image) -> (B, num_outputs)`` for any input of at least 16 per axis."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from sslseg.models import Discriminator, create_model, list_models

DISCRIMINATORS = list_models(task="discriminator")
SIZES = {2: [(16, 16), (37, 50), (96, 64)], 3: [(16, 20, 24), (24, 17, 16)]}


def _inputs(dim: int, size: tuple[int, ...], batch: int = 2, num_classes: int = 3, in_channels: int = 1):
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(batch, num_classes, *size, generator=g), dim=1)
    return probs, torch.randn(batch, in_channels, *size, generator=g)


@pytest.mark.parametrize("name", DISCRIMINATORS)
def test_any_size_gives_one_logit_pair_per_sample(name):
    model = create_model(name, 1, 3, seed=0)
    assert isinstance(model, Discriminator)
    for size in SIZES[model.dim]:
        probs, image = _inputs(model.dim, size)
        out = model(probs, image)
        assert out.shape == (2, 2)
        out.float().sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", DISCRIMINATORS)
def test_bad_inputs_are_clear_errors(name):
    model = create_model(name, 1, 3).eval()
    dim = model.dim
    probs, image = _inputs(dim, (16,) * dim)
    with pytest.raises(ValueError, match=r"each spatial size must be >= 16, got \[15"):
        model(*_inputs(dim, (15,) + (16,) * (dim - 1)))
    with pytest.raises(ValueError, match="expected probs with 3 and image with 1 channel"):
        model(image, probs)
    with pytest.raises(ValueError, match="must share batch and spatial sizes"):
        model(probs, image[:1])
    with pytest.raises(ValueError, match=f"must have {dim} spatial axes"):
        model(probs[:, :, 0], image[:, :, 0])


@pytest.mark.parametrize("name", DISCRIMINATORS)
def test_eval_is_deterministic_and_exports(name):
    model = create_model(name, 1, 3, seed=0).eval()
    probs, image = _inputs(model.dim, (16,) * model.dim, batch=1)
    with torch.no_grad():
        expected = model(probs, image)
        torch.testing.assert_close(model(probs, image), expected, rtol=0, atol=0)  # same kernels twice: exact
        scripted = torch.jit.script(model)
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
        buffer.seek(0)
        torch.testing.assert_close(torch.jit.load(buffer)(probs, image), expected, rtol=1e-5, atol=1e-5)
        program = torch.export.export(model, (probs, image))
        torch.testing.assert_close(program.module()(probs, image), expected, rtol=1e-5, atol=1e-5)

    import onnxruntime as ort  # a declared test dependency

    onnx_program = torch.onnx.export(program, (probs, image), dynamo=True, verbose=False)
    session = ort.InferenceSession(onnx_program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    (got,) = session.run(None, dict(zip(names, [probs.numpy(), image.numpy()])))
    assert float(np.abs(got - expected.numpy()).max()) <= 1e-4
