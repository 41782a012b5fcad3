"""MLflow extras: the reachability probe, a server that is down at start or goes away mid-run, unique run names:
``monai_prompt.engine.tracking``."""

from __future__ import annotations

import http.server
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator
from monai.handlers import MLFlowHandler, ValidationHandler

from io_support import free_port
from monai_prompt.engine import MLflowPeftLogger, check_tracking_uri, unique_run_name
from monai_prompt.engine.tracking import (
    LONG_PARAMS_ARTIFACT,
    MLFLOW_HTTP_LIMITS,
    MLFLOW_PARAM_LIMIT,
    TRAINING_RUN_FILE,
    capped_params,
)
from net_support import tiny_classifier


class _Answer(http.server.BaseHTTPRequestHandler):
    status = 404

    def do_GET(self):
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status", [404, 503])
def test_check_tracking_uri(status):
    handler = type("Answer", (_Answer,), {"status": status})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    with_login = uri.replace("//", "//alice:s3cret@")  # MLflow's client takes it; the probe was refused (DNS)
    try:
        if status == 404:  # a server answers: reachable (MLflow reports what it wants)
            check_tracking_uri(uri)
            check_tracking_uri(with_login)
        else:
            with pytest.raises(ConnectionError, match=rf"{uri} is unreachable \(HTTP 503"):
                check_tracking_uri(uri)
            with pytest.raises(ConnectionError, match=rf"server {uri} is unreachable \(HTTP 503") as refused:
                check_tracking_uri(with_login)  # its password not shown
            assert "s3cret" not in str(refused.value)
    finally:
        server.shutdown()
        server.server_close()
    check_tracking_uri("sqlite:///nowhere/mlruns.db")  # not a server


def test_unreachable_tracking_server_fails_fast_naming_the_uri(monkeypatch):
    for name in MLFLOW_HTTP_LIMITS:
        monkeypatch.delenv(name, raising=False)
    uri = f"http://127.0.0.1:{free_port()}"
    engine = Engine(lambda engine, batch: None)
    MLflowPeftLogger(tiny_classifier()).attach(engine)
    MLFlowHandler(tracking_uri=uri, experiment_name="x").attach(engine)
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=rf"MLflow tracking server {uri} is unreachable .*mlflow server --host "
                                              rf"127\.0\.0\.1 --port \d+.*--tracking_uri"):
        engine.run([0], max_epochs=1)
    assert time.monotonic() - start < 10


@pytest.mark.slow  # creates an MLflow SQLite store
def test_tracking_that_fails_mid_run_does_not_stop_training(tmp_path, monkeypatch, caplog):
    for name in MLFLOW_HTTP_LIMITS:
        monkeypatch.delenv(name, raising=False)
    trainer = Engine(lambda engine, batch: {"loss": torch.tensor(1.0)})
    evaluator = SupervisedEvaluator(
        device="cpu", network=torch.nn.Identity(),
        val_data_loader=DataLoader([{"image": torch.zeros(1), "label": torch.zeros(1)}], batch_size=1),
    )
    MLflowPeftLogger(tiny_classifier()).attach(trainer)
    ValidationHandler(1, evaluator).attach(trainer)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    handler = MLFlowHandler(tracking_uri=uri, experiment_name="x", run_name="r",
                            output_transform=lambda out: out["loss"])
    handler.attach(trainer)
    validator_handler = MLFlowHandler(tracking_uri=uri, experiment_name="x", run_name="r")
    validator_handler.attach(evaluator)
    calls = []

    def dead(*args, **kwargs):
        calls.append(args)
        raise ConnectionError("server went away")

    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=3), lambda e: setattr(handler.client, "log_batch", dead))
    with caplog.at_level(logging.WARNING, logger="monai_prompt"):
        trainer.run([0, 1], max_epochs=3)
    assert trainer.state.epoch == 3 and len(calls) == 1  # one failure, then the run's handlers are skipped
    warnings = [r.getMessage() for r in caplog.records if "MLflow tracking failed" in r.getMessage()]
    assert warnings == [("MLflow tracking failed (ConnectionError: server went away); training continues without "
                         "tracking from here (epoch 2). Check the tracking server and --tracking_uri.")]
    assert {name: os.environ[name] for name in MLFLOW_HTTP_LIMITS} == MLFLOW_HTTP_LIMITS


#: 1000 class names: their list is longer than the longest parameter value MLflow stores.
_MANY_CLASSES = [f"class_{index}" for index in range(1000)]
#: the end of a parameter value cut to MLflow's limit.
_CUT = f"...[cut: 11891 characters, the full value is in the artifact {LONG_PARAMS_ARTIFACT}]"


