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

One exception, found by sslseg's reproducibility tests: on the CPU, oneDNN's bf16 ``Conv3d``
weight gradient is wrong (run-to-run different, at times ~1e34 or NaN) whenever a feature map has
depth 2, as the bottleneck of a 3D U-Net on 32-voxel or anisotropic patches has (torch 2.13 and
2.14.1, oneDNN 3.12; ``benches/bench_amp.py`` reproduces it in a few lines). So ``auto`` trains
3D networks on the CPU in float32; their inference (forward passes only, which are exact there)
still runs in bf16. ``bf16`` forces it anyway, with a warning.

``"none"`` forces float32, ``"bf16"`` forces bf16 autocast (also where it is emulated), ``"fp16"``
float16 autocast with a gradient scaler (CUDA only). Autocast lowers only the convolutions and
matrix products; sslseg computes every loss, every softmax that becomes a consistency target or a
pseudo-label, the EMA teacher update and every metric in float32 (the methods cast logits with
``.float()`` before them), and the weights and optimizer state stay float32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # torch loads on first use: the CLI imports AMP_CHOICES to build `sslseg --help`
    import torch

__all__ = ["AMP_CHOICES", "CPU_CONV3D_BF16_TRAINING", "Precision", "autocast_dtype", "native_bf16", "resolve_amp"]

#: Why ``auto`` trains 3D networks on the CPU in float32 (see the module docstring).
CPU_CONV3D_BF16_TRAINING = ("oneDNN's bf16 Conv3d weight gradient on the CPU is wrong for feature maps of depth 2 "
                            "(non-deterministic, at times NaN), so 3D training on the CPU stays float32")

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
        return f"{label} (auto: {self.why})" if self.requested == "auto" else f"{label} (forced)"


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
    conv3d_bug = device.type == "cpu" and dim == 3 and training
    if requested == "auto":
        native, why = native_bf16(device)
        if native and conv3d_bug:
            return Precision(requested, "none", CPU_CONV3D_BF16_TRAINING)
        return Precision(requested, "bf16" if native else "none", why)
    if requested == "fp16" and device.type != "cuda":
        raise ValueError(f"amp='fp16' needs a CUDA device (it uses a GradScaler), the device is {device}; "
                         "use amp='bf16' or 'auto' on the CPU")
    if requested == "bf16" and conv3d_bug:
        import warnings

        warnings.warn(f"amp='bf16' trains a 3D network on the CPU: {CPU_CONV3D_BF16_TRAINING.split(', so')[0]}; "
                      "amp='auto' or 'none' trains it in float32", RuntimeWarning, stacklevel=2)
    return Precision(requested, requested, "forced")


def autocast_dtype(amp: str | None, device: torch.device | str) -> torch.dtype | None:
    """``resolve_amp(amp, device).dtype``: the autocast dtype, None for float32."""
    return resolve_amp(amp, device).dtype
