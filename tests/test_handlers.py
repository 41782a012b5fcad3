"""The ignite handlers of ``monai_prompt.engine.handlers``: the trainable-parameter report and peak memory, the stop on
a non-finite loss that names its cause, and the cosine schedule refitted to a longer resumed run."""

from __future__ import annotations

import math
import os
import resource
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import DataLoader, MetaTensor
from monai.engines import SupervisedTrainer
from monai.handlers import CheckpointLoader, LrScheduleHandler

from monai_prompt.engine import (
    AtomicCheckpointSaver,
    NonFiniteError,
    NonFiniteGuard,
    PeakMemoryHandler,
    ResumeLrScheduleHandler,
    TrainableReportHandler,
    latest_checkpoint,
)
from net_support import tiny_classifier


def test_report_and_peak_memory_handlers(capsys):
    net = tiny_classifier("linear")
    resident = []  # resident pages during each iteration (Linux /proc/self/statm)
    engine = Engine(lambda engine, batch: resident.append(int(Path("/proc/self/statm").read_text().split()[1])))
    TrainableReportHandler(net).attach(engine)
    PeakMemoryHandler("cpu").attach(engine)
    engine.run([0, 1], max_epochs=2)
    assert "trainable = " in capsys.readouterr().out and engine.state.trainable_report["trainable"] == 32 * 3 + 3
    # in MiB, between the resident set seen while running and the kernel's max RSS (KiB) of this process (1 MiB
    # slack: the kernel updates its peak counters lazily)
    seen_mib = max(resident) * os.sysconf("SC_PAGE_SIZE") / 2**20
    max_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    assert seen_mib - 1 <= engine.state.metrics["peak_rss_mb"] <= max_rss_mib + 1


@pytest.mark.parametrize("rank", [0, 1])
def test_peak_memory_under_ddp_is_the_highest_of_the_processes_logged_once(rank, monkeypatch, caplog):
    import ignite.distributed as idist

    monkeypatch.setattr(idist, "get_world_size", lambda: 2)
    monkeypatch.setattr(idist, "get_rank", lambda: rank)
    monkeypatch.setattr(idist, "all_reduce", lambda value, op: max(value, 1e6) if op == "MAX" else None)
    engine = Engine(lambda engine, batch: None)
    PeakMemoryHandler("cpu").attach(engine)
    with caplog.at_level("INFO", logger="monai_prompt"):
        engine.run([0], max_epochs=1)
    assert engine.state.metrics["peak_rss_mb"] == 1e6  # the other process's
    lines = [r.getMessage() for r in caplog.records if r.name == "monai_prompt"]
    assert lines == (["epoch 1: peak_rss_mb 1000000.0 (the highest of 2 processes)"] if rank == 0 else [])


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


def _schedule_run(
    ckpt_dir: Path, max_epochs: int, resume: bool, refit: bool, stop_after: int | None = None, lr: float = 1.0,
    weight_decay: float = 0.0, optimizers: list | None = None, data: tuple = (0,),
) -> list[float]:
    """Learning rate each epoch trains at, of a run with a cosine schedule over the config's max_epochs (the
    optimizer appended to ``optimizers``)."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=lr, weight_decay=weight_decay)
    if optimizers is not None:
        optimizers.append(optimizer)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs, eta_min=0.01)
    trainer = Engine(lambda engine, batch: optimizer.step())
    lrs: list[float] = []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda engine: lrs.append(optimizer.param_groups[0]["lr"]))
    LrScheduleHandler(scheduler).attach(trainer)
    if refit:
        ResumeLrScheduleHandler(scheduler, learning_rate=lr, weight_decay=weight_decay).attach(trainer)
    checkpoint = {"trainer": trainer, "optimizer": optimizer, "lr_scheduler": scheduler}
    if resume:
        CheckpointLoader(latest_checkpoint(ckpt_dir), checkpoint).attach(trainer)
    AtomicCheckpointSaver(str(ckpt_dir), checkpoint, save_interval=1, n_saved=1).attach(trainer)
    if stop_after is not None:  # interrupted
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=stop_after), lambda engine: engine.terminate())
    trainer.run(list(data), max_epochs=max_epochs)
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


@pytest.mark.parametrize("refit", [True, False])
def test_resume_applies_a_new_learning_rate_and_weight_decay_and_says_so(tmp_path, refit, caplog):
    _schedule_run(tmp_path, max_epochs=10, resume=False, refit=refit, stop_after=5)
    optimizers: list = []
    resumed = _schedule_run(tmp_path, max_epochs=10, resume=True, refit=refit, lr=0.1, weight_decay=0.5,
                            optimizers=optimizers)  # epochs 6..10
    if not refit:  # what a resume alone does: the checkpoint's rate and weight decay, without a word
        assert resumed[0] == pytest.approx(0.01 + 0.99 * (1 + math.cos(math.pi * 5 / 10)) / 2)
        assert optimizers[0].param_groups[0]["weight_decay"] == 0.0 and "resume:" not in caplog.text
        return
    assert resumed == pytest.approx([0.01 + 0.09 * (1 + math.cos(math.pi * k / 10)) / 2 for k in range(5, 10)])
    assert optimizers[0].param_groups[0]["weight_decay"] == 0.5
    assert ("resume: learning_rate 0.1 applied in place of the run's 1 (the resumed optimizer state's); the cosine "
            "schedule continues from it at epoch 5 (learning rate 0.055).") in caplog.text
    assert "resume: weight_decay 0.5 applied in place of the run's 0 (the resumed optimizer state's)." in caplog.text
    with pytest.raises(ValueError, match=r"^the resumed run's epochs are 1 iterations, this run's training data loader "
                       r"gives 2 batches: --batch_size or the training data changed, which a resume cannot apply\."):
        _schedule_run(tmp_path, max_epochs=12, resume=True, refit=refit, data=(0, 1))


def test_resume_lr_handler_refuses_other_schedules():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(TypeError, match="refits a CosineAnnealingLR, got StepLR"):
        ResumeLrScheduleHandler(torch.optim.lr_scheduler.StepLR(optimizer, 2))
