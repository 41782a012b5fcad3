"""Classification datalists: MONAI-style lists of ``{"image": path, "label": ...}`` dicts per split.

Three sources give the same :class:`ClassificationDatalist`:

- a class-per-folder tree (:func:`datalist_from_folder`), optionally under ``train``/``val``/``test`` folders;
- a CSV table (:func:`datalist_from_csv`): an image column, one label column (class name or index) or several
  0/1 label columns (multi-label), optional ``split`` and ``group`` columns;
- a MONAI decathlon JSON file (:func:`datalist_from_json`): ``training``/``validation``/``test``/``unlabeled``
  lists and an optional ``labels`` map of class names.

Labels become a class index (``int``) or, for multi-label data, a multi-hot ``list[float]``. Splits the source
lacks are carved out of the training images as every reader's ``split`` (:class:`SplitOptions`) says: a seeded,
class-stratified split of *groups* (a ``group`` value, or a regex/function of the path), so the slices of one
volume or patient never land in two splits. :func:`read_classification_datalist` picks the source from the path;
bundle configs use it as ``"$monai_prompt.data.read_classification_datalist(@dataset_dir)['training']"``.
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import json
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai_prompt.data.headers import is_dicom_file, is_image_file
from monai_prompt.data.split import SPLITS, SplitOptions, split_items

__all__ = [
    "UNLABELED",
    "ClassificationDatalist",
    "DataCheckError",
    "Datalist",
    "datalist_from_csv",
    "datalist_from_folder",
    "datalist_from_json",
    "folder_images",
    "read_classification_datalist",
]

#: images without labels (for self-supervised pre-training).
UNLABELED = "unlabeled"
_SPLIT_ALIASES = {
    **{name: "training" for name in ("train", "training")},
    **{name: "validation" for name in ("val", "valid", "validation")},
    **{name: "test" for name in ("test", "testing")},
    **{name: UNLABELED for name in ("unlabeled", "unlabelled")},
}


class DataCheckError(ValueError):
    """One error for all the problems found in a dataset, each naming its file.

    Attributes:
        problems: one line per problem, starting with the image path.
    """

    def __init__(self, problems: Sequence[str], source: str | os.PathLike = "datalist") -> None:
        self.problems = list(problems)
        listing = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in {source}:\n{listing}")


@dataclass
class Datalist:
    """Items per split and the class names: what both tasks' datalists share.

    Attributes:
        classes: class names.
        splits: ``training``/``validation``/``test``/``unlabeled`` -> lists of item dicts with absolute paths.
    """

    classes: list[str]
    splits: dict[str, list[dict[str, Any]]]

    def all_items(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(split, item)`` for every item."""
        for split, items in self.splits.items():
            for item in items:
                yield split, item


@dataclass
class ClassificationDatalist(Datalist):
    """Images per split and the class names.

    Attributes:
        classes: class names; a label is an index into this list (or a multi-hot vector over it).
        splits: ``training``/``validation``/``test``/``unlabeled`` -> list of ``{"image", "label"[, "group"]}``
            dicts with absolute image paths (no ``label`` in ``unlabeled``).
        multi_label: labels are multi-hot ``list[float]`` instead of ``int``.
        problems: per-image problems found while reading with ``strict=False`` (missing/unknown labels, ...).
    """

    multi_label: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __getitem__(self, split: str) -> list[dict[str, Any]]:
        """Items of ``split`` (``training``, ``validation``, ``test`` or ``unlabeled``; empty when absent)."""
        if split not in (*SPLITS, UNLABELED):
            raise KeyError(f"unknown split {split!r}; use one of {(*SPLITS, UNLABELED)}.")
        return self.splits.get(split, [])

    def to_decathlon(self, base_dir: str | os.PathLike, **metadata: Any) -> dict[str, Any]:
        """MONAI decathlon dict with image paths relative to ``base_dir`` and ``metadata`` fields in front (an
        image of a labelled split without label is written as a bare path, as in MSD test lists)."""
        splits = {
            split: [
                {**item, "image": os.path.relpath(item["image"], base_dir)}
                if "label" in item or split == UNLABELED
                else os.path.relpath(item["image"], base_dir)
                for item in items
            ]
            for split, items in self.splits.items()
        }
        return {
            **metadata,
            "labels": {str(i): name for i, name in enumerate(self.classes)},
            "multiLabel": self.multi_label,
            "numTraining": len(self["training"]),
            **splits,
        }

    def save_json(self, path: str | os.PathLike, **metadata: Any) -> Path:
        """Write a decathlon JSON file (paths relative to its folder); read it back with :func:`datalist_from_json`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_decathlon(path.parent, **metadata), indent=1) + "\n", encoding="utf-8")
        return path

    def save_csv(self, path: str | os.PathLike) -> Path:
        """Write ``image,label,split,group`` rows (one 0/1 column per class when multi-label), paths relative to
        the CSV's folder; read it back with :func:`datalist_from_csv` (``label_columns=classes`` if multi-label)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        label_columns = self.classes if self.multi_label else ["label"]
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["image", *label_columns, "split", "group"])
            for split, item in self.all_items():
                label = item.get("label")
                if label is None:
                    cells = [""] * len(label_columns)
                elif self.multi_label:
                    cells = [f"{value:g}" for value in label]
                else:
                    cells = [self.classes[label]]
                writer.writerow([os.path.relpath(item["image"], path.parent), *cells, split, item.get("group", "")])
        return path


