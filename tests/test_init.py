"""What importing ``monai_prompt`` gives: its version, and MONAI's notice about a missing GPU DICOM decoder silenced
(in-process and in ``python -m monai.bundle run``, whose configs import the package before they build readers)."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import subprocess
import sys

import pytest
from monai.transforms import LoadImage

import monai_prompt
from monai_prompt import NVIMGCODEC_MISSING


def test_version_is_the_installed_distribution_s():
    assert monai_prompt.__version__ == importlib.metadata.version("monai-prompt")


def test_loading_images_logs_no_nvimagecodec_notice(caplog):
    with caplog.at_level(logging.DEBUG):
        LoadImage()  # builds every reader, NvImgCodecPydicomReader among them
    assert NVIMGCODEC_MISSING not in caplog.text


@pytest.mark.slow  # a subprocess
def test_a_bundle_run_prints_no_nvimagecodec_notice(tmp_path):
    config = tmp_path / "load.json"
    config.write_text(json.dumps({"imports": ["$import monai_prompt"], "loader": {"_target_": "LoadImage"},
                                  "run": ["$@loader", "$@loader"]}))
    result = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(config)],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nvImageCodec" not in result.stdout + result.stderr
