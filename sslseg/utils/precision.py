"""Mixed precision: which autocast dtype a device should run, and why.

``amp="auto"`` (the default of training and ``infer``; ``evaluate`` scores in float32 unless
asked) picks bfloat16 autocast where
the device computes bfloat16 natively and float32 everywhere else:

* a CUDA GPU whose compute capability has bf16 tensor cores (Ampere, sm_80, and newer), as torch
  reports it without counting emulation;
* an x86 CPU with ``avx512_bf16`` or AMX tiles, as torch's CPU capability probes report them
  (``torch.cpu._is_avx512_bf16_supported``, ``torch.cpu._is_amx_tile_supported``); oneDNN runs
  convolutions and matrix products there in bf16 at about twice the fp32 speed. An AVX-512 CPU
  without ``avx512_bf16``, an AVX2 CPU or an ARM CPU emulates bf16, which is slower than fp32, so
  those run fp32.

One workaround, found by sslseg's reproducibility tests: on the CPU, oneDNN's bf16 ``Conv3d``
weight gradient is wrong (run-to-run different, at times ~1e34 or NaN) whenever the convolution's
input has depth 2 and its kernel more than one slice in depth (torch 2.13 and 2.14.1, oneDNN 3.12;
depth 1, 3, 4 and more are exact, and so are the other two axes at size 2). The bottleneck of a 3D
U-Net on 32-voxel or anisotropic patches has depth 2. So bf16 training of 3D networks on the CPU
runs those few small convolutions in float32 (:func:`autocast` routes them; every other layer stays
bf16); ``benches/bench_amp.py`` probes the defect and the workaround on every run.

``"none"`` forces float32, ``"bf16"`` forces bf16 autocast (also where it is emulated), ``"fp16"``
float16 autocast with a gradient scaler (CUDA only). Autocast lowers only the convolutions and
matrix products; sslseg computes every loss, every softmax that becomes a consistency target or a
pseudo-label, the EMA teacher update and every metric in float32 (the methods cast logits with
``.float()`` before them), and the weights and optimizer state stay float32.
"""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # torch loads on first use: the CLI imports AMP_CHOICES to build `sslseg --help`
    import torch

__all__ = ["AMP_CHOICES", "CPU_CONV3D_DEPTH2", "Precision", "autocast", "autocast_dtype", "native_bf16", "resolve_amp"]

#: What bf16 training of a 3D network on the CPU does differently (see the module docstring).
CPU_CONV3D_DEPTH2 = "Conv3d layers on depth-2 feature maps train in float32 (a oneDNN bf16 defect)"

#: Values of the ``amp`` option (``None`` is read as ``"none"``: configs written before ``auto``).
AMP_CHOICES = ("auto", "none", "bf16", "fp16")


class Precision(NamedTuple):
    """A resolved ``amp`` choice: ``chosen`` is ``"none"``, ``"bf16"`` or ``"fp16"``; ``why`` says why."""

    requested: str
    chosen: str
    why: str

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype (None: float32, no autocast)."""
        import torch

        return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.chosen]

    def describe(self) -> str:
        """One line for run headers: ``bf16 (auto: CPU with native bf16 (avx512_bf16))``."""
        label = "off (float32)" if self.chosen == "none" else self.chosen
        if self.requested == "auto":
            return f"{label} (auto: {self.why})"
        return f"{label} ({self.why})"


def native_bf16(device: torch.device | str) -> tuple[bool, str]:
    """Whether ``device`` computes bfloat16 natively, and what was found (for logs and errors)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        if major >= 8:
            return True, f"GPU sm_{major}{minor} has bf16 tensor cores"
        return False, f"GPU sm_{major}{minor} has no native bf16 (needs sm_80 or newer)"
    if device.type == "cpu":
        probes = (("avx512_bf16", "_is_avx512_bf16_supported"), ("AMX", "_is_amx_tile_supported"))
        found = [name for name, probe in probes if getattr(torch.cpu, probe, lambda: False)()]
        if found:
            return True, f"CPU with native bf16 ({', '.join(found)})"
        return False, "CPU without native bf16 (no avx512_bf16 or AMX; bf16 would be emulated)"
    return False, f"{device.type} devices run float32 under auto"


def resolve_amp(amp: str | None, device: torch.device | str, *, dim: int | None = None,
                training: bool = False) -> Precision:
    """The precision a run on ``device`` uses for the option ``amp``.

    Args:
        amp: ``"auto"``, ``"none"`` (or None), ``"bf16"`` or ``"fp16"``.
        device: The device the network runs on.
        dim: Spatial dims of the network (2 or 3), when known.
        training: Whether gradients are computed (training), or only forward passes (inference).

    Raises:
        ValueError: an unknown value, or ``fp16`` off CUDA (it needs a gradient scaler and CUDA
            kernels; use ``bf16`` on the CPU).
    """
    import torch

    requested = "none" if amp is None else amp
    if requested not in AMP_CHOICES:
        raise ValueError(f"amp: expected one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    device = torch.device(device)
    workaround = f"; {CPU_CONV3D_DEPTH2}" if _cpu_3d_training(device, dim, training) else ""
    if requested == "auto":
        native, why = native_bf16(device)
        return Precision(requested, "bf16" if native else "none", (why + workaround) if native else why)
    if requested == "fp16" and device.type != "cuda":
        raise ValueError(f"amp='fp16' needs a CUDA device (it uses a GradScaler), the device is {device}; "
                         "use amp='bf16' or 'auto' on the CPU")
    return Precision(requested, requested, "forced" + (workaround if requested == "bf16" else ""))


def autocast(dtype: torch.dtype | None, device: torch.device | str, *, dim: int | None = None,
             training: bool = False) -> contextlib.AbstractContextManager:
    """The autocast context of a run: a null context for float32 (``dtype`` None), else
    ``torch.autocast`` to ``dtype``; for bf16 training of a 3D network (``dim=3``) on the CPU it
    also routes the convolutions that oneDNN's bf16 weight gradient gets wrong to float32
    (:func:`_conv3d_depth2_in_float32`)."""
    import torch

    device = torch.device(device)
    if dtype is None:
        return contextlib.nullcontext()
    cast = torch.autocast(device_type=device.type, dtype=dtype)
    if not (dtype == torch.bfloat16 and _cpu_3d_training(device, dim, training)):
        return cast
    stack = contextlib.ExitStack()
    stack.enter_context(cast)
    stack.enter_context(_conv3d_depth2_in_float32()())
    return stack


def _cpu_3d_training(device: torch.device, dim: int | None, training: bool) -> bool:
    """Whether the depth-2 Conv3d workaround applies: training a 3D network on the CPU."""
    return device.type == "cpu" and dim == 3 and training


@functools.cache
def _conv3d_depth2_in_float32() -> type:
    """A torch function mode (class) that runs ``conv3d``/``conv_transpose3d`` in float32, outside
    autocast, when its input has depth 2, its kernel more than one slice in depth, a gradient will
    be computed, and CPU bf16 autocast is on: the cases where oneDNN's bf16 weight gradient is
    wrong. Every other call passes through unchanged. Built on first use (torch loads lazily)."""
    import torch
    from torch.overrides import TorchFunctionMode

    convs = (torch.conv3d, torch.conv_transpose3d)

    def needs_float32(x: torch.Tensor, weight: torch.Tensor) -> bool:
        return (x.dim() == 5 and x.shape[2] == 2 and weight.shape[2] > 1 and x.device.type == "cpu"
                and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
                and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)

    def up(a):
        return a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a

    class Conv3dDepth2InFloat32(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in convs and needs_float32(args[0] if args else kwargs["input"],
                                               args[1] if len(args) > 1 else kwargs["weight"]):
                with torch.autocast("cpu", enabled=False):
                    return func(*map(up, args), **{k: up(v) for k, v in kwargs.items()})
            return func(*args, **kwargs)

    return Conv3dDepth2InFloat32


def autocast_dtype(amp: str | None, device: torch.device | str) -> torch.dtype | None:
    """``resolve_amp(amp, device).dtype``: the autocast dtype, None for float32."""
    return resolve_amp(amp, device).dtype
