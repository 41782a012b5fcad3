"""Training a user can trust: non-finite stops, best-across-resume, resumed schedules, run-folder lock and
leftovers, empty splits, errors shown last, pixel-level data checks, unreachable tracking, per-class reports."""

from __future__ import annotations

import csv
import hashlib
import http.server
import inspect
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_support import CLASSES, copy_bundle, tiny_overrides, write_tiny_backbone
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from monai.data import DataLoader, MetaTensor
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import CheckpointLoader, LrScheduleHandler, MLFlowHandler, ValidationHandler
from PIL import Image
from sklearn.metrics import confusion_matrix, multilabel_confusion_matrix, precision_recall_fscore_support

from monai_prompt.backbones.pretrained import CheckpointError
from monai_prompt.bundle_gen import BUNDLE_SPECS
from monai_prompt.data import DataCheckError, check_classification_datalist, check_images, find_images
from monai_prompt.data.datalist import ClassificationDatalist
from monai_prompt.engine import (
    AtomicCheckpointSaver,
    BestMetricState,
    ClassReportHandler,
    MLflowPeftLogger,
    NonFiniteError,
    NonFiniteGuard,
    PredictionSaver,
    ResumeLrScheduleHandler,
    RunFolderError,
    RunIdentity,
    RunLock,
    check_task,
    check_tracking_uri,
    claim_run_folder,
    find_datalist,
    format_root_cause,
    latest_checkpoint,
    non_finite_entries,
    per_class_scores,
    read_training_config,
    root_cause,
    run_id,
    write_training_config,
)
from monai_prompt.engine.runner import run_bundle
from monai_prompt.engine.tracking import MLFLOW_HTTP_LIMITS
from monai_prompt.io import atomic_write
from monai_prompt.nets import PromptClassifier
from monai_prompt.peft import DeltaMismatchError

REPO = Path(__file__).resolve().parents[1]
TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "mlp_dim": 64, "patch_size": 8}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (16, 16), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_nifti(path: Path, volume: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(volume.astype(np.float32), np.eye(4)), path)
    return path


def write_datalist(path: Path, splits: dict[str, list[tuple[Path, int]]], **extra) -> Path:
    content = {**extra, **{s: [{"image": str(p), "label": label} for p, label in items] for s, items in splits.items()}}
    path.write_text(json.dumps(content))
    return path


# ---------------------------------------------------------------------------------------------- 1. non-finite
def _items(nan_at: int | None = None) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    items = []
    for i in range(6):
        image = torch.rand(1, 2, 2, generator=generator)
        if i == nan_at:
            image[0, 0, 0] = float("nan")
        items.append({"image": MetaTensor(image, meta={"filename_or_obj": f"/data/img{i}.png"}),
                      "label": torch.full((2,), float(i % 2))})
    return items


@pytest.mark.parametrize("cause", ["nan_pixels", "learning_rate"])
def test_non_finite_guard_stops_naming_epoch_iteration_and_cause(cause):
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    lr = 0.1 if cause == "nan_pixels" else 100.0  # MSE regression with lr 100 diverges geometrically
    trainer = SupervisedTrainer(
        device="cpu", max_epochs=30, network=network, loss_function=torch.nn.MSELoss(),
        optimizer=torch.optim.SGD(network.parameters(), lr=lr),
        train_data_loader=DataLoader(_items(nan_at=3 if cause == "nan_pixels" else None), batch_size=2),
        train_handlers=[NonFiniteGuard()],
    )
    with pytest.raises(NonFiniteError) as caught:
        trainer.run()
    message = str(caught.value)
    if cause == "nan_pixels":  # image 3 is in the second batch of two
        assert message.startswith("loss is nan at epoch 1, iteration 2/3 at learning rate 0.1")
        assert "hold NaN/Inf values: /data/img3.png;" in message and "img2.png" not in message
    else:
        assert trainer.state.epoch > 1 and f"epoch {trainer.state.epoch}, iteration" in message
        assert "at learning rate 100: the batch's images are finite" in message
        assert "learning rate is likely too high" in message


def test_non_finite_guard_lets_finite_training_finish():
    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    trainer = SupervisedTrainer(
        device="cpu", max_epochs=2, network=network, loss_function=torch.nn.MSELoss(),
        optimizer=torch.optim.SGD(network.parameters(), lr=0.1), train_data_loader=DataLoader(_items(), batch_size=2),
        train_handlers=[NonFiniteGuard()],
    )
    trainer.run()
    assert trainer.state.epoch == 2


