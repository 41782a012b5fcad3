"""The classification metrics of ``monai_prompt.engine.metrics``: quadratic-weighted kappa, class decisions and macro
F1, expected calibration error and the reliability diagram, the per-class report, its collapse warning and its
warning when the model does no better than the trivial answer."""

from __future__ import annotations

import csv
import itertools
import logging
import math

import ignite.distributed as idist
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from scipy.stats import fisher_exact
from sklearn.metrics import confusion_matrix, multilabel_confusion_matrix, precision_recall_fscore_support

from bundle_support import reference_ece
from monai_prompt.engine.metrics import (
    ClassReportHandler,
    QuadraticWeightedKappa,
    balanced_accuracy_chance,
    calibration_histogram,
    class_decisions,
    confidence_and_correct,
    expected_calibration_error,
    macro_auc_chance_error,
    macro_f1,
    per_class_scores,
    quadratic_weighted_kappa,
)
from monai_prompt.engine.metrics.classification import (
    CHANCE_FIRST_PERMUTATIONS,
    CHANCE_PERMUTATIONS,
    RANKING_ADVICE,
    TRIVIAL_ADVICE,
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


def kappa_reference(truth: list[int], pred: list[int], classes: int) -> float:
    """Quadratic-weighted kappa by its definition: double sums over class pairs."""
    n = len(truth)
    pairs = list(zip(truth, pred))
    observed = [[pairs.count((i, j)) for j in range(classes)] for i in range(classes)]
    rows = [sum(observed[i]) for i in range(classes)]
    cols = [sum(observed[i][j] for i in range(classes)) for j in range(classes)]
    num = den = 0.0
    for i, j in itertools.product(range(classes), repeat=2):
        weight = (i - j) ** 2 / (classes - 1) ** 2
        num += weight * observed[i][j]
        den += weight * rows[i] * cols[j] / n
    return 1.0 - num / den


def test_quadratic_weighted_kappa_matches_its_definition_and_the_ignite_metric():
    generator = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 5, (60,), generator=generator)
    probs = torch.softmax(torch.randn(60, 5, generator=generator) + 3 * torch.nn.functional.one_hot(truth, 5), 1)
    pred = probs.argmax(1)
    expected = kappa_reference(truth.tolist(), pred.tolist(), 5)
    confusion = torch.zeros(5, 5)
    for t, p in zip(truth, pred):
        confusion[t, p] += 1
    assert quadratic_weighted_kappa(confusion) == pytest.approx(expected, abs=1e-12)
    metric = QuadraticWeightedKappa(num_classes=5)
    for start in range(0, 60, 16):  # batches accumulate into one confusion matrix
        metric.update((probs[start : start + 16], truth[start : start + 16]))
    assert metric.compute() == pytest.approx(expected, abs=1e-12)
    assert quadratic_weighted_kappa(torch.eye(4) * 7) == 1.0
    sklearn = pytest.importorskip("sklearn.metrics")
    assert expected == pytest.approx(sklearn.cohen_kappa_score(truth, pred, weights="quadratic"), abs=1e-12)


