"""The segmentation bundle configs (``train``, ``evaluate``, ``inference``, ``multi_gpu_train``) as Python dicts.

One template for the nine PEFT methods in 2D and 3D: ``monai_prompt.nets.segmentation_network``, the network of the
backbone's family (``PromptUNETR``, MONAI's UNETR with the method on its ViT encoder; in 2D also SAM's ViT image
encoder and LiteMedSAM's TinyViT with UNETR-style decoders) trained in the model-zoo way: DiceCE loss on random ROI
crops (half centred on foreground), sliding-window inference over whole images (ROI = the network's ``img_size``,
``sw_overlap`` configurable), mean Dice (key metric), Dice per class and HD95 (mean and per class, in mm: the
units of the label's grid, pixels for PNG) on validation (on the ``pixdim`` grid) and evaluation (on each label's
own grid), and inference that inverts the preprocessing (``Invertd``) before ``SaveImaged`` writes each mask on its
input's grid (NIfTI with the input's affine for NIfTI/DICOM inputs, PNG for PNG inputs). The task-free pieces
(paths, delta checkpoints, optimiser, resume, the run-folder lock and training record, handlers, DDP) come from
:mod:`~monai_prompt.bundle_gen.common`; splits are read with MONAI's ``load_decathlon_datalist``
(:func:`monai_prompt.data.segmentation.read_segmentation_datalist`), the class names from the datalist's ``labels``.
As in :mod:`~monai_prompt.bundle_gen.classification`, evaluation and inference take the network and classes from the
training record (``models/training_config.json``) and every file stands on its own.
"""

from __future__ import annotations

from typing import Any

from monai_prompt.bundle_gen import common
from monai_prompt.bundle_gen.specs import BundleSpec
from monai_prompt.data.demo_segmentation import SEGMENTATION_CLASSES

__all__ = [
    "DEMO_DATASET_DIR",
    "evaluate_config",
    "inference_config",
    "multi_gpu_config",
    "train_config",
]

#: the default data folder below the repository root: where ``monai-prompt demo --task segmentation`` and
#: ``monai-prompt demo-data --task segmentation`` write the demo sets.
DEMO_DATASET_DIR = "runs/demo_segmentation/data"
_KEYS = ["image", "label"]
#: images per batch and ROI crops sampled from each (UNETR's BTCV recipe in 3D: one volume, four crops).
_BATCH = {2: (8, 2), 3: (1, 4)}
#: training: the classes and their label values are the datalist's ``labels`` unless given on the command line.
_DATALIST_TASK = {
    "class_names": "$@datalist.classes",
    "label_values": "$@datalist.label_values",
    "num_classes": "$len(@class_names)",
}
#: the classes of the network an inference builds before any training (the demo's, as ``metadata.json`` names them).
_UNTRAINED_TASK = {
    "class_names": list(SEGMENTATION_CLASSES),
    "label_values": list(range(len(SEGMENTATION_CLASSES))),
    "num_classes": len(SEGMENTATION_CLASSES),
}


def _network_def(spec: BundleSpec, trained: bool = False) -> dict[str, Any]:
    """The backbone family's segmentation network (``segmentation_network``) loading the pre-trained encoder itself
    from ``pretrained`` (``trained``: with the recorded method config and backbone overrides, see
    :func:`~monai_prompt.bundle_gen.common.recorded`)."""
    prefix = "trained_" if trained else ""
    return {
        "_target_": "monai_prompt.nets.segmentation_network",
        "in_channels": "@in_channels",
        "out_channels": "@num_classes",
        "img_size": "@img_size",
        "method": "@method",
        "method_config": common.method_config_ref(spec, f"@{prefix}method_config"),
        "backbone": "@backbone",
        "spatial_dims": "@spatial_dims",
        "feature_size": "@feature_size",
        "pretrained": "@pretrained",
        "layer_norm_eps": "@layer_norm_eps",
        "backbone_overrides": f"@{prefix}backbone_overrides",
        "sdpa": "@flags#sdpa",
    }


