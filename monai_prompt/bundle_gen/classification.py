"""The classification bundle configs (``train``, ``evaluate``, ``inference``, ``multi_gpu_train``) as Python dicts.

One template for every method: a :class:`~monai_prompt.bundle_gen.specs.BundleSpec` fills in the method, its
config and its optimisation recipe. Ids follow the model-zoo layout (``train#...``/``validate#...``) so MONAI's
property checks, ``--tracking mlflow`` and MONAI Label find what they expect; the transforms are MONAI components
(``train#deterministic_transforms``, ``train#random_transforms``) that overrides reach by id. Repeated pieces
(``network_def``, the data settings, metric definitions) are written into each file on purpose: ``%file#id`` macros
resolve against the working directory, not the bundle, so every file has to stand on its own. The bundles are
2D (:class:`~monai_prompt.bundle_gen.specs.BundleSpec` refuses 3D classification): the transforms take 2D only.
"""

from __future__ import annotations

from typing import Any

from monai_prompt.bundle_gen import common
from monai_prompt.bundle_gen.specs import BundleSpec
from monai_prompt.data.demo import DEMO_CLASSES

__all__ = ["evaluate_config", "inference_config", "multi_gpu_config", "train_config"]

_BATCH_SIZE = 16
_NUM_WORKERS = 4
#: where ``make demo`` (and ``monai-prompt demo-data``) write the demo data, below the repository root.
DEMO_DATASET_DIR = "runs/demo/data"
#: training: the task follows the datalist unless given on the command line.
_DATALIST_TASK = {
    "num_classes": "$@datalist.num_classes",
    "multi_label": "$@datalist.multi_label",
    "class_names": "$@datalist.classes",
}
#: the classes of the network an inference builds before any training (the demo's, as ``metadata.json`` names them).
_UNTRAINED_TASK = {"num_classes": len(DEMO_CLASSES), "multi_label": False, "class_names": list(DEMO_CLASSES)}


def _tracked(spec: BundleSpec) -> dict[str, str]:
    """MLflow run parameters of training and evaluation runs alike: the classes, the datalist reader's options and
    (FPT) the feature cache's precision."""
    fpt = {"fpt_cache_dtype": "@fpt_cache_dtype"} if spec.fpt else {}
    return {"class_names": "@class_names", "multi_label": "@flags#multi_label",
            "datalist_options": "@datalist_options", **fpt}


def _method_key(spec: BundleSpec) -> str:
    """The network argument that takes ``method_config``."""
    return "fpt_config" if spec.fpt else "method_config"


def _network_def(spec: BundleSpec, trained: bool = False) -> dict[str, Any]:
    """``PromptClassifier`` (or ``FPTClassifier``) loading the pre-trained backbone itself from ``pretrained``
    (``trained``: with the recorded method config and backbone overrides, see :func:`~.common.recorded`)."""
    prefix = "trained_" if trained else ""
    if spec.fpt:
        target = "monai_prompt.nets.FPTClassifier"
        method = {"variant": "@method", _method_key(spec): common.method_config_ref(spec, f"@{prefix}method_config")}
    else:
        target = "monai_prompt.nets.PromptClassifier"
        method = {"method": "@method", _method_key(spec): common.method_config_ref(spec, f"@{prefix}method_config")}
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
        "backbone_overrides": f"@{prefix}backbone_overrides",
        # SDPA (FPT: in the side network): the same attention without storing its matrices
        "sdpa": "@flags#sdpa",
    }


def _network_settings(spec: BundleSpec, task: dict[str, Any] = _DATALIST_TASK) -> dict[str, Any]:
    """What defines the network, its inputs and outputs: the ``training_record`` of ``models/training_config.json``
    (``task``: the classes, :data:`_DATALIST_TASK` or :data:`_UNTRAINED_TASK`; ``intensity_range``: the window
    scaled to [0, 1], default ``None``: each image's min-max)."""
    return {**task, "in_channels": 3, "spatial_dims": 2, "img_size": spec.img_size, "intensity_range": None,
            **common.backbone_settings(spec)}


