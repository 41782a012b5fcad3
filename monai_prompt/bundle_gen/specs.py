"""What differs between the bundles: one :class:`BundleSpec` per method and task.

Everything else (the workflow, transforms, metrics, checkpoints, tracking, docs layout) is shared: one template
per task, :mod:`monai_prompt.bundle_gen.classification` and :mod:`~monai_prompt.bundle_gen.segmentation`
(2D and 3D segmentation), on the pieces of :mod:`~monai_prompt.bundle_gen.common`, with
:mod:`~monai_prompt.bundle_gen.metadata` and :mod:`~monai_prompt.bundle_gen.readme`. :data:`BUNDLE_SPECS` holds
the classification bundles, :data:`SEGMENTATION_SPECS` the segmentation ones (the classification specs of the nine
PEFT methods with a segmentation recipe), :data:`ALL_BUNDLE_SPECS` both.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from monai_prompt.fpt.config import FPTConfig
from monai_prompt.peft.registry import get_method

__all__ = ["ALL_BUNDLE_SPECS", "BUNDLE_SPECS", "SEGMENTATION_SPECS", "TASKS", "BundleSpec", "Reference"]

#: the task templates.
TASKS = ("classification", "segmentation")


@dataclass(frozen=True)
class Reference:
    """A publication (and its official code) a bundle implements."""

    citation: str
    url: str


@dataclass(frozen=True)
class BundleSpec:
    """One method's bundle for one task.

    Attributes:
        method: method name (:func:`monai_prompt.peft.method_names`, or the FPT variant ``fpt``/``fptplus``).
        title: display name.
        summary: one sentence on what the method trains.
        config_overrides: changes to the method's default config (the bundle spells out the whole config).
        img_size: default input size (the LPM size for FPT).
        optimizer: ``torch.optim`` class name.
        optimizer_args: optimizer arguments besides ``params``/``lr``/``weight_decay``.
        learning_rate: base learning rate (cosine-annealed to 0 over ``epochs``).
        weight_decay: weight decay.
        epochs: default ``max_epochs``.
        recipe_source: where the optimisation recipe comes from.
        references: publications.
        changelog: version -> change, newest first.
        fpt: the network is ``FPTClassifier`` (frozen LPM + side network) instead of ``PromptClassifier``.
        task: one of :data:`TASKS`.
        spatial_dims: 2 or 3 (the classification template is 2D; segmentation has both).
    """

    method: str
    title: str
    summary: str
    config_overrides: dict[str, Any] = field(default_factory=dict)
    img_size: int = 224
    optimizer: str = "AdamW"
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 20
    recipe_source: str = "AdamW with cosine annealing, the common PEFT recipe (V-PETL Bench)"
    references: tuple[Reference, ...] = ()
    changelog: tuple[tuple[str, str], ...] = (
        ("0.1.4", ("attention runs through PyTorch SDPA by default (sdpa; --sdpa false for the literal path); the "
                   "training log gives the run's time left (FPT: the preload too), on rank 0 only; the random "
                   "flip mirrors the patient's left-right axis of NIfTI/DICOM images from their affine "
                   "(RandLeftRightFlipd; PNG/JPEG: spatial_axis); FPT/FPT+: side_img_size null follows img_size "
                   "(224/128 at 512), a side input larger than img_size is refused; images of mixed formats (PNG, "
                   "DICOM, MetaImage) batch; a --method other than the recorded one is refused before the network "
                   "is built; the training record and predictions.csv are written 0644; --overwrite true sets the "
                   "previous run aside until the first checkpoint (put back if the run stops before); unreadable "
                   "checkpoints and full disks name the file and the fix; a resume applies a new learning rate and "
                   "weight decay and refuses settings that define another network or batch size")),
        ("0.1.3", ("every boolean setting (amp, resume, overwrite, check_pixels, multi_label, shuffle, FPT: "
                   "fpt_preload; the method config's deep, prompt_norm, prompt_proj) accepts true/false/yes/no/1/0 "
                   "in any case on the command line and refuses any other value naming the setting (flags); "
                   "shuffle is a setting of its own")),
        ("0.1.2", ("evaluation and inference build the network from the training record with no defaults (a missing "
                   "models/training_config.json stops them with what to run or give); the transforms are 2D only; "
                   "multi_gpu_train.json fills distributed_setup instead of restating initialize; the datalist "
                   "reader and check are read_classification_datalist and check_classification_datalist")),
        ("0.1.1", ("inference: the image leaves the output after the softmax, so that MONAI Label's stock "
                   "monaibundle app serves the class probabilities; evaluation: expected calibration error and "
                   "reliability diagram (val_ece in validation); FPT/FPT+: training frees the LPM weights after "
                   "the preload, the side network runs on SDPA")),
        ("0.1.0", "initial release: generated by monai_prompt.bundle_gen; delta checkpoints, MLflow, DDP"),
    )
    fpt: bool = False
    task: str = "classification"
    spatial_dims: int = 2

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} is not one of {TASKS}.")
        if self.spatial_dims not in (2, 3) or (self.task == "classification" and self.spatial_dims != 2):
            raise ValueError(f"spatial_dims={self.spatial_dims}: classification bundles are 2D, segmentation 2D or 3D.")

    @property
    def name(self) -> str:
        """Bundle folder name. It ends in the task, which MONAI Label infers from it: ``<method>_classification``,
        ``<method>_segmentation`` (2D) and ``<method>_3d_segmentation``."""
        if self.task == "segmentation" and self.spatial_dims == 3:
            return f"{self.method}_3d_segmentation"
        return f"{self.method}_{self.task}"

    @property
    def version(self) -> str:
        return self.changelog[0][0]

    def method_config(self) -> dict[str, Any]:
        """The method's full config (its defaults with ``config_overrides``), JSON-ready."""
        if self.fpt:
            config = dataclasses.asdict(FPTConfig.from_dict(self.method, self.config_overrides))
            config.pop("variant")
        else:
            config = dataclasses.asdict(get_method(self.method).make_config(dict(self.config_overrides)))
        return json.loads(json.dumps(config))


