"""Tiny synthetic datasets shared by the data tests (sizes kept small so the suite stays fast)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sslseg.data import make_synthetic

TINY = {
    "acdc": dict(num_cases=10, size=32, slices=3),
    "la": dict(num_cases=5, size=24),
    "brats": dict(num_cases=6, size=24),
}
TINY_SPEC = {
    "acdc": "synthetic:acdc?cases=10&size=32&slices=3",
    "la": "synthetic:la?cases=5&size=24",
    "brats": "synthetic:brats?cases=6&size=24",
}


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Fingerprints, preprocessed arrays and synthetic:ct folders go to a temporary cache."""
    import os

    old = os.environ.get("SSLSEG_CACHE")
    os.environ["SSLSEG_CACHE"] = str(tmp_path_factory.mktemp("sslseg_cache"))
    yield
    if old is None:
        os.environ.pop("SSLSEG_CACHE", None)
    else:
        os.environ["SSLSEG_CACHE"] = old


@pytest.fixture(scope="session")
def synthetic_roots(tmp_path_factory) -> dict[str, Path]:
    """Pristine on-disk synthetic datasets (SSL4MIS layouts), written once per session."""
    base = tmp_path_factory.mktemp("synthetic")
    return {kind: make_synthetic(kind, base / kind, seed=0, **opts) for kind, opts in TINY.items()}


@pytest.fixture(scope="session")
def nifti_root(tmp_path_factory) -> Path:
    return make_synthetic("brats", tmp_path_factory.mktemp("nifti") / "brats", layout="nifti", **TINY["brats"])


@pytest.fixture
def copy_root(tmp_path, synthetic_roots, nifti_root):
    """A writable copy of a pristine dataset, for tests that break files."""

    def _copy(kind: str) -> Path:
        src = nifti_root if kind == "nifti" else synthetic_roots[kind]
        dst = tmp_path / kind
        shutil.copytree(src, dst)
        return dst

    return _copy
