"""Metrics for MONAI evaluators: classification (decisions, macro F1, quadratic-weighted kappa, calibration, the
per-class report) and segmentation (Dice and HD95 as one scalar per class)."""

from monai_prompt.engine.metrics.classification import (
    ClassReportHandler,
    QuadraticWeightedKappa,
    calibration_histogram,
    class_decisions,
    confidence_and_correct,
    ece_from_histogram,
    expected_calibration_error,
    macro_f1,
    per_class_scores,
    plot_reliability_diagram,
    quadratic_weighted_kappa,
)
from monai_prompt.engine.metrics.segmentation import ClassHausdorffDistance, ClassMeanDice

__all__ = [
    "ClassHausdorffDistance",
    "ClassMeanDice",
    "ClassReportHandler",
    "QuadraticWeightedKappa",
    "calibration_histogram",
    "class_decisions",
    "confidence_and_correct",
    "ece_from_histogram",
    "expected_calibration_error",
    "macro_f1",
    "per_class_scores",
    "plot_reliability_diagram",
    "quadratic_weighted_kappa",
]
