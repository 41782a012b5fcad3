"""What the bundle tests run the bundles with: tiny data, a tiny stand-in pre-trained backbone, the overrides that
make any classification bundle run in seconds, and scikit-learn's metrics of a run's predictions.

``tiny_overrides(spec, data_dir, backbone_file)`` are the command-line overrides (``--img_size 32
--backbone_overrides ...``) as a dict; ``monai_prompt.runs.runner.run_bundle`` runs a workflow with them.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_prompt.backbones.vit import build_vit
from monai_prompt.bundle_gen.specs import BundleSpec
from monai_prompt.data.datalist import ClassificationDatalist

REPO = Path(__file__).resolve().parents[1]
TINY_IMG_SIZE = 32
#: a 2-block ViT of width 32 (patch 8 at 32 x 32: 16 patches).
TINY_BACKBONE = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "mlp_dim": 64, "patch_size": 8}
CLASSES = ("dark", "mid", "bright")


def write_tiny_dataset(
    root: str | os.PathLike, per_class: tuple[int, int, int] = (4, 2, 2), multi_label: bool = False, seed: int = 0
) -> Path:
    """Grey 32 x 32 PNGs ``<split>/<class>_<index>.png`` whose brightness follows the class, and ``datalist.json``
    (decathlon format) under ``root``.

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


def copy_bundle(name: str, root: Path) -> Path:
    """A copy of the committed bundle under ``root/bundles`` (runs never write into the repository)."""
    target = root / "bundles" / name
    shutil.copytree(REPO / "bundles" / name, target)
    return target


def write_training_record(bundle: Path, **settings: Any) -> Path:
    """Write ``models/training_config.json`` for a delta saved outside a training run: the bundle's
    ``untrained_network`` settings (``inference.json``) with ``settings`` on top, as a training run records them."""
    from monai.bundle import ConfigParser

    from monai_prompt.runs import write_training_config

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    record = {**parser.get_parsed_content("untrained_network"), **settings}
    return write_training_config(bundle / "models", "test", json.loads(json.dumps(record)))


def reference_ece(confidence: Sequence[float], correct: Sequence[bool], bins: int = 15) -> float:
    """Expected calibration error as Guo et al. (2017) write it, a plain loop: bins ``B_m = ((m-1)/M, m/M]`` (a
    confidence of 0 in the first), ``sum_m |B_m| / n * |acc(B_m) - conf(B_m)|``."""
    n, total = len(confidence), 0.0
    for m in range(1, bins + 1):
        lower, upper = (m - 1) / bins, m / bins
        members = [i for i, c in enumerate(confidence) if lower < c <= upper or (m == 1 and c == 0)]
        if members:
            accuracy = sum(bool(correct[i]) for i in members) / len(members)
            mean_confidence = sum(confidence[i] for i in members) / len(members)
            total += len(members) / n * abs(accuracy - mean_confidence)
    return total


def metrics_from_predictions(path: Path) -> dict[str, float]:
    """Accuracy, macro ROC AUC, macro F1 and quadratic-weighted kappa of a bundle's ``predictions.csv`` (a header
    row, then rows of image path, class probabilities and predicted class) of :func:`write_tiny_dataset` images,
    computed by scikit-learn with each image's class read from its file name; the calibration error by
    :func:`reference_ece`."""
    from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score, roc_auc_score

    with open(path) as f:
        rows = list(csv.reader(f))[1:]
    truth = [CLASSES.index(Path(row[0]).stem.rsplit("_", 1)[0]) for row in rows]
    probs = np.array([[float(value) for value in row[1:-1]] for row in rows])
    pred = probs.argmax(1)
    labels = list(range(len(CLASSES)))
    return {
        "accuracy": accuracy_score(truth, pred),
        "auc": roc_auc_score(truth, probs, multi_class="ovr", average="macro", labels=labels),
        "f1": f1_score(truth, pred, average="macro", labels=labels, zero_division=0),
        "kappa": cohen_kappa_score(truth, pred, weights="quadratic", labels=labels),
        "ece": reference_ece(probs.max(1).tolist(), (pred == np.array(truth)).tolist()),
    }
