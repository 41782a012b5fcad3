"""The project as a user installs it: every package is in the wheel, and ``pip install .`` gives a ``monai-prompt
demo`` that runs outside the checkout (the bundles ship inside the package)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_package():
    """``pyproject.toml`` lists the packages by name (one, the bundles, is not a folder of the package): every folder
    with an ``__init__.py`` is listed, and the bundles are mapped to the repository's ``bundles/``."""
    from setuptools.config.pyprojecttoml import read_configuration

    setuptools = read_configuration(REPO / "pyproject.toml")["tool"]["setuptools"]
    folders = {".".join(init.parent.relative_to(REPO).parts) for init in (REPO / "monai_prompt").rglob("__init__.py")}
    assert set(setuptools["packages"]) == folders | {"monai_prompt.bundles"}
    assert setuptools["package-dir"] == {"monai_prompt.bundles": "bundles"}


def _fresh_venv(root: Path) -> Path:
    """A venv that sees this environment's dependencies but not its monai_prompt: a ``.pth`` names this
    environment's site-packages, whose own ``.pth`` files (the editable install's hook) are not processed."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.mark.slow
def test_installed_package_runs_the_demo_outside_the_checkout(tmp_path):
    # a copy of the sources, so that the build's build/ and egg-info never land in the checkout
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("monai_prompt", "bundles"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    python = _fresh_venv(tmp_path / "venv")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    str(source)], check=True, env=env, cwd=tmp_path)
    shutil.rmtree(source)  # the installed package must not need its sources

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run(
        [python, "-c", "import monai_prompt; from monai_prompt.runs import bundles_folder; "
                       "print(monai_prompt.__file__); print(bundles_folder())"],
        check=True, capture_output=True, text=True, env=env, cwd=work,
    ).stdout.split()
    site = (tmp_path / "venv").resolve()
    assert all(Path(path).resolve().is_relative_to(site) for path in where), where

    result = subprocess.run([tmp_path / "venv" / "bin" / "monai-prompt", "demo", "--tiny"], capture_output=True,
                            text=True, env=env, cwd=work)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[3/3] DVPT on the MAE-pre-trained backbone" in result.stdout
    assert (work / "runs" / "demo" / "results.json").is_file()