_VIT = Reference(
    "Dosovitskiy et al., An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale, ICLR 2021",
    "https://arxiv.org/abs/2010.11929",
)
_VPETL = Reference(
    "Xin et al., V-PETL Bench: A Unified Visual Parameter-Efficient Transfer Learning Benchmark, NeurIPS 2024 "
    "Datasets and Benchmarks",
    "https://github.com/synbol/Parameter-Efficient-Transfer-Learning-Benchmark",
)
_FPT_REFS = (
    Reference(
        "Huang, Cheng, Tam, Tang, Fine-grained Prompt Tuning: A Parameter and Memory Efficient Transfer Learning "
        "Method for High-resolution Medical Image Classification, MICCAI 2024, pp. 120-130",
        "https://arxiv.org/abs/2403.07576",
    ),
    Reference(
        "Huang, Cheng, Tam, Tang, Boosting Memory Efficiency in Transfer Learning for High-Resolution Medical Image "
        "Classification (FPT+), IEEE TNNLS 36(9):17280-17294, 2025",
        "https://arxiv.org/abs/2408.02426",
    ),
    Reference("Official code: YijinHuang/FPT", "https://github.com/YijinHuang/FPT"),
)
#: FPT and FPT+ share the official recipe (MICCAI-era configs: lr 2e-3 for every dataset) and a 512 x 512 LPM input.
_FPT_RECIPE: dict[str, Any] = {
    "img_size": 512,
    "learning_rate": 2e-3,
    "weight_decay": 0.1,
    "recipe_source": "official FPT code (YijinHuang/FPT, MICCAI-era configs): AdamW lr 2e-3, wd 0.1, 20 epochs, "
    "batch 16",
    "references": _FPT_REFS,
    "fpt": True,
}

