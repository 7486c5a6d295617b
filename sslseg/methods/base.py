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
``labeled_label``, ``unlabeled_image``, strong views): no ``x[:labeled_bs]`` slicing anywhere. A
network run on ``batch.images()`` (labeled samples first) gives logits that
:func:`split_labeled` cuts into their labeled and unlabeled parts.

Shared scaffolding, so that a method file holds only what is particular to it:

* :meth:`SSLMethod.create_network`: a registry network from a derived seed, built for the
  training patch (the registry's size hook, e.g. Swin-UNet's ``img_size``), with the run's
  ``model_options`` only when it is the run's network (``inherit_options``);
* :meth:`SSLMethod.add_ema_teacher`: a frozen EMA copy of a trained network, put in the mode the
  method documents by :meth:`SSLMethod.train` and updated by :meth:`SSLMethod.after_step`;
* option checks live in each ``Config.__post_init__``, so a bad option fails when the config is
  made, before any network is built.
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

from sslseg.data import Batch
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
    "split_labeled",
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


def split_labeled(x: Tensor, labeled: Batch | int) -> tuple[Tensor, Tensor]:
    """Split a tensor over labeled-then-unlabeled samples into ``(labeled part, unlabeled part)``.

    The one place where a method cuts a network's output (or any per-sample tensor) of
    ``batch.images()``, ``cat([labeled, unlabeled])`` or ``cat([labeled, mixed])`` at the labeled
    count. Both parts are views of ``x``.

    Args:
        x: ``(B, ...)`` tensor whose first ``B_l`` samples are the labeled ones.
        labeled: The batch (its ``labeled_bs`` is used) or the labeled count ``B_l``.

    Returns:
        ``(x_l, x_u)`` of ``B_l`` and ``B - B_l`` samples.

    Example:
        >>> z_l, z_u = split_labeled(torch.zeros(5, 3), 2)
        >>> z_l.shape[0], z_u.shape[0]
        (2, 3)
    """
    n_l = labeled.labeled_bs if isinstance(labeled, Batch) else labeled
    if isinstance(n_l, bool) or not isinstance(n_l, int) or not 0 <= n_l <= x.shape[0]:
        raise ValueError(f"split_labeled: the labeled count must be an int in [0, {x.shape[0]}] (the samples of x), "
                         f"got {n_l!r}")
    return x.split([n_l, x.shape[0] - n_l])


