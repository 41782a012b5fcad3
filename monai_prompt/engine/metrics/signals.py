"""Warnings that a model learned nothing useful, in the training and evaluation log.

:class:`SignalLog` logs such a warning when its condition starts to hold (or changes), not again while it holds,
and one line when it clears, on rank 0 only. :class:`SegmentationCollapseHandler` uses it for a segmentation
evaluator: predictions that hold no foreground although the ground truth does, and classes of the ground truth
that are never predicted. The classification counterpart (a collapsed model, a model no better than the trivial
answer) is part of :class:`~monai_prompt.engine.metrics.classification.ClassReportHandler`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from monai.handlers import from_engine

__all__ = ["SEGMENTATION_ADVICE", "SegmentationCollapseHandler", "SignalLog"]

#: what to try when a segmentation bundle's model misses the foreground (the ids of its ``train.json``).
SEGMENTATION_ADVICE = (
    "Try more epochs (--train#trainer#max_epochs), another --learning_rate, more training crops centred on "
    "foreground (--train#random_transforms#1#pos 3: RandCropByPosNegLabeld samples pos:neg 1:1), check that the "
    "datalist's labels map names the values in the label maps (monai-prompt check-data), and that the pre-trained "
    "weights loaded (--pretrained)."
)


class SignalLog:
    """Warnings about a state that lasts several epochs: each is logged when it starts or changes, and an info
    line when it clears, so that a run that stays collapsed for 50 epochs says so once. Rank 0 only.

    Args:
        logger: where the lines go.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.active: dict[str, Hashable] = {}

    def report(self, epoch: int, key: str, warning: str | None, cleared: str, state: Hashable = True) -> None:
        """Log ``warning`` (``None``: the condition does not hold) unless signal ``key`` already warned it.

        Args:
            epoch: the engine's epoch, first in each line.
            key: the signal.
            warning: the message, or ``None``.
            cleared: the info line when ``key`` warned before and holds no more.
            state: what makes the warning new (e.g. the classes it names): a changed state warns again.
        """
        if warning is None:
            if self.active.pop(key, None) is not None and idist.get_rank() == 0:
                self.logger.info(f"epoch {epoch}: {cleared}")
            return
        if self.active.get(key) != state and idist.get_rank() == 0:
            self.logger.warning(f"epoch {epoch}: {warning}")
        self.active[key] = state


def _present(mask: Any, num_classes: int) -> torch.Tensor:
    """Voxels per class ``[C]`` (float64) of a one-hot ``[C, *spatial]`` or class-index ``[1, *spatial]`` mask."""
    mask = torch.as_tensor(mask).detach()
    if mask.shape[0] == num_classes:
        return (mask != 0).flatten(1).sum(1).double().cpu()
    return torch.bincount(mask.flatten().long(), minlength=num_classes)[:num_classes].double().cpu()


class SegmentationCollapseHandler:
    """Warns when a segmentation evaluator's predictions miss what the ground truth holds, over each epoch (the
    whole validation or evaluation set, summed over processes under DDP).

    - Every prediction is background although the ground truth of some images holds foreground: the model
      collapsed to background (Dice 0 for every class).
    - Otherwise, images whose ground truth holds foreground got a prediction of background only (how many).
    - Otherwise, classes in the ground truth that no prediction holds, by name, with the number of images that
      have them and their share of those images' voxels (a class that small is the first to be missed).

    Each warning ends with :data:`SEGMENTATION_ADVICE` and is logged as :class:`SignalLog` does: when it starts
    or changes, then once when it clears.

    Args:
        class_names: every class in channel order, background first (the bundles' ``class_names``).
        output_transform: engine output to ``(predictions, labels)``, lists of one-hot ``[C, *spatial]`` or
            class-index ``[1, *spatial]`` masks (default: the decollated ``pred`` and ``label``).
        name: logger name.
    """

    def __init__(
        self, class_names: Sequence[str], output_transform: Callable | None = None, name: str = "monai_prompt"
    ) -> None:
        self.class_names = [str(c) for c in class_names]
        self.output_transform = output_transform or from_engine(["pred", "label"])
        self.signals = SignalLog(logging.getLogger(name))
        self.reset()

    def reset(self) -> None:
        """Empty counts, at the start of each epoch."""
        #: per class: images whose ground truth has it, images whose prediction has it, its ground-truth voxels,
        #: the voxels of the images whose ground truth has it
        self.per_class = torch.zeros(4, len(self.class_names), dtype=torch.float64)
        #: images with foreground in the ground truth, and of those, images predicted as background only
        self.images = torch.zeros(2, dtype=torch.float64)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def iteration_completed(self, engine: Engine) -> None:
        predictions, labels = self.output_transform(engine.state.output)
        classes = len(self.class_names)
        for prediction, label in zip(predictions, labels):
            predicted, truth = _present(prediction, classes) > 0, _present(label, classes)
            has = truth > 0
            self.per_class += torch.stack([has.double(), predicted.double(), truth, has * truth.sum()])
            if has[1:].any():
                self.images += torch.tensor([1.0, float(not predicted[1:].any())], dtype=torch.float64)

    def epoch_completed(self, engine: Engine) -> None:
        stats = torch.cat([self.per_class.flatten(), self.images])
        if idist.get_world_size() > 1:
            stats = idist.all_reduce(stats.to(idist.device())).cpu()
        per_class, (with_foreground, empty) = stats[:-2].reshape(4, -1)[:, 1:], stats[-2:].long().tolist()
        collapsed = with_foreground > 0 and not per_class[1].any()
        missed = [
            f"{name!r} (in {int(images)} image(s), {100 * voxels / total:.3g} % of their voxels)"
            for name, (images, predicted, voxels, total) in zip(self.class_names[1:], per_class.T.tolist())
            if images > 0 and predicted == 0
        ]
        collapse = (f"every prediction is background, although the ground truth of {with_foreground} image(s) "
                    f"holds foreground: the model has collapsed to background (Dice 0 for every class).")
        background_only = (f"{empty} of {with_foreground} image(s) whose ground truth holds foreground got a "
                           f"prediction of background only.")
        never = f"class(es) {', '.join(missed)} of the ground truth are never predicted: their Dice is 0."
        report, epoch = self.signals.report, engine.state.epoch
        report(epoch, "background", f"{collapse} {SEGMENTATION_ADVICE}" if collapsed else None,
               "the predictions hold foreground again.")
        report(epoch, "empty", f"{background_only} {SEGMENTATION_ADVICE}" if empty and not collapsed else None,
               "every image whose ground truth holds foreground has a foreground prediction again.")
        report(epoch, "classes", f"{never} {SEGMENTATION_ADVICE}" if missed and not collapsed else None,
               "every class of the ground truth is predicted again.", state=tuple(missed))
