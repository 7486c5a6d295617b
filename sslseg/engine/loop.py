"""The one training loop: ``sslseg.fit(method, data, ...)``.

Everything that SSL4MIS repeats in each of its scripts lives here once: seeds, devices, AMP, the
optimizer and poly LR, the consistency ramp-up, the two-stream batches, validation on the
validation split, atomic checkpoints with resume, and logging without per-step host syncs.
"""

from __future__ import annotations

import contextlib
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
from torch import Tensor

import sslseg

from sslseg.engine.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from sslseg.engine.config import EngineConfig, config_to_dict, load_yaml, update_dataclass
from sslseg.engine.run import MODEL_FORMAT, Run
from sslseg.engine.schedules import consistency_weight, poly_lr, sigmoid_rampup
from sslseg.engine.validation import validate
from sslseg.methods.base import NetworkSpec, SSLMethod, StepContext, get_method

__all__ = ["fit"]

_LAST, _BEST = "last.pt", "best_val.pt"


def _resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no CUDA device is available; use device='cpu'")
    return dev


def _labeled_value(labeled: float | int | None) -> int | float | None:
    if labeled is None:
        return None
    if isinstance(labeled, bool) or not isinstance(labeled, (int, float)) or labeled <= 0:
        raise ValueError(f"labeled must be a case count >= 1 or a fraction in (0, 1], got {labeled!r}")
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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def fit(
    method: str,
    data: str | None = None,
    *,
    labeled: float | int | None = None,
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
        labeled: Labeled cases: a count (``7``) or a fraction of the training cases.
        iterations: Optimizer steps.
        model: Network name (``sslseg.models.list_models()``); default ``unet`` / ``unet_3d``.
        seed: Seed of the split, networks, batches and augmentations.
        out_dir: Run directory (default ``runs/<method>-<data>-l<labeled>-s<seed>-<time>``).
        device: ``cpu`` / ``cuda[:i]``; default CUDA if available.
        amp: None, ``"bf16"`` or ``"fp16"`` (CUDA only).
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
    return _Trainer(cls, eng, mcfg, out_dir=resume or out_dir, resume=resume is not None).run()


class _Trainer:
    """One training run; :func:`fit` builds it from resolved configs."""

    def __init__(self, cls: type[SSLMethod], eng: EngineConfig, mcfg: Any, *, out_dir: str | Path | None, resume: bool) -> None:
        import sslseg.data

        self.cls, self.eng, self.mcfg, self.resume = cls, eng, mcfg, resume
        self.device = _resolve_device(eng.device)
        if eng.amp == "fp16" and self.device.type != "cuda":
            raise ValueError("amp='fp16' needs a CUDA device (it uses a GradScaler); use amp='bf16' on CPU")
        self.amp_dtype = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}[eng.amp]
        _seed_everything(eng.seed)
        # Deterministic mode is process-global in torch: remember the caller's setting and
        # restore it when the run ends (run()'s finally), so fit() leaves no global state behind.
        self._prev_deterministic = (torch.are_deterministic_algorithms_enabled(),
                                    torch.is_deterministic_algorithms_warn_only_enabled(),
                                    torch.backends.cudnn.benchmark)
        if eng.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        self.dataset = sslseg.data.load(eng.data)
        self.dim = self.dataset.dim
        labeled = _labeled_value(eng.labeled)
        if resume:
            self.split = sslseg.data.Split.load(Path(out_dir) / "split.json")
        else:
            self.split = self.dataset.split(labeled=labeled, seed=eng.seed, order=eng.split_order,
                                            fold=eng.fold, folds=eng.folds)
        model_name = eng.model or cls.default_model.get(self.dim) or ("unet" if self.dim == 2 else "unet_3d")
        patch = eng.patch_size or _default_patch(self.dataset, self.dim)
        if len(patch) == 1:
            patch = patch * self.dim
        if len(patch) != self.dim:
            raise ValueError(f"patch_size must have {self.dim} entries for {self.dim}D data, got {patch}")
        self.patch = tuple(int(p) for p in patch)
        self.spec = NetworkSpec(model=model_name, in_channels=self.dataset.in_channels, num_classes=self.dataset.num_classes,
                                dim=self.dim, patch_size=self.patch, seed=eng.seed, model_options=dict(eng.model_options))
        self.method = cls(mcfg, self.spec)
        self.method.build()
        for net in self.method.networks().values():
            net.to(self.device)
            if eng.channels_last:
                net.to(memory_format=torch.channels_last if self.dim == 2 else torch.channels_last_3d)
        params = list(self.method.trainable_parameters())
        self.optimizer = torch.optim.SGD(params, lr=eng.base_lr, momentum=eng.momentum, weight_decay=eng.weight_decay)
        self.extra_optimizers = self.method.extra_optimizers()
        self.scaler = torch.amp.GradScaler("cuda") if eng.amp == "fp16" else None
        bs = eng.batch_size or (24 if self.dim == 2 else 4)
        lbs = eng.labeled_bs or max(1, bs // 2)
        if lbs > bs:
            raise ValueError(f"labeled_bs={lbs} must be <= batch_size={bs}")
        if not cls.uses_unlabeled:
            lbs, ubs = bs, 0  # labeled data only: the whole batch is labeled (SSL4MIS's supervised scripts)
        else:
            ubs = bs - lbs
            if ubs == 0:
                raise ValueError(f"method {cls.name!r} needs unlabeled samples: batch_size={bs} leaves none after labeled_bs={lbs}")
        self.labeled_bs, self.unlabeled_bs = lbs, ubs
        self.loader = sslseg.data.make_train_loader(
            self.dataset, self.split, patch_size=self.patch, labeled_bs=lbs, unlabeled_bs=ubs, seed=eng.seed,
            num_workers=eng.num_workers, strong_aug=cls.strong_aug, strong_views=cls.strong_views,
            pin_memory=self.device.type == "cuda",
        )
        self.rampup_length = float(eng.consistency_rampup if eng.consistency_rampup is not None else eng.iterations)
        self.consistency = eng.consistency if eng.consistency is not None else getattr(mcfg, "consistency", 0.1)
        if out_dir is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            tag = "".join(ch if ch.isalnum() else "_" for ch in str(eng.data).replace("synthetic:", ""))
            out_dir = Path("runs") / f"{cls.name}-{tag}-l{eng.labeled:g}-s{eng.seed}-{stamp}"
        self.dir = Path(out_dir)
        self.history: list[dict[str, Any]] = []
        self.validations: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.start_step = 0

    # ---- helpers given to methods through StepContext ----------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _backward(self, loss: Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _optimizer_step(self, opt: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.step(opt)
        else:
            opt.step()

    # ---- state ------------------------------------------------------------------------------------------

    def _state(self, next_step: int) -> dict[str, Any]:
        return {
            "format": "sslseg-train-state/1",
            "method": self.cls.name,
            "step": next_step,
            "networks": {k: v.state_dict() for k, v in self.method.networks().items()},
            "optimizer": self.optimizer.state_dict(),
            "extra_optimizers": {k: v.state_dict() for k, v in self.extra_optimizers.items()},
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "method_state": self.method.extra_state(),
            "rng": capture_rng(),
            "split": self.split.to_dict(),
            "history": json.dumps(self.history),
            "validations": json.dumps(self.validations),
            "best": json.dumps(self.best),
        }

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
        self.method.load_extra_state(state["method_state"])
        self.history = json.loads(state["history"])
        self.validations = json.loads(state["validations"])
        self.best = json.loads(state["best"])
        self.start_step = int(state["step"])
        restore_rng(state["rng"])

    def _model_record(self) -> dict[str, Any]:
        """What ``best_val.pt`` needs to rebuild the eval network anywhere (inference, export)."""
        return {
            "model": self.spec.model, "in_channels": self.spec.in_channels, "num_classes": self.spec.num_classes,
            "dim": self.dim, "patch_size": list(self.patch), "model_options": dict(self.spec.model_options),
            "spacing": list(self.dataset.spacing) if self.dataset.spacing is not None else None,
            "method": self.cls.name, "data": str(self.eng.data), "intensity": self.dataset.intensity,
            "class_names": list(self.dataset.class_names or []), "sslseg_version": sslseg.__version__,
        }

    def _write_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        resolved = {"method_name": self.cls.name, "engine": config_to_dict(self.eng), "method": config_to_dict(self.mcfg)}
        resolved["engine"]["patch_size"] = list(self.patch)
        tmp = self.dir / ".config.yaml.tmp"
        tmp.write_text(yaml.safe_dump(resolved, sort_keys=False))
        tmp.replace(self.dir / "config.yaml")
        self.split.save(self.dir / "split.json")

    # ---- the loop ---------------------------------------------------------------------------------------

    def run(self) -> Run:
        try:
            return self._run()
        finally:
            enabled, warn_only, benchmark = self._prev_deterministic
            torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
            torch.backends.cudnn.benchmark = benchmark

    def _run(self) -> Run:
        eng = self.eng
        if self.resume:
            self._load_state(load_checkpoint(self.dir / _LAST, map_location=self.device))
        self._write_config()
        val_volumes = list(self.split.val_cases)[: eng.val_cases] if eng.val_cases else list(self.split.val_cases)
        batches = self.loader.forever(start_step=self.start_step)
        sums: dict[str, Tensor] = {}
        count = 0
        t_window = time.perf_counter()
        bar = None
        if eng.progress:
            from tqdm.auto import tqdm

            # disable=None: a bar on a terminal, nothing in logs (history.jsonl has the values).
            bar = tqdm(total=eng.iterations, initial=self.start_step, desc=self.cls.name, dynamic_ncols=True,
                       leave=False, disable=None)
        log_path = self.dir / "history.jsonl"
        # The checkpoint's history is the truth: rows logged after it by a killed run are dropped.
        log_path.write_text("".join(json.dumps(row) + "\n" for row in self.history))
        for step in range(self.start_step, eng.iterations):
            lr = poly_lr(eng.base_lr, step, eng.iterations, eng.poly_power)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            ramp = sigmoid_rampup(step, self.rampup_length)
            ctx = StepContext(
                step=step, iterations=eng.iterations, consistency_weight=consistency_weight(step, self.consistency, self.rampup_length),
                rampup=ramp, device=self.device, autocast=self._autocast, backward=self._backward,
                optimizer_step=self._optimizer_step,
            )
            batch = next(batches).to(self.device, non_blocking=True)
            self.method.train()
            with self._autocast():
                out = self.method.step(batch, ctx)
            self.optimizer.zero_grad(set_to_none=True)
            self._backward(out.loss)
            self._optimizer_step(self.optimizer)
            if self.scaler is not None:
                self.scaler.update()
            self.method.after_step(ctx)
            # Accumulate on device; synced once per log window.
            logged = {"loss": out.loss.detach(), **{k: v.detach() for k, v in out.logs.items()}}
            for k, v in logged.items():
                v = v.float().reshape(())
                sums[k] = sums[k] + v if k in sums else v.clone()
            count += 1
            last_step = step + 1 == eng.iterations
            if (step + 1) % eng.log_every == 0 or last_step:
                keys = list(sums)
                values = torch.stack([sums[k] for k in keys]).div_(count).tolist()  # the one host sync
                row = {"step": step + 1, "lr": lr, "consistency_weight": ctx.consistency_weight,
                       **dict(zip(keys, values)),
                       "it_per_s": count / max(time.perf_counter() - t_window, 1e-9)}
                if not all(math.isfinite(v) for v in values):
                    raise FloatingPointError(f"{self.cls.name}: non-finite loss at step {step + 1}: {row}")
                self.history.append(row)
                with open(log_path, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", lam=f"{ctx.consistency_weight:.3f}")
                sums, count, t_window = {}, 0, time.perf_counter()
            if bar is not None:
                bar.update(1)
            if (step + 1) % eng.val_every == 0 or last_step:
                self._validate_and_checkpoint(step + 1, val_volumes)
        if bar is not None:
            bar.close()
        return self._finish()

    def _validate_and_checkpoint(self, next_step: int, val_cases: Sequence[str]) -> None:
        result = validate(self.method.eval_model(), self.dataset.iter_volumes(val_cases), dim=self.dim,
                          patch_size=self.patch, num_classes=self.dataset.num_classes, device=self.device,
                          autocast_dtype=self.amp_dtype)
        result["step"] = next_step
        self.validations.append(result)
        improved = self.best is None or result["dice"] > self.best["dice"]
        if improved:
            self.best = dict(result)
        # last.pt first: if the run dies between the two writes, best_val.pt is at worst one validation old.
        save_checkpoint(self._state(next_step), self.dir / _LAST)
        if improved:
            save_checkpoint({"format": MODEL_FORMAT, "step": next_step, "metrics": json.dumps(result),
                             "record": json.dumps(self._model_record()),
                             "state_dict": self.method.eval_model().state_dict()}, self.dir / _BEST)

    def _finish(self) -> Run:
        metrics = {"best_val": self.best, "last": self.validations[-1] if self.validations else None}
        tmp = self.dir / ".metrics.json.tmp"
        tmp.write_text(json.dumps(metrics, indent=2))
        tmp.replace(self.dir / "metrics.json")
        _plot_progress(self.dir, self.history, self.validations)
        return Run.load(self.dir, device=self.device)


def _plot_progress(out: Path, history: list[dict], validations: list[dict]) -> None:
    """``progress.png``: training loss and validation Dice (skipped if matplotlib is absent)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot([h["step"] for h in history], [h["loss"] for h in history])
    ax[0].set(xlabel="step", ylabel="training loss", yscale="log")
    ax[1].plot([v["step"] for v in validations], [v["dice"] for v in validations], marker="o")
    ax[1].set(xlabel="step", ylabel="validation Dice (foreground mean)")
    fig.tight_layout()
    fig.savefig(out / "progress.png", dpi=100)
    plt.close(fig)