def test_class_decisions_and_macro_f1():
    output = [
        {"pred": torch.tensor([0.7, 0.2, 0.1]), "label": torch.tensor([1.0, 0.0, 0.0])},
        {"pred": torch.tensor([0.1, 0.3, 0.6]), "label": torch.tensor([0.0, 1.0, 0.0])},
        {"pred": torch.tensor([0.2, 0.5, 0.3]), "label": torch.tensor([0.0, 1.0, 0.0])},
    ]
    probs, index = class_decisions()(output)
    assert probs.shape == (3, 3) and index.tolist() == [0, 1, 1]
    hard, multi_hot = class_decisions(multi_label=True, threshold=0.4)(output)
    assert hard.tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 0]]
    assert multi_hot.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 0]]

    engine = Engine(lambda engine, batch: output)
    macro_f1(output_transform=class_decisions()).attach(engine, "f1")
    engine.run([0], max_epochs=1)
    # predictions 0, 2, 1 vs truth 0, 1, 1: class 0 F1 1, class 1 F1 2/3 (P 1, R 1/2), class 2 F1 0
    assert engine.state.metrics["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)


def _evaluate(handler: ClassReportHandler, preds: torch.Tensor, labels: torch.Tensor, batch: int = 4) -> None:
    """An evaluator whose decollated output is ``[{"pred": probabilities, "label": one-hot}]``."""
    batches = [range(i, min(i + batch, len(preds))) for i in range(0, len(preds), batch)]
    evaluator = Engine(lambda engine, rows: [{"pred": preds[i], "label": labels[i]} for i in rows])
    handler.attach(evaluator)
    evaluator.run(batches, max_epochs=1)


def test_class_report_matches_scikit_learn_and_writes_csv(tmp_path):
    generator = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 3, (30,), generator=generator)
    probs = torch.softmax(torch.randn(30, 3, generator=generator) + 1.5 * torch.nn.functional.one_hot(truth, 3), 1)
    _evaluate(ClassReportHandler(3, ["a", "b", "c"], output_dir=tmp_path), probs, torch.nn.functional.one_hot(truth, 3))
    pred = probs.argmax(1)
    precision, recall, f1, support = precision_recall_fscore_support(truth, pred, zero_division=0)
    rows = (tmp_path / "class_report.csv").read_text().splitlines()
    assert rows[0] == "class,precision,recall,f1,support,predicted"
    for i, name in enumerate("abc"):
        assert rows[i + 1] == (f"{name},{precision[i]:.4f},{recall[i]:.4f},{f1[i]:.4f},{support[i]},"
                               f"{int((pred == i).sum())}")
    matrix = confusion_matrix(truth, pred)
    assert (tmp_path / "confusion_matrix.csv").read_text().splitlines() == [
        "truth \\ prediction,a,b,c", *[f"{name},{','.join(map(str, matrix[i]))}" for i, name in enumerate("abc")]]


def test_per_class_scores_multi_label_matches_scikit_learn():
    generator = torch.Generator().manual_seed(1)
    truth = (torch.rand(25, 4, generator=generator) > 0.5).long()
    pred = (torch.rand(25, 4, generator=generator) > 0.4).long()
    pred[:, 3] = 0  # a class never predicted: precision 0, as scikit-learn's zero_division=0
    confusion = torch.from_numpy(multilabel_confusion_matrix(truth, pred))  # per class [[tn, fp], [fn, tp]]
    scores = per_class_scores(confusion)
    precision, recall, f1, support = precision_recall_fscore_support(truth, pred, zero_division=0)
    for key, expected in (("precision", precision), ("recall", recall), ("f1", f1), ("support", support)):
        assert scores[key].numpy() == pytest.approx(expected), key
    assert scores["predicted"].tolist() == pred.sum(0).tolist()


def test_ignite_multi_label_matrix_has_scikit_learn_s_layout(tmp_path):
    truth = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0], [1, 0]])
    pred = torch.tensor([[1, 1], [0, 1], [0, 1], [1, 0], [1, 0]])
    _evaluate(ClassReportHandler(2, multi_label=True, output_dir=tmp_path), pred.float(), truth.float(), batch=2)
    expected = multilabel_confusion_matrix(truth, pred).reshape(2, 4)
    assert (tmp_path / "confusion_matrix.csv").read_text().splitlines() == [
        "class,tn,fp,fn,tp", *[f"{i},{','.join(map(str, expected[i]))}" for i in range(2)]]


def test_class_report_warns_when_the_model_collapsed(caplog):
    labels = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 1, 0, 2]), 3)
    collapsed = torch.tensor([[0.2, 0.7, 0.1]]).repeat(6, 1)
    with caplog.at_level(logging.WARNING, logger="monai_prompt"):
        _evaluate(ClassReportHandler(3, ["a", "b", "c"]), collapsed, labels)
        _evaluate(ClassReportHandler(3, ["a", "b", "c"]), labels.float(), labels)  # varied predictions: no warning
        multi = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
        _evaluate(ClassReportHandler(2, ["x", "y"], multi_label=True), torch.tensor([[0.9, 0.2]]).repeat(3, 1), multi)
    assert [r.getMessage().split(" although")[0] for r in _ours(caplog)] == [
        "epoch 1: all 6 predictions are class 'b'",
        "epoch 1: all 3 predictions are the same labels ['x']",
    ]
    assert "collapsed to one answer. Try another --learning_rate (lower if the training loss jumped, higher or more " \
        "epochs (--train#trainer#max_epochs) if it barely fell)" in _ours(caplog)[0].getMessage()


