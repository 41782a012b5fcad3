"""The bundle configs (``train``, ``evaluate``, ``inference``, ``multi_gpu_train``) as Python dicts.

One template for every method: a :class:`~monai_prompt.bundle_gen.specs.BundleSpec` fills in the method, its
config and its optimisation recipe. Ids follow the model-zoo layout (``train#...``/``validate#...``) so MONAI's
property checks, ``--tracking mlflow`` and MONAI Label find what they expect; the transforms are MONAI components
(``train#deterministic_transforms``, ``train#random_transforms``) that overrides reach by id. Repeated pieces
(``network_def``, the data settings, metric definitions) are written into each file on purpose: ``%file#id`` macros
resolve against the working directory, not the bundle, so every file has to stand on its own.
"""

from __future__ import annotations

from typing import Any

from monai_prompt.bundle_gen.specs import BundleSpec

__all__ = ["evaluate_config", "inference_config", "multi_gpu_config", "train_config"]

#: the modules the expressions use (``_target_`` components import their own); ``torch.distributed`` and ``os``
#: come with ``multi_gpu_train.json``, ``monai_prompt.fpt`` with FPT training.
_IMPORTS = (
    "$import torch",
    "$import monai_prompt",
    "$import monai_prompt.data",
    "$import monai_prompt.engine",
)
_BATCH_SIZE = 16
_NUM_WORKERS = 4
_FROM_PRED_LABEL = "$monai.handlers.from_engine(['pred', 'label'])"


def _network_def(spec: BundleSpec) -> dict[str, Any]:
    """``PromptClassifier`` (or ``FPTClassifier``) loading the pre-trained backbone itself from ``pretrained``."""
    if spec.fpt:
        target = "monai_prompt.fpt.FPTClassifier"
        method = {"variant": "@method", "fpt_config": "@method_config"}
    else:
        target = "monai_prompt.nets.PromptClassifier"
        method = {"method": "@method", "method_config": "@method_config"}
    return {
        "_target_": target,
        "num_classes": "@num_classes",
        **method,
        "backbone": "@backbone",
        "in_channels": "@in_channels",
        "img_size": "@img_size",
        "spatial_dims": "@spatial_dims",
        "pretrained": "@pretrained",
        "layer_norm_eps": "@layer_norm_eps",
        "backbone_overrides": "@backbone_overrides",
    }


def _common(spec: BundleSpec, imports: tuple[str, ...] = ()) -> dict[str, Any]:
    """Paths, device, task and network settings every file starts with (``imports``: more than :data:`_IMPORTS`).

    ``bundle_root`` is not the model-zoo ``"."``: ``python -m monai.bundle run`` does not set it, and the READMEs
    run every command both from the repository root (``--config_file bundles/<name>/configs/train.json``, outputs
    and the default ``dataset_dir`` relative to the bundle) and from inside the bundle, which ``"."`` cannot both
    serve; :func:`monai_prompt.engine.bundle_root` finds the bundle from the working directory (``--bundle_root``
    still overrides it, as MONAI's tools pass it).
    """
    return {
        "imports": [*_IMPORTS, *imports],
        "bundle_root": f"$monai_prompt.engine.bundle_root('{spec.name}')",
        "ckpt_dir": "$@bundle_root + '/models'",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "$@bundle_root + '/../../demo_data'",
        "datalist_file": "$@dataset_dir + '/datalist.json'",
        "datalist": "$monai_prompt.data.read_datalist(@datalist_file)",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "amp": "$torch.cuda.is_available()",
        "seed": 0,
        "num_classes": 3,
        "multi_label": False,
        "in_channels": 3,
        "spatial_dims": 2,
        "img_size": spec.img_size,
        "backbone": "vit_base",
        "backbone_overrides": {},
        "pretrained": None,
        "layer_norm_eps": 1e-6,
        "method": spec.method,
        "method_config": spec.method_config(),
        "network_def": _network_def(spec),
        "network": "$@network_def.to(@device)",
        "batch_size": _BATCH_SIZE,
        "num_workers": _NUM_WORKERS,
        "cache_rate": 0.0,
        "experiment_name": "monai_prompt_classification",
    }


