"""Loading of the compiled operators (``sslseg._C``, ``sslseg._C_cuda``), and the one rule that picks
an op's backend.

Importing ``sslseg._C`` runs the static registrations of every ``torch.ops.sslseg.*`` schema and
CPU kernel; ``sslseg._C_cuda`` adds the CUDA kernels and is imported only when the running torch is
a CUDA build (it links libtorch_cuda, which a CPU-only torch lacks). Both target the LibTorch stable
ABI, so one wheel loads in every torch from its target release on. When ``sslseg._C`` is missing
or broken, op wrappers fall back to their pure-PyTorch reference twins and warn once; with
``SSLSEG_REQUIRE_OPS=1`` (set by the tests and CI) they raise instead, so that a broken build cannot
hide behind the fallback.

Every op wrapper asks :func:`backend_for` whether to call the compiled kernel or its reference twin
(see there for the rule). ``SSLSEG_OPS=reference`` in the environment, or
:func:`set_backend` ``("reference")``, is the safety valve: every op then runs its pure-PyTorch
twin on every device (same results within the tests' tolerances, slower), e.g. to rule out or work
around a kernel bug on a GPU without reinstalling.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from functools import lru_cache

import torch

_REQUIRE_ENV = "SSLSEG_REQUIRE_OPS"
_BACKEND_ENV = "SSLSEG_OPS"
#: The two ways an op runs: the compiled kernel (``torch.ops.sslseg.*``) or its pure-PyTorch twin.
BACKENDS = ("compiled", "reference")
# set_backend's choice for this process; None defers to SSLSEG_OPS, then to the automatic rule.
_forced: str | None = None


def dtype_name(dtype: torch.dtype) -> str:
    """Python's short name of a dtype (``"float32"``), as the kernels' messages spell it (csrc/checks.h)."""
    return str(dtype).removeprefix("torch.")


@lru_cache(maxsize=None)
def _load() -> tuple[bool, str]:
    """Import ``sslseg._C`` (then ``sslseg._C_cuda``) once; returns (loaded, error text)."""
    try:
        importlib.import_module("sslseg._C")
    except Exception as exc:  # ImportError, OSError (bad rpath), RuntimeError (schema clash)
        return False, f"{type(exc).__name__}: {exc}"
    _load_cuda()
    return True, ""


def _compiled_info() -> dict[str, str]:
    """``sslseg::_build_info`` (``"abi_target=2.10;built_with_torch=...;cuda_built=13.0"``) as a dict."""
    return dict(item.split("=", 1) for item in torch.ops.sslseg._build_info().split(";"))


@lru_cache(maxsize=None)
def _load_cuda() -> tuple[bool, str]:
    """Import ``sslseg._C_cuda`` once, after ``sslseg._C``; returns (loaded, why not)."""
    if not torch.version.cuda:
        return False, f"torch {torch.__version__} is a CPU-only build"
    built = _compiled_info()["cuda_built"]
    if built == "none" or importlib.util.find_spec("sslseg._C_cuda") is None:
        return False, "this sslseg build has no CUDA kernels (built with SSLSEG_CUDA=OFF or without a CUDA toolkit)"
    if built.split(".")[0] != torch.version.cuda.split(".")[0]:
        # The kernels link the CUDA runtime of their toolkit dynamically: another major would load
        # a second runtime (if the system has one) beside torch's.
        return False, f"sslseg's CUDA kernels were built for CUDA {built}, torch {torch.__version__} uses CUDA {torch.version.cuda}"
    try:
        importlib.import_module("sslseg._C_cuda")
    except Exception as exc:  # a CUDA major version other than the one the kernels were built for
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def has_ops() -> bool:
    """True when the compiled sslseg operators are loaded and registered."""
    return _load()[0]


def _failure_message() -> str:
    error = _load()[1]
    return (
        "sslseg's compiled operators (sslseg._C) could not be loaded.\n"
        f"  error: {error}\n"
        f"  torch: {torch.__version__} (CUDA {torch.version.cuda})\n"
        "Likely causes: sslseg was installed without building the extension, or the installed torch\n"
        "is older than the extension's stable-ABI target (sslseg.ops.build_info() once it loads;\n"
        "csrc/README.md).\n"
        "Fix: upgrade torch, or reinstall sslseg with\n"
        "  pip install .                                 (from a source checkout)\n"
        "  pip install --force-reinstall --no-deps sslseg\n"
        "and, for the real dlopen error, run: python -c \"import torch, ctypes, sslseg, glob, os; "
        "ctypes.CDLL(glob.glob(os.path.join(os.path.dirname(sslseg.__file__), '_C*.so'))[0])\""
    )


def require_ops() -> None:
    """Raise ``RuntimeError`` with the likely cause and fix unless the compiled ops are loaded."""
    if not has_ops():
        raise RuntimeError(_failure_message())


def ops_required() -> bool:
    """True when ``SSLSEG_REQUIRE_OPS`` asks for a missing extension to be an error."""
    return os.environ.get(_REQUIRE_ENV, "0").strip().lower() not in ("", "0", "false", "no")


@lru_cache(maxsize=None)
def _warn_fallback_once() -> None:
    warnings.warn(
        "sslseg: compiled operators unavailable, using the pure-PyTorch reference "
        f"implementations (slower). Set {_REQUIRE_ENV}=1 to make this an error.\n" + _failure_message(),
        RuntimeWarning,
        stacklevel=3,
    )


def use_compiled() -> bool:
    """Whether op wrappers should call ``torch.ops.sslseg``; warns once or raises otherwise."""
    if has_ops():
        return True
    if ops_required():
        require_ops()
    _warn_fallback_once()
    return False


def set_backend(name: str | None) -> None:
    """Run every sslseg op on one backend in this process, on every device, or undo that.

    Args:
        name: ``"reference"``: the pure-PyTorch twins (the safety valve: slower, same results
            within the tests' tolerances); ``"compiled"``: the compiled kernels, an error now if
            they are missing; ``None``: back to ``SSLSEG_OPS`` or, unset, the automatic choice.

    Raises:
        ValueError: ``name`` is none of these.
        RuntimeError: ``"compiled"`` while the compiled operators could not be loaded.
    """
    if name is not None and name not in BACKENDS:
        raise ValueError(f"set_backend: name must be one of {list(BACKENDS)} or None, got {name!r}")
    if name == "compiled":
        require_ops()
    global _forced
    _forced = name


def _requested() -> str | None:
    """The backend the user asked for (:func:`set_backend`, else ``SSLSEG_OPS``), or None."""
    if _forced is not None:
        return _forced
    raw = os.environ.get(_BACKEND_ENV, "")
    value = raw.strip().lower()
    if value in ("", "auto"):
        return None
    if value not in BACKENDS:
        raise ValueError(f"environment variable {_BACKEND_ENV} must be one of {list(BACKENDS)}, 'auto' or unset, "
                         f"got {raw!r}")
    return value


@torch.compiler.assume_constant_result
def _loaded_while_tracing() -> bool:
    # torch.compile cannot trace the loader's import machinery: evaluated once, at trace time.
    return has_ops()


def backend_for(choice: str | None = None) -> str:
    """The backend an op call runs on: ``"compiled"`` or ``"reference"``.

    The one rule every op wrapper follows:

    1. ``choice`` when a caller passes one for this call (``"reference"``, or ``"compiled"``,
       which raises if the extension is missing);
    2. else the backend the user forced: :func:`set_backend`, else the environment variable
       ``SSLSEG_OPS`` (``compiled``, ``reference``; ``auto`` or unset: no preference), read at
       each call (under ``torch.compile``, when the function is traced);
    3. while ``torch.compile`` or ``torch.export`` traces: the compiled op when the extension is
       loaded (its fake kernel describes it to the tracer), else the reference twin;
    4. else the compiled op when the extension is loaded; otherwise the reference twin after a
       one-time warning, or an error under ``SSLSEG_REQUIRE_OPS=1``.

    Raises:
        ValueError: a bad ``choice`` or ``SSLSEG_OPS`` value.
        RuntimeError: the compiled ops are required (``"compiled"`` or ``SSLSEG_REQUIRE_OPS=1``)
            but could not be loaded.
    """
    if choice is not None and choice not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)} or None, got {choice!r}")
    requested = choice if choice is not None else _requested()
    if requested == "reference":
        return "reference"
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return "compiled" if requested == "compiled" or _loaded_while_tracing() else "reference"
    if requested == "compiled":
        require_ops()
        return "compiled"
    return "compiled" if use_compiled() else "reference"


def backend() -> str:
    """The backend sslseg's ops run on now: ``"compiled"`` or ``"reference"`` (see :func:`backend_for`).

    Raises where an op call would: a bad ``SSLSEG_OPS`` value, or missing compiled operators
    that are required.
    """
    return backend_for(None)


def build_info() -> dict[str, str]:
    """What the loaded extension targets and whether its CUDA kernels are loaded.

    Keys: ``abi_target`` (the oldest torch the binaries load in: the LibTorch stable-ABI target),
    ``built_with_torch`` (the torch whose headers compiled them), ``cuda_built`` (the CUDA toolkit
    of ``sslseg._C_cuda``, ``"none"`` without one), ``torch`` (the running torch),
    ``cuda`` (``"1"`` when ``sslseg._C_cuda`` is loaded and its kernels registered, else ``"0"``)
    and ``cuda_module`` (``"loaded"`` or why not).
    """
    require_ops()
    info = _compiled_info()
    cuda_loaded, why = _load_cuda()
    info.update(torch=torch.__version__, cuda="1" if cuda_loaded else "0", cuda_module="loaded" if cuda_loaded else why)
    return info


# Ops that take no tensors and so have one backend-independent kernel.
_DEVICE_INDEPENDENT = frozenset({"sslseg::_build_info", "sslseg::_ema_plan_update", "sslseg::_ema_plan_free"})


def list_ops() -> list[str]:
    """Qualified names (``sslseg::<op>``) of every registered sslseg operator."""
    require_ops()
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("sslseg::"))


def missing_kernels(dispatch_key: str) -> list[str]:
    """Ops that have no kernel for ``dispatch_key`` (``"CPU"`` or ``"CUDA"``); empty when complete."""
    return [
        name
        for name in list_ops()
        if name not in _DEVICE_INDEPENDENT and not torch._C._dispatch_has_kernel_for_dispatch_key(name, dispatch_key)
    ]