def test_params_are_compact_and_cut_to_mlflows_limit():
    logged, long = capped_params({"class_names": ["csf", "gray_matter"], "pixdim": (1.5, 0.8), "pretrained": None,
                                  "label_values": np.array([0, 2, 300]), "many": _MANY_CLASSES})
    assert logged == {"class_names": '["csf","gray_matter"]', "pixdim": "[1.5,0.8]", "pretrained": "None",
                      "label_values": "[0,2,300]", "many": logged["many"]}
    assert len(logged["many"]) == MLFLOW_PARAM_LIMIT and logged["many"].endswith(_CUT)
    assert logged["many"].startswith('["class_0","class_1",') and long == {"many": _MANY_CLASSES}


@pytest.mark.slow  # creates an MLflow SQLite store
def test_an_evaluation_run_logs_its_settings_but_no_training_schedule(tmp_path, monkeypatch):
    """MONAI's handler logged the evaluator's max_epochs and epoch_length (1 and its batch count), which read as a
    training schedule; MLflow cut a parameter over its limit without a mark (and refused the run's parameters
    with MLFLOW_TRUNCATE_LONG_VALUES=false)."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRUNCATE_LONG_VALUES", "false")  # a value over the limit fails, not cut unmarked
    evaluator = SupervisedEvaluator(
        device="cpu", network=torch.nn.Identity(),
        val_data_loader=DataLoader([{"image": torch.zeros(1), "label": torch.zeros(1)}] * 3, batch_size=1),
    )
    MLflowPeftLogger(tiny_classifier(), extra_params={"class_names": _MANY_CLASSES, "pixdim": [1.5, 0.8]}).attach(
        evaluator)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    MLFlowHandler(tracking_uri=uri, experiment_name="x", run_name="evaluate", iteration_log=False,
                  close_on_complete=True).attach(evaluator)  # as --tracking mlflow attaches it to an evaluator
    evaluator.run()
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs(client.get_experiment_by_name("x").experiment_id)
    params = run.data.params
    assert run.info.status == "FINISHED" and not {"max_epochs", "epoch_length"} & set(params)
    assert params["pixdim"] == "[1.5,0.8]" and params["peft_method"] == "linear"
    assert len(params["class_names"]) == MLFLOW_PARAM_LIMIT and params["class_names"].endswith(_CUT)
    full = client.download_artifacts(run.info.run_id, LONG_PARAMS_ARTIFACT, str(tmp_path / "download"))
    assert json.loads(Path(full).read_text()) == {"class_names": _MANY_CLASSES}


@pytest.mark.slow  # creates an MLflow SQLite store
def test_creating_the_sqlite_store_logs_no_line_among_the_run_lines(tmp_path):
    """MLflow logged ``Creating initial MLflow database tables...`` and ``Updating database tables`` among a bundle
    run's lines when it created the default ``eval/mlruns.db``; those two are silenced, its other lines show."""
    from mlflow import MlflowClient

    records: list[logging.LogRecord] = []
    capture = logging.Handler()
    capture.emit = records.append
    logging.getLogger("mlflow").addHandler(capture)  # MLflow's loggers log to their own handler, not the root's
    try:
        MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}").search_experiments()
        logging.getLogger("mlflow.store.db.utils").info("another line")
    finally:
        logging.getLogger("mlflow").removeHandler(capture)
    assert (tmp_path / "mlruns.db").is_file()
    assert [record.getMessage() for record in records if record.name == "mlflow.store.db.utils"] == ["another line"]