def _network_settings(spec: BundleSpec, task: dict[str, Any] = _DATALIST_TASK) -> dict[str, Any]:
    """The classes, input (its size, the spacing ``pixdim`` the images are resampled to, default ``None``: the
    data's own, and the intensity window ``intensity_range`` scaled to [0, 1], default ``None``: each image's own
    minimum and maximum), decoder width, encoder and method: what the training record keeps for evaluation,
    inference, the packaged copy and a resume's check (``task``: the classes, :data:`_DATALIST_TASK` or
    :data:`_UNTRAINED_TASK`)."""
    return {
        **task,
        "in_channels": 1,
        "spatial_dims": spec.spatial_dims,
        "img_size": spec.img_size,
        "pixdim": None,
        "intensity_range": None,
        "feature_size": 16,
        **common.backbone_settings(spec),
    }


def _common(spec: BundleSpec) -> dict[str, Any]:
    """Paths, datalist, device, classes, input, network and loader settings every file starts with."""
    batch_size, num_samples = _BATCH[spec.spatial_dims]
    return {
        "imports": list(common.IMPORTS),
        **common.paths(spec, DEMO_DATASET_DIR, f"datalist_{spec.spatial_dims}d.json"),
        "datalist": "$monai_prompt.data.read_segmentation_datalist(@datalist_file)",
        **common.device_settings(),
        **_network_settings(spec),
        "roi_size": "$monai.utils.ensure_tuple_rep(@img_size, @spatial_dims)",
        **common.SDPA_SETTING,
        "network_def": _network_def(spec),
        "network": "$@network_def.to(@device)",
        "batch_size": batch_size,
        "num_samples": num_samples,
        "sw_batch_size": 4,
        "sw_overlap": 0.25,
        "num_workers": 4,
        "cache_rate": 0.0,
        "experiment_name": "monai_prompt_segmentation",
    }


def _deterministic_transforms(label: bool = True, resample_label: bool = True) -> list[dict[str, Any]]:
    """Datalist item to network input and target: load image and label, channel first, match
    ``in_channels``/``spatial_dims``, the label values, rounded (a float label map's 1.0000001 is 1), to class indices
    (``label_values`` -> ``0..K-1``), RAS orientation, resampling to ``pixdim`` when it is set (default: keep the
    data's spacing), image scaled to [0, 1] (each image's min-max, or the window ``intensity_range``), float32. No
    resizing: the sliding window covers whole images of any size.

    Args:
        label: also the label (training, validation, evaluation; allowed to be missing); inference reads images
            only, as MONAI Label's loader needs every key it is given.
        resample_label: the label too is resampled to ``pixdim``; evaluation keeps it on its own grid (turned to RAS
            only, which moves no voxel) and resamples the prediction to it (:func:`_to_input_grid`).
    """
    keys = _KEYS if label else "image"
    optional = {"allow_missing_keys": True} if label else {}
    resampled = keys if resample_label else "image"
    match_label = [
        {"_target_": "monai_prompt.data.MatchInputd", "keys": "label", "spatial_dims": "@spatial_dims",
         "channels": 1, **optional},
        {"_target_": "AsDiscreted", "keys": "label", "rounding": "torchrounding", **optional},
        {"_target_": "MapLabelValued", "keys": "label", "orig_labels": "@label_values",
         "target_labels": "$list(range(len(@label_values)))", **optional},
    ]
    return [
        {"_target_": "LoadImaged", "keys": keys, "image_only": True, **optional},
        {"_target_": "EnsureChannelFirstd", "keys": keys, **optional},
        {"_target_": "monai_prompt.data.MatchInputd", "keys": "image", "spatial_dims": "@spatial_dims",
         "channels": "@in_channels"},
        *(match_label if label else []),
        {"_target_": "monai_prompt.data.SliceOrientationd", "keys": keys, "axcodes": "$'RAS'[:@spatial_dims]",
         "labels": None, **optional},
        {"_target_": "monai_prompt.data.SliceSpacingd", "_disabled_": "$@pixdim is None", "keys": resampled,
         "pixdim": "@pixdim", "mode": ["bilinear", "nearest"] if resampled == _KEYS else "bilinear", **optional},
        {"_target_": "monai_prompt.data.ScaleIntensityWindowd", "keys": "image", "intensity_range": "@intensity_range"},
        {"_target_": "EnsureTyped", "keys": keys, "dtype": "$torch.float32", **optional},
    ]


