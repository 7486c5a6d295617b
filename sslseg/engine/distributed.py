"""Distributed data-parallel training: joining the process group torchrun describes, and leaving it.

``torchrun --nproc_per_node N -m sslseg fit ...`` starts N processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; :func:`init_distributed` joins them into
one process group (NCCL on CUDA, Gloo on CPU) and picks this rank's device; :func:`cleanup`
destroys the group it created. The collectives used during a step (all-reduces, global batch
statistics) live in :mod:`sslseg.utils.distributed`, below the losses and methods that call them.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DistributedState", "cleanup", "init_distributed", "launched_by_torchrun"]

#: The environment variables torchrun sets for each process.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedState:
    """Where this process stands in the run.

    Attributes:
        rank: Global rank (0 in a single process).
        world_size: Number of processes (1 in a single process).
        local_rank: Rank on this node; selects ``cuda:<local_rank>``.
        backend: ``"nccl"``, ``"gloo"`` (or another backend of a process group the caller set up),
            None without a process group.
        owns_group: True when :func:`init_distributed` created the process group (and
            :func:`cleanup` destroys it); False when the caller had already initialised one.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        """More than one process: DDP, sharded data and collectives are in use."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files, logs and the progress bar."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher using its variables) started more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"distributed: environment variable {name} must be an integer, got {value!r} "
                         "(start the processes with torchrun)") from None


def _device_for(name: str | None, local_rank: int, distributed: bool) -> torch.device:
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} but no CUDA device is available; use device='cpu'")
        if distributed:
            if dev.index is not None:
                raise ValueError(f"device={name!r}: under torchrun each process uses cuda:<LOCAL_RANK>; "
                                 "pass device='cuda' (or none)")
            if local_rank >= torch.cuda.device_count():
                raise ValueError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} CUDA "
                                 "device(s); start at most that many processes per node (--nproc_per_node)")
            dev = torch.device("cuda", local_rank)
    return dev


def init_distributed(device: str | None = None, *, timeout_s: float | None = None) -> tuple[DistributedState, torch.device]:
    """Join the process group that torchrun describes and pick this process's device.

    Without torchrun's variables (``WORLD_SIZE`` unset or 1) and without an initialised process
    group this is a single process: rank 0 of 1, nothing is initialised. If the caller already
    initialised ``torch.distributed`` (its own launcher, ``torch.multiprocessing.spawn``), that
    group is used as it is.

    Args:
        device: ``None`` (CUDA if available, else CPU), ``"cpu"`` or ``"cuda"``. Under torchrun a
            CUDA run uses ``cuda:<LOCAL_RANK>``; an explicit index is an error there.
        timeout_s: Collective timeout (default: torch's).

    Returns:
        ``(state, device)``. The backend is NCCL on CUDA and Gloo on CPU.
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count())))
        dev = _device_for(device, local_rank, world > 1)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistributedState(rank, world, local_rank, dist.get_backend(), owns_group=False), dev
    if not launched_by_torchrun():
        return DistributedState(), _device_for(device, 0, False)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed support")
    missing = [k for k in TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise ValueError(f"distributed: WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} "
                         "is not set; start the processes with torchrun")
    rank, world, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    dev = _device_for(device, local_rank, True)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        kwargs["device_id"] = dev  # binds NCCL to this device (and barrier() to it)
    if timeout_s is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, **kwargs)
    return DistributedState(rank, world, local_rank, backend, owns_group=True), dev


def cleanup(state: DistributedState) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    dist = torch.distributed
    if state.owns_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
