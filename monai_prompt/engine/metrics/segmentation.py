"""Per-class segmentation metrics for evaluators: MONAI's ``MeanDice`` and ``HausdorffDistance`` with one scalar
metric per class.

MONAI's handlers reduce over classes (``reduction="mean"``) or return a tensor / a ``{label: value}`` dict per
class (``"mean_batch"``), which ignite stores as one non-scalar entry that ``StatsHandler``, ``MetricsSaver``
and MLflow cannot log as numbers. These subclasses keep MONAI's per-image computation and store
``<name>_<class>`` scalars instead (e.g. ``val_dice_csf``), each the mean over the images where MONAI's value is
defined: MONAI gives NaN for Dice when the ground truth lacks the class and for HD95 when the prediction or the
ground truth lacks it. A class without any defined value reports NaN (MONAI's reductions report 0 there, which
would read as a perfect HD95). ``mean_name`` also stores the mean over all defined (image, class) values;
``class_prefix`` names the per-class scalars and keeps MONAI's reduction under the handler's own name, so that one
``ClassMeanDice`` is both the key metric (``val_mean_dice``) and the Dice per class, computed once.

HD95 is in the units of each image's grid (:func:`grid_spacing`: mm for NIfTI/DICOM, pixels for PNG). MONAI's own
HD95 (``get_edge_surface_distance``) hands ``get_mask_edges`` the argument MONAI deprecates, so each run that scores
HD95 warned once about it; :class:`ClassHausdorffDistance` silences exactly that warning (nothing it could pass avoids
it), every other warning shows.
With ``num_classes`` both take class-index maps (``B1HW[D]``, e.g. an argmax and a label) instead of one-hot
channels, one class at a time: the values are the one-hot ones, without the classes x volume one-hot tensors.
:class:`ClassMetricsSaver` writes their per-image values with the classes' names for column heads.
"""

from __future__ import annotations

import csv
import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine
from ignite.metrics.metric import reinit__is_reduced
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.handlers import HausdorffDistance, MeanDice, MetricsSaver
from monai.metrics import HausdorffDistanceMetric
from monai.metrics.hausdorff_distance import compute_hausdorff_distance

from monai_prompt.io import atomic_write

__all__ = [
    "ClassHausdorffDistance",
    "ClassMeanDice",
    "ClassMetricsSaver",
    "LabelMapHausdorffDistanceMetric",
    "grid_spacing",
]

#: the FutureWarning of MONAI 1.5-1.6 that its HD95 raises itself (``get_edge_surface_distance`` passes
#: ``always_return_as_numpy`` to ``get_mask_edges``, which deprecates it).
_MASK_EDGES_DEPRECATION = r"monai\.metrics\.utils get_mask_edges:always_return_as_numpy"


def grid_spacing(image: torch.Tensor, spatial_dims: int) -> list[float]:
    """The size of a voxel of ``image`` along each spatial axis: the lengths of its MetaTensor affine's columns
    (whole columns: a 2D slice's axes may point along z), in the affine's units (mm for NIfTI and DICOM; 1 for PNG,
    whose reader gives no spacing: pixels). A tensor without meta (no affine, e.g. a plain tensor in a test) gets 1
    per axis: voxels.

    Args:
        image: one channel-first image (``CHW[D]``), not a batch.
        spatial_dims: its spatial axes (2 or 3).
    """
    if not isinstance(image, MetaTensor):
        return [1.0] * spatial_dims
    affine = image.affine
    return [float(size) for size in affine_to_spacing(affine, r=affine.shape[-1] - 1)[:spatial_dims]]