def _fpt_settings() -> dict[str, Any]:
    """FPT's preload cache: the frozen LPM runs once per image (``initialize``), training reads its features."""
    return {
        "fpt_cache_dir": "$@bundle_root + '/cache'",
        "fpt_cache_dtype": "float32",
        "fpt_preload": True,
        "fpt_preload_items": "$[item for split in ('training', 'validation', 'test') for item in @datalist[split]]",
        "fpt_features": {
            "_target_": "monai_prompt.fpt.LoadFPTFeaturesd",
            "keys": "image",
            "cache_dir": "@fpt_cache_dir",
            "network": "@network_def",
        },
        "fpt_prepare_batch": {"_target_": "PrepareBatchExtraInput", "extra_keys": "fpt_kv"},
    }


#: preload the FPT cache through the deterministic transforms (entries already there are skipped, so a second run
#: only checks).
_FPT_PRELOAD = (
    "monai_prompt.fpt.preload_features(@network_def.to(@device), monai.data.Dataset(@fpt_preload_items, "
    "monai.transforms.Compose(@train#deterministic_transforms)), @fpt_cache_dir, batch_size=@batch_size, "
    "storage_dtype=@fpt_cache_dtype)"
)


def _deterministic_transforms() -> list[dict[str, Any]]:
    """Datalist item to network input and target: load, channel first, match ``in_channels``/``spatial_dims``, scale
    to [0, 1], resize to ``img_size``, float32 image, label tensor (``monai_prompt.data.classification_transforms``,
    spelled out so each transform can be overridden by id)."""
    return [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "monai_prompt.data.MatchInputd", "keys": "image", "spatial_dims": "@spatial_dims",
         "channels": "@in_channels"},
        {"_target_": "ScaleIntensityd", "keys": "image", "minv": 0.0, "maxv": 1.0},
        {"_target_": "Resized", "keys": "image", "spatial_size": "$monai.utils.ensure_tuple_rep(@img_size, "
         "@spatial_dims)", "mode": "$'bilinear' if @spatial_dims == 2 else 'trilinear'", "anti_aliasing": True},
        {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
        {"_target_": "ToTensord", "keys": "label", "dtype": "$torch.float32 if @multi_label else torch.long",
         "track_meta": False, "allow_missing_keys": True},
    ]


#: the training augmentations (``classification_transforms(augment=True)``).
_RANDOM_TRANSFORMS = [
    {"_target_": "RandFlipd", "keys": "image", "prob": 0.5, "spatial_axis": 0},
    {"_target_": "RandAffined", "keys": "image", "prob": 0.5,
     "rotate_range": "$np.pi / 12 if @spatial_dims == 2 else [np.pi / 12] * 3", "scale_range": 0.1,
     "padding_mode": "zeros"},
    {"_target_": "RandAdjustContrastd", "keys": "image", "prob": 0.3, "gamma": [0.7, 1.5]},
]


def _compose(transforms: str | list[dict[str, Any]]) -> dict[str, Any]:
    return {"_target_": "Compose", "transforms": transforms}


def _dataset(data: str, transform: str) -> dict[str, Any]:
    """``CacheDataset``: with ``cache_rate`` > 0 the deterministic transforms (load, resize; FPT: the feature lookup)
    run once and stay in memory; the default 0 keeps nothing (large datasets)."""
    return {
        "_target_": "CacheDataset",
        "data": data,
        "transform": transform,
        "cache_rate": "@cache_rate",
        "num_workers": "@num_workers",
    }


def _loader(dataset: str, shuffle: bool) -> dict[str, Any]:
    return {
        "_target_": "DataLoader",
        "dataset": dataset,
        "batch_size": "@batch_size",
        "shuffle": shuffle,
        "num_workers": "@num_workers",
    }


def _delta(network: str = "@network", source: str | None = None) -> dict[str, Any]:
    """``load_dict``/``save_dict`` of a delta checkpoint: the ``peft`` identity first, then the weights."""
    extra = {} if source is None else {"source": source}
    return {
        "peft": {"_target_": "monai_prompt.engine.PeftMeta", "network": network, **extra},
        "model": {"_target_": "monai_prompt.engine.TrainableState", "network": network, **extra},
    }


