"""The bundles through the real command lines: ``python -m monai.bundle`` (from the repository root and from inside
the bundle), ``torchrun`` with DDP on CPU (gloo), and ``monai-prompt export``/``render-bundles``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bundle_support import REPO, TINY_BACKBONE, TINY_IMG_SIZE, copy_bundle, tiny_overrides, write_tiny_backbone
from monai_prompt.bundle_gen import BUNDLE_SPECS
from monai_prompt.cli import main
from monai_prompt.nets import PromptClassifier
from monai_prompt.peft import load_delta
from monai_prompt.runs.runner import read_metrics, run_bundle

TIMEOUT_S = 300


def cli_overrides(spec, data: Path, backbone: Path) -> list[str]:
    """``--key value`` pairs of the tiny overrides, as typed on the command line (Python literals for fire)."""
    overrides = tiny_overrides(spec, data, backbone)
    overrides.pop("_meta_#network_data_format#inputs#image#spatial_shape")
    return [item for key, value in overrides.items() for item in (f"--{key}", repr(value))]


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.mark.slow
def test_monai_bundle_cli_from_repository_root_inside_the_bundle_and_elsewhere(tiny, tmp_path):
    root = tmp_path  # a stand-in repository root
    spec = BUNDLE_SPECS["linear_classification"]
    bundle = copy_bundle(spec.name, root)
    args = cli_overrides(spec, tiny["data"], tiny["backbone"])
    trained = run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                   f"bundles/{spec.name}/configs/train.json", *args, "--train#trainer#max_epochs", "1"], cwd=root)
    assert (bundle / "models" / "model.pt").is_file() and not (root / "models").exists()
    assert "time left (epoch 1/1): 3/3 iterations, " in trained.stdout + trained.stderr

    result = run([sys.executable, "-m", "monai.bundle", "run", "--config_file",  # the literal attention path
                  "['configs/train.json','configs/evaluate.json']", *args, "--sdpa", "false"], cwd=bundle)
    assert "Restored all variables from ./models/model.pt" in result.stdout + result.stderr
    assert set(read_metrics(bundle / "eval" / "metrics.csv")) == {"accuracy", "auc", "f1", "kappa", "ece"}

    elsewhere = tmp_path / "elsewhere"  # any other folder: the bundle is the one of the config file
    elsewhere.mkdir()
    run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
         *args], cwd=elsewhere)
    assert (bundle / "eval" / "predictions.csv").is_file() and not any(elsewhere.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora_classification", "fptplus_classification"])
def test_torchrun_ddp_on_cpu_with_gloo(name, tiny, tmp_path):
    """DDP with a frozen backbone; FPT+ also preloads its cache on rank 0 while rank 1 waits. The MLflow run (rank 0
    only) logs the number of processes and the batch size they make together."""
    from mlflow import MlflowClient

    spec = BUNDLE_SPECS[name]
    bundle = copy_bundle(name, tmp_path)
    configs = f"['bundles/{spec.name}/configs/train.json','bundles/{spec.name}/configs/multi_gpu_train.json']"
    result = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
                  "-m", "monai.bundle", "run", "--config_file", configs,
                  *cli_overrides(spec, tiny["data"], tiny["backbone"]), "--train#trainer#max_epochs", "1",
                  "--tracking", "mlflow"], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert output.count("Epoch: 1/1, Iter: 2/2") == 1  # 12 images on 2 ranks, batch 4; rank 1 does not log
    assert output.count("time left (epoch 1/1): 2/2 iterations, ") == 1  # nor does it log the time left
    assert output.count("epoch 1: peak_rss_mb ") == output.count("(the highest of 2 processes)") == 1  # nor memory
    assert output.count("FPT preload (") == (1 if spec.fpt else 0)  # rank 0 preloads, with the time left
    assert "Key metric: val_accuracy best value" in output
    delta = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert not any(key.startswith("module.") for key in delta["model"])  # saved unwrapped from DDP
    assert delta["peft"]["method"] == spec.method
    client = MlflowClient(f"sqlite:///{bundle / 'eval' / 'mlruns.db'}")
    (tracked,) = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
    assert {key: tracked.data.params[key] for key in ("world_size", "batch_size", "effective_batch_size")} == {
        "world_size": "2", "batch_size": "4", "effective_batch_size": "8"}


@pytest.mark.slow
def test_torchrun_refuses_the_step_in_backward_and_says_why_last(tiny, tmp_path):
    """Under DDP each rank would step on its own gradient before the average: the bundle refuses once the process
    group exists, and torchrun's failure summary, the last lines it prints, gives the reason (not "To enable
    traceback see ...")."""
    spec = BUNDLE_SPECS["lora_classification"]
    copy_bundle(spec.name, tmp_path)
    configs = f"['bundles/{spec.name}/configs/train.json','bundles/{spec.name}/configs/multi_gpu_train.json']"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2", "-m",
         "monai.bundle", "run", "--config_file", configs, *cli_overrides(spec, tiny["data"], tiny["backbone"]),
         "--train#trainer#max_epochs", "1", "--step_in_backward", "true"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode != 0
    summary = "\n".join(result.stderr.splitlines()[-12:])
    assert "Root Cause (first observed failure)" in summary, result.stderr[-3000:]
    assert "set --step_in_backward false for a multi-process (torchrun) run" in summary, result.stderr[-3000:]
    assert "To enable traceback" not in summary


