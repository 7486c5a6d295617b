"""Shared pytest configuration.

``needs_cuda``: a test (or a parametrisation, via ``devices()``) that needs a CUDA device. Where no
GPU exists it is skipped with that reason; nothing else may skip.
"""

from __future__ import annotations

import getpass
import os
import random
import tempfile

# torch.compile's on-disk cache is not keyed on ATEN_CPU_CAPABILITY although the code it generates
# depends on it: a graph compiled under one capability and replayed under another gave wrong values
# (torch 2.13, tests/ops/test_sliding_window.py::test_torch_compile_fullgraph_matches_eager). A run
# that forces a capability keeps its own cache; set before torch is imported.
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{os.environ['ATEN_CPU_CAPABILITY']}")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import sslseg  # noqa: E402


# A broken or missing build must fail the tests, not hide behind the reference fallbacks.
os.environ.setdefault("SSLSEG_REQUIRE_OPS", "1")

# Property tests (tests/ops/test_fuzz.py): "default" keeps each op to a few seconds and draws the
# same examples on every run (derandomize), so CI is reproducible; "long" is for deeper runs:
# `pytest tests/ops/test_fuzz.py --hypothesis-profile=long`. deadline=None: the first call of an op
# pays for dispatch set-up, which would trip hypothesis' per-example deadline.
settings.register_profile("default", max_examples=300, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=2000, deadline=None, derandomize=False, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("default")  # --hypothesis-profile=long overrides it (the plugin loads it later)


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
