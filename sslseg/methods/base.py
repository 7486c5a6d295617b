"""The method contract: a small registered class per semi-supervised method.

The training engine (``sslseg.engine``) owns everything shared (devices, AMP, optimizers, poly LR,
ramp-ups, batches, validation, checkpoints, logging); a method only says what its networks are and
what one step computes:

* ``build()`` creates the networks: ``self.nets`` (trained by the engine's optimizer) and
  ``self.teachers`` (EMA copies and other non-trained networks; no gradients);
* ``step(batch, ctx) -> StepOutput`` computes the loss of one batch (the engine backpropagates it
  and steps the optimizer);
* ``after_step(ctx)`` acts after the optimizer step (EMA updates, a discriminator's own step);
* ``eval_model()`` names the network that is validated, checkpointed as ``best_val`` and exported.

Methods need not know about distributed training: under torchrun the engine runs ``step`` inside
one ``DistributedDataParallel`` wrapper over ``self.nets`` (so a network may be called several
times, or through ``forward_all``), keeps teachers local and identical across ranks, and offers
``ctx.all_reduce_mean`` etc. for the few batch statistics that must be global.

Batches are :class:`sslseg.data.Batch` objects with named fields (``labeled_image``,
``labeled_label``, ``unlabeled_image``, strong views): no ``x[:labeled_bs]`` slicing anywhere.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sslseg.ops import ema_decay, ema_update_

__all__ = [
    "MethodConfig",
    "NetworkSpec",
    "SSLMethod",
    "StepContext",
    "StepOutput",
    "get_method",
    "list_methods",
    "register_method",
]


@dataclass
class MethodConfig:
    """Base of every method's options (subclasses add fields with SSL4MIS defaults)."""


@dataclass(frozen=True)
class NetworkSpec:
    """What a method needs to build its networks.

    Attributes:
        model: Registry name of the segmentation network (``sslseg.models.list_models()``).
        in_channels: Image channels.
        num_classes: Classes including background.
        dim: 2 or 3.
        patch_size: Training patch ``(H, W)`` or ``(D, H, W)``.
        seed: Run seed; networks are initialised from it (each network of a method gets its own
            derived seed, so two-network methods start from different weights).
        model_options: Extra keyword options for ``create_model``.
    """

    model: str
    in_channels: int
    num_classes: int
    dim: int
    patch_size: tuple[int, ...]
    seed: int = 0
    model_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepOutput:
    """What ``SSLMethod.step`` returns.

    Attributes:
        loss: The scalar to backpropagate.
        logs: Detached scalar tensors to log (averaged over the logging window by the engine;
            never ``.item()``-ed per step).
    """

    loss: Tensor
    logs: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class StepContext:
    """Per-step information the engine hands to a method.

    Attributes:
        step: Zero-based optimizer step.
        iterations: Total steps of the run.
        consistency_weight: ``lambda(t)``: the engine's ``consistency`` times the sigmoid ramp-up.
        rampup: The ramp-up factor alone, in ``[0, 1]``.
        device: Device of the batch and the networks.
        autocast: Context manager factory for the run's mixed precision (use around forwards).
        backward: ``backward(loss)``: backpropagates with the run's gradient scaler, if any.
        optimizer_step: ``optimizer_step(opt)``: steps an optimizer with the run's scaler, if any.
        rank / world_size: This process's place in a distributed (DDP) run; 0 and 1 otherwise.
        all_reduce_mean: ``all_reduce_mean(t)``: the mean of ``t`` over the ranks (differentiable;
            the identity in one process). For a batch statistic that must be global, such as the
            normaliser of a ratio loss (UA-MT's mask count, URPC's mean weight): each rank holds
            a shard of the batch, so its local value differs from the whole batch's.
        all_reduce_gradients: ``all_reduce_gradients(params)``: averages ``.grad`` over the ranks
            (no-op in one process); for networks a method steps with its own optimizer outside
            the engine's step (the adversarial discriminator).
        all_gather_object: ``all_gather_object(obj) -> [obj of each rank]`` (``[obj]`` in one
            process), for method state that every rank must update identically (CTAugment rates).
    """

    step: int
    iterations: int
    consistency_weight: float
    rampup: float
    device: torch.device
    autocast: Callable[[], AbstractContextManager]
    backward: Callable[[Tensor], None]
    optimizer_step: Callable[[torch.optim.Optimizer], None]
    rank: int = 0
    world_size: int = 1
    all_reduce_mean: Callable[[Tensor], Tensor] = field(default=lambda t: t)
    all_reduce_gradients: Callable[[Iterable[nn.Parameter]], None] = field(default=lambda params: None)
    all_gather_object: Callable[[Any], list[Any]] = field(default=lambda obj: [obj])


_METHODS: dict[str, type[SSLMethod]] = {}


def register_method(name: str) -> Callable[[type[SSLMethod]], type[SSLMethod]]:
    """Class decorator: register an :class:`SSLMethod` subclass under ``name``."""

    def deco(cls: type[SSLMethod]) -> type[SSLMethod]:
        if name in _METHODS:
            raise ValueError(f"register_method: method {name!r} is already registered by {_METHODS[name].__qualname__}")
        if not (isinstance(cls, type) and issubclass(cls, SSLMethod)):
            raise TypeError(f"register_method: {cls!r} must be a subclass of SSLMethod")
        if not (dataclasses.is_dataclass(cls.Config) and issubclass(cls.Config, MethodConfig)):
            raise TypeError(f"register_method: {cls.__qualname__}.Config must be a MethodConfig dataclass")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def _ensure_registered() -> None:
    import sslseg.methods  # noqa: F401  (importing the package registers every method)


