"""Progress lines of an in-process bundle run: one line per epoch (:class:`EpochProgress`, attached by
:func:`attach_progress`) and the numbered, timed steps of a longer job (:class:`RunSteps`), timed by
:mod:`monai_prompt.engine.eta` as the bundles' own time-left lines are."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from monai_prompt.engine.eta import TimeLeft, clock

__all__ = ["EpochProgress", "RunSteps", "attach_progress", "format_timings"]

_print = functools.partial(print, flush=True)


class EpochProgress:
    """Print one line per epoch: mean training loss, validation metrics, seconds per epoch and the time left.

    Args:
        label: what is training (start of each line).
        validator: the engine whose metrics (e.g. ``val_accuracy``) to show, if any.
        print_fn: where lines go.
    """

    def __init__(self, label: str, validator=None, print_fn: Callable[[str], None] = _print) -> None:
        self.label = label
        self.validator = validator
        self.print_fn = print_fn
        self._time_left = TimeLeft()
        self._losses: list[float] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)

    def _started(self, engine) -> None:
        self._time_left.start(engine.state.epoch)

    def _iteration(self, engine) -> None:
        output = engine.state.output
        loss = (output[0] if isinstance(output, list) else output)["loss"]
        self._losses.append(loss.detach().item() if hasattr(loss, "detach") else float(loss))

    def _epoch(self, engine) -> None:
        done, total = engine.state.epoch, engine.state.max_epochs
        _, per_epoch, left = self._time_left.update(done, total)
        mean_loss = sum(self._losses) / max(len(self._losses), 1)
        parts = [f"{self.label} epoch {done:>{len(str(total))}}/{total}", f"loss {mean_loss:.4f}"]
        self._losses.clear()
        if self.validator is not None:
            metrics = self.validator.state.metrics
            parts += ["val " + " ".join(f"{name.removeprefix('val_')} {value:.3f}" for name, value in metrics.items())]
        self.print_fn(f"  {'  '.join(parts)}  | {per_epoch:.1f} s/epoch, {clock(left)} left")


def attach_progress(progress: EpochProgress, validator_id: str | None = None) -> Callable:
    """An ``attach`` hook for :func:`~monai_prompt.runs.runner.run_bundle` that attaches ``progress`` to
    ``train#trainer``.

    Args:
        progress: the progress lines.
        validator_id: the engine whose metrics the lines show (e.g. ``"validate#evaluator"``), if any.
    """

    def attach(workflow) -> None:
        if validator_id is not None:
            progress.validator = workflow.parser.get_parsed_content(validator_id)
        progress.attach(workflow.parser.get_parsed_content("train#trainer"))

    return attach


class RunSteps:
    """The numbered, timed steps of a job (a demo): each prints ``[i/n] title`` and records its seconds under a key.

    Args:
        total: the number of steps.
        print_fn: where lines go.
    """

    def __init__(self, total: int, print_fn: Callable[[str], None]) -> None:
        self.total, self.print_fn, self.done = total, print_fn, 0
        self.timings: dict[str, float] = {}
        self._start = time.monotonic()

    @contextlib.contextmanager
    def step(self, key: str, title: str) -> Iterator[None]:
        """Print the step's line, run the block and record its duration as ``timings[key]``."""
        self.done += 1
        self.print_fn(f"[{self.done}/{self.total}] {title}")
        start = time.monotonic()
        yield
        self.timings[key] = time.monotonic() - start

    def report(self, key: str, status: str, path: Path) -> None:
        """The indented line after a step: what it did (``built``, ``reused``, ...) to which file, in how long."""
        self.print_fn(f"  {status} {path} ({clock(self.timings[key])})")

    def rounded(self) -> dict[str, float]:
        """Every step's seconds and ``total_s`` since the start, to 0.1 s."""
        return {key: round(value, 1) for key, value in
                {**self.timings, "total_s": time.monotonic() - self._start}.items()}


def format_timings(timings: Mapping[str, float]) -> str:
    """:meth:`RunSteps.rounded`'s seconds as ``<step> <m>m<s>s, ...`` (the ``_s`` of each key dropped)."""
    return ", ".join(f"{key.removesuffix('_s')} {clock(seconds)}" for key, seconds in timings.items())
