"""Shared pytest configuration.

``needs_cuda``: a test (or a parametrisation, via ``devices()``) that needs a CUDA device. Where no
GPU exists it is skipped with that reason; nothing else may skip.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

import sslseg


# A broken or missing build must fail the tests, not hide behind the reference fallbacks.
os.environ.setdefault("SSLSEG_REQUIRE_OPS", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs_cuda: no CUDA device on this machine")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_rng_state():
    """Keep every test's RNG use from leaking into the next test."""
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    np_state = np.random.get_state()
    py_state = random.getstate()
    yield
    torch.set_rng_state(torch_state)
    if cuda_states is not None:
        torch.cuda.set_rng_state_all(cuda_states)
    np.random.set_state(np_state)
    random.setstate(py_state)


# Tiny training runs shared by the inference, export and deployment-kit tests.
ENGINE_2D = dict(batch_size=4, labeled_bs=2, val_every=2, log_every=1, patch_size=[32, 32], progress=False,
                 model_options=dict(channels=[4, 8], dropout=[0.0, 0.0]))
ENGINE_3D = dict(batch_size=2, labeled_bs=1, val_every=2, log_every=1, patch_size=[16, 16, 16], progress=False,
                 model_options=dict(channels=[4, 8]))


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[int, sslseg.Run]:
    """Two tiny finished runs (2D and 3D, narrow networks) for inference and export tests."""
    root = tmp_path_factory.mktemp("runs")
    return {
        2: sslseg.fit("supervised", "synthetic:acdc?cases=6&slices=2&size=32", labeled=2, iterations=2,
                      out_dir=root / "r2", engine_options=ENGINE_2D),
        3: sslseg.fit("supervised", "synthetic:la?cases=4&size=32", labeled=2, iterations=2, out_dir=root / "r3",
                      engine_options=ENGINE_3D),
    }
