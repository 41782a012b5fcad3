"""What a bundle run does when something goes wrong, end to end on the linear bundle: every refusal names the fix and
changes nothing already written, a resume continues only its own run, a killed run resumes exactly, evaluation and
inference need no repeated overrides (docs/robustness.md)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix

from bundle_support import CLASSES, REPO, copy_bundle, tiny_overrides, write_tiny_backbone
from bundle_support import TINY_BACKBONE as TINY
from io_support import free_port, sha256, write_nifti
from monai_prompt.backbones.pretrained import CheckpointError
from monai_prompt.bundle_gen import BUNDLE_SPECS
from monai_prompt.data import DataCheckError
from monai_prompt.data.datalist import ClassificationDatalist
from monai_prompt.engine import NonFiniteError, latest_checkpoint
from monai_prompt.peft import DeltaMismatchError
from monai_prompt.runs import RunFolderError, root_cause
from monai_prompt.runs.runner import run_bundle

# Every case of docs/robustness.md on a real bundle (the linear one, tiny data and backbone): the message the user
# gets, and that nothing already written changed. ``python -m monai.bundle run`` exits 1 on any exception a
# workflow raises (test_a_bundle_refusal_exits_non_zero_with_the_cause_last checks one through the real CLI).
LINEAR = BUNDLE_SPECS["linear_classification"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny) -> tuple[Path, dict]:
    """The linear bundle trained one epoch (models/: model.pt, checkpoint_epoch=1.pt, training_config.json) and its
    tiny overrides; tests work on copies (:func:`copy_trained`)."""
    bundle = copy_bundle(LINEAR.name, tmp_path_factory.mktemp("trained"))
    overrides = tiny_overrides(LINEAR, tiny["data"], tiny["backbone"])
    run_bundle(bundle, ["train.json"], "train", **overrides, **{"train#trainer#max_epochs": 1})
    return bundle, overrides


def copy_trained(trained: tuple[Path, dict], root: Path) -> Path:
    target = root / "bundles" / LINEAR.name
    shutil.copytree(trained[0], target, ignore=shutil.ignore_patterns(".lock"))
    return target


def written(bundle: Path) -> dict[str, str]:
    """SHA-256 of every file a run left in ``models/`` (the lock, rewritten by every claim, aside)."""
    return {p.name: sha256(p) for p in sorted((bundle / "models").iterdir()) if p.is_file() and p.name != ".lock"}


def cause_of(bundle: Path, files: list[str], workflow_type: str, **overrides) -> BaseException:
    """The root error of a failing workflow (below MONAI's wrapping RuntimeErrors), as show_cause_last prints it."""
    with pytest.raises(Exception) as info:
        run_bundle(bundle, files, workflow_type, **overrides)
    return root_cause(info.value)[0]


def tiny_datalist(tiny: dict, path: Path, **splits) -> Path:
    """The tiny datalist with absolute paths, some splits replaced by ``splits`` (lists of items)."""
    content = json.loads((tiny["data"] / "datalist.json").read_text())
    for split in ("training", "validation", "test"):
        content[split] = [{**item, "image": str(tiny["data"] / item["image"])} for item in content[split]]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**content, **splits}))
    return path


def truncated(source: Path, path: Path, keep: float = 0.5) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _nan_image(folder: Path) -> Path:
    image = np.random.default_rng(0).random((32, 32))
    image[3, 4] = np.nan
    return write_nifti(folder / "nan.nii.gz", image)


def _case_nan_pixels(tiny, tmp_path, bundle):
    """A NaN image reaches training (pixel check off) in a resumed run: stop, nothing written."""
    items = json.loads(tiny_datalist(tiny, tmp_path / "d.json").read_text())["training"]
    items[0] = {"image": str(_nan_image(tmp_path)), "label": 0}
    datalist = tiny_datalist(tiny, tmp_path / "nan" / "datalist.json", training=items)
    return ["train.json"], "train", {"dataset_dir": str(datalist), "check_pixels": False, "resume": True,
                                     "train#trainer#max_epochs": 2}