class _PerClass:
    """Mixin for a MONAI metric handler: ``completed`` stores one scalar per class name (and optionally the overall
    mean) from the per-image values instead of MONAI's reduction.

    Args:
        class_names: names of the scored classes, in channel order (without background unless
            ``include_background``).
        mean_name: also store the mean over all defined (image, class) values under this name.
        class_prefix: name the per-class scalars ``<class_prefix>_<class>`` and store MONAI's reduction (the
            handler's ``reduction``: ``MeanDice``'s value) under the handler's own name, which can then be an
            evaluator's key metric; default: the per-class scalars are ``<name>_<class>`` and nothing is stored
            under ``name``.
        kwargs: the MONAI handler's arguments (``include_background``, ``output_transform``, ...).
    """

    def __init__(
        self, class_names: Sequence[str], mean_name: str | None = None, class_prefix: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.class_names = list(class_names)
        self.mean_name = mean_name
        self.class_prefix = class_prefix

    def completed(self, engine, name: str) -> None:
        """Store ``<class_prefix or name>_<class>`` for each class name, MONAI's reduction under ``name`` with
        ``class_prefix``, and ``mean_name`` if set (ignite calls this at the end of the run)."""
        reduced = self.compute()  # MONAI's aggregation: gathers every rank's values, keeps the per-image details
        if self.class_prefix:
            engine.state.metrics[name] = reduced
        scores = torch.as_tensor(self.metric_fn.get_buffer(), dtype=torch.float64).reshape(-1, len(self.class_names))
        for class_name, value in zip(self.class_names, scores.nanmean(0).tolist()):
            engine.state.metrics[f"{self.class_prefix or name}_{class_name}"] = value
        if self.mean_name:
            engine.state.metrics[self.mean_name] = scores.nanmean().item()


class ClassMeanDice(_PerClass, MeanDice):
    """Dice per class (MONAI ``MeanDice`` per image), averaged over the images whose ground truth has the class;
    with ``class_prefix``, also ``MeanDice``'s own value under the handler's name (the bundles' key metric
    ``mean_dice``, from the same per-image values: Dice is computed once).

    Args: ``class_names``, ``mean_name``, ``class_prefix`` (:class:`_PerClass`) and ``MeanDice``'s
    (``include_background``, ``num_classes``: class-index maps, ``output_transform``, ``save_details``: each image's
    values for ``MetricsSaver``).
    """


class ClassHausdorffDistance(_PerClass, HausdorffDistance):
    """Hausdorff distance per class (``percentile=95``: HD95; MONAI ``HausdorffDistance`` per image), averaged over
    the images where both prediction and ground truth have the class, in the units of each image's grid: MONAI's
    ``spacing`` is the voxel size of the label's affine (the prediction's where the label has no meta;
    :func:`grid_spacing`): mm on NIfTI and DICOM grids, pixels for PNG and for plain tensors.

    Args: ``class_names``, ``mean_name``, ``class_prefix`` (:class:`_PerClass`), ``num_classes`` (class-index maps
    with this many classes, background included, instead of one-hot channels:
    :class:`LabelMapHausdorffDistanceMetric`) and ``HausdorffDistance``'s (``percentile``, ``include_background``,
    ``output_transform``, ``save_details``).
    """

    def __init__(
        self, class_names: Sequence[str], mean_name: str | None = None, num_classes: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(class_names, mean_name, **kwargs)
        warnings.filterwarnings("ignore", message=_MASK_EDGES_DEPRECATION, category=FutureWarning)
        if num_classes is not None:
            one_hot = self.metric_fn
            self.metric_fn = LabelMapHausdorffDistanceMetric(
                num_classes, include_background=one_hot.include_background, distance_metric=one_hot.distance_metric,
                percentile=one_hot.percentile, directed=one_hot.directed, reduction=one_hot.reduction,
            )

    @reinit__is_reduced
    def update(self, output: Sequence[Any]) -> None:
        """MONAI's per-image distances with each image's ``spacing`` (:func:`grid_spacing` of its label, or of its
        prediction where the label is a plain tensor).

        Args:
            output: ``(y_pred, y)``: lists of channel-first images or batch-first tensors.

        Raises:
            ValueError: ``output`` is not a pair (MONAI's message).
        """
        if len(output) != 2:
            raise ValueError(f"output must have length 2, got {len(output)}.")
        y_pred, y = output
        for prediction, truth in zip(y_pred, y):
            grid = truth if isinstance(truth, MetaTensor) else prediction
            self.metric_fn([prediction], [truth], spacing=grid_spacing(grid, truth.ndim - 1))


class LabelMapHausdorffDistanceMetric(HausdorffDistanceMetric):
    """MONAI's ``HausdorffDistanceMetric`` on class-index maps (``B1HW[D]``): MONAI's computation on each class's
    masks in turn, the values of the one-hot channels without their classes x volume tensors.

    Args:
        num_classes: the classes, background included (class ``c`` is the voxels of value ``c``).
        kwargs: ``HausdorffDistanceMetric``'s (``include_background``, ``percentile``, ``directed``, ...).
    """

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        """The ``B x classes`` distances of ``y_pred`` and ``y`` (``B1HW[D]`` class indices; ``kwargs``:
        ``spacing``)."""
        settings = {"distance_metric": self.distance_metric, "percentile": self.percentile, "directed": self.directed}
        first = 0 if self.include_background else 1
        return torch.cat([
            compute_hausdorff_distance(y_pred == c, y == c, include_background=True, spacing=kwargs.get("spacing"),
                                       **settings)
            for c in range(first, self.num_classes)
        ], dim=1)


class ClassMetricsSaver(MetricsSaver):
    """MONAI's ``MetricsSaver`` whose per-image files (``<metric>_raw.csv`` of ``metric_details``) head the class
    columns with the classes' names where MONAI writes ``class0``, ``class1``, ...

    Args:
        class_names: the names of the scored classes, in the order of the details' columns (the foreground
            classes: ``class_names[1:]`` of a bundle).
        kwargs: ``MetricsSaver``'s (``save_dir``, ``metrics``, ``metric_details``, ``batch_transform``, ...).
    """

    def __init__(self, class_names: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.class_names = [str(name) for name in class_names]

    def __call__(self, engine: Engine) -> None:
        """MONAI's files, then each per-image file's header: ``filename``, the class names, ``mean``."""
        super().__call__(engine)
        if idist.get_rank() != self.save_rank:
            return
        header = io.StringIO()
        csv.writer(header, delimiter=self.deli, lineterminator="\n").writerow(["filename", *self.class_names, "mean"])
        for name in self.metric_details or ():
            path = Path(self.save_dir) / f"{name}_raw.csv"
            if not path.is_file():
                continue
            monai_header, _, rows = path.read_text().partition("\n")
            if monai_header.count(self.deli) == len(self.class_names) + 1:  # filename, the classes, mean
                atomic_write(path, lambda tmp, rows=rows: Path(tmp).write_text(header.getvalue() + rows))
