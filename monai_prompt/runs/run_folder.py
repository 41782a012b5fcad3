"""One training run per checkpoint folder: an exclusive lock, crash leftovers removed, no silent replacement, and
nothing deleted before the run that replaces it has written its first checkpoint.

:func:`claim_run_folder` is the first step of a training bundle's ``initialize``::

    "$monai_prompt.runs.claim_run_folder(@ckpt_dir, resume=@flags#resume, overwrite=@flags#overwrite)"

It locks ``<ckpt_dir>/.lock`` (a second run into the same folder fails at once, naming the first), removes the
temporary files interrupted atomic writes left behind, and refuses to start a new run over a previous run's
``model.pt``/``checkpoint_*.pt`` unless the run resumes it or ``overwrite`` is set. The lock is an advisory
``flock`` (POSIX) that the operating system drops when its process ends, however it ends, so the lock of a dead
run is simply taken over; the file's text (PID, host, start time) is what the error shows.

With ``overwrite`` the previous run stays in place while the data, network and weights are checked; then
:func:`set_aside_previous_run` moves its files into ``<ckpt_dir>/.previous_run/``, and
:func:`delete_previous_run_after_checkpoint` deletes them once the new run has written its first
``checkpoint_epoch=<N>.pt``. A run that stops before then (an error, Ctrl-C) puts them back on its way out; one
killed outright leaves the folder to the next claim, which puts them back (or deletes them, when the new run had
written a checkpoint).
"""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
import shutil
import socket
from pathlib import Path

from ignite.engine import Engine, Events

from monai_prompt.io import TMP_SUFFIX
from monai_prompt.runs.errors import on_error
from monai_prompt.runs.record import TRAINING_CONFIG

__all__ = [
    "LOCK_NAME",
    "PREVIOUS_RUN",
    "RUN_FILES",
    "RunFolderError",
    "RunLock",
    "claim_run_folder",
    "delete_previous_run_after_checkpoint",
    "remove_partial_writes",
    "set_aside_previous_run",
]

logger = logging.getLogger("monai_prompt")