def _common(spec: BundleSpec, imports: tuple[str, ...] = ()) -> dict[str, Any]:
    """Paths, datalist, device, task and network settings every file starts with (``imports``: more than
    :data:`~monai_prompt.bundle_gen.common.IMPORTS`; ``torch.distributed`` and ``os`` come with
    ``multi_gpu_train.json``, ``monai_prompt.fpt`` with FPT training). ``datalist_options`` are the reader's
    options (``label_columns``, ``classes``, ``split``, ...), given to the reader and the data check alike;
    ``check_pixels`` false checks headers only (very large sets)."""
    return {
        "imports": [*common.IMPORTS, *imports],
        **common.paths(spec, DEMO_DATASET_DIR, "datalist.json"),
        "datalist_options": {},
        "datalist": "$monai_prompt.data.read_classification_datalist(@datalist_file, **@datalist_options)",
        "check_pixels": True,
        **common.device_settings(),
        **_network_settings(spec),
        **common.SDPA_SETTING,
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


#: training reads the features from the cache: free the frozen LPM's weights (its fingerprints stay for the delta).
_FPT_RELEASE = "$@network_def.release_lpm()"
#: preload the FPT cache through the deterministic transforms (entries already there are skipped, so a second run
#: only checks), logging the images done and the time left.
_FPT_PRELOAD = (
    "monai_prompt.fpt.preload_features(@network_def.to(@device), monai.data.Dataset(@fpt_preload_items, "
    "monai.transforms.Compose(@train#deterministic_transforms)), @fpt_cache_dir, batch_size=@batch_size, "
    "storage_dtype=@fpt_cache_dtype, progress=monai_prompt.engine.ProgressLog('FPT preload', unit='image'))"
)


def _deterministic_transforms() -> list[dict[str, Any]]:
    """Datalist item to network input and target: load, channel first, match ``in_channels``/``spatial_dims``, scale
    to [0, 1] (min-max, or the window ``intensity_range``), resize to ``img_size``, float32 image, label tensor
    (``monai_prompt.data.classification_transforms``, spelled out so each transform can be overridden by id)."""
    return [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "monai_prompt.data.MatchInputd", "keys": "image", "spatial_dims": "@spatial_dims",
         "channels": "@in_channels"},
        {"_target_": "monai_prompt.data.ScaleIntensityWindowd", "keys": "image",
         "intensity_range": "@intensity_range"},
        {"_target_": "Resized", "keys": "image", "spatial_size": "$monai.utils.ensure_tuple_rep(@img_size, "
         "@spatial_dims)", "mode": "bilinear", "anti_aliasing": True},
        {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
        {"_target_": "ToTensord", "keys": "label", "dtype": "$torch.float32 if @flags#multi_label else torch.long",
         "track_meta": False, "allow_missing_keys": True},
    ]


#: the training augmentations (``classification_transforms(augment=True)``): the mirror flips the patient's
#: left-right axis of NIfTI/DICOM images (their affine) and ``spatial_axis`` of PNG/JPEG ones (0: horizontal).
_RANDOM_TRANSFORMS = [
    {"_target_": "monai_prompt.data.RandLeftRightFlipd", "keys": "image", "prob": 0.5, "spatial_axis": 0},
    {"_target_": "RandAffined", "keys": "image", "prob": 0.5,
     "rotate_range": "$np.pi / 12", "scale_range": 0.1,
     "padding_mode": "zeros"},
    {"_target_": "RandAdjustContrastd", "keys": "image", "prob": 0.3, "gamma": [0.7, 1.5]},
]


def _metrics(prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Key metric (accuracy) and additional metrics (macro AUC, macro F1, quadratic-weighted kappa)."""
    decisions = "@metric_decisions"
    key = ("accuracy", {"_target_": "ignite.metrics.Accuracy", "is_multilabel": "@flags#multi_label",
                        "output_transform": decisions})
    return common.metrics(prefix, key, {
        "auc": {"_target_": "ROCAUC", "average": "macro", "output_transform": common.FROM_PRED_LABEL},
        "f1": {"_target_": "monai_prompt.engine.macro_f1", "multi_label": "@flags#multi_label",
               "output_transform": decisions},
        "kappa": {"_target_": "monai_prompt.engine.QuadraticWeightedKappa", "_disabled_": "@flags#multi_label",
                  "num_classes": "@num_classes", "output_transform": decisions},
    })


#: probabilities: softmax, or sigmoid for multi-label, of the logits in float32. Under CUDA AMP (the evaluator's fp16
#: autocast) the head gives fp16 logits, and fp16 probabilities are 1.0 beyond a margin of about 8 and 0.0005 apart
#: below it: confident images would tie in the AUC, share a calibration bin and read 1.000000 in predictions.csv.
_PROBABILITIES = [
    {"_target_": "CastToTyped", "keys": "pred", "dtype": "$torch.float32"},
    {"_target_": "Activationsd", "keys": "pred", "softmax": "$not @flags#multi_label", "sigmoid": "@flags#multi_label"},
]
#: inference: the image (and its meta dict, which MONAI Label's loader adds) leaves the output with the
#: probabilities, so that the ``Restored(ref_image="image")`` MONAI Label's ``BundleInferTask`` appends to these
#: transforms has no image to resize the class vector to and leaves it as it is.
_DROP_IMAGE = {"_target_": "DeleteItemsd", "keys": ["image", "image_meta_dict"]}
_POSTPROCESSING = {
    "_target_": "Compose",
    "transforms": [
        *_PROBABILITIES,
        {"_target_": "AsDiscreted", "keys": "label", "to_onehot": "$None if @flags#multi_label else @num_classes"},
    ],
}


#: every image decoded as training reads it, every label, with the reader's options.
_CHECK_DATALIST = (
    "$monai_prompt.data.check_classification_datalist(@datalist_file, channels=@in_channels, "
    "read_pixels=@flags#check_pixels, "
    "**@datalist_options)"
)


def _initialize(spec: BundleSpec, train: bool = True) -> list[str]:
    """:func:`~monai_prompt.bundle_gen.common.initialize` with every image and label checked and the data against
    the task (the splits the workflow reads not empty; evaluation: the training's classes); (FPT) then the LPM
    features preloaded, on rank 0 only under DDP (the other ranks wait), then (training) the LPM weights freed and
    only then ``@network`` built: ``DistributedDataParallel`` keeps a reference to every parameter of the module it
    wraps, so wrapped before the release it held the LPM's weights on every GPU for the whole run."""
    if train:
        task = "$monai_prompt.runs.check_task(@datalist, @num_classes, @flags#multi_label, ['training', 'validation'])"
    else:
        task = ("$monai_prompt.runs.check_task(@datalist, @num_classes, @flags#multi_label, [@evaluate_split], "
                "classes=@class_names)")
    release = spec.fpt and train  # training and validation read the cache: the LPM weights are not needed
    steps = common.initialize([_CHECK_DATALIST, task], train=train, network="@network_def" if release else "@network")
    if spec.fpt:
        steps += [f"${_FPT_PRELOAD} if @flags#fpt_preload and not @is_not_rank0 else None", common.RANK0_WAIT]
    if release:  # (every rank), then the network the trainer uses (DDP: wrapped without the LPM)
        steps += [_FPT_RELEASE, "@network"]
    return steps


def _class_report(output_dir: bool) -> dict[str, Any]:
    """Per-class precision/recall/F1 and the confusion matrix of each evaluation, a warning when every prediction is
    the same class or the model is no better than chance (``output_dir``: also ``eval/class_report.csv`` and
    ``eval/confusion_matrix.csv``)."""
    report = {"_target_": "monai_prompt.engine.ClassReportHandler", "num_classes": "@num_classes",
              "class_names": "@class_names", "multi_label": "@flags#multi_label"}
    if output_dir:
        return {**report, "output_dir": "@output_dir", "auc_name": "auc"}
    return {**report, "ece_name": "val_ece", "auc_name": "val_auc"}


def _fpt_batch(spec: BundleSpec) -> dict[str, Any]:
    """Engines of FPT bundles call ``network(image, fpt_kv)`` with the cached features."""
    return {"prepare_batch": "@fpt_prepare_batch"} if spec.fpt else {}


def train_config(spec: BundleSpec) -> dict[str, Any]:
    """``configs/train.json``: training with validation, best delta to ``models/model.pt``, resumable."""
    key_metric, additional_metrics = _metrics("val_")
    settings = _common(spec, ("$import monai_prompt.fpt",) if spec.fpt else ())
    if not spec.fpt:
        settings["network_def"] = {**settings["network_def"], **common.IN_BACKWARD_AUTOCAST}
    return common.with_flags({
        **settings,
        **(_fpt_settings() if spec.fpt else {}),
        **common.train_settings(spec),
        # multi_label is recorded as the flag reads it (a bool, whatever the command line wrote)
        "training_record": common.training_record(spec, _network_settings(spec)),
        "loss": "$torch.nn.BCEWithLogitsLoss() if @flags#multi_label else torch.nn.CrossEntropyLoss()",
        **common.optimization(spec),
        "metric_decisions": "$monai_prompt.engine.class_decisions(@flags#multi_label)",
        "train": {
            **common.train_checkpointing(),
            "deterministic_transforms": _deterministic_transforms(),
            "random_transforms": list(_RANDOM_TRANSFORMS),
            # FPT: the cache lookup sees the image exactly as the preload did, before the augmentations
            "preprocessing": common.compose("$@train#deterministic_transforms + "
                                      f"{'[@fpt_features] + ' if spec.fpt else ''}@train#random_transforms"),
            "dataset": common.dataset("$@datalist['training']", "@train#preprocessing"),
            "dataloader": common.loader("@train#dataset", shuffle="@flags#shuffle"),
            "inferer": {"_target_": "SimpleInferer"},
            "handlers": common.train_handlers(spec, _tracked(spec)),
            "trainer": common.trainer(spec, _fpt_batch(spec)),
        },
        "validate": {
            "preprocessing": common.compose("$@train#deterministic_transforms + [@fpt_features]" if spec.fpt
                                      else "@train#deterministic_transforms"),
            "dataset": common.dataset("$@datalist['validation']", "@validate#preprocessing"),
            "dataloader": common.loader("@validate#dataset", shuffle=False),
            "inferer": {"_target_": "SimpleInferer"},
            "postprocessing": _POSTPROCESSING,
            "key_metric": key_metric,
            "additional_metrics": additional_metrics,
            "handlers": [*common.validate_handlers(), _class_report(output_dir=False)],
            "evaluator": common.evaluator("validate#", _fpt_batch(spec)),
        },
        "initialize": _initialize(spec),
        "run": list(common.TRAIN_RUN),
    })


def evaluate_config(spec: BundleSpec) -> dict[str, Any]:
    """``configs/evaluate.json`` (merged on ``train.json``): metrics of ``models/model.pt`` on the test split, with
    the network and classes of its training record."""
    key_metric, additional_metrics = _metrics("")
    metrics_saver = {"_target_": "MetricsSaver", "save_dir": "@output_dir", "metrics": "*", "metric_details": None}
    reports = ("metrics.csv", "class_report.csv", "confusion_matrix.csv", "calibration.csv", "reliability.png")
    return {
        "evaluate_split": "test",
        "load_path": "$@ckpt_dir + '/model.pt'",
        **common.recorded(_network_settings(spec)),
        f"network_def#{_method_key(spec)}": common.method_config_ref(spec, "@trained_method_config"),
        "network_def#backbone_overrides": "@trained_backbone_overrides",
        "run_name": f"$monai_prompt.engine.unique_run_name('{spec.name}_evaluate')",
        "preprocessing": "@validate#preprocessing",
        "dataset": common.dataset("$@datalist[@evaluate_split]", "@preprocessing"),
        "dataloader": common.loader("@dataset", shuffle=False),
        "inferer": "@validate#inferer",
        "postprocessing": "@validate#postprocessing",
        "key_metric": key_metric,
        "additional_metrics": additional_metrics,
        "handlers": common.evaluate_handlers(metrics_saver, _class_report(output_dir=True), files=reports,
                                             params=_tracked(spec)),
        "evaluator": common.evaluator("", _fpt_batch(spec)),
        "initialize": _initialize(spec, train=False),
        "run": ["$@evaluator.run()", common.REPORT_EVALUATION],
    }


def inference_config(spec: BundleSpec) -> dict[str, Any]:
    """``configs/inference.json`` (standalone): class probabilities and the predicted class per image to
    ``eval/predictions.csv``, with the network and classes of the training record; the run ends with the file's
    path and number of rows (``inference: wrote 6 prediction rows to /abs/eval/predictions.csv``).

    ``infer_images`` is a folder (``--input_dir``), a glob or a list of them (default: the demo's test images); no
    datalist is read, and nothing is looked up before the workflow runs, so MONAI's property checks pass on a
    bundle without data. MONAI Label's stock ``monaibundle`` app serves the same ``preprocessing``, ``inferer`` and
    ``postprocessing`` (:data:`_DROP_IMAGE`).
    """
    return common.with_flags({
        **common.recorded(_network_settings(spec), {**_common(spec), "network_def": _network_def(spec, trained=True)},
                          untrained=_network_settings(spec, _UNTRAINED_TASK)),
        "load_path": "$@ckpt_dir + '/model.pt'",
        "input_dir": "$@dataset_dir + '/images/test'",
        "infer_images": "@input_dir",
        "infer_files": "$monai_prompt.data.find_images(@infer_images)",
        "run_name": f"$monai_prompt.engine.unique_run_name('{spec.name}_infer')",
        "preprocessing": common.compose(_deterministic_transforms()),
        "dataset": common.dataset("$[{'image': image} for image in @infer_files]", "@preprocessing"),
        "dataloader": common.loader("@dataset", shuffle=False),
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": common.compose([*_PROBABILITIES, _DROP_IMAGE]),
        **common.inference_workflow(
            "$monai_prompt.data.check_images(@infer_files, channels=@in_channels, read_pixels=@flags#check_pixels, "
            "source=@infer_images, spatial_dims=@spatial_dims)",
            {
                "_target_": "monai_prompt.engine.PredictionSaver",
                "output_dir": "@output_dir",
                "class_names": "@class_names",
                "multi_label": "@flags#multi_label",
            },
            common.inference_tracking({"class_names": "@class_names", "multi_label": "@flags#multi_label"},
                                      files=["predictions.csv"]),
        ),
    })


def multi_gpu_config(spec: BundleSpec) -> dict[str, Any]:
    """``configs/multi_gpu_train.json``: :func:`~monai_prompt.bundle_gen.common.multi_gpu_config`."""
    return common.multi_gpu_config()
