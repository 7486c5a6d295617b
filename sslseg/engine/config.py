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

__all__ = ["EngineConfig", "apply_overrides", "config_to_dict", "load_yaml", "parse_set", "update_dataclass"]


@dataclass
class EngineConfig:
    """Options of the training engine (defaults follow SSL4MIS's 2D scripts unless noted).

    Attributes:
        data: Dataset spec for ``sslseg.data.load`` (a folder or ``synthetic:<kind>``).
        labeled: Labeled cases: a count (``7``) or a fraction of the training cases (``0.1``).
        iterations: Optimizer steps.
        model: Segmentation network (``sslseg.models``); None: ``unet`` in 2D, ``unet_3d`` in 3D.
        model_options: Extra options for ``create_model``.
        seed: Seeds the split, the networks, the batches and the augmentations.
        split_order: ``random`` (seeded, by case) or ``ssl4mis`` (first N cases, the legacy order).
        fold / folds: k-fold cross-validation by case (``fold=None``: the dataset's own split).
        patch_size: Training patch; None: the dataset's in-plane size (2D, at most 256) or 64^3
            (3D, at most the volume), rounded down to a multiple the network accepts.
        batch_size: Samples per batch (labeled + unlabeled); None: 24 in 2D, 4 in 3D (SSL4MIS).
        labeled_bs: Labeled samples per batch; None: half the batch.
        base_lr / momentum / weight_decay / poly_power: SGD with poly decay
            ``lr(t) = base_lr (1 - t/T)^power`` (applied before step t).
        consistency: Maximum consistency weight ``lambda``.
        consistency_rampup: Ramp length in steps (sigmoid); None: the whole run (SSL4MIS's
            defaults, 150 x 200 = 30000 = its iterations, also ramp over the whole run).
        val_every: Validate (and checkpoint) every N steps, and at the end.
        val_cases: Validate on at most this many validation cases (None: all).
        log_every: Sync and record logged values every N steps (no per-step host syncs).
        amp: None, ``bf16`` (autocast, CPU or CUDA) or ``fp16`` (autocast + GradScaler, CUDA).
        deterministic: ``torch.use_deterministic_algorithms`` and no cuDNN autotuning.
        channels_last: Train in channels_last(_3d) memory format.
        num_workers: DataLoader workers.
        device: ``cpu``, ``cuda``, ``cuda:1``...; None: CUDA if available, else CPU. Under
            torchrun each process uses ``cuda:<LOCAL_RANK>`` (or the CPU with ``cpu``).
        progress: Show a progress bar (loss, lr, consistency weight, it/s, ETA).
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
    """

    data: str = "synthetic:acdc"
    labeled: float = 7
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
    amp: str | None = None
    deterministic: bool = False
    channels_last: bool = False
    num_workers: int = 0
    device: str | None = None
    progress: bool = True
    sync_bn: bool = False
    tensorboard: bool | None = None
    image_every: int | None = None
    use_plan: bool = True
    plan: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks = [
            ("iterations", isinstance(self.iterations, int) and self.iterations > 0, "an int > 0"),
            ("val_every", isinstance(self.val_every, int) and self.val_every > 0, "an int > 0"),
            ("log_every", isinstance(self.log_every, int) and self.log_every > 0, "an int > 0"),
            ("amp", self.amp in (None, "bf16", "fp16"), "None, 'bf16' or 'fp16'"),
            ("split_order", self.split_order in ("random", "ssl4mis"), "'random' or 'ssl4mis'"),
            ("base_lr", isinstance(self.base_lr, (int, float)) and self.base_lr > 0, "a number > 0"),
            ("batch_size", self.batch_size is None or (isinstance(self.batch_size, int) and self.batch_size > 0), "None or an int > 0"),
            ("labeled_bs", self.labeled_bs is None or (isinstance(self.labeled_bs, int) and self.labeled_bs > 0), "None or an int > 0"),
            ("num_workers", isinstance(self.num_workers, int) and self.num_workers >= 0, "an int >= 0"),
            ("sync_bn", isinstance(self.sync_bn, bool), "a bool"),
            ("use_plan", isinstance(self.use_plan, bool), "a bool"),
            ("plan", isinstance(self.plan, dict), "a dict of plan fields"),
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
    """Read a run config file: ``{"engine": {...}, "method": {...}}`` (either part optional)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config: {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or not set(data) <= {"engine", "method", "method_name"}:
        raise TypeError(
            f"config: {path} must be a mapping with keys 'engine' and/or 'method' (and 'method_name'), "
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
