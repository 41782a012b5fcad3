"""Classification metrics for MONAI evaluators: decisions from probabilities, macro F1, quadratic-weighted kappa.

Evaluators keep ``pred`` as class probabilities (softmax, or sigmoid for multi-label) and ``label`` one-hot /
multi-hot, the form MONAI's ``ROCAUC`` needs. :func:`class_decisions` is the ``output_transform`` that gives
ignite's ``Accuracy``, ``Precision``/``Recall`` (:func:`macro_f1`) and :class:`QuadraticWeightedKappa` what they
expect: ``(probabilities, class index)`` for multi-class, ``(0/1 predictions, 0/1 labels)`` for multi-label.
Everything else is ignite's or MONAI's own; only the kappa is written here (ignite's ``CohenKappa`` needs
scikit-learn and hard labels). :class:`ClassReportHandler` accumulates ignite's confusion matrix over an
evaluator's epoch, writes per-class precision/recall/F1 and the matrix as CSV files, and warns when every
prediction is the same (a collapsed model) or the model does no better than chance (:func:`balanced_accuracy_chance`,
:func:`macro_auc_chance_error`). It also measures
the expected calibration error (:func:`expected_calibration_error`, Guo et al. 2017) into the engine's metrics
(``ece``) and draws the reliability diagram (:func:`plot_reliability_diagram`).
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics import ConfusionMatrix, Fbeta, MultiLabelConfusionMatrix, Precision, Recall

from monai_prompt.engine.metrics.signals import SignalLog

__all__ = [
    "ClassReportHandler",
    "QuadraticWeightedKappa",
    "calibration_histogram",
    "class_decisions",
    "confidence_and_correct",
    "balanced_accuracy_chance",
    "ece_from_histogram",
    "expected_calibration_error",
    "macro_auc_chance_error",
    "macro_f1",
    "per_class_scores",
    "plot_reliability_diagram",
    "quadratic_weighted_kappa",
]

#: confidence bins of the expected calibration error (Guo et al. 2017 use 15 equal-width bins).
ECE_BINS = 15
#: level of the tests against chance: a model whose answers are independent of the labels escapes the warning in
#: about 1 evaluation in 20.
CHANCE_LEVEL = 0.05
#: one-sided normal quantile of :data:`CHANCE_LEVEL` (the multi-label AUC's test).
CHANCE_Z = 1.645
#: random pairings of the single-label test (:func:`balanced_accuracy_chance`; its p-value near 0.05 is then
#: within about 0.005).
CHANCE_PERMUTATIONS = 2000
#: the pairings drawn first: when none reaches the model, the p-value is below 0.005 and the rest are not drawn (a
#: model whose true p-value is 0.05 or more passes them all with probability at most 0.95 ** 200, 4e-5).
CHANCE_FIRST_PERMUTATIONS = 200
#: what the decisions of a model at chance point at when its probabilities rank the images well.
RANKING_ADVICE = (
    "Give the training split about as many images of each class (or more epochs, so that the rarer classes win "
    "their images)."
)
#: what to try when a classification bundle's model does no better than chance.
TRIVIAL_ADVICE = (
    "Try more epochs (--train#trainer#max_epochs) or another --learning_rate, check that the labels belong to the "
    "images (monai-prompt check-data) and that the pre-trained weights loaded (--pretrained)."
)


def _stacked(output: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Decollated ``[{"pred", "label"}]`` engine output as batched ``(pred, label)`` tensors on ``pred``'s device."""
    preds = torch.stack([torch.as_tensor(item["pred"]) for item in output])
    return preds, torch.stack([torch.as_tensor(item["label"]) for item in output]).to(preds.device)


