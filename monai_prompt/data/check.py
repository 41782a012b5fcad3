"""Check a classification dataset before training: every problem at once, each with its path (segmentation datalists:
:func:`monai_prompt.data.segmentation.check_segmentation_datalist`).

:func:`check_classification_datalist` reads the datalist leniently, then every image's header (:func:`read_header`)
and, unless ``read_pixels=False``, its pixels as training will read them (MONAI's ``LoadImage``), and collects:
unreadable, truncated or missing files, images with NaN/Inf values, missing labels and labels outside the class list
(or, without a class map, outside ``0..num_classes-1``), channel counts the transforms cannot bring to ``channels``
(or, without it, to one count with the rest: grey and RGB images mix), spatial dimensions (2D/3D) that differ from
the rest, images listed twice in one split or in two splits, and groups split across training/validation/test. It
raises one :class:`DataCheckError` listing them all, or returns a :class:`ClassificationSummary`, whose notes name
what the bundle changes (images of another size, resized) and classes without images.
:func:`check_images` does the image part for a list of paths (inference inputs, which :func:`find_images` collects from
folders, globs and lists). ``monai-prompt check-data <datalist>`` runs it from the command line.
"""

from __future__ import annotations

import glob
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monai_prompt.data.datalist import (
    SPLITS,
    UNLABELED,
    ClassificationDatalist,
    DataCheckError,
    Datalist,
    folder_images,
    read_classification_datalist,
)
from monai_prompt.data.headers import ImageHeader, channels_feed, is_image_file, read_header

__all__ = [
    "ClassificationSummary",
    "check_classification_datalist",
    "check_images",
    "find_images",
    "labels_out_of_range",
]


@dataclass
class ClassificationSummary:
    """What a clean dataset holds.

    Attributes:
        source: the datalist checked.
        classes: class names.
        multi_label: multi-hot labels.
        counts: images per split.
        class_counts: per labelled split, images per class (positives per class when multi-label).
        channels: the network input channels every image can be brought to (``channels`` when given).
        formats: images per format (``pil``, ``nifti``, ``dicom``, ``dicom-series``, ``itk``).
        notes: what the bundle does with images that differ from the rest but train (another size: resized).
    """

    source: str
    classes: list[str]
    multi_label: bool
    counts: dict[str, int]
    class_counts: dict[str, list[int]]
    channels: int
    formats: dict[str, int]
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        width = max(len(name) for name in [*self.classes, "images"]) + 2
        kind = f"{len(self.classes)} classes{' (multi-label)' if self.multi_label else ''}"
        lines = [
            f"datalist {self.source}: {kind if self.classes else 'unlabelled images only'}, "
            f"{self.channels} channel(s), formats {dict(sorted(self.formats.items()))}",
            f"{'split':<12}{'images':>{width}}" + "".join(f"{name:>{width}}" for name in self.classes),
        ]
        for split, count in self.counts.items():
            per_class = self.class_counts.get(split, [])
            lines.append(f"{split:<12}{count:>{width}}" + "".join(f"{n:>{width}}" for n in per_class))
        return "\n".join(lines + [f"note: {note}" for note in self.notes])


def check_classification_datalist(
    source: str | os.PathLike,
    channels: int | None = None,
    read_pixels: bool = True,
    num_classes: int | None = None,
    **read_options: Any,
) -> ClassificationSummary:
    """Check every image and label of a datalist and report all problems at once.

    Args:
        source: class-per-folder tree, CSV or decathlon JSON (see :func:`read_classification_datalist`).
        channels: the network's ``in_channels``: each image must have a channel count the transforms bring to it
            (the same, 1, or 3/4 for 1, 4 for 3); default: the most common count every image can be brought to.
        read_pixels: also decode every image with MONAI's ``LoadImage``, as training reads it (truncated or
            corrupt pixel data, NaN/Inf values); ``False`` reads headers only, for very large datasets.
        num_classes: the bundle's ``num_classes``: without a class map (class names inferred from index labels),
            every label must lie in ``0..num_classes-1``; each file whose label does not is reported.
        read_options: options of the datalist reader (``label_columns``, ``dicom_series``, ...).

    Returns:
        the summary; its notes (images of another size, which the bundle resizes) are also logged. Unlabelled
        images only (a plain folder of images, without class sub-folders) are no problem: the summary names them
        as data for self-supervised pre-training.

    Raises:
        DataCheckError: listing every problem with its path, and the fix where there is one.
    """
    datalist = read_classification_datalist(source, strict=False, **read_options)
    paths = list(dict.fromkeys(item["image"] for _, item in datalist.all_items()))
    headers, problems = _check_images(paths, channels, read_pixels)
    problems = list(datalist.problems) + problems + _duplicates(datalist) + _leaks(datalist)
    if num_classes is not None:
        problems += labels_out_of_range(datalist, num_classes)
    unlabelled_only = not any(datalist[split] for split in SPLITS) and bool(datalist[UNLABELED])
    if not datalist["training"] and not unlabelled_only:
        problems.append(f"{source}: no {'training ' if paths else ''}images.")
    if problems:
        raise DataCheckError(problems, source)
    notes = _size_notes(headers) + _empty_class_notes(datalist)
    if unlabelled_only:
        notes.append(_unlabelled_note(source, len(datalist[UNLABELED])))
    for note in notes:  # in a bundle's log too, where the summary is not printed
        logging.getLogger("monai_prompt").info(f"data check of {source}: {note}")
    return ClassificationSummary(
        source=str(source),
        classes=datalist.classes,
        multi_label=datalist.multi_label,
        counts={split: len(items) for split, items in datalist.splits.items()},
        class_counts={split: _class_counts(datalist, split) for split in SPLITS if split in datalist.splits},
        channels=_input_channels((header.channels for header in headers.values()), channels),
        formats=dict(Counter(header.format for header in headers.values())),
        notes=notes,
    )


def _unlabelled_note(source: str | os.PathLike, count: int) -> str:
    """What a datalist of unlabelled images only (a plain folder of images, without class sub-folders) serves."""
    labels = (
        f"a sub-folder per class ({os.path.join(source, '<class>', '<image>')})"
        if os.path.isdir(source)
        else "labelled 'training' images"
    )
    return (
        f"{count} unlabelled images{' (a plain folder: no class sub-folders)' if os.path.isdir(source) else ''}: "
        f"data for self-supervised pre-training (bundles/vit_pretraining, --dataset_dir {source}); classification "
        f"needs {labels}."
    )


def find_images(
    source: str | os.PathLike | Sequence[str | os.PathLike], dicom_series: bool = False
) -> list[str]:
    """Inference inputs: the image files of a folder (recursively, sorted, hidden ones skipped), the matches of a
    glob pattern (sorted; ``**`` recurses), a file, or a list of any of these (in order, each image once).

    Nothing found is not an error here (a bundle's configs are parsed before they run, also where there is no
    data): :func:`check_images` reports it, given ``source``. A file of a list that does not exist is kept, for
    :func:`check_images` to report as missing.

    Args:
        source: a folder, a glob pattern, an image file, or a list of them.
        dicom_series: each folder that directly holds DICOM files is one (3D) image, its series, instead of each
            file a (2D) image: the 3D bundles' inputs.
    """
    if not isinstance(source, (str, os.PathLike)):
        found = (
            find_images(entry, dicom_series) or ([] if glob.has_magic(str(entry)) else [str(entry)])
            for entry in source
        )
        return list(dict.fromkeys(path for paths in found for path in paths))
    path = Path(source)
    if path.is_dir():
        return [str(image) for image in folder_images(path, dicom_series)]
    if glob.has_magic(str(source)):
        return [match for match in sorted(glob.glob(str(source), recursive=True)) if is_image_file(match)]
    return [str(source)] if path.is_file() else []


def check_images(
    paths: Sequence[str | os.PathLike],
    channels: int | None = None,
    read_pixels: bool = True,
    source: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    spatial_dims: int | None = None,
) -> dict[str, ImageHeader]:
    """Check images without labels (e.g. inference inputs) as :func:`check_classification_datalist` checks a
    datalist's images.

    Args:
        paths: image files or DICOM series folders.
        channels: the network's ``in_channels`` (see :func:`check_classification_datalist`).
        read_pixels: decode every image (see :func:`check_classification_datalist`).
        source: where ``paths`` were looked for (e.g. the folder or glob given to :func:`find_images`), named in
            the errors.
        spatial_dims: the network's ``spatial_dims``: every image must have as many (else they must agree).

    Returns:
        each image's header, by path.

    Raises:
        DataCheckError: no images, or every missing, unreadable or non-finite image and channel mismatch.
    """
    paths = [str(path) for path in paths]
    where = f"images of {source!r}" if source is not None else f"{len(paths)} images"
    if not paths:
        if source is None:
            found_in = "no images given"
        elif isinstance(source, (str, os.PathLike)) and not glob.has_magic(str(source)) and not os.path.exists(source):
            found_in = f"{str(source)!r} does not exist (from {os.getcwd()}: {os.path.abspath(source)})"
        else:
            found_in = f"no images in {source!r}"
        fix = (
            f'{found_in}; give a folder of images (--input_dir DIR), a glob (--infer_images "/data/*.png"), or a '
            f"list (--infer_images \"['a.png','b.png']\")."
        )
        raise DataCheckError([fix], where)
    headers, problems = _check_images(list(dict.fromkeys(paths)), channels, read_pixels, spatial_dims)
    if problems:
        raise DataCheckError(problems, where)
    return headers


def _check_images(
    paths: list[str], channels: int | None, read_pixels: bool, spatial_dims: int | None = None
) -> tuple[dict[str, ImageHeader], list[str]]:
    """Headers of the readable images and one problem per bad image, then per channel mismatch, then per image of
    another dimensionality than ``spatial_dims`` (when given) or than the others."""
    load = None
    if read_pixels:  # MONAI is imported only to decode
        from monai.transforms import LoadImage

        load = LoadImage(image_only=True)
    headers: dict[str, ImageHeader] = {}
    problems = []
    for path in paths:
        try:
            headers[path] = read_header(path)
        except FileNotFoundError:
            problems.append(f"{path}: file not found.")
            continue
        except Exception as err:  # noqa: BLE001 - every unreadable file is reported, with the reader's reason
            problems.append(f"{path}: unreadable ({type(err).__name__}: {err}).")
            continue
        problem = _pixel_problem(path, load) if load is not None else None
        if problem:
            problems.append(f"{path}: {problem}")
    problems += _channel_problems({path: header.channels for path, header in headers.items()}, channels)
    dims = spatial_dims or _most_common([len(_spatial_shape(header)) for header in headers.values()])
    expected = (f"the network takes {dims}D images (spatial_dims={dims})" if spatial_dims else
                f"the other images are {dims}D; the network takes one (spatial_dims)")
    problems += [  # X x Y x 1 (or 1 x Y x Z) is 2D among 2D images (the transforms squeeze it), 3D among 3D ones
        f"{path}: {len(_spatial_shape(header))}D image ({_size(header)}) where {expected}, and this one would stop "
        f"the run: convert it or drop it."
        for path, header in headers.items()
        if dims not in (len(_spatial_shape(header)), len(header.spatial_shape))
    ]
    return headers, problems


def _input_channels(found: Iterable[int], channels: int | None = None) -> int:
    """The network input channels the images are checked against: ``channels`` when given, else the most common
    count that every image can be brought to (:func:`channels_feed`), else the most common count.

    Args:
        found: each image's channels.
        channels: the network's ``in_channels``, if known.
    """
    if channels:
        return channels
    counts = Counter(found)
    candidates = sorted(counts, key=lambda count: (-counts[count], count))
    fed_all = [c for c in candidates if all(channels_feed(count, c) for count in counts)]
    return (fed_all or candidates or [0])[0]


def _channel_problems(found: dict[str, int], channels: int | None) -> list[str]:
    """One problem per image whose channels (``found``, by path) the transforms cannot bring to ``channels`` (when
    given) or to the count the others share (:func:`_input_channels`)."""
    expected = _input_channels(found.values(), channels)
    rule = "the transforms repeat 1 channel to any count, average 3 or 4 (RGB, RGBA) to 1 and cut 4 to 3"
    if channels:
        return [
            f"{path}: {count} channel(s) cannot feed the network's in_channels={channels} ({rule}); "
            f"convert it, drop it, or set in_channels to what every image can feed."
            for path, count in found.items()
            if not channels_feed(count, channels)
        ]
    return [
        f"{path}: {count} channel(s) where the other images have {expected}, and the transforms cannot "
        f"bring both to one in_channels ({rule}); convert it or drop it."
        for path, count in found.items()
        if not channels_feed(count, expected)
    ]


def _spatial_shape(header: ImageHeader) -> tuple[int, ...]:
    """The header's spatial shape without singleton dims, the last first, while it has more than 2 (ITK's 2D DICOM, a
    NIfTI slice ``X x Y x 1``, ``1 x Y x Z`` or ``X x 1 x Z``), as the transforms squeeze it for a 2D network."""
    shape = list(header.spatial_shape)
    while len(shape) > 2 and 1 in shape:
        del shape[len(shape) - 1 - shape[::-1].index(1)]
    return tuple(shape)


def _size(header: ImageHeader) -> str:
    return " x ".join(str(side) for side in _spatial_shape(header))


def _size_notes(headers: dict[str, ImageHeader], shown: int = 3) -> list[str]:
    """A note when the images differ in size: how many have the most common one, and a few of the others."""
    sizes = Counter(_spatial_shape(header) for header in headers.values())
    if len(sizes) < 2:
        return []
    common, count = max(sizes.items(), key=lambda item: (item[1], item[0]))
    others = [f"{path} ({_size(header)})" for path, header in headers.items() if _spatial_shape(header) != common]
    more = f" and {len(others) - shown} more" if len(others) > shown else ""
    return [
        f"{len(headers) - count} of {len(headers)} images differ in size from the other "
        f"{' x '.join(map(str, common))}: {', '.join(others[:shown])}{more}; the bundle resizes every image to "
        f"img_size (non-square ones are stretched)."
    ]


def _empty_class_notes(datalist: ClassificationDatalist) -> list[str]:
    """A note naming the classes no labelled image has (e.g. index labels ``0..max`` with gaps, as a CSV's integer
    labels ``0 1 2 10`` give)."""
    if datalist.multi_label:
        return []
    labels = {item.get("label") for split, item in datalist.all_items() if split in SPLITS}
    empty = [name for index, name in enumerate(datalist.classes) if index not in labels]
    if not empty:
        return []
    return [
        f"classes {empty} have no images (class indices run 0..{len(datalist.classes) - 1} when every label is an "
        f"integer); the network still has an output for each (num_classes="
        f"{len(datalist.classes)}); name the classes (--classes) to drop them."
    ]


def _pixel_problem(path: str, load: Callable[[str], Any]) -> str | None:
    """What is wrong with the pixel data of an image whose header reads (None if nothing), read with ``load``."""
    try:
        image = np.asarray(load(path))
    except Exception as err:  # noqa: BLE001 - truncated/corrupt pixel data, with the reader's reason
        return (
            f"pixel data unreadable ({type(err).__name__}: {err}); the file may be truncated: re-export it or drop it."
        )
    if np.issubdtype(image.dtype, np.inexact):
        bad = int(image.size - np.count_nonzero(np.isfinite(image)))
        if bad:
            return f"{bad} NaN/Inf value(s) of {image.size}; training would get a NaN loss: fix the image or drop it."
    return None


def labels_out_of_range(datalist: ClassificationDatalist, num_classes: int) -> list[str]:
    """One problem per item whose label is too large: without a class map (classes ``"0".."K-1"`` inferred from
    index labels), each item whose label is not below ``num_classes``.

    Args:
        datalist: the datalist.
        num_classes: the bundle's ``num_classes``.
    """
    index_names = [str(i) for i in range(len(datalist.classes))]
    if datalist.multi_label or datalist.classes != index_names or len(index_names) <= num_classes:
        return []
    one_based = " (no image has label 0: are the labels 1-based? subtract 1)" if not _has_label(datalist, 0) else ""
    return [
        f"{item['image']}: label {item['label']} is outside 0..{num_classes - 1}: without a class map, labels must "
        f"be class indices 0..num_classes-1 (num_classes={num_classes}){one_based}; renumber them, or name the "
        f"classes (decathlon 'labels' map, --classes)."
        for _, item in datalist.all_items()
        if isinstance(item.get("label"), int) and item["label"] >= num_classes
    ]


def _has_label(datalist: ClassificationDatalist, label: int) -> bool:
    return any(item.get("label") == label for _, item in datalist.all_items())


def _most_common(values: list[int]) -> int:
    counts = Counter(values)
    return min(counts, key=lambda value: (-counts[value], value)) if counts else 0


def _leaks(datalist: ClassificationDatalist) -> list[str]:
    """Images listed in two splits, and groups whose images lie in two labelled splits."""
    splits_of_image, splits_of_group = defaultdict(set), defaultdict(set)
    for split, item in datalist.all_items():
        splits_of_image[item["image"]].add(split)
        if "group" in item and split in SPLITS:
            splits_of_group[item["group"]].add(split)
    return [f"{path}: listed in several splits {sorted(s)}." for path, s in splits_of_image.items() if len(s) > 1] + [
        f"group {group!r}: images in several splits {sorted(s)}; keep a volume/patient in one split."
        for group, s in splits_of_group.items()
        if len(s) > 1
    ]


def _duplicates(datalist: Datalist) -> list[str]:
    """Images listed more than once in one split."""
    return [
        f"{path}: listed {count} times in {split!r}; keep it once (a repeated image weighs more in training and "
        f"in the metrics)."
        for split, items in datalist.splits.items()
        for path, count in Counter(item["image"] for item in items).items()
        if count > 1
    ]


def _class_counts(datalist: ClassificationDatalist, split: str) -> list[int]:
    counts = [0] * datalist.num_classes
    for item in datalist[split]:
        label = item.get("label")
        if label is None:
            continue
        if datalist.multi_label:
            counts = [n + int(value > 0) for n, value in zip(counts, label)]
        else:
            counts[label] += 1
    return counts
