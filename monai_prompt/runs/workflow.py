"""Small helpers bundle configs call: where the bundle and its datalist are, boolean settings as bools, whether the
data fits the task and the weights, whether the optimiser's settings can train."""

from __future__ import annotations

import ast
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from monai_prompt.data.check import labels_out_of_range
from monai_prompt.data.datalist import UNLABELED, DataCheckError
from monai_prompt.data.split import SPLITS

__all__ = [
    "DATALIST_NAME",
    "FLAG_SPELLINGS",
    "bundle_root",
    "check_optimizer_settings",
    "check_task",
    "check_validation_interval",
    "find_datalist",
    "pretraining_images",
    "flag",
    "flag_entries",
    "warn_if_not_pretrained",
]

logger = logging.getLogger("monai_prompt")


def bundle_root(name: str) -> str:
    """The bundle's folder, so outputs land in it whether a workflow is run from inside it, from the repository or
    from anywhere else.

    The bundle folder of the first ``--config_file`` on the command line (``<bundle>/configs/<file>`` beside a
    ``configs/metadata.json``), else the current directory when it holds ``configs/metadata.json`` (run inside the
    bundle), else ``bundles/<name>`` under the current directory when it exists (run from the repository root),
    else the current directory. ``--bundle_root`` overrides it.

    Args:
        name: the bundle's folder name.
    """
    from_config = _config_file_bundle(sys.argv)
    if from_config is not None:
        return str(from_config)
    if Path("configs", "metadata.json").is_file():
        return "."
    in_repo = Path("bundles", name)
    return str(in_repo) if (in_repo / "configs").is_dir() else "."


def _config_file_bundle(argv: Sequence[str]) -> Path | None:
    """The bundle folder of the first config file ``argv`` names with ``--config_file`` (a path, or a list of them
    as MONAI's ``run`` takes it), when that file is ``<bundle>/configs/<file>`` of a bundle; else None.

    Args:
        argv: a command line (``python -m monai.bundle run ...`` as ``sys.argv`` holds it, also under torchrun).
    """
    for index, arg in enumerate(argv):
        if arg.startswith("--config_file="):
            value = arg.split("=", 1)[1]
        elif arg == "--config_file" and index + 1 < len(argv):
            value = argv[index + 1]
        else:
            continue
        try:
            files = ast.literal_eval(value) if value.lstrip().startswith("[") else [value]
        except (ValueError, SyntaxError):
            files = [value]
        first = Path(str(files[0])) if files else Path()
        bundle = first.parent.parent
        return bundle if first.parent.name == "configs" and (bundle / "configs" / "metadata.json").is_file() else None
    return None


