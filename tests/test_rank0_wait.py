"""``monai_prompt.runs.wait_for_rank0``: the other processes of a torchrun wait for rank 0 (FPT's preload) longer
than the process group's own time limit for a collective (NCCL: 10 minutes), on a gloo group of its own."""

import datetime
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from io_support import free_port
from monai_prompt.runs import RANK0_WAIT, rank0_wait_group, wait_for_rank0

#: the process group's own time limit in these tests, how long rank 0 keeps the others waiting (longer), and how
#: long a test waits for its two processes at most
LIMIT_S, RANK0_WORK_S, DEADLINE_S = 2, 5, 240


def _wait_while_rank0_works(rank: int, port: int, own_group: bool, start) -> None:
    start.wait()  # both processes have started (spawned: each imports this module), so the time limit starts now
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=LIMIT_S))
    try:
        rank0_wait_group()  # every process at once, as multi_gpu_train.json's distributed_setup
        if rank == 0:
            time.sleep(RANK0_WORK_S)  # the preload
        wait_for_rank0() if own_group else dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_two_processes(own_group: bool) -> None:
    """Both processes spawned (a fork of a pytest-xdist worker, which runs threads, can deadlock), joined within
    :data:`DEADLINE_S`; the first error of either is raised."""
    start = mp.get_context("spawn").Barrier(2)
    processes = mp.start_processes(_wait_while_rank0_works, args=(free_port(), own_group, start), nprocs=2,
                                   join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not processes.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"the two processes did not finish within {DEADLINE_S} s")
    finally:
        for process in processes.processes:
            if process.is_alive():
                process.kill()


def test_the_other_processes_wait_for_rank0_past_the_process_group_time_limit():
    assert RANK0_WAIT >= datetime.timedelta(hours=1)
    _run_two_processes(own_group=True)


def test_the_process_group_s_own_barrier_gives_up_at_its_time_limit():
    """What the wait avoids: the same wait on the process group's barrier fails (NCCL: after 10 minutes)."""
    with pytest.raises(Exception, match="(?i)timed out|timeout"):
        _run_two_processes(own_group=False)


def test_without_a_process_group_nothing_waits():
    assert rank0_wait_group() is None
    wait_for_rank0()