@dataclass
class _Record:
    """One image as the source states it, before labels are encoded and splits assigned."""

    image: str  # absolute path
    name: str  # path as the source writes it, for SplitOptions.group_by
    label: Any
    split: str | None = None
    group: str | None = None
    where: str = ""  # e.g. "line 7", for problem messages
    labelled: bool = True  # False for a bare path in a decathlon list (MSD test images)

    def problem(self, message: str) -> str:
        return f"{self.image}{f' ({self.where})' if self.where else ''}: {message}"


def read_classification_datalist(source: str | os.PathLike, **options: Any) -> ClassificationDatalist:
    """Read a datalist from a folder tree, a ``.csv`` table or a decathlon ``.json`` file.

    Args:
        source: the folder, CSV or JSON path.
        options: keyword arguments of :func:`datalist_from_folder`, :func:`datalist_from_csv` or
            :func:`datalist_from_json`.
    """
    path = Path(source)
    readers = {".csv": datalist_from_csv, ".json": datalist_from_json}
    if path.is_dir():
        reader = datalist_from_folder
    elif not path.is_file():
        raise FileNotFoundError(f"datalist {path} does not exist; give a class-per-folder tree, a .csv or a .json.")
    elif path.suffix.lower() not in readers:
        raise ValueError(f"datalist {path} is neither a folder, a .csv nor a .json file.")
    else:
        reader = readers[path.suffix.lower()]
    takes = list(inspect.signature(reader).parameters)[1:]
    unknown = sorted(set(options) - set(takes))
    if unknown:
        kind = {datalist_from_folder: "folder", datalist_from_csv: "CSV", datalist_from_json: "JSON"}[reader]
        raise ValueError(
            f"datalist {path}: a {kind} datalist takes no {', '.join(unknown)} (its options: {', '.join(takes)})."
        )
    return reader(path, **options)


