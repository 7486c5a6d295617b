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