_SPECS = (
    BundleSpec(
        method="full",
        title="Full fine-tuning",
        summary="every backbone weight and the linear head train (the upper reference every PEFT paper reports)",
        learning_rate=1e-4,
        weight_decay=0.05,
        references=(_VIT, _VPETL),
    ),
    BundleSpec(
        method="linear",
        title="Linear probing",
        summary="the backbone is frozen; only the linear head on the CLS feature trains",
        weight_decay=0.0,
        references=(_VIT, _VPETL),
    ),
    BundleSpec(
        method="vpt",
        title="VPT (visual prompt tuning)",
        summary="learnable prompt tokens are inserted after the CLS token (shallow: once; deep: before every block)",
        references=(
            Reference("Jia et al., Visual Prompt Tuning, ECCV 2022", "https://arxiv.org/abs/2203.12119"),
            Reference("Official code: KMnP/vpt", "https://github.com/KMnP/vpt"),
        ),
    ),
    BundleSpec(
        method="lora",
        title="LoRA",
        summary="a trainable low-rank update (alpha / r) B A of the frozen qkv projections",
        references=(
            Reference(
                "Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, ICLR 2022",
                "https://arxiv.org/abs/2106.09685",
            ),
        ),
    ),
    BundleSpec(
        method="adapter",
        title="AdaptFormer adapters",
        summary="a parallel bottleneck MLP beside each block's MLP, its output scaled by s",
        references=(
            Reference(
                "Chen et al., AdaptFormer: Adapting Vision Transformers for Scalable Visual Recognition, NeurIPS 2022",
                "https://arxiv.org/abs/2205.13535",
            ),
        ),
    ),
    BundleSpec(
        method="bitfit",
        title="BitFit",
        summary="only the bias terms of the backbone (and the head) train",
        weight_decay=0.0,
        references=(
            Reference(
                "Ben Zaken et al., BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked "
                "Language-models, ACL 2022",
                "https://arxiv.org/abs/2106.10199",
            ),
        ),
    ),
    BundleSpec(
        method="ssf",
        title="SSF (scale and shift features)",
        summary="a per-channel scale and shift after every linear, LayerNorm and the patch embedding",
        references=(
            Reference(
                "Lian et al., Scaling & Shifting Your Features: A New Baseline for Efficient Model Tuning, "
                "NeurIPS 2022",
                "https://arxiv.org/abs/2210.08823",
            ),
        ),
    ),
    BundleSpec(
        method="dvpt",
        title="DVPT (dynamic visual prompt tuning)",
        summary="learnable prompts cross-attend to bottleneck-transformed frozen features; the result is projected "
        "back and added, one module shared by several blocks",
        learning_rate=5e-4,
        epochs=60,
        recipe_source="official DVPT code (NKUhealong/DVPT): AdamW lr 5e-4, wd 1e-4, 60 epochs",
        references=(
            Reference(
                "He et al., DVPT: Dynamic Visual Prompt Tuning of Large Pre-trained Models for Medical Image "
                "Analysis, Neural Networks 185:107168, 2025",
                "https://arxiv.org/abs/2307.09787",
            ),
            Reference("Official code: NKUhealong/DVPT", "https://github.com/NKUhealong/DVPT"),
        ),
    ),
    BundleSpec(
        method="ept",
        title="EPT (embedded prompt tuning)",
        summary="learnable prompt logits are concatenated to every block's attention logits along the key axis "
        "and dropped after the softmax",
        optimizer="SGD",
        optimizer_args={"momentum": 0.9},
        learning_rate=6e-4,
        weight_decay=1e-4,
        recipe_source="official EPT code (zuwenqiang/EPT): SGD momentum 0.9, lr 6e-4, wd 1e-4, cosine, 20 epochs",
        references=(
            Reference(
                "Zu et al., Embedded Prompt Tuning: Towards Enhanced Calibration of Pretrained Models for Medical "
                "Images, Medical Image Analysis 97:103258, 2024",
                "https://arxiv.org/abs/2407.01003",
            ),
            Reference("Official code: zuwenqiang/EPT", "https://github.com/zuwenqiang/EPT"),
        ),
    ),
    BundleSpec(
        method="fpt",
        title="FPT (fine-grained prompt tuning)",
        summary="a frozen large ViT sees the high-resolution image (its selected keys and values are computed once "
        "into a preload cache); fine-grained prompts summarise them by cross-attention for a small side ViT on a "
        "low-resolution copy, and only the prompts, fusion and side ViT train",
        **_FPT_RECIPE,
    ),
    BundleSpec(
        method="fptplus",
        title="FPT+",
        summary="FPT with the FPT+ defaults: a side ViT on a quarter-size copy (128 x 128 at the 512 px LPM "
        "input), prompts at full width with LayerNorm and no "
        "projection, only the last half of the frozen ViT's layers tapped (less memory, fewer parameters)",
        **_FPT_RECIPE,
    ),
)

#: the release that steps the optimiser in backward (the bundles that train inside the backbone: not FPT).
_IN_BACKWARD_CHANGE = (
    "step_in_backward (default false): the optimiser steps each parameter inside backward and frees its gradient at "
    "once, the same updates with one gradient held at a time (full fine-tuning of a ViT-B/16 with checkpointing "
    "and bf16: 1,004 -> 738 MiB at the peak); on CUDA with amp the network then runs under bf16 autocast instead "
    "of the trainer's fp16 AMP; refused under torchrun with several processes"
)

