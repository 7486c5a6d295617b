"""The one training loop: ``sslseg.fit(method, data, ...)``.

Everything that SSL4MIS repeats in each of its scripts lives here once: seeds, devices, AMP, the
optimizer and poly LR, the consistency ramp-up, the two-stream batches, validation on the
validation split, atomic checkpoints with resume, logging without per-step host syncs, and
distributed data-parallel training under torchrun.

Distributed runs (``torchrun --nproc_per_node N -m sslseg fit ...``): ``batch_size`` and
``labeled_bs`` are global and split evenly over the ranks; the method's step runs inside one
``DistributedDataParallel`` wrapper over its trained networks (gradients averaged), EMA teachers
stay local and identical, batch statistics of the losses are summed over the ranks, validation is
sharded by case and combined exactly, and rank 0 alone writes files.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from sslseg._version import __version__
from sslseg.engine.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from sslseg.engine.config import EngineConfig, config_to_dict, load_yaml, resolve_method_options, update_dataclass
from sslseg.engine.distributed import cleanup, init_distributed
from sslseg.engine.logger import RunLogger, middle_slice_prediction, plot_progress, use_tensorboard
from sslseg.engine.run import MODEL_FILES, MODEL_FORMAT, Run
from sslseg.engine.validation import validate
from sslseg.methods.base import NetworkSpec, SSLMethod, StepContext, get_method
from sslseg.utils import distributed as dist
from sslseg.utils.schedules import consistency_weight, poly_lr, sigmoid_rampup
from sslseg.utils.precision import autocast, resolve_amp

__all__ = ["NonFiniteLossError", "Trainer", "fit"]

_LAST, _BEST = "last.pt", MODEL_FILES["best_val"]
_PLAN = "plan.json"
#: Salt of the per-rank seeds (rank r > 0 of a distributed run reseeds its global RNGs after the
#: networks are built, so dropout and noise differ across ranks; rank 0 keeps the run seed's stream).
_RANK_SEED_KEY = 0x5EED


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or Inf; the message names the step and the last good checkpoint.

    Attributes:
        step: The first step (1-based, as in ``history.jsonl``) whose loss was not finite.
        checkpoint: The last checkpoint written before it (``last.pt``), or None if none was.
    """

    def __init__(self, message: str, step: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


def _to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor moved to the CPU (objects gathered across ranks are pickled)."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def combine_validation(results: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Merge the validation results of disjoint case shards into the result over all cases.

    Each result holds means over its ``cases``; the merge weights them by ``cases``, so it equals a
    single validation over the union exactly (up to float rounding). Floats and lists of floats are
    weighted means, ``cases`` and other integers (counts) are summed, anything else is taken from
    the first shard. ``None`` entries (ranks without validation cases) are skipped.
    """
    parts = [r for r in results if r is not None]
    if not parts:
        raise ValueError("combine_validation: no rank validated any case")
    total = sum(int(r["cases"]) for r in parts)
    out: dict[str, Any] = {}
    for key, first in parts[0].items():
        values = [r[key] for r in parts]
        if isinstance(first, bool) or key == "step":
            out[key] = first
        elif isinstance(first, int):
            out[key] = sum(values)
        elif isinstance(first, float):
            out[key] = sum(v * r["cases"] for v, r in zip(values, parts)) / total
        elif isinstance(first, list) and all(isinstance(x, (int, float)) for x in first):
            out[key] = [sum(v[i] * r["cases"] for v, r in zip(values, parts)) / total for i in range(len(first))]
        else:
            out[key] = first
    return out


class _StepModule(nn.Module):
    """The method's step as a module over its trained networks, so one DDP wrapper covers them all.

    Wrapping each network separately would break methods that call a network twice per step or
    through ``forward_all``; wrapping the step keeps the method unaware of DDP.
    """

    def __init__(self, method: SSLMethod, device: torch.device) -> None:
        super().__init__()
        self.nets = method.nets
        self._method = method
        # A parameter no step uses: DDP's unused-parameter search (needed for auxiliary heads, or a
        # branch a method skips at some steps) then always finds one, instead of warning on every
        # run whose steps happen to use every parameter. It is in no optimizer and no checkpoint.
        self.sentinel = nn.Parameter(torch.zeros((), device=device))

    def forward(self, batch: Any, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        out = self._method.step(batch, ctx)
        return out.loss, out.logs


def _wrap_ddp(method: SSLMethod, device: torch.device) -> nn.parallel.DistributedDataParallel:
    module = _StepModule(method, device)
    # Gradients of networks outside the engine's optimizer (a discriminator with its own optimizer)
    # are not the engine's to synchronise: the method averages them when it steps that optimizer.
    trained = {id(p) for p in method.trainable_parameters()} | {id(module.sentinel)}
    ignored = [name for name, p in module.named_parameters() if id(p) not in trained]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignored)
    # Buffers are synchronised at construction only: the loop averages them after every step,
    # which makes DDP's rank-0 broadcast before each forward redundant.
    ddp = nn.parallel.DistributedDataParallel
    no_forward_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                       else {"broadcast_buffers": False})  # older torch
    return ddp(module, device_ids=None, find_unused_parameters=True, **no_forward_sync)


def _labeled_value(labeled: float | int | str | None) -> int | float | None:
    """A count (int), a fraction in (0, 1) (float), or None for every training case (``"all"``)."""
    if labeled is None or (isinstance(labeled, str) and labeled.strip().lower() == "all"):
        return None
    if isinstance(labeled, bool) or not isinstance(labeled, (int, float)) or labeled <= 0:
        raise ValueError(f"labeled must be a case count >= 1, a fraction in (0, 1) or 'all', got {labeled!r}")
    if float(labeled).is_integer() and labeled >= 1:
        return int(labeled)
    return float(labeled)


def _default_patch(dataset: Any, dim: int, divisor: int = 16) -> list[int]:
    """The first training volume's in-plane size (2D, at most 256) or at most 96^3 (3D), rounded down
    to a multiple of ``divisor``."""
    shape = dataset.record(dataset.volume_ids[0]).shape()
    sizes = list(shape[1:]) if dim == 2 else list(shape)
    cap = 256 if dim == 2 else 96
    return [max(divisor, (min(s, cap) // divisor) * divisor) for s in sizes]


def _input_intensity(dataset: Any) -> str:
    """The per-volume normalisation that turns a scan as stored into what the network saw.

    ``none`` for SSL4MIS h5 layouts and phantoms (stored normalised, read as they are) and for
    planned data (the plan, recorded beside it, normalises); the reader's mode for NIfTI folders
    read without a plan.
    """
    if dataset.plan is not None or dataset.layout != "nifti":
        return "none"
    return dataset.intensity


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def fit(
    method: str,
    data: str | None = None,
    *,
    labeled: float | int | str | None = None,
    iterations: int | None = None,
    model: str | None = None,
    seed: int | None = None,
    out_dir: str | Path | None = None,
    device: str | None = None,
    amp: str | None = None,
    resume: str | Path | None = None,
    config: str | Path | dict | None = None,
    engine_options: dict[str, Any] | None = None,
    **method_options: Any,
) -> Run:
    """Train with a semi-supervised method and return the finished :class:`Run`.

    Args:
        method: A name from ``sslseg.list_methods()`` (``"cps"``, ``"mean_teacher"``, ...).
        data: Dataset spec: a data folder (SSL4MIS h5 layouts, NIfTI) or ``synthetic:<kind>``
            (default ``synthetic:acdc``).
        labeled: Labeled cases: a count (``7``; ``1.0`` is one case), a fraction of the training
            cases in (0, 1) (``0.1``) or ``"all"``; None: the config's value (default 7).
        iterations: Optimizer steps.
        model: Network name (``sslseg.models.list_models()``); default ``unet`` / ``unet_3d``.
        seed: Seed of the split, networks, batches and augmentations.
        out_dir: Run directory (default ``runs/<method>-<data>-l<labeled>-s<seed>-<time>``).
        device: ``cpu`` / ``cuda[:i]``; default CUDA if available.
        amp: ``"auto"`` (the config default: bf16 where the device has it natively), ``"none"``,
            ``"bf16"`` or ``"fp16"`` (CUDA only); see :mod:`sslseg.utils.precision`.
        resume: A run directory: continue it from its ``last.pt`` (its saved config is used;
            ``iterations`` may be raised to train longer).
        config: A YAML file (or dict) ``{"engine": {...}, "method": {...}}`` overlaying the
            defaults; explicit arguments override it.
        engine_options: Further engine options (see :class:`EngineConfig`), e.g.
            ``{"batch_size": 8, "val_every": 100}``.
        **method_options: Options of the method's config dataclass (``sslseg methods`` lists them).

    Returns:
        The :class:`Run`: ``.model`` (the eval network with its best validation weights),
        ``.metrics`` (``best_val`` and ``last``), ``.dir``, ``.config``, ``.history``.

    Under torchrun (``WORLD_SIZE`` > 1) or inside an initialised ``torch.distributed`` process
    group, the run is data-parallel over the ranks (``batch_size`` and ``labeled_bs`` are global,
    divided evenly); every rank returns the same :class:`Run`, read back after rank 0 wrote it.

    Example:
        >>> run = sslseg.fit("mean_teacher", "synthetic:acdc", labeled=7, iterations=2000)  # doctest: +SKIP
    """
    cls = get_method(method)
    file_cfg: dict[str, Any] = {}
    if resume is not None:
        resume = Path(resume)
        file_cfg = load_yaml(resume / "config.yaml")
        if file_cfg.get("method_name", method) != method:
            raise ValueError(f"resume: {resume} is a {file_cfg['method_name']!r} run, not {method!r}")
    elif isinstance(config, dict):
        file_cfg = config
    elif config is not None:
        file_cfg = load_yaml(config)
    explicit = {k: v for k, v in dict(data=data, labeled=labeled, iterations=iterations, model=model, seed=seed,
                                       device=device, amp=amp).items() if v is not None}
    explicit.update(engine_options or {})
    eng = update_dataclass(EngineConfig(), file_cfg.get("engine", {}), where="config engine section")
    eng = update_dataclass(eng, explicit, where="fit()")
    mcfg = update_dataclass(cls.Config(), file_cfg.get("method", {}), where=f"config method section ({method})")
    mcfg = update_dataclass(mcfg, method_options, where=f"fit() options of method {method!r}")
    return Trainer(cls, eng, mcfg, out_dir=resume or out_dir, resume=resume is not None).run()


class Trainer:
    """One training run, built but not started: :func:`fit` is ``Trainer(...).run()`` on resolved configs.

    Constructing it does everything before the first step: joins the process group, seeds the
    global RNGs, loads the data and the split, builds the method's networks, the optimizer and the
    batch loader, and picks the run directory (nothing is written yet). Tests and benchmarks build
    one to look inside a run (``trainer.method.nets``) or to drive its parts (``trainer.loader``,
    ``trainer.optimizer``) themselves; everyone else calls :func:`fit`.

    Args:
        method: A method name (``"mean_teacher"``) or its registered class.
        engine: The engine options, complete (:class:`~sslseg.engine.EngineConfig`).
        method_config: The method's config dataclass; default ``method.Config()``.
        out_dir: Run directory (default: a new one under ``runs/``); for ``resume`` the run to continue.
        resume: Continue the run in ``out_dir`` from its ``last.pt`` (same configs, same split).

    Attributes:
        method: The :class:`~sslseg.methods.SSLMethod` with its networks built, on ``device``.
        spec: The :class:`~sslseg.methods.NetworkSpec` the networks were built from.
        optimizer: SGD over the method's trainable parameters.
        loader: The labeled + unlabeled batch loader (``loader.forever()`` yields batches).
        device: This rank's device.
        eng: The engine options (``engine``).
        dir: The run directory.

    Call :meth:`run` once to train; it returns the finished :class:`~sslseg.engine.Run` and
    releases what the run held (process group, determinism flags, logger), also on error.
    """

    def __init__(self, method: str | type[SSLMethod], engine: EngineConfig, method_config: Any = None, *,
                 out_dir: str | Path | None = None, resume: bool = False) -> None:
        cls = get_method(method) if isinstance(method, str) else method
        if not (isinstance(cls, type) and issubclass(cls, SSLMethod)):
            raise TypeError(f"Trainer: method must be a method name or an SSLMethod subclass, got {method!r}")
        if not isinstance(engine, EngineConfig):
            raise TypeError(f"Trainer: engine must be an EngineConfig, got {type(engine).__name__}")
        mcfg = cls.Config() if method_config is None else method_config  # the method checks its type
        if isinstance(mcfg, cls.Config):  # engine options the method ignores are refused before any work
            mcfg = resolve_method_options(engine, cls, mcfg)
        self.cls, self.eng, self.mcfg, self.resume = cls, engine, mcfg, resume
        self.dist, self.device = init_distributed(engine.device)
        # Deterministic mode is process-global in torch: remember the caller's setting and
        # restore it when the run ends (run()'s finally), so fit() leaves no global state behind.
        self._prev_deterministic = (torch.are_deterministic_algorithms_enabled(),
                                    torch.is_deterministic_algorithms_warn_only_enabled(),
                                    torch.backends.cudnn.benchmark)
        self.logger: RunLogger | None = None
        try:
            self._setup(out_dir)
        except BaseException:
            self._release()
            raise

    def _setup(self, out_dir: str | Path | None) -> None:
        import sslseg.data

        cls, eng, mcfg, world, rank = self.cls, self.eng, self.mcfg, self.dist.world_size, self.dist.rank
        resolve_amp(eng.amp, self.device)  # a bad value or fp16 off CUDA is refused before the data loads
        if eng.sync_bn and self.dist.enabled and self.device.type != "cuda":
            raise ValueError(f"sync_bn=True needs CUDA devices (torch's SyncBatchNorm has no {self.device.type} "
                             "kernel); use sync_bn=False on the CPU")
        self.tensorboard = use_tensorboard(eng.tensorboard)
        _seed_everything(eng.seed)
        if eng.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        self.dataset = sslseg.data.load(eng.data, num_classes=eng.num_classes)
        self._prepare_data(out_dir)
        self.dim = self.dataset.dim
        self.precision = resolve_amp(eng.amp, self.device, dim=self.dim, training=True)
        self.amp_dtype = self.precision.dtype
        if eng.ssl4mis_aug and self.dim != 2:
            raise ValueError(f"ssl4mis_aug=True is SSL4MIS's 2D resampling; {eng.data} is {self.dim}D data")
        labeled = _labeled_value(eng.labeled)
        if self.resume:
            self.split = sslseg.data.Split.load(Path(out_dir) / "split.json")
        else:
            self.split = self.dataset.split(labeled=labeled, seed=eng.seed, order=eng.split_order,
                                            fold=eng.fold, folds=eng.folds)
        # Refuse bad data before the first step, not after hours of training on it: every file of
        # the training and validation cases, as stored, checked once (cached by path, size, mtime).
        from sslseg.data.validate import check_cases

        check_cases(self.dataset, (*self.split.labeled_cases, *self.split.unlabeled_cases, *self.split.val_cases))
        model_name = eng.model or cls.default_model.get(self.dim) or ("unet" if self.dim == 2 else "unet_3d")
        plan = self.dataset.plan
        patch = eng.patch_size or (list(plan.patch_size) if plan is not None else _default_patch(self.dataset, self.dim))
        if len(patch) == 1:
            patch = patch * self.dim
        if len(patch) != self.dim:
            raise ValueError(f"patch_size must have {self.dim} entries for {self.dim}D data, got {patch}")
        self.patch = tuple(int(p) for p in patch)
        if not eng.patch_size:
            # The default patch must suit every network the method builds (CTCT's Swin-UNet), not only the run's.
            self.patch = tuple(cls.fit_patch(self.patch, mcfg, model_name, dict(eng.model_options)))
        self.spec = NetworkSpec(model=model_name, in_channels=self.dataset.in_channels, num_classes=self.dataset.num_classes,
                                dim=self.dim, patch_size=self.patch, seed=eng.seed, model_options=dict(eng.model_options))
        self.method = cls(mcfg, self.spec)
        self.method.build()
        if eng.sync_bn and self.dist.enabled:
            # In place inside each network (parameters and buffers are reused), before any
            # optimizer captures them; teachers too, so a train-mode teacher's statistics are global.
            for group in (self.method.nets, self.method.teachers):
                for key in list(group.keys()):
                    group[key] = nn.SyncBatchNorm.convert_sync_batchnorm(group[key])
        # channels_last "auto": 2D networks on the CPU (oneDNN's NHWC convolutions are faster there).
        self.channels_last = (self.dim == 2 and self.device.type == "cpu" if eng.channels_last == "auto"
                              else eng.channels_last)
        for net in self.method.networks().values():
            net.to(self.device)
            if self.channels_last:
                net.to(memory_format=torch.channels_last if self.dim == 2 else torch.channels_last_3d)
        if self.dist.enabled and rank > 0:
            # Same networks everywhere (built above from the run seed), different dropout and noise.
            from sslseg.data.samplers import derive_seed

            _seed_everything(derive_seed(eng.seed, _RANK_SEED_KEY, rank))
        params = list(self.method.trainable_parameters())
        self.optimizer = torch.optim.SGD(params, lr=eng.base_lr, momentum=eng.momentum, weight_decay=eng.weight_decay)
        self.extra_optimizers = self.method.extra_optimizers()
        self.scaler = torch.amp.GradScaler("cuda") if self.precision.chosen == "fp16" else None
        bs = eng.batch_size or (plan.batch_size if plan is not None else (24 if self.dim == 2 else 4))
        lbs = eng.labeled_bs or max(1, bs // 2)
        if lbs > bs:
            raise ValueError(f"labeled_bs={lbs} must be <= batch_size={bs}")
        if not cls.uses_unlabeled:
            lbs, ubs = bs, 0  # labeled data only: the whole batch is labeled (SSL4MIS's supervised scripts)
        else:
            ubs = bs - lbs
            if ubs == 0:
                raise ValueError(f"method {cls.name!r} needs unlabeled samples: batch_size={bs} leaves none after labeled_bs={lbs}")
        for name, value in (("batch_size", bs), ("labeled_bs", lbs)):
            if value % world:
                raise ValueError(f"{name}={value} must be divisible by the number of processes ({world}): "
                                 f"each rank takes {name} / {world} samples")
        self.labeled_bs, self.unlabeled_bs = lbs, ubs
        self.loader = sslseg.data.make_train_loader(
            self.dataset, self.split, patch_size=self.patch, labeled_bs=lbs // world, unlabeled_bs=ubs // world,
            seed=eng.seed, num_workers=eng.num_workers, strong_aug=self.method.strong_augment(), strong_views=cls.strong_views,
            augment=sslseg.data.Augment2D.ssl4mis(self.patch) if eng.ssl4mis_aug else None,
            pin_memory=self.device.type == "cuda", distributed=(world, rank) if self.dist.enabled else False,
            use_plan=eng.use_plan,
        )
        self.rampup_length = float(eng.consistency_rampup if eng.consistency_rampup is not None else eng.iterations)
        # The engine's consistency was routed into the method's option (resolve_method_options); a
        # method without a weight logs 0, one with a constant weight logs that weight.
        self.consistency_mode = cls.consistency_mode(mcfg)
        self.consistency = float(mcfg.consistency) if self.consistency_mode else 0.0
        if out_dir is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            tag = "".join(ch if ch.isalnum() else "_" for ch in str(eng.data).replace("synthetic:", ""))
            n_lab = "all" if labeled is None else f"{labeled:g}"
            out_dir = Path("runs") / f"{cls.name}-{tag}-l{n_lab}-s{eng.seed}-{stamp}"
        # Rank 0's name: the ranks' clocks may straddle a second.
        self.dir = Path(dist.broadcast_object(str(out_dir)))
        self.history: list[dict[str, Any]] = []
        self.validations: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.start_step = 0
        self._overlay_volume: Any = None  # the validation volume shown in TensorBoard, read once
        self.ddp = _wrap_ddp(self.method, self.device) if self.dist.enabled else None
        # Each rank updates BatchNorm statistics from its shard (students in the step, train-mode
        # teachers too): averaged after every step, they stay identical across ranks.
        buffers = {id(b): b for net in self.method.networks().values() for b in net.buffers() if b.is_floating_point()}
        self.sync_buffers = list(buffers.values()) if self.dist.enabled else []

    def _prepare_data(self, out_dir: str | Path | None) -> None:
        """Plan and preprocess a raw NIfTI folder (``eng.use_plan``), so that patches, spacing and
        validation volumes come from the plan's cache; a no-op for data stored preprocessed.

        A resumed run reuses the plan saved with it (``plan.json``), so it continues on the very
        arrays it started on; ``eng.plan`` overrides plan fields of a new run.
        """
        import sslseg.data

        eng = self.eng
        if not self.dataset.needs_preprocessing or not eng.use_plan:
            if eng.plan:
                why = "use_plan=False" if self.dataset.needs_preprocessing else (
                    f"dataset {self.dataset.name!r} (layout {self.dataset.layout}) is stored preprocessed")
                raise ValueError(f"plan overrides {sorted(eng.plan)} given, but no plan is used: {why}")
            return
        saved = Path(out_dir) / _PLAN if self.resume and out_dir is not None else None
        if saved is not None and saved.is_file():
            plan = sslseg.data.Plan.from_json(saved)
        else:
            plan = sslseg.data.plan(self.dataset, dim=self.dataset.dim, overrides=eng.plan or None)
        # Rank 0 preprocesses first; the other ranks then find the cache complete.
        if self.dist.is_main:
            self.dataset.prepare(plan)
        dist.barrier()
        if not self.dist.is_main:
            self.dataset.prepare(plan)

    def _release(self) -> None:
        """Undo what the run changed in the process: logger, determinism flags, process group."""
        if self.logger is not None:
            self.logger.close()
        enabled, warn_only, benchmark = self._prev_deterministic
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
        cleanup(self.dist)

    # ---- helpers given to methods through StepContext ----------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.amp_dtype, self.device, dim=self.dim, training=True)

    def _backward(self, loss: Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _optimizer_step(self, opt: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.step(opt)
        else:
            opt.step()

    # ---- state ------------------------------------------------------------------------------------------

    def _state(self, next_step: int) -> dict[str, Any]:
        """The training state; a collective under DDP (every rank's RNG and method state are gathered)."""
        rng, method_state = capture_rng(), self.method.extra_state()
        state = {
            "format": "sslseg-train-state/1",
            "method": self.cls.name,
            "step": next_step,
            "networks": {k: v.state_dict() for k, v in self.method.networks().items()},
            "optimizer": self.optimizer.state_dict(),
            "extra_optimizers": {k: v.state_dict() for k, v in self.extra_optimizers.items()},
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "method_state": method_state,
            "rng": rng,
            "split": self.split.to_dict(),
            "history": json.dumps(self.history),
            "validations": json.dumps(self.validations),
            "best": json.dumps(self.best),
        }
        if self.dist.enabled:
            # Ranks draw different noise and augmentations: resuming exactly needs each one's state.
            state["world_size"] = self.dist.world_size
            state["rng_ranks"] = dist.all_gather_object(_to_cpu(rng))
            state["method_state_ranks"] = dist.all_gather_object(_to_cpu(method_state))
        return state

    def _load_state(self, state: dict[str, Any]) -> None:
        nets = self.method.networks()
        missing = sorted(set(nets) - set(state["networks"]))
        if missing:
            raise ValueError(f"resume: checkpoint has no weights for network(s) {missing}")
        for k, net in nets.items():
            net.load_state_dict(state["networks"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        for k, opt in self.extra_optimizers.items():
            opt.load_state_dict(state["extra_optimizers"][k])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        rank, world = self.dist.rank, self.dist.world_size
        # The same world size resumes every rank exactly; another one keeps rank 0's state for
        # every rank and reseeds the others' RNGs from (seed, rank, step).
        same_world = state.get("world_size", 1) == world
        method_states = state.get("method_state_ranks") if same_world else None
        self.method.load_extra_state(method_states[rank] if method_states else state["method_state"])
        self.history = json.loads(state["history"])
        self.validations = json.loads(state["validations"])
        self.best = json.loads(state["best"])
        self.start_step = int(state["step"])
        rngs = state.get("rng_ranks") if same_world else None
        restore_rng(rngs[rank] if rngs else state["rng"])
        if rank > 0 and not rngs:
            from sslseg.data.samplers import derive_seed

            _seed_everything(derive_seed(self.eng.seed, _RANK_SEED_KEY, rank, self.start_step))

    def _model_record(self) -> dict[str, Any]:
        """What ``best_val.pt`` needs to rebuild the eval network anywhere (inference, export)."""
        return {
            "model": self.spec.model, "in_channels": self.spec.in_channels, "num_classes": self.spec.num_classes,
            "dim": self.dim, "patch_size": list(self.patch), "model_options": dict(self.spec.model_options),
            "spacing": list(self.dataset.spacing) if self.dataset.spacing is not None else None,
            "method": self.cls.name, "data": str(self.eng.data), "intensity": _input_intensity(self.dataset),
            "plan": self.dataset.plan.to_dict() if self.dataset.plan is not None else None,
            "class_names": list(self.dataset.class_names or []), "sslseg_version": __version__,
        }

    def _write_config(self) -> None:
        if not self.dist.is_main:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        resolved = {"method_name": self.cls.name, "engine": config_to_dict(self.eng), "method": config_to_dict(self.mcfg)}
        resolved["engine"]["patch_size"] = list(self.patch)
        resolved["precision"] = self.precision._asdict()  # what amp chose on this device, and why
        tmp = self.dir / ".config.yaml.tmp"
        tmp.write_text(yaml.safe_dump(resolved, sort_keys=False))
        tmp.replace(self.dir / "config.yaml")
        self.split.save(self.dir / "split.json")
        if self.dataset.plan is not None:
            self.dataset.plan.to_json(self.dir / _PLAN)  # atomic (temporary file, then rename)

    # ---- the loop ---------------------------------------------------------------------------------------

    def run(self) -> Run:
        try:
            return self._run()
        finally:
            self._release()

    def _context(self, step: int, ramp: float) -> StepContext:
        return StepContext(
            step=step, iterations=self.eng.iterations,
            consistency_weight=(consistency_weight(step, self.consistency, self.rampup_length)
                                if self.consistency_mode == "ramp" else self.consistency), rampup=ramp,
            device=self.device, autocast=self._autocast, backward=self._backward, optimizer_step=self._optimizer_step,
            rank=self.dist.rank, world_size=self.dist.world_size, all_reduce_mean=dist.all_reduce_mean,
            all_reduce_gradients=dist.all_reduce_gradients, all_gather_object=dist.all_gather_object,
        )

    def _run(self) -> Run:
        eng = self.eng
        if self.resume:
            self._load_state(load_checkpoint(self.dir / _LAST, map_location=self.device))
            if self.dist.is_main and self.best is not None and self.best["step"] == self.start_step:
                # The checkpoint's own validation was the best: a run killed between writing
                # last.pt and best_val.pt left the latter missing or one validation old.
                self._save_best()
        self._write_config()
        self.logger = RunLogger(self.dir, enabled=self.dist.is_main, tensorboard=self.tensorboard,
                                purge_step=self.start_step + 1 if self.resume else None,
                                class_names=self.dataset.class_names or (), total=eng.iterations, quiet=eng.quiet)
        self.logger.start(self.history, self.validations)
        val_volumes = list(self.split.val_cases)[: eng.val_cases] if eng.val_cases else list(self.split.val_cases)
        self.logger.header(self._header_lines(val_volumes))
        self._last_checkpoint_step = self.start_step if self.resume else None
        batches = self.loader.forever(start_step=self.start_step)
        sums: dict[str, Tensor] = {}
        count = 0
        t_window = time.perf_counter()
        # The first step whose loss was not finite, kept on the device (no per-step host sync):
        # read at each log window and before each checkpoint, so no NaN weights are ever saved.
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        bar = None
        if eng.progress and self.logger.console and not self.logger.plain:
            from tqdm.auto import tqdm

            # disable=None: a bar where stderr is a terminal. Off a terminal the logger prints a
            # plain line per log window instead (tqdm itself shows it/s and the ETA; the postfix
            # adds loss, lr and lambda(t)).
            bar = tqdm(total=eng.iterations, initial=self.start_step, desc=self.cls.name, dynamic_ncols=True,
                       leave=False, disable=None)
            self.logger.bar = bar
        for step in range(self.start_step, eng.iterations):
            lr = poly_lr(eng.base_lr, step, eng.iterations, eng.poly_power)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            ctx = self._context(step, sigmoid_rampup(step, self.rampup_length))
            batch = next(batches).to(self.device, non_blocking=True)
            self.method.train()
            with self._autocast(), dist.global_batch_statistics(self.dist.enabled):
                if self.ddp is not None:
                    loss, logs = self.ddp(batch, ctx)
                else:
                    out = self.method.step(batch, ctx)
                    loss, logs = out.loss, out.logs
            self.optimizer.zero_grad(set_to_none=True)
            self._backward(loss)
            self._optimizer_step(self.optimizer)
            if self.scaler is not None:
                self.scaler.update()
            self.method.after_step(ctx)
            if self.sync_buffers:
                dist.average_tensors(self.sync_buffers)
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()).all(), step + 1, first_bad)
            # Accumulate on device; synced once per log window.
            logged = {"loss": loss.detach(), **{k: v.detach() for k, v in logs.items()}}
            for k, v in logged.items():
                v = v.float().reshape(())
                sums[k] = sums[k] + v if k in sums else v.clone()
            count += 1
            last_step = step + 1 == eng.iterations
            if (step + 1) % eng.log_every == 0 or last_step:
                keys = list(sums)
                window = dist.all_reduce_mean(torch.stack([sums[k] for k in keys]).div_(count))  # mean over ranks
                values = window.tolist()  # the one host sync
                row = {"step": step + 1, "lr": lr, "consistency_weight": ctx.consistency_weight,
                       **dict(zip(keys, values)),
                       "it_per_s": count / max(time.perf_counter() - t_window, 1e-9)}
                if not all(math.isfinite(v) for v in values):
                    raise self._non_finite(int(first_bad.item()), step + 1, row, count)
                self.history.append(row)
                self.logger.log_train(row)
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", lam=f"{ctx.consistency_weight:.3f}",
                                    refresh=False)
                sums, count, t_window = {}, 0, time.perf_counter()
            if bar is not None:
                bar.update(1)
            validating = (step + 1) % eng.val_every == 0 or last_step
            t_pause = time.perf_counter()
            if validating:
                # One sync per validation, reduced over the ranks so that all of them stop together.
                if float(dist.all_reduce_mean((first_bad >= 0).float())) > 0:
                    raise self._non_finite(int(first_bad.item()), step + 1, None)
                self._validate_and_checkpoint(step + 1, val_volumes)
            if (validating if eng.image_every is None else (step + 1) % eng.image_every == 0):
                self._log_overlay(step + 1, val_volumes)
            t_window += time.perf_counter() - t_pause  # it/s and the ETA count training steps only
        if bar is not None:
            bar.close()
        return self._finish()

    def _header_lines(self, val_cases: Sequence[str]) -> list[str]:
        """The start header: method, data and split, network, device, schedule, run directory."""
        eng, split, ds = self.eng, self.split, self.dataset
        val_volumes = sum(len(ds.volumes_of(c)) for c in val_cases)
        n_eval = sum(p.numel() for p in self.method.eval_model().parameters())
        n_trained = sum(p.numel() for p in self.method.trainable_parameters())
        device = str(self.device)
        if self.device.type == "cuda":
            device += f" ({torch.cuda.get_device_name(self.device)})"
        if self.dist.enabled:
            device += f", {self.dist.world_size} processes"
        start = f", resumed at step {self.start_step}" if self.start_step else ""
        return [
            f"sslseg {__version__} | {self.cls.name} on {eng.data} ({ds.layout}, {self.dim}D, {ds.num_classes} classes)",
            f"split: {len(split.labeled_cases)} labeled / {len(split.unlabeled_cases)} unlabeled / "
            f"{len(split.val_cases)} val / {len(split.test_cases)} test cases | batch {self.labeled_bs} labeled + "
            f"{self.unlabeled_bs} unlabeled | patch {'x'.join(str(p) for p in self.patch)}",
            f"network: {self.spec.model}, {n_eval:,} parameters (evaluated network), {n_trained:,} trained",
            f"device: {device} | threads {torch.get_num_threads()} | AMP {self.precision.describe()}"
            + (" | channels_last" if self.channels_last else ""),
            f"schedule: {eng.iterations} steps{start} | log every {eng.log_every} | validate every "
            f"{eng.val_every} on {len(val_cases)} case(s) ({val_volumes} volumes) | run dir {self.dir}",
        ]

    def _non_finite(self, bad_step: int, window_end: int, row: dict[str, Any] | None,
                    window: int = 1) -> NonFiniteLossError:
        """The error for a NaN/Inf loss first seen at ``bad_step`` (-1: only a logged term of the
        ``window`` steps ending at ``window_end`` was not finite)."""
        step = bad_step if bad_step > 0 else window_end
        terms = ""
        if row is not None:
            bad = [f"{k}={v}" for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
            terms = f" ({', '.join(bad)} over steps {window_end - window + 1}-{window_end})" if bad else ""
        last = self._last_checkpoint_step
        checkpoint = self.dir / _LAST if last is not None else None
        where = (f"last good checkpoint: {checkpoint} (step {last}; continue with --resume {self.dir})"
                 if checkpoint is not None else
                 f"no checkpoint was written before it (the first is at step {self.eng.val_every})")
        return NonFiniteLossError(
            f"{self.cls.name}: the training loss is not finite at step {step} of {self.eng.iterations}{terms}; "
            f"{where}. Try a lower base_lr, amp='bf16' instead of 'fp16', or check the data "
            "(`sslseg data check`)", step, checkpoint)

    def _validate_and_checkpoint(self, next_step: int, val_cases: Sequence[str]) -> None:
        # Each rank validates its share of the cases; the merge is exact and identical on every
        # rank, so all ranks take the same best_val decision.
        shard = list(val_cases)[self.dist.rank :: self.dist.world_size]
        local = None
        if shard:
            local = validate(self.method.eval_model(), self.dataset.iter_volumes(shard), dim=self.dim,
                             patch_size=self.patch, num_classes=self.dataset.num_classes, device=self.device,
                             autocast_dtype=self.amp_dtype)
        result = combine_validation(dist.all_gather_object(local))
        result["step"] = next_step
        self.validations.append(result)
        improved = self.best is None or result["dice"] > self.best["dice"]
        if improved:
            self.best = dict(result)
        self.logger.log_validation(result, next_step, self.best)
        state = self._state(next_step)  # every rank: gathers per-rank RNG states under DDP
        self._last_checkpoint_step = next_step
        if not self.dist.is_main:
            return
        # last.pt first: if the run dies between the two writes, the resume rewrites best_val.pt.
        save_checkpoint(state, self.dir / _LAST)
        if improved:
            self._save_best()

    def _save_best(self) -> None:
        """``best_val.pt``: the eval network now, which holds the weights of ``self.best``."""
        self._save_model(self.best, MODEL_FILES["best_val"])

    def _save_model(self, metrics: dict[str, Any], name: str) -> None:
        """A model file (``sslseg.engine.load_model``): the eval network's weights and its record."""
        save_checkpoint({"format": MODEL_FORMAT, "step": metrics["step"], "metrics": json.dumps(metrics),
                         "record": json.dumps(self._model_record()),
                         "state_dict": self.method.eval_model().state_dict()}, self.dir / name)

    def _log_overlay(self, step: int, val_cases: Sequence[str]) -> None:
        """TensorBoard image of the first validation case's middle slice (rank 0, no collectives)."""
        if self.logger is None or self.logger.writer is None or not val_cases:
            return
        if self._overlay_volume is None:
            self._overlay_volume = next(iter(self.dataset.iter_volumes(val_cases[:1])))
        image, label, pred = middle_slice_prediction(self.method.eval_model(), self._overlay_volume, dim=self.dim,
                                                     patch_size=self.patch, autocast_dtype=self.amp_dtype)
        self.logger.log_overlay(step, image, label, pred)

    def _finish(self) -> Run:
        if self.dist.is_main:
            metrics = {"best_val": self.best, "last": self.validations[-1] if self.validations else None}
            tmp = self.dir / ".metrics.json.tmp"
            tmp.write_text(json.dumps(metrics, indent=2))
            tmp.replace(self.dir / "metrics.json")
            if self.validations:  # the final weights, for evaluating `last` as well as `best_val`
                self._save_model(self.validations[-1], MODEL_FILES["last"])
            plot_progress(self.dir, self.history, self.validations)
            self.logger.close()
        dist.barrier()  # the other ranks read what rank 0 wrote
        return Run.load(self.dir, device=self.device)
