"""Atomic writes: ``monai_prompt.io``."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from monai_prompt.io import atomic_write


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_write_gives_the_permissions_open_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = atomic_write(tmp_path / "sub" / "record.json", lambda tmp: Path(tmp).write_text("{}"))
        opened = tmp_path / "opened.txt"
        opened.write_text("")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(opened.stat().st_mode) == 0o666 & ~umask
    assert path.read_text() == "{}" and [p.name for p in path.parent.iterdir()] == ["record.json"]
