"""The model registry: names -> builders, with the metadata tests and tools filter on.

Builders are plain functions ``fn(in_channels, num_classes, **options) -> nn.Module`` registered
with :func:`register_model`. :func:`create_model` validates the name and the options before it
builds anything, so that a typo fails at once with the list of valid choices instead of far away.

A network built for one input size (Swin-UNet's ``img_size``) registers a size hook
(``register_model(..., fit_size=...)``): :func:`fit_input_size` rounds a requested training patch
to one the network takes, and :func:`options_for_size` gives the options that build it for a
patch (or refuses a patch it cannot take), so that whoever builds networks for a patch (every
network of a training method, not only the first) needs no per-model special case.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any, Optional, TypeVar

import torch
from torch import nn

__all__ = ["ModelInfo", "create_model", "fit_input_size", "list_models", "model_info", "options_for_size",
           "register_model"]

TASKS = ("segmentation", "discriminator")

_Builder = TypeVar("_Builder", bound=Callable[..., nn.Module])

#: ``fit_size(size, options) -> (fitted size, options)``: the largest input size, at most ``size``
#: per axis (at least the smallest legal one), that the model takes with ``options``, and the
#: options that build it for that size.
SizeHook = Callable[[tuple[int, ...], dict[str, Any]], tuple[tuple[int, ...], dict[str, Any]]]


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about a model without building it.

    Attributes:
        name: Registered name, e.g. ``"unet_3d"``.
        dim: Number of spatial dimensions (2 or 3).
        task: ``"segmentation"`` (``forward(x) -> logits``) or ``"discriminator"``
            (``forward(probs, image) -> (B, num_outputs)``).
        builder: The registered function.
        options: Names of the keyword options the builder accepts (besides ``in_channels`` and
            ``num_classes``).
        summary: First line of the builder's docstring.
        fit_size: Size hook of a network built for one input size (see :data:`SizeHook`), or None
            when the options do not depend on the input size.
    """

    name: str
    dim: int
    task: str
    builder: Callable[..., nn.Module]
    options: tuple[str, ...]
    summary: str
    fit_size: Optional[SizeHook] = None


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(
    name: str, *, dim: int, task: str = "segmentation", fit_size: Optional[SizeHook] = None
) -> Callable[[_Builder], _Builder]:
    """Register a model builder under ``name``.

    The builder must accept ``in_channels`` and ``num_classes`` as its first two parameters; any
    further parameters are the model's options and must have defaults.

    Args:
        name: Unique lower-case name.
        dim: Spatial dimensions of the inputs the model takes (2 or 3).
        task: ``"segmentation"`` or ``"discriminator"``.
        fit_size: For a network built for one input size: ``fit_size(size, options) -> (fitted
            size, options)`` (:data:`SizeHook`), used by :func:`fit_input_size` and
            :func:`options_for_size`.

    Returns:
        A decorator that records the builder and returns it unchanged.

    Raises:
        ValueError: If ``name`` is already registered, or ``dim`` / ``task`` are invalid.

    Example:
        >>> from torch import nn
        >>> @register_model("my_toy_net", dim=2)
        ... def my_toy_net(in_channels: int, num_classes: int) -> nn.Module:
        ...     '''A 1x1 convolution.'''
        ...     return nn.Conv2d(in_channels, num_classes, 1)
        >>> "my_toy_net" in list_models()
        True
        >>> _ = _REGISTRY.pop("my_toy_net")  # keep the doctest from leaking into the registry
    """
    if not isinstance(name, str) or not name or name != name.lower():
        raise ValueError(f"register_model: name must be a non-empty lower-case string, got {name!r}")
    if dim not in (2, 3):
        raise ValueError(f"register_model({name!r}): dim must be 2 or 3, got {dim!r}")
    if task not in TASKS:
        raise ValueError(f"register_model({name!r}): task must be one of {TASKS}, got {task!r}")
    if fit_size is not None and not callable(fit_size):
        raise TypeError(f"register_model({name!r}): fit_size must be callable or None, got {fit_size!r}")

    def decorator(fn: _Builder) -> _Builder:
        if name in _REGISTRY:
            previous = _REGISTRY[name].builder
            raise ValueError(
                f"register_model: model name {name!r} is already registered by "
                f"{previous.__module__}.{previous.__qualname__}; cannot register "
                f"{fn.__module__}.{fn.__qualname__} under the same name"
            )
        params = list(inspect.signature(fn).parameters.values())
        if [p.name for p in params[:2]] != ["in_channels", "num_classes"]:
            raise TypeError(
                f"register_model({name!r}): the builder must take (in_channels, num_classes, ...), "
                f"got parameters {[p.name for p in params]}"
            )
        options = tuple(p.name for p in params[2:] if p.kind is not inspect.Parameter.VAR_KEYWORD)
        summary = (inspect.getdoc(fn) or "").strip().splitlines()
        _REGISTRY[name] = ModelInfo(name, dim, task, fn, options, summary[0] if summary else "", fit_size)
        return fn

    return decorator


def _ensure_registered() -> None:
    # The networks register themselves when their modules are imported; importing the package
    # does that, but a caller could import this module directly.
    import sslseg.models  # noqa: F401


