"""``--tracking mlflow``: a real tracking server and the default local SQLite store, read back with MlflowClient."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from bundle_support import copy_bundle, tiny_overrides
from io_support import free_port
from monai_prompt.bundle_gen import BUNDLE_SPECS
from monai_prompt.engine.tracking import TRAINING_RUN_FILE
from monai_prompt.runs.runner import run_bundle

pytestmark = pytest.mark.slow  # every test runs bundle workflows
SPEC = BUNDLE_SPECS["linear_classification"]
EXPERIMENT = "monai_prompt_classification"
SERVER_START_TIMEOUT_S = 120


@pytest.fixture
def bundle(tiny, tmp_path, monkeypatch):
    """A copy of the linear bundle and its tiny overrides; no MLFLOW_TRACKING_URI from the environment."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return copy_bundle(SPEC.name, tmp_path), tiny_overrides(SPEC, tiny["data"], tiny["backbone"])


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on a free local port with a SQLite backend in ``tmp_path``; always terminated."""
    port = free_port()
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
        "--artifacts-destination", str(tmp_path / "server_artifacts"),
    ]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow server exited with {server.returncode}: {(tmp_path / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer within {SERVER_START_TIMEOUT_S} s")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def _runs(client: MlflowClient) -> dict[str, object]:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}


def test_train_and_evaluate_logged_to_a_tracking_server(bundle, mlflow_server):
    path, overrides = bundle
    tracked = {**overrides, "tracking_uri": mlflow_server}
    run_bundle(path, ["train.json"], "train", tracking="mlflow", **tracked, **{"train#trainer#max_epochs": 2})
    run_bundle(path, ["train.json", "evaluate.json"], "infer", tracking="mlflow", **tracked)
    images = str(Path(overrides["dataset_dir"]) / "images" / "test")
    run_bundle(path, ["inference.json"], "infer", tracking="mlflow", infer_images=images, **tracked)

    client = MlflowClient(mlflow_server)
    runs = _runs(client)
    train, evaluate, infer = (next(run for name, run in runs.items() if name.startswith(f"{SPEC.name}_{kind}_"))
                              for kind in ("train", "evaluate", "infer"))
    assert len(runs) == 3 and train.info.status == evaluate.info.status == infer.info.status == "FINISHED"

    params = train.data.params
    assert params["peft_method"] == "linear" and params["peft_config"] == "{}"
    assert params["trainable_params"] == str(32 * 3 + 3)  # the head of a width-32 backbone, 3 classes
    assert int(params["total_params"]) > int(params["trainable_params"]) and params["max_epochs"] == "2"
    # every setting that changes the result, as the run read it (the classes were only in training_config.json)
    classes = json.dumps(json.loads((path / "models" / "training_config.json").read_text())["class_names"],
                         separators=(",", ":"))
    settings = {
        "class_names": classes, "multi_label": "False", "datalist_options": "{}",
        "img_size": str(overrides["img_size"]), "batch_size": "4", "learning_rate": str(SPEC.learning_rate),
        "weight_decay": str(SPEC.weight_decay), "seed": "0", "val_interval": "1", "shuffle": "True",
        "step_in_backward": "False", "world_size": "1", "effective_batch_size": "4", "intensity_range": "None"}
    assert {key: params[key] for key in settings} == settings
    assert params["datalist_file"].endswith("datalist.json") and "checkpoint" not in params
    history = client.get_metric_history(train.info.run_id, "val_accuracy")
    assert [metric.step for metric in history] == [1, 2]
    assert {"train_loss", "val_auc", "val_f1", "val_kappa", "val_ece", "peak_rss_mb"} <= set(train.data.metrics)
    artifacts = {artifact.path for artifact in client.list_artifacts(train.info.run_id)}
    assert "model.pt" in artifacts and any(name.startswith("config_") for name in artifacts)

    assert {"accuracy", "auc", "f1", "kappa", "ece"} <= set(evaluate.data.metrics)
    evaluated_params = evaluate.data.params  # what the evaluation read: no training schedule or recipe
    assert not {"max_epochs", "epoch_length", "learning_rate", "batch_size", "seed"} & set(evaluated_params)
    assert {key: evaluated_params[key] for key in ("class_names", "evaluate_split", "peft_method", "intensity_range")
            } == {"class_names": classes, "evaluate_split": "test", "peft_method": "linear", "intensity_range": "None"}
    assert Path(evaluated_params["checkpoint"]).resolve() == (path / "models" / "model.pt").resolve()
    assert evaluated_params["datalist_file"] == params["datalist_file"]
    evaluated = {artifact.path for artifact in client.list_artifacts(evaluate.info.run_id)}
    assert {"metrics.csv", "calibration.csv", "reliability.png", "model.pt"} <= evaluated
    # each names the training run that wrote its checkpoint, recorded beside it
    assert evaluated_params["training_run_id"] == infer.data.params["training_run_id"] == train.info.run_id

    inferred = infer.data.params  # what the inference read: the images, where it wrote; no schedule or data split
    assert not {"max_epochs", "epoch_length", "batch_size", "evaluate_split", "datalist_file"} & set(inferred)
    assert {key: inferred[key] for key in ("class_names", "multi_label", "infer_images", "peft_method")} == {
        "class_names": classes, "multi_label": "False", "infer_images": images, "peft_method": "linear"}
    assert Path(inferred["checkpoint"]).resolve() == (path / "models" / "model.pt").resolve()
    assert Path(inferred["output_dir"]).resolve() == (path / "eval").resolve()
    assert "predictions.csv" in {artifact.path for artifact in client.list_artifacts(infer.info.run_id)}
    local = client.download_artifacts(train.info.run_id, "model.pt", str(path.parent / "download"))
    assert Path(local).read_bytes() == (path / "models" / "model.pt").read_bytes()


def test_default_local_sqlite_store_and_unique_run_names(bundle):
    path, overrides = bundle
    for _ in range(2):  # the second run replaces the first one's files, the MLflow store keeps both runs
        run_bundle(path, ["train.json"], "train", tracking="mlflow", overwrite=True, **overrides,
                   **{"train#trainer#max_epochs": 1})
    store = path / "eval" / "mlruns.db"
    assert store.is_file()
    runs = _runs(MlflowClient(f"sqlite:///{store}"))
    assert len(runs) == 2 and all(name.startswith("linear_classification_train_") for name in runs)
    assert all(run.info.status == "FINISHED" and "val_accuracy" in run.data.metrics for run in runs.values())
    latest = max(runs.values(), key=lambda run: run.info.start_time)  # the one whose delta is in models/
    assert json.loads((path / "models" / TRAINING_RUN_FILE).read_text())["run_id"] == latest.info.run_id
