"""The Makefile's set-up steps, run with a stand-in venv."""

from __future__ import annotations

import subprocess

from bundle_support import REPO


def test_make_setup_reinstalls_torch_only_when_the_spec_changes(tmp_path):
    """The Makefile's torch stamp, with a stand-in venv whose python only prints what it is asked to do."""
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/bin/sh\necho "python $*"\n')
    python.chmod(0o755)

    def setup(*spec: str) -> list[str]:
        result = subprocess.run(["make", "-s", "-C", str(REPO), f"VENV={python.parents[1]}", "setup", *spec],
                                capture_output=True, text=True, check=True, timeout=60)
        return [line for line in result.stdout.splitlines() if "torch" in line]

    cuda = "TORCH_SPEC=torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
    assert setup() == ["python -m pip uninstall -y torch", "python -m pip install torch==2.13.0"]
    assert setup() == []  # installed: nothing to do
    assert setup(cuda) == ["python -m pip uninstall -y torch", f"python -m pip install {cuda.split('=', 1)[1]}"]
    assert setup() == []  # a later make keeps the torch of the last spec given
    assert setup("TORCH_SPEC=torch==2.13.0") == ["python -m pip uninstall -y torch",
                                                 "python -m pip install torch==2.13.0"]