def _case_learning_rate(tiny, tmp_path, bundle):
    """A diverging run (into a new folder: the bundle's models/ stays as it was)."""
    return ["train.json"], "train", {"learning_rate": 1e37, "ckpt_dir": str(tmp_path / "diverged")}


def _case_previous_run(tiny, tmp_path, bundle):
    """A new run into a folder that holds one."""
    return ["train.json"], "train", {}


def _case_empty_validation(tiny, tmp_path, bundle):
    """No validation images (and none carved out of training)."""
    datalist = tiny_datalist(tiny, tmp_path / "noval" / "datalist.json", validation=[])
    return ["train.json"], "train", {"dataset_dir": str(datalist), "datalist_options": {"split": {"val_fraction": 0}},
                                     "resume": True}


def _case_bad_files(tiny, tmp_path, bundle):
    """Truncated PNG and NIfTI, NaN pixels and a missing file, all in one error."""
    items = json.loads(tiny_datalist(tiny, tmp_path / "d.json").read_text())["training"]
    volume = write_nifti(tmp_path / "volume.nii.gz", np.random.default_rng(1).random((64, 64)))
    bad = [truncated(Path(items[0]["image"]), tmp_path / "truncated.png"), truncated(volume, tmp_path / "cut.nii.gz"),
           _nan_image(tmp_path), tmp_path / "missing.png"]
    items[:4] = [{"image": str(path), "label": item["label"]} for path, item in zip(bad, items)]
    datalist = tiny_datalist(tiny, tmp_path / "bad" / "datalist.json", training=items)
    return ["train.json"], "train", {"dataset_dir": str(datalist), "resume": True}


def _case_labels_one_based(tiny, tmp_path, bundle):
    """Index labels 1..3 without a class map, for num_classes 3."""
    content = json.loads(tiny_datalist(tiny, tmp_path / "d.json").read_text())
    shifted = {s: [{**item, "label": item["label"] + 1} for item in content[s]] for s in ("training", "validation")}
    datalist = tmp_path / "one_based" / "datalist.json"
    datalist.parent.mkdir()
    datalist.write_text(json.dumps(shifted))
    return ["train.json"], "train", {"dataset_dir": str(datalist), "num_classes": 3, "resume": True}


def _case_csv_columns(tiny, tmp_path, bundle):
    """A CSV whose label column is not called 'label' (the fix: --datalist_options#label_columns)."""
    return ["train.json"], "train", {"dataset_dir": str(_diagnosis_csv(tiny, tmp_path)), "resume": True}


def _diagnosis_csv(tiny: dict, tmp_path: Path) -> Path:
    content = json.loads(tiny_datalist(tiny, tmp_path / "d.json").read_text())
    rows = [f"{item['image']},{CLASSES[item['label']]},{split}" for split in ("training", "validation")
            for item in content[split]]
    path = tmp_path / "diagnosis.csv"
    path.write_text("\n".join(["image,diagnosis,split", *rows]) + "\n")
    return path


def _case_mlflow_down(tiny, tmp_path, bundle):
    """--tracking mlflow with a server that is not there."""
    return ["train.json"], "train", {"tracking_uri": f"http://127.0.0.1:{free_port()}", "resume": True,
                                     "train#trainer#max_epochs": 2}


def _case_no_images(tiny, tmp_path, bundle):
    """Inference on a folder without images."""
    (tmp_path / "empty").mkdir()
    return ["inference.json"], "infer", {"input_dir": str(tmp_path / "empty")}


def _case_bad_input(tiny, tmp_path, bundle):
    """Inference checks its inputs."""
    image = truncated(tiny["data"] / "images" / "test" / "dark_0.png", tmp_path / "new.png")
    return ["inference.json"], "infer", {"infer_images": [str(image)]}