def _random_transforms() -> list[dict[str, Any]]:
    """The training sampling and augmentations: pad to the ROI, ``num_samples`` ROI crops per image (half centred
    on foreground), a left-right flip (none for a sagittal slice: RandLeftRightFlipd), contrast and intensity
    shifts."""
    return [
        {"_target_": "SpatialPadd", "keys": _KEYS, "spatial_size": "@roi_size"},
        {"_target_": "RandCropByPosNegLabeld", "keys": _KEYS, "label_key": "label", "image_key": "image",
         "spatial_size": "@roi_size", "pos": 1, "neg": 1, "num_samples": "@num_samples", "image_threshold": 0},
        {"_target_": "monai_prompt.data.RandLeftRightFlipd", "keys": _KEYS, "prob": 0.5, "spatial_axis": 0},
        {"_target_": "RandAdjustContrastd", "keys": "image", "prob": 0.3, "gamma": [0.7, 1.5]},
        {"_target_": "RandShiftIntensityd", "keys": "image", "prob": 0.5, "offsets": 0.1},
    ]


def _sliding_window() -> dict[str, Any]:
    return {
        "_target_": "SlidingWindowInferer",
        "roi_size": "@roi_size",
        "sw_batch_size": "@sw_batch_size",
        "overlap": "@sw_overlap",
        "mode": "gaussian",
    }