def test_non_finite_entries_names_nested_tensors():
    state = {
        "model": {"w": torch.tensor([1.0, float("nan")]), "steps": torch.tensor([3]), "ok": torch.ones(2)},
        "optimizer": {"state": {0: {"exp_avg": torch.tensor([float("inf")])}}, "param_groups": [{"lr": 0.1}]},
        "epoch": 3,
    }
    assert non_finite_entries(state) == ["model/w", "optimizer/state/0/exp_avg"]
    assert non_finite_entries({"model": {"w": torch.ones(2)}}) == []


def test_atomic_saver_never_writes_a_non_finite_model(tmp_path):
    network = torch.nn.Linear(2, 1)
    engine = Engine(lambda engine, batch: None)
    resume = {"model": network, "optimizer": torch.optim.SGD(network.parameters(), lr=0.1)}
    AtomicCheckpointSaver(str(tmp_path), resume, save_interval=1, n_saved=1).attach(engine)
    AtomicCheckpointSaver(str(tmp_path), {"model": network}, save_final=True, final_filename="model.pt").attach(engine)
    engine.run([0], max_epochs=1)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_epoch=1.pt", "model.pt"]
    before = {name: sha256(tmp_path / name) for name in os.listdir(tmp_path)}
    with torch.no_grad():
        network.weight[0, 1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"refusing to write .*model\.pt: weight hold NaN/Inf") as caught:
        engine.run([0], max_epochs=2)  # the interval save fails, then the final save on the exception too
    assert "checkpoint_epoch=2.pt: model/weight hold NaN/Inf" in str(caught.value.__context__)
    assert {name: sha256(tmp_path / name) for name in os.listdir(tmp_path)} == before  # byte for byte, nothing new


# ---------------------------------------------------------------------------------------------- 2. best across resume
class _Scripted(Metric):
    """Key metric whose value at each validation is the next of ``scores``."""

    def __init__(self, scores):
        self.scores = list(scores)
        super().__init__()

    def reset(self):
        pass

    def update(self, output):
        pass

    def compute(self):
        return self.scores.pop(0)


def _train(ckpt_dir: Path, scores, max_epochs: int, resume: bool, keep_best: bool = True) -> SupervisedEvaluator:
    """A trainer whose 'model' is its epoch number, validated each epoch with scripted scores; model.pt is the best."""
    model = torch.nn.Linear(1, 1, bias=False)
    evaluator = SupervisedEvaluator(
        device="cpu", network=torch.nn.Identity(), key_val_metric={"acc": _Scripted(scores)},
        val_data_loader=DataLoader([{"image": torch.zeros(1), "label": torch.zeros(1)}], batch_size=1),
    )
    model_saver = AtomicCheckpointSaver(str(ckpt_dir), {"model": model}, save_key_metric=True,
                                        key_metric_filename="model.pt")
    model_saver.attach(evaluator)
    trainer = Engine(lambda engine, batch: None)
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: model.weight.data.fill_(engine.state.epoch))
    ValidationHandler(1, evaluator).attach(trainer)
    checkpoint = {"trainer": trainer, "model": model}
    if keep_best:
        checkpoint["best_metric"] = BestMetricState(evaluator, model_saver)
    if resume:
        CheckpointLoader(latest_checkpoint(ckpt_dir), checkpoint).attach(trainer)
    AtomicCheckpointSaver(str(ckpt_dir), checkpoint, save_interval=1, n_saved=1).attach(trainer)
    trainer.run([0], max_epochs=max_epochs)
    return evaluator


def _best_epoch_on_disk(ckpt_dir: Path) -> float:
    return torch.load(ckpt_dir / "model.pt", weights_only=True)["weight"].item()


@pytest.mark.parametrize("keep_best", [True, False])
def test_best_model_survives_a_resume(tmp_path, keep_best):
    _train(tmp_path, [0.5, 0.8], max_epochs=2, resume=False, keep_best=keep_best)
    assert _best_epoch_on_disk(tmp_path) == 2.0
    evaluator = _train(tmp_path, [0.6], max_epochs=3, resume=True, keep_best=keep_best)  # worse than epoch 2's 0.8
    if not keep_best:  # what MONAI alone does: the first validation after a resume replaces model.pt
        assert _best_epoch_on_disk(tmp_path) == 3.0
        return
    assert _best_epoch_on_disk(tmp_path) == 2.0
    assert (evaluator.state.best_metric, evaluator.state.best_metric_epoch) == (0.8, 2)
    evaluator = _train(tmp_path, [0.9], max_epochs=4, resume=True)  # better: replaces it
    assert _best_epoch_on_disk(tmp_path) == 4.0
    assert (evaluator.state.best_metric, evaluator.state.best_metric_epoch) == (0.9, 4)


