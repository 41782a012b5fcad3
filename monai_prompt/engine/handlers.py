"""ignite handlers for PEFT training: the trainable-parameter report, peak memory per epoch, a stop at the first
non-finite loss, and the cosine schedule rebuilt for a resumed run's length."""

from __future__ import annotations

import logging
import math
import resource
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from monai.handlers import from_engine
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR

from monai_prompt.engine.checkpoint import NonFiniteError, unwrap
from monai_prompt.peft.report import format_report, trainable_report

__all__ = [
    "NonFiniteGuard",
    "PeakMemoryHandler",
    "ResumeLrScheduleHandler",
    "TrainableReportHandler",
    "batch_images",
    "peak_memory_mb",
    "process_status_mib",
]


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


def process_status_mib(field: str) -> float:
    """A memory field of this process's ``/proc/self/status`` (Linux) in MiB: ``VmHWM`` (the resident set's peak),
    ``VmRSS`` (its current size), ...

    Args:
        field: the field name, without the colon.

    Raises:
        OSError: there is no ``/proc/self/status`` (not Linux).
        KeyError: it has no such field.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**10  # kB
    raise KeyError(f"/proc/self/status has no {field}")


def peak_memory_mb(device: torch.device | str) -> float:
    """Peak memory in MiB: CUDA max allocated on ``device`` for a GPU, else the process's peak resident set.

    On Linux the resident peak is ``VmHWM`` of ``/proc/self/status`` (:func:`process_status_mib`): ``ru_maxrss``
    would also count the memory of the parent process that started this one (Linux carries it over ``exec``).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return process_status_mib("VmHWM")
    except (OSError, KeyError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


class PeakMemoryHandler:
    """Record peak memory of each epoch in ``engine.state.metrics`` and the log.

    On CUDA the allocator's peak is reset when an epoch starts, so the value is that epoch's
    ``torch.cuda.max_memory_allocated`` (metric ``peak_gpu_memory_mb``). On CPU it is the process's peak resident
    set size so far (``peak_rss_mb``; the OS keeps no per-epoch peak). Under DDP it is the highest of the
    processes', logged by rank 0 only. Attach it before ``StatsHandler`` and ``MLFlowHandler`` so they report it with
    the epoch's other metrics.

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
        processes = idist.get_world_size()
        if processes > 1:
            value = float(idist.all_reduce(value, op="MAX"))
        engine.state.metrics[self.metric_name] = value
        if idist.get_rank() == 0:
            of = f" (the highest of {processes} processes)" if processes > 1 else ""
            self.logger.info(f"epoch {engine.state.epoch}: {self.metric_name} {value:.1f}{of}")


def batch_images(batch: Any, image_key: str = "image") -> list[tuple[str, torch.Tensor]]:
    """``(file name, image)`` of each image of an engine's batch, collated (``{"image": [B, ...]}``) or decollated
    (``[{"image": ...}, ...]``, MONAI's default); the name is MONAI's ``filename_or_obj`` metadata, else
    ``batch item <i>``."""
    if isinstance(batch, Mapping):
        images = batch.get(image_key)
        if not isinstance(images, torch.Tensor):
            return []
        names = getattr(images, "meta", {}).get("filename_or_obj", [])
        names = [names] if isinstance(names, str) else list(names)
        return [(str(names[i]) if i < len(names) else f"batch item {i}", image) for i, image in enumerate(images)]
    found = []
    for index, item in enumerate(batch if isinstance(batch, Sequence) else ()):
        image = item.get(image_key) if isinstance(item, Mapping) else None
        if isinstance(image, torch.Tensor):
            found.append((str(getattr(image, "meta", {}).get("filename_or_obj", f"batch item {index}")), image))
    return found


class NonFiniteGuard:
    """Stop training at the first iteration whose loss is NaN or infinite, naming the likely cause.

    Attached to a trainer, it raises :class:`~monai_prompt.engine.NonFiniteError` (so the run ends with a
    non-zero exit and no further checkpoint) whose message gives the epoch, the iteration and the learning rate,
    and either the batch's images that hold NaN/Inf values (a data problem: fix or drop those files) or, when
    the images are finite, that the model diverged (the learning rate is likely too high; with AMP, an fp16
    overflow).

    Args:
        output_transform: ``engine.state.output`` to the loss (default: ``"loss"`` of MONAI's decollated output).
        image_key: key of the images in ``engine.state.batch``.
    """

    def __init__(self, output_transform: Callable | None = None, image_key: str = "image") -> None:
        self.output_transform = output_transform or from_engine(["loss"], first=True)
        self.image_key = image_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        loss = torch.as_tensor(self.output_transform(engine.state.output))
        if bool(torch.isfinite(loss).all()):
            return
        state = engine.state
        where = f"epoch {state.epoch}, iteration {(state.iteration - 1) % state.epoch_length + 1}/{state.epoch_length}"
        optimizer = getattr(engine, "optimizer", None)
        lr = f" at learning rate {optimizer.param_groups[0]['lr']:g}" if optimizer is not None else ""
        images = batch_images(state.batch, self.image_key)
        bad = [name for name, image in images if not bool(torch.isfinite(image).all())]
        if bad:
            cause = (
                f"these images of the batch hold NaN/Inf values: {', '.join(bad)}; fix or drop them "
                f"(monai_prompt.data.check_classification_datalist lists every such file)."
            )
        else:
            amp = " or, with amp, an fp16 overflow (try --amp false)" if getattr(engine, "amp", False) else ""
            files = f" (batch: {', '.join(name for name, _ in images)})" if images else ""
            cause = (
                f"the batch's images are finite{files}, so the model diverged: the learning rate is likely too "
                f"high{amp}; continue from the last checkpoint with --resume true and a lower --learning_rate (e.g. "
                f"10x), or start a new run with one."
            )
        raise NonFiniteError(f"loss is {loss.flatten()[0].item()} at {where}{lr}: {cause}")


class ResumeLrScheduleHandler:
    """Rebuild a restored ``CosineAnnealingLR`` for the run's ``max_epochs`` when a resumed run is longer (or
    shorter), and apply the run's learning rate and weight decay where the resumed optimizer state holds others.

    A resume restores the schedule's ``T_max`` with the rest of its state, so raising ``max_epochs`` on resume
    would leave the cosine at its old length: the learning rate reaches ``eta_min`` at the old last epoch and
    then climbs back up (the cosine is periodic), and a finished run extended would train on at ``eta_min``. When
    an epoch starts with ``T_max != max_epochs`` this handler sets ``T_max = max_epochs`` and each learning rate to
    the new cosine at the current position ``t`` (``last_epoch``): ``eta_min + (base - eta_min) * (1 + cos(pi t /
    max_epochs)) / 2``, the rate a run started with the new ``max_epochs`` would have now. PyTorch's recursive
    cosine step then follows that curve down to ``eta_min`` at the new last epoch. A run that was not resumed has
    ``T_max == max_epochs`` and is left alone.

    A resume also restores the optimizer's and the schedule's learning rate and weight decay, so ``--resume true
    --learning_rate <x>`` would keep the old ones without a word: when ``learning_rate`` differs from the restored
    schedule's base rate it becomes the base rate (the cosine continues from it at the current position), and a
    different ``weight_decay`` replaces the restored one; each change is logged. A resume also restores the epoch
    length in iterations, so another ``--batch_size`` (or other training data) cannot apply: refused.

    Args:
        lr_scheduler: the trainer's cosine schedule, stepped once per epoch (MONAI ``LrScheduleHandler``).
        learning_rate: the run's configured (base) learning rate; None: keep what a resume restores.
        weight_decay: the run's configured weight decay; None: keep what a resume restores.
        name: logger name.
    """

    def __init__(
        self,
        lr_scheduler: CosineAnnealingLR,
        learning_rate: float | None = None,
        weight_decay: float | None = None,
        name: str = "monai_prompt",
    ) -> None:
        if not isinstance(lr_scheduler, CosineAnnealingLR):
            raise TypeError(f"ResumeLrScheduleHandler refits a CosineAnnealingLR, got {type(lr_scheduler).__name__}.")
        self.lr_scheduler = lr_scheduler
        self.learning_rate = None if learning_rate is None else float(learning_rate)
        self.weight_decay = None if weight_decay is None else float(weight_decay)
        self.logger = logging.getLogger(name)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self._check_epoch_length(engine)
        scheduler, max_epochs = self.lr_scheduler, engine.state.max_epochs
        groups = scheduler.optimizer.param_groups
        self._apply_weight_decay(groups)
        old_length, old_base = scheduler.T_max, scheduler.base_lrs[0]
        new_rate = self.learning_rate is not None and any(base != self.learning_rate for base in scheduler.base_lrs)
        if scheduler.T_max == max_epochs and not new_rate:
            return
        position = scheduler.last_epoch
        scheduler.T_max = max_epochs
        if new_rate:
            scheduler.base_lrs = [self.learning_rate] * len(groups)
            for group in groups:
                group["initial_lr"] = self.learning_rate
        progress = (1 + math.cos(math.pi * position / max_epochs)) / 2
        for group, base in zip(groups, scheduler.base_lrs):
            group["lr"] = scheduler.eta_min + (base - scheduler.eta_min) * progress
        scheduler._last_lr = [group["lr"] for group in groups]
        if new_rate:
            self.logger.warning(
                f"resume: learning_rate {self.learning_rate:g} applied in place of the run's {old_base:g} (the "
                f"resumed optimizer state's); the cosine schedule continues from it at epoch {position} (learning "
                f"rate {scheduler.get_last_lr()[0]:g})."
            )
        if old_length != max_epochs:
            self.logger.info(
                f"learning-rate schedule: cosine over {old_length} epochs rebuilt for max_epochs={max_epochs} at epoch "
                f"{position} (learning rate {scheduler.get_last_lr()[0]:g}, down to {scheduler.eta_min:g} at epoch "
                f"{max_epochs})."
            )

    @staticmethod
    def _check_epoch_length(engine: Engine) -> None:
        """Refuse a data loader whose length differs from the restored epoch length (ignite would go on counting
        epochs in the recorded number of iterations, silently using part of the data or repeating it)."""
        try:
            batches = len(engine.state.dataloader)
        except TypeError:  # an iterable without a length: nothing to compare
            return
        if engine.state.epoch_length is not None and batches != engine.state.epoch_length:
            raise ValueError(
                f"the resumed run's epochs are {engine.state.epoch_length} iterations, this run's training data "
                f"loader gives {batches} batches: --batch_size or the training data changed, which a resume cannot "
                f"apply. Resume with the run's batch size and data, or start a new run with --overwrite true (or "
                f"into another --ckpt_dir)."
            )

    def _apply_weight_decay(self, groups: list[dict[str, Any]]) -> None:
        """Set the configured weight decay where a resume restored another, and say so."""
        if self.weight_decay is None:
            return
        restored = sorted({group.get("weight_decay") for group in groups} - {self.weight_decay}, key=str)
        if not restored:
            return
        for group in groups:
            group["weight_decay"] = self.weight_decay
        self.logger.warning(
            f"resume: weight_decay {self.weight_decay:g} applied in place of the run's "
            f"{', '.join(f'{value:g}' for value in restored)} (the resumed optimizer state's)."
        )