def class_decisions(multi_label: bool = False, threshold: float = 0.5) -> Callable[[Sequence[dict]], tuple]:
    """``output_transform`` from decollated ``[{"pred": probabilities, "label": one-hot}]`` engine output to
    batched tensors.

    Args:
        multi_label: threshold each class (``pred > threshold``) instead of keeping probabilities and the
            label's class index.
        threshold: decision threshold for multi-label.
    """

    def transform(output: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        preds, labels = _stacked(output)
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


def confidence_and_correct(
    probabilities: torch.Tensor, labels: torch.Tensor, multi_label: bool = False, threshold: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """The confidence of each decision and whether it is right, the inputs of the expected calibration error.

    Multi-class: the decision is the arg-max class and its confidence the largest probability. Multi-label: each
    (image, class) pair is one binary decision (``p > threshold``) with confidence ``max(p, 1 - p)``, so the error
    is that of all per-class decisions pooled.

    Args:
        probabilities: ``[B, C]`` softmax (multi-class) or sigmoid (multi-label) outputs.
        labels: ``[B, C]`` one-hot / multi-hot, or ``[B]`` class indices (multi-class).
        multi_label: multi-hot labels.
        threshold: decision threshold for multi-label.

    Returns:
        flat float64 ``confidence`` and 0/1 ``correct`` tensors of the same length.
    """
    probabilities = probabilities.detach().double()
    if multi_label:
        decided = probabilities > threshold
        confidence = torch.where(decided, probabilities, 1 - probabilities)
        return confidence.flatten(), (decided == (labels > 0.5)).double().flatten()
    index = labels.argmax(dim=1) if labels.ndim == 2 else labels.long()
    confidence, predicted = probabilities.max(dim=1)
    return confidence, (predicted == index.to(predicted.device)).double()


def calibration_histogram(
    confidence: torch.Tensor, correct: torch.Tensor, num_bins: int = ECE_BINS
) -> torch.Tensor:
    """Per-bin ``[count, confidence sum, correct sum]`` (``[3, num_bins]``, float64) over equal-width confidence bins
    ``((m - 1) / M, m / M]`` (a confidence of 0 falls in the first); histograms of batches add up.

    Args:
        confidence: flat confidences in [0, 1] (:func:`confidence_and_correct`).
        correct: flat 0/1 correctness.
        num_bins: ``M``.
    """
    confidence, correct = confidence.detach().double().flatten().cpu(), correct.detach().double().flatten().cpu()
    index = (torch.ceil(confidence * num_bins).long() - 1).clamp(0, num_bins - 1)
    histogram = torch.zeros(3, num_bins, dtype=torch.float64)
    for row, values in enumerate((torch.ones_like(confidence), confidence, correct)):
        histogram[row].index_add_(0, index, values)
    return histogram


def ece_from_histogram(histogram: torch.Tensor) -> float:
    """``sum_m |correct_m - confidence_m| / N`` from :func:`calibration_histogram`: the bins' gaps between accuracy
    and mean confidence, weighted by their share of the decisions (NaN when there are none)."""
    total = float(histogram[0].sum())
    return float((histogram[2] - histogram[1]).abs().sum() / total) if total > 0 else float("nan")


def expected_calibration_error(
    probabilities: torch.Tensor, labels: torch.Tensor, num_bins: int = ECE_BINS, multi_label: bool = False
) -> float:
    """Expected calibration error (Guo et al., ICML 2017) with ``num_bins`` equal-width confidence bins.

    Args:
        probabilities: ``[B, C]`` class probabilities.
        labels: ``[B, C]`` one-hot / multi-hot or ``[B]`` class indices.
        num_bins: number of bins (15, as Guo et al.).
        multi_label: pool the per-class binary decisions (:func:`confidence_and_correct`).
    """
    return ece_from_histogram(calibration_histogram(*confidence_and_correct(probabilities, labels, multi_label),
                                                    num_bins))


def plot_reliability_diagram(histogram: torch.Tensor, path: str | os.PathLike, title: str = "") -> Path:
    """Write the reliability diagram of :func:`calibration_histogram` to a PNG: accuracy per confidence bin (bars),
    the gap to each bin's mean confidence (red), the diagonal of perfect calibration, the ECE, and the share of the
    decisions per bin below.

    Args:
        histogram: ``[3, M]`` counts, confidence sums and correct sums.
        path: the PNG file.
        title: first line of the title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count, confidence, correct = histogram.double()
    bins = count.numel()
    edges = torch.linspace(0, 1, bins + 1)
    centres = ((edges[:-1] + edges[1:]) / 2).numpy()
    filled = count > 0
    accuracy = torch.where(filled, correct / count.clamp_min(1), torch.zeros_like(count)).numpy()
    mean_confidence = torch.where(filled, confidence / count.clamp_min(1), torch.zeros_like(count)).numpy()
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(4.5, 5.5), height_ratios=(3, 1), sharex=True)
    top.bar(centres, accuracy, width=1 / bins, edgecolor="black", color="tab:blue", label="accuracy")
    gap_bottom = [min(a, c) for a, c in zip(accuracy, mean_confidence)]
    gap = [abs(a - c) if f else 0.0 for a, c, f in zip(accuracy, mean_confidence, filled.tolist())]
    top.bar(centres, gap, bottom=gap_bottom, width=1 / bins, color="tab:red", alpha=0.4, label="gap to confidence")
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    top.set_title(f"{title + chr(10) if title else ''}ECE {ece_from_histogram(histogram):.4f} ({bins} bins, "
                  f"{int(count.sum())} decisions)", fontsize=9)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centres, (count / count.sum().clamp_min(1)).numpy(), width=1 / bins, color="gray", edgecolor="black")
    bottom.set(xlabel="confidence", ylabel="share")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


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


def balanced_accuracy_chance(
    confusion: torch.Tensor, permutations: int = CHANCE_PERMUTATIONS, seed: int = 0
) -> tuple[float, int, float, float]:
    """The balanced accuracy of a multi-class confusion matrix and a permutation test of it against chance.

    The balanced accuracy is the mean recall over the ``K`` classes present (Brodersen et al., "The balanced accuracy
    and its posterior distribution", ICPR 2010): ``1 / K`` on average for any answer independent of the image,
    whatever the class balance, where the accuracy of such an answer reaches the share of the most frequent class.
    The test pairs the same predictions with the same labels at random (the null hypothesis that they are
    independent, conditioned on both margins as Fisher's exact test is; a label permutation test as in Ojala and
    Garriga, "Permutation tests for studying classifier performance", JMLR 2010, for a fixed classifier): each
    random pairing's confusion matrix is drawn exactly, row by row, from (multivariate) hypergeometric
    distributions. How far chance reaches thus follows the images of each class and how the predictions spread
    over the classes, which a normal approximation gets wrong for rare classes and small splits.

    Args:
        confusion: ``[C, C]`` counts, rows truth, columns prediction.
        permutations: random pairings drawn (the cost is ``permutations`` draws per cell: 0.2 s for 20 classes, 5 s
            for 100), of which only the first :data:`CHANCE_FIRST_PERMUTATIONS` when none of them reaches the model.
        seed: of the draws (the same matrix gives the same answer).

    Returns:
        ``(balanced accuracy, K, p-value, 95th percentile of the pairings' balanced accuracies)``, the p-value being
        ``(1 + pairings at least as good) / (1 + pairings drawn)``; nan with ``K`` 0 for an empty matrix.
    """
    counts = confusion.long().cpu().numpy()
    support = counts.sum(1)
    present = support > 0
    if not present.any():
        return float("nan"), 0, float("nan"), float("nan")
    balanced = float((counts.diagonal()[present] / support[present]).mean())
    rng = np.random.default_rng(seed)
    chance = _chance_balanced_accuracies(counts, min(permutations, CHANCE_FIRST_PERMUTATIONS), rng)
    if (chance >= balanced - 1e-12).any():  # not clearly above chance: draw the rest
        chance = np.concatenate([chance, _chance_balanced_accuracies(counts, permutations - len(chance), rng)])
    p_value = (1 + int((chance >= balanced - 1e-12).sum())) / (1 + len(chance))
    return balanced, int(present.sum()), p_value, float(np.quantile(chance, 0.95))


def _chance_balanced_accuracies(counts: np.ndarray, permutations: int, rng: np.random.Generator) -> np.ndarray:
    """The balanced accuracies of ``permutations`` random pairings of the predictions with the labels of the
    confusion ``counts`` (:func:`balanced_accuracy_chance`), each drawn row by row from hypergeometric distributions.
    """
    support = counts.sum(1)
    present = np.flatnonzero(support)
    pool = np.tile(counts.sum(0), (permutations, 1))  # per pairing, the predictions not yet given a label
    recalls = np.zeros(permutations)
    for row in present:
        left = np.full(permutations, support[row])  # labels of class ``row`` still to pair
        rest = pool.sum(1)  # the predictions of the columns after ``column``
        for column in np.flatnonzero(counts.sum(0)):
            rest -= pool[:, column]
            drawn = rng.hypergeometric(pool[:, column], rest, left)
            pool[:, column] -= drawn
            left -= drawn
            if column == row:
                recalls += drawn / support[row]
    return recalls / len(present)


def macro_auc_chance_error(positives: torch.Tensor, negatives: torch.Tensor, independent: bool = True) -> float:
    """The standard error of a macro AUC (the mean one-vs-rest ROC AUC over classes) when the probabilities are
    independent of the labels: each class's AUC is then a Mann-Whitney U statistic over ``n1`` positives and ``n0``
    negatives, of mean 0.5 and variance ``(n1 + n0 + 1) / (12 n1 n0)`` (Mann and Whitney 1947; Hanley and McNeil,
    Radiology 1982). Classes without positives or negatives have no AUC and are left out (nan when none is left).

    Args:
        positives: ``[C]`` images with each class.
        negatives: ``[C]`` images without it.
        independent: the classes' AUCs are taken as independent (multi-label); else, for the one-vs-rest AUCs of
            one softmax, which move together (two classes: the same AUC twice), the bound that holds whatever their
            correlation, the mean of their standard errors (the standard deviation of a mean is at most the mean
            of the standard deviations).
    """
    n1, n0 = positives.double(), negatives.double()
    scored = (n1 > 0) & (n0 > 0)
    if not scored.any():
        return float("nan")
    variance = (n1[scored] + n0[scored] + 1) / (12 * n1[scored] * n0[scored])
    return float(variance.sum().sqrt() / int(scored.sum()) if independent else variance.sqrt().mean())


class ClassReportHandler:
    """Per-class precision/recall/F1 and the confusion matrix of an evaluator's epoch; warns on a collapsed model.

    Each epoch it accumulates ignite's ``ConfusionMatrix`` (``MultiLabelConfusionMatrix`` for multi-label;
    summed over processes under DDP) and, when every image gets the same prediction although the labels differ,
    logs a warning (the model collapsed to one class: another learning rate, the class balance). Otherwise,
    on a split of at least ``min_images`` images, it warns when the model does no better than chance, by a
    one-sided test at the :data:`CHANCE_LEVEL` (5 %) level: single-label, when the balanced accuracy (mean recall
    over the classes present) is not above what random pairings of the same predictions with the same labels reach
    (:func:`balanced_accuracy_chance`, a permutation test), whatever the class balance, so that a model that guesses
    with the class frequencies on an unbalanced split, its accuracy near the majority share, is named; multi-label,
    when the macro AUC (``auc_name``) is not above 0.5 by :data:`CHANCE_Z` of its standard errors under chance
    (:func:`macro_auc_chance_error`). A model better than chance by less than the split can show is warned about
    too: the split cannot tell it from guessing. A single-label model whose decisions are at chance while its macro
    AUC is above what random probabilities reach (the one-vs-rest AUCs taken as correlated) is told that its
    probabilities rank the images and that the rarer classes lose their images (:data:`RANKING_ADVICE`). That
    warning is logged as :class:`~monai_prompt.engine.metrics.signals.SignalLog` does: once while it holds, a line
    when it clears. Warnings are logged on rank 0 only. With
    ``output_dir`` it also writes ``<prefix>class_report.csv`` (class, precision, recall, f1, support, predicted)
    and ``<prefix>confusion_matrix.csv`` (multi-class: rows truth, columns prediction; multi-label: tn, fp, fn,
    tp per class) beside MONAI's ``metrics.csv``, on rank 0.

    It also accumulates the calibration histogram of the probabilities (:func:`calibration_histogram`) and puts the
    expected calibration error into ``engine.state.metrics[ece_name]`` after every iteration, so that handlers
    attached before it (MONAI's ``MetricsSaver``, ``StatsHandler``) already see the epoch's value at
    ``EPOCH_COMPLETED``, and MLflow logs it as any metric. Under DDP the all-process value replaces it at the end of
    the epoch. With ``output_dir``: ``<prefix>calibration.csv`` (per bin: bounds, count, mean confidence,
    accuracy) and the reliability diagram ``<prefix>reliability.png``.

    Args:
        num_classes: number of classes.
        class_names: names for the rows (default: the class indices).
        multi_label: multi-hot labels.
        output_dir: folder for the CSV files (None: only the collapse warning).
        filename_prefix: prefix of the file names.
        output_transform: decollated engine output to ``(decisions, labels)`` (default:
            :func:`class_decisions` for ``multi_label``).
        name: logger name.
        num_bins: confidence bins of the calibration error.
        ece_name: the metric name of the calibration error (``engine.state.metrics``).
        auc_name: the engine's macro AUC metric (``engine.state.metrics``; None: none), shown in the trivial-answer
            warning and the multi-label rule.
        min_images: the fewest images of a split that the trivial-answer rule judges (fewer: no such warning, as the
            margin of chance is then so wide that a useful model may fall within it).
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
        num_bins: int = ECE_BINS,
        ece_name: str = "ece",
        auc_name: str | None = None,
        min_images: int = 30,
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
        self.num_bins, self.ece_name = num_bins, ece_name
        self.calibration = torch.zeros(3, num_bins, dtype=torch.float64)
        self.auc_name, self.min_images = auc_name, min_images
        self.signals = SignalLog(self.logger)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def epoch_started(self, engine: Engine) -> None:
        self.confusion.reset()
        self.calibration.zero_()

    def iteration_completed(self, engine: Engine) -> None:
        self.confusion.update(self.output_transform(engine.state.output))
        decisions = confidence_and_correct(*_stacked(engine.state.output), multi_label=self.multi_label)
        self.calibration += calibration_histogram(*decisions, self.num_bins)
        engine.state.metrics[self.ece_name] = ece_from_histogram(self.calibration)

    def epoch_completed(self, engine: Engine) -> None:
        confusion = self.confusion.compute().cpu()
        if not self._warn_if_collapsed(engine, confusion):
            self._warn_if_trivial(engine, confusion)
        if idist.get_world_size() > 1:
            self.calibration = idist.all_reduce(self.calibration.to(idist.device())).cpu()
            engine.state.metrics[self.ece_name] = ece_from_histogram(self.calibration)
        if self.output_dir is not None and idist.get_rank() == 0:
            self._write(confusion)
            self._write_calibration()

    def _warn_if_collapsed(self, engine: Engine, confusion: torch.Tensor) -> bool:
        """Warn (rank 0) when every prediction is the same although the labels differ; whether they are."""
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
        collapsed = total > 1 and same and varied
        if collapsed and idist.get_rank() == 0:
            self.logger.warning(
                f"epoch {engine.state.epoch}: all {total} predictions are {what} although the labels differ: the "
                f"model has collapsed to one answer. Try another --learning_rate (lower if the training loss jumped, "
                f"higher or more epochs (--train#trainer#max_epochs) if it barely fell), check the class balance of "
                f"the training data, and check that the pre-trained weights loaded (--pretrained)."
            )
        return collapsed

    def _warn_if_trivial(self, engine: Engine, confusion: torch.Tensor) -> None:
        """Warn when the model does no better than chance (the rule of the class docstring); rank 0 tests it, the
        only rank that logs."""
        total = int(confusion[0].sum()) if self.multi_label else int(confusion.sum())
        if total < self.min_images or idist.get_rank() != 0:
            return
        auc = engine.state.metrics.get(self.auc_name) if self.auc_name else None
        auc = float(auc) if auc is not None and math.isfinite(float(auc)) else None
        warning = None
        if self.multi_label:
            positives = confusion[:, 1, :].sum(1)
            reach = 0.5 + CHANCE_Z * macro_auc_chance_error(positives, total - positives)
            if auc is not None and auc <= reach:
                warning = (f"macro AUC {auc:.2f} is within what random probabilities reach on these {total} images "
                           f"(chance 0.5; {reach:.2f} one time in 20): the probabilities rank the images no "
                           f"better than random.")
        else:
            balanced, classes, p_value, reach = balanced_accuracy_chance(confusion)
            if classes > 1 and p_value > CHANCE_LEVEL:
                support, correct = confusion.sum(1), int(confusion.diagonal().sum())
                most = int(support.max())
                tops = [repr(name) for name, n in zip(self.class_names, support.tolist()) if n == most]
                which = tops[0] if len(tops) == 1 else f"one of {', '.join(tops)}"
                ranks = 0.5 + CHANCE_Z * macro_auc_chance_error(support, total - support, independent=False)
                verdict = "the model does no better than guessing."
                if auc is not None and auc > ranks:
                    verdict = (f"its decisions do no better than guessing, although its probabilities rank the "
                               f"images better than chance (random ones reach a macro AUC of {ranks:.2f} one time in "
                               f"20): the most probable class is rarely the right one of the rarer classes. "
                               f"{RANKING_ADVICE}")
                warning = (
                    f"balanced accuracy {balanced:.2f} (mean recall of the {classes} classes; chance 1/{classes}) "
                    f"is within what guessing reaches on these {total} images (random pairings of the predictions with "
                    f"the labels reach {reach:.2f} one time in 20; p = {p_value:.2f}), accuracy {correct / total:.2f} "
                    f"(always answering {which}: {most / total:.2f}){'' if auc is None else f', macro AUC {auc:.2f}'}: "
                    f"{verdict}"
                )
        self.signals.report(engine.state.epoch, "trivial", None if warning is None else f"{warning} {TRIVIAL_ADVICE}",
                            "the model does better than chance again.")

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

    def _write_calibration(self) -> None:
        count, confidence, correct = self.calibration
        with open(self.output_dir / f"{self.filename_prefix}calibration.csv", "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["lower", "upper", "count", "confidence", "accuracy"])
            for m in range(self.num_bins):
                means = [f"{float(v / count[m]):.4f}" if count[m] > 0 else "" for v in (confidence[m], correct[m])]
                writer.writerow([f"{m / self.num_bins:.4f}", f"{(m + 1) / self.num_bins:.4f}", int(count[m]), *means])
        plot_reliability_diagram(self.calibration, self.output_dir / f"{self.filename_prefix}reliability.png",
                                 "multi-label, per-class decisions pooled" if self.multi_label else "")
