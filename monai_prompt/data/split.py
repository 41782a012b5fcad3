"""Seeded, grouped, class-stratified training/validation/test splits of datalist items.

:class:`SplitOptions` says how the splits a source lacks are carved out of its training images; every datalist
reader takes one as ``split=`` (or a plain dict of its fields, as a bundle config writes it). :func:`split_items`
does the carving: images of one group (volume, patient) never land in two splits.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

import numpy as np

__all__ = ["SPLITS", "GroupBy", "SplitOptions", "split_items"]

#: labelled splits, with MONAI decathlon names.
SPLITS = ("training", "validation", "test")
GroupBy = str | Callable[[str], str] | None


@dataclass(frozen=True)
class SplitOptions:
    """How the splits a source does not state are carved out of its training images.

    Args:
        val_fraction: fraction of groups carved for validation (when the source has no validation split).
        test_fraction: same for test (0 carves no test split).
        group_by: regex (first capture group, else the whole match) or function of an image's path that names
            its group, for images the source gives no group; images of a group share a split. Readers apply it
            to the path as the source writes it (relative to the root of a folder tree), :func:`split_items` to
            ``item["image"]``.
        seed: split seed.

    Raises:
        ValueError: a fraction outside [0, 1) or fractions summing to 1 or more, or ``group_by`` neither a valid
            regex nor a function.
    """

    val_fraction: float = 0.1
    test_fraction: float = 0.1
    group_by: GroupBy = None
    seed: int = 0

    def __post_init__(self) -> None:
        fractions = (self.val_fraction, self.test_fraction)
        if not all(isinstance(f, Real) and f >= 0 for f in fractions) or sum(fractions) >= 1:
            raise ValueError(
                f"val_fraction={self.val_fraction!r} and test_fraction={self.test_fraction!r} must be numbers >= 0 "
                "that sum to < 1."
            )
        if isinstance(self.group_by, str):
            try:
                re.compile(self.group_by)
            except re.error as err:
                raise ValueError(f"group_by={self.group_by!r} is not a valid regex: {err}.") from None
        elif self.group_by is not None and not callable(self.group_by):
            raise ValueError(f"group_by={self.group_by!r} must be a regex string, a function of the path, or None.")

    @classmethod
    def of(cls, value: SplitOptions | Mapping[str, Any] | None) -> SplitOptions:
        """``value`` as :class:`SplitOptions`: itself, the defaults for None, or built from a dict of its fields.

        Raises:
            ValueError: a dict key that is no field (the message lists the valid ones).
            TypeError: anything else than SplitOptions, a mapping or None.
        """
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"split must be SplitOptions, a dict of its fields or None, not {type(value).__name__}.")
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise ValueError(f"unknown split option(s) {unknown}; valid ones are {fields}.")
        return cls(**value)

    def group_of(self, path: str) -> str | None:
        """Group id of ``path`` by ``group_by`` (None when ``group_by`` is None).

        Raises:
            ValueError: the ``group_by`` regex does not match ``path``.
        """
        if self.group_by is None:
            return None
        if callable(self.group_by):
            return str(self.group_by(path))
        match = re.search(self.group_by, path)
        if match is None:
            raise ValueError(f"group_by pattern {self.group_by!r} does not match the path {path!r}; fix the pattern.")
        return match.group(1) if match.groups() else match.group(0)


def split_items(
    items: Sequence[dict[str, Any]], split: SplitOptions | Mapping[str, Any] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Seeded split of items into training/validation/test by group, stratified by class.

    Items sharing a group (``item["group"]``, else ``split.group_by`` of ``item["image"]``, else the image
    alone) go to the same split. Groups are stratified by their most frequent ``int`` label (multi-label items
    are not stratified), sorted, shuffled with the seed and cut by the fractions (rounded per class, training
    keeps at least one group). The result does not depend on the order of ``items``; each split keeps the
    items' order.

    Args:
        items: datalist items.
        split: fractions, grouping and seed (:class:`SplitOptions` or a dict of its fields; default: 0.1/0.1).
    """
    split = SplitOptions.of(split)
    groups: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        group = item.get("group") or split.group_of(item["image"]) or item["image"]
        groups.setdefault(str(group), []).append(index)
    strata: dict[int, list[str]] = {}
    for group, members in groups.items():
        labels = [items[i].get("label") for i in members if isinstance(items[i].get("label"), int)]
        stratum = min(Counter(labels).most_common(), key=lambda kv: (-kv[1], kv[0]))[0] if labels else -1
        strata.setdefault(stratum, []).append(group)
    rng = np.random.default_rng(split.seed)
    split_of: dict[str, str] = {}
    for stratum in sorted(strata):
        names = sorted(strata[stratum])
        names = [names[i] for i in rng.permutation(len(names))]
        n_test = math.floor(len(names) * split.test_fraction + 0.5)
        n_val = math.floor(len(names) * split.val_fraction + 0.5)
        n_test = min(n_test, len(names) - 1)
        n_val = min(n_val, len(names) - 1 - n_test)
        for i, name in enumerate(names):
            split_of[name] = "test" if i < n_test else "validation" if i < n_test + n_val else "training"
    result: dict[str, list[int]] = {name: [] for name in SPLITS}
    for group, members in groups.items():
        result[split_of[group]].extend(members)
    return {name: [items[i] for i in sorted(indices)] for name, indices in result.items()}
