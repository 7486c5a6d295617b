"""Semi-supervised methods: one small registered class per module (see ``sslseg.methods.base``).

Importing this package imports every module in it, which registers the methods;
``list_methods()`` lists them. Adding a method is adding one module with a
``@register_method("name")`` class.
"""

import importlib
import pkgutil

from sslseg.methods.base import (
    MethodConfig,
    NetworkSpec,
    SSLMethod,
    StepContext,
    StepOutput,
    get_method,
    list_methods,
    register_method,
)

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_") and _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["MethodConfig", "NetworkSpec", "SSLMethod", "StepContext", "StepOutput", "get_method", "list_methods",
           "register_method"]