#: the release that checks, at start, what a run would otherwise find out late or never.
_START_CHECKS_CHANGE = (
    "a val_interval longer than train#trainer#max_epochs is refused at start (the run ended without "
    "models/model.pt, and without a word); the data check and the inference input check take each image against "
    "in_channels by the transforms' channel rule (grey and RGB images mix)"
)


#: the release that says when a model learned nothing useful, and checks the optimiser settings at start.
_SIGNALS_CHANGE = (
    "validation and evaluation warn, once while it lasts, when the model does no better than the trivial answer "
    "(accuracy not above the most frequent class's share and balanced accuracy at chance, on splits of 30 images or "
    "more; multi-label: macro AUC at chance), beside the collapse warning, now on rank 0 only; a learning rate that "
    "is not a finite positive number (or would overflow) and a negative weight decay are refused at start, naming "
    "the setting; inference refuses images of another dimensionality than spatial_dims before anything runs"
)


#: the release that reports where inference wrote, tests the model against chance and logs runs fully to MLflow.
_REPORTS_CHANGE = (
    "inference ends with a line naming its predictions file and rows; the warning about a model no better than the "
    "trivial answer tests it against chance (a permutation test of the balanced accuracy, Fisher's exact test for "
    "two classes; multi-label: the macro AUC against 0.5 plus 1.645 of its null standard errors), so that a model "
    "guessing with the class frequencies on an unbalanced split is named, and one whose probabilities rank the "
    "images while its decisions are at chance is told to balance the classes; a missing --infer_images folder is "
    "named as missing; MLflow runs log the settings that change "
    "the result (class names, multi_label, datalist options, batch size, learning rate, weight decay, seed, "
    "world_size and the effective batch size, ...) as compact values cut to MLflow's limit (the full ones in "
    "long_params.json); evaluation and inference runs log their own settings and no training schedule, and name "
    "the training run of their checkpoint (models/mlflow_run.json); a tracking URI with a login is probed and "
    "recorded without it"
)


#: the release of the intensity window, the runs' last lines and the fixes for CUDA and torchrun.
_WINDOW_CHANGE = (
    "--intensity_range \"[low, high]\" scales every image by one window, clipped (CT slices in Hounsfield units; "
    "default: each image's own min-max), kept in the training record for evaluation, inference and the packaged "
    "copy, and logged to MLflow; training and evaluation end with a line giving the best or key metric and where "
    "the model or metrics went; probabilities come from float32 logits (under CUDA AMP the fp16 logits gave "
    "probabilities of exactly 1.0 to confident images, tying them in the AUC, the calibration bins and "
    "predictions.csv); deltas and checkpoints hold their tensors on the CPU, so that one trained on a GPU loads on "
    "a machine without one (torch.load and MONAI's ckpt_export read it without map_location); under torchrun the "
    "other ranks wait for rank 0 on a gloo group of their own for up to 12 hours (FPT's preload: NCCL's barrier "
    "gave up after 10 minutes), and FPT's network is wrapped by DDP after its LPM weights are released (DDP kept "
    "them on every GPU)"
)


def _released(spec: BundleSpec, change: str) -> BundleSpec:
    """``spec`` with ``change`` as its next patch release."""
    major, minor, patch = spec.version.split(".")
    return dataclasses.replace(spec, changelog=((f"{major}.{minor}.{int(patch) + 1}", change), *spec.changelog))


#: bundle name -> spec, in the order of the docs.
BUNDLE_SPECS: dict[str, BundleSpec] = {
    spec.name: _released(_released(_released(
        _released(spec if spec.fpt else _released(spec, _IN_BACKWARD_CHANGE), _START_CHECKS_CHANGE), _SIGNALS_CHANGE
    ), _REPORTS_CHANGE), _WINDOW_CHANGE)
    for spec in _SPECS
}

_UNETR = Reference(
    "Hatamizadeh et al., UNETR: Transformers for 3D Medical Image Segmentation, WACV 2022",
    "https://arxiv.org/abs/2103.10504",
)
#: the segmentation wording where a classification summary speaks of the CLS token or the head.
_SEGMENTATION_SUMMARIES = {
    "full": "every encoder weight and the UNETR decoder train (the upper reference every PEFT paper reports)",
    "linear": "the encoder is frozen; only the UNETR decoder trains (the segmentation counterpart of linear probing)",
    "vpt": "learnable prompt tokens lead the patch sequence (shallow: once; deep: before every block) and are "
    "dropped before the decoder reshapes the tokens to the patch grid",
    "bitfit": "only the bias terms of the encoder (and the whole decoder) train",
}


