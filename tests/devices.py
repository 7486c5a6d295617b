"""Device parametrisation shared by tests: ``@pytest.mark.parametrize("device", devices())``."""

from __future__ import annotations

import pytest


def devices() -> list:
    """CPU always; CUDA as a ``needs_cuda`` parametrisation (skipped where no GPU exists)."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)]
