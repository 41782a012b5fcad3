"""``engine/eta.py``: the time left of training (``EtaHandler`` on an ignite engine) and of FPT's preload
(``ProgressLog``), with a fake clock; quiet on the non-zero ranks of a process group."""

from __future__ import annotations

import logging

import pytest
import torch.distributed as dist
from ignite.engine import Engine, Events

from monai_prompt.engine import EtaHandler, ProgressLog, TimeLeft, clock


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "monai_prompt"]


def run_training(timer: FakeClock, interval: float, resume_at: int = 0, epochs: int = 2, length: int = 3) -> None:
    """An engine whose iterations take 2 s each (fake clock); ``resume_at``: a checkpoint loader attached after the
    handler (as the bundles attach theirs) sets the iteration reached by an earlier run at ``STARTED``."""

    def step(engine, batch):
        timer.now += 2.0

    engine = Engine(step)
    EtaHandler(interval=interval, timer=timer).attach(engine)
    if resume_at:
        def resume(engine):
            engine.state.iteration, engine.state.epoch = resume_at, resume_at // length

        engine.add_event_handler(Events.STARTED, resume)
    engine.run(range(length), max_epochs=epochs)


def test_time_left_counts_from_its_start():
    timer = FakeClock()
    time_left = TimeLeft(timer)
    with pytest.raises(RuntimeError, match="before start"):
        time_left.update(1, 4)
    time_left.start(done=2)  # a resumed job: two steps done before
    timer.now += 30
    assert time_left.update(5, 8) == (30.0, 10.0, 30.0)
    assert clock(125.4) == "2m05s"


def test_training_logs_the_time_left_at_each_epoch_end(caplog):
    caplog.set_level(logging.INFO, logger="monai_prompt")
    run_training(FakeClock(), interval=1e9)
    assert lines(caplog) == [
        "time left (epoch 1/2): 3/6 iterations, 0m06s elapsed, 2 s/iteration, 0m06s left",
        "time left (epoch 2/2): 6/6 iterations, 0m12s elapsed, 2 s/iteration, 0m00s left",
    ]


def test_lines_within_an_epoch_follow_the_interval_and_a_resume_counts_its_own_rate(caplog):
    caplog.set_level(logging.INFO, logger="monai_prompt")
    run_training(FakeClock(), interval=3.0, epochs=1, length=5)  # 2 s per iteration: every other one
    assert [line.split(": ")[1].split(",")[0] for line in lines(caplog)] == [
        "2/5 iterations", "4/5 iterations", "5/5 iterations"]
    caplog.clear()
    run_training(FakeClock(), interval=1e9, resume_at=3, epochs=3)  # epoch 2 and 3 left
    assert lines(caplog) == [
        "time left (epoch 2/3): 6/9 iterations, 0m06s elapsed, 2 s/iteration, 0m06s left",
        "time left (epoch 3/3): 9/9 iterations, 0m12s elapsed, 2 s/iteration, 0m00s left",
    ]


def test_preload_progress_and_quiet_on_other_ranks(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="monai_prompt")
    timer = FakeClock()
    log = ProgressLog("FPT preload", unit="image", interval=10.0, timer=timer)
    log(0, 40, "")  # starts the clock, no rate yet: no line
    for done in (8, 16, 24, 32, 40):
        timer.now += 4.0
        log(done, 40, f"{done} computed, 0 already cached")
    assert lines(caplog) == [
        "FPT preload (24 computed, 0 already cached): 24/40 images, 0m12s elapsed, 0.5 s/image, 0m08s left",
        "FPT preload (40 computed, 0 already cached): 40/40 images, 0m20s elapsed, 0.5 s/image, 0m00s left",
    ]
    caplog.clear()
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    run_training(FakeClock(), interval=0.0)
    other = ProgressLog("FPT preload", unit="image", interval=0.0, timer=timer)
    other(0, 2, ""), other(2, 2, "")
    assert lines(caplog) == []