#: the lock file in the checkpoint folder.
LOCK_NAME = ".lock"
#: what a previous training run leaves in its checkpoint folder (best model, interval/final checkpoints).
RUN_FILES = ("model.pt", "checkpoint_*.pt")
#: where ``--overwrite true`` keeps the previous run (its :data:`RUN_FILES` and record) until the new run has written
#: its first checkpoint.
PREVIOUS_RUN = ".previous_run"
#: the first checkpoint of a run, after which the previous run it replaces is deleted.
_CHECKPOINTS = "checkpoint_epoch=*.pt"

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
    an error naming the ways on; ``overwrite=True`` is the explicit choice to replace it: nothing is deleted here,
    :func:`set_aside_previous_run` moves those files aside once the data, network and weights are checked (so that a
    later ``--resume`` cannot pick up a checkpoint of the old run), and they are deleted once this run has written
    its first checkpoint. Other files (e.g. pre-trained weights kept in the folder) are never touched. A previous run
    left in :data:`PREVIOUS_RUN` by a run killed outright is put back first (deleted, when that run had written a
    checkpoint). The lock is released when the process exits (``atexit``; the OS drops it on a crash). Under
    ``torch.distributed`` only rank 0 claims the folder.

    Args:
        ckpt_dir: the checkpoint folder (``models/``), created when missing.
        resume: the run continues the folder's latest ``checkpoint_epoch=<N>.pt``.
        overwrite: replace a previous run's files.

    Returns:
        the held lock (None on ranks other than 0).

    Raises:
        RunFolderError: another run holds the folder, it holds a previous run and neither ``resume`` nor
            ``overwrite`` is set, or both are (the run would continue what it is told to replace).
    """
    if _rank() > 0:
        return None
    folder = Path(ckpt_dir).absolute()
    if resume and overwrite:
        raise RunFolderError(
            f"--overwrite true replaces the previous run in {folder}, which this run is set to continue (--resume "
            f"true; a packaged segmentation bundle: --continue_model true); nothing was changed. Continue it with "
            f"--overwrite false, or replace it with --resume false (--continue_model false)."
        )
    lock = _HELD.get(folder)
    if lock is None or not lock.held:
        if lock is not None:  # its lock file went away (e.g. the folder was deleted): drop it, lock anew
            lock.release()
        lock = RunLock(folder)
        lock.acquire()
        _HELD[folder] = lock
        atexit.register(lock.release)
    remove_partial_writes(folder)
    _settle_previous_run(folder)
    previous = _run_files(folder)
    if previous and not resume:
        names = ", ".join(path.name for path in previous)
        if not overwrite:
            lock.release()
            raise RunFolderError(
                f"{folder} holds a previous training run ({names}); a new run would replace it. Continue it with "
                f"--resume true, train into another folder with --ckpt_dir <folder>, or replace it with "
                f"--overwrite true."
            )
        logger.warning(
            f"overwrite: the previous run in {folder} ({names}) is kept until the data, network and weights are "
            f"checked, then set aside in {PREVIOUS_RUN}/ and deleted once this run has written its first checkpoint."
        )
    return lock


def set_aside_previous_run(ckpt_dir: str | os.PathLike) -> Path | None:
    """Move the previous run's files (:data:`RUN_FILES` and its ``training_config.json``) of a claimed folder into
    ``<ckpt_dir>/.previous_run/`` (renames in the same folder: nothing is copied or lost), for a new run that
    ``--overwrite true`` lets replace it; a no-op when there are none, and on ranks other than 0.

    Call it once the data, network and weights are checked, and attach
    :func:`delete_previous_run_after_checkpoint` to the trainer. Until that deletes them, the files are put back
    when the process ends (or when :func:`~monai_prompt.runs.show_cause_last`'s hook reports an error), and by
    the next :func:`claim_run_folder` after a crash.

    Args:
        ckpt_dir: the checkpoint folder :func:`claim_run_folder` claimed.

    Returns:
        the folder holding the previous run, or None when nothing was set aside.
    """
    if _rank() > 0:
        return None
    folder = Path(ckpt_dir).absolute()
    previous = _run_files(folder)
    if not previous:
        return None
    if (folder / TRAINING_CONFIG).is_file():
        previous.append(folder / TRAINING_CONFIG)
    backup = folder / PREVIOUS_RUN
    backup.mkdir()
    for path in previous:
        os.replace(path, backup / path.name)
    if folder not in _SET_ASIDE:
        atexit.register(_settle_previous_run, folder)
        on_error(lambda: _settle_previous_run(folder))
    _SET_ASIDE.add(folder)
    logger.warning(
        f"overwrite: moved the previous run ({', '.join(path.name for path in previous)}) to {backup}; it is deleted "
        f"once this run has written its first checkpoint, and put back if the run stops before then."
    )
    return backup


def delete_previous_run_after_checkpoint(engine: Engine, ckpt_dir: str | os.PathLike) -> None:
    """Attach to the trainer (after its checkpoint saver): at the end of each epoch, once ``ckpt_dir`` holds a
    ``checkpoint_epoch=<N>.pt`` of this run, delete the previous run :func:`set_aside_previous_run` kept.

    Args:
        engine: the trainer.
        ckpt_dir: its checkpoint folder.
    """
    folder = Path(ckpt_dir).absolute()

    def delete(_: Engine) -> None:
        if _settle_previous_run(folder, put_back=False) is not None:
            engine.remove_event_handler(delete, Events.EPOCH_COMPLETED)

    engine.add_event_handler(Events.EPOCH_COMPLETED, delete)


#: folders whose previous run this process set aside (and will put back if it stops before its first checkpoint).
_SET_ASIDE: set[Path] = set()


def _run_files(folder: Path) -> list[Path]:
    """The previous run's :data:`RUN_FILES` in ``folder``."""
    return sorted({path for pattern in RUN_FILES for path in folder.glob(pattern) if path.is_file()})


def _settle_previous_run(folder: Path, put_back: bool = True) -> bool | None:
    """Settle a previous run set aside in ``folder``: delete it when the run that replaces it has written a
    checkpoint, else put it back (replacing what the new run wrote) when ``put_back``.

    Returns:
        True: deleted; False: put back; None: nothing set aside, or nothing done.
    """
    backup = folder / PREVIOUS_RUN
    if _rank() > 0 or not backup.is_dir():
        return None
    names = sorted(path.name for path in backup.iterdir())
    written = sorted(path.name for path in folder.glob(_CHECKPOINTS) if path.is_file())
    if written:
        shutil.rmtree(backup)
        logger.warning(
            f"overwrite: this run wrote {written[-1]}, so the previous run it replaces ({', '.join(names)}) is "
            f"deleted from {backup}."
        )
        _SET_ASIDE.discard(folder)
        return True
    if not put_back:
        return None
    for name in names:
        target = folder / name
        if target.is_file():  # the new run's record or model.pt: it has no checkpoint to go with them
            target.unlink()
        os.replace(backup / name, target)
    backup.rmdir()
    logger.warning(
        f"overwrite: the run that was to replace the previous run in {folder} stopped before writing its first "
        f"checkpoint, so the previous run ({', '.join(names)}) is back in place, unchanged."
    )
    _SET_ASIDE.discard(folder)
    return False


def _rank() -> int:
    """This process's rank under ``torch.distributed`` (initialised, or as ``torchrun`` sets ``RANK``), else 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))