def _case_foreign_checkpoint(tiny, tmp_path, bundle):
    """--resume_file of another run."""
    other = torch.load(bundle / "models" / "checkpoint_epoch=1.pt", weights_only=True)
    other["run"] = {"run_id": "0" * 32}
    torch.save(other, tmp_path / "other_run.pt")
    return ["train.json"], "train", {"resume": True, "resume_file": str(tmp_path / "other_run.pt"),
                                     "train#trainer#max_epochs": 2}


def _case_corrupt_dicom(tiny, tmp_path, bundle):
    """A truncated DICOM file among the inputs."""
    from pydicom import examples

    dicom = truncated(Path(examples.get_path("ct")), tmp_path / "slice.dcm", keep=0.6)
    return ["inference.json"], "infer", {"infer_images": [str(dicom)]}


def _case_channels(tiny, tmp_path, bundle):
    """Images whose channels the network cannot take (2 channels into RGB; a grey + alpha PNG is read as grey):
    refused by the inference input check, before the network runs."""
    two_channels = write_nifti(tmp_path / "two_channels.nii.gz", np.zeros((32, 32, 1, 2)))
    return ["inference.json"], "infer", {"infer_images": [str(two_channels)]}


def _case_image_size(tiny, tmp_path, bundle):
    """An image size the delta was not trained for."""
    return ["inference.json"], "infer", {"img_size": 64, "input_dir": str(tiny["data"] / "images" / "test")}


def _case_other_method(tiny, tmp_path, bundle):
    """The delta of another method (``--method`` other than the recorded one: refused before the network is built)."""
    return ["inference.json"], "infer", {"method": "vpt", "input_dir": str(tiny["data"] / "images" / "test")}


def _case_other_backbone(tiny, tmp_path, bundle):
    """Other frozen backbone weights than the delta's."""
    other = write_tiny_backbone(tmp_path / "other_vit.pt", seed=1)
    return ["inference.json"], "infer", {"pretrained": str(other), "input_dir": str(tiny["data"] / "images" / "test")}


def _case_missing_pretrained(tiny, tmp_path, bundle):
    """The pre-trained file is not there."""
    return ["inference.json"], "infer", {"pretrained": str(tmp_path / "vit.safetensors")}


def _case_truncated_pretrained(tiny, tmp_path, bundle):
    """A truncated pre-trained file."""
    return ["inference.json"], "infer", {"pretrained": str(truncated(tiny["backbone"], tmp_path / "vit.pt"))}


def _case_deeper_pretrained(tiny, tmp_path, bundle):
    """A pre-trained file deeper than the model (2 blocks into 1)."""
    return ["inference.json"], "infer", {"backbone_overrides": {"num_layers": 1}}


#: case -> (how to run it, the root error's type, its message (regex, matched from the start)).
BUNDLE_FAILURES = {
    "nan-pixels": (_case_nan_pixels, NonFiniteError,
                   r"loss is nan at epoch 2, iteration [123]/3 at learning rate \S+: these images of the batch hold "
                   r"NaN/Inf values: \S+nan\.nii\.gz; fix or drop them "
                   r"\(monai_prompt\.data\.check_classification_datalist lists every such file\)\.$"),
    "learning-rate": (_case_learning_rate, NonFiniteError,
                      r"loss is (nan|inf) at epoch 1, iteration [123]/3 at learning rate 1e\+37: the batch's images "
                      r"are finite \(batch: .*\), so the model diverged: the learning rate is likely too high; "
                      r"continue from the last checkpoint with --resume true and a lower --learning_rate \(e\.g\. "
                      r"10x\), or start a new run with one\.$"),
    "previous-run": (_case_previous_run, RunFolderError,
                     r"\S+/models holds a previous training run \(checkpoint_epoch=1\.pt, model\.pt\); a new run "
                     r"would replace it\. Continue it with --resume true, train into another folder with --ckpt_dir "
                     r"<folder>, or replace it with --overwrite true\.$"),
    "empty-validation": (_case_empty_validation, ValueError,
                         r"the datalist has no 'validation' images: training validates every val_interval epochs to "
                         r"choose models/model\.pt, and MONAI skips an empty validation silently"),
    "bad-files": (_case_bad_files, DataCheckError,
                  r"4 problem\(s\) in \S+/bad/datalist\.json:\n"
                  r"  - \S+truncated\.png: pixel data unreadable \(.*\); the file may be truncated: re-export it or "
                  r"drop it\.\n"
                  r"  - \S+cut\.nii\.gz: (unreadable|pixel data unreadable) \(.*\n"
                  r"  - \S+nan\.nii\.gz: 1 NaN/Inf value\(s\) of 1024; training would get a NaN loss: fix the image "
                  r"or drop it\.\n"
                  r"  - \S+missing\.png: file not found\.$"),
    "labels-one-based": (_case_labels_one_based, DataCheckError,
                         r"6 problem\(s\) in the datalist \(num_classes=3\):\n  - \S+bright_0\.png: label 3 is "
                         r"outside 0\.\.2: without a class map, labels must be class indices 0\.\.num_classes-1 "
                         r"\(num_classes=3\) \(no image has label 0: are the labels 1-based\? "
                         r"subtract 1\); renumber them, or name the classes"),
    "csv-columns": (_case_csv_columns, ValueError,
                    r"\S+diagnosis\.csv: no column\(s\) \['label'\]; the header has \['image', 'diagnosis', "
                    r"'split'\]\. Set image_column/label_columns\.$"),
    "mlflow-down": (_case_mlflow_down, ConnectionError,
                    r"MLflow tracking server http://127\.0\.0\.1:\d+ is unreachable \(.*\)\. Start it \(e\.g\. mlflow "
                    r"server --host 127\.0\.0\.1 --port \d+\), pass a reachable --tracking_uri \(or "
                    r"MLFLOW_TRACKING_URI\), or run without --tracking mlflow\.$"),
    "no-images": (_case_no_images, DataCheckError,
                  r"1 problem\(s\) in images of '\S+empty':\n  - no images in '\S+empty'; give a folder of images "
                  r"\(--input_dir DIR\), a glob \(--infer_images \"/data/\*\.png\"\), or a list \(--infer_images "
                  r"\"\['a\.png','b\.png'\]\"\)\.$"),
    "bad-input": (_case_bad_input, DataCheckError,
                  r"1 problem\(s\) in images of \['\S+new\.png'\]:\n  - \S+new\.png: pixel data unreadable"),
    "foreign-checkpoint": (_case_foreign_checkpoint, ValueError,
                           r"the checkpoint belongs to training run 0{32}, not to the run recorded in "
                           r"training_config\.json \([0-9a-f]{32}\); resume from a checkpoint of that run"),
    "corrupt-dicom": (_case_corrupt_dicom, DataCheckError,
                      r"1 problem\(s\) in images of \['\S+slice\.dcm'\]:\n  - \S+slice\.dcm: "
                      r"(unreadable|pixel data unreadable) \("),
    "channels": (_case_channels, DataCheckError,
                 r"1 problem\(s\) in images of \['\S+two_channels\.nii\.gz'\]:\n  - \S+two_channels\.nii\.gz: 2 "
                 r"channel\(s\) cannot feed the network's in_channels=3 \(the transforms repeat 1 channel to any "
                 r"count, average 3 or 4 \(RGB, RGBA\) to 1 and cut 4 to 3\); convert it, drop it, or set in_channels "
                 r"to what every image can feed\.$"),
    "image-size": (_case_image_size, DeltaMismatchError,
                   r"\S+models/model\.pt: backbone architecture differs: img_size: \[32, 32\] in the delta vs "
                   r"\[64, 64\] here\.$"),
    "other-method": (_case_other_method, ValueError,
                     r"--method 'vpt' is not the method the delta was trained with: \S+models/training_config\.json "
                     r"records 'linear' \(method_config \{\}\), and a delta holds one method's weights\. Leave "
                     r"--method out \(the recorded method is used\), or train a 'vpt' run into another --ckpt_dir\.$"),
    "other-backbone": (_case_other_backbone, DeltaMismatchError,
                       r"\S+models/model\.pt: the frozen backbone weights differ from those the delta was trained "
                       r"on: the backbone this network was built with \(fingerprint \w{12}, from pretrained='\S+"
                       r"other_vit\.pt'\) is not the one the delta was trained on \(fingerprint \w{12}, recorded "
                       r"source '\S+vit_tiny\.pt'\)\. Set the bundle's pretrained \(--pretrained\) to the weights the "
                       r"delta was trained on, or package the bundle with its backbone: monai-prompt package BUNDLE "
                       r"--pretrained WEIGHTS --out DIR\.$"),
    "missing-pretrained": (_case_missing_pretrained, CheckpointError,
                           r"\S+vit\.safetensors: no such file or directory\.$"),
    "deeper-pretrained": (_case_deeper_pretrained, CheckpointError,
                          r"\S+vit_tiny\.pt: checkpoint has 2 blocks, model has 1: build with num_layers=2, or pass "
                          r"strict=False \(a network's pretrained_strict=False\) to load the first 1; not loaded: "
                          r"\['blocks\.1\."),
    "truncated-pretrained": (_case_truncated_pretrained, CheckpointError,
                             r"\S+vit\.pt: cannot be read as a weight file \(truncated or not a checkpoint\?\)"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BUNDLE_FAILURES))
def test_bundle_failures_name_the_fix_and_change_nothing(case, trained, tiny, tmp_path):
    make, kind, message = BUNDLE_FAILURES[case]
    bundle = copy_trained(trained, tmp_path)
    files, workflow_type, extra = make(tiny, tmp_path, bundle)
    before = written(bundle)
    tracking = "mlflow" if case == "mlflow-down" else None
    started = time.monotonic()
    error = cause_of(bundle, files, workflow_type, tracking=tracking, **{**trained[1], **extra})
    assert type(error) is kind and re.match(message, str(error)), f"{type(error).__name__}: {error}"
    assert written(bundle) == before
    if case == "learning-rate":  # nothing of the diverged run was saved
        assert sorted(p.name for p in (tmp_path / "diverged").iterdir()) == [".lock", "training_config.json"]
    if case == "mlflow-down":  # instead of MLflow's retries for minutes
        assert time.monotonic() - started < 30


@pytest.mark.slow
def test_the_fix_a_csv_error_suggests_is_an_override(trained, tiny, tmp_path):
    bundle = copy_trained(trained, tmp_path)
    csv_file = _diagnosis_csv(tiny, tmp_path)
    workflow = run_bundle(bundle, ["train.json"], "train", **{**trained[1], "dataset_dir": str(csv_file)},
                          ckpt_dir=str(tmp_path / "csv_run"), **{"datalist_options#label_columns": "diagnosis",
                                                                 "train#trainer#max_epochs": 1})
    assert workflow.parser.get_parsed_content("datalist").classes == sorted(CLASSES)


@pytest.mark.slow
def test_a_resume_continues_only_its_own_run(trained, tmp_path):
    bundle = copy_trained(trained, tmp_path)
    models = bundle / "models"
    other = torch.load(models / "checkpoint_epoch=1.pt", weights_only=True)
    other["run"], other["trainer"]["epoch"] = {"run_id": "0" * 32}, 5
    torch.save(other, models / "checkpoint_epoch=5.pt")  # newer, of another run
    foreign = sha256(models / "checkpoint_epoch=5.pt")
    workflow = run_bundle(bundle, ["train.json"], "train", resume=True, **trained[1], **{"train#trainer#max_epochs": 2})
    assert workflow.parser.get_parsed_content("train#trainer").state.epoch == 2  # from its own epoch 1, not 5
    assert (models / "checkpoint_epoch=2.pt").is_file() and sha256(models / "checkpoint_epoch=5.pt") == foreign
    run = json.loads((models / "training_config.json").read_text())["run_id"]
    assert torch.load(models / "checkpoint_epoch=2.pt", weights_only=True)["run"] == {"run_id": run}


@pytest.mark.slow
def test_evaluate_and_infer_after_training_need_no_repeated_overrides(trained, tiny, tmp_path):
    bundle = copy_trained(trained, tmp_path)
    record = json.loads((bundle / "models" / "training_config.json").read_text())
    assert {key: record[key] for key in ("backbone", "img_size", "method", "num_classes", "class_names")} == {
        "backbone": "vit_tiny", "img_size": 32, "method": "linear", "num_classes": 3, "class_names": list(CLASSES)}
    assert record["backbone_overrides"] == trained[1]["backbone_overrides"] and Path(record["pretrained"]).is_file()
    only_data = {"dataset_dir": str(tiny["data"]), "num_workers": 0}  # no backbone, img_size, pretrained, ...
    run_bundle(bundle, ["train.json", "evaluate.json"], "infer", **only_data)
    with open(bundle / "eval" / "class_report.csv") as f:
        report = list(csv.DictReader(f))
    assert [row["class"] for row in report] == list(CLASSES) and sum(int(row["support"]) for row in report) == 6
    test_images = tiny["data"] / "images" / "test"
    run_bundle(bundle, ["inference.json"], "infer", input_dir=str(test_images), num_workers=0)
    with open(bundle / "eval" / "predictions.csv") as f:
        header, *rows = list(csv.reader(f))
    assert header == ["image", *CLASSES, "predicted"] and len(rows) == 6
    # evaluation's confusion matrix is scikit-learn's of the inference's predicted classes for the same images
    truth = [Path(row[0]).stem.rsplit("_", 1)[0] for row in rows]
    expected = confusion_matrix(truth, [row[-1] for row in rows], labels=list(CLASSES))
    with open(bundle / "eval" / "confusion_matrix.csv") as f:
        matrix = [[int(v) for v in row[1:]] for row in list(csv.reader(f))[1:]]
    assert matrix == expected.tolist()


@pytest.mark.slow
def test_inference_on_a_folder_a_glob_or_a_list_without_a_datalist(trained, tiny, tmp_path):
    bundle = copy_trained(trained, tmp_path)
    images = tiny["data"] / "images" / "test"
    no_data = {"dataset_dir": str(tmp_path / "no_such_dataset"), "num_workers": 0}
    sources = {
        "folder": {"input_dir": str(images)},
        "glob": {"infer_images": str(images / "dark_*.png")},
        "list": {"infer_images": [str(images / "mid_1.png"), str(images / "bright_0.png")]},
    }
    found = {}
    for name, source in sources.items():
        run_bundle(bundle, ["inference.json"], "infer", **no_data, **source)
        with open(bundle / "eval" / "predictions.csv") as f:
            header, *rows = list(csv.reader(f))
        assert header == ["image", *CLASSES, "predicted"]
        assert all(row[-1] == CLASSES[int(np.argmax([float(v) for v in row[1:-1]]))] for row in rows)
        found[name] = [Path(row[0]).name for row in rows]
    assert found == {
        "folder": sorted(p.name for p in images.iterdir()),
        "glob": ["dark_0.png", "dark_1.png"],
        "list": ["mid_1.png", "bright_0.png"],
    }


@pytest.mark.slow
def test_inference_properties_check_on_a_bundle_copied_without_data(tmp_path):
    """As the model-zoo CI checks a bundle: initialise the inference workflow and check its properties."""
    from monai.bundle import ConfigWorkflow

    bundle = shutil.copytree(REPO / "bundles" / LINEAR.name, tmp_path / "anywhere" / LINEAR.name)
    small = {"backbone": "vit_tiny", "img_size": 32, "backbone_overrides": TINY}  # no data, no models/, no pretrained
    workflow = ConfigWorkflow(config_file=str(bundle / "configs" / "inference.json"), workflow_type="inference",
                              bundle_root=str(bundle), **small)
    workflow.initialize()
    assert workflow.check_properties() == []
    assert not (bundle / "models").exists() and not (bundle / "eval").exists()