def test_a_training_run_logs_its_processes_and_its_evaluations_name_it(tmp_path, monkeypatch, caplog):
    """Under torchrun the number of processes, which multiplies the batch size, was not logged; an evaluation or
    inference did not say which training run wrote its checkpoint."""
    from mlflow import MlflowClient

    monkeypatch.setattr("ignite.distributed.get_world_size", lambda: 2)  # as under torchrun --nproc_per_node=2
    uri, folder = f"sqlite:///{tmp_path / 'mlruns.db'}", tmp_path / "models"
    folder.mkdir()
    (folder / TRAINING_RUN_FILE).write_text('{"run_id": "of an earlier run"}')

    def train(tracked: bool) -> None:
        trainer = Engine(lambda engine, batch: {"loss": torch.tensor(1.0)})
        MLflowPeftLogger(tiny_classifier(), extra_params={"batch_size": 4}, run_folder=folder).attach(trainer)
        if tracked:
            MLFlowHandler(tracking_uri=uri, experiment_name="x", run_name="train", iteration_log=False,
                          close_on_complete=True).attach(trainer)
        trainer.run([0, 1], max_epochs=1)

    def evaluate(checkpoint: Path) -> dict[str, str]:
        evaluator = SupervisedEvaluator(
            device="cpu", network=torch.nn.Identity(),
            val_data_loader=DataLoader([{"image": torch.zeros(1), "label": torch.zeros(1)}], batch_size=1))
        MLflowPeftLogger(tiny_classifier(), checkpoint=checkpoint).attach(evaluator)
        name = unique_run_name("evaluate")
        MLFlowHandler(tracking_uri=uri, experiment_name="x", run_name=name, iteration_log=False,
                      close_on_complete=True).attach(evaluator)
        evaluator.run()
        (run,) = client.search_runs(experiment, filter_string=f"attributes.run_name = '{name}'")
        return run.data.params

    train(tracked=True)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("x").experiment_id
    (trained,) = client.search_runs(experiment)
    assert {key: trained.data.params[key] for key in ("world_size", "effective_batch_size", "batch_size")} == {
        "world_size": "2", "effective_batch_size": "8", "batch_size": "4"}
    record = json.loads((folder / TRAINING_RUN_FILE).read_text())
    assert record == {"run_id": trained.info.run_id, "run_name": "train", "experiment_id": experiment,
                      "tracking_uri": uri}
    evaluated = evaluate(folder / "model.pt")
    assert evaluated["training_run_id"] == trained.info.run_id and "world_size" not in evaluated
    assert "training_run_id" not in evaluate(tmp_path / "elsewhere" / "model.pt")  # no record: nothing, no error
    (folder / TRAINING_RUN_FILE).write_text("{")
    with caplog.at_level(logging.WARNING, logger="monai_prompt"):
        assert "training_run_id" not in evaluate(folder / "model.pt")
    assert f"{folder / TRAINING_RUN_FILE} names no MLflow run (JSONDecodeError" in caplog.text
    train(tracked=False)  # its checkpoints replace those the record named: no link
    assert not (folder / TRAINING_RUN_FILE).exists()


def test_unique_run_names():
    names = {unique_run_name("vpt_classification_train") for _ in range(50)}
    assert len(names) == 50 and all(name.startswith("vpt_classification_train_2") for name in names)


_FAILING_RUN = """
import sys
import torch
from ignite.engine import Engine
from monai.handlers import MLFlowHandler
from monai_prompt.engine import MLflowPeftLogger
from monai_prompt.runs import show_cause_last
from net_support import tiny_classifier

show_cause_last()


def train(name, error=None):
    def step(engine, batch):
        if engine.state.iteration == 2 and error is not None:
            raise error
        return {{"loss": torch.tensor(1.0)}}

    trainer = Engine(step)
    MLflowPeftLogger(tiny_classifier()).attach(trainer)
    MLFlowHandler(tracking_uri="{uri}", experiment_name="x", run_name=name, iteration_log=False,
                  close_on_complete=True).attach(trainer)  # as --tracking mlflow attaches it to a trainer
    trainer.run([0, 1, 2], max_epochs=1)


train(f"clean_{{sys.argv[1]}}")  # a run that completes, then one that fails in the same process
train(sys.argv[1], {{"error": ValueError("a bad batch"), "interrupt": KeyboardInterrupt()}}[sys.argv[1]])
"""


@pytest.mark.slow  # two processes that create an MLflow SQLite store
def test_a_failed_or_interrupted_run_ends_its_mlflow_run_failed_or_killed(tmp_path):
    """MONAI's handler ends its run only when the engine completes: a crash or Ctrl-C left it RUNNING forever; a
    clean run stays FINISHED."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    script = tmp_path / "run.py"
    script.write_text(_FAILING_RUN.format(uri=uri))
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__), "OMP_NUM_THREADS": "1"}
    for kind, says in (("error", "ValueError: a bad batch"), ("interrupt", "KeyboardInterrupt")):
        result = subprocess.run([sys.executable, str(script), kind], env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode != 0 and result.stderr.strip().splitlines()[-1] == says  # the error stays last
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs(client.get_experiment_by_name("x").experiment_id)
    assert {run.info.run_name: run.info.status for run in runs} == {
        "error": "FAILED", "interrupt": "KILLED", "clean_error": "FINISHED", "clean_interrupt": "FINISHED"}
