"""Metrics for MONAI evaluators: classification (decisions, macro F1, quadratic-weighted kappa, calibration, the
per-class report) and segmentation (Dice and HD95 as one scalar per class), and the warnings that a model learned
nothing useful (:mod:`~monai_prompt.engine.metrics.signals`)."""

from monai_prompt.engine.metrics.classification import (
    ClassReportHandler,
    QuadraticWeightedKappa,
    balanced_accuracy_chance,
    calibration_histogram,
    class_decisions,
    confidence_and_correct,
    ece_from_histogram,
    expected_calibration_error,
    macro_auc_chance_error,
    macro_f1,
    per_class_scores,
    plot_reliability_diagram,
    quadratic_weighted_kappa,
)
from monai_prompt.engine.metrics.segmentation import ClassHausdorffDistance, ClassMeanDice, ClassMetricsSaver
from monai_prompt.engine.metrics.signals import SegmentationCollapseHandler, SignalLog

__all__ = [
    "ClassHausdorffDistance",
    "ClassMeanDice",
    "ClassMetricsSaver",
    "ClassReportHandler",
    "QuadraticWeightedKappa",
    "SegmentationCollapseHandler",
    "SignalLog",
    "balanced_accuracy_chance",
    "calibration_histogram",
    "class_decisions",
    "confidence_and_correct",
    "ece_from_histogram",
    "expected_calibration_error",
    "macro_auc_chance_error",
    "macro_f1",
    "per_class_scores",
    "plot_reliability_diagram",
    "quadratic_weighted_kappa",
]
