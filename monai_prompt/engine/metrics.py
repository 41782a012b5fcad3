"""Classification metrics for MONAI evaluators: decisions from probabilities, macro F1, quadratic-weighted kappa.

Evaluators keep ``pred`` as class probabilities (softmax, or sigmoid for multi-label) and ``label`` one-hot /
multi-hot, the form MONAI's ``ROCAUC`` needs. :func:`class_decisions` is the ``output_transform`` that gives
ignite's ``Accuracy``, ``Precision``/``Recall`` (:func:`macro_f1`) and :class:`QuadraticWeightedKappa` what they
expect: ``(probabilities, class index)`` for multi-class, ``(0/1 predictions, 0/1 labels)`` for multi-label.
Everything else is ignite's or MONAI's own; only the kappa is written here (ignite's ``CohenKappa`` needs
scikit-learn and hard labels). :class:`ClassReportHandler` accumulates ignite's confusion matrix over an
evaluator's epoch, writes per-class precision/recall/F1 and the matrix as CSV files, and warns when every
prediction is the same (a collapsed model).
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.metrics import ConfusionMatrix, Fbeta, MultiLabelConfusionMatrix, Precision, Recall

__all__ = [
    "ClassReportHandler",
    "QuadraticWeightedKappa",
    "class_decisions",
    "macro_f1",
    "per_class_scores",
    "quadratic_weighted_kappa",
]


def class_decisions(multi_label: bool = False, threshold: float = 0.5) -> Callable[[Sequence[dict]], tuple]:
    """``output_transform`` from decollated ``[{"pred": probabilities, "label": one-hot}]`` engine output to
    batched tensors.

    Args:
        multi_label: threshold each class (``pred > threshold``) instead of keeping probabilities and the
            label's class index.
        threshold: decision threshold for multi-label.
    """

    def transform(output: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        preds = torch.stack([torch.as_tensor(item["pred"]) for item in output])
        labels = torch.stack([torch.as_tensor(item["label"]) for item in output]).to(preds.device)
        if multi_label:
            return (preds > threshold).long(), (labels > 0.5).long()
        return preds, labels.argmax(dim=1) if labels.ndim == 2 else labels.long()

    return transform


def macro_f1(multi_label: bool = False, output_transform: Callable = lambda x: x) -> Fbeta:
    """ignite ``Fbeta(beta=1)`` averaged over classes (macro F1), for multi-class or multi-label decisions."""
    precision = Precision(average=False, is_multilabel=multi_label, output_transform=output_transform)
    recall = Recall(average=False, is_multilabel=multi_label, output_transform=output_transform)
    return Fbeta(beta=1.0, average=True, precision=precision, recall=recall)


def quadratic_weighted_kappa(confusion: torch.Tensor) -> float:
    """Cohen's kappa with quadratic weights from a confusion matrix (rows: truth, columns: prediction).

    ``1 - sum(W * O) / sum(W * E)`` with ``W[i, j] = (i - j)^2 / (C - 1)^2``, observed ``O`` and the chance
    matrix ``E = outer(row sums, column sums) / N``. 1 is perfect agreement, 0 chance level.
    """
    observed = confusion.double()
    classes = observed.shape[0]
    index = torch.arange(classes, dtype=torch.float64)
    weights = (index[:, None] - index[None, :]) ** 2 / max(classes - 1, 1) ** 2
    expected = observed.sum(1, keepdim=True) * observed.sum(0, keepdim=True) / observed.sum().clamp_min(1)
    disagreement = (weights * expected).sum()
    if disagreement == 0:
        return 1.0 if (weights * observed).sum() == 0 else 0.0
    return float(1.0 - (weights * observed).sum() / disagreement)


class QuadraticWeightedKappa(ConfusionMatrix):
    """Quadratic-weighted Cohen's kappa over ordered classes (the metric DVPT reports), as an ignite metric.

    Accumulates ignite's confusion matrix (summed over processes under DDP) and applies
    :func:`quadratic_weighted_kappa`. Inputs are ``(probabilities [B, C], class index [B])``.

    Args:
        num_classes: number of classes.
        output_transform: e.g. :func:`class_decisions`.
        device: where the confusion matrix is accumulated.
    """

    def __init__(
        self, num_classes: int, output_transform: Callable = lambda x: x, device: str | torch.device = "cpu"
    ) -> None:
        super().__init__(num_classes=num_classes, output_transform=output_transform, device=device)

    def compute(self) -> float:
        return quadratic_weighted_kappa(super().compute())


def per_class_scores(confusion: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-class ``precision``, ``recall``, ``f1``, ``support`` (true count) and ``predicted`` (predicted count).

    Args:
        confusion: ``[C, C]`` multi-class matrix (rows: truth, columns: prediction), or ignite's multi-label
            ``[C, 2, 2]`` (per class ``[[tn, fp], [fn, tp]]``).

    A ratio whose denominator is 0 (a class never predicted, or absent) is 0, as scikit-learn's default.
    """
    counts = confusion.double()
    if counts.ndim == 3:
        tp, predicted, support = counts[:, 1, 1], counts[:, :, 1].sum(1), counts[:, 1, :].sum(1)
    else:
        tp, predicted, support = counts.diagonal(), counts.sum(0), counts.sum(1)

    def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))

    precision, recall = ratio(tp, predicted), ratio(tp, support)
    return {
        "precision": precision,
        "recall": recall,
        "f1": ratio(2 * precision * recall, precision + recall),
        "support": support,
        "predicted": predicted,
    }