@pytest.mark.slow
def test_export_merges_lora_into_a_plain_network(tiny, tmp_path, capsys):
    spec = BUNDLE_SPECS["lora_classification"]
    bundle = copy_bundle(spec.name, tmp_path)
    backbone = tiny["backbone"]
    overrides = tiny_overrides(spec, tiny["data"], backbone)
    run_bundle(bundle, ["train.json"], "train", **overrides, **{"train#trainer#max_epochs": 1})
    sets = [f"--set={key}={json.dumps(overrides[key])}" for key in ("img_size", "backbone", "backbone_overrides")]
    assert main(["export", str(bundle), "--pretrained", str(backbone), *sets]) == 0
    assert "lora: merged into a plain network" in capsys.readouterr().out

    shape = {"backbone": "vit_tiny", "img_size": TINY_IMG_SIZE, "backbone_overrides": TINY_BACKBONE}
    tuned = PromptClassifier(3, "lora", spec.method_config(), pretrained=str(backbone), **shape).eval()
    load_delta(tuned, bundle / "models" / "model.pt")
    plain = PromptClassifier(3, "full", **shape).eval()
    plain.load_state_dict(torch.load(bundle / "models" / "model_full.pt", weights_only=True), strict=True)
    scripted = torch.jit.load(str(bundle / "models" / "model_full.ts"))
    image = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(image), tuned(image), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scripted(image), tuned(image), atol=1e-5, rtol=1e-5)

    unmerged = tmp_path / "unmerged"  # --no-merge keeps LoRA's modules: the tuned network's full state dict
    no_merge = ["--no-merge", "--out-dir", str(unmerged)]
    untrained = copy_bundle(spec.name, tmp_path / "untrained")  # a delta of another folder: its record builds the net
    assert main(["export", str(untrained), "--ckpt", str(bundle / "models" / "model.pt"), *no_merge]) == 0
    assert "lora: full state dict with the method's modules" in capsys.readouterr().out
    state = torch.load(unmerged / "model_full.pt", weights_only=True)
    assert state.keys() == tuned.state_dict().keys() and any(key.endswith(".lora_A") for key in state)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(unmerged / "model_full.ts"))(image), tuned(image))

    with pytest.raises(SystemExit, match="frozen backbone weights differ"):
        main(["export", str(bundle), "--pretrained", str(write_tiny_backbone(tmp_path / "other.pt", seed=1)), *sets])


def test_render_bundles_check_command(tmp_path, capsys):
    assert main(["render-bundles", "--check", "--root", str(REPO / "bundles")]) == 0
    assert main(["render-bundles", "--root", str(tmp_path), "ssf_classification"]) == 0
    (tmp_path / "ssf_classification" / "LICENSE").write_text("changed")
    with pytest.raises(SystemExit, match="LICENSE: differs"):
        main(["render-bundles", "--check", "--root", str(tmp_path), "ssf_classification"])