def _metrics(prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Key metric (accuracy) and additional metrics (macro AUC, macro F1, quadratic-weighted kappa)."""
    decisions = "@metric_decisions"
    key = {f"{prefix}accuracy": {"_target_": "ignite.metrics.Accuracy", "is_multilabel": "@multi_label",
                                 "output_transform": decisions}}
    additional = {
        f"{prefix}auc": {"_target_": "ROCAUC", "average": "macro", "output_transform": _FROM_PRED_LABEL},
        f"{prefix}f1": {"_target_": "monai_prompt.engine.macro_f1", "multi_label": "@multi_label",
                        "output_transform": decisions},
        f"{prefix}kappa": {"_target_": "monai_prompt.engine.QuadraticWeightedKappa", "_disabled_": "@multi_label",
                           "num_classes": "@num_classes", "output_transform": decisions},
    }
    return key, additional


#: probabilities: softmax, or sigmoid for multi-label.
_ACTIVATION = {"_target_": "Activationsd", "keys": "pred", "softmax": "$not @multi_label", "sigmoid": "@multi_label"}
_POSTPROCESSING = {
    "_target_": "Compose",
    "transforms": [
        _ACTIVATION,
        {"_target_": "AsDiscreted", "keys": "label", "to_onehot": "$None if @multi_label else @num_classes"},
    ],
}
#: loads ``models/model.pt`` (or ``--load_path``) after checking its method, config and backbone.
_DELTA_LOADER = {
    "_target_": "CheckpointLoader",
    "load_path": "@load_path",
    "load_dict": _delta(source="@load_path"),
    "map_location": "@device",
}
_EVALUATOR = {
    "_target_": "SupervisedEvaluator",
    "device": "@device",
    "network": "@network",
    "amp": "@amp",
}


#: the trainer-state checkpoint handlers reference the trainer, so they are attached to it here rather than listed
#: in ``train#handlers`` (which the trainer references: a cycle); they run after the listed handlers.
_TRAIN_RUN = (
    "$@train#checkpoint_loader.attach(@train#trainer) if @resume else None",
    "$@train#checkpoint_saver.attach(@train#trainer)",
    "$@train#trainer.run()",
)


def _initialize(spec: BundleSpec, distributed: bool = False) -> list[str]:
    """Seed, check every image header and label, check the data against the task and (FPT) preload the LPM
    features, on rank 0 only under DDP."""
    steps = [
        "$monai.utils.set_determinism(seed=@seed)",
        "$monai_prompt.data.check_datalist(@datalist_file)",
        "$monai_prompt.engine.check_task(@datalist, @num_classes, @multi_label)",
        "$monai_prompt.engine.warn_if_not_pretrained(@pretrained)",
    ]
    if spec.fpt and distributed:
        steps += [f"${_FPT_PRELOAD} if @fpt_preload and dist.get_rank() == 0 else None", "$dist.barrier()"]
    elif spec.fpt:
        steps.append(f"${_FPT_PRELOAD} if @fpt_preload else None")
    return steps


def _fpt_batch(spec: BundleSpec) -> dict[str, Any]:
    """Engines of FPT bundles call ``network(image, fpt_kv)`` with the cached features."""
    return {"prepare_batch": "@fpt_prepare_batch"} if spec.fpt else {}


def train_config(spec: BundleSpec) -> dict[str, Any]:
    """``configs/train.json``: training with validation, best delta to ``models/model.pt``, resumable."""
    key_metric, additional_metrics = _metrics("val_")
    optimizer = {
        "_target_": f"torch.optim.{spec.optimizer}",
        "params": "$[p for p in @network.parameters() if p.requires_grad]",
        "lr": "@learning_rate",
        "weight_decay": "@weight_decay",
        **spec.optimizer_args,
    }
    return {
        **_common(spec, ("$import monai_prompt.fpt",) if spec.fpt else ()),
        **(_fpt_settings() if spec.fpt else {}),
        "learning_rate": spec.learning_rate,
        "weight_decay": spec.weight_decay,
        "val_interval": 1,
        "resume": False,
        "resume_file": "$monai_prompt.engine.latest_checkpoint(@ckpt_dir) if @resume else None",
        "run_name": f"$monai_prompt.engine.unique_run_name('{spec.name}_train')",
        "is_not_rank0": "$torch.distributed.is_available() and torch.distributed.is_initialized() "
        "and torch.distributed.get_rank() > 0",
        "delta": _delta(),
        "loss": "$torch.nn.BCEWithLogitsLoss() if @multi_label else torch.nn.CrossEntropyLoss()",
        "optimizer": optimizer,
        "lr_scheduler": {
            "_target_": "torch.optim.lr_scheduler.CosineAnnealingLR",
            "optimizer": "@optimizer",
            "T_max": "@train#trainer#max_epochs",
        },
        "metric_decisions": "$monai_prompt.engine.class_decisions(@multi_label)",
        "train": {
            "checkpoint": {
                "trainer": "@train#trainer",
                "optimizer": "@optimizer",
                "lr_scheduler": "@lr_scheduler",
                "peft": "@delta#peft",
                "model": "@delta#model",
            },
            "checkpoint_loader": {
                "_target_": "CheckpointLoader",
                "_disabled_": "$not @resume",
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
            "deterministic_transforms": _deterministic_transforms(),
            "random_transforms": list(_RANDOM_TRANSFORMS),
            # FPT: the cache lookup sees the image exactly as the preload did, before the augmentations
            "preprocessing": _compose("$@train#deterministic_transforms + "
                                      f"{'[@fpt_features] + ' if spec.fpt else ''}@train#random_transforms"),
            "dataset": _dataset("$@datalist['training']", "@train#preprocessing"),
            "dataloader": _loader("@train#dataset", shuffle=True),
            "inferer": {"_target_": "SimpleInferer"},
            "handlers": [
                {"_target_": "LrScheduleHandler", "lr_scheduler": "@lr_scheduler", "print_lr": True},
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
                {
                    "_target_": "monai_prompt.engine.MLflowPeftLogger",
                    "network": "@network",
                    "artifacts": ["$@ckpt_dir + '/model.pt'"],
                    "extra_params": {"pretrained": "@pretrained", "backbone": "@backbone", "img_size": "@img_size"},
                },
            ],
            "trainer": {
                "_target_": "SupervisedTrainer",
                "max_epochs": spec.epochs,
                "device": "@device",
                "train_data_loader": "@train#dataloader",
                "network": "@network",
                "loss_function": "@loss",
                "optimizer": "@optimizer",
                "inferer": "@train#inferer",
                **_fpt_batch(spec),
                "train_handlers": "@train#handlers",
                "amp": "@amp",
            },
        },
        "validate": {
            "preprocessing": _compose("$@train#deterministic_transforms + [@fpt_features]" if spec.fpt
                                      else "@train#deterministic_transforms"),
            "dataset": _dataset("$@datalist['validation']", "@validate#preprocessing"),
            "dataloader": _loader("@validate#dataset", shuffle=False),
            "inferer": {"_target_": "SimpleInferer"},
            "postprocessing": _POSTPROCESSING,
            "key_metric": key_metric,
            "additional_metrics": additional_metrics,
            "handlers": [
                {"_target_": "StatsHandler", "_disabled_": "@is_not_rank0", "iteration_log": False},
                {
                    "_target_": "monai_prompt.engine.AtomicCheckpointSaver",
                    "save_dir": "@ckpt_dir",
                    "save_dict": "@delta",
                    "save_key_metric": True,
                    "key_metric_filename": "model.pt",
                },
            ],
            "evaluator": {
                **_EVALUATOR,
                "val_data_loader": "@validate#dataloader",
                "inferer": "@validate#inferer",
                **_fpt_batch(spec),
                "postprocessing": "@validate#postprocessing",
                "key_val_metric": "@validate#key_metric",
                "additional_metrics": "@validate#additional_metrics",
                "val_handlers": "@validate#handlers",
            },
        },
        "initialize": _initialize(spec),
        "run": list(_TRAIN_RUN),
    }


def evaluate_config(spec: BundleSpec) -> dict[str, Any]:
    """``configs/evaluate.json`` (merged on ``train.json``): metrics of ``models/model.pt`` on the test split."""
    key_metric, additional_metrics = _metrics("")
    return {
        "evaluate_split": "test",
        "load_path": "$@ckpt_dir + '/model.pt'",
        "run_name": f"$monai_prompt.engine.unique_run_name('{spec.name}_evaluate')",
        "preprocessing": "@validate#preprocessing",
        "dataset": _dataset("$@datalist[@evaluate_split]", "@preprocessing"),
        "dataloader": _loader("@dataset", shuffle=False),
        "inferer": "@validate#inferer",
        "postprocessing": "@validate#postprocessing",
        "key_metric": key_metric,
        "additional_metrics": additional_metrics,
        "handlers": [
            _DELTA_LOADER,
            {"_target_": "StatsHandler", "iteration_log": False},
            {"_target_": "MetricsSaver", "save_dir": "@output_dir", "metrics": "*", "metric_details": None},
            {
                "_target_": "monai_prompt.engine.MLflowPeftLogger",
                "network": "@network",
                "artifacts": ["$@output_dir + '/metrics.csv'", "@load_path"],
                "extra_params": {"pretrained": "@pretrained", "checkpoint": "@load_path"},
            },
        ],
        "evaluator": {
            **_EVALUATOR,
            "val_data_loader": "@dataloader",
            "inferer": "@inferer",
            **_fpt_batch(spec),
            "postprocessing": "@postprocessing",
            "key_val_metric": "@key_metric",
            "additional_metrics": "@additional_metrics",
            "val_handlers": "@handlers",
        },
        "initialize": _initialize(spec),
        "run": ["$@evaluator.run()"],
    }


def inference_config(spec: BundleSpec) -> dict[str, Any]:
    """``configs/inference.json`` (standalone): class probabilities per image to ``eval/predictions.csv``."""
    return {
        **_common(spec),
        "infer_split": "test",
        "infer_images": "$[item['image'] for item in @datalist[@infer_split]]",
        "load_path": "$@ckpt_dir + '/model.pt'",
        "run_name": f"$monai_prompt.engine.unique_run_name('{spec.name}_infer')",
        "preprocessing": _compose(_deterministic_transforms()),
        "dataset": _dataset("$[{'image': image} for image in @infer_images]", "@preprocessing"),
        "dataloader": _loader("@dataset", shuffle=False),
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                _ACTIVATION,
            ],
        },
        "handlers": [
            _DELTA_LOADER,
            {"_target_": "StatsHandler", "iteration_log": False},
            {
                "_target_": "ClassificationSaver",
                "output_dir": "@output_dir",
                "filename": "predictions.csv",
                "batch_transform": "$lambda batch: [item['image'].meta for item in batch]",
                "output_transform": "$monai.handlers.from_engine(['pred'])",
            },
        ],
        "evaluator": {
            **_EVALUATOR,
            "val_data_loader": "@dataloader",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
        },
        "initialize": [
            "$monai.utils.set_determinism(seed=@seed)",
            "$monai_prompt.engine.warn_if_not_pretrained(@pretrained)",
        ],
        "run": ["$@evaluator.run()"],
    }


def multi_gpu_config(spec: BundleSpec) -> dict[str, Any]:
    """``configs/multi_gpu_train.json`` (merged on ``train.json``, run with ``torchrun``): DDP, nccl on GPUs and
    gloo on CPUs. ``static_graph`` lets DDP skip the frozen backbone and tolerate parameters without gradients."""
    return {
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
        "train#dataloader#sampler": "@train#sampler",
        "train#dataloader#shuffle": False,
        "validate#sampler": {
            "_target_": "DistributedSampler",
            "dataset": "@validate#dataset",
            "even_divisible": False,
            "shuffle": False,
        },
        "validate#dataloader#sampler": "@validate#sampler",
        "initialize": [
            "$import os",
            "$import torch.distributed as dist",
            "$dist.is_initialized() or dist.init_process_group(backend='nccl' if torch.cuda.is_available() "
            "else 'gloo')",
            "$torch.cuda.set_device(@device) if torch.cuda.is_available() else None",
            *_initialize(spec, distributed=True),
        ],
        "run": list(_TRAIN_RUN),
        "finalize": ["$dist.is_initialized() and dist.destroy_process_group()"],
    }
