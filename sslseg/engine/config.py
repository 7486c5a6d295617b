"""Run configuration: dataclasses are the source of truth; YAML files and ``key=value`` pairs overlay them.

A resolved run config is ``{"engine": EngineConfig, "method": <Method>.Config}``; it is saved as
``config.yaml`` in the run directory, and a saved file can be passed back with ``--config``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sslseg.utils.precision import AMP_CHOICES

__all__ = ["EngineConfig", "apply_overrides", "config_to_dict", "load_yaml", "parse_set", "resolve_method_options",
           "update_dataclass"]


@dataclass
class EngineConfig:
    """Options of the training engine (defaults follow SSL4MIS's 2D scripts unless noted).

    Attributes:
        data: Dataset spec for ``sslseg.data.load`` (a folder or ``synthetic:<kind>``).
        labeled: Labeled cases: a count (``7``; ``1.0`` is one case), a fraction of the training
            cases in (0, 1) (``0.1``), or ``"all"`` (also None) for every training case.
        iterations: Optimizer steps.
        model: Segmentation network (``sslseg.models``); None: ``unet`` in 2D, ``unet_3d`` in 3D.
        model_options: Extra options for ``create_model``.
        seed: Seeds the split, the networks, the batches and the augmentations.
        split_order: ``random`` (seeded, by case) or ``ssl4mis`` (first N cases, the legacy order).
        fold / folds: k-fold cross-validation by case (``fold=None``: the dataset's own split).
        patch_size: Training patch; None: the data plan's patch (planned NIfTI folders), else the
            first training volume's in-plane size capped at 256 (2D; e.g. 80x80 for
            ``synthetic:acdc``) or its shape capped at 96 per axis (3D), rounded down to a
            multiple of 16 and then to a size every network of the method accepts.
        batch_size: Samples per batch (labeled + unlabeled); None: 24 in 2D, 4 in 3D (SSL4MIS).
        labeled_bs: Labeled samples per batch; None: half the batch. A method that trains on
            labeled data only (``supervised``) labels the whole batch, as SSL4MIS's supervised
            scripts do, so that one sweep's options fit every method; the start header prints
            the batch as it is (``batch 24 labeled + 0 unlabeled``).
        base_lr / momentum / weight_decay / poly_power: SGD with poly decay
            ``lr(t) = base_lr (1 - t/T)^power`` (applied before step t).
        consistency: Weight ``lambda`` of the method's unlabeled (consistency) loss; None: the
            method's own ``consistency`` option. It sets that option: for a method that ramps its
            weight (``SSLMethod.consistency_mode`` ``"ramp"``: mean_teacher, cps, ...) it is the
            maximum of the ramp-up; for one with a constant weight (``"constant"``: fixmatch
            unless ``rampup=True``) the weight of every step. A method with no such weight (bcp,
            unimatch, supervised: their weights are their own options) refuses it, naming the
            option and the method, and so does setting it to a value other than an explicit
            ``method.consistency``.
        consistency_rampup: Ramp length in steps (sigmoid); None: the whole run (SSL4MIS's
            defaults, 150 x 200 = 30000 = its iterations, also ramp over the whole run). Only for
            methods whose weight ramps (``consistency_mode`` ``"ramp"``); refused otherwise.
        val_every: Validate (and checkpoint) every N steps, and at the end.
        val_cases: Validate on at most this many validation cases (None: all).
        log_every: Sync and record logged values every N steps (no per-step host syncs).
        amp: ``auto`` (default): bf16 autocast where the device computes bf16 natively (CUDA
            sm_80+, CPUs with avx512_bf16 or AMX), float32 elsewhere; ``none`` (or None): float32;
            ``bf16``: bf16 autocast (CPU or CUDA); ``fp16``: autocast + GradScaler (CUDA). Losses,
            consistency targets, the EMA update and metrics stay float32
            (:mod:`sslseg.utils.precision`). The choice is in the run header and ``config.yaml``.
        deterministic: ``torch.use_deterministic_algorithms`` and no cuDNN autotuning.
        channels_last: Train in channels_last(_3d) memory format: ``True``, ``False``, or ``"auto"``
            (default): channels_last for 2D networks on the CPU, where oneDNN's NHWC convolutions make
            a training step 1.2-1.3x faster in float32 and in bf16 (``benches/bench_train.py``), and
            the default contiguous format elsewhere (3D on the CPU measured slower; GPUs not
            measured). The choice is in the run header.
        num_workers: DataLoader workers.
        device: ``cpu``, ``cuda``, ``cuda:1``...; None: CUDA if available, else CPU. Under
            torchrun each process uses ``cuda:<LOCAL_RANK>`` (or the CPU with ``cpu``).
        progress: Show a progress bar (loss, lr, consistency weight, it/s, ETA) on a terminal.
            Off a terminal (stdout redirected or piped), one plain line per logging window is
            printed instead.
        quiet: Print nothing: no start header, progress bar, log or validation lines (the run's
            files, ``history.jsonl`` and ``validation.jsonl`` included, are written all the same).
        sync_bn: Under DDP, convert BatchNorm layers to ``SyncBatchNorm`` so that batch statistics
            are those of the global batch (CUDA only, as torch's SyncBatchNorm); ignored in one
            process.
        tensorboard: Write TensorBoard logs to ``<run>/tb``; None: when the ``tensorboard`` package
            is installed.
        image_every: TensorBoard image overlays (one validation case's middle slice: image, ground
            truth, prediction) every N steps; None: at each validation.
        use_plan: Plan and preprocess raw NIfTI folders (``sslseg.data.plan``: crop, normalise,
            resample to the plan's spacing, memory-mapped cache); False reads them as stored
            (per-volume z-score, no resampling, uniform patches), for comparisons. SSL4MIS h5
            layouts and phantoms are read as stored either way.
        plan: Plan fields to override (``{"patch_size": [64, 128, 128]}``; on the command line
            ``--set plan.patch_size=[64,128,128]``).
        ssl4mis_aug: 2D only: resample as SSL4MIS's ``RandomGenerator`` does (nearest-neighbour
            images, integer rotation angles in ``[-20, 20)``, order-0 zoom to the patch:
            :meth:`sslseg.data.Augment2D.ssl4mis`) instead of bilinear images and real angles; for
            comparisons with SSL4MIS. Validation resizes slices the same way.
        num_classes: Classes including background, for datasets whose layout has a default
            count (SSL4MIS's ACDC layout: 4); None: the layout's count, checked against the
            labels (scanned once, cached), a mismatch being an error that says to set this.
    """

    data: str = "synthetic:acdc"
    labeled: float | str | None = 7
    iterations: int = 3000
    model: str | None = None
    model_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    split_order: str = "random"
    fold: int | None = None
    folds: int = 5
    patch_size: list[int] | None = None
    batch_size: int | None = None
    labeled_bs: int | None = None
    base_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    consistency: float | None = None
    consistency_rampup: float | None = None
    val_every: int = 200
    val_cases: int | None = None
    log_every: int = 20
    amp: str | None = "auto"
    deterministic: bool = False
    channels_last: bool | str = "auto"
    num_workers: int = 0
    device: str | None = None
    progress: bool = True
    quiet: bool = False
    sync_bn: bool = False
    tensorboard: bool | None = None
    image_every: int | None = None
    use_plan: bool = True
    plan: dict[str, Any] = field(default_factory=dict)
    ssl4mis_aug: bool = False
    num_classes: int | None = None

    def __post_init__(self) -> None:
        checks = [
            ("iterations", isinstance(self.iterations, int) and self.iterations > 0, "an int > 0"),
            ("val_every", isinstance(self.val_every, int) and self.val_every > 0, "an int > 0"),
            ("log_every", isinstance(self.log_every, int) and self.log_every > 0, "an int > 0"),
            ("amp", self.amp is None or self.amp in AMP_CHOICES, "one of " + ", ".join(AMP_CHOICES)),
            ("channels_last", isinstance(self.channels_last, bool) or self.channels_last == "auto",
             "True, False or 'auto'"),
            ("split_order", self.split_order in ("random", "ssl4mis"), "'random' or 'ssl4mis'"),
            ("base_lr", isinstance(self.base_lr, (int, float)) and self.base_lr > 0, "a number > 0"),
            ("batch_size", self.batch_size is None or (isinstance(self.batch_size, int) and self.batch_size > 0), "None or an int > 0"),
            ("labeled_bs", self.labeled_bs is None or (isinstance(self.labeled_bs, int) and self.labeled_bs > 0), "None or an int > 0"),
            ("num_workers", isinstance(self.num_workers, int) and self.num_workers >= 0, "an int >= 0"),
            ("sync_bn", isinstance(self.sync_bn, bool), "a bool"),
            ("quiet", isinstance(self.quiet, bool), "a bool"),
            ("use_plan", isinstance(self.use_plan, bool), "a bool"),
            ("plan", isinstance(self.plan, dict), "a dict of plan fields"),
            ("ssl4mis_aug", isinstance(self.ssl4mis_aug, bool), "a bool"),
            ("num_classes", self.num_classes is None or (isinstance(self.num_classes, int)
                                                         and not isinstance(self.num_classes, bool)
                                                         and self.num_classes >= 2), "None or an int >= 2"),
            ("tensorboard", self.tensorboard is None or isinstance(self.tensorboard, bool), "None or a bool"),
            ("image_every", self.image_every is None or (isinstance(self.image_every, int)
                                                         and not isinstance(self.image_every, bool)
                                                         and self.image_every > 0), "None or an int > 0"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"EngineConfig: {name} must be {expected}, got {getattr(self, name)!r}")
        if self.patch_size is not None:
            self.patch_size = [int(s) for s in (self.patch_size if isinstance(self.patch_size, (list, tuple)) else [self.patch_size])]


def config_to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as a plain dict (lists, not tuples), ready for YAML/JSON."""
    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def update_dataclass(obj: Any, values: Mapping[str, Any], *, where: str) -> Any:
    """A copy of dataclass ``obj`` with ``values`` applied; unknown keys are a ``TypeError``."""
    names = [f.name for f in dataclasses.fields(obj)]
    unknown = [k for k in values if k not in names]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, names, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise TypeError(f"{where}: unknown option(s) {', '.join(hints)}; accepted: {', '.join(names)}")
    return dataclasses.replace(obj, **values)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a run config file: ``{"engine": {...}, "method": {...}}`` (either part optional).

    A run's own ``config.yaml`` also holds ``method_name`` and ``precision`` (what ``amp`` chose on
    the machine that wrote it); both are records, and ``precision`` is chosen again on reading.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config: {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or not set(data) <= {"engine", "method", "method_name", "precision"}:
        raise TypeError(
            f"config: {path} must be a mapping with keys 'engine' and/or 'method' (and 'method_name', 'precision'), "
            f"got {sorted(data) if isinstance(data, dict) else type(data).__name__}"
        )
    return data


def _coerce(text: str, annotation: Any) -> Any:
    """Parse a command-line value with YAML rules (``3`` -> int, ``[64, 64]`` -> list, ``null``)."""
    value = yaml.safe_load(text)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is float or (origin in (typing.Union, types.UnionType) and float in args and int not in args):
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
    return value


def parse_set(pairs: list[str], engine: EngineConfig, method_config: Any) -> tuple[dict, dict]:
    """Split ``key=value`` strings into engine and method overrides.

    A key is looked up in the engine options, then the method's; ``method.key=value`` or
    ``engine.key=value`` forces one; ``plan.key=value`` overrides a field of the data plan. Unknown keys are a ``TypeError`` listing the accepted ones.
    """
    eng_fields = {f.name: f for f in dataclasses.fields(engine)}
    hints = typing.get_type_hints(type(engine))
    m_fields = {f.name: f for f in dataclasses.fields(method_config)}
    m_hints = typing.get_type_hints(type(method_config))
    eng: dict[str, Any] = {}
    meth: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        key, text = pair.split("=", 1)
        scope = None
        if "." in key:
            scope, key = key.split(".", 1)
        if scope == "plan":  # plan.<field>=value: a plan override (checked against the plan's fields by the engine)
            eng.setdefault("plan", {})[key] = yaml.safe_load(text)
        elif scope in (None, "engine") and key in eng_fields:
            eng[key] = _coerce(text, hints[key])
        elif scope in (None, "method") and key in m_fields:
            meth[key] = _coerce(text, m_hints[key])
        else:
            accepted = sorted(eng_fields) + sorted(f"method.{k}" for k in m_fields)
            close = difflib.get_close_matches(key, list(eng_fields) + list(m_fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"--set: unknown option {key!r}{hint}; accepted: {', '.join(accepted)}")
    return eng, meth


def apply_overrides(engine: EngineConfig, method_config: Any, engine_values: Mapping[str, Any],
                    method_values: Mapping[str, Any], *, where: str) -> tuple[EngineConfig, Any]:
    """Both configs with their overrides applied (unknown keys are a ``TypeError``)."""
    return (update_dataclass(engine, engine_values, where=f"{where} (engine)"),
            update_dataclass(method_config, method_values, where=f"{where} (method)"))


def resolve_method_options(engine: EngineConfig, method_cls: Any, method_config: Any) -> Any:
    """The method config with the engine's weight options routed into it, or an error naming them.

    No engine option vanishes for a method that ignores it: ``consistency`` sets the method's
    ``consistency`` option where its :meth:`~sslseg.methods.SSLMethod.consistency_mode` is
    ``"ramp"`` or ``"constant"``; ``consistency_rampup`` needs ``"ramp"``. Anything else is a ``ValueError`` naming the option
    and the method.

    Args:
        engine: The run's engine options.
        method_cls: The method class (``sslseg.methods.get_method(name)``).
        method_config: Its config (an instance of ``method_cls.Config``).

    Returns:
        ``method_config``, with ``consistency`` replaced by the engine's when that is set.
    """
    name = method_cls.name
    mode = method_cls.consistency_mode(method_config)
    if engine.consistency is not None:
        if mode is None:
            raise ValueError(
                f"consistency={engine.consistency!r}: method {name!r} has no consistency weight, so the option would "
                f"change nothing (its own options: {method_cls.describe() or 'none'}); remove it")
        default = method_cls.Config().consistency
        if method_config.consistency not in (default, engine.consistency):
            raise ValueError(
                f"consistency={engine.consistency!r} (engine) and method.consistency={method_config.consistency!r} "
                f"disagree for method {name!r}; set one of them")
        method_config = dataclasses.replace(method_config, consistency=float(engine.consistency))
    if engine.consistency_rampup is not None and mode != "ramp":
        why = ("its weight is constant (set rampup=true to ramp it)" if mode == "constant"
               else "it has no consistency weight")
        raise ValueError(f"consistency_rampup={engine.consistency_rampup!r}: method {name!r} does not ramp a "
                         f"consistency weight: {why}; remove the option")
    return method_config
