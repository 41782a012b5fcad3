"""One training run per checkpoint folder: an exclusive lock, crash leftovers removed, no silent replacement.

:func:`claim_run_folder` is the first step of a training bundle's ``initialize``::

    "$monai_prompt.runs.claim_run_folder(@ckpt_dir, resume=@flags#resume, overwrite=@flags#overwrite)"

It locks ``<ckpt_dir>/.lock`` (a second run into the same folder fails at once, naming the first), removes the
temporary files interrupted atomic writes left behind, and refuses to start a new run over a previous run's
``model.pt``/``checkpoint_*.pt`` unless the run resumes it or ``overwrite`` is set. The lock is an advisory
``flock`` (POSIX) that the operating system drops when its process ends, however it ends, so the lock of a dead
run is simply taken over; the file's text (PID, host, start time) is what the error shows.
"""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
import socket
from pathlib import Path

from monai_prompt.io import TMP_SUFFIX

__all__ = ["LOCK_NAME", "RUN_FILES", "RunFolderError", "RunLock", "claim_run_folder", "remove_partial_writes"]

logger = logging.getLogger("monai_prompt")

#: the lock file in the checkpoint folder.
LOCK_NAME = ".lock"
#: what a previous training run leaves in its checkpoint folder (best model, interval/final checkpoints).
RUN_FILES = ("model.pt", "checkpoint_*.pt")

#: locks this process holds, by folder, so that a second claim of the same folder in-process re-uses its lock.
_HELD: dict[Path, RunLock] = {}


class RunFolderError(RuntimeError):
    """The checkpoint folder is in use by another run, or holds a previous run that this one would replace."""


class RunLock:
    """Exclusive ``flock`` on ``<folder>/.lock``, whose text says who holds it.

    Args:
        folder: the checkpoint folder (created when missing).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock and write this process's PID, host and start time into it.

        Raises:
            RunFolderError: another live process holds it (its PID, host and start time in the message).
        """
        import fcntl  # POSIX only; imported here so that the package imports everywhere

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                raise RunFolderError(
                    f"{self.path.parent} is in use by another training run ({holder}); wait for it to finish, or "
                    f"train into another folder with --ckpt_dir <folder>."
                ) from None
            if self._same_file(fd):  # not a file the previous holder unlinked while we opened it
                self._fd = fd
            else:
                os.close(fd)
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat("T", "seconds"),
        }
        os.ftruncate(self._fd, 0)
        os.write(self._fd, (json.dumps(info) + "\n").encode())
        os.fsync(self._fd)

    def release(self) -> None:
        """Delete the lock file and drop the lock (a no-op when not held)."""
        if self._fd is None:
            return
        if self._same_file(self._fd):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        """This object holds the lock, and ``<folder>/.lock`` is still the locked file (not deleted with its folder)."""
        return self._fd is not None and self._same_file(self._fd)

    def _same_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            info = {}
        if not info:
            return "no details written yet"
        return f"PID {info.get('pid')} on {info.get('host')}, started {info.get('started')}"


def remove_partial_writes(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of interrupted :func:`~monai_prompt.io.atomic_write` calls in ``folder``
    (``.<name>.<random>.tmp``, what a crash during a checkpoint save leaves); returns them.

    Only call it while holding the folder's :class:`RunLock`: a running writer's temporary file looks the same.
    """
    leftovers = sorted(path for path in Path(folder).glob(f".*{TMP_SUFFIX}") if path.is_file())
    for path in leftovers:
        path.unlink()
        logger.warning(f"removed {path}, left by an interrupted checkpoint write.")
    return leftovers


def claim_run_folder(ckpt_dir: str | os.PathLike, resume: bool = False, overwrite: bool = False) -> RunLock | None:
    """Make ``ckpt_dir`` this training run's: lock it, remove crash leftovers, and refuse to replace a previous run.

    A new run (``resume=False``) into a folder that holds a previous run's files (:data:`RUN_FILES`) stops with
    an error naming the ways on; ``overwrite=True`` is the explicit choice to replace it, and then deletes those files
    first (each is logged), so that a later ``--resume`` cannot pick up a checkpoint of the old run. Other files
    (e.g. pre-trained weights kept in the folder) are never touched. The lock is released when the process
    exits (``atexit``; the OS drops it on a crash). Under ``torch.distributed`` only rank 0 claims the folder.

    Args:
        ckpt_dir: the checkpoint folder (``models/``), created when missing.
        resume: the run continues the folder's latest ``checkpoint_epoch=<N>.pt``.
        overwrite: replace a previous run's files.

    Returns:
        the held lock (None on ranks other than 0).

    Raises:
        RunFolderError: another run holds the folder, or it holds a previous run and neither ``resume`` nor
            ``overwrite`` is set.
    """
    if _rank() > 0:
        return None
    folder = Path(ckpt_dir).absolute()
    lock = _HELD.get(folder)
    if lock is None or not lock.held:
        if lock is not None:  # its lock file went away (e.g. the folder was deleted): drop it, lock anew
            lock.release()
        lock = RunLock(folder)
        lock.acquire()
        _HELD[folder] = lock
        atexit.register(lock.release)
    remove_partial_writes(folder)
    previous = sorted({path for pattern in RUN_FILES for path in folder.glob(pattern) if path.is_file()})
    if previous and not resume:
        if not overwrite:
            lock.release()
            names = ", ".join(path.name for path in previous)
            raise RunFolderError(
                f"{folder} holds a previous training run ({names}); a new run would replace it. Continue it with "
                f"--resume true, train into another folder with --ckpt_dir <folder>, or replace it with "
                f"--overwrite true."
            )
        for path in previous:
            path.unlink()
            logger.warning(f"overwrite: removed {path} of the previous run.")
    return lock


def _rank() -> int:
    """This process's rank under ``torch.distributed`` (initialised, or as ``torchrun`` sets ``RANK``), else 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))
