"""One training run per folder: the lock that names its holder and outlives no process, no silent replacement of a
previous run (and none deleted before its replacement has written a checkpoint), and crash leftovers removed:
``monai_prompt.runs.run_folder``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events

from bundle_support import REPO
from monai_prompt.engine import latest_checkpoint
from monai_prompt.io import atomic_write
from monai_prompt.runs import (
    PREVIOUS_RUN,
    RunFolderError,
    RunLock,
    claim_run_folder,
    delete_previous_run_after_checkpoint,
    set_aside_previous_run,
)


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
    release_locks.append(claim_run_folder(folder, overwrite=True))  # nothing deleted before the run can start
    assert sorted(os.listdir(folder)) == [".lock", "checkpoint_epoch=3.pt", "model.pt", "vit_pretrained.pt"]
    release_locks.pop().release()
    with pytest.raises(RunFolderError, match=r"--overwrite true replaces the previous run in .*, which this run is set "
                                             r"to continue .* --overwrite false, or .* --resume false"):
        claim_run_folder(folder, resume=True, overwrite=True)  # resume and overwrite: refused, not one of them ignored
    assert sorted(os.listdir(folder)) == ["checkpoint_epoch=3.pt", "model.pt", "vit_pretrained.pt"]


def _previous_run(folder: Path) -> dict[str, bytes]:
    """A finished run's files (and pre-trained weights kept beside them) in ``folder``; returns what it wrote."""
    folder.mkdir()
    files = {name: name.encode() for name in ("model.pt", "checkpoint_epoch=3.pt", "training_config.json")}
    for name, content in {**files, "vit_pretrained.pt": b"weights"}.items():
        (folder / name).write_bytes(content)
    return files


def _contents(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file() and path.name != ".lock"}


def test_overwrite_sets_the_previous_run_aside_until_the_first_checkpoint(tmp_path, release_locks, caplog):
    folder = tmp_path / "models"
    previous = _previous_run(folder)
    release_locks.append(claim_run_folder(folder, overwrite=True))
    backup = set_aside_previous_run(folder)  # the data, network and weights were checked
    assert backup == folder.absolute() / PREVIOUS_RUN and _contents(backup) == previous
    assert _contents(folder) == {"vit_pretrained.pt": b"weights"}
    assert f"moved the previous run (checkpoint_epoch=3.pt, model.pt, training_config.json) to {backup}" in caplog.text
    (folder / "training_config.json").write_text("{}")  # the new run's record, then a failure before any checkpoint
    (folder / "model.pt").write_bytes(b"new")
    release_locks.append(claim_run_folder(folder, overwrite=True))  # e.g. the next run after a SIGKILL
    assert not backup.exists() and _contents(folder) == {**previous, "vit_pretrained.pt": b"weights"}
    assert "stopped before writing its first checkpoint, so the previous run (checkpoint_epoch=3.pt, model.pt, " \
           "training_config.json) is back in place, unchanged." in caplog.text

    set_aside_previous_run(folder)
    trainer = Engine(lambda engine, batch: None)
    checkpoint = folder / "checkpoint_epoch=1.pt"
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: checkpoint.write_bytes(b"1"))
    delete_previous_run_after_checkpoint(trainer, folder)
    trainer.run([0], max_epochs=2)
    assert not backup.exists() and _contents(folder) == {"checkpoint_epoch=1.pt": b"1", "vit_pretrained.pt": b"weights"}
    assert f"this run wrote checkpoint_epoch=1.pt, so the previous run it replaces (checkpoint_epoch=3.pt, model.pt, " \
           f"training_config.json) is deleted from {backup}." in caplog.text


def test_a_previous_run_set_aside_by_a_killed_run_is_settled_by_the_next_claim(tmp_path, release_locks):
    folder = tmp_path / "models"
    _previous_run(folder)
    release_locks.append(claim_run_folder(folder, overwrite=True))
    set_aside_previous_run(folder)
    (folder / "checkpoint_epoch=1.pt").write_bytes(b"new")  # the new run had written its first checkpoint
    release_locks.append(claim_run_folder(folder, resume=True))
    assert not (folder / PREVIOUS_RUN).exists() and _contents(folder) == {
        "checkpoint_epoch=1.pt": b"new", "vit_pretrained.pt": b"weights"}


def test_crash_leftovers_are_removed_and_never_resumed_from(tmp_path, release_locks, monkeypatch):
    folder = tmp_path / "models"
    folder.mkdir()
    torch.save({"good": True}, folder / "checkpoint_epoch=2.pt")
    good = (folder / "checkpoint_epoch=2.pt").read_bytes()
    (folder / "checkpoint_epoch=8.pt").mkdir()  # not a file
    with monkeypatch.context() as patch:  # a crash inside atomic_write: the temporary file stays behind
        patch.setattr(os, "remove", lambda path: None)
        with pytest.raises(KeyboardInterrupt):
            atomic_write(folder / "checkpoint_epoch=9.pt", lambda tmp: (Path(tmp).write_bytes(b"half"), _interrupt()))
    (leftover,) = [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert leftover.name.startswith(".checkpoint_epoch=9.pt.")
    assert latest_checkpoint(folder) == str(folder / "checkpoint_epoch=2.pt")
    release_locks.append(claim_run_folder(folder, resume=True))
    assert not leftover.exists() and (folder / "checkpoint_epoch=2.pt").read_bytes() == good


def _interrupt():
    raise KeyboardInterrupt