def _metrics(prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Key metric (mean Dice over the foreground classes, MONAI's ``MeanDice`` value) with the Dice per class
    (``dice_<class>``) from the same handler, so Dice is computed once; HD95 per class and its mean, in the units of
    each label's grid (mm; pixels for PNG). NaN where undefined: :mod:`monai_prompt.engine.metrics.segmentation`."""
    foreground = "$@class_names[1:]"
    maps = {"include_background": False, "num_classes": "@num_classes", "output_transform": common.FROM_PRED_LABEL}
    key = ("mean_dice", {"_target_": "monai_prompt.engine.ClassMeanDice", "class_names": foreground,
                         "class_prefix": f"{prefix}dice", **maps})
    return common.metrics(prefix, key, {
        "hd95": {"_target_": "monai_prompt.engine.ClassHausdorffDistance", "class_names": foreground,
                 "mean_name": f"{prefix}mean_hd95", "percentile": 95, **maps},
    })


#: the prediction as class indices (the logits' argmax) for the metrics, which take class-index maps (``num_classes``)
#: as the labels are: no one-hot tensors and no softmax of the classes x the volume (3.3 GB each for 117 classes at
#: 181 x 217 x 181 voxels). The softmax's argmax is the logits' but where it rounds logits one float apart (or, under
#: AMP, a few) to a tie and takes the first class.
_POSTPROCESSING = common.compose([{"_target_": "AsDiscreted", "keys": "pred", "argmax": True}])


def _resampled_only(resampled: bool) -> str:
    """``_disabled_`` of a postprocessing step that runs only where the prediction is resampled back to the input's
    grid (``pixdim`` set: the probabilities are interpolated, ``resampled=True``), or only where it is not."""
    return f"$@pixdim is {'' if resampled else 'not '}None"


def _to_input_grid(step: dict[str, Any], argmax_step: bool) -> list[dict[str, Any]]:
    """The prediction as class indices on the input's own grid: with ``pixdim`` set, the softmax is taken back to it
    by ``step`` a few classes at a time, keeping the running argmax (``ResampledArgmaxd``: the probabilities, not
    the class indices, are interpolated, and the classes x the input's volume are never in memory at once); without,
    the argmax comes first (and ``step`` moves that one channel where ``argmax_step``). The softmax of the classes x
    the ``pixdim`` grid lives only until then.

    Args:
        step: inference's ``Invertd`` through the preprocessing; evaluation's ``ResampleToMatchd`` onto the label's
            grid.
        argmax_step: ``step`` also runs without ``pixdim`` (inference: ``Invertd`` undoes the orientation; evaluation:
            prediction and label share the grid).
    """
    softmax = {"_target_": "Activationsd", "_disabled_": _resampled_only(True), "keys": "pred", "softmax": True}
    argmax = {"_target_": "AsDiscreted", "_disabled_": _resampled_only(False), "keys": "pred", "argmax": True}
    resampled = {"_target_": "monai_prompt.data.ResampledArgmaxd", "_disabled_": _resampled_only(True),
                 "keys": "pred", "transform": step}
    moved = [{"_target_": step["_target_"], "_disabled_": _resampled_only(False), **step}] if argmax_step else []
    return [softmax, argmax, *moved, resampled]


#: inference: the mask without its channel axis (``SaveImaged`` sees that from the spatial shape), the class indices
#: back to the label values, as the smallest unsigned integer type that holds them (uint8 for up to 256 values).
#: MONAI Label's ``BundleInferTask`` drops ``SaveImaged`` and writes the mask itself through ITK, which needs both (a
#: 2D mask with a channel axis is a 3D image, and PNG holds no float).
_MASK = (
    {"_target_": "SqueezeDimd", "keys": "pred", "dim": 0},
    {"_target_": "MapLabelValued", "keys": "pred", "orig_labels": "$list(range(len(@label_values)))",
     "target_labels": "@label_values", "dtype": "$monai_prompt.data.mask_dtype(@label_values)"},
)


def _continue_model(settings: dict[str, Any]) -> dict[str, Any]:
    """``continue_model`` (default false): the training run continues ``models/model.pt`` in place, as MONAI Label's
    ``BundleTrainTask`` trains a served bundle (its ``CheckpointLoader`` loads the delta, the data come from its
    datastore as ``train#dataset#data`` and ``validate#dataset#data``): the folder's previous run and training
    record are kept, the classes are the record's, and no datalist is looked up; one given with ``--datalist_file``
    is read and checked against the record's classes, and trained on. MONAI resolves every reference of an
    expression before evaluating it, so the datalist expressions themselves test the flag.

    Args:
        settings: the ``datalist_file`` and ``datalist`` expressions of :func:`_common`.
    """
    unless = "$None if @flags#continue_model else "
    return {
        "datalist_file": unless + settings["datalist_file"][1:],
        "datalist": "$None if @datalist_file is None else " + settings["datalist"][1:],
        "class_names": "$@training_config['class_names'] if @flags#continue_model else @datalist.classes",
        "label_values": f"${common.record_read('label_values')} if @flags#continue_model else @datalist.label_values",
        "continue_model": False,
        "training_config": "$monai_prompt.runs.read_training_config(@ckpt_dir, required=@flags#continue_model)",
    }


#: training's ``img_size`` (the ROI and sliding window): whole training images, at most a memory budget
#: (:func:`monai_prompt.data.whole_image_roi`, logged); continuing the served model: its recorded size; a command-line
#: ``--img_size`` replaces the expression.
_TRAINING_IMG_SIZE = ("$@training_config['img_size'] if @flags#continue_model else "
                      "monai_prompt.data.whole_image_roi(@datalist['training'], @spatial_dims, pixdim=@pixdim)")

#: training's ``pixdim`` (default ``None``: the data's own spacing); continuing the served model: its recorded
#: spacing; a command-line ``--pixdim`` replaces the expression.
_TRAINING_PIXDIM = f"${common.record_read('pixdim')} if @flags#continue_model else None"

#: training's ``intensity_range`` (default ``None``: each image's min-max; a CT window such as ``[-1000, 2000]``);
#: continuing the served model: its recorded window; a command-line ``--intensity_range`` replaces the expression.
_TRAINING_INTENSITY_RANGE = f"${common.record_read('intensity_range')} if @flags#continue_model else None"

#: a training run that keeps the folder's previous run: ``--resume`` or ``continue_model`` (:func:`_continue_model`).
_KEPT = "@flags#resume or @flags#continue_model"
#: MLflow run parameters of training and evaluation runs alike: the classes, their label values, the spacing, the
#: decoder's width and the sliding window's overlap (the ROI, ``img_size``, is in the logged ``backbone_config``).
_TRACKED = {name: f"@{name}" for name in ("class_names", "label_values", "pixdim", "feature_size", "sw_overlap")}


#: validation and evaluation warn when the predictions miss the ground truth's foreground or classes.
_COLLAPSE_CHECK = {"_target_": "monai_prompt.engine.SegmentationCollapseHandler", "class_names": "@class_names"}


def _initialize(train: bool = True) -> list[str]:
    """:func:`~monai_prompt.bundle_gen.common.initialize` with every image/label pair checked (geometry, label values,
    the splits the workflow reads, the classes against the bundle's; training: not when it continues the served
    model without a datalist, :func:`_continue_model`)."""
    splits = "['training', 'validation']" if train else "[@evaluate_split]"
    check = (
        f"monai_prompt.data.check_segmentation_datalist(@datalist_file, @class_names, channels=@in_channels, "
        f"required_splits={splits}, num_classes=@num_classes, label_values=@label_values, datalist=@datalist, "
        "intensity_range=@intensity_range)"
    )
    if not train:
        return common.initialize([f"${check}"], train=False)
    return common.initialize([f"$None if @datalist_file is None else {check}"], kept=_KEPT)


def train_config(spec: BundleSpec) -> dict[str, Any]:
    """``configs/train.json``: training with sliding-window validation, best delta to ``models/model.pt``,
    resumable."""
    key_metric, additional_metrics = _metrics("val_")
    settings = {**_common(spec), "img_size": _TRAINING_IMG_SIZE, "pixdim": _TRAINING_PIXDIM,
                "intensity_range": _TRAINING_INTENSITY_RANGE}
    settings["network_def"] = {**settings["network_def"], **common.IN_BACKWARD_AUTOCAST}
    return common.with_flags({
        **settings,
        **_continue_model(settings),
        **common.train_settings(spec, _KEPT),
        "training_record": common.training_record(spec, _network_settings(spec)),
        "loss": {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True},
        **common.optimization(spec),
        "train": {
            **common.train_checkpointing(),
            "deterministic_transforms": _deterministic_transforms(),
            "random_transforms": _random_transforms(),
            "preprocessing": common.compose("$@train#deterministic_transforms + @train#random_transforms"),
            "dataset": common.dataset("$@datalist['training']", "@train#preprocessing"),
            "dataloader": common.loader("@train#dataset", shuffle="@flags#shuffle"),
            "inferer": {"_target_": "SimpleInferer"},
            "handlers": common.train_handlers(spec, {**_TRACKED, "num_samples": "@num_samples"}),
            "trainer": common.trainer(spec),
        },
        "validate": {
            "preprocessing": common.compose("@train#deterministic_transforms"),
            "dataset": common.dataset("$@datalist['validation']", "@validate#preprocessing"),
            "dataloader": common.loader("@validate#dataset", shuffle=False, batch_size=1),
            "inferer": _sliding_window(),
            "postprocessing": _POSTPROCESSING,
            "key_metric": key_metric,
            "additional_metrics": additional_metrics,
            "handlers": [*common.validate_handlers(), _COLLAPSE_CHECK],
            "evaluator": common.evaluator("validate#"),
        },
        "initialize": _initialize(),
        "run": list(common.TRAIN_RUN),
    })


def evaluate_config(spec: BundleSpec) -> dict[str, Any]:
    """``configs/evaluate.json`` (merged on ``train.json``): Dice and HD95 of ``models/model.pt`` on the test split,
    to ``eval/metrics.csv`` (and per image to ``eval/mean_dice_raw.csv``, ``eval/hd95_raw.csv``), with the network
    and classes of its training record. With ``pixdim`` set, each label stays on its own grid (not resampled) and
    the softmax is resampled onto it (in float32, a few classes at a time: :func:`_to_input_grid`; inference's
    ``Invertd``: float64) before the argmax, as inference
    takes it back to the input's grid: the scores of the masks inference writes against the label files
    (validation scores the ``pixdim`` grid)."""
    key_metric, additional_metrics = _metrics("")
    metrics_saver = {
        "_target_": "monai_prompt.engine.ClassMetricsSaver",
        "class_names": "$@class_names[1:]",
        "save_dir": "@output_dir",
        "metrics": "*",
        "metric_details": ["mean_dice", "hd95"],
        "batch_transform": "$lambda batch: [item['image'].meta for item in batch]",
        "summary_ops": None,
    }
    return {
        "evaluate_split": "test",
        "load_path": "$@ckpt_dir + '/model.pt'",
        **common.recorded(_network_settings(spec)),
        "network_def#method_config": common.method_config_ref(spec, "@trained_method_config"),
        "network_def#backbone_overrides": "@trained_backbone_overrides",
        "run_name": f"$monai_prompt.engine.unique_run_name('{spec.name}_evaluate')",
        "preprocessing": common.compose(_deterministic_transforms(resample_label=False)),
        "dataset": common.dataset("$@datalist[@evaluate_split]", "@preprocessing"),
        "dataloader": common.loader("@dataset", shuffle=False, batch_size=1),
        "inferer": "@validate#inferer",
        "postprocessing": common.compose(_to_input_grid(
            {"_target_": "ResampleToMatchd", "keys": "pred", "key_dst": "label", "dtype": "$torch.float32"},
            argmax_step=False,
        )),
        "key_metric": key_metric,
        "additional_metrics": additional_metrics,
        "handlers": common.evaluate_handlers(metrics_saver, _COLLAPSE_CHECK, params=_TRACKED,
                                             files=("metrics.csv", "mean_dice_raw.csv", "hd95_raw.csv")),
        "evaluator": common.evaluator(""),
        "initialize": _initialize(train=False),
        "run": ["$@evaluator.run()", common.REPORT_EVALUATION],
    }


def inference_config(spec: BundleSpec) -> dict[str, Any]:
    """``configs/inference.json`` (standalone): a mask per image on the image's own grid, to ``eval/masks``, with
    the network and classes of the training record.

    ``infer_images`` is a folder (``--input_dir``), a glob or a list of them (default: the demo's test images); no
    datalist is read. The masks are ``<image name>_seg.nii.gz`` (the extension dropped in any case:
    ``mask_name_formatter``) with the input's affine and NIfTI codes (``NiftiMaskWriter``), or ``_seg.png`` for PNG
    inputs, in the input's folder below the inputs' common parent (``mask_root``: same-named inputs of two folders
    get a mask each); ``SaveImaged`` leaves each mask's path in its meta (``saved_to``), and the run ends with the
    count and folder of the masks (``SavedMasks``: ``inference: wrote 12 masks to /abs/eval/masks``). MONAI Label's
    stock ``monaibundle`` app serves the same ``preprocessing``, ``inferer`` and ``postprocessing`` (image-only
    loading, :data:`_MASK`).
    """
    return common.with_flags({
        **common.recorded(_network_settings(spec), {**_common(spec), "network_def": _network_def(spec, trained=True)},
                          untrained=_network_settings(spec, _UNTRAINED_TASK)),
        "load_path": "$@ckpt_dir + '/model.pt'",
        "input_dir": f"$@dataset_dir + '/{spec.spatial_dims}d/images/test'",
        "infer_images": "@input_dir",
        "infer_files": f"$monai_prompt.data.find_images(@infer_images, dicom_series={spec.spatial_dims == 3})",
        "mask_dir": "$@output_dir + '/masks'",
        "mask_ext": "$monai_prompt.data.mask_suffix(@infer_files, @label_values)",
        "mask_root": "$monai_prompt.data.mask_root(@infer_files)",
        "run_name": f"$monai_prompt.engine.unique_run_name('{spec.name}_infer')",
        "preprocessing": common.compose(_deterministic_transforms(label=False)),
        "dataset": common.dataset("$[{'image': image} for image in @infer_files]", "@preprocessing"),
        "dataloader": common.loader("@dataset", shuffle=False, batch_size=1),
        "inferer": _sliding_window(),
        "postprocessing": common.compose([
            *_to_input_grid({"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing",
                             "orig_keys": "image", "nearest_interp": False, "to_tensor": True}, argmax_step=True),
            *_MASK,
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@mask_dir", "output_postfix": "seg",
             "output_ext": "@mask_ext", "output_dtype": "$monai_prompt.data.mask_dtype(@label_values)",
             "resample": False, "separate_folder": False, "data_root_dir": "@mask_root",
             "output_name_formatter": "$monai_prompt.data.mask_name_formatter",
             "writer": "$monai_prompt.data.NiftiMaskWriter if @mask_ext == '.nii.gz' else None", "print_log": False,
             "savepath_in_metadict": True},
        ]),
        **common.inference_workflow(
            "$monai_prompt.data.check_images(@infer_files, channels=@in_channels, source=@infer_images, "
            "spatial_dims=@spatial_dims)",
            {"_target_": "monai_prompt.engine.SavedMasks", "output_dir": "@mask_dir"},
            common.inference_tracking({**_TRACKED, "mask_dir": "@mask_dir"}),
        ),
    })


def multi_gpu_config(spec: BundleSpec) -> dict[str, Any]:
    """``configs/multi_gpu_train.json``: :func:`~monai_prompt.bundle_gen.common.multi_gpu_config` (the data check
    runs on every rank)."""
    return common.multi_gpu_config()