def list_methods(dim: int | None = None) -> list[str]:
    """Registered method names, sorted; ``dim`` keeps those that support 2D or 3D data."""
    _ensure_registered()
    return sorted(n for n, c in _METHODS.items() if dim is None or dim in c.dims)


def get_method(name: str) -> type[SSLMethod]:
    """The method class registered as ``name``; unknown names get a did-you-mean error."""
    _ensure_registered()
    if name not in _METHODS:
        close = difflib.get_close_matches(name, _METHODS, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown method {name!r}.{hint} Available: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


class SSLMethod:
    """Base class of every training method. See the module docstring for the contract.

    Class attributes subclasses set:
        Config: The method's options dataclass (a :class:`MethodConfig`).
        dims: Data dimensionalities supported.
        uses_unlabeled: False for methods that train on labeled data only (``supervised``).
        strong_aug: Loader option for weak/strong methods (False, True/"jitter", "randaugment").
        strong_views: 1, or 2 for two independent strong views (UniMatch).
        log_keys: The keys ``step`` puts in ``StepOutput.logs`` (the tests check them).
        paper: Citation of the method.
        default_model: Network per dimensionality when the user names none (e.g. DTC's
            ``vnet_sdf``, whose signed-distance head it needs).
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    dims: ClassVar[tuple[int, ...]] = (2, 3)
    uses_unlabeled: ClassVar[bool] = True
    strong_aug: ClassVar[bool | str] = False
    strong_views: ClassVar[int] = 1
    log_keys: ClassVar[tuple[str, ...]] = ("loss_sup",)
    paper: ClassVar[str] = ""
    default_model: ClassVar[dict[int, str]] = {2: "unet", 3: "unet_3d"}

    def __init__(self, config: MethodConfig, spec: NetworkSpec) -> None:
        if not isinstance(config, self.Config):
            raise TypeError(f"{self.name}: config must be a {self.Config.__name__}, got {type(config).__name__}")
        if spec.dim not in self.dims:
            raise ValueError(
                f"method {self.name!r} supports {' and '.join(f'{d}D' for d in self.dims)} data, got {spec.dim}D data"
            )
        self.config = config
        self.spec = spec
        self.nets = nn.ModuleDict()
        self.teachers = nn.ModuleDict()
        self._seed_counter = 0

    # ---- networks -------------------------------------------------------------------------------

    def create_network(self, model: str | None = None, *, num_classes: int | None = None, **options: Any) -> nn.Module:
        """A network from the model registry, initialised from a seed derived from the run seed.

        Each call draws the next derived seed, so the networks of a method differ from each other
        and are identical across runs with the same seed.
        """
        from sslseg.models import create_model

        opts = {**self.spec.model_options, **options}
        name = model or self.spec.model
        if name == "swin_unet" and "img_size" not in opts:
            opts["img_size"] = self.spec.patch_size[-1]
        seed = self.spec.seed * 1000 + self._seed_counter
        self._seed_counter += 1
        return create_model(name, self.spec.in_channels, num_classes or self.spec.num_classes, seed=seed, **opts)

    @staticmethod
    def make_teacher(student: nn.Module) -> nn.Module:
        """An EMA teacher: a copy of ``student`` with gradients off."""
        teacher = copy.deepcopy(student)
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    def build(self) -> None:
        """Create ``self.nets`` (trained) and ``self.teachers`` (not trained). Default: one student."""
        self.nets["student"] = self.create_network()

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the engine's optimizer updates (default: every network in ``self.nets``)."""
        return (p for p in self.nets.parameters() if p.requires_grad)

    def extra_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Optimizers the method steps itself (e.g. a discriminator's); checkpointed by the engine.

        Under DDP the engine synchronises the gradients of :meth:`trainable_parameters` only; a
        method stepping another network's optimizer averages its gradients first with
        ``ctx.all_reduce_gradients(params)``.
        """
        return {}

    def eval_model(self) -> nn.Module:
        """The network validated, saved as ``best_val`` and exported (default: ``nets["student"]``)."""
        return self.nets["student"]

    def networks(self) -> dict[str, nn.Module]:
        """Every network, trained or not, by name (``nets.<name>`` / ``teachers.<name>``)."""
        out = {f"nets.{k}": v for k, v in self.nets.items()}
        out.update({f"teachers.{k}": v for k, v in self.teachers.items()})
        return out

    def train(self) -> None:
        """Put the trained networks in training mode (teachers keep the mode they document)."""
        self.nets.train()

    # ---- one step -------------------------------------------------------------------------------

    def step(self, batch: Any, ctx: StepContext) -> StepOutput:
        """Compute the loss of one batch; see the class docstring."""
        raise NotImplementedError(f"{type(self).__name__} must implement step()")

    def after_step(self, ctx: StepContext) -> None:
        """Called after the optimizer step (default: nothing)."""

    def ema_update(self, teacher: str, student: str, decay: float, ctx: StepContext, *, include_buffers: bool = True) -> None:
        """Mean Teacher's EMA of ``nets[student]`` into ``teachers[teacher]``, with its warm-up rule."""
        ema_update_(self.teachers[teacher], self.nets[student], ema_decay(ctx.step, decay), include_buffers=include_buffers)

    # ---- method state beyond networks and optimizers (e.g. CTAugment rates) ---------------------

    def extra_state(self) -> dict[str, Any]:
        """State to checkpoint besides networks and optimizers (tensors and plain Python only)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""

    @classmethod
    def describe(cls) -> str:
        """One line per option: name, default and type (``sslseg methods``)."""
        lines = []
        for f in dataclasses.fields(cls.Config):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            lines.append(f"{f.name}={default!r}")
        return ", ".join(lines)
