"""The CPU :class:`StepContext` that method unit tests call ``step`` with (what the engine builds)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from sslseg.methods import StepContext


def cpu_context(step: int = 0, iterations: int = 10, weight: float = 0.1,
                backward: Callable[[torch.Tensor], None] = lambda loss: loss.backward()) -> StepContext:
    """A float32 CPU context: ``consistency_weight=weight``, ramp finished, plain backward/step."""
    return StepContext(step=step, iterations=iterations, consistency_weight=weight, rampup=1.0,
                       device=torch.device("cpu"), autocast=contextlib.nullcontext, backward=backward,
                       optimizer_step=lambda opt: opt.step())


def tiny_method(name: str, dim: int = 2, num_classes: int = 3, **options):
    """Method ``name`` built on a narrow UNet: 2D on 32x32 patches, 3D on 16^3 patches."""
    from sslseg.methods import NetworkSpec, get_method

    cls = get_method(name)
    model, patch, opts = ("unet", (32, 32), {"channels": (4, 8, 16, 32, 64)}) if dim == 2 else \
        ("unet_3d", (16, 16, 16), {"channels": (4, 8, 16)})
    spec = NetworkSpec(model=model, in_channels=1, num_classes=num_classes, dim=dim, patch_size=patch, seed=0,
                       model_options=opts)
    method = cls(cls.Config(**options), spec)
    method.build()
    return method