def datalist_from_folder(
    root: str | os.PathLike,
    *,
    classes: Sequence[str] | None = None,
    dicom_series: bool = False,
    split: SplitOptions | Mapping[str, Any] | None = None,
    strict: bool = True,
) -> ClassificationDatalist:
    """Datalist from ``root/<class>/**/<image>``, or ``root/<split>/<class>/**/<image>`` with split folders
    named ``train``/``val``/``test`` (or ``training``/``validation``/``testing``).

    An image in a sub-folder of its class folder (``root/<class>/<patient>/<slice>.png``) belongs to the group named
    by that first sub-folder (``<patient>``; in any class and split), unless ``split`` has a ``group_by``: the images
    of a group land in one split, and the data check reports a group found in two. A folder without sub-folders
    is a plain folder of images: all of them are ``unlabeled`` (what self-supervised pre-training reads).

    Args:
        root: the tree's root folder.
        classes: class order (default: the class folder names, in numeric order when every name is an integer,
            else sorted); images of a folder not listed are problems.
        dicom_series: each folder that directly holds DICOM files is one (3D) image, instead of each file.
        split: how the splits without a folder are carved out of training (:class:`SplitOptions` or a dict of its
            fields; default 10% validation, 10% test, seed 0); its ``group_by`` sees paths relative to ``root``.
        strict: raise :class:`DataCheckError` on problems; else collect them in ``problems``.
    """
    options = SplitOptions.of(split)
    root = Path(root).absolute()
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder of class folders.")
    folders = _subfolders(root)
    split_names = {folder.name: _SPLIT_ALIASES.get(folder.name.lower()) for folder in folders}
    if folders and all(split_names.values()):
        trees = [(split_names[folder.name], folder) for folder in folders]
    elif not folders:  # a plain folder of images: no class folders, so unlabelled (self-supervised pre-training)
        trees = [(UNLABELED, root)]
    else:
        trees = [(None, root)]
    records, problems, found = [], [], []
    for split_name, tree in trees:
        if split_name == UNLABELED:
            class_images = [(None, tree, folder_images(tree, dicom_series))]
        else:
            class_images = [(f.name, f, folder_images(f, dicom_series)) for f in _subfolders(tree)]
        for label, folder, images in class_images:
            if label is not None:
                found.append(label)
                if not images:
                    problems.append(f"{folder}: class folder holds no images.")
            for image in images:
                parts = image.relative_to(folder).parts
                group = parts[0] if len(parts) > 1 and options.group_by is None else None
                records.append(_Record(str(image), str(image.relative_to(root)), label, split_name, group))
    classes = list(classes) if classes is not None else _folder_classes(found)
    return _assemble(records, classes, False, options, problems, strict, root, f"relative to {root}")


def datalist_from_csv(
    path: str | os.PathLike,
    *,
    image_column: str = "image",
    label_columns: str | Sequence[str] = "label",
    split_column: str = "split",
    group_column: str = "group",
    classes: Sequence[str] | None = None,
    base_dir: str | os.PathLike | None = None,
    split: SplitOptions | Mapping[str, Any] | None = None,
    strict: bool = True,
) -> ClassificationDatalist:
    """Datalist from a CSV table with a header row.

    Args:
        path: the CSV file.
        image_column: column of image paths (relative to ``base_dir``).
        label_columns: one column of class names or indices, or several columns of 0/1 values (multi-label, the
            column names are the classes).
        split_column: optional column of ``train``/``val``/``test``/``unlabeled`` (empty = training pool).
        group_column: optional column of group ids (volume, patient) kept within one split.
        classes: class order for a single label column (default: sorted names, or ``0..max`` for indices).
        base_dir: folder image paths are relative to (default: the CSV's folder).
        split, strict: see :func:`datalist_from_folder` (``group_by`` sees the paths as the file writes them).
    """
    options = SplitOptions.of(split)
    path = Path(path)
    label_columns = [label_columns] if isinstance(label_columns, str) else list(label_columns)
    multi_label = len(label_columns) > 1
    if multi_label and classes is not None:
        raise ValueError(f"classes={list(classes)} given with several label_columns; the columns are the classes.")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's "CSV UTF-8" starts with a BOM
            reader = csv.DictReader(f)
            rows, columns = list(reader), reader.fieldnames or []
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err}); save it as UTF-8 (Excel: \"CSV UTF-8\").") from None
    missing = [c for c in (image_column, *label_columns) if c not in columns]
    if missing:
        raise ValueError(
            f"{path}: no column(s) {missing}; the header has {list(columns)}. Set image_column/label_columns."
        )
    base = Path(base_dir if base_dir is not None else path.parent).absolute()
    records, problems = [], []
    for line, row in enumerate(rows, start=2):
        image = (row[image_column] or "").strip()
        where = f"{path.name} line {line}"
        if not image:
            problems.append(f"{path} line {line}: empty {image_column!r} cell.")
            continue
        labels = [(row[c] or "").strip() for c in label_columns]
        record = _Record(os.path.normpath(base / image), image, labels if multi_label else labels[0], where=where)
        record.split = _split_name(row.get(split_column), record, problems)
        record.group = (row.get(group_column) or "").strip() or None
        records.append(record)
    classes = label_columns if multi_label else classes
    return _assemble(records, classes, multi_label, options, problems, strict, path)


