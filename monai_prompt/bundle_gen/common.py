"""Config pieces every task template shares (:mod:`~monai_prompt.bundle_gen.classification` for classification,
:mod:`~monai_prompt.bundle_gen.segmentation`): paths, device, backbone and method settings, data loading,
delta checkpoints, the optimiser and schedule, resumable training state (run id, best score), the first steps of a
training run (errors shown last, run-folder lock, the training record), engines, handlers (parameter report, peak
memory, non-finite stop, schedule refit on resume, MLflow) and the DDP overrides. The task templates add the
network, transforms, loss, metrics and the data checks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from monai_prompt.bundle_gen.specs import BundleSpec

__all__ = [
    "DICT_SETTINGS",
    "EVALUATOR",
    "FROM_PRED_LABEL",
    "IMPORTS",
    "IN_BACKWARD_AUTOCAST",
    "INTENSITY_WINDOW",
    "IN_BACKWARD_SETTING",
    "RANK0_WAIT",
    "REPORT_EVALUATION",
    "SDPA_SETTING",
    "SHOW_CAUSE_LAST",
    "TRAIN_RUN",
    "backbone_settings",
    "compose",
    "dataset",
    "delta",
    "delta_loader",
    "device_settings",
    "evaluate_handlers",
    "evaluator",
    "inference_tracking",
    "inference_workflow",
    "initialize",
    "loader",
    "metrics",
    "multi_gpu_config",
    "optimization",
    "paths",
    "recorded",
    "train_checkpointing",
    "train_handlers",
    "train_settings",
    "trainer",
    "validate_handlers",
    "method_config_ref",
    "training_record",
    "with_flags",
]

#: the modules the expressions use (``_target_`` components import their own).
IMPORTS = (
    "$import torch",
    "$import monai_prompt",
    "$import monai_prompt.data",
    "$import monai_prompt.engine",
    "$import monai_prompt.runs",
)
EVALUATOR = {
    "_target_": "SupervisedEvaluator",
    "device": "@device",
    "network": "@network",
    "amp": "@flags#amp",
}
#: the prediction and label of an engine's output, as MONAI's metric handlers read them.
FROM_PRED_LABEL = "$monai.handlers.from_engine(['pred', 'label'])"
#: first step of every workflow's ``initialize``: the root cause of a failure is printed last.
SHOW_CAUSE_LAST = "$monai_prompt.runs.show_cause_last()"
_SEED = "$monai.utils.set_determinism(seed=@seed)"
_WARN_IF_NOT_PRETRAINED = "$monai_prompt.runs.warn_if_not_pretrained(@pretrained)"
#: every boolean setting as its uses read it: ``@flags#<setting>``.
_FLAG_USE = re.compile(r"@flags#(\w+)")
#: second step of every workflow's ``initialize``: every boolean setting read once, a bad value refused early.
FLAGS = "@flags"
#: under DDP, the other ranks wait here for rank 0 (a step that only rank 0 runs comes before it: FPT's preload), for
#: up to 12 hours, not NCCL's 10 minutes (on a group of its own)
RANK0_WAIT = "$monai_prompt.runs.wait_for_rank0()"
#: the trainer-state checkpoint handlers reference the trainer, so they are attached to it here rather than listed
#: in ``train#handlers`` (which the trainer references: a cycle); they run after the listed handlers. The run's last
#: line says what it reached and where the best model is.
TRAIN_RUN = (
    "$@train#checkpoint_loader.attach(@train#trainer) if @flags#resume else None",
    "$@train#checkpoint_saver.attach(@train#trainer)",
    "$monai_prompt.runs.delete_previous_run_after_checkpoint(@train#trainer, @ckpt_dir)",
    "$@train#trainer.run()",
    "$monai_prompt.engine.report_training(@train#trainer, @validate#evaluator, "
    "str(@ckpt_dir) + '/' + @train#model_saver#key_metric_filename)",
)
#: ``intensity_range`` as the transforms read it (``none`` from the command line: None), refused at start when invalid
INTENSITY_WINDOW = "$monai_prompt.data.intensity_window(@intensity_range)"
#: the last step of an evaluation: its key metric and where its metrics went
REPORT_EVALUATION = "$monai_prompt.engine.report_evaluation(@evaluator, @evaluate_split, @output_dir + '/metrics.csv')"


def with_flags(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with ``flags``: each boolean setting its entries read as ``@flags#<setting>``, parsed by
    :func:`monai_prompt.runs.flag` (``python -m monai.bundle run ... --resume false`` passes the string
    ``'false'``, which Python reads as true). ``flags`` follows the last of these settings.

    Args:
        config: a standalone config (``train.json``, ``inference.json``) whose boolean settings are top-level keys.

    Raises:
        ValueError: an entry reads a flag that is not a top-level setting of ``config``.
    """
    names = sorted(set(_FLAG_USE.findall(json.dumps(config))))
    missing = [name for name in names if name not in config]
    if missing:
        raise ValueError(f"the config reads @flags#{missing[0]} but has no {missing[0]!r} setting.")
    last = max(list(config).index(name) for name in names)
    flags = {name: f"$monai_prompt.runs.flag(@{name}, '{name}')" for name in names}
    items = list(config.items())
    return dict([*items[: last + 1], ("flags", flags), *items[last + 1 :]])


