"""sslseg: semi-supervised medical image segmentation.

Importing ``sslseg`` is cheap: submodules (``sslseg.ops``, ``sslseg.models``, ``sslseg.data``, ...)
load on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = ("ops", "models", "data", "losses", "metrics", "inference", "methods", "engine")

__all__ = ["__version__", *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"sslseg.{name}")
    raise AttributeError(f"module 'sslseg' has no attribute {name!r}")
