"""Smoke runs of the bundles: tiny data, a tiny stand-in pre-trained backbone, the overrides that make any
classification bundle run in seconds, and an in-process runner.

``tiny_overrides(spec, data_dir, backbone_file)`` are the command-line overrides (``--img_size 32
--backbone_overrides ...``) as a dict; :func:`run_bundle` runs a workflow like ``python -m monai.bundle run``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai.bundle import ConfigWorkflow

from monai_prompt.backbones.vit import build_vit
from monai_prompt.bundle_gen.specs import BundleSpec
from monai_prompt.data.datalist import ClassificationDatalist

__all__ = [
    "TINY_BACKBONE",
    "TINY_IMG_SIZE",
    "run_bundle",
    "tiny_overrides",
    "write_tiny_backbone",
    "write_tiny_dataset",
]

TINY_IMG_SIZE = 32
#: a 2-block ViT of width 32 (patch 8 at 32 x 32: 16 patches).
TINY_BACKBONE = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "mlp_dim": 64, "patch_size": 8}
CLASSES = ("dark", "mid", "bright")


def write_tiny_dataset(
    root: str | os.PathLike, per_class: tuple[int, int, int] = (4, 2, 2), multi_label: bool = False, seed: int = 0
) -> Path:
    """Grey 32 x 32 PNGs whose brightness follows the class, and ``datalist.json`` (decathlon format) under ``root``.

    Args:
        root: output folder.
        per_class: training, validation and test images per class.
        multi_label: multi-hot labels (class ``c`` and, for odd images, also the next class).
        seed: noise seed.

    Returns:
        the datalist path.
    """
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    splits: dict[str, list[dict[str, Any]]] = {}
    for split, count in zip(("training", "validation", "test"), per_class):
        splits[split] = []
        for label in range(len(CLASSES)):
            for index in range(count):
                path = root / "images" / split / f"{CLASSES[label]}_{index}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = rng.random((TINY_IMG_SIZE, TINY_IMG_SIZE)) * 60 + label * 90
                Image.fromarray(pixels.astype(np.uint8)).save(path)
                if multi_label:
                    hot = [float(c == label or (index % 2 == 1 and c == (label + 1) % len(CLASSES))) for c in range(3)]
                    splits[split].append({"image": str(path), "label": hot})
                else:
                    splits[split].append({"image": str(path), "label": label})
    datalist = ClassificationDatalist(list(CLASSES), splits, multi_label=multi_label)
    return datalist.save_json(root / "datalist.json")


def write_tiny_backbone(path: str | os.PathLike, seed: int = 0) -> Path:
    """A random :data:`TINY_BACKBONE` ViT saved as a MONAI-layout state dict, to stand in for pre-trained weights."""
    torch.manual_seed(seed)
    vit = build_vit("vit_tiny", img_size=TINY_IMG_SIZE, **TINY_BACKBONE)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(vit.state_dict(), path)
    return path


def tiny_overrides(spec: BundleSpec, dataset_dir: str | os.PathLike, pretrained: str | os.PathLike) -> dict[str, Any]:
    """Bundle overrides for the tiny data and backbone (FPT: a 16 x 16 side network)."""
    overrides: dict[str, Any] = {
        "dataset_dir": str(dataset_dir),
        "pretrained": str(pretrained),
        "backbone": "vit_tiny",
        "backbone_overrides": dict(TINY_BACKBONE),
        "img_size": TINY_IMG_SIZE,
        "batch_size": 4,
        "num_workers": 0,
        "_meta_#network_data_format#inputs#image#spatial_shape": [TINY_IMG_SIZE, TINY_IMG_SIZE],
    }
    if spec.fpt:
        overrides["method_config#side_img_size"] = TINY_IMG_SIZE // 2
    return overrides


def run_bundle(
    bundle: str | os.PathLike, files: list[str], workflow_type: str, tracking: str | None = None, **overrides: Any
) -> ConfigWorkflow:
    """Run ``configs/<files>`` of ``bundle`` in-process as ``python -m monai.bundle run`` does, after checking the
    workflow's required properties; returns the finished workflow.

    Args:
        bundle: bundle folder (also ``bundle_root``).
        files: config files merged in order, e.g. ``["train.json", "evaluate.json"]``.
        workflow_type: ``"train"`` or ``"infer"`` (which MONAI property set to check).
        tracking: ``"mlflow"`` to add MONAI's MLflow handlers.
        overrides: config overrides.
    """
    bundle = Path(bundle)
    workflow = ConfigWorkflow(
        config_file=[str(bundle / "configs" / name) for name in files],
        workflow_type=workflow_type,
        tracking=tracking,
        bundle_root=str(bundle),
        **overrides,
    )
    workflow.initialize()
    missing = workflow.check_properties()
    if missing:
        raise ValueError(f"{bundle}: {workflow_type} workflow lacks required properties {missing}.")
    workflow.run()
    workflow.finalize()
    return workflow
