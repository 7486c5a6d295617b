"""Semi-supervised methods: one small registered class per module (see ``sslseg.methods.base``).

Importing this package imports the method modules listed below, which registers the methods;
``list_methods()`` lists them. Adding a method is adding one module with a
``@register_method("name")`` class and its line here.
"""

from sslseg.methods.base import (
    MethodConfig,
    NetworkSpec,
    SSLMethod,
    StepContext,
    StepOutput,
    get_method,
    list_methods,
    register_method,
    split_labeled,
)

# Importing the method modules registers them.
from sslseg.methods import (  # noqa: E402,F401  (isort: skip)
    adversarial,
    bcp,
    cct,
    cps,
    ctct,
    dtc,
    entropy_min,
    fixmatch,
    ict,
    mean_teacher,
    rdrop,
    rotation_consistency,
    supervised,
    uamt,
    unimatch,
    urpc,
)

__all__ = ["MethodConfig", "NetworkSpec", "SSLMethod", "StepContext", "StepOutput", "get_method", "list_methods",
           "register_method", "split_labeled"]