@dataclass(frozen=True)
class _EMATeacher:
    """How :meth:`SSLMethod.add_ema_teacher` keeps one teacher (by name, so tests may swap the module)."""

    student: str
    decay: float
    include_buffers: bool
    train_mode: bool


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
        strong_aug: The loader's strong view for weak/strong methods (False, True/"jitter",
            "randaugment", or a callable); a method whose config chooses it (UniMatch's
            ``strong_aug`` option) overrides :meth:`strong_augment` instead.
        strong_views: 1, or 2 for two independent strong views (UniMatch).
        log_keys: The keys ``step`` puts in ``StepOutput.logs`` (the tests check them).
        paper: Citation of the method.
        default_model: Network per dimensionality when the user names none (e.g. DTC's
            ``vnet_sdf``, whose signed-distance head it needs).

    How a method's unlabeled-loss weight meets the engine's ``consistency`` options is what
    :meth:`consistency_mode` returns for its config (see that method).
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
        self._ema_teachers: dict[str, _EMATeacher] = {}

    # ---- networks -------------------------------------------------------------------------------

    def create_network(self, model: str | None = None, *, num_classes: int | None = None,
                       inherit_options: bool = True, **options: Any) -> nn.Module:
        """A network from the model registry, initialised from a seed derived from the run seed.

        Each call draws the next derived seed, so the networks of a method differ from each other
        and are identical across runs with the same seed. The network is built for the training
        patch: models with a size hook in the registry (Swin-UNet's ``img_size``) get the options
        for it, and a patch they cannot take is refused here, naming the sizes that work.

        Args:
            model: Registry name; None: the run's network (``spec.model``).
            num_classes: Output channels; None: the run's classes.
            inherit_options: Start from the run's ``model_options``. They are meant for the run's
                network (and variants of it, such as CPS's second network); a network of another
                kind (CTCT's transformer, a discriminator) passes False and only its own options.
            **options: Options for this network, over the inherited ones.
        """
        from sslseg.models import create_model
        from sslseg.models._registry import options_for_size

        name = model or self.spec.model
        opts = {**(self.spec.model_options if inherit_options else {}), **options}
        opts = options_for_size(name, self.spec.patch_size, opts)
        seed = self.spec.seed * 1000 + self._seed_counter
        self._seed_counter += 1
        return create_model(name, self.spec.in_channels, num_classes or self.spec.num_classes, seed=seed, **opts)

    @classmethod
    def fit_patch(cls, patch: tuple[int, ...], config: MethodConfig, model: str,
                  model_options: dict[str, Any]) -> tuple[int, ...]:
        """The largest patch, at most ``patch`` per axis, that every network of the method accepts.

        The engine rounds its default patch with it, so that each network the method builds gets a
        legal input size (not only the run's network). Default: the run's network alone; a method
        that builds a network of another kind adds it (CTCT's transformer).
        """
        from sslseg.models._registry import fit_input_size

        return fit_input_size(model, patch, model_options)

    @classmethod
    def consistency_mode(cls, config: MethodConfig) -> str | None:
        """How this method weights its unlabeled loss, which decides the engine options it takes.

        * ``"ramp"``: the loss is weighted by ``ctx.consistency_weight``, the sigmoid ramp-up of
          the config's ``consistency`` over ``consistency_rampup`` steps; the engine's
          ``consistency`` sets that option and ``consistency_rampup`` the ramp length;
        * ``"constant"``: the config's ``consistency`` weights every step (FixMatch without
          ramp-up); the engine's ``consistency`` sets it, ``consistency_rampup`` is refused;
        * None: the method has no such weight (its weights are its own options, e.g. BCP's
          ``u_weight``); the engine's ``consistency`` and ``consistency_rampup`` are refused.

        Default: ``"ramp"`` when the config has a ``consistency`` field, else None.
        """
        return "ramp" if any(f.name == "consistency" for f in dataclasses.fields(config)) else None

    @staticmethod
    def make_teacher(student: nn.Module) -> nn.Module:
        """An EMA teacher: a copy of ``student`` with gradients off."""
        teacher = copy.deepcopy(student)
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    def add_ema_teacher(self, name: str = "teacher", student: str = "student", *, decay: float,
                        include_buffers: bool = True, train_mode: bool = True) -> nn.Module:
        """Add ``teachers[name]``: a frozen copy of ``nets[student]`` that follows it by EMA.

        :meth:`train` puts it in training mode (dropout and batch-statistics BatchNorm as noise,
        as SSL4MIS's teachers) or eval mode (``train_mode=False``); :meth:`after_step` updates it
        with ``sslseg.ops.ema_update_`` at the decay :meth:`teacher_decay` gives (default: Mean
        Teacher's warm-up ``min(1 - 1/(t+1), decay)``).

        Args:
            name: Key in ``self.teachers``.
            student: Key in ``self.nets`` of the network it copies and follows.
            decay: EMA decay.
            include_buffers: Average floating buffers (BatchNorm statistics) too.
            train_mode: Mode of the teacher during training.

        Returns:
            The teacher.
        """
        if name in self.teachers:
            raise ValueError(f"{self.name}: a teacher named {name!r} already exists")
        self.teachers[name] = self.make_teacher(self.nets[student])
        self._ema_teachers[name] = _EMATeacher(student, float(decay), include_buffers, train_mode)
        return self.teachers[name]

    def teacher_decay(self, name: str, ctx: StepContext) -> float:
        """The EMA decay of teacher ``name`` after step ``ctx.step`` (Mean Teacher's warm-up rule)."""
        return ema_decay(ctx.step, self._ema_teachers[name].decay)

    def build(self) -> None:
        """Create ``self.nets`` (trained) and ``self.teachers`` (not trained). Default: one student."""
        self.nets["student"] = self.create_network()

    def strong_augment(self) -> bool | str | Callable[..., Tensor]:
        """The ``strong_aug`` the engine passes to the training loader for this run.

        Default: the class's ``strong_aug``; a method with a config choice resolves it here.
        """
        return type(self).strong_aug

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
        """Put the trained networks in training mode and EMA teachers in the mode they were added with."""
        self.nets.train()
        for name, ema in self._ema_teachers.items():
            self.teachers[name].train(ema.train_mode)

    # ---- one step -------------------------------------------------------------------------------

    def step(self, batch: Any, ctx: StepContext) -> StepOutput:
        """Compute the loss of one batch; see the class docstring."""
        raise NotImplementedError(f"{type(self).__name__} must implement step()")

    def after_step(self, ctx: StepContext) -> None:
        """Called after the optimizer step (default: the EMA update of the teachers of :meth:`add_ema_teacher`)."""
        self.update_ema_teachers(ctx)

    def update_ema_teachers(self, ctx: StepContext) -> None:
        """One EMA update of every teacher added with :meth:`add_ema_teacher`, from its student."""
        for name, ema in self._ema_teachers.items():
            ema_update_(self.teachers[name], self.nets[ema.student], self.teacher_decay(name, ctx),
                        include_buffers=ema.include_buffers)

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