@pytest.mark.slow
def test_dataset_dir_may_be_a_csv_and_num_classes_follows_the_datalist(tiny, tmp_path):
    items = json.loads(tiny_datalist(tiny, tmp_path / "d.json").read_text())
    two = ClassificationDatalist(["dark", "mid"], {split: [i for i in items[split] if i["label"] < 2]
                                                    for split in ("training", "validation", "test")})
    csv_file = two.save_csv(tmp_path / "two_classes.csv")
    bundle = copy_bundle(LINEAR.name, tmp_path)
    overrides = {**tiny_overrides(LINEAR, tiny["data"], tiny["backbone"]), "dataset_dir": str(csv_file)}
    run_bundle(bundle, ["train.json"], "train", **overrides, **{"train#trainer#max_epochs": 1})
    record = json.loads((bundle / "models" / "training_config.json").read_text())
    assert (record["num_classes"], record["class_names"]) == (2, ["dark", "mid"])
    assert torch.load(bundle / "models" / "model.pt", weights_only=True)["model"]["head.weight"].shape[0] == 2


def bundle_command(bundle: Path, overrides: dict, *more_configs: Path) -> list[str]:
    """``python -m monai.bundle run`` of ``bundle``'s train.json (and ``more_configs``) with ``overrides`` typed as
    Python literals, as fire reads them."""
    files = [str(bundle / "configs" / "train.json"), *map(str, more_configs)]
    args = {k: v for k, v in overrides.items() if not k.startswith("_meta_")}
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(files), "--bundle_root", str(bundle),
            *[item for key, value in args.items() for item in (f"--{key}", repr(value))]]


