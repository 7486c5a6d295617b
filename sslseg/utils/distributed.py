"""Collectives for code that runs under DDP: rank queries, all-reduces and global batch statistics.

These are the step-time helpers a loss, a method or the engine may call; joining and leaving the
process group is the engine's (:mod:`sslseg.engine.distributed`). Every helper here is the
identity (or a no-op) when no process group with more than one rank is active, so the same code
runs in one process and under torchrun.

Global batch statistics: a statistic computed over the batch (the Dice loss's per-class sums, a
confidence mask's count) differs per rank when each rank holds a shard of the batch.
:func:`global_batch_sum` sums such a statistic over the ranks, differentiably, while the engine has
turned on :func:`global_batch_statistics` for the training step; with it, one DDP step on N ranks
computes the same loss and gradient as one process with the whole batch.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "all_gather_object",
    "all_reduce_gradients",
    "all_reduce_mean",
    "all_reduce_sum",
    "average_tensors",
    "barrier",
    "broadcast_object",
    "get_rank",
    "get_world_size",
    "global_batch_statistics",
    "global_batch_sum",
    "is_main",
]


def _active() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Processes in the default process group (1 without one)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 and in a single process."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if _active():
        torch.distributed.barrier()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over the ranks, as a new tensor (``tensor`` itself in a single process).

    Differentiable when ``tensor`` requires grad: the backward sums the incoming gradients over the
    ranks too, which is what makes a loss that uses a summed statistic have DDP's averaged gradient
    equal to the single-process gradient of the whole batch.
    """
    if not _active():
        return tensor
    if tensor.requires_grad:
        return _AllReduceSum.apply(tensor)
    out = tensor.detach().clone()
    torch.distributed.all_reduce(out)
    return out


class _AllReduceSum(torch.autograd.Function):
    """``y = sum_r x_r`` on every rank; ``dL/dx_r = sum_r' dL_r'/dy`` (the gradient is summed as well)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        out = tensor.detach().clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(grad)
        return grad


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """The mean of ``tensor`` over the ranks (``tensor`` itself in a single process); differentiable.

    With equal per-rank batches, a per-rank mean statistic all-reduced this way is the statistic of
    the whole batch, e.g. a normaliser ``sum(mask)`` or ``mean(w)`` in a ratio loss.
    """
    if not _active():
        return tensor
    return all_reduce_sum(tensor) / torch.distributed.get_world_size()


_GLOBAL_BATCH: contextvars.ContextVar[bool] = contextvars.ContextVar("sslseg_global_batch", default=False)


@contextlib.contextmanager
def global_batch_statistics(enabled: bool = True) -> Iterator[None]:
    """Within this context (the engine's DDP training step), :func:`global_batch_sum` all-reduces."""
    token = _GLOBAL_BATCH.set(bool(enabled))
    try:
        yield
    finally:
        _GLOBAL_BATCH.reset(token)


def global_batch_sum(tensor: Tensor) -> Tensor:
    """A sum over the batch made global: :func:`all_reduce_sum` during a DDP training step, else ``tensor``.

    Losses call it on their batch sums (the Dice loss's per-class intersections and
    denominators); outside the engine's step (validation, tests, single-process runs) it returns
    ``tensor`` unchanged. Every rank must reach the same calls in the same order.
    """
    if not _GLOBAL_BATCH.get():
        return tensor
    return all_reduce_sum(tensor)


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in a single process).

    Objects are pickled; keep them small (validation results, RNG states, CTAugment rewards).
    """
    if not _active():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` in a single process)."""
    if not _active():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def _by_dtype(tensors: Sequence[Tensor]) -> dict[tuple[torch.dtype, torch.device], list[Tensor]]:
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return groups


def average_tensors(tensors: Iterable[Tensor]) -> None:
    """Replace ``tensors`` in place by their mean over the ranks (one flat all-reduce per dtype).

    The engine averages the networks' floating buffers (BatchNorm running statistics, which each
    rank updates from its shard) after every step, so that students and teachers stay identical
    across ranks; for a running mean the average equals the single-process update with the whole
    batch.
    """
    if not _active():
        return
    world = torch.distributed.get_world_size()
    for group in _by_dtype(list(tensors)).values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        torch.distributed.all_reduce(flat)
        flat.div_(world)
        with torch.no_grad():
            for t, v in zip(group, flat.split([t.numel() for t in group])):
                t.copy_(v.view_as(t))


def all_reduce_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Average the ``.grad`` of ``parameters`` over the ranks in place (no-op in a single process).

    For networks a method trains with its own optimizer outside the engine's DDP step (the
    adversarial discriminator): call it between ``backward`` and the optimizer step. Every rank
    must pass the same parameters, with a gradient on the same ones (those without are skipped).
    """
    average_tensors([p.grad for p in parameters if p.grad is not None])
