"""Where a training run executes: the device, DDP rank info from torchrun's environment,
joining and leaving the process group (gloo on CPU, nccl on CUDA), BatchNorm buffers made rank
0's, and deterministic algorithms."""

from __future__ import annotations

import atexit
import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "Dist",
    "determinism",
    "dist_from_env",
    "init_process_group",
    "leave_process_group",
    "resolve_device",
    "sync_buffers",
]


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created: bool = False


def dist_from_env() -> Dist:
    """Rank info from torchrun's env (WORLD_SIZE, RANK, LOCAL_RANK); nothing is initialised."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if "RANK" not in os.environ:
        raise ValueError(
            f"WORLD_SIZE={world} is set but RANK is not: launch with torchrun (which sets "
            "RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT) or unset WORLD_SIZE"
        )
    rank = int(os.environ["RANK"])
    return Dist(rank=rank, world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", rank)))


def init_process_group(info: Dist, dev: torch.device) -> Dist:
    """Join the process group unless one exists: NCCL when this rank trains on a GPU, gloo
    when it trains on the CPU (so CPU DDP also works on a machine that has GPUs)."""
    import torch.distributed as dist

    if info.world_size <= 1 or dist.is_initialized():
        return info
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return dataclasses.replace(info, created=True)


def resolve_device(device: torch.device | str | None, dist: Dist) -> torch.device:
    """The training device: ``device``, by default CUDA if available else CPU; under torchrun a
    bare "cuda" is ``cuda:LOCAL_RANK``, which must exist."""
    if device is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", dist.local_rank if dist.world_size > 1 else 0)
    if dev.type == "cuda" and dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"training device {dev} does not exist: this machine has "
            f"{torch.cuda.device_count()} CUDA device(s). Under torchrun start at most that many "
            "processes per node (--nproc_per_node), or train on the CPU with device='cpu' "
            "(DDP then uses gloo)"
        )
    return dev


@contextmanager
def determinism(on: bool, device: torch.device) -> Iterator[None]:
    """Deterministic algorithms (strict on CPU, warn-only on CUDA) or cudnn autotuning."""
    prev = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    if on:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.backends.cudnn.benchmark = prev[2]
        torch.backends.cudnn.deterministic = prev[3]


def leave_process_group(finished: bool) -> None:
    """End a training's use of the process group it created.

    After a run that finished on every rank, the ranks meet at a barrier (a rank that tears gloo
    down while its peer still has a collective in flight makes gloo's C++ side abort, "terminate
    called without an active exception") and the group is *kept* for the next training of this
    process (a study trains the fp32 model and then its QAT cells): destroying it and joining
    again through the same torchrun store sometimes read the previous group's stale gloo
    addresses and hung one rank in ``init_process_group`` while its peer waited in DDP's first
    collective. The kept group is destroyed at interpreter exit (no collective is in flight
    then). After an error the barrier is skipped (the peer may never reach it) and the group is
    destroyed at once."""
    import torch.distributed as dist

    if not finished:
        dist.destroy_process_group()
        return
    dist.barrier()
    global _EXIT_HOOK
    if not _EXIT_HOOK:
        atexit.register(_destroy_at_exit)
        _EXIT_HOOK = True


_EXIT_HOOK = False


def _destroy_at_exit() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def sync_buffers(model: nn.Module) -> None:
    import torch.distributed as dist

    for buf in model.buffers():
        dist.broadcast(buf, src=0)