def method_config_ref(spec: BundleSpec, ref: str = "@method_config") -> str:
    """``ref`` (a method config) as the network and the training record read it: its boolean entries (VPT's
    ``deep``, FPT's ``prompt_norm``, ...) through :func:`monai_prompt.runs.flag_entries`, so that
    ``--method_config#deep false`` means False.

    Args:
        spec: the bundle's spec (its method config's boolean entries).
        ref: the reference to the method config (``@method_config``, ``@trained_method_config``).
    """
    keys = sorted(key for key, value in spec.method_config().items() if isinstance(value, bool))
    return f"$monai_prompt.runs.flag_entries({ref}, 'method_config', {keys})" if keys else ref


def training_record(spec: BundleSpec, settings: dict[str, Any]) -> dict[str, Any]:
    """``training_record``: each of the task's network ``settings`` as the run reads it (boolean settings and the
    method config's boolean entries parsed, so the record holds bools whatever the command line wrote).

    Args:
        spec: the bundle's spec.
        settings: the task's settings that define the network and data.
    """
    parsed = {"multi_label": "@flags#multi_label", "method_config": method_config_ref(spec),
              "intensity_range": INTENSITY_WINDOW}
    return {key: parsed.get(key, f"@{key}") for key in settings}


def initialize(
    checks: Sequence[str], train: bool = True, kept: str = "@flags#resume", network: str = "@network"
) -> list[str]:
    """``initialize`` of a training or evaluation: errors shown last; training: ``distributed_setup`` (empty;
    ``multi_gpu_train.json`` fills it with the process group; before it, a ``val_interval`` longer than the run and
    a learning rate or weight decay no optimiser step can use are refused), the checkpoint folder locked (a
    previous run is only replaced with ``--overwrite true``, crash leftovers removed); the seed; ``checks`` (the
    task's data checks); training: a resume's settings against its record, the network built (weights loaded), a
    previous run that ``--overwrite true`` replaces set aside (deleted after the first checkpoint, see
    :func:`monai_prompt.runs.set_aside_previous_run`), the run recorded; a warning without pre-trained weights.

    A new training run writes ``models/training_config.json`` from ``training_record`` (the task's settings that
    define the network and data), which evaluation and inference read; a run that continues the folder's previous
    run keeps its record, and a resume refuses settings that differ from it.

    Args:
        checks: the task's expressions that check the data before anything trains or evaluates.
        train: a training run (else an evaluation).
        kept: the condition (config references) under which a training run continues the folder's previous run,
            which is then kept: ``@flags#resume`` (segmentation: ``@flags#resume or @flags#continue_model``).
        network: the network built there: ``@network`` (under DDP, the wrapped one), or ``@network_def`` where a
            later step changes the module before it is wrapped (FPT frees its LPM weights, which DDP would hold).
    """
    if not train:
        return [SHOW_CAUSE_LAST, FLAGS, _SEED, *checks, _WARN_IF_NOT_PRETRAINED]
    return [
        SHOW_CAUSE_LAST,
        FLAGS,
        "$monai_prompt.runs.check_validation_interval(@val_interval, @train#trainer#max_epochs)",
        "$monai_prompt.runs.check_optimizer_settings(@learning_rate, @weight_decay)",
        INTENSITY_WINDOW,
        "@distributed_setup",
        f"$monai_prompt.runs.claim_run_folder(@ckpt_dir, resume={kept}, overwrite=@flags#overwrite)",
        _SEED,
        *checks,
        "$monai_prompt.runs.check_resumed_settings(@ckpt_dir, @training_record) if @flags#resume else None",
        network,
        f"$None if {kept} else monai_prompt.runs.set_aside_previous_run(@ckpt_dir)",
        f"$None if {kept} else monai_prompt.runs.write_training_config(@ckpt_dir, @run_id, @training_record)",
        _WARN_IF_NOT_PRETRAINED,
    ]


