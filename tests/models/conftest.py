"""Fixtures for the model tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="package", autouse=True)
def _one_cpu_thread():
    """Run the model tests on one intra-op thread, then restore the setting.

    The inputs are tiny, so a second thread buys little; on a shared CI host an oversubscribed
    OpenMP pool spins instead (measured here: 17 min with 2 threads under load vs 3 min with 1).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
