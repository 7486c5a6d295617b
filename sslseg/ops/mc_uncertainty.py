"""MC-dropout uncertainty (UA-MT): streaming mean softmax and predictive entropy.

UA-MT (Yu et al. 2019) runs the teacher T times with dropout (and input noise) active and uses the
entropy of the mean softmax as a per-voxel uncertainty. SSL4MIS stacks the T outputs into a
``(T * B, C, *S)`` tensor, softmaxes it and reduces over T. Here the T passes are consumed one at a
time: ``mc_softmax_accumulate_`` adds ``softmax(logits, dim=1)`` into one accumulator in a single
pass over the logits (the first pass writes, so no zero fill), and ``mc_entropy_finalize_`` turns
the sum into the mean in place and computes the entropy in the same pass. Extra memory is one
accumulator whatever T is.

The ops are deterministic: the randomness (dropout, noise) stays in the model. They are not
differentiable: UA-MT uses the uncertainty as a mask and the teacher's passes run under
``no_grad``, so no autograd formula is registered and the outputs never require grad.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from sslseg.ops._loader import backend_for, dtype_name, has_ops

__all__ = ["mc_entropy_finalize_", "mc_softmax_accumulate_", "predictive_entropy"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def predictive_entropy(
    logits: Iterable[Tensor], *, normalize: bool = False, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """Mean softmax probability and per-voxel predictive entropy of T stochastic passes.

    ``p = mean_t softmax(logits[t], dim=1)`` and ``H = -sum_c p_c * log(p_c + eps)`` (natural log;
    ``0 * log 0 = 0``), divided by ``log(C)`` when ``normalize`` (then ``H`` is in ``[0, 1]`` up to
    ``eps``). With the default ``eps=1e-6`` this is UA-MT's uncertainty as SSL4MIS computes it.

    Args:
        logits: A sequence or an iterator of T >= 1 tensors ``(B, C, *spatial)`` (e.g. a generator
            of T dropout forward passes; a ``(T, B, C, *spatial)`` tensor also works, as it iterates
            over its first dim). Float16/bfloat16/float32/float64, all on one device (CPU or CUDA),
            all of one shape. They are consumed one at a time; the extra memory is one accumulator,
            independent of T.
        normalize: Divide the entropy by ``log(C)`` (needs ``C >= 2``).
        eps: Added inside the log, ``>= 0``.

    Returns:
        ``(mean, entropy)``: ``mean`` ``(B, C, *spatial)`` and ``entropy`` ``(B, 1, *spatial)`` (keeps
        the class dim, so it broadcasts against ``(B, C, *spatial)`` as UA-MT's mask does), float32
        (float64 when the logits are float64). Never require grad (no autograd: use as a mask).

    Example:
        >>> teacher.train()  # dropout on
        >>> with torch.no_grad():
        ...     mean, unc = sslseg.ops.predictive_entropy(teacher(x + noise(x)) for _ in range(8))
    """
    if isinstance(normalize, bool) is False:
        raise TypeError(f"predictive_entropy: normalize must be a bool, got {type(normalize).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"predictive_entropy: eps must be a float >= 0, got {eps!r}")
    if isinstance(logits, Tensor) and logits.dim() < 3:
        raise ValueError(
            f"predictive_entropy: a tensor of logits must be (T, B, C, *spatial), got shape {list(logits.shape)}"
        )
    acc: Tensor | None = None
    count = 0
    with torch.no_grad():
        for i, x in enumerate(logits):
            if not isinstance(x, Tensor):
                raise TypeError(f"predictive_entropy: logits[{i}] must be a Tensor, got {type(x).__name__}")
            x = x.detach()
            if acc is None:
                if x.dim() < 2:
                    raise ValueError(f"predictive_entropy: logits[0] must be (B, C, *spatial), got shape {list(x.shape)}")
                acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
                acc = torch.empty(x.shape, dtype=acc_dtype, device=x.device)
                mc_softmax_accumulate_(acc, x, overwrite=True)
            else:
                if x.shape != acc.shape or x.device != acc.device:
                    raise ValueError(
                        f"predictive_entropy: logits[{i}] is {list(x.shape)} on {x.device} but logits[0] is "
                        f"{list(acc.shape)} on {acc.device}"
                    )
                mc_softmax_accumulate_(acc, x)
            count += 1
        if acc is None:
            raise ValueError("predictive_entropy: logits is empty: need at least one pass")
        entropy = mc_entropy_finalize_(acc, count, normalize=normalize, eps=float(eps))
    return acc, entropy


def mc_softmax_accumulate_(acc: Tensor, logits: Tensor, *, overwrite: bool = False) -> None:
    """``acc += softmax(logits, dim=1)`` in place (``acc = ...`` when ``overwrite``), one pass.

    Args:
        acc: ``(B, C, *spatial)`` contiguous float32/float64 accumulator (CPU or CUDA).
        logits: Same shape and device, float16/bfloat16/float32/float64, any strides (non-contiguous
            logits are copied first); the softmax is computed in ``acc``'s dtype.
        overwrite: Write instead of add (the first pass: ``acc`` may be uninitialised).

    Not differentiable.
    """
    if backend_for() == "compiled":
        torch.ops.sslseg.mc_softmax_accumulate_.default(acc, logits, bool(overwrite))
    else:
        _reference_accumulate(acc, logits, bool(overwrite))


def mc_entropy_finalize_(acc: Tensor, count: int, *, normalize: bool = False, eps: float = 1e-6) -> Tensor:
    """Turn a sum of ``count`` softmaxes into their mean in place and return the entropy.

    Args:
        acc: ``(B, C, *spatial)`` contiguous float32/float64, the output of ``count`` calls of
            :func:`mc_softmax_accumulate_`; holds the mean probability afterwards.
        count: Number of accumulated passes, ``>= 1``.
        normalize: Divide by ``log(C)`` (needs ``C >= 2``).
        eps: Added inside the log, ``>= 0``.

    Returns:
        ``(B, 1, *spatial)`` entropy ``-sum_c p_c log(p_c + eps)`` in ``acc``'s dtype. Not
        differentiable.
    """
    if backend_for() == "compiled":
        return torch.ops.sslseg.mc_entropy_finalize_.default(acc, int(count), bool(normalize), float(eps))
    return _reference_finalize(acc, int(count), bool(normalize), float(eps))


# ---- checks, reference twins and fake kernels -----------------------------------------------------


def _check_acc(op: str, acc: Tensor) -> None:
    """The checks of the compiled kernel (csrc/ops/mc_uncertainty.cpp), with the same messages."""
    if acc.dim() < 2:
        raise RuntimeError(f"{op}: acc must be (B, C, *spatial), got shape {list(acc.shape)}")
    if acc.shape[1] < 1:
        raise RuntimeError(f"{op}: acc must have at least 1 class, got shape {list(acc.shape)}")
    if acc.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f"{op}: acc must be float32 or float64 (the accumulator), got {dtype_name(acc.dtype)}")
    if not acc.is_contiguous():
        raise RuntimeError(f"{op}: acc must be contiguous")


def _reference_accumulate(acc: Tensor, logits: Tensor, overwrite: bool) -> None:
    """Pure-PyTorch twin of ``mc_softmax_accumulate_``: same checks, softmax in ``acc``'s dtype."""
    op = "mc_softmax_accumulate_"
    _check_acc(op, acc)
    if logits.shape != acc.shape:
        raise RuntimeError(f"{op}: logits must have the shape of acc {list(acc.shape)}, got {list(logits.shape)}")
    if logits.device != acc.device:
        raise RuntimeError(f"{op}: logits must be on the device of acc ({acc.device}), got {logits.device}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise RuntimeError(f"{op}: logits must be float16, bfloat16, float32 or float64, got {dtype_name(logits.dtype)}")
    p = torch.softmax(logits.to(acc.dtype), dim=1)
    if overwrite:
        acc.copy_(p)
    else:
        acc.add_(p)


def _reference_finalize(acc: Tensor, count: int, normalize: bool, eps: float) -> Tensor:
    """Pure-PyTorch twin of ``mc_entropy_finalize_``: same checks, same arithmetic."""
    op = "mc_entropy_finalize_"
    _check_acc(op, acc)
    if count < 1:
        raise RuntimeError(f"{op}: count must be >= 1 (the number of accumulated passes), got {count}")
    if not eps >= 0.0:
        raise RuntimeError(f"{op}: eps must be >= 0, got {eps:g}")
    if normalize and acc.shape[1] < 2:
        raise RuntimeError(f"{op}: normalize=True needs at least 2 classes, got {acc.shape[1]}")
    acc.div_(count)
    entropy = -torch.special.xlogy(acc, acc + eps).sum(1, keepdim=True)
    if normalize:
        entropy = entropy / math.log(acc.shape[1])
    return entropy


if has_ops():

    @torch.library.register_fake("sslseg::mc_softmax_accumulate_")
    def _mc_accumulate_fake(acc: Tensor, logits: Tensor, overwrite: bool) -> None:
        torch._check(acc.shape == logits.shape, lambda: "mc_softmax_accumulate_: logits must have the shape of acc")
        return None

    @torch.library.register_fake("sslseg::mc_entropy_finalize_")
    def _mc_finalize_fake(acc: Tensor, count: int, normalize: bool, eps: float) -> Tensor:
        torch._check(acc.dim() >= 2, lambda: "mc_entropy_finalize_: acc must be (B, C, *spatial)")
        return acc.new_empty((acc.shape[0], 1, *acc.shape[2:]))