def compose(transforms: str | list[dict[str, Any]]) -> dict[str, Any]:
    """MONAI ``Compose`` of a list of transforms or of an expression (``"$@a + @b"``) that gives one."""
    return {"_target_": "Compose", "transforms": transforms}


def metrics(
    prefix: str, key: tuple[str, dict[str, Any]], additional: dict[str, dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """An evaluator's ``key_metric`` and ``additional_metrics``, named with ``prefix`` (``val_`` in validation,
    none in evaluation: ``eval/metrics.csv`` columns).

    Args:
        prefix: prepended to every metric name.
        key: the key metric's name and handler (it selects ``models/model.pt``).
        additional: name -> handler of the other metrics.
    """
    name, handler = key
    return {prefix + name: handler}, {prefix + other: metric for other, metric in additional.items()}


def paths(spec: BundleSpec, dataset_dir: str, datalist_file: str) -> dict[str, Any]:
    """``bundle_root`` and the folders and datalist under it.

    ``bundle_root`` is not the model-zoo ``"."``: ``python -m monai.bundle run`` does not set it, and the READMEs
    run every command both from the repository root (``--config_file bundles/<name>/configs/train.json``, outputs
    and the default ``dataset_dir`` relative to the bundle) and from inside the bundle, which ``"."`` cannot both
    serve; :func:`monai_prompt.runs.bundle_root` finds the bundle from the working directory (``--bundle_root``
    still overrides it, as MONAI's tools pass it).

    Args:
        spec: the bundle.
        dataset_dir: the default data folder below the repository root (where ``make demo`` writes the data).
        datalist_file: the datalist's name in it; ``--dataset_dir`` may also name a class-per-folder tree or a
            CSV/JSON datalist (:func:`monai_prompt.runs.find_datalist`).
    """
    return {
        "bundle_root": f"$monai_prompt.runs.bundle_root('{spec.name}')",
        "ckpt_dir": "$@bundle_root + '/models'",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": f"$@bundle_root + '/../../{dataset_dir}'",
        "datalist_file": f"$monai_prompt.runs.find_datalist(@dataset_dir, '{datalist_file}')",
    }


def device_settings() -> dict[str, Any]:
    """CUDA with AMP when available, else CPU, chosen at run time; the seed."""
    return {
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "amp": "$torch.cuda.is_available()",
        "seed": 0,
    }


#: attention through PyTorch SDPA wherever the method's maths allows it (the same outputs, tested; less memory and
#: time); ``--sdpa false`` computes it literally. Not part of the training record: it changes no result.
SDPA_SETTING = {"sdpa": True}

#: the dict-valued network settings, which evaluation and inference change entry by entry (:func:`recorded`).
DICT_SETTINGS = ("backbone_overrides", "method_config")


def backbone_settings(spec: BundleSpec) -> dict[str, Any]:
    """The ViT preset, its overrides and weights, the method and its full config."""
    return {
        "backbone": "vit_base",
        "backbone_overrides": {},
        "pretrained": None,
        "layer_norm_eps": 1e-6,
        "method": spec.method,
        "method_config": spec.method_config(),
    }


def dataset(data: str, transform: str) -> dict[str, Any]:
    """``CacheDataset``: with ``cache_rate`` > 0 the deterministic transforms (load, resize; FPT: the feature lookup)
    run once and stay in memory; the default 0 keeps nothing (large datasets)."""
    return {
        "_target_": "CacheDataset",
        "data": data,
        "transform": transform,
        "cache_rate": "@cache_rate",
        "num_workers": "@num_workers",
    }


def loader(data: str, shuffle: bool | str, batch_size: str | int = "@batch_size") -> dict[str, Any]:
    """MONAI ``DataLoader`` of ``data`` (``list_data_collate``: crops sampled per image are flattened)."""
    return {
        "_target_": "DataLoader",
        "dataset": data,
        "batch_size": batch_size,
        "shuffle": shuffle,
        "num_workers": "@num_workers",
    }


def delta(network: str = "@network", source: str | None = None) -> dict[str, Any]:
    """``load_dict``/``save_dict`` of a delta checkpoint: the ``peft`` identity first, then the weights."""
    extra = {} if source is None else {"source": source}
    return {
        "peft": {"_target_": "monai_prompt.engine.PeftMeta", "network": network, **extra},
        "model": {"_target_": "monai_prompt.engine.TrainableState", "network": network, **extra},
    }


def delta_loader() -> dict[str, Any]:
    """Loads ``models/model.pt`` (or ``--load_path``) after checking its method, config and backbone."""
    return {
        "_target_": "monai_prompt.engine.CheckedCheckpointLoader",
        "load_path": "@load_path",
        "load_dict": delta(source="@load_path"),
        "map_location": "@device",
    }


#: record keys that runs of earlier bundle versions did not write, and what they read as when absent: ``pixdim``
#: (segmentation 0.1.7; earlier runs resampled in evaluation and inference only when ``--pixdim`` was given again)
#: as ``None``; ``label_values`` (segmentation 0.1.8; earlier runs took consecutive label values only) as ``0..K-1``;
#: ``intensity_range`` (after segmentation 0.1.11 and classification 0.1.8; earlier runs scaled each image by its
#: min-max) as ``None``.
LATER_RECORD_KEYS = {"pixdim": None, "label_values": "list(range(len(@training_config['class_names'])))",
                     "intensity_range": None}


def record_read(key: str) -> str:
    """The expression (without ``$``) that reads ``key`` from the training record, ``@training_config``; keys of
    :data:`LATER_RECORD_KEYS` with their value for a record that lacks them."""
    if key not in LATER_RECORD_KEYS:
        return f"@training_config[{key!r}]"
    fallback = LATER_RECORD_KEYS[key]
    return f"@training_config.get({key!r})" if fallback is None else f"(@training_config.get({key!r}) or {fallback})"


def recorded(
    settings: Sequence[str], config: dict[str, Any] | None = None, untrained: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Settings an evaluation or inference takes from the bundle's training record, ``training_config``
    (``models/training_config.json`` in ``@ckpt_dir``, :func:`monai_prompt.runs.read_training_config`): each
    reads it with ``[...]``, no defaults; a missing record stops the workflow with what to run or give instead.

    A value given on the command line wins: a scalar entry is an expression reading the record, which the value
    replaces; a dict setting (:data:`DICT_SETTINGS`) holds *changes* to the recorded dict (so
    ``--method_config#num_tokens 7`` works as in training) and ``trained_<key>`` the recorded dict with the changes
    applied, which the network reads (``trained_method_config``: only for the recorded method, else an error naming
    both, :func:`monai_prompt.runs.recorded_method_config`).

    Args:
        settings: the record's keys (also the config ids).
        config: a config holding the settings (inference: its own values, replaced here in place, with the record
            before the first of them); ``None``: the entries alone (evaluation, merged on ``train.json``).
        untrained: the settings of the network the bundle builds before any training, as the entry
            ``untrained_network``: what the record reads as while ``models/`` holds no delta either, so that MONAI's
            property checks and ``verify_net_in_out`` build a network (inference); ``None``: always the record.
    """
    entries: dict[str, Any] = {}
    for key in settings:
        if key in DICT_SETTINGS:
            entries[key] = {}
            entries[f"trained_{key}"] = (
                "$monai_prompt.runs.recorded_method_config(@training_config, @method, @method_config, @ckpt_dir)"
                if key == "method_config" else f"$dict(@training_config[{key!r}], **@{key})"
            )
        else:
            entries[key] = f"${record_read(key)}"
    if untrained is None:
        record = {"training_config": "$monai_prompt.runs.read_training_config(@ckpt_dir, required=True)"}
    else:
        record = {
            "untrained_network": untrained,
            "training_config": (
                "$monai_prompt.runs.read_training_config(@ckpt_dir, required=True, untrained=@untrained_network)"
            ),
        }
    if config is None:
        return {**record, **entries}
    merged: dict[str, Any] = {}
    for key, value in config.items():
        if key in settings and not merged.keys() & record.keys():
            merged.update(record)
        merged[key] = entries.get(key, value)
        if f"trained_{key}" in entries:
            merged[f"trained_{key}"] = entries[f"trained_{key}"]
    return merged


def train_settings(spec: BundleSpec, kept: str = "@flags#resume") -> dict[str, Any]:
    """Recipe numbers, validation interval, resume (the newest checkpoint of the recorded run) or overwrite, the run
    id, the MLflow run name, ``distributed_setup`` (empty: ``multi_gpu_train.json`` fills it), rank and the delta
    objects.

    Args:
        spec: the bundle's spec.
        kept: the condition under which the run continues the folder's previous run (as in :func:`initialize`):
            it then keeps the recorded run id, so that a later ``--resume`` finds the checkpoints it writes.
    """
    return {
        "learning_rate": spec.learning_rate,
        "weight_decay": spec.weight_decay,
        "val_interval": 1,
        "resume": False,
        "overwrite": False,
        "shuffle": True,
        **({} if spec.fpt else IN_BACKWARD_SETTING),
        "run_id": f"$monai_prompt.runs.run_id(@ckpt_dir, {kept})",
        "resume_file": "$monai_prompt.engine.latest_checkpoint(@ckpt_dir, run_id=@run_id) if @flags#resume else None",
        "run_name": f"$monai_prompt.engine.unique_run_name('{spec.name}_train')",
        "distributed_setup": [],
        "is_not_rank0": "$torch.distributed.is_available() and torch.distributed.is_initialized() "
        "and torch.distributed.get_rank() > 0",
        "delta": delta(),
    }


#: ``--step_in_backward true`` (not FPT): the optimiser steps each parameter inside backward and frees its gradient
#: at once (:func:`monai_prompt.engine.in_backward`; the same updates). No step then sees every gradient, so the
#: trainer's fp16 AMP, whose GradScaler needs them all, gives way to bf16 autocast inside the network
#: (:data:`IN_BACKWARD_AUTOCAST`); torchrun with several processes is refused.
IN_BACKWARD_SETTING = {"step_in_backward": False}
#: the training network's autocast: bf16 when AMP is on and the step is in backward, else the trainer's AMP.
IN_BACKWARD_AUTOCAST = {"autocast_dtype": "$'bf16' if @flags#amp and @flags#step_in_backward else None"}


def optimization(spec: BundleSpec) -> dict[str, Any]:
    """The spec's optimiser over the trainable parameters (stepped in backward with ``step_in_backward``, not FPT)
    and a cosine annealing to 0 over ``max_epochs``."""
    optimizer = {
        "_target_": f"torch.optim.{spec.optimizer}",
        "params": "$[p for p in @network.parameters() if p.requires_grad]",
        "lr": "@learning_rate",
        "weight_decay": "@weight_decay",
        **spec.optimizer_args,
    }
    if spec.fpt:
        optimizers = {"optimizer": optimizer}
    else:
        optimizers = {
            "optimizer_def": optimizer,
            "optimizer": "$monai_prompt.engine.in_backward(@optimizer_def) if @flags#step_in_backward "
            "else @optimizer_def",
        }
    return {
        **optimizers,
        "lr_scheduler": {
            "_target_": "torch.optim.lr_scheduler.CosineAnnealingLR",
            "optimizer": "@optimizer",
            "T_max": "@train#trainer#max_epochs",
        },
    }


def train_checkpointing() -> dict[str, Any]:
    """``train#checkpoint`` (run id, trainer, optimiser, schedule, delta and best validation score: the resumable
    state), its loader (``resume``), its atomic saver (``models/checkpoint_epoch=<N>.pt``, the last one kept) and
    ``train#model_saver``, the best-key-metric delta ``models/model.pt`` (attached to the validator)."""
    return {
        "checkpoint": {
            "run": {"_target_": "monai_prompt.runs.RunIdentity", "run": "@run_id"},
            "trainer": "@train#trainer",
            "optimizer": "@optimizer",
            "lr_scheduler": "@lr_scheduler",
            "peft": "@delta#peft",
            "model": "@delta#model",
            "best_metric": {
                "_target_": "monai_prompt.engine.BestMetricState",
                "evaluator": "@validate#evaluator",
                "saver": "@train#model_saver",
            },
        },
        "checkpoint_loader": {
            "_target_": "monai_prompt.engine.CheckedCheckpointLoader",
            "_disabled_": "$not @flags#resume",
            "load_path": "@resume_file",
            "load_dict": "@train#checkpoint",
            "map_location": "@device",
        },
        "checkpoint_saver": {
            "_target_": "monai_prompt.engine.AtomicCheckpointSaver",
            "save_dir": "@ckpt_dir",
            "save_dict": "@train#checkpoint",
            "save_interval": 1,
            "n_saved": 1,
        },
        "model_saver": {
            "_target_": "monai_prompt.engine.AtomicCheckpointSaver",
            "save_dir": "@ckpt_dir",
            "save_dict": "@delta",
            "save_key_metric": True,
            "key_metric_filename": "model.pt",
        },
    }


#: MLflow run parameters of every training run, beyond what ``MLflowPeftLogger`` logs itself (the method, its
#: config, the backbone's config, parameter counts) and MONAI's handler (``max_epochs``, ``epoch_length``): the
#: weights, the data and the recipe, each as the run read it. The task templates add theirs (the classes, ...).
_TRAIN_PARAMS = {
    "pretrained": "@pretrained",
    "backbone": "@backbone",
    "img_size": "@img_size",
    "intensity_range": "@intensity_range",
    "datalist_file": "@datalist_file",
    "seed": "@seed",
    "batch_size": "@batch_size",
    "learning_rate": "@learning_rate",
    "weight_decay": "@weight_decay",
    "val_interval": "@val_interval",
    "shuffle": "@flags#shuffle",
    "amp": "@flags#amp",
}
#: MLflow run parameters of every evaluation run: the weights evaluated and the data; no training schedule.
_EVALUATE_PARAMS = {
    "pretrained": "@pretrained",
    "checkpoint": "@load_path",
    "intensity_range": "@intensity_range",
    "datalist_file": "@datalist_file",
    "evaluate_split": "@evaluate_split",
    "amp": "@flags#amp",
}
#: MLflow run parameters of every inference run: the weights, the images given and where the results go.
_INFERENCE_PARAMS = {
    "pretrained": "@pretrained",
    "checkpoint": "@load_path",
    "intensity_range": "@intensity_range",
    "infer_images": "@infer_images",
    "output_dir": "@output_dir",
    "amp": "@flags#amp",
}


def _mlflow_logger(artifacts: Sequence[str], params: dict[str, str], **runs: str) -> dict[str, Any]:
    """``MLflowPeftLogger`` of ``@network``.

    Args:
        artifacts: the files it logs when the engine completes.
        params: its run parameters (name -> reference).
        runs: ``run_folder`` (training: where the run records its MLflow run) or ``checkpoint`` (evaluation and
            inference: the checkpoint whose training run they log).
    """
    return {"_target_": "monai_prompt.engine.MLflowPeftLogger", "network": "@network", "artifacts": list(artifacts),
            "extra_params": params, **runs}


def train_handlers(spec: BundleSpec, params: dict[str, str]) -> list[dict[str, Any]]:
    """Schedule (refitted when a resumed run is longer), validation every ``val_interval`` epochs, the parameter
    report, peak memory, loss logs, the time left (every epoch end, and every minute within an epoch; after the
    validation, which it counts), a stop at the first NaN/Inf loss, MLflow.

    Args:
        spec: the bundle's spec.
        params: the task's MLflow run parameters, logged with :data:`_TRAIN_PARAMS` (name -> reference).
    """
    step = {} if spec.fpt else {"step_in_backward": "@flags#step_in_backward"}
    return [
        {"_target_": "LrScheduleHandler", "lr_scheduler": "@lr_scheduler", "print_lr": True},
        {
            "_target_": "monai_prompt.engine.ResumeLrScheduleHandler",
            "lr_scheduler": "@lr_scheduler",
            "learning_rate": "@learning_rate",
            "weight_decay": "@weight_decay",
        },
        {
            "_target_": "ValidationHandler",
            "validator": "@validate#evaluator",
            "epoch_level": True,
            "interval": "@val_interval",
        },
        {"_target_": "monai_prompt.engine.TrainableReportHandler", "_disabled_": "@is_not_rank0",
         "network": "@network"},
        {"_target_": "monai_prompt.engine.PeakMemoryHandler", "device": "@device"},
        {
            "_target_": "StatsHandler",
            "_disabled_": "@is_not_rank0",
            "tag_name": "train_loss",
            "output_transform": "$monai.handlers.from_engine(['loss'], first=True)",
        },
        {"_target_": "monai_prompt.engine.EtaHandler"},
        {"_target_": "monai_prompt.engine.NonFiniteGuard"},
        _mlflow_logger(["$@ckpt_dir + '/model.pt'"], {**_TRAIN_PARAMS, **step, **params}, run_folder="@ckpt_dir"),
    ]


def trainer(spec: BundleSpec, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``train#trainer``: MONAI's ``SupervisedTrainer`` over ``train#dataloader`` (``extra``: e.g.
    ``prepare_batch``)."""
    return {
        "_target_": "SupervisedTrainer",
        "max_epochs": spec.epochs,
        "device": "@device",
        "train_data_loader": "@train#dataloader",
        "network": "@network",
        "loss_function": "@loss",
        "optimizer": "@optimizer",
        "inferer": "@train#inferer",
        **(extra or {}),
        "train_handlers": "@train#handlers",
        "amp": "@flags#amp" if spec.fpt else "$@flags#amp and not @flags#step_in_backward",
    }


def validate_handlers() -> list[dict[str, Any]]:
    """Validation logs and the best-key-metric delta to ``models/model.pt`` (``train#model_saver``)."""
    return [
        {"_target_": "StatsHandler", "_disabled_": "@is_not_rank0", "iteration_log": False},
        "@train#model_saver",
    ]


def evaluator(prefix: str = "", extra: dict[str, Any] | None = None, metrics: bool = True) -> dict[str, Any]:
    """A ``SupervisedEvaluator`` wired to the ids under ``prefix`` (``"validate#"`` or ``""``).

    Args:
        prefix: id prefix of its dataloader, inferer, postprocessing, metrics and handlers.
        extra: more evaluator arguments (e.g. ``prepare_batch``).
        metrics: wire ``key_metric`` and ``additional_metrics`` (not for inference).
    """
    scores = {"key_val_metric": f"@{prefix}key_metric", "additional_metrics": f"@{prefix}additional_metrics"}
    return {
        **EVALUATOR,
        "val_data_loader": f"@{prefix}dataloader",
        "inferer": f"@{prefix}inferer",
        **(extra or {}),
        "postprocessing": f"@{prefix}postprocessing",
        **(scores if metrics else {}),
        "val_handlers": f"@{prefix}handlers",
    }


def evaluate_handlers(
    *savers: dict[str, Any], files: Sequence[str] = ("metrics.csv",), params: dict[str, str]
) -> list[dict[str, Any]]:
    """Delta loader, logs, the task's savers (``MetricsSaver``: ``eval/metrics.csv``, reports) and MLflow.

    Args:
        savers: handlers that write the evaluation's files.
        files: what they write under ``@output_dir``, logged as MLflow artifacts with the delta.
        params: the task's MLflow run parameters, logged with :data:`_EVALUATE_PARAMS` (name -> reference).
    """
    return [
        delta_loader(),
        {"_target_": "StatsHandler", "iteration_log": False},
        *savers,
        _mlflow_logger([*(f"$@output_dir + '/{name}'" for name in files), "@load_path"],
                       {**_EVALUATE_PARAMS, **params}, checkpoint="@load_path"),
    ]


def inference_tracking(params: dict[str, str], files: Sequence[str] = ()) -> dict[str, Any]:
    """The MLflow logger of an inference: :data:`_INFERENCE_PARAMS` and the training run of its checkpoint; no
    training schedule.

    Args:
        params: the task's MLflow run parameters (name -> reference).
        files: what the inference writes under ``@output_dir`` that is logged as an MLflow artifact.
    """
    return _mlflow_logger([f"$@output_dir + '/{name}'" for name in files], {**_INFERENCE_PARAMS, **params},
                          checkpoint="@load_path")


def inference_workflow(check: str, outputs: dict[str, Any], tracking: dict[str, Any]) -> dict[str, Any]:
    """The end of an inference config: ``outputs``, the handlers (delta loader, logs, ``@outputs``, then
    ``tracking``, so that the files are written before they are logged), the evaluator, ``initialize`` (errors shown
    last, the seed, a warning without pre-trained weights) and ``run``: ``check`` of the inputs, the evaluator, then
    ``outputs``' report of where its files went (``report()``: the run's last line, after ignite's ``Engine run
    finished``). The check runs in ``run``, so that nothing is looked up while MONAI checks the bundle's properties
    (a bundle without data passes).

    Args:
        check: the expression that checks the input images.
        outputs: the handler that writes or counts the inference's files and has a ``report()``
            (``monai_prompt.engine.PredictionSaver``, ``monai_prompt.engine.SavedMasks``).
        tracking: the MLflow logger of the inference (:func:`inference_tracking`).
    """
    return {
        "outputs": outputs,
        "handlers": [delta_loader(), {"_target_": "StatsHandler", "iteration_log": False}, "@outputs", tracking],
        "evaluator": evaluator(metrics=False),
        "initialize": initialize((), train=False),
        "run": [check, "$@evaluator.run()", "$@outputs.report()"],
    }


def multi_gpu_config() -> dict[str, Any]:
    """``configs/multi_gpu_train.json`` (merged on ``train.json``, run with ``torchrun``): DDP, nccl on GPUs and
    gloo on CPUs. It fills ``train.json``'s ``distributed_setup`` (a step of its ``initialize`` before anything
    touches the run folder, empty there) with the process group and the gloo group the other processes wait on for
    rank 0 (:func:`monai_prompt.runs.rank0_wait_group`), and keeps the rest of that ``initialize``: the steps that
    differ under DDP (the run folder and record on rank 0, FPT's preload on rank 0 while the others wait) ask the
    process group themselves. ``static_graph`` lets DDP skip the frozen backbone and tolerate parameters without
    gradients.
    """
    return {
        "+imports": ["$import os", "$import torch.distributed as dist"],
        "device": "$torch.device('cuda:' + os.environ['LOCAL_RANK'] if torch.cuda.is_available() else 'cpu')",
        "network": {
            "_target_": "torch.nn.parallel.DistributedDataParallel",
            "module": "$@network_def.to(@device)",
            "device_ids": "$[@device] if torch.cuda.is_available() else None",
            "static_graph": True,
        },
        "train#sampler": {
            "_target_": "DistributedSampler",
            "dataset": "@train#dataset",
            "even_divisible": True,
            "shuffle": True,
        },
        "train#sampler#shuffle": "@flags#shuffle",
        "train#dataloader#sampler": "@train#sampler",
        "train#dataloader#shuffle": False,
        "validate#sampler": {
            "_target_": "DistributedSampler",
            "dataset": "@validate#dataset",
            "even_divisible": False,
            "shuffle": False,
        },
        "validate#dataloader#sampler": "@validate#sampler",
        "distributed_setup": [
            (
                "$dist.is_initialized() or dist.init_process_group(backend='nccl' if torch.cuda.is_available() "
                "else 'gloo')"
            ),
            "$torch.cuda.set_device(@device) if torch.cuda.is_available() else None",
            "$monai_prompt.runs.rank0_wait_group()",
        ],
        "finalize": ["$dist.is_initialized() and dist.destroy_process_group()"],
    }
