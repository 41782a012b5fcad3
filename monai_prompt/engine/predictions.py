"""Inference outputs and the line that says where they went: each image's class probabilities and predicted class, as
a CSV file with a header row (:class:`PredictionSaver`), and the count of the masks ``SaveImaged`` wrote
(:class:`SavedMasks`). Each has a ``report()`` that the bundles' inference calls after the evaluator's run, so that
``inference: wrote <count> <what> to <absolute path>`` comes after ignite's ``Engine run finished`` and ends the
run's output (rank 0 only)."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from monai.handlers import from_engine

from monai_prompt.engine.eta import is_main_process
from monai_prompt.engine.handlers import batch_images
from monai_prompt.io import atomic_write

__all__ = ["PredictionSaver", "SavedMasks"]


def _report_written(logger: logging.Logger, count: int, what: str, where: str | os.PathLike) -> None:
    """Log ``inference: wrote <count> <what>(s) to <where, absolute>`` on rank 0 (quiet on the other ranks).

    Args:
        logger: where to log it.
        count: how many were written.
        what: what one of them is (``mask``, ``prediction row``).
        where: their folder or file.
    """
    if is_main_process():
        logger.info(f"inference: wrote {count} {what}{'' if count == 1 else 's'} to {os.path.abspath(where)}")


class PredictionSaver:
    """Write ``<output_dir>/<filename>``: a header row ``image,<class names...>,predicted``, then one row per image
    with its probabilities and predicted class (multi-class: the most probable; multi-label: the classes above
    ``threshold``, joined by ``;``), when the evaluator completes. The file is written atomically (a temporary file
    renamed into place), so a failed run leaves the previous predictions as they were. :meth:`report`, called after
    the run, logs the file's absolute path and its number of rows.

    MONAI's ``ClassificationSaver`` writes no header and no decision, and appends to its file as it goes.

    Args:
        output_dir: folder of the CSV file (created when missing).
        class_names: one name per class, in the order of the network's outputs.
        multi_label: independent (sigmoid) probabilities: threshold each class.
        threshold: multi-label decision threshold.
        filename: the CSV file's name.
        output_transform: decollated engine output to the batch's probabilities (default: ``pred``).
        name: logger name.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        class_names: Sequence[str],
        multi_label: bool = False,
        threshold: float = 0.5,
        filename: str = "predictions.csv",
        output_transform: Callable | None = None,
        name: str = "monai_prompt",
    ) -> None:
        self.path = Path(output_dir) / filename
        self.class_names = [str(name) for name in class_names]
        self.multi_label = multi_label
        self.threshold = threshold
        self.output_transform = output_transform or from_engine(["pred"])
        self.logger = logging.getLogger(name)
        self._rows: list[list[str]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def started(self, engine: Engine) -> None:
        self._rows = []

    def iteration_completed(self, engine: Engine) -> None:
        names = [name for name, _ in batch_images(engine.state.batch)]
        outputs = self.output_transform(engine.state.output)
        probabilities = torch.stack([torch.as_tensor(p).detach().float().cpu() for p in outputs])
        if probabilities.shape[1] != len(self.class_names):
            raise ValueError(
                f"the network predicts {probabilities.shape[1]} classes but {len(self.class_names)} class names "
                f"{self.class_names} are given; set --class_names (or --num_classes) to match the trained model."
            )
        for name, probs in zip(names, probabilities):
            self._rows.append([name, *(f"{float(p):.6f}" for p in probs), self._decision(probs)])

    def _decision(self, probs: torch.Tensor) -> str:
        if self.multi_label:
            return ";".join(name for name, p in zip(self.class_names, probs) if float(p) > self.threshold)
        return self.class_names[int(probs.argmax())]

    def completed(self, engine: Engine) -> None:
        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerow(["image", *self.class_names, "predicted"])
                writer.writerows(self._rows)

        atomic_write(self.path, write)

    def report(self) -> None:
        """Log ``inference: wrote <rows> prediction rows to <path>`` (:func:`_report_written`)."""
        _report_written(self.logger, len(self._rows), "prediction row", self.path)


class SavedMasks:
    """Count the masks that ``SaveImaged`` (with ``savepath_in_metadict=True``, which leaves each file's path in its
    prediction's meta as ``saved_to``) writes during an evaluator's run; :meth:`report`, called after the run, logs
    how many and their folder: ``inference: wrote 12 masks to /abs/eval/masks``.

    Args:
        output_dir: the masks' folder (``SaveImaged``'s ``output_dir``; a mask may sit in a subfolder of it).
        output_key: the key ``SaveImaged`` saves, in each decollated output.
        name: logger name.
    """

    def __init__(self, output_dir: str | os.PathLike, output_key: str = "pred", name: str = "monai_prompt") -> None:
        self.output_dir = output_dir
        self.output_transform = from_engine([output_key])
        self.logger = logging.getLogger(name)
        self.saved: set[str] = set()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)

    def started(self, engine: Engine) -> None:
        self.saved = set()

    def iteration_completed(self, engine: Engine) -> None:
        for mask in self.output_transform(engine.state.output):
            saved = getattr(mask, "meta", {}).get("saved_to")
            if saved is not None:
                self.saved.add(str(saved))

    def report(self) -> None:
        """Log ``inference: wrote <count> masks to <output_dir>`` (:func:`_report_written`)."""
        _report_written(self.logger, len(self.saved), "mask", self.output_dir)
