"""Training a user can trust: non-finite stops, best-across-resume, resumed schedules, run-folder lock and
leftovers, empty splits, errors shown last, pixel-level data checks, unreachable tracking, per-class reports."""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import math
import os
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
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from monai.data import DataLoader, MetaTensor
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import CheckpointLoader, LrScheduleHandler, MLFlowHandler, ValidationHandler
from PIL import Image
from sklearn.metrics import confusion_matrix, multilabel_confusion_matrix, precision_recall_fscore_support

from monai_prompt.data import DataCheckError, check_datalist, check_images
from monai_prompt.data.datalist import ClassificationDatalist
from monai_prompt.engine import (
    AtomicCheckpointSaver,
    BestMetricState,
    ClassReportHandler,
    MLflowPeftLogger,
    NonFiniteError,
    NonFiniteGuard,
    ResumeLrScheduleHandler,
    RunFolderError,
    RunLock,
    check_task,
    check_tracking_uri,
    claim_run_folder,
    format_root_cause,
    latest_checkpoint,
    non_finite_entries,
    per_class_scores,
)
from monai_prompt.engine.tracking import MLFLOW_HTTP_LIMITS
from monai_prompt.io import atomic_write
from monai_prompt.nets import PromptClassifier

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
def _schedule_run(ckpt_dir: Path, max_epochs: int, resume: bool, refit: bool) -> list[float]:
    """Learning rate of each epoch of a run with a cosine schedule over the config's max_epochs."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs, eta_min=0.01)
    trainer = Engine(lambda engine, batch: optimizer.step())
    lrs: list[float] = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: lrs.append(optimizer.param_groups[0]["lr"]))
    LrScheduleHandler(scheduler).attach(trainer)
    if refit:
        ResumeLrScheduleHandler(scheduler).attach(trainer)
    checkpoint = {"trainer": trainer, "optimizer": optimizer, "lr_scheduler": scheduler}
    if resume:
        CheckpointLoader(latest_checkpoint(ckpt_dir), checkpoint).attach(trainer)
    AtomicCheckpointSaver(str(ckpt_dir), checkpoint, save_interval=1, n_saved=1).attach(trainer)
    if not resume:  # the first run is interrupted after epoch 5 of its 10
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=5), lambda engine: engine.terminate())
    trainer.run([0], max_epochs=max_epochs)
    return lrs


@pytest.mark.parametrize("refit", [True, False])
def test_resume_with_more_epochs_continues_the_cosine_down_to_eta_min(tmp_path, refit):
    first = _schedule_run(tmp_path, max_epochs=10, resume=False, refit=refit)
    expected_first = [0.01 + 0.99 * (1 + math.cos(math.pi * k / 10)) / 2 for k in range(5)]
    assert first == pytest.approx(expected_first)
    resumed = _schedule_run(tmp_path, max_epochs=20, resume=True, refit=refit)  # epochs 6..20
    assert len(resumed) == 15
    if not refit:  # the restored T_max=10 reaches eta_min at epoch 10, then the cosine climbs back up
        assert max(resumed[5:]) > 10 * min(resumed)
        return
    # from the rate at position t=5, eta_min + (lr_5 - eta_min) * (1 + cos(pi k / 20)) / (1 + cos(pi 5 / 20))
    lr_5 = 0.01 + 0.99 * (1 + math.cos(math.pi * 5 / 10)) / 2
    expected = [0.01 + (lr_5 - 0.01) * (1 + math.cos(math.pi * k / 20)) / (1 + math.cos(math.pi * 5 / 20))
                for k in range(5, 20)]
    assert resumed == pytest.approx(expected)
    assert all(b <= a for a, b in zip([first[-1], *resumed], resumed))  # no jump, non-increasing
    assert resumed[-1] < 0.01 + 0.01 * (lr_5 - 0.01)  # the last epoch trains at about eta_min


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


@pytest.mark.slow
def test_bundle_run_prints_the_data_error_last_and_exits_non_zero(tmp_path):
    good = write_png(tmp_path / "good.png")
    datalist = write_datalist(tmp_path / "datalist.json", {"training": [(good, 0), (tmp_path / "missing.png", 1)]})
    config = {
        "imports": ["$import monai_prompt", "$import monai_prompt.data", "$import monai_prompt.engine"],
        "datalist_file": str(datalist),
        "initialize": ["$monai_prompt.engine.show_cause_last()", "$monai_prompt.data.check_datalist(@datalist_file)"],
        "run": ["$print('ran')"],
    }
    (tmp_path / "train.json").write_text(json.dumps(config))
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(tmp_path / "train.json")], check=False,
        capture_output=True, text=True, cwd=tmp_path, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode != 0 and "ran" not in result.stdout
    last = result.stderr.rstrip().splitlines()[-3:]
    assert last == [
        'Root cause (Failed to evaluate ConfigExpression: "$monai_prompt.data.check_datalist(@datalist_file)"):',
        f"DataCheckError: 1 problem(s) in {datalist}:",
        f"  - {tmp_path / 'missing.png'}: file not found.",
    ], result.stderr[-2000:]
    assert "RuntimeError: Failed to evaluate ConfigExpression" in result.stderr  # MONAI's traceback is kept above


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
        check_datalist(datalist)
    problems = caught.value.problems
    assert len(problems) == 3, problems
    assert problems[0].startswith(f"{truncated_png}: pixel data unreadable (OSError: image file is truncated")
    assert problems[1].startswith(f"{truncated_nii}: pixel data unreadable (OSError: Expected ")
    assert problems[2] == f"{nan_nii}: 2 NaN/Inf value(s) of 512; training would get a NaN loss: fix the image or " \
        "drop it."
    summary = check_datalist(datalist, read_pixels=False)  # headers only: the three pass (very large sets)
    assert summary.counts == {"training": 6, "validation": 2} and summary.formats == {"pil": 6, "nifti": 2}


def test_labels_outside_num_classes_name_the_file(tmp_path):
    images = [write_png(tmp_path / f"img{i}.png", seed=i) for i in range(6)]
    one_based = write_datalist(tmp_path / "one_based.json",
                               {"training": [(p, 1 + i % 3) for i, p in enumerate(images)]})
    with pytest.raises(DataCheckError) as caught:
        check_datalist(one_based, read_pixels=False, num_classes=3)
    assert caught.value.problems == [
        f"{images[i]}: label 3 is outside 0..2: without a class map, labels must be class indices 0..num_classes-1 "
        f"(num_classes=3) (no image has label 0: are the labels 1-based? subtract 1); renumber them, or name the "
        f"classes (decathlon 'labels' map, --classes)." for i in (2, 5)
    ]
    zero_based = write_datalist(tmp_path / "zero_based.json", {"training": [(p, i % 3) for i, p in enumerate(images)]})
    assert check_datalist(zero_based, read_pixels=False, num_classes=3).classes == ["0", "1", "2"]


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
