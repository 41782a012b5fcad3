"""Warnings that a model learned nothing useful, in the training and evaluation log.

:class:`SignalLog` logs such a warning when its condition starts to hold (or changes), not again while it holds,
and one line when it clears, on rank 0 only. :class:`SegmentationCollapseHandler` uses it for a segmentation
evaluator: predictions that hold no foreground although the ground truth does, classes of the ground truth that
are never predicted, and classes predicted only where the ground truth does not have them. The classification
counterpart (a collapsed model, a model no better than chance) is part of
:class:`~monai_prompt.engine.metrics.classification.ClassReportHandler`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from monai.handlers import from_engine

__all__ = ["MISPLACED_ADVICE", "SEGMENTATION_ADVICE", "SegmentationCollapseHandler", "SignalLog"]

#: what to try when a segmentation bundle's model misses the foreground (the ids of its ``train.json``).
SEGMENTATION_ADVICE = (
    "Try more epochs (--train#trainer#max_epochs), another --learning_rate, more training crops centred on "
    "foreground (--train#random_transforms#1#pos 3: RandCropByPosNegLabeld samples pos:neg 1:1), check that the "
    "datalist's labels map names the values in the label maps (monai-prompt check-data), and that the pre-trained "
    "weights loaded (--pretrained)."
)

#: what a class predicted only where the ground truth does not have it points at, before :data:`SEGMENTATION_ADVICE`.
MISPLACED_ADVICE = (
    "Labels that do not match their images give this: check that the datalist's labels map gives each class its "
    "value in the label maps (two classes swapped?) and that each label map lies on its image (monai-prompt "
    "check-data compares their affines; a label array flipped against its image keeps the affine); otherwise the "
    "model has not learnt where the class is yet."
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

    def drop(self, *keys: str) -> None:
        """Forget signals ``keys`` without a line (a graver warning stands for them), so that they warn again."""
        for key in keys:
            self.active.pop(key, None)


def _class_index(mask: Any, num_classes: int) -> torch.Tensor:
    """The flat class index of each voxel of a one-hot ``[C, *spatial]`` or class-index ``[1, *spatial]`` mask."""
    mask = torch.as_tensor(mask).detach()
    return mask.flatten(1).argmax(0) if mask.shape[0] == num_classes else mask.flatten().long()


def _voxels(index: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Voxels per class ``[C]`` (float64, on the CPU) of flat class indices (values from ``C`` on: none)."""
    return torch.bincount(index, minlength=num_classes)[:num_classes].double().cpu()


class SegmentationCollapseHandler:
    """Warns when a segmentation evaluator's predictions miss what the ground truth holds, over each epoch (the
    whole validation or evaluation set, summed over processes under DDP).

    - Every prediction is background although the ground truth of some images holds foreground: the model
      collapsed to background (Dice 0 for every class).
    - Otherwise, images whose ground truth holds foreground got a prediction of background only (how many).
    - Otherwise, classes in the ground truth that no prediction holds, by name, with the number of images that
      have them and their share of those images' voxels (a class that small is the first to be missed).
    - Otherwise, classes in the ground truth that are predicted, but never on a voxel of theirs, by name, with the
      number of images that have them and that it is predicted in: their Dice is 0 for every image, while the
      HD95 of an image that has and gets the class is finite (the prediction is elsewhere). :data:`MISPLACED_ADVICE`
      says what that points at.

    Each warning ends with :data:`SEGMENTATION_ADVICE` and is logged as :class:`SignalLog` does: when it starts
    or changes, then once when it clears. While the model has collapsed to background, the other warnings are
    dropped without a line (they would say they cleared), to warn afresh should they still hold after it.

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
        #: the voxels of the images whose ground truth has it, its voxels in both the prediction and the ground truth
        self.per_class = torch.zeros(5, len(self.class_names), dtype=torch.float64)
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
            predicted, truth = _class_index(prediction, classes), _class_index(label, classes)
            truth = truth.to(predicted.device)
            overlap = _voxels(truth[predicted == truth], classes)
            predicted, truth = _voxels(predicted, classes) > 0, _voxels(truth, classes)
            has = truth > 0
            self.per_class += torch.stack([has.double(), predicted.double(), truth, has * truth.sum(), overlap])
            if has[1:].any():
                self.images += torch.tensor([1.0, float(not predicted[1:].any())], dtype=torch.float64)

    def epoch_completed(self, engine: Engine) -> None:
        stats = torch.cat([self.per_class.flatten(), self.images])
        if idist.get_world_size() > 1:
            stats = idist.all_reduce(stats.to(idist.device())).cpu()
        per_class, (with_foreground, empty) = stats[:-2].reshape(5, -1)[:, 1:], stats[-2:].long().tolist()
        collapsed = with_foreground > 0 and not per_class[1].any()
        counts = list(zip(self.class_names[1:], per_class.T.tolist()))
        missed = [
            f"{name!r} (in {int(images)} image(s), {100 * voxels / total:.3g} % of their voxels)"
            for name, (images, predicted, voxels, total, _) in counts if images > 0 and predicted == 0
        ]
        misplaced = [
            f"{name!r} (in {int(images)} image(s), predicted in {int(predicted)})"
            for name, (images, predicted, _, _, overlap) in counts if images > 0 and predicted > 0 and overlap == 0
        ]
        collapse = (f"every prediction is background, although the ground truth of {with_foreground} image(s) "
                    f"holds foreground: the model has collapsed to background (Dice 0 for every class).")
        background_only = (f"{empty} of {with_foreground} image(s) whose ground truth holds foreground got a "
                           f"prediction of background only.")
        never = f"class(es) {', '.join(missed)} of the ground truth are never predicted: their Dice is 0."
        elsewhere = (f"class(es) {', '.join(misplaced)} of the ground truth are predicted only where the ground truth "
                     f"does not have them: their Dice is 0 although they are predicted.")
        report, epoch = self.signals.report, engine.state.epoch
        report(epoch, "background", f"{collapse} {SEGMENTATION_ADVICE}" if collapsed else None,
               "the predictions hold foreground again.")
        if collapsed:
            self.signals.drop("empty", "classes", "misplaced")
            return
        report(epoch, "empty", f"{background_only} {SEGMENTATION_ADVICE}" if empty else None,
               "every image whose ground truth holds foreground has a foreground prediction again.")
        report(epoch, "classes", f"{never} {SEGMENTATION_ADVICE}" if missed else None,
               "every class of the ground truth is predicted again.", state=tuple(missed))
        report(epoch, "misplaced", f"{elsewhere} {MISPLACED_ADVICE} {SEGMENTATION_ADVICE}" if misplaced else None,
               "no class is predicted only where the ground truth does not have it any more.", state=tuple(misplaced))
