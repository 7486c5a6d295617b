"""sslseg: semi-supervised medical image segmentation.

Importing ``sslseg`` is cheap: submodules (``sslseg.ops``, ``sslseg.models``, ``sslseg.data``, ...)
load on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import Any

from sslseg._version import __version__

_SUBMODULES = ("ops", "models", "data", "losses", "metrics", "utils", "inference", "methods", "engine", "app")
# The user-facing verbs' modules, reachable as ``sslseg.sweep`` and ``sslseg.report``.
_APP_MODULES = {"sweep": "sslseg.app.sweep", "report": "sslseg.app.report"}
# Public functions, by the module that defines them (imported on first use).
_FUNCTIONS = {
    "fit": "sslseg.engine",
    "evaluate": "sslseg.app.evaluate",
    "infer": "sslseg.app.infer",
    "export": "sslseg.app.export",
    "Run": "sslseg.engine",
    "list_methods": "sslseg.methods",
    "list_models": "sslseg.models",
    "create_model": "sslseg.models",
}

__all__ = ["__version__", *_SUBMODULES, *_APP_MODULES, *_FUNCTIONS]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"sslseg.{name}")
    if name in _APP_MODULES:
        return importlib.import_module(_APP_MODULES[name])
    if name in _FUNCTIONS:
        return getattr(importlib.import_module(_FUNCTIONS[name]), name)
    raise AttributeError(f"module 'sslseg' has no attribute {name!r}")