# ---------------------------------------------------------------------------------------------- 3. longer resume
def _schedule_run(
    ckpt_dir: Path, max_epochs: int, resume: bool, refit: bool, stop_after: int | None = None
) -> list[float]:
    """Learning rate each epoch trains at, of a run with a cosine schedule over the config's max_epochs."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs, eta_min=0.01)
    trainer = Engine(lambda engine, batch: optimizer.step())
    lrs: list[float] = []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda engine: lrs.append(optimizer.param_groups[0]["lr"]))
    LrScheduleHandler(scheduler).attach(trainer)
    if refit:
        ResumeLrScheduleHandler(scheduler).attach(trainer)
    checkpoint = {"trainer": trainer, "optimizer": optimizer, "lr_scheduler": scheduler}
    if resume:
        CheckpointLoader(latest_checkpoint(ckpt_dir), checkpoint).attach(trainer)
    AtomicCheckpointSaver(str(ckpt_dir), checkpoint, save_interval=1, n_saved=1).attach(trainer)
    if stop_after is not None:  # interrupted
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=stop_after), lambda engine: engine.terminate())
    trainer.run([0], max_epochs=max_epochs)
    return lrs


@pytest.mark.parametrize("refit", [True, False])
def test_resume_with_more_epochs_follows_the_cosine_of_the_new_length(tmp_path, refit):
    first = _schedule_run(tmp_path, max_epochs=10, resume=False, refit=refit, stop_after=5)
    assert first == pytest.approx([0.01 + 0.99 * (1 + math.cos(math.pi * k / 10)) / 2 for k in range(5)])
    resumed = _schedule_run(tmp_path, max_epochs=20, resume=True, refit=refit)  # epochs 6..20
    assert len(resumed) == 15
    if not refit:  # the restored T_max=10 reaches eta_min at epoch 10, then the cosine climbs back up
        assert max(resumed[5:]) > 10 * min(resumed)
        return
    cosine_of_20 = [0.01 + 0.99 * (1 + math.cos(math.pi * k / 20)) / 2 for k in range(21)]
    assert resumed == pytest.approx(cosine_of_20[5:20])  # as if the run had been started with 20 epochs
    assert all(b < a for a, b in zip(resumed, resumed[1:]))  # then down to about eta_min
    extended = _schedule_run(tmp_path, max_epochs=30, resume=True, refit=refit)  # a finished run, extended
    assert extended == pytest.approx([0.01 + 0.99 * (1 + math.cos(math.pi * k / 30)) / 2 for k in range(20, 30)])
    assert extended[0] > 25 * 0.01  # not stuck at eta_min


def test_resume_lr_handler_refuses_other_schedules():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(TypeError, match="refits a CosineAnnealingLR, got StepLR"):
        ResumeLrScheduleHandler(torch.optim.lr_scheduler.StepLR(optimizer, 2))


# ---------------------------------------------------------------------------------------------- 4./5. run folder
@pytest.fixture
def release_locks():
    """Locks a test takes are released at its end (the process would release them at exit)."""
    locks: list[RunLock] = []
    yield locks
    for lock in locks:
        lock.release()


def test_run_folder_lock_is_exclusive_and_names_its_holder(tmp_path, release_locks):
    lock = claim_run_folder(tmp_path / "models")
    release_locks.append(lock)
    info = json.loads((tmp_path / "models" / ".lock").read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["started"]
    assert claim_run_folder(tmp_path / "models") is lock  # a second claim of this process re-uses its lock
    other = RunLock(tmp_path / "models")  # as another process would: a separate open file, the flock conflicts
    with pytest.raises(RunFolderError, match=rf"in use by another training run \(PID {os.getpid()} on "):
        other.acquire()
    lock.release()
    assert not (tmp_path / "models" / ".lock").exists()
    other.acquire()
    release_locks.append(other)
    other.path.unlink()  # the folder was cleared (the demo deletes a run's folder before a new one)
    assert not other.held
    again = claim_run_folder(tmp_path / "models")
    release_locks.append(again)
    assert again is not other and json.loads(again.path.read_text())["pid"] == os.getpid()


def test_a_dead_run_s_lock_is_taken_over(tmp_path, release_locks):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / ".lock").write_text(json.dumps({"pid": 2**22 + 7, "host": socket.gethostname(), "started": "x"}))
    release_locks.append(claim_run_folder(folder))  # nobody holds the flock: the lock of a dead process
    assert json.loads((folder / ".lock").read_text())["pid"] == os.getpid()


@pytest.mark.slow
def test_a_second_process_fails_at_once_and_a_killed_one_s_lock_is_taken_over(tmp_path, release_locks):
    folder = tmp_path / "models"
    holder = subprocess.Popen(
        [sys.executable, "-c", (f"import time; from monai_prompt.engine.run_folder import claim_run_folder; "
                                f"claim_run_folder({str(folder)!r}); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=rf"PID {holder.pid} on {socket.gethostname()}"):
            claim_run_folder(folder)
        holder.send_signal(signal.SIGKILL)  # a crash: no atexit, the lock file stays
        holder.wait(timeout=30)
        assert json.loads((folder / ".lock").read_text())["pid"] == holder.pid
        release_locks.append(claim_run_folder(folder))
        assert json.loads((folder / ".lock").read_text())["pid"] == os.getpid()
    finally:
        holder.kill()
        holder.stdout.close()


def test_a_new_run_never_silently_replaces_a_previous_one(tmp_path, release_locks):
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("model.pt", "checkpoint_epoch=3.pt", "vit_pretrained.pt"):
        (folder / name).write_bytes(name.encode())
    with pytest.raises(RunFolderError, match=r"holds a previous training run \(checkpoint_epoch=3\.pt, model\.pt\)"
                                             r".*--resume true.*--ckpt_dir.*--overwrite true"):
        claim_run_folder(folder)
    assert not (folder / ".lock").exists()  # a refused run does not keep the folder locked
    release_locks.append(claim_run_folder(folder, resume=True))
    assert (folder / "model.pt").read_bytes() == b"model.pt"
    release_locks.pop().release()
    release_locks.append(claim_run_folder(folder, overwrite=True))
    assert sorted(os.listdir(folder)) == [".lock", "vit_pretrained.pt"]  # the old run's files only


def test_crash_leftovers_are_removed_and_never_resumed_from(tmp_path, release_locks, monkeypatch):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "checkpoint_epoch=2.pt").write_bytes(b"good")
    (folder / "checkpoint_epoch=8.pt").mkdir()  # not a file
    with monkeypatch.context() as patch:  # a crash inside atomic_write: the temporary file stays behind
        patch.setattr(os, "remove", lambda path: None)
        with pytest.raises(KeyboardInterrupt):
            atomic_write(folder / "checkpoint_epoch=9.pt", lambda tmp: (Path(tmp).write_bytes(b"half"), _interrupt()))
    (leftover,) = [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert leftover.name.startswith(".checkpoint_epoch=9.pt.")
    assert latest_checkpoint(folder) == str(folder / "checkpoint_epoch=2.pt")
    release_locks.append(claim_run_folder(folder, resume=True))
    assert not leftover.exists() and (folder / "checkpoint_epoch=2.pt").read_bytes() == b"good"


def _interrupt():
    raise KeyboardInterrupt


# ---------------------------------------------------------------------------------------------- 6. empty splits
def test_check_task_refuses_empty_splits_a_workflow_reads():
    datalist = ClassificationDatalist(["a", "b"], {"training": [{"image": "x.png", "label": 0}],
                                                    "test": [{"image": "y.png", "label": 1}]})
    check_task(datalist, 2, False, ["training", "test"])
    with pytest.raises(ValueError, match=r"no 'validation' images: .*model\.pt would never be written"):
        check_task(datalist, 2, False, ["training", "validation"])
    with pytest.raises(ValueError, match=r"no 'unlabeled' images: choose a split that has images .*'training', 'test'"):
        check_task(datalist, 2, False, ["unlabeled"])


# ---------------------------------------------------------------------------------------------- 7. errors last
def test_format_root_cause_unwraps_monai_s_runtime_errors():
    try:
        try:
            try:
                raise DataCheckError(["/data/a.png: file not found."], "/data/datalist.json")
            except DataCheckError as err:
                wrapped = "Failed to evaluate ConfigExpression: \n\"$check(__local_refs['datalist_file'])\""
                raise RuntimeError(wrapped) from err
        except RuntimeError as err:
            raise RuntimeError('Failed to evaluate ConfigExpression: \n"$run(@x)"') from err
    except RuntimeError as err:
        summary = format_root_cause(err)
    assert summary.splitlines() == [
        'Root cause (Failed to evaluate ConfigExpression: "$check(@datalist_file)"):',
        "DataCheckError: 1 problem(s) in /data/datalist.json:",
        "  - /data/a.png: file not found.",
    ]
    assert format_root_cause(ValueError("plain")) is None
    assert format_root_cause(RuntimeError("Failed to evaluate x")) is None  # nothing wrapped


# ---------------------------------------------------------------------------------------------- 8. data check
def test_data_check_decodes_pixels_and_reports_every_bad_file(tmp_path):
    good = [write_png(tmp_path / f"good{i}.png", seed=i) for i in range(4)]
    truncated_png = tmp_path / "truncated.png"
    truncated_png.write_bytes(good[0].read_bytes()[:200])
    volume = np.random.default_rng(0).random((8, 8, 8))
    truncated_nii = tmp_path / "truncated.nii"
    truncated_nii.write_bytes(write_nifti(tmp_path / "full.nii", volume).read_bytes()[:-500])
    volume[1, 2, 3], volume[0, 0, 0] = np.nan, np.inf
    nan_nii = write_nifti(tmp_path / "nan.nii.gz", volume)
    splits = {"training": [(p, i % 2) for i, p in enumerate(good)] + [(truncated_png, 0), (truncated_nii, 1)],
              "validation": [(nan_nii, 0), (good[0].with_name("good_val.png"), 1)]}
    write_png(tmp_path / "good_val.png", seed=9)
    datalist = write_datalist(tmp_path / "datalist.json", splits)
    with pytest.raises(DataCheckError) as caught:
        check_classification_datalist(datalist)
    problems = caught.value.problems
    assert len(problems) == 3, problems
    assert problems[0].startswith(f"{truncated_png}: pixel data unreadable (OSError: image file is truncated")
    assert problems[1].startswith(f"{truncated_nii}: pixel data unreadable (OSError: Expected ")
    assert problems[2] == f"{nan_nii}: 2 NaN/Inf value(s) of 512; training would get a NaN loss: fix the image or " \
        "drop it."
    summary = check_classification_datalist(datalist, read_pixels=False)  # headers only: the three pass (large sets)
    assert summary.counts == {"training": 6, "validation": 2} and summary.formats == {"pil": 6, "nifti": 2}


def test_labels_outside_num_classes_name_the_file(tmp_path):
    images = [write_png(tmp_path / f"img{i}.png", seed=i) for i in range(6)]
    one_based = write_datalist(tmp_path / "one_based.json",
                               {"training": [(p, 1 + i % 3) for i, p in enumerate(images)]})
    with pytest.raises(DataCheckError) as caught:
        check_classification_datalist(one_based, read_pixels=False, num_classes=3)
    assert caught.value.problems == [
        f"{images[i]}: label 3 is outside 0..2: without a class map, labels must be class indices 0..num_classes-1 "
        f"(num_classes=3) (no image has label 0: are the labels 1-based? subtract 1); renumber them, or name the "
        f"classes (decathlon 'labels' map, --classes)." for i in (2, 5)
    ]
    zero_based = write_datalist(tmp_path / "zero_based.json", {"training": [(p, i % 3) for i, p in enumerate(images)]})
    assert check_classification_datalist(zero_based, read_pixels=False, num_classes=3).classes == ["0", "1", "2"]


def test_check_images_for_inference_inputs(tmp_path):
    good = write_png(tmp_path / "good.png")
    volume = np.zeros((4, 4, 4))
    volume[0, 0, 0] = np.nan
    nan = write_nifti(tmp_path / "nan.nii.gz", volume)
    assert set(check_images([good, str(good)])) == {str(good)}
    with pytest.raises(DataCheckError) as caught:
        check_images([good, tmp_path / "missing.png", nan])
    assert caught.value.problems == [
        f"{tmp_path / 'missing.png'}: file not found.",
        f"{nan}: 1 NaN/Inf value(s) of 64; training would get a NaN loss: fix the image or drop it.",
    ]
    with pytest.raises(DataCheckError, match="no images given"):
        check_images([])


# ---------------------------------------------------------------------------------------------- 10. MLflow
def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    try:
        if status == 404:  # a server answers: reachable (MLflow reports what it wants)
            check_tracking_uri(uri)
        else:
            with pytest.raises(ConnectionError, match=rf"{uri} is unreachable \(HTTP 503"):
                check_tracking_uri(uri)
    finally:
        server.shutdown()
        server.server_close()
    check_tracking_uri("sqlite:///nowhere/mlruns.db")  # not a server


def _tiny_net() -> PromptClassifier:
    torch.manual_seed(0)
    return PromptClassifier(3, "linear", None, "vit_tiny", img_size=32, backbone_overrides=TINY)


def test_unreachable_tracking_server_fails_fast_naming_the_uri(monkeypatch):
    for name in MLFLOW_HTTP_LIMITS:
        monkeypatch.delenv(name, raising=False)
    uri = f"http://127.0.0.1:{_closed_port()}"
    engine = Engine(lambda engine, batch: None)
    MLflowPeftLogger(_tiny_net()).attach(engine)
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
    MLflowPeftLogger(_tiny_net()).attach(trainer)
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


# ---------------------------------------------------------------------------------------------- 14. class report
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
    assert [r.getMessage().split(" although")[0] for r in caplog.records] == [
        "epoch 1: all 6 predictions are class 'b'",
        "epoch 1: all 3 predictions are the same labels ['x']",
    ]
    assert "collapsed to one answer. Lower the learning rate" in caplog.records[0].getMessage()


# ================================================================================ the bundles, end to end
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
    """Item 1: a NaN image reaches training (pixel check off) in a resumed run: stop, nothing written."""
    items = json.loads(tiny_datalist(tiny, tmp_path / "d.json").read_text())["training"]
    items[0] = {"image": str(_nan_image(tmp_path)), "label": 0}
    datalist = tiny_datalist(tiny, tmp_path / "nan" / "datalist.json", training=items)
    return ["train.json"], "train", {"dataset_dir": str(datalist), "check_pixels": False, "resume": True,
                                     "train#trainer#max_epochs": 2}


def _case_learning_rate(tiny, tmp_path, bundle):
    """Item 1: a diverging run (into a new folder: the bundle's models/ stays as it was)."""
    return ["train.json"], "train", {"learning_rate": 1e37, "ckpt_dir": str(tmp_path / "diverged")}


def _case_previous_run(tiny, tmp_path, bundle):
    """Item 4: a new run into a folder that holds one."""
    return ["train.json"], "train", {}


def _case_empty_validation(tiny, tmp_path, bundle):
    """Item 6: no validation images (and none carved out of training)."""
    datalist = tiny_datalist(tiny, tmp_path / "noval" / "datalist.json", validation=[])
    return ["train.json"], "train", {"dataset_dir": str(datalist), "datalist_options": {"split": {"val_fraction": 0}},
                                     "resume": True}


def _case_bad_files(tiny, tmp_path, bundle):
    """Item 8: truncated PNG and NIfTI, NaN pixels and a missing file, all in one error."""
    items = json.loads(tiny_datalist(tiny, tmp_path / "d.json").read_text())["training"]
    volume = write_nifti(tmp_path / "volume.nii.gz", np.random.default_rng(1).random((64, 64)))
    bad = [truncated(Path(items[0]["image"]), tmp_path / "truncated.png"), truncated(volume, tmp_path / "cut.nii.gz"),
           _nan_image(tmp_path), tmp_path / "missing.png"]
    items[:4] = [{"image": str(path), "label": item["label"]} for path, item in zip(bad, items)]
    datalist = tiny_datalist(tiny, tmp_path / "bad" / "datalist.json", training=items)
    return ["train.json"], "train", {"dataset_dir": str(datalist), "resume": True}


def _case_labels_one_based(tiny, tmp_path, bundle):
    """Item 8: index labels 1..3 without a class map, for num_classes 3."""
    content = json.loads(tiny_datalist(tiny, tmp_path / "d.json").read_text())
    shifted = {s: [{**item, "label": item["label"] + 1} for item in content[s]] for s in ("training", "validation")}
    datalist = tmp_path / "one_based" / "datalist.json"
    datalist.parent.mkdir()
    datalist.write_text(json.dumps(shifted))
    return ["train.json"], "train", {"dataset_dir": str(datalist), "num_classes": 3, "resume": True}


def _case_csv_columns(tiny, tmp_path, bundle):
    """Item 8: a CSV whose label column is not called 'label' (the fix: --datalist_options#label_columns)."""
    return ["train.json"], "train", {"dataset_dir": str(_diagnosis_csv(tiny, tmp_path)), "resume": True}


def _diagnosis_csv(tiny: dict, tmp_path: Path) -> Path:
    content = json.loads(tiny_datalist(tiny, tmp_path / "d.json").read_text())
    rows = [f"{item['image']},{CLASSES[item['label']]},{split}" for split in ("training", "validation")
            for item in content[split]]
    path = tmp_path / "diagnosis.csv"
    path.write_text("\n".join(["image,diagnosis,split", *rows]) + "\n")
    return path


def _case_mlflow_down(tiny, tmp_path, bundle):
    """Item 10: --tracking mlflow with a server that is not there."""
    return ["train.json"], "train", {"tracking_uri": f"http://127.0.0.1:{_closed_port()}", "resume": True,
                                     "train#trainer#max_epochs": 2}


def _case_no_images(tiny, tmp_path, bundle):
    """Item 11: inference on a folder without images."""
    (tmp_path / "empty").mkdir()
    return ["inference.json"], "infer", {"input_dir": str(tmp_path / "empty")}


def _case_bad_input(tiny, tmp_path, bundle):
    """Item 8/11: inference checks its inputs."""
    image = truncated(tiny["data"] / "images" / "test" / "dark_0.png", tmp_path / "new.png")
    return ["inference.json"], "infer", {"infer_images": [str(image)]}


def _case_foreign_checkpoint(tiny, tmp_path, bundle):
    """Item 12: --resume_file of another run."""
    other = torch.load(bundle / "models" / "checkpoint_epoch=1.pt", weights_only=True)
    other["run"] = {"run_id": "0" * 32}
    torch.save(other, tmp_path / "other_run.pt")
    return ["train.json"], "train", {"resume": True, "resume_file": str(tmp_path / "other_run.pt"),
                                     "train#trainer#max_epochs": 2}


def _case_corrupt_dicom(tiny, tmp_path, bundle):
    """Already behaving: a truncated DICOM file among the inputs."""
    from pydicom import examples

    dicom = truncated(Path(examples.get_path("ct")), tmp_path / "slice.dcm", keep=0.6)
    return ["inference.json"], "infer", {"infer_images": [str(dicom)]}


def _case_channels(tiny, tmp_path, bundle):
    """Already behaving: images whose channels the network cannot take (grey + alpha into RGB)."""
    Image.fromarray(np.zeros((32, 32, 2), dtype=np.uint8), mode="LA").save(tmp_path / "two_channels.png")
    return ["inference.json"], "infer", {"infer_images": [str(tmp_path / "two_channels.png")]}


def _case_image_size(tiny, tmp_path, bundle):
    """Already behaving: an image size the delta was not trained for."""
    return ["inference.json"], "infer", {"img_size": 64, "input_dir": str(tiny["data"] / "images" / "test")}


def _case_other_method(tiny, tmp_path, bundle):
    """Already behaving: the delta of another method (the command line's method wins over the record)."""
    return ["inference.json"], "infer", {"method": "vpt", "input_dir": str(tiny["data"] / "images" / "test")}


def _case_other_backbone(tiny, tmp_path, bundle):
    """Already behaving: other frozen backbone weights than the delta's."""
    other = write_tiny_backbone(tmp_path / "other_vit.pt", seed=1)
    return ["inference.json"], "infer", {"pretrained": str(other), "input_dir": str(tiny["data"] / "images" / "test")}


def _case_missing_pretrained(tiny, tmp_path, bundle):
    """Already behaving: the pre-trained file is not there."""
    return ["inference.json"], "infer", {"pretrained": str(tmp_path / "vit.safetensors")}


def _case_truncated_pretrained(tiny, tmp_path, bundle):
    """Already behaving: a truncated pre-trained file."""
    return ["inference.json"], "infer", {"pretrained": str(truncated(tiny["backbone"], tmp_path / "vit.pt"))}


def _case_deeper_pretrained(tiny, tmp_path, bundle):
    """Item 9: a pre-trained file deeper than the model (2 blocks into 1)."""
    return ["inference.json"], "infer", {"backbone_overrides": {"num_layers": 1}}


#: case -> (how to run it, the root error's type, its message (regex, matched from the start)).
BUNDLE_FAILURES = {
    "nan-pixels": (_case_nan_pixels, NonFiniteError,
                   r"loss is nan at epoch 2, iteration [123]/3 at learning rate \S+: these images of the batch hold "
                   r"NaN/Inf values: \S+nan\.nii\.gz; fix or drop them "
                   r"\(monai_prompt\.data\.check_classification_datalist lists every such file\)\.$"),
    "learning-rate": (_case_learning_rate, NonFiniteError,
                      r"loss is (nan|inf) at epoch 1, iteration [123]/3 at learning rate 1e\+37: the batch's images "
                      r"are finite \(batch: .*\), so the model diverged: the learning rate is likely too high; start a "
                      r"new run with a lower --learning_rate \(e\.g\. 10x; a resume would restore the old one\)\.$"),
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
    "channels": (_case_channels, ValueError,
                 r"\S+two_channels\.png: 2 channels cannot feed a 3-channel network; set in_channels=2\.$"),
    "image-size": (_case_image_size, DeltaMismatchError,
                   r"\S+models/model\.pt: backbone architecture differs: img_size: \[32, 32\] in the delta vs "
                   r"\[64, 64\] here\.$"),
    "other-method": (_case_other_method, DeltaMismatchError,
                     r"\S+models/model\.pt: delta is for method 'linear', the model uses 'vpt'\.$"),
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
    workflow = run_bundle(bundle, ["train.json"], "train", resume=True, **{**trained[1], "dataset_dir": str(csv_file)},
                          **{"datalist_options#label_columns": "diagnosis"})  # resume of a finished run: checks only
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


def test_find_images_folders_globs_and_lists(tmp_path):
    images = [write_png(tmp_path / name) for name in ("b/2.png", "a/1.png", "a/.hidden.png", ".cache/3.png")]
    (tmp_path / "notes.txt").write_text("not an image")
    assert find_images(tmp_path) == [str(images[1]), str(images[0])]  # recursive, sorted, hidden skipped
    assert find_images(str(tmp_path / "*" / "*.png")) == [str(images[1]), str(images[0])]
    assert find_images([images[0], str(tmp_path / "a" / "*.png"), images[0]]) == [str(images[0]), str(images[1])]
    assert find_images([tmp_path / "gone.png"]) == [str(tmp_path / "gone.png")]  # kept for check_images to report
    assert find_images(tmp_path / "no_such_folder") == [] and find_images(str(tmp_path / "*.jpg")) == []


def test_prediction_saver_writes_a_header_and_the_decision(tmp_path):
    names = [f"/data/{i}.png" for i in range(3)]
    probs = torch.tensor([[0.1, 0.7, 0.2], [0.6, 0.3, 0.9], [0.2, 0.2, 0.6]])
    for multi_label, decisions in ((False, ["b", "c", "c"]), (True, ["b", "a;c", "c"])):
        saver = PredictionSaver(tmp_path, ["a", "b", "c"], multi_label=multi_label)
        engine = Engine(lambda engine, batch: [{"pred": p} for p in batch["pred"]])
        saver.attach(engine)
        batches = [{"image": MetaTensor(torch.zeros(2, 1, 2, 2), meta={"filename_or_obj": names[:2]}),
                    "pred": probs[:2]},
                   {"image": MetaTensor(torch.zeros(1, 1, 2, 2), meta={"filename_or_obj": names[2:]}),
                    "pred": probs[2:]}]
        engine.run(batches)
        with open(tmp_path / "predictions.csv") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["image", "a", "b", "c", "predicted"]
        assert [row[0] for row in rows[1:]] == names and [row[-1] for row in rows[1:]] == decisions
        assert np.allclose([[float(v) for v in row[1:-1]] for row in rows[1:]], probs.numpy())
    with pytest.raises(ValueError, match=r"the network predicts 3 classes but 2 class names \['a', 'b'\]"):
        saver = PredictionSaver(tmp_path, ["a", "b"])
        engine = Engine(lambda engine, batch: [{"pred": p} for p in batch["pred"]])
        saver.attach(engine)
        engine.run([batches[0]])


def test_training_record_round_trip_and_run_id(tmp_path, monkeypatch):
    weights = tmp_path / "vit.pt"
    weights.write_bytes(b"w")
    assert read_training_config(tmp_path / "models") == {}
    with pytest.raises(FileNotFoundError, match=r"no checkpoint_epoch=<N>\.pt of a recorded training run in \S+ to "
                                                r"resume from \(training_config\.json is missing\)"):
        run_id(tmp_path / "models", resume=True)
    first = run_id(tmp_path / "models", resume=False)
    assert first != run_id(tmp_path / "models", resume=False) and len(first) == 32
    monkeypatch.chdir(tmp_path)  # a relative pretrained path is stored absolute
    write_training_config(tmp_path / "models", first, {"pretrained": "vit.pt", "img_size": 32})
    record = read_training_config(tmp_path / "models" / "model.pt")  # a checkpoint file: its folder's record
    assert (record["run_id"], record["pretrained"], record["img_size"]) == (first, str(weights), 32)
    assert run_id(tmp_path / "models", resume=True) == first
    RunIdentity(first).load_state_dict({"run_id": first})
    with pytest.raises(ValueError, match="belongs to training run x, not to the run recorded"):
        RunIdentity(first).load_state_dict({"run_id": "x"})
    (tmp_path / "models" / "training_config.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"training_config\.json is not valid JSON"):
        read_training_config(tmp_path / "models")


# ---------------------------------------------------------------------------------- through the real command line
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
        'Root cause (Failed to evaluate ConfigExpression: "$monai_prompt.data.check_classification_datalist(@datalist_file, '
        'read_pixels=@check_pixels, **@datalist_options)"):'
    )
    assert re.match(message, summary.split("\n", 1)[1].removeprefix(f"{kind.__name__}: ")), summary
    assert "RuntimeError: Failed to evaluate ConfigExpression" in result.stderr  # MONAI's traceback is kept above
    assert written(bundle) == before and "Epoch: 2/" not in result.stdout + result.stderr  # stopped before training


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
                 "train#dataloader#shuffle": False, "train#random_transforms": []}
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


def test_make_setup_reinstalls_torch_only_when_the_spec_changes(tmp_path):
    """The Makefile's torch stamp, with a stand-in venv whose python only prints what it is asked to do."""
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/bin/sh\necho "python $*"\n')
    python.chmod(0o755)

    def setup(*spec: str) -> list[str]:
        result = subprocess.run(["make", "-s", "-C", str(REPO), f"VENV={python.parents[1]}", "setup", *spec],
                                capture_output=True, text=True, check=True, timeout=60)
        return [line for line in result.stdout.splitlines() if "torch" in line]

    cuda = "TORCH_SPEC=torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
    assert setup() == ["python -m pip uninstall -y torch", "python -m pip install torch==2.13.0"]
    assert setup() == []  # installed: nothing to do
    assert setup(cuda) == ["python -m pip uninstall -y torch", f"python -m pip install {cuda.split('=', 1)[1]}"]
    assert setup() == []  # a later make keeps the torch of the last spec given
    assert setup("TORCH_SPEC=torch==2.13.0") == ["python -m pip uninstall -y torch",
                                                 "python -m pip install torch==2.13.0"]