def _ours(caplog) -> list[logging.LogRecord]:
    """The records of the package's loggers (an in-process bundle run of an earlier test may leave the root logger
    at INFO, so that ignite's engine lines reach ``caplog`` too)."""
    return [record for record in caplog.records if record.name.startswith("monai_prompt")]


def _decisions(truth: list[int], predicted: list[int], classes: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """One-hot probabilities of ``predicted`` and one-hot labels of ``truth``."""
    eye = torch.eye(classes, dtype=torch.float64)
    return eye[torch.tensor(predicted)], eye[torch.tensor(truth)]


def _evaluate_epochs(handler: ClassReportHandler, epochs: list[tuple[torch.Tensor, torch.Tensor]],
                     auc: float | None = None) -> None:
    """An evaluator whose epoch ``e`` sees ``epochs[e - 1]`` (probabilities, labels) in one batch, with ``auc`` as
    its ``val_auc`` metric (set before the handler runs, as the evaluator's metrics are)."""
    engine = Engine(lambda e, _: [{"pred": p, "label": y} for p, y in zip(*epochs[e.state.epoch - 1])])
    if auc is not None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(val_auc=auc))
    handler.attach(engine)
    engine.run([0], max_epochs=len(epochs))


# 40 images, 26 'a' and 14 'b': 18 'a' and 4 'b' right, accuracy 0.55 <= 0.65, balanced accuracy 0.49 <= 1/2
TRIVIAL = _decisions([0] * 26 + [1] * 14, [0] * 18 + [1] * 8 + [1] * 4 + [0] * 10)
# 40 images, 30 'a' and 10 'b': 22 'a' and 8 'b' right, accuracy 0.75 = the share of 'a', balanced accuracy 0.77
USEFUL = _decisions([0] * 30 + [1] * 10, [0] * 22 + [1] * 8 + [1] * 8 + [0] * 2)


def test_class_report_warns_once_when_the_model_does_no_better_than_the_majority_class(caplog):
    with caplog.at_level(logging.INFO, logger="monai_prompt"):
        # trivial twice, then better: one warning, one line when it clears
        _evaluate_epochs(ClassReportHandler(2, ["a", "b"], auc_name="val_auc"), [TRIVIAL, TRIVIAL, USEFUL], auc=0.48)
    assert [(r.levelname, r.getMessage()) for r in _ours(caplog)] == [
        ("WARNING", "epoch 1: balanced accuracy 0.49 (mean recall of the 2 classes; chance 1/2) is within what "
                    "guessing reaches on these 40 images (random pairings of the predictions with the labels reach "
                    "0.60 one time in 20; p = 0.67), accuracy 0.55 (always answering 'a': 0.65), macro AUC 0.48: the "
                    "model does no better than guessing. Try more epochs (--train#trainer#max_epochs) or another "
                    "--learning_rate, check that the labels belong to the images (monai-prompt check-data) and that "
                    "the pre-trained weights loaded (--pretrained)."),
        ("INFO", "epoch 3: the model does better than chance again."),
    ]


def test_the_trivial_answer_rule_needs_a_balanced_accuracy_at_chance_and_enough_images(caplog):
    with caplog.at_level(logging.INFO, logger="monai_prompt"):
        # accuracy at the majority share but a balanced accuracy of 0.77: the minority class is found, no warning
        _evaluate_epochs(ClassReportHandler(2, ["a", "b"]), [USEFUL])
        _evaluate_epochs(ClassReportHandler(2, ["a", "b"], min_images=41), [TRIVIAL])  # 40 images: too few
        small = tuple(t[[*range(18), *range(26, 37)]] for t in TRIVIAL)  # 29 images, default min_images=30
        _evaluate_epochs(ClassReportHandler(2, ["a", "b"]), [small])
        assert not _ours(caplog)
        # a balanced split: the most frequent classes tie
        _evaluate_epochs(ClassReportHandler(2, ["a", "b"]), [_decisions([0, 1] * 15, [0] * 8 + [1] * 22)])
        assert _ours(caplog).pop().getMessage().startswith(
            "epoch 1: balanced accuracy 0.50 (mean recall of the 2 classes; chance 1/2) is within what guessing "
            "reaches on these 30 images (random pairings of the predictions with the labels reach 0.63 one time in "
            "20; p = 0.65), accuracy 0.50 (always answering one of 'a', 'b': 0.50): the model does no better than "
            "guessing.")
        caplog.clear()
        # a collapsed model gets the collapse warning only
        _evaluate_epochs(ClassReportHandler(2, ["a", "b"]), [_decisions([0] * 26 + [1] * 14, [0] * 40)])
        assert [r.getMessage()[:40] for r in _ours(caplog)] == ["epoch 1: all 40 predictions are class 'a"]


