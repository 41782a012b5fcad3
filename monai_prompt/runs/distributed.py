"""Waiting for rank 0 under ``torchrun`` for longer than NCCL allows a collective to take."""

from __future__ import annotations

import datetime

import torch.distributed as dist

__all__ = ["RANK0_WAIT", "rank0_wait_group", "wait_for_rank0"]

#: how long the other processes wait in :func:`wait_for_rank0` (NCCL's own limit for a collective is 10 minutes,
#: less than FPT's preload of a large data set on rank 0 takes).
RANK0_WAIT = datetime.timedelta(hours=12)

_wait_group: tuple[dist.ProcessGroup, dist.ProcessGroup] | None = None  # (the default group, its gloo wait group)


def rank0_wait_group() -> dist.ProcessGroup | None:
    """The gloo group of every process that :func:`wait_for_rank0` waits on, whose time limit is :data:`RANK0_WAIT`;
    created on the first call under the current process group, which every process must make at once
    (``multi_gpu_train.json``'s ``distributed_setup`` does). None without a process group."""
    global _wait_group
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.group.WORLD
    if _wait_group is None or _wait_group[0] is not world:
        _wait_group = (world, dist.new_group(backend="gloo", timeout=RANK0_WAIT))
    return _wait_group[1]


def wait_for_rank0() -> None:
    """Every process waits here until all have arrived, for up to :data:`RANK0_WAIT`: a barrier on
    :func:`rank0_wait_group`, not on the process group itself, whose NCCL barrier ends a wait for rank 0's FPT preload
    after 10 minutes. Nothing without a process group."""
    group = rank0_wait_group()
    if group is not None:
        dist.barrier(group=group)
