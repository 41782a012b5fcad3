"""The main job (``monai-prompt demo``) end to end at its tiny size, its caching of data and pre-training, and the
bundle benchmarks on the same backbone."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from monai_prompt.benchmarks import bundle_runs
from monai_prompt.cli import main
from monai_prompt.runs.demo_task import TINY_DEMO, prepare_data, pretrain


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reuses_data_and_pretraining(tmp_path, capsys):
    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    try:
        main(["demo", "--tiny", "--out", str(out), "--compare-scratch"])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "[4/4] DVPT on a randomly initialised backbone" in printed
    assert "MAE epoch 1/1" in printed and "DVPT epoch 1/1" in printed and "left" in printed  # progress lines
    assert "trainable parameter" in printed  # the bundle's parameter report

    results = json.loads((out / "results.json").read_text())
    assert set(results["backbones"]) == {"pretrained", "scratch"}
    for run in results["backbones"].values():
        assert set(run["metrics"]) == {"accuracy", "auc", "f1", "kappa", "ece"}
        assert 0 < run["trainable"] < run["backbone"]
        assert f"{run['metrics']['accuracy']:.3f}" in printed
    assert (out / "dvpt_pretrained" / "models" / "model.pt").is_file()
    assert set(results["timings"]) == {"data_s", "pretraining_s", "dvpt_pretrained_s", "dvpt_scratch_s", "total_s"}

    # a second run reuses the data and the pre-trained checkpoint
    datalist, reused = prepare_data(out / "data", TINY_DEMO)
    assert reused
    checkpoint, status = pretrain(out / "vit_pretraining", datalist, TINY_DEMO)
    assert status == "reused" and checkpoint == out / "vit_pretraining" / "models" / "model.pt"

    # a run that stopped before its final checkpoint resumes from its last epoch
    checkpoint.unlink()
    stamp = out / "vit_pretraining" / "pretraining.json"
    stamp.write_text(json.dumps({**json.loads(stamp.read_text()), "complete": False}))
    assert pretrain(out / "vit_pretraining", datalist, TINY_DEMO)[1] == "resumed" and checkpoint.is_file()

    # the bundle benchmarks (--quick: the tiny demo) tune the demo's pre-trained backbone, reusing data and checkpoint
    capsys.readouterr()
    bundle_runs.main(["--quick", "--work", str(out), "linear_classification"])
    assert f"pre-training: reused {checkpoint}" in capsys.readouterr().out
    measured = json.loads((out / "measurements.json").read_text())
    assert measured["pretraining"]["shape"]["backbone_overrides"] == TINY_DEMO.backbone_overrides
    run = measured["bundles"]["linear_classification"]["demo_run"]
    assert run["epochs"] == 1 and run["seconds_per_epoch"] > 0 and run["peak_rss_mb"] > 100
    assert set(run) >= {"accuracy", "auc", "f1", "kappa"}

    # other settings invalidate both caches
    one_more = dataclasses.replace(TINY_DEMO, unlabeled=TINY_DEMO.unlabeled + 1)
    datalist, reused = prepare_data(out / "data", one_more)
    assert not reused and len(json.loads(datalist.read_text())["unlabeled"]) == TINY_DEMO.unlabeled + 1
    assert pretrain(out / "vit_pretraining", datalist, one_more)[1] == "trained"
