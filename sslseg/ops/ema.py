"""Fused exponential moving average (the mean-teacher update).

``teacher <- decay * teacher + (1 - decay) * student`` over a whole parameter list in one kernel
launch (CPU: one parallel region; CUDA: multi-tensor apply), accumulated in float32 (float64 for
double teachers), so a float32 teacher can follow a bfloat16/float16 student without drift.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sslseg.ops._loader import backend_for, has_ops

__all__ = ["ema_update_", "ema_decay"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def ema_decay(step: int, decay: float) -> float:
    """Mean Teacher's warm-up rule: ``min(1 - 1 / (step + 1), decay)``.

    Early in training the teacher follows the student closely (decay 0 at step 0, 0.5 at step 1,
    ...), then the decay saturates at ``decay``.

    Args:
        step: Zero-based optimizer step, ``>= 0``.
        decay: Final decay in ``[0, 1]``.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"ema_decay: step must be an int >= 0, got {step!r}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema_decay: decay must be in [0, 1], got {decay!r}")
    return min(1.0 - 1.0 / (step + 1), float(decay))


def ema_update_(
    teacher: nn.Module | Sequence[Tensor],
    student: nn.Module | Sequence[Tensor],
    decay: float,
    *,
    include_buffers: bool = True,
) -> None:
    """Update ``teacher`` in place towards ``student``: ``t = decay * t + (1 - decay) * s``.

    Args:
        teacher: An ``nn.Module`` or a sequence of floating tensors, updated in place.
        student: The same kind of object as ``teacher``: a module with the same parameter and
            buffer names and shapes, or a sequence of tensors with the same length and shapes
            (any floating dtype: a float32 teacher may follow a bfloat16/float16 student).
        decay: Weight of the old teacher value, in ``[0, 1]`` (see :func:`ema_decay`).
        include_buffers: Modules only. When True (default), floating buffers (BatchNorm running
            statistics) are averaged like parameters; non-floating buffers (``num_batches_tracked``)
            are copied. When False, buffers are left untouched.

    Shapes, dtypes and devices: every pair has equal shapes; all tensors on one device (CPU or
    CUDA); float16, bfloat16, float32 or float64. Mismatches raise ``RuntimeError`` (compiled path)
    or ``ValueError`` (module path, naming the parameter) that names the first offending tensor.

    Example:
        >>> import torch, sslseg.ops
        >>> student = torch.nn.Linear(4, 2); teacher = torch.nn.Linear(4, 2)
        >>> sslseg.ops.ema_update_(teacher, student, sslseg.ops.ema_decay(step=10, decay=0.99))
    """
    if isinstance(teacher, nn.Module) != isinstance(student, nn.Module):
        raise TypeError(
            "ema_update_: teacher and student must both be nn.Module or both be sequences of tensors, "
            f"got {type(teacher).__name__} and {type(student).__name__}"
        )
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema_update_: decay must be a float in [0, 1], got {decay!r}")
    compiled = backend_for() == "compiled"
    with torch.no_grad():
        if isinstance(teacher, nn.Module):
            pairs = _module_pairs(teacher, student, include_buffers)  # type: ignore[arg-type]
            if pairs.copy_teacher:
                torch._foreach_copy_(pairs.copy_teacher, pairs.copy_student)
            if compiled and pairs.float_teacher:
                torch.ops.sslseg._ema_plan_update.default(pairs.plan(), float(decay))
            else:
                _reference(pairs.float_teacher, pairs.float_student, float(decay))
            return
        t_list, s_list = _as_tensor_list(teacher, "teacher"), _as_tensor_list(student, "student")
        if compiled and t_list:  # an empty list holds no tensor to pick the CPU/CUDA kernel by
            torch.ops.sslseg.ema_update_.default(t_list, s_list, float(decay))
        else:
            _reference(t_list, s_list, float(decay))


