"""What the workflows do with awkward inputs, through the real command lines (docs/robustness.md, "Inputs and
outputs"): same-named inference inputs of two folders, a DICOM among PNGs, segmentation datalists and repeated
entries given to ``monai-prompt check-data``, the method of a delta overridden."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bundle_support import REPO
from io_support import sha256
from monai_prompt.bundle_gen.specs import SEGMENTATION_SPECS
from monai_prompt.runs.runner import run_bundle
from segmentation_support import tiny_segmentation_overrides, write_tiny_encoder, write_tiny_segmentation


def run_command(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``command`` on one CPU thread, without a GPU or an MLflow server."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)


def bundle_run(bundle: Path, config: str, overrides: dict) -> list[str]:
    """``python -m monai.bundle run`` of one of ``bundle``'s configs with ``overrides`` as Python literals."""
    args = {k: v for k, v in overrides.items() if not k.startswith("_meta_")}
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / config),
            "--bundle_root", str(bundle), *[item for key, value in args.items() for item in (f"--{key}", repr(value))]]


@pytest.mark.slow
def test_same_named_inference_inputs_of_two_folders_get_a_mask_each(tmp_path):
    spec = SEGMENTATION_SPECS["linear_segmentation"]
    datalist = write_tiny_segmentation(tmp_path / "data", 2, counts=(2, 1, 2))
    bundle = tmp_path / "bundles" / spec.name
    shutil.copytree(REPO / "bundles" / spec.name, bundle)
    overrides = tiny_segmentation_overrides(spec, datalist, write_tiny_encoder(tmp_path / "vit.pt", 2))
    run_bundle(bundle, ["train.json"], "train", quiet=True, **overrides, **{"train#trainer#max_epochs": 1})
    inputs = []
    for patient, case in (("a", "case0"), ("b", "case1")):  # two different images, both named t1.nii.gz
        inputs.append(tmp_path / "patients" / patient / "t1.nii.gz")
        inputs[-1].parent.mkdir(parents=True)
        shutil.copy(datalist.parent / "images" / "test" / f"{case}.nii.gz", inputs[-1])
    models = {p.name: sha256(p) for p in (bundle / "models").glob("*.*")}

    result = run_command(bundle_run(bundle, "inference.json", {**overrides, "infer_images": list(map(str, inputs))}),
                         cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    masks = sorted(p.relative_to(bundle / "eval" / "masks").as_posix() for p in (bundle / "eval").rglob("*.nii.gz"))
    assert masks == ["a/t1_seg.nii.gz", "b/t1_seg.nii.gz"]
    for image in inputs:
        mask = nib.load(bundle / "eval" / "masks" / image.parent.name / "t1_seg.nii.gz")
        assert mask.shape == nib.load(image).shape and np.allclose(mask.affine, nib.load(image).affine, atol=1e-5)
    assert {p.name: sha256(p) for p in (bundle / "models").glob("*.*")} == models
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE((bundle / "models" / "training_config.json").stat().st_mode) == 0o666 & ~umask
