"""Delta checkpoints through MONAI's ``CheckpointSaver``/``CheckpointLoader``, written atomically.

A delta (:mod:`monai_prompt.peft.delta`) is ``{"model": trainable parameters, "peft": method/config/backbone}``:
the layout an ignite checkpoint of two objects has. :class:`TrainableState` and :class:`PeftMeta` are those two
objects, so bundle configs save and load deltas with MONAI's own handlers::

    "delta": {"peft": {"_target_": "monai_prompt.engine.PeftMeta", "network": "@network"},
              "model": {"_target_": "monai_prompt.engine.TrainableState", "network": "@network"}}
    {"_target_": "monai_prompt.engine.CheckedCheckpointLoader", "load_path": "...", "load_dict": "@delta"}

Loading checks the ``peft`` entry first, so a delta of another method, config or backbone fails with a message
naming the difference; :class:`CheckedCheckpointLoader` names a file it cannot read. :class:`AtomicCheckpointSaver`
is MONAI's ``CheckpointSaver`` writing every file through
a temporary file and a rename, deleting a superseded file only once its successor is complete, and refusing to
write NaN/Inf values. :class:`BestMetricState` carries the best validation score through a resume.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver
from torch import nn

from monai_prompt.io import atomic_write
from monai_prompt.peft.delta import (
    UnreadableCheckpointError,
    check_delta_meta,
    delta_meta,
    delta_model_state,
    load_trainable_state,
    read_checkpoint,
)

__all__ = [
    "AtomicCheckpointSaver",
    "BestMetricState",
    "CheckedCheckpointLoader",
    "NonFiniteError",
    "PeftMeta",
    "TrainableState",
    "latest_checkpoint",
    "non_finite_entries",
    "unwrap",
]

#: file names the interval saver of :class:`AtomicCheckpointSaver` writes (ignite: ``<prefix>_<name>_<score>.pt``).
_INTERVAL_FILE = re.compile(r"checkpoint_epoch=(\d+)\.pt")

logger = logging.getLogger("monai_prompt")


class NonFiniteError(RuntimeError):
    """NaN or infinite values where training needs finite ones (a loss, model weights about to be saved)."""


def non_finite_entries(state: Any, prefix: str = "") -> list[str]:
    """Names (``key/subkey``) of the floating-point tensors in a nested checkpoint dict that hold NaN or Inf.

    Args:
        state: a tensor, or dicts/lists/tuples of them (other values are ignored).
        prefix: name of ``state`` itself.
    """
    if isinstance(state, torch.Tensor):
        inexact = state.is_floating_point() or state.is_complex()
        return [prefix or "tensor"] if inexact and not bool(torch.isfinite(state).all()) else []
    if isinstance(state, Mapping):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return []
    return [
        name for key, value in items for name in non_finite_entries(value, f"{prefix}/{key}" if prefix else f"{key}")
    ]


def unwrap(network: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel``/``DataParallel`` (or ``network`` itself)."""
    if isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return network.module
    return network


class _DeltaPart:
    """One entry of a delta checkpoint, read from / written to ``network``.

    Args:
        network: the (possibly DDP-wrapped) network.
        source: name used in error messages (the checkpoint path).
    """

    def __init__(self, network: nn.Module, source: str = "delta") -> None:
        self.network = network
        self.source = str(source)


class TrainableState(_DeltaPart):
    """The trainable parameters of a network as a checkpoint object.

    ``state_dict()`` returns exactly the parameters with ``requires_grad`` (head included) and the backbone's
    fingerprint (:func:`~monai_prompt.peft.delta.delta_model_state`); ``load_state_dict()`` needs the same names and
    shapes and the same backbone (:func:`~monai_prompt.peft.load_trainable_state`).
    """

    def state_dict(self) -> dict[str, torch.Tensor]:
        return delta_model_state(unwrap(self.network))

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        load_trainable_state(unwrap(self.network), dict(state), self.source)


class PeftMeta(_DeltaPart):
    """The ``peft`` entry of a delta as a checkpoint object.

    ``state_dict()`` is :func:`~monai_prompt.peft.delta_meta` (method, config, backbone fingerprint);
    ``load_state_dict()`` raises :class:`~monai_prompt.peft.DeltaMismatchError` when the checkpoint was made for
    another method, config or backbone. Put it before :class:`TrainableState` in a ``load_dict``.
    """

    def state_dict(self) -> dict[str, Any]:
        return delta_meta(unwrap(self.network))

    def load_state_dict(self, meta: Mapping[str, Any]) -> None:
        check_delta_meta(unwrap(self.network), dict(meta), self.source)


