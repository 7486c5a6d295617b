"""sslseg: semi-supervised medical image segmentation.

Importing ``sslseg`` is cheap: submodules (``sslseg.ops``, ``sslseg.models``, ``sslseg.data``, ...)
load on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = ("ops", "models", "data", "losses", "metrics", "inference", "methods", "engine", "sweep", "report")
# Public functions, by the module that defines them (imported on first use).
_FUNCTIONS = {
    "fit": "sslseg.engine",
    "evaluate": "sslseg.evaluation",
    "infer": "sslseg.inference",
    "export": "sslseg.exporter",
    "Run": "sslseg.engine",
    "list_methods": "sslseg.methods",
    "list_models": "sslseg.models",
    "create_model": "sslseg.models",
}

__all__ = ["__version__", *_SUBMODULES, *_FUNCTIONS]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"sslseg.{name}")
    if name in _FUNCTIONS:
        return getattr(importlib.import_module(_FUNCTIONS[name]), name)
    raise AttributeError(f"module 'sslseg' has no attribute {name!r}")
