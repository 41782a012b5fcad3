"""Delta checkpoints through MONAI's ``CheckpointSaver``/``CheckpointLoader``, written atomically.

A delta (:mod:`monai_prompt.peft.delta`) is ``{"model": trainable parameters, "peft": method/config/backbone}``:
the layout an ignite checkpoint of two objects has. :class:`TrainableState` and :class:`PeftMeta` are those two
objects, so bundle configs save and load deltas with MONAI's own handlers::

    "delta": {"peft": {"_target_": "monai_prompt.engine.PeftMeta", "network": "@network"},
              "model": {"_target_": "monai_prompt.engine.TrainableState", "network": "@network"}}
    {"_target_": "CheckpointLoader", "load_path": "...", "load_dict": "@delta"}

Loading checks the ``peft`` entry first, so a delta of another method, config or backbone fails with a message
naming the difference. :class:`AtomicCheckpointSaver` is MONAI's ``CheckpointSaver`` writing every file through
a temporary file and a rename, deleting a superseded file only once its successor is complete, and refusing to
write NaN/Inf values. :class:`BestMetricState` carries the best validation score through a resume.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointSaver
from torch import nn

from monai_prompt.io import atomic_write
from monai_prompt.peft.delta import check_delta_meta, delta_meta, delta_model_state, load_trainable_state

__all__ = [
    "AtomicCheckpointSaver",
    "BestMetricState",
    "NonFiniteError",
    "PeftMeta",
    "TrainableState",
    "latest_checkpoint",
    "non_finite_entries",
    "unwrap",
]

#: file names the interval saver of :class:`AtomicCheckpointSaver` writes (ignite: ``<prefix>_<name>_<score>.pt``).
_INTERVAL_FILE = re.compile(r"checkpoint_epoch=(\d+)\.pt")


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

            atomic_write(path, write)
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
    """The ``checkpoint_epoch=<N>.pt`` of the highest epoch in ``ckpt_dir``, to resume training from (never a
    temporary file of an interrupted write: those are ``.checkpoint_epoch=<N>.pt.<random>.tmp``).

    Args:
        ckpt_dir: the checkpoint folder.
        run_id: only checkpoints of this training run (their ``run`` entry, :class:`~monai_prompt.runs.RunIdentity`).

    Raises:
        FileNotFoundError: there is none (of that run), with the fix.
    """
    found = sorted(
        (int(match.group(1)), str(path))
        for path in Path(ckpt_dir).glob("checkpoint_epoch=*.pt")
        if (match := _INTERVAL_FILE.fullmatch(path.name)) and path.is_file()
    )
    others = []
    if run_id is not None:
        others = [Path(path).name for _, path in found if _run_of(path) != run_id]
        found = [(epoch, path) for epoch, path in found if Path(path).name not in others]
    if not found:
        of_run = f" of training run {run_id}" if run_id is not None else ""
        ignored = f" ({', '.join(others)}: of another run, ignored)" if others else ""
        raise FileNotFoundError(
            f"no checkpoint_epoch=<N>.pt{of_run} in {ckpt_dir} to resume from{ignored}; train once without --resume "
            f"(or point --ckpt_dir at the folder that holds them)."
        )
    return found[-1][1]


def _run_of(path: str) -> str | None:
    """The run id a resumable checkpoint was saved with (None: none recorded, or the file is unreadable)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - a damaged file is not a checkpoint of this run
        return None
    run = checkpoint.get("run") if isinstance(checkpoint, Mapping) else None
    return run.get("run_id") if isinstance(run, Mapping) else None