def run_command(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow
def test_a_bundle_refusal_exits_non_zero_with_the_cause_last(trained, tiny, tmp_path):
    make, kind, message = BUNDLE_FAILURES["bad-files"]
    bundle = copy_trained(trained, tmp_path)
    _, _, extra = make(tiny, tmp_path, bundle)
    before = written(bundle)
    result = run_command(bundle_command(bundle, {**trained[1], **extra}), cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    tail = result.stderr.rstrip()
    summary = tail[tail.rindex("\nRoot cause (") + 1:]  # what the user reads last
    assert summary.splitlines()[0] == (
        'Root cause (Failed to evaluate ConfigExpression: '
        '"$monai_prompt.data.check_classification_datalist(@datalist_file, channels=@in_channels, '
        'read_pixels=@flags#check_pixels, **@datalist_options)"):'
    )
    assert re.match(message, summary.split("\n", 1)[1].removeprefix(f"{kind.__name__}: ")), summary
    assert "RuntimeError: Failed to evaluate ConfigExpression" in result.stderr  # MONAI's traceback is kept above
    assert written(bundle) == before and "Epoch: 2/" not in result.stdout + result.stderr  # stopped before training


@pytest.mark.slow
def test_a_boolean_setting_reads_false_as_false_and_refuses_other_words(trained, tmp_path):
    """``--overwrite false`` as typed (fire passes the string ``'false'``) keeps a finished run: refused, ``models/``
    unchanged; ``--overwrite maybe`` stops before anything else, naming the setting and the accepted values last."""
    bundle = copy_trained(trained, tmp_path)
    before = written(bundle)
    command = bundle_command(bundle, trained[1])
    kept = run_command([*command, "--overwrite", "false"], cwd=tmp_path)
    assert kept.returncode == 1, kept.stderr[-3000:]
    assert kept.stderr.rstrip().splitlines()[-1].startswith("RunFolderError: ") and "--overwrite true" in kept.stderr
    assert written(bundle) == before
    refused = run_command([*command, "--overwrite", "maybe"], cwd=tmp_path)
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert refused.stderr.rstrip().splitlines()[-1] == (
        "ValueError: --overwrite 'maybe' is not a boolean; pass --overwrite true or --overwrite false (accepted in any "
        "case: true, yes, 1, false, no, 0)."
    )
    assert written(bundle) == before


def _kill_config(bundle: Path, path: Path, step: str) -> Path:
    """A config merged on train.json that runs ``step`` (which arranges a SIGKILL) before the training run."""
    train = json.loads((bundle / "configs" / "train.json").read_text())
    imports = [*train["imports"], "$import os", "$import signal", "$from ignite.engine import Events"]
    path.write_text(json.dumps({"imports": imports, "run": [step, *train["run"]]}))
    return path


#: SIGKILL in the middle of epoch 2 (3 iterations per epoch).
KILL_MID_EPOCH = ("$@train#trainer.add_event_handler(Events.ITERATION_COMPLETED(once=5), "
                  "lambda engine: os.kill(os.getpid(), signal.SIGKILL))")


#: SIGKILL while checkpoint_epoch=3.pt is being written (a part of it in its temporary file).
KILL_MID_WRITE = ("$setattr(torch, 'save', (lambda save: lambda obj, f, **kw: os.kill(os.getpid(), signal.SIGKILL) "
                  "if 'checkpoint_epoch=3' in str(getattr(f, 'name', f)) and (f.write(b'partial'), f.flush()) "
                  "else save(obj, f, **kw))(torch.save))")


@pytest.mark.slow
def test_killed_runs_resume_to_the_state_of_an_uninterrupted_run(tiny, tmp_path):
    """SIGKILL mid-epoch, resume, SIGKILL mid-checkpoint-write, resume: the final state (epoch, iteration, optimizer,
    schedule, delta, best score) equals an uninterrupted run's of the same seed. Data order and augmentation are
    fixed here (no shuffle, no random transforms): a resumed run re-seeds, so random draws after it differ."""
    overrides = {**tiny_overrides(LINEAR, tiny["data"], tiny["backbone"]), "train#trainer#max_epochs": 3,
                 "shuffle": False, "train#random_transforms": []}
    reference = copy_bundle(LINEAR.name, tmp_path / "reference")
    assert run_command(bundle_command(reference, overrides), cwd=tmp_path).returncode == 0

    bundle = copy_bundle(LINEAR.name, tmp_path / "killed")
    models = bundle / "models"
    mid_epoch = _kill_config(bundle, tmp_path / "kill_mid_epoch.json", KILL_MID_EPOCH)
    assert run_command(bundle_command(bundle, overrides, mid_epoch), cwd=tmp_path).returncode == -signal.SIGKILL
    assert latest_checkpoint(models).endswith("checkpoint_epoch=1.pt")
    mid_write = _kill_config(bundle, tmp_path / "kill_mid_write.json", KILL_MID_WRITE)
    resumed = {**overrides, "resume": True}
    assert run_command(bundle_command(bundle, resumed, mid_write), cwd=tmp_path).returncode == -signal.SIGKILL
    (leftover,) = models.glob(".checkpoint_epoch=3.pt.*.tmp")
    assert latest_checkpoint(models).endswith("checkpoint_epoch=2.pt")  # the half-written file is no checkpoint
    finished = run_command(bundle_command(bundle, resumed), cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert not leftover.exists() and f"removed {leftover}" in finished.stdout + finished.stderr

    expected = torch.load(reference / "models" / "checkpoint_epoch=3.pt", weights_only=True)
    final = torch.load(models / "checkpoint_epoch=3.pt", weights_only=True)
    assert final["trainer"] == expected["trainer"] and final["trainer"]["iteration"] == 9
    assert final["lr_scheduler"] == expected["lr_scheduler"] and final["best_metric"] == expected["best_metric"]
    for key in ("model", "peft"):
        assert final[key].keys() == expected[key].keys()
    assert all(torch.equal(final["model"][k], expected["model"][k]) for k in expected["model"])
    assert final["optimizer"]["param_groups"] == expected["optimizer"]["param_groups"]
    for index, state in expected["optimizer"]["state"].items():
        assert all(torch.equal(final["optimizer"]["state"][index][k], v) for k, v in state.items())
    best, expected_best = (torch.load(b / "models" / "model.pt", weights_only=True) for b in (bundle, reference))
    assert all(torch.equal(best["model"][k], expected_best["model"][k]) for k in expected_best["model"])
