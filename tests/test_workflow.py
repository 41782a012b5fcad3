"""The small checks the bundle configs call: the task against the datalist, where the datalist is, where the bundle
root is: ``monai_prompt.runs.workflow``."""

from __future__ import annotations

import inspect
import os
import re
from types import SimpleNamespace

import pytest

from monai_prompt.data.datalist import ClassificationDatalist
from monai_prompt.runs import (
    bundle_root,
    check_optimizer_settings,
    check_task,
    check_validation_interval,
    find_datalist,
    flag,
    flag_entries,
    pretraining_images,
)


def test_check_task_names_the_fix():
    datalist = SimpleNamespace(classes=["a", "b"], multi_label=False)
    check_task(datalist, 2, False)
    with pytest.raises(ValueError, match=r"num_classes=3; run with --num_classes 2"):
        check_task(datalist, 3, False)
    with pytest.raises(ValueError, match="run with --multi_label False"):
        check_task(datalist, 2, True)


def test_flag_reads_every_spelling_and_names_the_setting_it_refuses():
    for value in (True, 1, "true", "True", "TRUE", "yes", "Yes", "1", " true "):
        assert flag(value, "resume") is True
    for value in (False, 0, "false", "False", "FALSE", "no", "NO", "0"):
        assert flag(value, "resume") is False
    for value in ("maybe", "", "2", 2, None, 0.5, "off"):
        with pytest.raises(ValueError, match=r"--overwrite .* is not a boolean; pass --overwrite true or --overwrite "
                           r"false \(accepted in any case: true, yes, 1, false, no, 0\)"):
            flag(value, "overwrite")


def test_flag_entries_reads_the_boolean_entries_of_a_dict_setting():
    config = {"num_tokens": 10, "deep": "False", "dropout": 0.0}
    assert flag_entries(config, "method_config", ["deep", "absent"]) == {**config, "deep": False}
    with pytest.raises(ValueError, match=r"--method_config#deep 'on' is not a boolean"):
        flag_entries({"deep": "on"}, "method_config", ["deep"])


def test_check_task_refuses_empty_splits_a_workflow_reads():
    datalist = ClassificationDatalist(["a", "b"], {"training": [{"image": "x.png", "label": 0}],
                                                    "test": [{"image": "y.png", "label": 1}]})
    check_task(datalist, 2, False, ["training", "test"])
    with pytest.raises(ValueError, match=r"no 'validation' images: .*model\.pt would never be written"):
        check_task(datalist, 2, False, ["training", "validation"])
    with pytest.raises(ValueError, match=r"no 'unlabeled' images: choose a split that has images with "
                       r"--evaluate_split .*'training', 'test'"):
        check_task(datalist, 2, False, ["unlabeled"])
    plain = ClassificationDatalist([], {"unlabeled": [{"image": "u.png"}]})  # a plain folder of images
    with pytest.raises(ValueError, match=r"^the datalist has only unlabelled images \(1; a plain folder of images, "
                       r"without class sub-folders, reads so\): .*sub-folder per class .* bundles/vit_pretraining\.$"):
        check_task(plain, 2, False, ["training", "validation"])


def test_pretraining_images_drop_labels_and_name_the_settings_when_too_few():
    datalist = ClassificationDatalist([], {"unlabeled": [{"image": "u.png"}], "test": [{"image": "t.png", "label": 0}]})
    assert pretraining_images(datalist, ["training", "unlabeled", "test"], 2) == [{"image": "u.png"},
                                                                                 {"image": "t.png"}]
    with pytest.raises(ValueError, match=r"no images to pre-train on in the splits \['training'\] \(the datalist has "
                       r"\{'unlabeled': 1, 'test': 1\}\); .*--pretrain_splits\.$"):
        pretraining_images(datalist, ["training"], 1)
    with pytest.raises(ValueError, match=r"1 images to pre-train on but --batch_size 64: .* give --batch_size 1 or "
                       r"less, or more images\.$"):
        pretraining_images(datalist, ["unlabeled"], 64)
    assert pretraining_images(datalist, "unlabeled", 1) == [{"image": "u.png"}]  # --pretrain_splits unlabeled
    with pytest.raises(ValueError, match=r"--pretrain_splits \['training', 'val'\]: unknown split\(s\) \['val'\]; "):
        pretraining_images(datalist, ["training", "val"], 1)


def test_check_task_refuses_unlabelled_images_one_class_and_names_trained_classes_first():
    datalist = ClassificationDatalist(["a", "b"], {"training": [{"image": "x.png", "label": 0}],
                                                    "test": [{"image": "y.png", "label": 1}, {"image": "z.png"}]})
    with pytest.raises(ValueError, match=r"1 of the 2 'test' images have no label \(e\.g\. z\.png\): .* evaluate a "
                       r"labelled split with --evaluate_split .* or predict these with configs/inference\.json"):
        check_task(datalist, 2, False, ["test"])  # an MSD-style test list of bare images
    one = ClassificationDatalist(["imgs"], {"training": [{"image": "x.png", "label": 0}]})
    with pytest.raises(ValueError, match=r"has 1 class \['imgs'\]; a classifier needs at least 2.*--dataset_dir "
                       r"<folder>/<file>\.csv"):
        check_task(one, 1, False)
    with pytest.raises(ValueError, match=r"trained on the classes \['a', 'b', 'c'\] but the datalist has \['a', "
                       r"'b'\]; evaluate on data with the training's classes"):  # not "run with --num_classes 2"
        check_task(datalist, 3, False, ["training"], classes=["a", "b", "c"])