def _as_tensor_list(seq: Sequence[Tensor], name: str) -> list[Tensor]:
    if isinstance(seq, Tensor) or not isinstance(seq, Sequence):
        raise TypeError(f"ema_update_: {name} must be an nn.Module or a sequence of tensors, got {type(seq).__name__}")
    out = list(seq)
    for i, t in enumerate(out):
        if not isinstance(t, Tensor):
            raise TypeError(f"ema_update_: {name}[{i}] must be a Tensor, got {type(t).__name__}")
    return out


# ---- module handling: collect the tensor lists once per (teacher, student) and reuse them ------


@dataclass
class _Pairs:
    student_ref: weakref.ref
    include_buffers: bool
    generation: int
    # (owner dict, key, tensor): every cached parameter and buffer, teacher and student.
    param_entries: list[tuple[dict, str, Tensor]]
    buffer_entries: list[tuple[dict, str, Tensor]]
    float_teacher: list[Tensor]
    float_student: list[Tensor]
    copy_teacher: list[Tensor]
    copy_student: list[Tensor]
    # The lists cached in C++ behind an integer handle (the stable ABI has no custom classes): one
    # call per update whatever their length. Created on first compiled use, freed with this entry.
    _plan: int | None = None
    _free: weakref.finalize | None = None

    def plan(self) -> int:
        """The handle of the C++ plan over (float_teacher, float_student), created once."""
        if self._plan is None:
            self._plan = torch.ops.sslseg._ema_plan_new.default(self.float_teacher, self.float_student)
            self._free = weakref.finalize(self, torch.ops.sslseg._ema_plan_free.default, self._plan)
            self._free.atexit = False  # at exit the process frees it; torch may be half torn down
        return self._plan

    def valid_for(self, student: nn.Module, include_buffers: bool) -> bool:
        if self.student_ref() is not student or self.include_buffers != include_buffers:
            return False
        if self.generation != _GENERATION[0]:
            return False
        # Module.to()/.half()/.cuda() replace buffer objects directly in ``_buffers`` (no hook), so
        # buffers are compared by identity on every call; they are few. Parameters keep their
        # objects under .to() (the data is swapped in place), and replacing one goes through
        # register_parameter, which bumps the generation, unless torch.__future__ asks .to() to
        # overwrite or swap parameters: then they are checked by identity too.
        entries = self.buffer_entries
        if torch.__future__.get_overwrite_module_params_on_conversion() or torch.__future__.get_swap_module_params_on_conversion():
            entries = entries + self.param_entries
        return all(owner.get(key) is tensor for owner, key, tensor in entries)


_CACHE: "weakref.WeakKeyDictionary[nn.Module, _Pairs]" = weakref.WeakKeyDictionary()

# Bumped whenever any module registers a parameter, buffer or submodule (global nn hooks), which
# invalidates every cached tensor list at the cost of one integer compare per update.
_GENERATION = [0]


def _bump_generation(*_args: object) -> None:
    _GENERATION[0] += 1


nn.modules.module.register_module_parameter_registration_hook(_bump_generation)
nn.modules.module.register_module_buffer_registration_hook(_bump_generation)
nn.modules.module.register_module_module_registration_hook(_bump_generation)


def _named_slots(module: nn.Module, buffers: bool) -> list[tuple[str, dict, str, Tensor]]:
    """(qualified name, owning dict, key, tensor) for every parameter (and buffer) of ``module``."""
    out = []
    for prefix, sub in module.named_modules(remove_duplicate=True):
        table = sub._buffers if buffers else sub._parameters
        for key, tensor in table.items():
            if tensor is not None:
                out.append((f"{prefix}.{key}" if prefix else key, table, key, tensor))
    return out