#: how a boolean setting may be written on the command line (any case): ``python -m monai.bundle run`` passes
#: ``--resume false`` as the string ``'false'``, which Python reads as true.
FLAG_SPELLINGS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def flag(value: bool | int | str, name: str) -> bool:
    """A boolean setting as a bool: ``True``/``False`` (also 1/0) as they are, a string spelled as in
    :data:`FLAG_SPELLINGS` in any case; anything else is refused.

    Args:
        value: the setting as the config holds it (a command-line override arrives as a string).
        name: the setting's config id, for the error.

    Raises:
        ValueError: ``value`` is no boolean, naming the setting and the accepted values.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in FLAG_SPELLINGS:
        return FLAG_SPELLINGS[value.strip().lower()]
    raise ValueError(
        f"--{name} {value!r} is not a boolean; pass --{name} true or --{name} false "
        f"(accepted in any case: {', '.join(FLAG_SPELLINGS)})."
    )


def flag_entries(config: dict, name: str, keys: Sequence[str]) -> dict:
    """``config`` (a dict setting such as ``method_config``) with its boolean entries ``keys`` read by
    :func:`flag` (those it holds), for ``--method_config#deep false``.

    Args:
        config: the dict setting.
        name: the setting's config id, for the error (``method_config#deep``).
        keys: the entries that are boolean.
    """
    return {key: flag(value, f"{name}#{key}") if key in keys else value for key, value in config.items()}


#: the datalist file a dataset folder may hold (``monai-prompt demo-data`` writes one).
DATALIST_NAME = "datalist.json"


def find_datalist(dataset_dir: str | os.PathLike, name: str = DATALIST_NAME) -> str:
    """What ``--dataset_dir`` names, as :func:`~monai_prompt.data.read_classification_datalist` reads it:
    ``<folder>/<name>`` when the folder holds one, else the folder itself (a class-per-folder tree), or the file
    itself (a ``.csv`` or ``.json`` datalist).

    Args:
        dataset_dir: a dataset folder, a class-per-folder tree, or a CSV/JSON datalist.
        name: the datalist file a dataset folder may hold.

    Raises:
        FileNotFoundError: ``dataset_dir`` does not exist, with the fix.
    """
    path = Path(dataset_dir)
    if path.is_dir():
        return str(path / name) if (path / name).is_file() else str(path)
    if path.is_file():
        return str(path)
    raise FileNotFoundError(
        f"dataset_dir {path} does not exist; build the demo data there with `monai-prompt demo-data` (or `make "
        f"demo`), or pass --dataset_dir <a folder with {name}, a class-per-folder tree, or a .csv/.json datalist>."
    )


#: why a workflow needs a split, for the error when it is empty.
_SPLIT_NEEDS = {
    "training": "there is nothing to train on; list training images in the datalist",
    "validation": (
        "training validates every val_interval epochs to choose models/model.pt, and MONAI skips an empty "
        "validation silently, so model.pt would never be written; add a 'validation' list (JSON), split column "
        "(CSV) or folder, or more training images per class for the reader to carve a validation split from "
        "(or a larger share: --datalist_options \"{'split': {'val_fraction': 0.3}}\")"
    ),
}


def check_task(
    datalist,
    num_classes: int,
    multi_label: bool,
    required_splits: Sequence[str] = (),
    classes: Sequence[str] | None = None,
) -> None:
    """Raise a ``ValueError`` naming the fix when the datalist's classes or label kind differ from the config (or
    from ``classes``), it has fewer than 2 classes, or a split the workflow reads is empty or has images without
    labels (a :class:`~monai_prompt.data.DataCheckError` naming each file whose index
    label is not below ``num_classes``, for a datalist without class names).

    Args:
        datalist: a :class:`~monai_prompt.data.ClassificationDatalist` (``classes``, ``multi_label``, splits).
        num_classes: the bundle's ``num_classes``.
        multi_label: the bundle's ``multi_label``.
        required_splits: splits that must hold images (training: ``["training", "validation"]``; evaluation:
            ``[@evaluate_split]``).
        classes: the class names the model was trained on (evaluation: from the training record); the datalist's
            must be the same, in the same order.
    """
    if required_splits and not any(datalist[split] for split in SPLITS) and datalist[UNLABELED]:
        raise ValueError(
            f"the datalist has only unlabelled images ({len(datalist[UNLABELED])}; a plain folder of images, without "
            "class sub-folders, reads so): classification trains and evaluates on labelled images; put them in a "
            "sub-folder per class (<dataset_dir>/<class>/<image>) or label them in a CSV/JSON datalist, or pre-train "
            "on them with bundles/vit_pretraining."
        )
    for split in required_splits:
        present = [name for name, items in datalist.splits.items() if items]
        if not datalist[split]:
            need = _SPLIT_NEEDS.get(split, f"choose a split that has images with --evaluate_split (the datalist has "
                                           f"{present})")
            raise ValueError(f"the datalist has no {split!r} images: {need}.")
        unlabelled = [item["image"] for item in datalist[split] if item.get("label") is None]
        if unlabelled:
            raise ValueError(
                f"{len(unlabelled)} of the {len(datalist[split])} {split!r} images have no label (e.g. "
                f"{unlabelled[0]}): training and evaluation compare predictions with labels; label them, evaluate "
                f"a labelled split with --evaluate_split (the datalist has {present}), or predict these with "
                "configs/inference.json."
            )
    if classes is not None and list(classes) != list(datalist.classes):
        raise ValueError(
            f"the model was trained on the classes {list(classes)} but the datalist has {list(datalist.classes)}; "
            f"evaluate on data with the training's classes in the same order (e.g. --datalist_options#classes "
            f'"{list(classes)}"), or give --class_names to override the training record.'
        )
    out_of_range = labels_out_of_range(datalist, num_classes)
    if out_of_range:
        raise DataCheckError(out_of_range, f"the datalist (num_classes={num_classes})")
    found = len(datalist.classes)
    if found < 2:
        raise ValueError(
            f"the datalist has {found} class {list(datalist.classes)}; a classifier needs at least 2. A class-per-"
            "folder tree needs a sub-folder per class; a CSV or JSON datalist named other than "
            f"{DATALIST_NAME} is given by its own path (--dataset_dir <folder>/<file>.csv)."
        )
    if found != num_classes:
        raise ValueError(
            f"the datalist has {found} classes {list(datalist.classes)} but the bundle is configured for "
            f"num_classes={num_classes}; run with --num_classes {found} (and update channel_def in metadata.json)."
        )
    if bool(datalist.multi_label) != bool(multi_label):
        kind = "multi-label (multi-hot)" if datalist.multi_label else "single-label (class index)"
        raise ValueError(
            f"the datalist's labels are {kind} but the bundle has multi_label={multi_label}; "
            f"run with --multi_label {bool(datalist.multi_label)}."
        )


def pretraining_images(datalist, splits: Sequence[str] | str, batch_size: int) -> list[dict[str, str]]:
    """The ``{"image": path}`` items of ``splits`` that self-supervised pre-training reads (labels dropped).

    Args:
        datalist: a :class:`~monai_prompt.data.ClassificationDatalist`.
        splits: the splits to read (the bundle's ``pretrain_splits``; a string is one split).
        batch_size: the bundle's ``batch_size``; the loader drops the last incomplete batch, so fewer images
            than this would leave no training step.

    Raises:
        ValueError: an unknown split or too few images, naming the settings to change.
    """
    splits = [splits] if isinstance(splits, str) else list(splits)
    unknown = [split for split in splits if split not in (*SPLITS, UNLABELED)]
    if unknown:
        raise ValueError(f"--pretrain_splits {splits}: unknown split(s) {unknown}; use {[*SPLITS, UNLABELED]}.")
    items = [{"image": item["image"]} for split in splits for item in datalist[split]]
    if not items:
        present = {name: len(images) for name, images in datalist.splits.items() if images}
        raise ValueError(
            f"no images to pre-train on in the splits {list(splits)} (the datalist has {present or 'no images'}); "
            "give --dataset_dir a folder of images (or of class folders), or choose splits that hold images with "
            "--pretrain_splits."
        )
    if len(items) < int(batch_size):
        raise ValueError(
            f"{len(items)} images to pre-train on but --batch_size {batch_size}: the loader drops the last "
            f"incomplete batch, so no step would run; give --batch_size {len(items)} or less, or more images."
        )
    return items


def check_validation_interval(val_interval: int, max_epochs: int) -> None:
    """Refuse a ``val_interval`` longer than the run: training validates every ``val_interval`` epochs to choose
    ``models/model.pt``, so the run would end without one (and without a word).

    Args:
        val_interval: the bundle's ``val_interval``.
        max_epochs: the trainer's ``max_epochs`` (``train#trainer#max_epochs``).

    Raises:
        ValueError: naming both settings and the fix.
    """
    if not 1 <= int(val_interval) <= int(max_epochs):
        raise ValueError(
            f"--val_interval {val_interval} with --train#trainer#max_epochs {max_epochs}: training validates every "
            "val_interval epochs to choose models/model.pt, so this run would never write one; give a val_interval "
            "from 1 to max_epochs."
        )


#: the largest learning rate whose optimiser step float32 holds: AdamW's first step is 10 x the learning rate (its
#: bias correction divides by 1 - beta1), and float32 ends at 3.4e38 (a larger rate stops that step with a float
#: overflow that names no setting).
MAX_LEARNING_RATE = 3.4e37


def check_optimizer_settings(learning_rate: float | str, weight_decay: float | str) -> None:
    """Refuse a learning rate or weight decay no optimiser step can use, naming the setting and a value that works,
    before anything runs; warn about a learning rate far above what the bundles' optimisers train with.

    Args:
        learning_rate: the bundle's ``learning_rate`` (a command-line override may arrive as a string: ``inf``).
        weight_decay: the bundle's ``weight_decay``.

    Raises:
        ValueError: a learning rate that is not a number in ``(0, MAX_LEARNING_RATE]``, or a weight decay that is not
            a finite number ``>= 0``.
    """
    rate = _number(learning_rate)
    if rate is None or not 0 < rate <= MAX_LEARNING_RATE:
        raise ValueError(
            f"--learning_rate {learning_rate!r}: a learning rate must be a positive number small enough for the "
            f"optimiser's step to stay finite (at most {MAX_LEARNING_RATE:g}); these optimisers train with 1e-5 to "
            "1e-1: give e.g. --learning_rate 1e-3."
        )
    if rate > 1:
        logger.warning(
            f"--learning_rate {rate:g} is far above what these optimisers train with (1e-5 to 1e-1): expect the loss "
            "to diverge (training stops at the first NaN/Inf loss)."
        )
    decay = _number(weight_decay)
    if decay is None or not 0 <= decay < math.inf:
        raise ValueError(
            f"--weight_decay {weight_decay!r}: a weight decay must be a finite number >= 0 (0: none; a negative one "
            "grows the weights); give e.g. --weight_decay 1e-4."
        )


def _number(value: float | str) -> float | None:
    """``value`` as a float (a number, or a string that spells one: ``"1e-3"``, ``"inf"``), else None (booleans
    too: ``--learning_rate true`` is no rate)."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def warn_if_not_pretrained(pretrained: str | None) -> None:
    """Log a warning when no pre-trained weights are configured: the frozen backbone would be random."""
    if not pretrained:
        logger.warning(
            "pretrained is not set: the backbone is randomly initialised, and a PEFT method keeps it frozen; "
            "pass --pretrained /path/to/vit weights (timm, HuggingFace or MONAI layout)."
        )