def test_find_datalist_and_the_default_data_folder(tmp_path):
    from monai_prompt.bundle_gen.classification import DEMO_DATASET_DIR
    from monai_prompt.cli import DEMO_DATA
    from monai_prompt.demo import run_demo

    default_demo_out = inspect.signature(run_demo).parameters["out_dir"].default
    assert DEMO_DATA == DEMO_DATASET_DIR == f"{default_demo_out}/data"  # make demo's data is the bundles' default
    (tmp_path / "tree" / "a").mkdir(parents=True)
    (tmp_path / "with_list").mkdir()
    (tmp_path / "with_list" / "datalist.json").write_text("{}")
    (tmp_path / "table.csv").write_text("image,label\n")
    assert find_datalist(tmp_path / "with_list") == str(tmp_path / "with_list" / "datalist.json")
    assert find_datalist(tmp_path / "tree") == str(tmp_path / "tree")
    assert find_datalist(tmp_path / "table.csv") == str(tmp_path / "table.csv")
    with pytest.raises(FileNotFoundError, match=r"dataset_dir \S+missing does not exist; build the demo data there"):
        find_datalist(tmp_path / "missing")


def test_bundle_root_from_the_repository_or_inside_the_bundle(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bundle_root("x_classification") == "."
    (tmp_path / "bundles" / "x_classification" / "configs").mkdir(parents=True)
    assert bundle_root("x_classification") == os.path.join("bundles", "x_classification")
    monkeypatch.chdir(tmp_path / "bundles" / "x_classification")
    (tmp_path / "bundles" / "x_classification" / "configs" / "metadata.json").write_text("{}")
    assert bundle_root("x_classification") == "."
    # the folder of the --config_file wins: run from elsewhere, or from inside another bundle
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bundles" / "y_classification" / "configs").mkdir(parents=True)
    (tmp_path / "bundles" / "y_classification" / "configs" / "metadata.json").write_text("{}")
    monkeypatch.chdir(tmp_path / "bundles" / "y_classification")
    config = str(tmp_path / "bundles" / "x_classification" / "configs" / "train.json")
    for argv in (["run", "--config_file", config], ["run", f"--config_file={config}"],
                 ["run", "--config_file", f"['{config}','{config.replace('train', 'evaluate')}']"]):
        monkeypatch.setattr("sys.argv", ["monai.bundle", *argv])
        assert bundle_root("x_classification") == str(tmp_path / "bundles" / "x_classification")
    monkeypatch.setattr("sys.argv", ["monai.bundle", "run", "--config_file", str(tmp_path / "loose.json")])
    assert bundle_root("x_classification") == "."  # not a bundle's configs/: as before


def test_a_validation_interval_longer_than_the_run_is_refused():
    check_validation_interval(1, 1)
    check_validation_interval("5", "10")  # as the command line may pass them
    for interval, epochs in ((2, 1), (0, 3)):
        with pytest.raises(ValueError, match=rf"--val_interval {interval} with --train#trainer#max_epochs {epochs}: "
                           r"training validates every val_interval epochs to choose models/model\.pt"):
            check_validation_interval(interval, epochs)


def test_a_learning_rate_or_weight_decay_no_optimiser_step_can_use_is_refused(caplog):
    """1e38 stopped AdamW's first step with a float overflow naming no setting; inf, nan, 0 and negative rates, words
    and a negative weight decay are refused as well, naming the setting; a rate far above the usual is a warning."""
    check_optimizer_settings(1e-3, 0.05)
    check_optimizer_settings("5e-4", "0")  # as the command line may pass them
    for value in (1e38, "inf", float("nan"), 0, -1e-3, "abc", True):
        with pytest.raises(ValueError, match=rf"^--learning_rate {re.escape(repr(value))}: a learning rate must be a "
                           r"positive number small enough for the optimiser's step to stay finite \(at most "
                           r"3\.4e\+37\); .* give e\.g\. --learning_rate 1e-3\.$"):
            check_optimizer_settings(value, 0.05)
    for value in (-0.1, "inf"):
        with pytest.raises(ValueError, match=rf"^--weight_decay {re.escape(repr(value))}: a weight decay must be a "
                           r"finite number >= 0 .* give e\.g\. --weight_decay 1e-4\.$"):
            check_optimizer_settings(1e-3, value)
    check_optimizer_settings(1e37, 0.05)  # diverges, and the non-finite guard names the rate (docs/robustness.md)
    assert "--learning_rate 1e+37 is far above what these optimisers train with" in caplog.text