class ClassReportHandler:
    """Per-class precision/recall/F1 and the confusion matrix of an evaluator's epoch; warns on a collapsed model.

    Each epoch it accumulates ignite's ``ConfusionMatrix`` (``MultiLabelConfusionMatrix`` for multi-label;
    summed over processes under DDP) and, when every image gets the same prediction although the labels differ,
    logs a warning (the model collapsed to one class: lower the learning rate, check the class balance). With
    ``output_dir`` it also writes ``<prefix>class_report.csv`` (class, precision, recall, f1, support, predicted)
    and ``<prefix>confusion_matrix.csv`` (multi-class: rows truth, columns prediction; multi-label: tn, fp, fn,
    tp per class) beside MONAI's ``metrics.csv``, on rank 0.

    Args:
        num_classes: number of classes.
        class_names: names for the rows (default: the class indices).
        multi_label: multi-hot labels.
        output_dir: folder for the CSV files (None: only the collapse warning).
        filename_prefix: prefix of the file names.
        output_transform: decollated engine output to ``(decisions, labels)`` (default:
            :func:`class_decisions` for ``multi_label``).
        name: logger name.
    """

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        multi_label: bool = False,
        output_dir: str | os.PathLike | None = None,
        filename_prefix: str = "",
        output_transform: Callable | None = None,
        name: str = "monai_prompt",
    ) -> None:
        self.class_names = (
            [str(c) for c in class_names] if class_names is not None else [str(c) for c in range(num_classes)]
        )
        if len(self.class_names) != num_classes:
            raise ValueError(f"{len(self.class_names)} class_names {self.class_names} for num_classes={num_classes}.")
        self.multi_label = multi_label
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.filename_prefix = filename_prefix
        self.output_transform = output_transform or class_decisions(multi_label)
        self.confusion = (MultiLabelConfusionMatrix if multi_label else ConfusionMatrix)(num_classes)
        self.logger = logging.getLogger(name)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def epoch_started(self, engine: Engine) -> None:
        self.confusion.reset()

    def iteration_completed(self, engine: Engine) -> None:
        self.confusion.update(self.output_transform(engine.state.output))

    def epoch_completed(self, engine: Engine) -> None:
        confusion = self.confusion.compute().cpu()
        self._warn_if_collapsed(engine, confusion)
        if self.output_dir is not None and idist.get_rank() == 0:
            self._write(confusion)

    def _warn_if_collapsed(self, engine: Engine, confusion: torch.Tensor) -> None:
        scores = per_class_scores(confusion)
        total = int(confusion[0].sum()) if self.multi_label else int(confusion.sum())
        predicted, support = scores["predicted"], scores["support"]
        if self.multi_label:  # same label set for every image: each class predicted for all or none
            same = bool(((predicted == 0) | (predicted == total)).all())
            varied = bool(((support > 0) & (support < total)).any())
            decision = [name for name, n in zip(self.class_names, predicted) if n == total]
            what = f"the same labels {decision}"
        else:
            same = int((predicted > 0).sum()) == 1
            varied = int((support > 0).sum()) > 1
            what = f"class {self.class_names[int(predicted.argmax())]!r}"
        if total > 1 and same and varied:
            self.logger.warning(
                f"epoch {engine.state.epoch}: all {total} predictions are {what} although the labels differ: the "
                f"model has collapsed to one answer. Lower the learning rate, check the class balance of the "
                f"training data, and check that the pre-trained weights loaded."
            )

    def _write(self, confusion: torch.Tensor) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        scores = per_class_scores(confusion)
        with open(self.output_dir / f"{self.filename_prefix}class_report.csv", "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["class", "precision", "recall", "f1", "support", "predicted"])
            for i, name in enumerate(self.class_names):
                row = [f"{float(scores[key][i]):.4f}" for key in ("precision", "recall", "f1")]
                writer.writerow([name, *row, int(scores["support"][i]), int(scores["predicted"][i])])
        with open(self.output_dir / f"{self.filename_prefix}confusion_matrix.csv", "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            if self.multi_label:
                writer.writerow(["class", "tn", "fp", "fn", "tp"])
                writer.writerows(
                    [name, *[int(v) for v in confusion[i].flatten()]] for i, name in enumerate(self.class_names)
                )
            else:
                writer.writerow(["truth \\ prediction", *self.class_names])
                writer.writerows([name, *[int(v) for v in confusion[i]]] for i, name in enumerate(self.class_names))