_SEGMENTATION_RELEASE = (
    "initial release: generated by monai_prompt.bundle_gen; PromptUNETR, DiceCE loss, sliding-window inference, "
    "Dice and HD95, delta checkpoints, MLflow, DDP"
)


def _segmentation_spec(spec: BundleSpec, spatial_dims: int) -> BundleSpec:
    """``spec``'s method as a UNETR segmentation bundle: the model-zoo input size (224 x 224 for 2D ViT-B/16
    checkpoints, 96^3 as UNETR) and one recipe for all methods (none of the method papers gives a UNETR one)."""
    full = spec.method == "full"
    return dataclasses.replace(
        spec,
        task="segmentation",
        spatial_dims=spatial_dims,
        summary=_SEGMENTATION_SUMMARIES.get(spec.method, spec.summary),
        img_size=224 if spatial_dims == 2 else 96,
        optimizer="AdamW",
        optimizer_args={},
        learning_rate=1e-4 if full else 1e-3,
        weight_decay=1e-5,
        epochs=100 if spatial_dims == 2 else 200,
        recipe_source="UNETR's AdamW with weight decay 1e-5 (Hatamizadeh et al.) and cosine annealing; learning "
        "rate 1e-4 for full fine-tuning as UNETR, 1e-3 for the frozen-encoder methods, whose method parameters and "
        "decoder start from scratch; not tuned",
        references=(_UNETR, *spec.references),
        changelog=(
            ("0.1.12", ("2D slices of a coronal or sagittal plane (e.g. X x Z x 1 of an LSA volume) train, evaluate "
                        "and get masks on their own grid (MONAI's orientation stopped with 'Unable to find out axis'); "
                        "pixdim on them is refused naming the slice; the random flip mirrors left and right (a "
                        "sagittal slice was flipped front to back); --intensity_range \"[low, high]\" scales every "
                        "image by one window, clipped (CT in Hounsfield units; default: each image's own min-max), "
                        "kept in the training record and logged to MLflow, and the data check notes a CT scaled per "
                        "image; the data check passes a label map stored in another axis order than its image, tells "
                        "a 0/255 mask to key its class by 255, an instance mask to be binarised and a label with "
                        "padding rows to be cropped, and names the splits a missing evaluation split could be; "
                        "training and evaluation end with a line giving the best or key metric and where the model "
                        "or metrics went; deltas and checkpoints hold their tensors on the CPU (one trained on a GPU "
                        "loads on a machine without one); under torchrun the other ranks wait for rank 0 on a gloo "
                        "group of their own")),
            ("0.1.11", ("inference ends with a line naming the mask folder and how many masks it wrote (a missing "
                        "--infer_images folder is named as missing); validation "
                        "and evaluation warn about classes predicted only where the ground truth does not have them "
                        "(Dice 0 although predicted: swapped classes, label maps off their images), and a collapse "
                        "to background no longer makes the other warnings say they cleared; MLflow runs log the "
                        "settings that change the result (class names, label values, pixdim, feature size, sliding "
                        "window overlap, crops per image, batch size, learning rate, seed, world_size and the "
                        "effective batch size, ...) as compact values cut to MLflow's limit (the full ones in "
                        "long_params.json); evaluation and inference runs log their own settings and no training "
                        "schedule, and name the training run of their checkpoint (models/mlflow_run.json); a "
                        "tracking URI with a login is probed and recorded without it; MLflow's lines on creating "
                        "its SQLite store, MONAI's get_mask_edges deprecation warning and its axcodes warning on "
                        "turning each 2D mask back no longer show")),
            ("0.1.10", ("with pixdim set, evaluation scores each label on its own grid (the softmax resampled onto "
                        "it, as inference writes its masks; validation still scores the pixdim grid); the per-image "
                        "CSVs head their columns with the class names (ClassMetricsSaver) instead of class0, ...; "
                        "HD95 is in mm (the spacing of each label's grid; pixels for PNG) where it was in voxels; "
                        "Dice is computed once per validation (one ClassMeanDice gives the key metric and the "
                        "classes); with pixdim the softmax goes back to the input's or label's grid eight classes at "
                        "a time (135 classes at 181 x 217 x 181: inference 12.4 -> 2.7 GB, evaluation 5.3 -> 2.6 GB, "
                        "the same masks and scores); masks of SCAN.NII.GZ and of DICOM series folders named "
                        "1.2.840.5 are SCAN_seg.nii.gz and 1.2.840.5_seg.nii.gz; NIfTI masks keep their input's "
                        "sform/qform codes; 3D inference takes a folder of DICOM files as one image, its series "
                        "(it split it into 2D slices, each refused)")),
            ("0.1.9", ("validation and evaluation score the logits' argmax as class-index maps, without one-hot "
                       "tensors or a softmax (the same values but where a softmax rounded logits one float apart to "
                       "a tie): 117 classes at 181 x 217 x 181 need about 4.2 GB instead of 13.5; inference without "
                       "pixdim takes the argmax before Invertd, without a softmax; "
                       "validation and evaluation warn, once while it lasts, when the model collapses to background, "
                       "when images with foreground get background only, and name the classes never predicted; a "
                       "learning rate that is not a finite positive number and a negative weight decay are refused "
                       "at start; inference refuses images of another dimensionality than spatial_dims before "
                       "anything runs; label maps stored as floats a rounding off their values (1.0000001) read as "
                       "their classes (rounded before MapLabelValued)")),
            ("0.1.8", ("label maps may hold any label values the datalist's 'labels' keys name (BraTS' 0/1/2/4, an "
                       "atlas' region codes): training maps them to class indices, the masks inference writes hold "
                       "them again (uint16 above 255, NIfTI for PNG inputs then), and the training record keeps "
                       "them as label_values (a record of an earlier version reads as 0..K-1); with --pixdim the "
                       "img_size chosen from the data measures the images after resampling")),
            ("0.1.7", ("the training record keeps pixdim: evaluation, inference, the packaged copy (MONAI Label) and "
                       "continue_model resample to the spacing the delta was trained at, and a resume refuses "
                       "another one (a record of an earlier version, which has none, reads as null: give --pixdim "
                       "as at training); a val_interval longer than the run and a num_classes other than the "
                       "classes' are refused at start, the data and inference checks take images against "
                       "in_channels; continue_model reads, checks and trains on a --datalist_file; the README "
                       "checks and exports the packaged copy, whose metadata.json states the trained input size and "
                       "classes, and says where inference's default images come from")),
            ("0.1.6", _IN_BACKWARD_CHANGE),
            ("0.1.5", ("network_def is monai_prompt.nets.segmentation_network: the network follows the backbone's "
                       "family; in 2D --backbone lite_medsam (TinyViT, SwinUNETR-style decoder) and --backbone auto "
                       "with a SAM/MedSAM checkpoint (UNETR's decoder on SAM's ViT) segment; 3D refuses them")),
            ("0.1.4", ("attention runs through PyTorch SDPA by default (sdpa; --sdpa false for the literal path); "
                       "the training log gives the run's time left, on rank 0 only; inference masks keep their "
                       "input's folder below the inputs' common parent (two inputs named alike get two masks); a "
                       "--method other than the recorded one is refused before the network is built; --overwrite true "
                       "sets the previous run aside until the first checkpoint; unreadable checkpoints and full disks "
                       "name the file; a resume applies a new learning rate and refuses another network")),
            ("0.1.3", ("every boolean setting (amp, resume, overwrite, continue_model, shuffle; VPT's "
                       "method_config#deep) accepts true/false/yes/no/1/0 in any case on the command line and "
                       "refuses any other value naming the setting (flags); shuffle is a setting of its own")),
            ("0.1.2", ("evaluation and inference build the network from the training record with no defaults (a "
                       "missing models/training_config.json stops them with what to run or give; continue_model "
                       "too); multi_gpu_train.json fills distributed_setup instead of restating initialize")),
            ("0.1.1", ("served and trained by MONAI Label's stock monaibundle app: inference reads images only "
                       "and writes uint8 masks without channel axis; training with continue_model continues "
                       "models/model.pt on the datastore's pairs under the recorded run id")),
            ("0.1.0", _SEGMENTATION_RELEASE),
        ),
    )


#: segmentation bundle name -> spec: the nine PEFT methods in 2D, then in 3D (FPT/FPT+ give no dense features).
SEGMENTATION_SPECS: dict[str, BundleSpec] = {
    seg.name: seg
    for dims in (2, 3)
    for seg in (_segmentation_spec(spec, dims) for spec in BUNDLE_SPECS.values() if not spec.fpt)
}
#: every bundle the generator renders.
ALL_BUNDLE_SPECS: dict[str, BundleSpec] = {**BUNDLE_SPECS, **SEGMENTATION_SPECS}
