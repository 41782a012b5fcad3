"""Segmentation datalists: image/label pairs in a MONAI decathlon JSON, their check, and inference inputs.

The segmentation bundles read their splits with MONAI's own ``load_decathlon_datalist``; this module adds what
MONAI has no function for: :func:`check_segmentation_datalist` (every pair readable, image and label of the
same geometry, label values that are class indices, no image or group in two splits; all problems at once),
:func:`mask_suffix` (PNG masks for PNG inputs, NIfTI otherwise) and :func:`mask_root` (masks keep their input's
folder below the inputs' common parent, so same-named inputs never share a mask). Inference inputs are listed by
:func:`monai_prompt.data.find_images`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monai_prompt.data.check import _channel_problems, _duplicates, _input_channels, _leaks
from monai_prompt.data.datalist import DataCheckError, Datalist
from monai_prompt.data.headers import IMAGE_SUFFIXES, PIL_CONVERSIONS, PIL_SUFFIXES, image_suffix, pil_channels
from monai_prompt.data.split import SPLITS, SplitOptions, split_items

__all__ = [
    "SegmentationDatalist",
    "SegmentationSummary",
    "check_segmentation_datalist",
    "is_segmentation_datalist",
    "mask_dtype",
    "mask_root",
    "mask_suffix",
    "read_segmentation_datalist",
    "resampled_shape",
    "whole_image_roi",
]

#: the largest ROI side :func:`whole_image_roi` picks: 256 px in 2D (256 tokens of 16 x 16 patches), 96 voxels in
#: 3D (216 tokens: UNETR's own 96^3 ROI), so that a ViT-B UNETR trains at batch 2-4 on one 16-24 GB GPU.
ROI_BUDGET = {2: 256, 3: 96}

_ALL_SPLITS = (*SPLITS, "unlabeled")
#: the datalist file of a Medical Segmentation Decathlon task folder.
MSD_DATALIST = "dataset.json"
#: the fraction of training groups carved for validation when a datalist has no validation split (MSD's have none).
VAL_FRACTION = 0.1
#: how a missing validation split can be given.
_CARVE = ("; add a 'validation' list, or at least 2 training items (a datalist without validation has "
          f"{VAL_FRACTION:.0%} of them carved for it)")
#: relative tolerance of the affine comparison (image vs label), in units of the largest voxel size.
_AFFINE_TOLERANCE = 1e-3
#: how far a label value may be from an integer to be read as that class value (float rounding, e.g. 1.0000001):
#: the bundles' transforms round label maps (``AsDiscreted`` with ``rounding``).
_LABEL_TOLERANCE = 1e-3
#: a label map with this many distinct values that no class names reads as an instance mask (one value per object;
#: with a single foreground class, two are enough).
_INSTANCE_VALUES = 10
#: a label at most this many voxels larger than its image along each axis reads as the image's grid with padding.
_PADDING_VOXELS = 2
#: images whose values reach both these (Hounsfield units: air -1000, cortical bone above 300) read as a CT.
_HU_AIR, _HU_BONE = -500.0, 300.0


@dataclass
class SegmentationDatalist(Datalist):
    """Image/label pairs per split, the class names and the label value of each class.

    Attributes:
        classes: class names, in the order of the network's outputs (``labels`` of the decathlon file, by value).
        splits: ``training``/``validation``/``test``/``unlabeled`` -> ``{"image", "label"[, "group"]}`` dicts
            with absolute paths (no ``label`` in ``unlabeled``; MSD-style bare test paths become ``{"image"}``).
        label_values: the value class ``k`` has in the label maps (the ``labels`` keys, ascending): ``0..K-1``
            for consecutive labels, else e.g. BraTS' ``0, 1, 2, 4`` or an atlas' region codes. The bundles map
            them to ``0..K-1`` for training and back in the masks they write.
    """

    label_values: list[int]

    def __getitem__(self, split: str) -> list[dict[str, Any]]:
        return self.splits.get(split, [])


def read_segmentation_datalist(path: str | os.PathLike) -> SegmentationDatalist:
    """Read a decathlon JSON segmentation datalist (paths relative to its folder) with MONAI's reader.

    A folder stands for the MSD ``dataset.json`` in it. Without a ``validation`` list, :data:`VAL_FRACTION` of the
    training items (at least one; by ``group``, seeded) become the validation split, as MSD task files list only
    ``training`` and ``test``; logged on ``monai_prompt``.

    Raises:
        FileNotFoundError: a folder without ``dataset.json``.
        ValueError: no ``labels`` map naming the classes, ``labels`` keys that are not distinct non-negative
            integers with ``0`` (background) among them, or an item whose image or label lists several files.
    """
    from monai.data import load_decathlon_datalist

    path = Path(path)
    if path.is_dir():
        if not (path / MSD_DATALIST).is_file():
            raise FileNotFoundError(
                f"{path} is a folder without a segmentation datalist ({MSD_DATALIST}, or datalist_2d.json / "
                "datalist_3d.json from `monai-prompt demo-data --task segmentation`); pass --datalist_file "
                "<decathlon JSON> or --dataset_dir <the folder holding it>."
            )
        path = path / MSD_DATALIST
    content = json.loads(path.read_text())
    labels = content.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise ValueError(
            f"{path}: a segmentation datalist names its classes in 'labels', e.g. "
            '{"0": "background", "1": "liver"}; add it (MONAI Label and metadata.json channel_def use the same names).'
        )
    values = {key: _label_value(key) for key in labels}
    if None in values.values() or 0 not in values.values() or len(set(values.values())) != len(values):
        raise ValueError(
            f"{path}: 'labels' has the keys {list(labels)}; each key is the value of its class in the label maps: "
            'distinct non-negative integers, 0 (background) among them, e.g. {"0": "background", "1": "edema", '
            '"2": "non-enhancing", "4": "enhancing"}.'
        )
    keys = sorted(labels, key=values.get)
    splits = {
        split: load_decathlon_datalist(str(path), is_segmentation=True, data_list_key=split)
        for split in _ALL_SPLITS
        if content.get(split)
    }
    several = [f"{split} item {i}: {key} {item[key]}" for split, items in splits.items()
               for i, item in enumerate(items) for key in ("image", "label") if isinstance(item.get(key), list)]
    if several:
        raise ValueError(
            f"{path}: an image or label is one file in the bundles, but these list several: {several[:3]}; stack "
            "the modalities of an image into one multi-channel file (e.g. a 4D NIfTI, channels last) and set "
            "--in_channels to their number."
        )
    if len(splits.get("training", [])) > 1 and not splits.get("validation"):
        carved = split_items(splits["training"], SplitOptions(max(VAL_FRACTION, 1 / len(splits["training"])), 0))
        splits["training"], splits["validation"] = carved["training"], carved["validation"]
        logging.getLogger("monai_prompt").info(
            f"{path} has no 'validation' list: {len(carved['validation'])} of the training items (by group, seed 0) "
            "validate; add a 'validation' list to choose them.")
    return SegmentationDatalist([labels[key] for key in keys], splits, [values[key] for key in keys])


def _label_value(key: str) -> int | None:
    """The label value a ``labels`` key names (``"4"``, ``" 4 "``), or ``None`` if it is not a non-negative
    integer."""
    key = str(key).strip()
    return int(key) if key.isascii() and key.isdigit() else None


def is_segmentation_datalist(path: str | os.PathLike) -> bool:
    """True for a decathlon JSON with a label that is an image file (a label map): ``monai-prompt check-data``
    checks it as segmentation data (a classification datalist's labels are class indices, names or multi-hot
    lists)."""
    path = Path(path)
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    try:
        content = json.loads(path.read_text())
    except ValueError:
        return False
    items = [item for split in _ALL_SPLITS if isinstance(content, dict) and isinstance(content.get(split), list)
             for item in content[split] if isinstance(item, dict) and "label" in item]
    return any(isinstance(item["label"], str) and image_suffix(item["label"]) in IMAGE_SUFFIXES for item in items)


@dataclass
class SegmentationSummary:
    """What a clean segmentation dataset holds.

    Attributes:
        source: the datalist checked.
        classes: class names.
        counts: image/label pairs (unlabelled images) per split.
        voxel_fractions: per labelled split, the fraction of label voxels of each class.
        channels: the channel count every image has.
        notes: what the bundle will do that the user may want to change (also logged by a workflow's check).
    """

    source: str
    classes: list[str]
    counts: dict[str, int]
    voxel_fractions: dict[str, list[float]]
    channels: int
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        width = max(len(name) for name in [*self.classes, "images"]) + 2
        lines = [
            f"segmentation datalist {self.source}: {len(self.classes)} classes, {self.channels} channel(s)",
            f"{'split':<12}{'images':>{width}}" + "".join(f"{name:>{width}}" for name in self.classes),
        ]
        for split, count in self.counts.items():
            fractions = "".join(f"{value:>{width}.3f}" for value in self.voxel_fractions.get(split, []))
            lines.append(f"{split:<12}{count:>{width}}{fractions}")
        lines.append("(class columns: fraction of label voxels)")
        return "\n".join([*lines, *(f"note: {note}" for note in self.notes)])


def _classes_text(label_values: Sequence[int], classes: Sequence[str]) -> str:
    """``{0: 'background', 4: 'tumour'}``, or the bare names for consecutive label values."""
    if list(label_values) == list(range(len(classes))):
        return str(list(classes))
    return str(dict(zip(label_values, classes)))


def _values_text(label_values: Sequence[int]) -> str:
    """``0..3`` for consecutive label values, else the values."""
    consecutive = list(label_values) == list(range(len(label_values)))
    return f"0..{len(label_values) - 1}" if consecutive else ", ".join(map(str, label_values))


def _spatial_shape(array) -> tuple[int, ...]:
    """Spatial shape of a channel-first array with trailing singleton dims dropped (ITK reads 2D DICOM as 3D)."""
    shape = tuple(int(s) for s in array.shape[1:])
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _load(path: str, load, problems: list[str]):
    """``load(path)``, or None with the reason appended to ``problems``."""
    if not os.path.exists(path):
        problems.append(f"{path}: file not found.")
        return None
    try:
        return load(path)
    except Exception as err:  # noqa: BLE001 - every unreadable file is reported, with the reader's reason
        problems.append(f"{path}: unreadable ({type(err).__name__}: {err}).")
        return None


def _ras_grid(array) -> tuple[tuple[int, ...], np.ndarray]:
    """The spatial shape and affine of a channel-first ``MetaTensor`` once its axes are turned to RAS
    (``Orientationd``, which the bundles apply to image and label alike): two files of one grid stored in other axis
    orders (a label that a tool wrote in RAS order, ``nibabel.as_closest_canonical``, beside an LSA image) compare
    equal. An array whose affine does not match its dimensions keeps its own (:func:`_spatial_shape`)."""
    import nibabel as nib

    affine = np.asarray(array.affine, dtype=float)
    shape = array.shape[1:]
    if len(shape) != affine.shape[0] - 1:
        return _spatial_shape(array), affine
    orientation = nib.orientations.io_orientation(affine)
    ras_shape = [0] * len(shape)
    for axis, (ras_axis, _) in enumerate(orientation):
        ras_shape[int(ras_axis)] = int(shape[axis])
    while len(ras_shape) > 2 and ras_shape[-1] == 1:
        ras_shape.pop()
    return tuple(ras_shape), affine @ nib.orientations.inv_ornt_aff(orientation, shape)


def _channels(image) -> int:
    """The channels of a loaded image as the transforms see them: a PIL image in a mode of
    :data:`~monai_prompt.data.headers.PIL_CONVERSIONS` (palette, CMYK, grey + alpha) after its conversion."""
    mode = getattr(image, "meta", {}).get("mode")
    return pil_channels(mode) if mode in PIL_CONVERSIONS else int(image.shape[0])


def _label_counts(label) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of a label map and their voxel counts, a value within :data:`_LABEL_TOLERANCE` of an
    integer counted as that integer (a class value stored as a float, e.g. 1.0000001, which the transforms round)."""
    values, counts = np.unique(np.asarray(label), return_counts=True)
    rounded = np.rint(values)
    values, merged = np.unique(np.where(np.abs(values - rounded) <= _LABEL_TOLERANCE, rounded, values),
                               return_inverse=True)
    return values, np.bincount(merged.ravel(), weights=counts).astype(np.int64)


def _pair_problems(
    image, label, image_path: str, label_path: str, label_values: Sequence[int], values: np.ndarray
) -> list[str]:
    """What is wrong with one loaded image/label pair: non-finite image, geometry, label ``values`` (its distinct
    values, :func:`_label_counts`) other than the classes' ``label_values``."""
    problems = []
    pixels = np.asarray(image)
    if np.issubdtype(pixels.dtype, np.inexact) and not np.isfinite(pixels).all():
        bad = int(pixels.size - np.count_nonzero(np.isfinite(pixels)))
        problems.append(f"{image_path}: {bad} NaN/Inf value(s); training would get a NaN loss: fix or drop the image.")
    if label.shape[0] != 1:
        problems.append(f"{label_path}: {label.shape[0]} channels; a label map has one (class index per voxel).")
    (image_shape, image_affine), (label_shape, label_affine) = _ras_grid(image), _ras_grid(label)
    if image_shape != label_shape:
        stored = _spatial_shape(label), _spatial_shape(image)
        shapes = stored if stored[0] != stored[1] else (f"{label_shape} in RAS order", str(image_shape))
        fix = _regrid_fix(*stored) if stored[0] != stored[1] else "resample it with nearest neighbour"
        problems.append(f"{label_path}: shape {shapes[0]} differs from its image's {shapes[1]} ({image_path}); the "
                        f"label must be on the image's grid ({fix}).")
    else:
        scale = max(float(np.abs(image_affine[:-1, :-1]).max()), 1.0)
        if image_affine.shape != label_affine.shape or not np.allclose(
            image_affine, label_affine, atol=_AFFINE_TOLERANCE * scale
        ):
            problems.append(f"{label_path}: its voxels are not where its image's are ({image_path}; affines after "
                            "both are turned to RAS, as training does): resample the label onto the image's grid "
                            "(nearest neighbour), or, if its voxels do match the image's, give it the image's header."
                            f"\n    image {image_affine.tolist()}\n    label {label_affine.tolist()}")
    if not np.all(np.equal(np.mod(values, 1), 0)):
        problems.append(f"{label_path}: non-integer values (e.g. {values[np.mod(values, 1) != 0][:3].tolist()}); a "
                        "label map holds class indices (was it resampled with linear interpolation?).")
    outside = values[~np.isin(values, label_values) & (np.mod(values, 1) == 0)]  # fractions: reported above
    if outside.size:
        more = f" and {outside.size - 5} more" if outside.size > 5 else ""
        fix = _unnamed_values_fix(outside, values, label_values)
        problems.append(f"{label_path}: values {outside[:5].astype(int).tolist()}{more} are no class's "
                        f"({_values_text(label_values)}, the 'labels' keys); {fix}")
    return problems


def _missing_split_fix(datalist: SegmentationDatalist, split: str) -> str:
    """What to do about a ``split`` the workflow needs and ``datalist`` lacks: carve a validation split, or evaluate
    a split it has (``--evaluate_split``)."""
    if split == "validation":
        return _CARVE
    others = [other for other in ("training", "validation", "test") if other != split and datalist[other]]
    if split == "training" or not others:
        return ""
    return (f"; add a {split!r} list, or evaluate a split it has ({', '.join(others)}) with --evaluate_split "
            f"{others[-1]}")


def _regrid_fix(label: tuple[int, ...], image: tuple[int, ...]) -> str:
    """How to bring a label of shape ``label`` onto its image's grid of shape ``image``: resampling, unless it has
    the image's dimensions with a few extra voxels along each axis that has any (padding rows or columns, as some
    tools write a mask), which resampling would stretch over the image instead of cutting off.

    Args:
        label: the label's spatial shape, as :func:`_spatial_shape` gives it.
        image: its image's.
    """
    extra = [size - target for size, target in zip(label, image)]
    if len(label) != len(image) or not any(extra) or not all(0 <= count <= _PADDING_VOXELS for count in extra):
        return "resample it with nearest neighbour"
    first = ", ".join(f"{count}:" if count else ":" for count in extra)
    last = ", ".join(f":-{count}" if count else ":" for count in extra)
    return (f"it is {' x '.join(map(str, extra))} voxels larger than the image: padding rows or columns? Crop them "
            f"off rather than resample, which would stretch the label over the image: label[{first}] (padding first) "
            f"or label[{last}] (padding last; axes in the order of the shapes above), saved with the image's header")


def _unnamed_values_fix(outside: np.ndarray, found: np.ndarray, label_values: Sequence[int]) -> str:
    """What to do about the label values ``outside`` no class names: an instance mask (many distinct values, or
    several for one foreground class) is binarised, a binary mask stored with another foreground value (0/255)
    names that value, else the values are named or set to background.

    Args:
        outside: the label map's integer values that no class names.
        found: every distinct value of the label map.
        label_values: the classes' label values.
    """
    named = [value for value in label_values if value != 0]
    if outside.size >= _INSTANCE_VALUES or (outside.size > 1 and len(named) == 1):
        return ("an instance mask (one value per object)? The bundles segment classes, not instances: for one "
                "foreground class set every value above 0 to 1 in a copy of the label maps (numpy: (label > "
                "0).astype(np.uint8)); else name their classes in the datalist's 'labels'.")
    if outside.size == 1 and len(named) == 1 and named[0] not in found:
        return (f"a binary mask stored as 0/{int(outside[0])}? Then its foreground value is {int(outside[0])}, not "
                f"{named[0]}: key the foreground class by it in the datalist's 'labels' (\"{int(outside[0])}\": "
                f"\"<class name>\" in place of \"{named[0]}\"), or set {int(outside[0])} to {named[0]} in a copy of "
                "the label maps.")
    return (f'name their classes in the datalist\'s \'labels\' (e.g. "{int(outside[0])}": "<class name>"), or set '
            "them to 0 (background) in a copy of the label maps.")


def check_segmentation_datalist(
    source: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    *,
    channels: int | None = None,
    required_splits: Sequence[str] = ("training",),
    num_classes: int | None = None,
    label_values: Sequence[int] | None = None,
    datalist: SegmentationDatalist | None = None,
    intensity_range: Sequence[float] | None = None,
) -> SegmentationSummary:
    """Check every image/label pair of a decathlon segmentation datalist and report all problems at once.

    Each image and label of the labelled splits is read as training reads it (MONAI ``LoadImage``, channel first;
    ``unlabeled`` items are only checked for leaks). Reported: missing or unreadable files, NaN/Inf in images, items
    of a labelled split without label, label maps with several channels, another shape or affine than their image,
    non-integer values or values outside the classes, channel counts that differ from the rest (or from
    ``channels``), images listed twice in a split or in two splits, groups split across training/validation/test,
    empty ``required_splits`` or ones whose labels hold only background, and classes (names and label values) other
    than the bundle's.

    Args:
        source: the datalist JSON (its ``labels`` map names the classes).
        class_names: the bundle's classes (evaluation: those the network was trained for; default: the
            datalist's).
        channels: the network's in_channels, which every image must feed (default: the count every image can be
            brought to, as the transforms match channels).
        required_splits: splits that must hold items (training: training and validation); their items, and
            those of training and validation, need a label (an MSD ``test`` list of bare images may lack them).
        num_classes: the bundle's ``num_classes``, which must equal the number of classes.
        label_values: the label value of each of ``class_names`` (default: the datalist's when ``class_names`` is
            not given, else ``0..K-1``).
        datalist: ``source`` as the workflow has read it (default: read here), so that a carved validation split
            is carved and logged once.
        intensity_range: the bundle's intensity window (``None``: each image's min-max, and images whose values
            span air to bone in Hounsfield units get a note naming the setting).

    Raises:
        DataCheckError: listing every problem with its path and the fix.
    """
    from monai.transforms import LoadImage

    datalist = read_segmentation_datalist(source) if datalist is None else datalist
    problems: list[str] = []
    classes, values = datalist.classes, datalist.label_values
    if class_names is not None:
        classes = list(class_names)
        values = list(range(len(classes))) if label_values is None else [int(value) for value in label_values]
        if dict(zip(values, classes)) != dict(zip(datalist.label_values, datalist.classes)):
            problems.append(
                f"{source}: 'labels' names the classes {_classes_text(datalist.label_values, datalist.classes)} but "
                f"those expected are {_classes_text(values, classes)} (a bundle's trained network's come from its "
                "models/training_config.json; check-data's from --classes); relabel the data to the expected "
                "classes, or train on these.")
    problems += [f"{source}: no {split!r} items; the workflow needs them{_missing_split_fix(datalist, split)}."
                 for split in required_splits if not datalist[split]]
    if num_classes is not None and num_classes != len(classes):
        problems.append(f"num_classes {num_classes} differs from the {len(classes)} classes {classes}: the network "
                        "has one output per class; drop --num_classes (it follows the classes), or name "
                        f"{num_classes} classes in the datalist's 'labels'.")
    load = LoadImage(image_only=True, ensure_channel_first=True)
    image_channels: dict[str, int] = {}
    voxels = {split: np.zeros(len(classes)) for split in SPLITS if datalist[split]}
    extremes = [math.inf, -math.inf]  # the images' lowest and highest values
    unnamed = dict.fromkeys(voxels, False)  # a split's label maps hold values no class names (reported per file)
    for split, item in datalist.all_items():
        if split not in SPLITS:  # unlabelled images: the segmentation workflows do not read them
            continue
        image = _load(item["image"], load, problems)
        if image is not None:
            image_channels[item["image"]] = _channels(image)
            extremes = [min(extremes[0], float(image.min())), max(extremes[1], float(image.max()))]
        if "label" not in item:
            if split in ("training", "validation"):
                problems.append(f"{item['image']}: no label; a {split} item needs both 'image' and 'label'.")
            elif split in required_splits:
                problems.append(f"{item['image']}: no label; a {split} item needs both 'image' and 'label' to be "
                                "evaluated: evaluate a labelled split (--evaluate_split validation), or predict it "
                                "with configs/inference.json.")
            continue
        label = _load(item["label"], load, problems)
        if image is None or label is None:
            continue
        found, counts = _label_counts(label)
        problems += _pair_problems(image, label, item["image"], item["label"], values, found)
        unnamed[split] |= bool((~np.isin(found, values) & (found != 0)).any())
        for value, count in zip(found, counts):
            if value in values:
                voxels[split][values.index(value)] += count
    expected = _input_channels(image_channels.values(), channels)
    problems += _channel_problems(image_channels, channels)
    problems += [
        f"{source}: the {split!r} labels hold only background (0): Dice is undefined on them, so no epoch can be "
        "chosen as best (validation) nor scored (evaluation); give this split images with foreground."
        for split in required_splits
        if split in voxels and voxels[split][0] > 0 and not voxels[split][1:].any() and not unnamed[split]
    ]
    problems += _duplicates(datalist) + _leaks(datalist)
    if problems:
        raise DataCheckError(problems, source)
    return SegmentationSummary(
        source=str(source),
        classes=datalist.classes,
        counts={split: len(items) for split, items in datalist.splits.items()},
        voxel_fractions={split: (v / max(v.sum(), 1)).tolist() for split, v in voxels.items()},
        channels=expected,
        notes=_intensity_notes(source, *extremes) if intensity_range is None else [],
    )


def _intensity_notes(source: str | os.PathLike, low: float, high: float) -> list[str]:
    """A note, also logged, when the images' values span air to bone in Hounsfield units (a CT) and each image is
    scaled by its own min-max: a window (``intensity_range``) keeps a HU value at one input value in every image.

    Args:
        source: the datalist (named in the log).
        low: the images' lowest value.
        high: their highest.
    """
    if not (low <= _HU_AIR and high >= _HU_BONE):
        return []
    note = (f"intensities from {low:g} to {high:g}, as a CT's Hounsfield units: each image is scaled to [0, 1] by its "
            "own minimum and maximum, so one HU value lands at a different input value in each crop or scan; set "
            "one window for every image, e.g. --intensity_range \"[-1000, 2000]\" (bone) or \"[-160, 240]\" (soft "
            "tissue), which the training record keeps for evaluation and inference.")
    logging.getLogger("monai_prompt").info(f"data check of {source}: note: {note}")
    return [note]


def whole_image_roi(
    items: Sequence[dict[str, Any]],
    spatial_dims: int,
    patch_size: int = 16,
    pixdim: float | Sequence[float] | None = None,
) -> int:
    """The ROI and sliding-window side that takes the largest training image whole: its largest side, as the
    network sees it, rounded up to a multiple of ``patch_size``, at most :data:`ROI_BUDGET`; logged on
    ``monai_prompt``.

    Larger images are cropped to the budget in training and covered by the sliding window in validation and
    inference. With ``pixdim``, NIfTI and PNG-type images are measured after the bundles' RAS orientation and
    resampling (:func:`resampled_shape`, from their headers); other formats as stored.

    Args:
        items: the training items (``image`` paths).
        spatial_dims: 2 or 3.
        patch_size: the ViT's patch size (the side is a multiple of it).
        pixdim: the spacing the bundle resamples to (``Spacingd``'s ``pixdim``); ``None``: none.
    """
    from monai_prompt.data.headers import read_header

    if not items:
        raise ValueError("img_size is chosen from the training images, and there are none; add 'training' items "
                         "or set --img_size.")
    sides = {}
    for item in items:
        shape = None if pixdim is None else resampled_shape(item["image"], spatial_dims, pixdim)
        sides[item["image"]] = max(shape or read_header(item["image"]).spatial_shape[:spatial_dims])
    largest = max(sides, key=sides.get)
    whole = patch_size * math.ceil(sides[largest] / patch_size)
    side = min(whole, ROI_BUDGET[spatial_dims])
    cut = "" if side == whole else (f", cut to {side}, the memory budget (ROI_BUDGET): training takes {side}-wide "
                                   "crops and the sliding window covers the rest")
    spacing = "" if pixdim is None else f" at pixdim {pixdim}"
    logging.getLogger("monai_prompt").info(
        f"img_size {side}: the ROI and sliding window take whole training images (the largest, {largest}, is "
        f"{sides[largest]} wide{spacing}; a multiple of {patch_size}{cut}); set --img_size to choose another.")
    return side


def resampled_shape(
    path: str | os.PathLike, spatial_dims: int, pixdim: float | Sequence[float]
) -> tuple[int, ...] | None:
    """The spatial shape of an image once the bundles' transforms have turned it to RAS and resampled it to
    ``pixdim`` (``SliceOrientation`` and ``Spacing``, run lazily on a header-sized placeholder: no voxel is read).

    Args:
        path: a NIfTI or PNG-type image (others give ``None``: their headers are not read for a grid here).
        spatial_dims: 2 or 3 (a NIfTI's trailing singleton axes are dropped down to it, as ``MatchInputd`` does).
        pixdim: ``Spacing``'s ``pixdim``.
    """
    import nibabel as nib
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Compose, Spacing

    from monai_prompt.data.headers import read_header
    from monai_prompt.data.transforms import SliceOrientation, refuse_slice_resampling

    suffix = image_suffix(path)
    if suffix in (".nii", ".nii.gz"):
        header = nib.load(str(path))
        shape, affine = list(header.shape[:3]), header.affine
    elif suffix in PIL_SUFFIXES:
        shape, affine = list(read_header(path).spatial_shape), np.eye(4)
    else:
        return None
    while len(shape) > spatial_dims and shape[-1] == 1:
        shape.pop()
    if len(shape) != spatial_dims:
        return None
    placeholder = MetaTensor(torch.zeros(1).expand(1, *shape), affine=torch.as_tensor(affine, dtype=torch.float64))
    refuse_slice_resampling(placeholder, path)
    transforms = Compose([SliceOrientation("RAS"[:spatial_dims], labels=None), Spacing(pixdim)], lazy=True)
    return tuple(int(size) for size in transforms(placeholder).peek_pending_shape())


def mask_suffix(images: Sequence[str | os.PathLike], label_values: Sequence[int] = ()) -> str:
    """Suffix of the saved masks: ``.png`` when every input is a PIL format (PNG/JPEG/TIFF/BMP) and every label
    value fits a byte, else ``.nii.gz`` (NIfTI keeps the input's affine, also for DICOM and other ITK inputs).

    Args:
        images: the inference inputs.
        label_values: the values the masks hold (the classes' label values).

    Raises:
        ValueError: the inputs mix PIL formats with others (their masks need different writers).
    """
    kinds = Counter(image_suffix(path) in PIL_SUFFIXES for path in images)
    if kinds[True] and kinds[False]:
        raise ValueError(
            f"{kinds[True]} PNG/JPEG-type and {kinds[False]} other images in one inference run; their masks are "
            "written as PNG and NIfTI respectively: run inference separately on each kind."
        )
    return ".png" if kinds[True] and max(label_values, default=0) <= np.iinfo(np.uint8).max else ".nii.gz"


def mask_dtype(label_values: Sequence[int]) -> type[np.integer]:
    """The smallest unsigned type of ``uint8``/``uint16``/``uint32`` that holds every label value of a mask."""
    largest = max(label_values, default=0)
    return next(dtype for dtype in (np.uint8, np.uint16, np.uint32) if largest <= np.iinfo(dtype).max)


def _mask_subject(path: str) -> str:
    """``path`` as ``SaveImage`` is to name its mask after it: a ``.gz`` extension of any case written ``.gz``
    (MONAI strips the extensions of a file name case-sensitively: ``SCAN.NII.GZ`` became the mask ``SCAN.NII_seg``;
    ``.nii``/``.NII`` either way), a DICOM series folder with a ``.`` after its name, the extension MONAI strips
    (its whole name is the mask's: ``1.2.840.5`` became ``1.2.840_seg``)."""
    if os.path.isdir(path):
        return path.rstrip(os.sep) + "."
    return path[:-3] + ".gz" if path.lower().endswith(".gz") else path


def _mask_stem(path: str) -> str:
    """The name ``SaveImage`` gives a mask, before the postfix: the file name without its extension (both of
    ``.nii.gz``, in any case: :func:`mask_name_formatter`)."""
    stem, ext = os.path.splitext(os.path.basename(_mask_subject(path)))
    return os.path.splitext(stem)[0] if ext == ".gz" else stem


def mask_name_formatter(meta: Mapping[str, Any] | None, saver: Any) -> dict[str, Any]:
    """``SaveImaged``'s ``output_name_formatter``: MONAI's ``default_name_formatter`` with the input's ``.gz``
    written lower-case, so that the mask of ``SCAN.NII.GZ`` is ``SCAN_seg.nii.gz`` as that of ``scan.nii.gz`` is
    ``scan_seg.nii.gz``, and a DICOM series folder's whole name (:func:`_mask_subject`).

    Args:
        meta: the prediction's metadata (``filename_or_obj``: the input).
        saver: the ``SaveImage`` transform.
    """
    from monai.data.folder_layout import default_name_formatter

    names = default_name_formatter(meta, saver)
    return {**names, "subject": _mask_subject(names["subject"])}


def mask_root(images: Sequence[str | os.PathLike]) -> str:
    """The folder the saved masks' sub-folders follow (``SaveImaged``'s ``data_root_dir``): the common parent of
    the inputs' folders, so that ``patients/a/t1.nii.gz`` and ``patients/b/t1.nii.gz`` give ``masks/a/t1_seg.nii.gz``
    and ``masks/b/t1_seg.nii.gz``, and inputs of one folder give masks side by side in ``masks/``.

    Args:
        images: the inference inputs (files or DICOM series folders).

    Returns:
        the common parent as an absolute path (``""``, no sub-folders, without inputs).

    Raises:
        ValueError: two inputs of one folder whose masks would have the same name (``t1.nii`` and ``t1.nii.gz``),
            naming both.
    """
    paths = [os.path.abspath(path) for path in images]
    if not paths:
        return ""
    seen: dict[tuple[str, str], str] = {}
    for path in paths:
        key = (os.path.dirname(path), _mask_stem(path))
        if key in seen and seen[key] != path:
            raise ValueError(
                f"{seen[key]} and {path} would both be saved as the mask {_mask_stem(path)}_seg: one would overwrite "
                "the other; rename one of them, or run inference on each separately, into another --output_dir."
            )
        seen[key] = path
    return os.path.commonpath([os.path.dirname(path) for path in paths])