class _AtomicDiskSaver(DiskSaver):
    """ignite ``DiskSaver`` writing through :func:`~monai_prompt.io.atomic_write` (temporary ``.<name>.*.tmp``,
    fsync, rename; the permissions of a file ``open`` creates), with MONAI's optional fixed file name,
    a refusal to write non-finite values, and deletions deferred until the next file is complete (ignite deletes
    the file a new one replaces *before* writing the new one)."""

    def __init__(self, dirname: str, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, require_empty=False, atomic=False)
        self.filename = filename
        self._superseded: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        filename = self.filename or filename
        path = Path(self.dirname, filename)
        bad = non_finite_entries(checkpoint)
        if bad:
            raise NonFiniteError(
                f"refusing to write {path}: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} hold NaN/Inf "
                f"values, so training diverged; the previous checkpoints in {self.dirname} are kept. Check the data "
                f"for NaN/Inf pixels (monai-prompt check-data), or start a new run with a lower --learning_rate."
            )
        if idist.get_rank() == self.save_on_rank:

            def write(tmp: str) -> None:
                with open(tmp, "wb") as handle:
                    torch.save(checkpoint, handle, **self.kwargs)

            atomic_write(path, write, fix=(
                f"Free space on that disk (the checkpoints already in {self.dirname} are kept) and continue the "
                f"run with --resume true, or train into a folder on another disk with --ckpt_dir <folder>."
            ))
        for old in self._superseded:
            if old != filename:
                super().remove(old)
        self._superseded.clear()

    def remove(self, filename: str) -> None:
        if self.filename is None:  # a fixed name is replaced in place by the next save
            self._superseded.append(filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI ``CheckpointSaver`` that never leaves a half-written or missing checkpoint behind.

    Each file is written to a temporary name and renamed into place (MONAI builds ignite's ``DiskSaver`` with
    ``atomic=False``; ignite's atomic mode also grants group/others read access, which was MONAI's reason), and a
    file being superseded (``n_saved``, a fixed ``key_metric_filename``/``final_filename``) is removed only after
    its successor is complete, so a crash at any moment leaves the last good checkpoint. Arguments are those of
    :class:`monai.handlers.CheckpointSaver`.

    A checkpoint holding a NaN or infinite floating-point tensor (weights, optimizer moments) is never written:
    :class:`NonFiniteError` is raised before any file changes, so ``model.pt`` and the last good
    ``checkpoint_epoch=<N>.pt`` stay as they were. :meth:`state_dict` complements MONAI's :meth:`load_state_dict`
    (the key-metric ranking), for :class:`BestMetricState`.
    """

    def __init__(self, save_dir: str, save_dict: dict, **kwargs: Any) -> None:
        super().__init__(save_dir, save_dict, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                fixed_name = getattr(checkpoint.save_handler, "filename", None)
                checkpoint.save_handler = _AtomicDiskSaver(str(save_dir), fixed_name)

    def state_dict(self) -> dict[str, Any]:
        """The key-metric ranking (ignite ``Checkpoint`` state: ``{"_saved": [(score, file name), ...]}``), the
        state MONAI's :meth:`load_state_dict` restores.

        Raises:
            ValueError: the saver does not save by key metric (``save_key_metric=False``).
        """
        if self._key_metric_checkpoint is None:
            raise ValueError("this saver has no key-metric checkpoint (save_key_metric=False), so no best score.")
        ranking = self._key_metric_checkpoint.state_dict()["_saved"]
        return {"_saved": [[float(score), str(name)] for score, name in ranking]}


class CheckedCheckpointLoader(CheckpointLoader):
    """MONAI ``CheckpointLoader`` whose unreadable file (truncated, damaged) ends the run with an error naming it and
    the fix (:class:`~monai_prompt.peft.UnreadableCheckpointError`), where ``torch.load`` names no file. Arguments
    are those of :class:`monai.handlers.CheckpointLoader`; the file is read once, and only checked again after a
    failure."""

    def __call__(self, engine: Engine) -> None:
        if not Path(self.load_path).is_file():
            raise FileNotFoundError(
                f"{self.load_path} does not exist: there is no trained model to load. Train the bundle first "
                "(configs/train.json writes models/model.pt), point --ckpt_dir at a trained run's models/ folder, or "
                "give --load_path <a model.pt>."
            )
        max_epochs = engine.state.max_epochs
        schedule_steps = {name: obj.total_steps for name, obj in self.load_dict.items() if hasattr(obj, "total_steps")}
        try:
            super().__call__(engine)
        except Exception:
            if max_epochs is not None and engine.state.epoch > max_epochs:  # MONAI's check after loading a trainer
                raise ValueError(
                    f"resume: {self.load_path} has trained {engine.state.epoch} epochs, more than this run's "
                    f"--train#trainer#max_epochs {max_epochs}; to train longer, resume with --train#trainer#max_epochs "
                    f"above {engine.state.epoch} (nothing was changed)."
                ) from None
            read_checkpoint(
                self.load_path,
                fix=(
                    "copy it again from where it came from, train again to rewrite it (configs/train.json with "
                    "--overwrite true), or point --load_path at a good file"
                ),
            )  # raises the error naming the file when it cannot be read
            raise
        for name, steps in schedule_steps.items():
            saved = self.load_dict[name].total_steps
            if saved != steps:  # a one-cycle schedule's length is saved with it: the run would stop at its end
                raise ValueError(
                    f"resume: {self.load_path} holds a {name} schedule of {saved} steps but this run's has {steps} "
                    "(--train#trainer#max_epochs times the iterations per epoch); resume with the interrupted run's "
                    "--train#trainer#max_epochs, --batch_size and data, or start a new run with --overwrite true."
                )
        if max_epochs is not None and engine.state.epoch == max_epochs:
            logger.warning(
                f"resume: {self.load_path} has trained all {max_epochs} epochs of --train#trainer#max_epochs "
                f"{max_epochs}: nothing left to train. To train longer, resume with --train#trainer#max_epochs above "
                f"{max_epochs}."
            )


class BestMetricState:
    """The best validation score so far, as a checkpoint object for the trainer's resume checkpoint.

    MONAI keeps the best key metric in two places that a resumed run starts empty: the evaluator's
    ``state.best_metric``/``best_metric_epoch`` (what ``StatsHandler`` reports) and the key-metric saver's
    ranking (what decides whether ``model.pt`` is replaced). Without them the first validation after a resume
    replaces ``model.pt`` whatever its score. Put this object in the trainer's checkpoint dict (saved by the
    interval saver after each epoch's validation, loaded by MONAI's ``CheckpointLoader``)::

        "train#checkpoint#best_metric": {"_target_": "monai_prompt.engine.BestMetricState",
                                          "evaluator": "@validate#evaluator", "saver": "@validate#model_saver"}

    Args:
        evaluator: the validation engine (a MONAI ``Evaluator``).
        saver: the :class:`AtomicCheckpointSaver` attached to it with ``save_key_metric=True``.
    """

    def __init__(self, evaluator: Engine, saver: AtomicCheckpointSaver) -> None:
        self.evaluator = evaluator
        self.saver = saver

    def state_dict(self) -> dict[str, Any]:
        state = self.evaluator.state
        return {
            "best_metric": float(state.best_metric),
            "best_metric_epoch": int(state.best_metric_epoch),
            "saver": self.saver.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.evaluator.state.best_metric = float(state["best_metric"])
        self.evaluator.state.best_metric_epoch = int(state["best_metric_epoch"])
        self.saver.load_state_dict({"_saved": [tuple(item) for item in state["saver"]["_saved"]]})


def latest_checkpoint(ckpt_dir: str | Path, run_id: str | None = None) -> str:
    """The readable ``checkpoint_epoch=<N>.pt`` of the highest epoch in ``ckpt_dir``, to resume training from (never
    a temporary file of an interrupted write: those are ``.checkpoint_epoch=<N>.pt.<random>.tmp``).

    A newer checkpoint that cannot be read (truncated or damaged) is skipped with a warning naming it and the
    checkpoint the run resumes from instead.

    Args:
        ckpt_dir: the checkpoint folder.
        run_id: only checkpoints of this training run (their ``run`` entry, :class:`~monai_prompt.runs.RunIdentity`).

    Raises:
        FileNotFoundError: there is no readable one (of that run), naming the files passed over and the fix.
    """
    found = sorted(
        ((int(match.group(1)), path) for path in Path(ckpt_dir).glob("checkpoint_epoch=*.pt")
         if (match := _INTERVAL_FILE.fullmatch(path.name)) and path.is_file()),
        reverse=True,
    )
    unreadable: list[str] = []
    others: list[str] = []
    for _, path in found:
        run, error = _run_of(path)
        if error is not None:
            unreadable.append(f"{path.name}: unreadable, {error}")
            logger.warning(f"resume: {path} cannot be read ({error}): it is truncated or damaged; passed over.")
        elif run_id is not None and run != run_id:
            others.append(f"{path.name}: of another run, ignored")
        else:
            if unreadable:
                logger.warning(
                    f"resume: continuing from {path.name}, the newest readable checkpoint of this run, instead of "
                    f"{unreadable[0].split(':')[0]}; the epochs after it are trained again."
                )
            return str(path)
    of_run = f" of training run {run_id}" if run_id is not None else ""
    passed = f" ({'; '.join(unreadable + others)})" if unreadable or others else ""
    damaged = " Delete the damaged files, then" if unreadable else ""
    raise FileNotFoundError(
        f"no readable checkpoint_epoch=<N>.pt{of_run} in {ckpt_dir} to resume from{passed};{damaged} train once "
        f"without --resume (--overwrite true replaces the folder's run), or point --ckpt_dir at the folder that holds "
        f"the run's checkpoints."
    )


def _run_of(path: Path) -> tuple[str | None, str | None]:
    """The run id a resumable checkpoint was saved with (None: none recorded), and why the file cannot be read (None:
    it can)."""
    try:
        checkpoint = read_checkpoint(path, mmap=True)
    except UnreadableCheckpointError as err:
        return None, err.reason
    run = checkpoint.get("run") if isinstance(checkpoint, Mapping) else None
    return (run.get("run_id") if isinstance(run, Mapping) else None), None
