"""Delta checkpoints through MONAI's ``CheckpointSaver``/``CheckpointLoader``, written atomically.

A delta (:mod:`monai_prompt.peft.delta`) is ``{"model": trainable parameters, "peft": method/config/backbone}``:
the layout an ignite checkpoint of two objects has. :class:`TrainableState` and :class:`PeftMeta` are those two
objects, so bundle configs save and load deltas with MONAI's own handlers::

    "delta": {"peft": {"_target_": "monai_prompt.engine.PeftMeta", "network": "@network"},
              "model": {"_target_": "monai_prompt.engine.TrainableState", "network": "@network"}}
    {"_target_": "CheckpointLoader", "load_path": "...", "load_dict": "@delta"}

Loading checks the ``peft`` entry first, so a delta of another method, config or backbone fails with a message
naming the difference. :class:`AtomicCheckpointSaver` is MONAI's ``CheckpointSaver`` writing every file through
a temporary file and a rename, and deleting a superseded file only once its successor is complete.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointSaver

from monai_prompt.peft.delta import check_delta_meta, delta_meta, load_trainable_state, trainable_state

__all__ = ["AtomicCheckpointSaver", "PeftMeta", "TrainableState", "latest_checkpoint", "unwrap"]

#: file names the interval saver of :class:`AtomicCheckpointSaver` writes (ignite: ``<prefix>_<name>_<score>.pt``).
_INTERVAL_FILE = re.compile(r"checkpoint_epoch=(\d+)\.pt$")


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

    ``state_dict()`` returns exactly the parameters with ``requires_grad`` (head included);
    ``load_state_dict()`` needs the same names and shapes (:func:`~monai_prompt.peft.load_trainable_state`).
    """

    def state_dict(self) -> dict[str, torch.Tensor]:
        return trainable_state(unwrap(self.network))

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
    """ignite ``DiskSaver`` with ``atomic=True``, MONAI's optional fixed file name, and deletions deferred until the
    next file is complete (ignite deletes the file a new one replaces *before* writing the new one)."""

    def __init__(self, dirname: str, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, require_empty=False, atomic=True)
        self.filename = filename
        self._superseded: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        filename = self.filename or filename
        super().__call__(checkpoint, filename, metadata)
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
    """

    def __init__(self, save_dir: str, save_dict: dict, **kwargs: Any) -> None:
        super().__init__(save_dir, save_dict, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                fixed_name = getattr(checkpoint.save_handler, "filename", None)
                checkpoint.save_handler = _AtomicDiskSaver(str(save_dir), fixed_name)


def latest_checkpoint(ckpt_dir: str | Path) -> str:
    """The ``checkpoint_epoch=<N>.pt`` of the highest epoch in ``ckpt_dir``, to resume training from.

    Raises:
        FileNotFoundError: there is none, with the fix.
    """
    found = sorted(
        (int(match.group(1)), str(path))
        for path in Path(ckpt_dir).glob("checkpoint_epoch=*.pt")
        if (match := _INTERVAL_FILE.search(path.name))
    )
    if not found:
        raise FileNotFoundError(
            f"no checkpoint_epoch=<N>.pt in {ckpt_dir} to resume from; train once without --resume "
            f"(or point --ckpt_dir at the folder that holds them)."
        )
    return found[-1][1]
