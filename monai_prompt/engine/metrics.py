"""Classification metrics for MONAI evaluators: decisions from probabilities, macro F1, quadratic-weighted kappa.

Evaluators keep ``pred`` as class probabilities (softmax, or sigmoid for multi-label) and ``label`` one-hot /
multi-hot, the form MONAI's ``ROCAUC`` needs. :func:`class_decisions` is the ``output_transform`` that gives
ignite's ``Accuracy``, ``Precision``/``Recall`` (:func:`macro_f1`) and :class:`QuadraticWeightedKappa` what they
expect: ``(probabilities, class index)`` for multi-class, ``(0/1 predictions, 0/1 labels)`` for multi-label.
Everything else is ignite's or MONAI's own; only the kappa is written here (ignite's ``CohenKappa`` needs
scikit-learn and hard labels).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from ignite.metrics import ConfusionMatrix, Fbeta, Precision, Recall

__all__ = ["QuadraticWeightedKappa", "class_decisions", "macro_f1", "quadratic_weighted_kappa"]


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