def datalist_from_json(
    path: str | os.PathLike,
    *,
    classes: Sequence[str] | None = None,
    base_dir: str | os.PathLike | None = None,
    split: SplitOptions | Mapping[str, Any] | None = None,
    strict: bool = True,
) -> ClassificationDatalist:
    """Datalist from a MONAI decathlon JSON file.

    Items are ``{"image": path, "label": index | class name | multi-hot list[, "group": id]}`` under
    ``training``, ``validation``, ``test`` and ``unlabeled``; a bare path (as in MSD test lists) is an image
    without label. Class names come from ``classes``, else the file's ``labels`` map (``{"0": "name", ...}``),
    else the labels themselves. A list label makes the datalist multi-label. (MONAI's
    ``load_decathlon_datalist`` is not used: it would join a class-name label to the base folder.)

    Args:
        path: the JSON file.
        classes: class order (overrides ``labels``).
        base_dir: folder image paths are relative to (default: the JSON's folder).
        split, strict: see :func:`datalist_from_folder` (``group_by`` sees the paths as the file writes them).
    """
    options = SplitOptions.of(split)
    path = Path(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8-sig"))  # -sig: a BOM (Windows editors) is skipped
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err}); save the datalist as UTF-8.") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); fix the file (a decathlon datalist).") from None
    if not isinstance(content, dict) or not any(key in content for key in (*SPLITS, UNLABELED)):
        raise ValueError(f"{path} is not a decathlon datalist: it needs a 'training' (or other split) list.")
    base = Path(base_dir if base_dir is not None else path.parent).absolute()
    records, problems = [], []
    for split_name in (*SPLITS, UNLABELED):
        for index, entry in enumerate(content.get(split_name, [])):
            labelled = not isinstance(entry, str)
            entry = entry if labelled else {"image": entry}
            where = f"{split_name}[{index}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                problems.append(f"{path} {where}: item without an 'image' path: {entry!r}.")
                continue
            image, group = entry["image"], entry.get("group")
            group = None if group is None else str(group)
            records.append(
                _Record(os.path.normpath(base / image), image, entry.get("label"), split_name, group, where, labelled)
            )
    if classes is None and isinstance(content.get("labels"), dict):
        classes = [name for _, name in sorted(content["labels"].items(), key=lambda kv: int(kv[0]))]
    multi_label = any(isinstance(r.label, list) for r in records if r.split != UNLABELED and r.labelled)
    return _assemble(records, classes, multi_label, options, problems, strict, path)


def _folder_classes(names: list[str]) -> list[str]:
    """Class names from class folder names: in numeric order when every name is an integer (``0 1 2 10``, grades:
    not ``0 1 10 2``; only the folders found, so ``1 2 3`` are 3 classes), else sorted."""
    names = sorted(set(names))
    numbers = [_as_integer(name) for name in names]
    if not names or any(number is None for number in numbers):
        return names
    return [name for _, name in sorted(zip(numbers, names))]


def _as_integer(name: str) -> int | None:
    """``name`` as an int if it spells one (``3``, ``03``, ``-3``), else None."""
    try:
        return int(name)
    except ValueError:
        return None


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def folder_images(folder: Path, dicom_series: bool) -> list[Path]:
    """Image files under ``folder`` (recursively, sorted, hidden ones skipped); with ``dicom_series`` each folder's
    DICOM files are one image, the folder.

    Args:
        folder: the folder to search.
        dicom_series: a folder directly holding DICOM files stands for them (a series).
    """
    images = [
        path
        for path in sorted(folder.rglob("*"))
        if not any(part.startswith(".") for part in path.relative_to(folder).parts) and is_image_file(path)
    ]
    if not dicom_series:
        return images
    return sorted({path.parent if is_dicom_file(path) else path for path in images})


def _split_name(value: str | None, record: _Record, problems: list[str]) -> str | None:
    """Canonical split name of a CSV cell (None when empty), recording unknown names as problems."""
    value = (value or "").strip().lower()
    if not value:
        return None
    if value not in _SPLIT_ALIASES:
        problems.append(record.problem(f"unknown split {value!r}; use one of {sorted(_SPLIT_ALIASES)}."))
        return None
    return _SPLIT_ALIASES[value]


