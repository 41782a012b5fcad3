"""Atomic file writes: a crash never leaves half a file where a good one was."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["TMP_SUFFIX", "atomic_write"]

#: suffix of the temporary files :func:`atomic_write` creates (``.<name>.<random>.tmp`` beside the target).
TMP_SUFFIX = ".tmp"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write ``path`` through a temporary file in the same folder, flushed to disk, then renamed over it.

    The file gets the permissions ``open`` gives a new file (``0o666`` less the umask: ``0644`` as a rule), not the
    owner-only ones of :func:`tempfile.mkstemp`.

    Args:
        path: the file to (re)write; its folder is created when missing.
        write: ``write(tmp_path)`` writes the whole content to the temporary path it is given.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask
