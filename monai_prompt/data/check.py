"""Check a dataset before training: every problem at once, each with its path.

:func:`check_datalist` reads the datalist leniently, then every image's header (:func:`read_header`, no pixel
data unless ``read_pixels``), and collects: unreadable or missing files, missing labels and labels outside the
class list, channel counts that differ from the rest (or from ``channels``), images listed in two splits and
groups split across training/validation/test. It raises one :class:`DataCheckError` listing them all, or
returns a :class:`DataSummary`. ``monai-prompt check-data <datalist>`` runs it from the command line.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from monai_prompt.data.datalist import SPLITS, ClassificationDatalist, DataCheckError, read_datalist
from monai_prompt.data.headers import ImageHeader, read_header

__all__ = ["DataSummary", "check_datalist"]


@dataclass
class DataSummary:
    """What a clean dataset holds.

    Attributes:
        source: the datalist checked.
        classes: class names.
        multi_label: multi-hot labels.
        counts: images per split.
        class_counts: per labelled split, images per class (positives per class when multi-label).
        channels: the channel count every image has.
        formats: images per format (``pil``, ``nifti``, ``dicom``, ``dicom-series``, ``itk``).
    """

    source: str
    classes: list[str]
    multi_label: bool
    counts: dict[str, int]
    class_counts: dict[str, list[int]]
    channels: int
    formats: dict[str, int]

    def __str__(self) -> str:
        width = max(len(name) for name in [*self.classes, "images"]) + 2
        lines = [
            f"datalist {self.source}: {len(self.classes)} classes{' (multi-label)' if self.multi_label else ''}, "
            f"{self.channels} channel(s), formats {dict(sorted(self.formats.items()))}",
            f"{'split':<12}{'images':>{width}}" + "".join(f"{name:>{width}}" for name in self.classes),
        ]
        for split, count in self.counts.items():
            per_class = self.class_counts.get(split, [])
            lines.append(f"{split:<12}{count:>{width}}" + "".join(f"{n:>{width}}" for n in per_class))
        return "\n".join(lines)


def check_datalist(
    source: str | os.PathLike, channels: int | None = None, read_pixels: bool = False, **read_options: Any
) -> DataSummary:
    """Check every image and label of a datalist and report all problems at once.

    Args:
        source: class-per-folder tree, CSV or decathlon JSON (see :func:`read_datalist`).
        channels: expected channels per image (default: the most common count).
        read_pixels: also decode every image with MONAI's ``LoadImage`` (slow; catches truncated pixel data).
        read_options: options of the datalist reader (``label_columns``, ``dicom_series``, ...).

    Raises:
        DataCheckError: listing every problem with its path, and the fix where there is one.
    """
    datalist = read_datalist(source, strict=False, **read_options)
    problems = list(datalist.problems)
    headers: dict[str, ImageHeader] = {}
    for _, item in datalist.all_items():
        path = item["image"]
        if path in headers:
            continue
        try:
            headers[path] = _read_pixels(path) if read_pixels else read_header(path)
        except FileNotFoundError:
            problems.append(f"{path}: file not found.")
        except Exception as err:  # noqa: BLE001 - every unreadable file is reported, with the reader's reason
            problems.append(f"{path}: unreadable ({type(err).__name__}: {err}).")
    expected = channels or _most_common([header.channels for header in headers.values()])
    problems += [
        f"{path}: {header.channels} channel(s) where the other images have {expected}; convert it or drop it."
        for path, header in headers.items()
        if header.channels != expected
    ]
    problems += _leaks(datalist)
    if not datalist["training"]:
        problems.append(f"{source}: no training images.")
    if problems:
        raise DataCheckError(problems, source)
    return DataSummary(
        source=str(source),
        classes=datalist.classes,
        multi_label=datalist.multi_label,
        counts={split: len(items) for split, items in datalist.splits.items()},
        class_counts={split: _class_counts(datalist, split) for split in SPLITS if split in datalist.splits},
        channels=expected,
        formats=dict(Counter(header.format for header in headers.values())),
    )


def _read_pixels(path: str) -> ImageHeader:
    """Header taken from a full MONAI ``LoadImage`` read."""
    from monai.transforms import LoadImage

    image = LoadImage(image_only=True, ensure_channel_first=True)(path)
    return ImageHeader("monai", int(image.shape[0]), tuple(int(s) for s in image.shape[1:]))


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
