"""Inference output: each image's class probabilities and predicted class, as a CSV file with a header row."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from monai.handlers import from_engine

from monai_prompt.engine.handlers import batch_images
from monai_prompt.io import atomic_write

__all__ = ["PredictionSaver"]


class PredictionSaver:
    """Write ``<output_dir>/<filename>``: a header row ``image,<class names...>,predicted``, then one row per image
    with its probabilities and predicted class (multi-class: the most probable; multi-label: the classes above
    ``threshold``, joined by ``;``), when the evaluator completes. The file is written atomically (a temporary file
    renamed into place), so a failed run leaves the previous predictions as they were.

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
        self.logger.info(f"predictions of {len(self._rows)} images written to {self.path}")
