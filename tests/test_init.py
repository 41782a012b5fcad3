"""What importing ``monai_prompt`` gives: its version, and MONAI's notice about a missing GPU DICOM decoder silenced
(in-process and in ``python -m monai.bundle run``, whose configs import the package before they build readers)."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import subprocess
import sys
import textwrap

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


def test_turning_a_2d_image_back_warns_nothing_and_a_real_axcodes_mismatch_still_warns():
    """MONAI's ``Orientation.inverse`` warned ``axcodes ('('L', 'A', 'S')') length is smaller than ...`` for every 2D
    image (a 2D segmentation's inference, ``Invertd``), although it turns it back rightly. In a process of its own:
    pytest drops the filters that an import during collection installs."""
    script = textwrap.dedent("""
        import warnings
        import numpy as np, torch
        from monai.data import MetaTensor
        from monai.transforms import Orientation
        import monai_prompt
        image = MetaTensor(torch.arange(12.0).reshape(1, 3, 4), affine=np.diag([-2.0, -2.0, 1.0, 1.0]))  # LPS slice
        with warnings.catch_warnings(record=True) as caught:
            orientation = Orientation("RA", labels=None)  # one instance: MONAI's inverse checks the forward's id
            turned = orientation(image)
            back = orientation.inverse(turned)
            Orientation("RAS", labels=None)(image)  # three codes for a 2D image: a real mismatch
        assert torch.equal(back.as_tensor(), image.as_tensor()) and not torch.equal(turned, image)
        print(repr([str(warning.message).splitlines()[0] for warning in caught]))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == repr(
        ["axcodes ('RAS') length is smaller than number of input spatial dimensions D=2."])