def _module_pairs(teacher: nn.Module, student: nn.Module, include_buffers: bool) -> _Pairs:
    cached = _CACHE.get(teacher)
    if cached is not None and cached.valid_for(student, include_buffers):
        return cached
    kinds = ("parameter", "buffer") if include_buffers else ("parameter",)
    generation = _GENERATION[0]
    entries: dict[str, list[tuple[dict, str, Tensor]]] = {"parameter": [], "buffer": []}
    ft, fs, ct, cs = [], [], [], []
    for kind in kinds:
        t_slots = _named_slots(teacher, buffers=kind == "buffer")
        s_slots = {name: (owner, key, tensor) for name, owner, key, tensor in _named_slots(student, kind == "buffer")}
        t_names = [name for name, *_ in t_slots]
        if set(t_names) != set(s_slots):
            missing = sorted(set(t_names) - set(s_slots))
            extra = sorted(set(s_slots) - set(t_names))
            raise ValueError(
                f"ema_update_: teacher and student must have the same {kind}s; "
                f"missing in student: {missing[:5]}, only in student: {extra[:5]}"
            )
        for name, t_owner, t_key, t in t_slots:
            s_owner, s_key, s = s_slots[name]
            if t.shape != s.shape:
                raise ValueError(
                    f"ema_update_: {kind} '{name}' has shape {tuple(t.shape)} in teacher but {tuple(s.shape)} in student"
                )
            if t.device != s.device:
                raise ValueError(f"ema_update_: {kind} '{name}' is on {t.device} in teacher but on {s.device} in student")
            entries[kind] += [(t_owner, t_key, t), (s_owner, s_key, s)]
            if t.dtype in _FLOAT_DTYPES and s.dtype in _FLOAT_DTYPES:
                ft.append(t)
                fs.append(s)
            elif t.dtype == s.dtype and not t.is_floating_point():
                ct.append(t)
                cs.append(s)
            else:
                raise ValueError(
                    f"ema_update_: {kind} '{name}' has dtype {t.dtype} in teacher and {s.dtype} in student; "
                    "expected both floating (float16/bfloat16/float32/float64) or the same non-floating dtype"
                )
    pairs = _Pairs(weakref.ref(student), include_buffers, generation, entries["parameter"], entries["buffer"],
                   ft, fs, ct, cs)
    _CACHE[teacher] = pairs
    return pairs


# ---- the reference twin, and the fake kernel ----------------------------------------------------


def _check_lists(teacher: list[Tensor], student: list[Tensor], decay: float) -> None:
    """The checks of the compiled kernel (csrc/ops/ema.cpp), with the same messages."""
    if len(teacher) != len(student):
        raise RuntimeError(
            "ema_update_: teacher and student must have the same number of tensors, "
            f"got {len(teacher)} teacher tensors and {len(student)} student tensors"
        )
    if not 0.0 <= decay <= 1.0:
        raise RuntimeError(f"ema_update_: decay must be in [0, 1], got {decay}")
    for i, (t, s) in enumerate(zip(teacher, student)):
        if t.shape != s.shape:
            raise RuntimeError(
                f"ema_update_: student[{i}] must have the shape of teacher[{i}] {list(t.shape)}, got {list(s.shape)}"
            )
        if t.device != s.device:
            raise RuntimeError(
                f"ema_update_: student[{i}] must be on the device of teacher[{i}] ({t.device}), got {s.device}"
            )
        if t.dtype not in _FLOAT_DTYPES:
            raise RuntimeError(f"ema_update_: teacher[{i}] must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if s.dtype not in _FLOAT_DTYPES:
            raise RuntimeError(f"ema_update_: student[{i}] must be float16, bfloat16, float32 or float64, got {s.dtype}")


def _reference(teacher: list[Tensor], student: list[Tensor], decay: float) -> None:
    """Pure-PyTorch twin of the kernel: same checks, same fp32 (fp64) accumulation, same rounding."""
    _check_lists(teacher, student, decay)
    for t, s in zip(teacher, student):
        acc_dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        acc = t.to(acc_dtype) * decay + s.to(acc_dtype) * (1.0 - decay)
        t.copy_(acc)


if has_ops():

    @torch.library.register_fake("sslseg::ema_update_")
    def _ema_update_fake(teacher: list[Tensor], student: list[Tensor], decay: float) -> None:
        torch._check(len(teacher) == len(student), lambda: "ema_update_: teacher and student lengths differ")
        for i, (t, s) in enumerate(zip(teacher, student)):
            torch._check(t.shape == s.shape, lambda i=i: f"ema_update_: shape mismatch at index {i}")
        return None
