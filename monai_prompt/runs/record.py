"""What a training run records about itself, so that its bundle's other workflows need no repeated overrides and
``--resume`` only continues the same run.

When a new training run starts (after the data checks) it writes ``<ckpt_dir>/training_config.json``: a run id and
the settings that define its network and data (backbone, its overrides and weights, image size, channels, method
and config, classes). ``evaluate.json`` and ``inference.json`` read the record of their ``ckpt_dir``
(:func:`read_training_config`), so ``model.pt`` is rebuilt as it was trained; a value given on the command line
replaces the config entry that reads the record, so it wins. Every resumable checkpoint holds the run id
(:class:`RunIdentity`); a resume picks the newest ``checkpoint_epoch=<N>.pt`` of the recorded run
(:func:`~monai_prompt.engine.latest_checkpoint` with ``run_id``) and refuses a checkpoint of another run, and
settings that define the network and data set otherwise than recorded (:func:`check_resumed_settings`). A tracked
training run also names its MLflow run beside its checkpoints (:data:`TRAINING_RUN_FILE`, written by
:class:`~monai_prompt.engine.MLflowPeftLogger`; here for the tools that copy a run's folder).
"""

from __future__ import annotations

import datetime
import json
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai_prompt.engine.tracking import TRAINING_RUN_FILE
from monai_prompt.io import atomic_write

__all__ = [
    "TRAINING_CONFIG",
    "TRAINING_RUN_FILE",
    "RunIdentity",
    "check_resumed_settings",
    "read_training_config",
    "recorded_method_config",
    "run_id",
    "write_training_config",
]

#: the record's file name in the checkpoint folder.
TRAINING_CONFIG = "training_config.json"


def _record_path(path: str | os.PathLike) -> Path:
    """The record of a checkpoint folder, or of the folder holding a checkpoint file (e.g. ``models/model.pt``)."""
    path = Path(path)
    folder = path if path.is_dir() or not path.suffix else path.parent
    return folder / TRAINING_CONFIG


