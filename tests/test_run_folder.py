"""One training run per folder: the lock that names its holder and outlives no process, no silent replacement of a
previous run, and crash leftovers removed: ``monai_prompt.runs.run_folder``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bundle_support import REPO
from monai_prompt.engine import latest_checkpoint
from monai_prompt.io import atomic_write
from monai_prompt.runs import RunFolderError, RunLock, claim_run_folder


@pytest.fixture
def release_locks():
    """Locks a test takes are released at its end (the process would release them at exit)."""
    locks: list[RunLock] = []
    yield locks
    for lock in locks:
        lock.release()


def test_run_folder_lock_is_exclusive_and_names_its_holder(tmp_path, release_locks):
    lock = claim_run_folder(tmp_path / "models")
    release_locks.append(lock)
    info = json.loads((tmp_path / "models" / ".lock").read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["started"]
    assert claim_run_folder(tmp_path / "models") is lock  # a second claim of this process re-uses its lock
    other = RunLock(tmp_path / "models")  # as another process would: a separate open file, the flock conflicts
    with pytest.raises(RunFolderError, match=rf"in use by another training run \(PID {os.getpid()} on "):
        other.acquire()
    lock.release()
    assert not (tmp_path / "models" / ".lock").exists()
    other.acquire()
    release_locks.append(other)
    other.path.unlink()  # the folder was cleared (the demo deletes a run's folder before a new one)
    assert not other.held
    again = claim_run_folder(tmp_path / "models")
    release_locks.append(again)
    assert again is not other and json.loads(again.path.read_text())["pid"] == os.getpid()


def test_a_dead_run_s_lock_is_taken_over(tmp_path, release_locks):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / ".lock").write_text(json.dumps({"pid": 2**22 + 7, "host": socket.gethostname(), "started": "x"}))
    release_locks.append(claim_run_folder(folder))  # nobody holds the flock: the lock of a dead process
    assert json.loads((folder / ".lock").read_text())["pid"] == os.getpid()


@pytest.mark.slow
def test_a_second_process_fails_at_once_and_a_killed_one_s_lock_is_taken_over(tmp_path, release_locks):
    folder = tmp_path / "models"
    holder = subprocess.Popen(
        [sys.executable, "-c", (f"import time; from monai_prompt.runs.run_folder import claim_run_folder; "
                                f"claim_run_folder({str(folder)!r}); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=rf"PID {holder.pid} on {socket.gethostname()}"):
            claim_run_folder(folder)
        holder.send_signal(signal.SIGKILL)  # a crash: no atexit, the lock file stays
        holder.wait(timeout=30)
        assert json.loads((folder / ".lock").read_text())["pid"] == holder.pid
        release_locks.append(claim_run_folder(folder))
        assert json.loads((folder / ".lock").read_text())["pid"] == os.getpid()
    finally:
        holder.kill()
        holder.stdout.close()


def test_a_new_run_never_silently_replaces_a_previous_one(tmp_path, release_locks):
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("model.pt", "checkpoint_epoch=3.pt", "vit_pretrained.pt"):
        (folder / name).write_bytes(name.encode())
    with pytest.raises(RunFolderError, match=r"holds a previous training run \(checkpoint_epoch=3\.pt, model\.pt\)"
                                             r".*--resume true.*--ckpt_dir.*--overwrite true"):
        claim_run_folder(folder)
    assert not (folder / ".lock").exists()  # a refused run does not keep the folder locked
    release_locks.append(claim_run_folder(folder, resume=True))
    assert (folder / "model.pt").read_bytes() == b"model.pt"
    release_locks.pop().release()
    release_locks.append(claim_run_folder(folder, overwrite=True))
    assert sorted(os.listdir(folder)) == [".lock", "vit_pretrained.pt"]  # the old run's files only


def test_crash_leftovers_are_removed_and_never_resumed_from(tmp_path, release_locks, monkeypatch):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "checkpoint_epoch=2.pt").write_bytes(b"good")
    (folder / "checkpoint_epoch=8.pt").mkdir()  # not a file
    with monkeypatch.context() as patch:  # a crash inside atomic_write: the temporary file stays behind
        patch.setattr(os, "remove", lambda path: None)
        with pytest.raises(KeyboardInterrupt):
            atomic_write(folder / "checkpoint_epoch=9.pt", lambda tmp: (Path(tmp).write_bytes(b"half"), _interrupt()))
    (leftover,) = [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert leftover.name.startswith(".checkpoint_epoch=9.pt.")
    assert latest_checkpoint(folder) == str(folder / "checkpoint_epoch=2.pt")
    release_locks.append(claim_run_folder(folder, resume=True))
    assert not leftover.exists() and (folder / "checkpoint_epoch=2.pt").read_bytes() == b"good"


def _interrupt():
    raise KeyboardInterrupt