def _unknown_name_error(name: object) -> ValueError:
    available = sorted(_REGISTRY)
    close = difflib.get_close_matches(str(name), available, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(f"Unknown model {name!r}.{hint} Available models: {', '.join(available)}")


def model_info(name: str) -> ModelInfo:
    """Return the registry entry of ``name``.

    Raises:
        ValueError: If no model has that name; the message suggests close names and lists all.
    """
    _ensure_registered()
    if name not in _REGISTRY:
        raise _unknown_name_error(name)
    return _REGISTRY[name]


def list_models(dim: int | None = None, task: str | None = None) -> list[str]:
    """Names of the registered models, sorted.

    Args:
        dim: Keep only models for this many spatial dimensions (2 or 3); ``None`` keeps all.
        task: Keep only ``"segmentation"`` or ``"discriminator"`` models; ``None`` keeps all.

    Example:
        >>> "unet_3d" in list_models(dim=3)
        True
        >>> list_models(task="discriminator")
        ['discriminator', 'discriminator_3d']
    """
    if dim is not None and dim not in (2, 3):
        raise ValueError(f"list_models: dim must be 2, 3 or None, got {dim!r}")
    if task is not None and task not in TASKS:
        raise ValueError(f"list_models: task must be one of {TASKS} or None, got {task!r}")
    _ensure_registered()
    return sorted(
        info.name
        for info in _REGISTRY.values()
        if (dim is None or info.dim == dim) and (task is None or info.task == task)
    )


def _size_tuple(size: Sequence[int], info: ModelInfo, caller: str) -> tuple[int, ...]:
    if (not isinstance(size, Sequence) or len(size) != info.dim
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size)):
        raise ValueError(f"{caller}({info.name!r}): size must be {info.dim} positive ints (one per spatial axis), "
                         f"got {size!r}")
    return tuple(size)


def fit_input_size(name: str, size: Sequence[int], options: Optional[dict[str, Any]] = None) -> tuple[int, ...]:
    """The input size model ``name`` (built with ``options``) takes that is closest to ``size`` from below.

    Per axis the largest legal size at most ``size`` (the smallest legal one when none is). Models
    without a size hook take what they are given (their divisibility is checked at ``forward``).

    Example:
        >>> fit_input_size("swin_unet", (80, 80))
        (64, 64)
        >>> fit_input_size("unet", (80, 80))
        (80, 80)
    """
    info = model_info(name)
    size = _size_tuple(size, info, "fit_input_size")
    if info.fit_size is None:
        return size
    return tuple(info.fit_size(size, dict(options or {}))[0])


def options_for_size(name: str, size: Sequence[int], options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """``options`` completed to build model ``name`` for inputs of ``size`` (Swin-UNet: ``img_size``).

    Raises:
        ValueError: The model cannot be built for ``size``; the message names the closest size that
            works (pass it as the patch size).

    Example:
        >>> options_for_size("swin_unet", (64, 96))["img_size"]
        (64, 96)
    """
    info = model_info(name)
    size = _size_tuple(size, info, "options_for_size")
    opts = dict(options or {})
    if info.fit_size is None:
        return opts
    fitted, opts = info.fit_size(size, opts)
    if tuple(fitted) != size:
        raise ValueError(
            f"model {name!r} cannot take inputs of size {list(size)} with options {options or {}}: the closest size "
            f"it takes is {list(fitted)}; use that patch size (or, for a fixed-size model, drop its size option)"
        )
    return opts


def _check_positive_int(value: Any, arg: str, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"create_model({name!r}): {arg} must be a positive int, got {value!r}")


def create_model(
    name: str, in_channels: int, num_classes: int, *, seed: int | None = None, **options: Any
) -> nn.Module:
    """Build a registered network.

    Args:
        name: A name from :func:`list_models`.
        in_channels: Channels of the input image.
        num_classes: Output channels of the logits (classes, background included). For a
            discriminator, the channels of the probability map it judges.
        seed: If given, parameters are initialised under ``torch.manual_seed(seed)`` inside a forked
            RNG, so the result is reproducible and the caller's global RNG state is left untouched.
            Without it, initialisation draws from the global RNG (so ``torch.manual_seed`` before
            the call works too).
        **options: Model-specific options (see each builder's docstring, or
            ``model_info(name).options``).

    Returns:
        The network, on the CPU, in float32 and in training mode. Segmentation networks follow the
        output contract of :class:`sslseg.models.SegmentationModel`.

    Raises:
        ValueError: Unknown ``name`` (with suggestions) or invalid ``in_channels`` / ``num_classes``.
        TypeError: An option the model does not accept (the message lists the accepted ones).

    Example:
        >>> import torch
        >>> net = create_model("unet", in_channels=1, num_classes=4, seed=0)
        >>> net(torch.zeros(2, 1, 32, 32)).shape
        torch.Size([2, 4, 32, 32])
    """
    info = model_info(name)
    _check_positive_int(in_channels, "in_channels", name)
    _check_positive_int(num_classes, "num_classes", name)
    unknown = sorted(set(options) - set(info.options))
    if unknown:
        accepted = ", ".join(info.options) if info.options else "none"
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, info.options, n=1)
            if close:
                hints.append(f"{key!r} (did you mean {close[0]!r}?)")
            else:
                hints.append(repr(key))
        raise TypeError(
            f"create_model({name!r}) got unexpected option(s) {', '.join(hints)}; accepted options: {accepted}"
        )
    if seed is None:
        model = info.builder(in_channels, num_classes, **options)
    else:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"create_model({name!r}): seed must be an int or None, got {seed!r}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = info.builder(in_channels, num_classes, **options)
    if isinstance(getattr(model, "_model_name", None), str):
        model._model_name = name  # error messages then name the model as the user asked for it
    return model