def read_training_config(
    path: str | os.PathLike, required: bool = False, untrained: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The training record of a checkpoint folder or of the folder of a checkpoint file; ``{}`` when there is none
    and it is not ``required``.

    Args:
        path: the checkpoint folder (``models/``) or a file in it (``models/model.pt``).
        required: a missing record is an error naming what to run or give (evaluation and inference build the
            trained network from it).
        untrained: with ``required``, what a missing record reads as while the folder holds no delta
            (``model.pt``) either: the settings of the network a bundle builds before any training, which MONAI's
            property checks and ``verify_net_in_out`` instantiate. A delta without its record is an error.

    Raises:
        FileNotFoundError: a ``required`` record is missing, naming what to run or give instead.
        ValueError: the record exists but is not a JSON object, naming the file and the fix.
    """
    record = _record_path(path)
    if not record.is_file():
        if not required:
            return {}
        if untrained is not None and not (record.parent / "model.pt").exists():
            return dict(untrained)
        raise FileNotFoundError(
            f"{record} does not exist: it records the network the delta was trained with (img_size, backbone, "
            f"method_config, classes, ...), which evaluation and inference build. Train the bundle first "
            f"(configs/train.json writes it beside models/model.pt), point --ckpt_dir at the trained run's models/ "
            f"folder, or give the settings as --training_config \"{{...}}\"; `monai-prompt package <bundle> --out "
            f"<folder>` makes a copy of a trained bundle whose configs hold them."
        )
    try:
        content = json.loads(record.read_text())
    except ValueError as err:
        raise ValueError(
            f"{record} is not valid JSON ({err}); delete it and give the training settings (--backbone, "
            f"--img_size, ...) on the command line, or train again."
        ) from None
    if not isinstance(content, dict):
        raise ValueError(f"{record} holds {type(content).__name__}, not the JSON object a training run writes.")
    return content


def recorded_method_config(
    record: Mapping[str, Any], method: str, changes: Mapping[str, Any], ckpt_dir: str | os.PathLike
) -> dict[str, Any]:
    """The method config evaluation and inference build: the recorded one with the command line's ``changes``.

    Args:
        record: the training record (:func:`read_training_config`).
        method: the method the workflow builds (the record's, or the command line's ``--method``).
        changes: the command line's changes to the recorded config (``--method_config#num_tokens 7``).
        ckpt_dir: the record's folder, named in the error.

    Raises:
        ValueError: ``method`` is not the recorded one (the recorded config holds another method's keys, and the
            delta another method's weights), naming both and the fix.
    """
    recorded = record.get("method")
    if recorded is not None and method != recorded:
        raise ValueError(
            f"--method {method!r} is not the method the delta was trained with: {_record_path(ckpt_dir)} records "
            f"{recorded!r} (method_config {record.get('method_config')}), and a delta holds one method's weights. "
            f"Leave --method out (the recorded method is used), or train a {method!r} run into another --ckpt_dir."
        )
    return dict(record["method_config"], **changes)


def write_training_config(ckpt_dir: str | os.PathLike, run: str, settings: Mapping[str, Any]) -> Path | None:
    """Record this training run: ``{"run_id", "started", **settings}`` to ``<ckpt_dir>/training_config.json``,
    atomically, on rank 0 only. A ``pretrained`` value naming an existing file is stored as an absolute path, so
    that workflows run from another folder find it.

    Args:
        ckpt_dir: the run's checkpoint folder.
        run: the run id (:func:`run_id`).
        settings: what defines the network and data, JSON-serialisable.

    Returns:
        the record's path (None on ranks other than 0).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() > 0:
        return None
    content = {"run_id": run, "started": datetime.datetime.now().isoformat("T", "seconds"), **settings}
    pretrained = content.get("pretrained")
    if isinstance(pretrained, str) and os.path.exists(pretrained):
        content["pretrained"] = os.path.abspath(pretrained)
    text = json.dumps(content, indent=2, default=str) + "\n"

    def write(tmp: str) -> None:
        Path(tmp).write_text(text)

    return atomic_write(_record_path(ckpt_dir), write)


def run_id(ckpt_dir: str | os.PathLike, resume: bool) -> str:
    """A new run id, or for a resume the id recorded in ``<ckpt_dir>/training_config.json``.

    Raises:
        FileNotFoundError: ``resume`` is set and the folder holds no record of a run to resume, with the fix.
    """
    if not resume:
        return uuid.uuid4().hex
    recorded = read_training_config(ckpt_dir).get("run_id")
    if not recorded:
        raise FileNotFoundError(
            f"no checkpoint_epoch=<N>.pt of a recorded training run in {ckpt_dir} to resume from "
            f"({TRAINING_CONFIG} is missing); train once without --resume (or point --ckpt_dir at the run's folder)."
        )
    return str(recorded)


#: recorded settings a resume does not compare: the weights' path may move; the delta's backbone fingerprint
#: refuses other weights when the checkpoint loads.
_NOT_COMPARED = ("pretrained",)


def check_resumed_settings(ckpt_dir: str | os.PathLike, settings: Mapping[str, Any]) -> None:
    """Refuse a resume whose settings that define the network and data (``training_record``: backbone, method and
    config, image size, classes, ...) differ from those the run recorded: a resumed run keeps the network its
    checkpoints were trained with. (The recipe a resume can change, learning rate, weight decay and epochs, is
    applied by :class:`~monai_prompt.engine.ResumeLrScheduleHandler`, which logs it.)

    Args:
        ckpt_dir: the run's checkpoint folder.
        settings: this run's ``training_record``.

    Raises:
        ValueError: a setting differs, naming each with its recorded and its new value, and the fix.
    """
    record = read_training_config(ckpt_dir)
    changed = [
        f"--{key} {_as_json(value)} (recorded: {_as_json(record[key])})"
        for key, value in settings.items()
        if key in record and key not in _NOT_COMPARED and _as_json(value) != _as_json(record[key])
    ]
    if changed:
        raise ValueError(
            f"--resume true continues training run {record.get('run_id')} of {_record_path(ckpt_dir)}, whose network "
            f"and data were built with other settings: {'; '.join(changed)}. A resumed run keeps them: drop these "
            f"overrides, or start a new run with --overwrite true (or into another --ckpt_dir)."
        )


def _as_json(value: Any) -> str:
    """``value`` as the record writes it (tuples as lists, keys sorted), for comparison and messages."""
    return json.dumps(value, sort_keys=True, default=str)


class RunIdentity:
    """The run id as a checkpoint object: saved with every resumable checkpoint, and checked when one is loaded.

    Args:
        run: this run's id (:func:`run_id`).
    """

    def __init__(self, run: str) -> None:
        self.run = run

    def state_dict(self) -> dict[str, str]:
        return {"run_id": self.run}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("run_id") != self.run:
            raise ValueError(
                f"the checkpoint belongs to training run {state.get('run_id')}, not to the run recorded in "
                f"{TRAINING_CONFIG} ({self.run}); resume from a checkpoint of that run (leave --resume_file unset to "
                f"pick its newest), or start a new run with --overwrite true."
            )
