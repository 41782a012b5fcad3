"""Time left of a long job: :class:`TimeLeft` (elapsed time, seconds per step, time left at the rate so far),
:class:`ProgressLog` (a logged progress line with it, on rank 0 only, at most every ``interval`` seconds) and
:class:`EtaHandler` (the ignite handler that logs a training run's time left). The demos' epoch lines
(:mod:`monai_prompt.runs.progress`) and FPT's preload (``monai-prompt preload``, the bundles' ``initialize``) use
the same pieces."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch.distributed as dist
from ignite.engine import Engine, Events

__all__ = ["EtaHandler", "ProgressLog", "TimeLeft", "clock", "is_main_process"]


def clock(seconds: float) -> str:
    """``seconds`` as ``<minutes>m<seconds>s``, e.g. ``2m05s``."""
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m{seconds:02d}s"


def is_main_process() -> bool:
    """False on the non-zero ranks of an initialised process group (``torchrun``): they log no progress."""
    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


class TimeLeft:
    """Elapsed time, seconds per step and the time left of a job, at the rate since :meth:`start`.

    Args:
        timer: seconds of a monotonic clock (tests pass a fake one).
    """

    def __init__(self, timer: Callable[[], float] = time.monotonic) -> None:
        self.timer = timer
        self.started: tuple[float, int] | None = None

    def start(self, done: int = 0) -> None:
        """Count the rate from now, with ``done`` steps already done (a resumed run's)."""
        self.started = (self.timer(), done)

    def update(self, done: int, total: int) -> tuple[float, float, float]:
        """``(elapsed seconds, seconds per step, seconds left)`` with ``done`` of ``total`` steps done.

        Raises:
            RuntimeError: :meth:`start` was not called.
        """
        if self.started is None:
            raise RuntimeError("TimeLeft.update before start().")
        since, first = self.started
        elapsed = self.timer() - since
        per_step = elapsed / max(done - first, 1)
        return elapsed, per_step, max(total - done, 0) * per_step


class ProgressLog:
    """Log ``<label>: <done>/<total> <unit>s, <elapsed> elapsed, <s>/<unit>, <left> left`` at most every
    ``interval`` seconds (always at the last step or when forced), on rank 0 only.

    The first call starts the clock (nothing is logged then, there is no rate yet); call it with the steps done so
    far before the work starts.

    Args:
        label: what progresses (start of each line).
        unit: one step's name (``iteration``, ``image``).
        interval: least seconds between two lines (0: every call).
        logger: logger name.
        timer: seconds of a monotonic clock (tests pass a fake one).
    """

    def __init__(
        self,
        label: str,
        unit: str = "step",
        interval: float = 30.0,
        logger: str = "monai_prompt",
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label, self.unit, self.interval = label, unit, interval
        self.logger = logging.getLogger(logger)
        self.time_left = TimeLeft(timer)
        self._last_line = 0.0

    def __call__(self, done: int, total: int, detail: str = "", force: bool = False) -> None:
        """Record ``done`` of ``total`` steps; log the line when due.

        Args:
            done: steps done.
            total: steps of the whole job.
            detail: more words for the line (e.g. the epoch).
            force: log now whatever ``interval`` says.
        """
        if self.time_left.started is None:
            self.time_left.start(done)
            self._last_line = self.time_left.started[0]
            return
        now = self.time_left.timer()
        if not (force or done >= total or now - self._last_line >= self.interval) or not is_main_process():
            return
        self._last_line = now
        elapsed, per_step, left = self.time_left.update(done, total)
        where = f" ({detail})" if detail else ""
        self.logger.info(
            f"{self.label}{where}: {done}/{total} {self.unit}s, {clock(elapsed)} elapsed, "
            f"{per_step:.3g} s/{self.unit}, {clock(left)} left"
        )


class EtaHandler:
    """Log a training run's time left: at every epoch end and, within an epoch, at most every ``interval`` seconds
    (rank 0 only under ``torchrun``). The rate counts from the run's first epoch (a resumed run's own), validation
    included, so the time left is that of the whole run: ``max_epochs x epoch_length`` iterations.

    Args:
        interval: least seconds between two lines within an epoch.
        logger: logger name.
        timer: seconds of a monotonic clock (tests pass a fake one).
    """

    def __init__(
        self, interval: float = 60.0, logger: str = "monai_prompt", timer: Callable[[], float] = time.monotonic
    ) -> None:
        self.progress = ProgressLog("time left", "iteration", interval, logger, timer)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._log, True)

    def _epoch_started(self, engine: Engine) -> None:
        if self.progress.time_left.started is None:  # after a resume's checkpoint loader set the iteration
            self._log(engine)

    def _iteration(self, engine: Engine) -> None:
        length = engine.state.epoch_length
        if length and engine.state.iteration % length:  # the epoch's last one: the epoch end logs
            self._log(engine)

    def _log(self, engine: Engine, force: bool = False) -> None:
        state = engine.state
        if not state.epoch_length:  # a data loader of unknown length: no total to count down from
            return
        total = state.max_epochs * state.epoch_length
        self.progress(state.iteration, total, f"epoch {state.epoch}/{state.max_epochs}", force)
