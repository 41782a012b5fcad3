"""Expected calibration error and the reliability diagram of ``monai_prompt.engine.metrics``."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from bundle_support import reference_ece
from ignite.engine import Engine, Events

from monai_prompt.engine.metrics import (
    ClassReportHandler,
    calibration_histogram,
    confidence_and_correct,
    expected_calibration_error,
)

#: four images, three classes: confidences 0.93 (right), 0.62 (wrong), 0.52 (right), 0.72 (right), in bins 13, 9,
#: 7 and 10 of 15, so ECE = (0.07 + 0.62 + 0.48 + 0.28) / 4 = 0.3625.
PROBS = torch.tensor([[0.93, 0.04, 0.03], [0.62, 0.28, 0.10], [0.52, 0.40, 0.08], [0.18, 0.72, 0.10]],
                     dtype=torch.float64)
LABELS = torch.tensor([0, 1, 0, 1])


def test_ece_by_hand():
    assert expected_calibration_error(PROBS, LABELS) == pytest.approx(0.3625, abs=1e-12)
    # one-hot labels give the same; a fifth image, wrong at 0.91, shares bin 13 with the 0.93: |1 - 1.84| there
    assert expected_calibration_error(PROBS, torch.eye(3)[LABELS]) == pytest.approx(0.3625, abs=1e-12)
    five = torch.cat([PROBS, torch.tensor([[0.91, 0.05, 0.04]], dtype=torch.float64)])
    assert expected_calibration_error(five, torch.tensor([0, 1, 0, 1, 2])) == pytest.approx(2.22 / 5, abs=1e-12)
    # a perfectly calibrated bin: confidence 0.75 (bin 11), right 3 times out of 4
    calibrated = torch.tensor([[0.75, 0.25]] * 4)
    assert expected_calibration_error(calibrated, torch.tensor([0, 0, 0, 1])) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("bins", [15, 10])
def test_ece_matches_the_literal_loop(bins):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(4, 0.7), size=300)
    labels = rng.integers(0, 4, size=300)
    reference = reference_ece(probs.max(1).tolist(), (probs.argmax(1) == labels).tolist(), bins)
    ece = expected_calibration_error(torch.from_numpy(probs), torch.from_numpy(labels), num_bins=bins)
    assert ece == pytest.approx(reference, abs=1e-12)
    # multi-label: every (image, class) decision p > 0.5 pooled, confidence max(p, 1 - p)
    sigmoid = rng.random((50, 3))
    multi_hot = rng.integers(0, 2, size=(50, 3))
    confidence = np.maximum(sigmoid, 1 - sigmoid).flatten().tolist()
    correct = ((sigmoid > 0.5) == (multi_hot > 0.5)).flatten().tolist()
    ece = expected_calibration_error(torch.from_numpy(sigmoid), torch.from_numpy(multi_hot), bins, multi_label=True)
    assert ece == pytest.approx(reference_ece(confidence, correct, bins), abs=1e-12)


def test_calibration_histogram_bins_and_edges():
    confidence = torch.tensor([0.0, 1 / 15, 0.5, 1.0], dtype=torch.float64)
    histogram = calibration_histogram(confidence, torch.tensor([1.0, 0.0, 1.0, 1.0]))
    assert histogram[0].nonzero().flatten().tolist() == [0, 7, 14]  # (0, 1/15] holds 0 and 1/15; 0.5 is in bin 7
    assert histogram[:, 0].tolist() == [2.0, pytest.approx(1 / 15), 1.0]
    assert math.isnan(expected_calibration_error(torch.empty(0, 3), torch.empty(0, dtype=torch.long)))  # none


@pytest.mark.parametrize("multi_label", [False, True])
def test_class_report_handler_puts_ece_in_the_metrics_before_epoch_end(tmp_path, multi_label):
    rng = np.random.default_rng(1)
    if multi_label:
        probs, labels = torch.from_numpy(rng.random((20, 3))), torch.from_numpy(rng.integers(0, 2, (20, 3))).double()
    else:
        probs = torch.from_numpy(rng.dirichlet(np.ones(3), size=20))
        labels = torch.eye(3, dtype=torch.float64)[torch.from_numpy(rng.integers(0, 3, 20))]
    batches = [[{"pred": p, "label": y} for p, y in zip(probs[i:i + 8], labels[i:i + 8])] for i in range(0, 20, 8)]
    engine = Engine(lambda engine, batch: batch)  # its output is the decollated batch, as MONAI evaluators give
    seen: list[float] = []
    # attached first, as MONAI's MetricsSaver is in evaluate.json: it must already see the whole epoch's value
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.append(e.state.metrics["ece"]))
    ClassReportHandler(3, ["a", "b", "c"], multi_label=multi_label, output_dir=tmp_path).attach(engine)
    engine.run(batches, max_epochs=2)
    expected = expected_calibration_error(probs, labels, multi_label=multi_label)
    assert seen == [pytest.approx(expected, abs=1e-12)] * 2  # the second epoch starts from an empty histogram
    confidence, correct = confidence_and_correct(probs, labels, multi_label)
    assert expected == pytest.approx(reference_ece(confidence.tolist(), correct.tolist()), abs=1e-12)
    with open(tmp_path / "calibration.csv") as f:
        header, *rows = list(csv.reader(f))
    assert header == ["lower", "upper", "count", "confidence", "accuracy"] and len(rows) == 15
    assert sum(int(row[2]) for row in rows) == (60 if multi_label else 20)
    assert (tmp_path / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