def _as_index(value: Any) -> int | None:
    """``value`` as an int class index if it is one (``3``, ``"3"``, ``3.0``), else None."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() else None


def _infer_classes(labels: list[Any], multi_label: bool) -> list[str]:
    """Class names from raw labels: ``0..max`` when all are indices, else the sorted distinct names; for multi-hot
    lists ``0..K-1`` with K the most common length."""
    present = [label for label in labels if label not in (None, "")]
    if multi_label:
        lengths = Counter(len(label) for label in present if isinstance(label, (list, tuple)))
        return [str(i) for i in range(max(lengths, key=lengths.__getitem__))] if lengths else []
    indices = [_as_index(label) for label in present]
    if present and all(index is not None for index in indices):
        return [str(i) for i in range(max(indices) + 1)]
    return sorted({str(label) for label in present})


def _encode_label(raw: Any, classes: list[str], multi_label: bool) -> int | list[float]:
    """Class index (or multi-hot vector) of a raw label; ValueError with the reason when it has none."""
    if raw is None or raw == "":
        raise ValueError("missing label.")
    if not multi_label:
        if str(raw) in classes:
            return classes.index(str(raw))
        index = _as_index(raw)
        if index is not None and 0 <= index < len(classes):
            return index
        raise ValueError(f"label {raw!r} is not one of the classes {classes} (nor an index below {len(classes)}).")
    if not isinstance(raw, (list, tuple)) or len(raw) != len(classes):
        raise ValueError(f"multi-label {raw!r} must be {len(classes)} values in [0, 1], one per class {classes}.")
    try:
        values = [float(value) for value in raw]
    except (TypeError, ValueError):
        raise ValueError(f"multi-label {list(raw)} has a missing or non-numeric value; use 0 or 1 per class.") from None
    if any(not 0 <= value <= 1 for value in values):
        raise ValueError(f"multi-label {values} has values outside [0, 1].")
    return values


def _assemble(
    records: list[_Record],
    classes: Sequence[str] | None,
    multi_label: bool,
    options: SplitOptions,
    problems: list[str],
    strict: bool,
    source: str | os.PathLike,
    names_are: str = "as the datalist file writes it",
) -> ClassificationDatalist:
    """Encode labels and groups, carve the splits the source lacks out of training, raise or keep the problems
    (``names_are``: how the paths ``group_by`` is tried on are written, for its error)."""
    labelled = [r for r in records if r.split != UNLABELED and r.labelled]
    classes = list(classes) if classes is not None else _infer_classes([r.label for r in labelled], multi_label)
    splits: dict[str, list[dict[str, Any]]] = {split: [] for split in (*SPLITS, UNLABELED)}
    unmatched = []
    for record in records:
        if record.group is None:
            try:
                record.group = options.group_of(record.name)
            except ValueError:
                unmatched.append(record.name)
    if unmatched:
        examples = ", ".join(repr(name) for name in unmatched[:3]) + (" ..." if len(unmatched) > 3 else "")
        problems.append(
            f"{source}: group_by pattern {options.group_by!r} does not match {len(unmatched)} of {len(records)} image "
            f"paths (it is tried on each path {names_are}, e.g. {examples}); fix the pattern."
        )
    for record in records:
        item: dict[str, Any] = {"image": record.image}
        if record.split != UNLABELED and record.labelled:
            try:
                item["label"] = _encode_label(record.label, classes, multi_label)
            except ValueError as err:
                problems.append(record.problem(str(err)))
                item["label"] = None
        if record.group is not None:
            item["group"] = record.group
        splits[record.split or "training"].append(item)
    missing = [split for split in SPLITS[1:] if not splits[split]]
    if missing and splits["training"]:
        carve = dataclasses.replace(
            options,
            val_fraction=options.val_fraction if "validation" in missing else 0.0,
            test_fraction=options.test_fraction if "test" in missing else 0.0,
            group_by=None,  # applied above, to the paths as the source writes them
        )
        carved = split_items(splits["training"], carve)
        splits["training"] = carved["training"]
        for name in missing:
            splits[name] = carved[name]
    if problems and strict:
        raise DataCheckError(problems, source)
    return ClassificationDatalist(classes, {k: v for k, v in splits.items() if v}, multi_label, problems)
