"""A run folder's previous run, unreadable files and changed settings through the real CLI (``python -m monai.bundle
run``) on the linear bundle: ``--overwrite true`` deletes nothing before the new run has written its first
checkpoint and puts the previous run back when it fails before then; a truncated ``models/model.pt`` or newest
checkpoint is named; a resume applies a new learning rate and refuses another network (docs/robustness.md)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from monai_prompt.data import DataCheckError
from monai_prompt.peft import UnreadableCheckpointError
from monai_prompt.runs.runner import run_bundle
from test_bundle_robustness import (  # noqa: F401 - trained: the trained linear bundle, a fixture
    bundle_command,
    cause_of,
    copy_trained,
    run_command,
    tiny_datalist,
    trained,
    truncated,
    written,
)


@pytest.mark.slow
def test_overwrite_keeps_the_previous_run_until_the_new_one_has_a_checkpoint(trained, tiny, tmp_path, capsys):  # noqa: F811
    bundle = copy_trained(trained, tmp_path)
    models = bundle / "models"
    before = written(bundle)
    assert sorted(before) == ["checkpoint_epoch=1.pt", "model.pt", "training_config.json"]
    overwrite = {**trained[1], "overwrite": True, "train#trainer#max_epochs": 1}

    # a failure after the previous run was set aside (the optimizer refuses its settings, which the start-up checks
    # do not look at), through the real CLI: put back, and the error stays last
    result = run_command(bundle_command(bundle, {**overwrite, "optimizer_def#betas": (1.5, 0.999)}), cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    output = result.stdout + result.stderr
    moved = output.index("overwrite: moved the previous run (checkpoint_epoch=1.pt, model.pt, training_config.json)")
    back = output.index("so the previous run (checkpoint_epoch=1.pt, model.pt, training_config.json) is back in place")
    assert moved < back
    assert result.stderr.rstrip().splitlines()[-1] == "ValueError: Invalid beta parameter at index 0: 1.5"
    assert written(bundle) == before and not (models / ".previous_run").exists()

    # bad data: refused before anything is moved
    items = json.loads(tiny_datalist(tiny, tmp_path / "d.json").read_text())["training"]
    cut = truncated(Path(items[0]["image"]), tmp_path / "cut.png")
    bad = tiny_datalist(tiny, tmp_path / "bad" / "datalist.json", training=[*items, {"image": str(cut), "label": 0}])
    error = cause_of(bundle, ["train.json"], "train", **{**overwrite, "dataset_dir": str(bad)})
    assert type(error) is DataCheckError and str(cut) in str(error)
    assert written(bundle) == before and not (models / ".previous_run").exists()

    # a truncated newest checkpoint: named, and the resume continues from the previous good one with the new rate
    shutil.copy(models / "checkpoint_epoch=1.pt", models / "checkpoint_epoch=2.pt")
    truncated(models / "checkpoint_epoch=2.pt", models / "checkpoint_epoch=2.pt", keep=0.9)
    capsys.readouterr()
    run_bundle(bundle, ["train.json"], "train", **{**trained[1], "resume": True, "learning_rate": 0.05,
                                                     "train#trainer#max_epochs": 2})
    logged = "".join(capsys.readouterr())
    assert f"resume: {models.absolute() / 'checkpoint_epoch=2.pt'} cannot be read (" in logged
    assert ("resume: continuing from checkpoint_epoch=1.pt, the newest readable checkpoint of this run, instead of "
            "checkpoint_epoch=2.pt; the epochs after it are trained again.") in logged
    assert re.search(r"resume: learning_rate 0\.05 applied in place of the run's \S+ \(the resumed optimizer "
                     r"state's\); the cosine schedule continues from it at epoch 1", logged)
    assert torch.load(models / "checkpoint_epoch=2.pt", weights_only=True)["trainer"]["iteration"] == 6  # rewritten

    # the overwrite that succeeds: the previous run is deleted once the new run's first checkpoint is written
    run_bundle(bundle, ["train.json"], "train", **overwrite)
    assert re.search(r"overwrite: this run wrote checkpoint_epoch=1\.pt, so the previous run it replaces \("
                     r"checkpoint_epoch=1\.pt, checkpoint_epoch=2\.pt, model\.pt, training_config\.json\) is deleted "
                     r"from \S+\.previous_run\.",
                     "".join(capsys.readouterr()))
    assert sorted(written(bundle)) == ["checkpoint_epoch=1.pt", "model.pt", "training_config.json"]
    assert not (models / ".previous_run").exists()


@pytest.mark.slow
def test_a_resume_refuses_another_network_and_a_truncated_delta_is_named(trained, tiny, tmp_path):  # noqa: F811
    bundle = copy_trained(trained, tmp_path)
    before = written(bundle)
    error = cause_of(bundle, ["train.json"], "train", **trained[1], resume=True, method="vpt",
                     **{"train#trainer#max_epochs": 2})
    assert type(error) is ValueError and re.match(
        r"--resume true continues training run [0-9a-f]{32} of \S+/models/training_config\.json, whose network and "
        r"data were built with other settings: --method \"vpt\" \(recorded: \"linear\"\)\. A resumed run keeps them: "
        r"drop these overrides, or start a new run with --overwrite true \(or into another --ckpt_dir\)\.$",
        str(error)), str(error)
    assert written(bundle) == before

    delta = bundle / "models" / "model.pt"
    truncated(delta, delta, keep=0.9)
    before = written(bundle)
    test_images = {"input_dir": str(tiny["data"] / "images" / "test")}
    for files, workflow in ((["inference.json"], "infer"), (["train.json", "evaluate.json"], "eval")):
        error = cause_of(bundle, files, workflow, **trained[1], **(test_images if workflow == "infer" else {}))
        assert type(error) is UnreadableCheckpointError and re.match(
            rf"{re.escape(str(delta))} cannot be read \(\d+ bytes; \w+: .*\): the file is truncated or damaged \(an "
            r"interrupted copy or write, a full disk\), or not a checkpoint\. Copy it again from where it came from, "
            r"train again to rewrite it \(configs/train\.json with --overwrite true\), or point --load_path at a good "
            r"file\.$", str(error)), str(error)
    assert written(bundle) == before
    shutil.rmtree(bundle / "eval", ignore_errors=True)