def _counts(confusion: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One-hot probabilities and labels whose confusion matrix (rows truth, columns prediction) is ``confusion``."""
    pairs = [(t, p) for t, row in enumerate(confusion) for p, n in enumerate(row) for _ in range(n)]
    return _decisions([t for t, _ in pairs], [p for _, p in pairs], len(confusion))


#: 120 images, 90 'a' and 30 'b', answers independent of the labels that the old rule (accuracy not above the
#: majority share and balanced accuracy not above 1/2) let pass: guessing 'b' for 30 % (accuracy 0.61, balanced
#: 0.52), for 10 % (accuracy 0.72, near the majority share 0.75), for 4 % (accuracy 0.76, above it)
NEAR_RANDOM = {"guessing 30 %": [[63, 27], [20, 10]], "guessing 10 %": [[82, 8], [26, 4]],
               "guessing 4 %": [[88, 2], [27, 3]]}
#: a model that finds 90 % of 'a' and 70 % of 'b' on the same split, and one on a small split (30 images, 22 'a')
GOOD = {"unbalanced": [[81, 9], [9, 21]], "small": [[19, 3], [2, 6]]}


def test_a_near_random_model_on_an_unbalanced_split_is_named_and_a_good_one_is_not(caplog):
    warned = {}
    with caplog.at_level(logging.WARNING, logger="monai_prompt"):
        for name, confusion in {**NEAR_RANDOM, **GOOD}.items():
            caplog.clear()
            _evaluate_epochs(ClassReportHandler(2, ["a", "b"], auc_name="val_auc"), [_counts(confusion)], auc=0.52)
            warned[name] = [r.getMessage() for r in _ours(caplog)]
    assert {name: len(messages) for name, messages in warned.items()} == {
        "guessing 30 %": 1, "guessing 10 %": 1, "guessing 4 %": 1, "unbalanced": 0, "small": 0}
    assert warned["guessing 10 %"] == [
        "epoch 1: balanced accuracy 0.52 (mean recall of the 2 classes; chance 1/2) is within what guessing reaches on "
        "these 120 images (random pairings of the predictions with the labels reach 0.54 one time in 20; p = 0.34), "
        "accuracy 0.72 (always answering 'a': 0.75), macro AUC 0.52: the model does no better than guessing. "
        + TRIVIAL_ADVICE]



def test_a_model_that_ranks_well_but_decides_at_chance_is_told_so():
    """Guessing 'b' for 10 % of the 90/30 split with a macro AUC of 0.9: the probabilities rank the images (random
    ones reach 0.60 one time in 20: 0.5 + 1.645 x 0.061, the one-vs-rest standard error of either class), so the
    advice is about the rarer class, not the learning rate or the weights."""
    logger = logging.getLogger("monai_prompt")
    for auc, ranks in ((0.9, True), (0.58, False)):
        records = []
        capture = logging.Handler()
        capture.emit = records.append
        logger.addHandler(capture)
        try:
            _evaluate_epochs(ClassReportHandler(2, ["a", "b"], auc_name="val_auc"),
                             [_counts(NEAR_RANDOM["guessing 10 %"])], auc=auc)
        finally:
            logger.removeHandler(capture)
        (message,) = [r.getMessage() for r in records if r.levelno == logging.WARNING]
        verdict = ("its decisions do no better than guessing, although its probabilities rank the images better than "
                   "chance (random ones reach a macro AUC of 0.60 one time in 20): the most probable class is rarely "
                   "the right one of the rarer classes. " + RANKING_ADVICE)
        assert (verdict in message) == ranks and message.endswith(TRIVIAL_ADVICE), message
        assert ("the model does no better than guessing." in message) != ranks


def test_the_chance_test_of_balanced_accuracy_is_fisher_s_exact_test_for_two_classes():
    """For two classes the balanced accuracy grows with the first cell of a matrix of fixed margins, so the
    permutation test's p-value is Fisher's one-sided exact test's; with more classes a random pairing's balanced
    accuracy is 1/K on average."""
    for confusion in (*NEAR_RANDOM.values(), *GOOD.values(), [[4, 1], [1, 4]], [[18, 8], [10, 4]]):
        balanced, classes, p_value, reach = balanced_accuracy_chance(torch.tensor(confusion), permutations=20000)
        exact = fisher_exact(confusion, alternative="greater").pvalue
        assert (classes, p_value) == (2, pytest.approx(exact, abs=0.01)), confusion  # 3 Monte Carlo errors
        assert p_value <= 0.05 or balanced <= reach + 1e-9
    assert balanced_accuracy_chance(torch.tensor(GOOD["small"]))[2] < 0.01  # the small good split is no alarm
    # three classes, the predictions independent of the labels by construction (each row the same shares)
    balanced, classes, p_value, reach = balanced_accuracy_chance(torch.tensor([[30, 10, 5], [12, 4, 2], [6, 2, 1]]))
    assert (classes, balanced, p_value > 0.3, 1 / 3 < reach < 0.5) == (3, pytest.approx(1 / 3), True, True)
    assert p_value * (1 + CHANCE_PERMUTATIONS) == pytest.approx(round(p_value * (1 + CHANCE_PERMUTATIONS)))  # all drawn
    assert balanced_accuracy_chance(torch.zeros(2, 2))[1] == 0
    # 100 classes recognised well: no first pairing reaches the model, the rest are not drawn (5 s -> 0.5 s)
    good = torch.eye(100, dtype=torch.long) * 5 + 1
    assert balanced_accuracy_chance(good)[2] == 1 / (1 + CHANCE_FIRST_PERMUTATIONS)


def test_multi_label_trivial_answer_is_a_macro_auc_within_chance(caplog):
    """Classes x (20 of 40 images) and y (14): a macro AUC at chance has a standard error of 0.067, so 0.55, above
    0.5, is within what chance reaches (0.61) and 0.7 is not."""
    truth = (torch.arange(40)[:, None] % torch.tensor([2, 3]) == 0).double()
    positives = truth.sum(0)
    expected = math.sqrt(41 / (12 * 20 * 20) + 41 / (12 * 14 * 26)) / 2
    assert macro_auc_chance_error(positives, 40 - positives) == pytest.approx(expected)
    # one softmax's two one-vs-rest AUCs are the same AUC: its standard error, not that of two independent ones
    assert macro_auc_chance_error(torch.tensor([14, 26]), torch.tensor([26, 14]), independent=False) == pytest.approx(
        math.sqrt(41 / (12 * 14 * 26)))
    assert macro_auc_chance_error(torch.tensor([0, 5]), torch.tensor([5, 0])) != macro_auc_chance_error(
        torch.tensor([0, 5]), torch.tensor([5, 0]))  # no class with positives and negatives: nan
    with caplog.at_level(logging.WARNING, logger="monai_prompt"):
        for auc in (0.45, 0.55, 0.7, float("nan")):
            _evaluate_epochs(ClassReportHandler(2, ["x", "y"], multi_label=True, auc_name="val_auc"),
                             [(truth.flip(0), truth)], auc=auc)
    assert [r.getMessage() for r in _ours(caplog)] == [
        f"epoch 1: macro AUC {auc:.2f} is within what random probabilities reach on these 40 images (chance 0.5; "
        f"0.61 one time in 20): the probabilities rank the images no better than random. " + TRIVIAL_ADVICE
        for auc in (0.45, 0.55)
    ]


def test_class_report_warns_on_rank_0_only(caplog, monkeypatch):
    monkeypatch.setattr(idist, "get_rank", lambda: 1)
    with caplog.at_level(logging.INFO, logger="monai_prompt"):
        _evaluate_epochs(ClassReportHandler(2, ["a", "b"]), [TRIVIAL, USEFUL])
        _evaluate_epochs(ClassReportHandler(2, ["a", "b"]), [_decisions([0] * 26 + [1] * 14, [0] * 40)])
    assert not _ours(caplog)
