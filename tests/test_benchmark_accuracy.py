"""``monai-prompt benchmark accuracy``: label subsets without leakage, and the smoke run's outputs."""

from __future__ import annotations

import csv
import json
import math
import random
from collections import Counter

import mlflow
import pytest
from bundle_support import write_tiny_dataset
from mlflow import MlflowClient

from monai_prompt.benchmarks.accuracy import (
    METRICS,
    parse_regime,
    regime_epochs,
    subset_datalist,
    training_subset,
)
from monai_prompt.cli import main as cli_main

#: 3 classes of 20, 10 and 5 training images (unbalanced, so that per-class rounding shows).
ITEMS = [{"image": f"/d/{label}_{i:02d}.png", "label": label} for label, n in enumerate((20, 10, 5)) for i in range(n)]


def test_parse_regime():
    assert parse_regime("40%") == parse_regime("0.4") and parse_regime("40%").fraction == pytest.approx(0.4)
    assert parse_regime("100%").name == "100%" and parse_regime("5shot").shots == 5
    assert parse_regime("10-shot").name == "10shot"
    for bad in ("0%", "140%", "0shot", "many"):
        with pytest.raises(ValueError, match="label fraction"):
            parse_regime(bad)


def test_training_subset_is_stratified_and_deterministic():
    ten_percent = training_subset(ITEMS, parse_regime("10%"), seed=0)
    assert Counter(item["label"] for item in ten_percent) == {0: 2, 1: 1, 2: 1}  # at least one image per class
    assert Counter(item["label"] for item in training_subset(ITEMS, parse_regime("40%"), 0)) == {0: 8, 1: 4, 2: 2}
    five = training_subset(ITEMS, parse_regime("5shot"), seed=3)
    assert Counter(item["label"] for item in five) == {0: 5, 1: 5, 2: 5}
    assert len({item["image"] for item in five}) == 15
    shuffled = random.Random(1).sample(ITEMS, len(ITEMS))
    assert training_subset(shuffled, parse_regime("5shot"), seed=3) == five  # the input order does not matter
    assert training_subset(ITEMS, parse_regime("5shot"), seed=4) != five  # another seed, another draw
    assert training_subset(ITEMS, parse_regime("100%"), seed=0) != ITEMS  # shuffled per class, same images
    assert sorted(map(str, training_subset(ITEMS, parse_regime("100%"), 0))) == sorted(map(str, ITEMS))
    with pytest.raises(ValueError, match="class 2 has 5 training images, fewer than 10"):
        training_subset(ITEMS, parse_regime("10shot"), seed=0)


def test_subset_datalist_keeps_evaluation_splits_apart(tmp_path):
    source = write_tiny_dataset(tmp_path / "data", per_class=(6, 3, 3))
    full = json.loads(source.read_text())

    def images(path, split):
        return {str((path.parent / item["image"]).resolve()) for item in json.loads(path.read_text())[split]}

    written = subset_datalist(source, tmp_path / "sub" / "two.json", parse_regime("2shot"), seed=0)
    again = subset_datalist(source, tmp_path / "sub" / "again.json", parse_regime("2shot"), seed=0)
    assert json.loads(written.read_text())["training"] == json.loads(again.read_text())["training"]
    training = images(written, "training")
    assert len(training) == 6 and training <= images(source, "training")
    for split in ("validation", "test"):  # whole and untouched, and no training image among them
        assert images(written, split) == images(source, split) and not training & images(written, split)
    assert json.loads(written.read_text())["labels"] == full["labels"]
    # reduced evaluation splits are the same images for every seed and regime
    small = [subset_datalist(source, tmp_path / "sub" / f"s{seed}.json", parse_regime(regime), seed, eval_per_class=1)
             for seed, regime in ((0, "1shot"), (1, "50%"))]
    assert images(small[0], "test") == images(small[1], "test") and len(images(small[0], "test")) == 3
    assert images(small[0], "test") <= images(source, "test")


def test_regime_epochs():
    assert regime_epochs(900, 900, 8) == 8
    assert regime_epochs(90, 900, 8) == 40  # 80 for the same steps, capped at 5 x 8
    assert regime_epochs(450, 900, 8) == 16


@pytest.mark.slow  # tiny MAE pre-training, then 4 bundle trainings and evaluations (about a minute)
def test_quick_run_writes_finite_metrics_for_every_method_and_regime(tmp_path, capsys):
    out = tmp_path / "out"
    tracking_uri = mlflow.get_tracking_uri()
    cli_main(["benchmark", "accuracy", "--quick", "--methods", "linear", "lora", "--regimes", "100%", "1shot",
              "--work", str(tmp_path / "work"), "--out", str(out)])
    with open(out / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(row["method"], row["regime"]) for row in rows} == {(m, r) for m in ("linear", "lora") for r in
                                                                ("100%", "1shot")}
    assert all(math.isfinite(float(row[metric])) for row in rows for metric in (*METRICS, "wall_s"))
    assert [int(row["n_train"]) for row in rows if row["regime"] == "1shot"] == [3, 3]  # 1 per class
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert len(summary) == 4 and all(entry["seeds"] == 1 for entry in summary)
    assert (out / "accuracy_vs_labels.png").read_bytes()[:4] == b"\x89PNG"
    assert "lora" in capsys.readouterr().out.splitlines()[-2]  # the table closes the output
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("monai_prompt_benchmark_accuracy")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 4 and all(set(METRICS) <= set(run.data.metrics) for run in runs)
    assert all("reliability.png" in {a.path for a in client.list_artifacts(run.info.run_id)} for run in runs)
    assert (out / "mlartifacts").is_dir() and mlflow.get_tracking_uri() == tracking_uri  # the process's own is kept
    # parts of a grid run apart are summarised together without training again, a run found twice counted once
    cli_main(["benchmark", "accuracy", "--combine", str(out), str(out), "--out", str(tmp_path / "combined")])
    assert json.loads((tmp_path / "combined" / "results.json").read_text())["summary"] == summary
