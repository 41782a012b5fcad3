"""Atomic file writes: a crash never leaves half a file where a good one was, and a full disk names the file."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["TMP_SUFFIX", "DiskFullError", "atomic_write"]

#: suffix of the temporary files :func:`atomic_write` creates (``.<name>.<random>.tmp`` beside the target).
TMP_SUFFIX = ".tmp"
#: the errors of a write that found no room: no space left (ENOSPC), disk quota exceeded (EDQUOT).
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class DiskFullError(OSError):
    """No space left on the device (``errno.ENOSPC``) while writing a file; the message names the file and the fix."""


def _is_disk_full(error: BaseException) -> bool:
    """``error`` or an error it was raised from or while handling is ENOSPC/EDQUOT (``torch.save`` reports a full
    disk as a ``RuntimeError`` raised while handling the ``OSError``)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _FULL:
            return True
        current = current.__cause__ or current.__context__
    return False


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], fix: str | None = None) -> Path:
    """Write ``path`` through a temporary file in the same folder, flushed to disk, then renamed over it.

    The file gets the permissions ``open`` gives a new file (``0o666`` less the umask: ``0644`` as a rule), not the
    owner-only ones of :func:`tempfile.mkstemp`.

    Args:
        path: the file to (re)write; its folder is created when missing.
        write: ``write(tmp_path)`` writes the whole content to the temporary path it is given.
        fix: what to do when the disk is full (default: free space or write elsewhere, and run again).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        DiskFullError: the disk filled up (``path`` is unchanged and the temporary file removed), naming ``path``
            and the fix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    except OSError as err:
        _raise_if_full(err, path, fix)
        raise
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except Exception as err:
        _raise_if_full(err, path, fix)
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _raise_if_full(error: BaseException, path: Path, fix: str | None) -> None:
    """Raise :class:`DiskFullError` for ``path`` when ``error`` is a full disk."""
    if _is_disk_full(error):
        fix = fix or (
            f"Free space on the disk that holds {path.parent}, or write to a folder on another disk (--ckpt_dir, "
            f"--output_dir), and run again."
        )
        raise DiskFullError(
            errno.ENOSPC,
            f"No space left on device while writing {path} (it is unchanged; nothing half-written is left). {fix}",
        ) from error
