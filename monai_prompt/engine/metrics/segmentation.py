"""Per-class segmentation metrics for evaluators: MONAI's ``MeanDice`` and ``HausdorffDistance`` with one scalar
metric per class.

MONAI's handlers reduce over classes (``reduction="mean"``) or return a tensor / a ``{label: value}`` dict per
class (``"mean_batch"``), which ignite stores as one non-scalar entry that ``StatsHandler``, ``MetricsSaver``
and MLflow cannot log as numbers. These subclasses keep MONAI's per-image computation and store
``<name>_<class>`` scalars instead (e.g. ``val_dice_csf``), each the mean over the images where MONAI's value is
defined: MONAI gives NaN for Dice when the ground truth lacks the class and for HD95 when the prediction or the
ground truth lacks it. A class without any defined value reports NaN (MONAI's reductions report 0 there, which
would read as a perfect HD95). ``mean_name`` also stores the mean over all defined (image, class) values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.handlers import HausdorffDistance, MeanDice

__all__ = ["ClassHausdorffDistance", "ClassMeanDice"]


class _PerClass:
    """Mixin for a MONAI metric handler: ``completed`` stores one scalar per class name (and optionally the overall
    mean) from the per-image values instead of MONAI's reduction.

    Args:
        class_names: names of the scored classes, in channel order (without background unless
            ``include_background``).
        mean_name: also store the mean over all defined (image, class) values under this name.
        kwargs: the MONAI handler's arguments (``include_background``, ``output_transform``, ...).
    """

    def __init__(self, class_names: Sequence[str], mean_name: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.class_names = list(class_names)
        self.mean_name = mean_name

    def completed(self, engine, name: str) -> None:
        """Store ``<name>_<class>`` for each class name, and ``mean_name`` if set (ignite calls this at the end of
        the run)."""
        self.compute()  # MONAI's aggregation: gathers the values of every rank, keeps the per-image details
        scores = torch.as_tensor(self.metric_fn.get_buffer(), dtype=torch.float64).reshape(-1, len(self.class_names))
        for class_name, value in zip(self.class_names, scores.nanmean(0).tolist()):
            engine.state.metrics[f"{name}_{class_name}"] = value
        if self.mean_name:
            engine.state.metrics[self.mean_name] = scores.nanmean().item()


class ClassMeanDice(_PerClass, MeanDice):
    """Dice per class (MONAI ``MeanDice`` per image), averaged over the images whose ground truth has the class.

    Args: ``class_names``, ``mean_name`` (:class:`_PerClass`) and ``MeanDice``'s (``include_background``,
    ``output_transform``, ``save_details``: each image's values for ``MetricsSaver``).
    """


class ClassHausdorffDistance(_PerClass, HausdorffDistance):
    """Hausdorff distance per class (``percentile=95``: HD95) in voxels (MONAI ``HausdorffDistance`` per image),
    averaged over the images where both prediction and ground truth have the class.

    Args: ``class_names``, ``mean_name`` (:class:`_PerClass`) and ``HausdorffDistance``'s (``percentile``,
    ``include_background``, ``output_transform``, ``save_details``).
    """
