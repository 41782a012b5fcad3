"""ignite handlers for PEFT training: the trainable-parameter report and peak memory per epoch."""

from __future__ import annotations

import logging
import resource
import sys

import torch
import torch.nn as nn
from ignite.engine import Engine, Events

from monai_prompt.engine.checkpoint import unwrap
from monai_prompt.peft.report import format_report, trainable_report

__all__ = ["PeakMemoryHandler", "TrainableReportHandler", "peak_memory_mb"]


class TrainableReportHandler:
    """Print :func:`~monai_prompt.peft.format_report` and log a one-line summary when the engine starts.

    The report is also kept on ``engine.state.trainable_report`` for other handlers.

    Args:
        network: the (possibly DDP-wrapped) network being trained.
        name: logger name.
    """

    def __init__(self, network: nn.Module, name: str = "monai_prompt") -> None:
        self.network = network
        self.logger = logging.getLogger(name)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        report = trainable_report(unwrap(self.network))
        engine.state.trainable_report = report
        print(format_report(report), flush=True)
        self.logger.info(
            f"{report['method']}: {report['trainable']:,} trainable of {report['total']:,} parameters "
            f"({report['percent_of_backbone']:.3f}% of the backbone)"
        )


def peak_memory_mb(device: torch.device | str) -> float:
    """Peak memory in MiB: CUDA max allocated on ``device`` for a GPU, else the process's peak resident set.

    On Linux the resident peak is ``VmHWM`` of ``/proc/self/status``: ``ru_maxrss`` would also count the memory of
    the parent process that started this one (Linux carries it over ``exec``).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


class PeakMemoryHandler:
    """Record peak memory of each epoch in ``engine.state.metrics`` and the log.

    On CUDA the allocator's peak is reset when an epoch starts, so the value is that epoch's
    ``torch.cuda.max_memory_allocated`` (metric ``peak_gpu_memory_mb``). On CPU it is the process's peak resident
    set size so far (``peak_rss_mb``; the OS keeps no per-epoch peak). Attach it before ``StatsHandler`` and
    ``MLFlowHandler`` so they report it with the epoch's other metrics.

    Args:
        device: the training device.
        name: logger name.
    """

    def __init__(self, device: torch.device | str, name: str = "monai_prompt") -> None:
        self.device = torch.device(device)
        self.metric_name = "peak_gpu_memory_mb" if self.device.type == "cuda" else "peak_rss_mb"
        self.logger = logging.getLogger(name)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def epoch_started(self, engine: Engine) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def epoch_completed(self, engine: Engine) -> None:
        value = peak_memory_mb(self.device)
        engine.state.metrics[self.metric_name] = value
        self.logger.info(f"epoch {engine.state.epoch}: {self.metric_name} {value:.1f}")
