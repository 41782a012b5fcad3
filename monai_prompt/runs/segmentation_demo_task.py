"""The demo segmentation task, which ``monai-prompt demo --task segmentation`` runs and the accuracy benchmark
measures on: its sizes (:class:`SegmentationDemoConfig`, :data:`TINY_SEGMENTATION_DEMO`), its data built once and
reused (:func:`prepare_segmentation_data`: the MNI152 slices and crops of :mod:`monai_prompt.data.demo_segmentation`),
its patch-16 encoder MAE-pre-trained through :func:`monai_prompt.runs.demo_task.pretrain`
(:func:`pretrain_encoder`), a segmentation bundle trained and evaluated with its settings
(:func:`tune_segmentation`) and the zeroed-encoder ablation (:func:`zero_encoder_outputs`).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monai_prompt.runs.bundles import find_bundle
from monai_prompt.runs.demo_task import DEMO_DVPT, MONAI_LAYER_NORM_EPS, DemoConfig, pretrain
from monai_prompt.runs.progress import EpochProgress, attach_progress
from monai_prompt.runs.runner import read_metrics, run_bundle, train_and_evaluate

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEMO_ENCODER",
    "TINY_SEGMENTATION_DEMO",
    "SegmentationDemoConfig",
    "demo_overrides",
    "prepare_segmentation_data",
    "pretrain_encoder",
    "tune_segmentation",
    "zero_encoder_outputs",
]

_print = functools.partial(print, flush=True)
#: the encoder of the default run: width 192, 4 blocks (UNETR taps blocks 1, 2, 3), patch 16.
DEMO_ENCODER = {"hidden_size": 192, "num_layers": 4, "num_heads": 4, "mlp_dim": 768, "patch_size": 16}


@dataclass(frozen=True)
class SegmentationDemoConfig:
    """Sizes of the segmentation demo (the defaults are the measured run; :data:`TINY_SEGMENTATION_DEMO` is a
    smoke run).

    Attributes:
        labels: the demo task (:data:`~monai_prompt.data.demo_segmentation.SEGMENTATION_TASKS`): ``"lobes"``
            (CAT12 template, LPBA40 lobes: needs context) or ``"tissues"`` (MNI152 csf/grey/white matter: local).
        method: the PEFT method: the ``<method>_segmentation`` bundle that tunes the encoder.
        method_config: its config (``None``: the bundle's; DVPT: :data:`monai_prompt.runs.demo_task.DEMO_DVPT`).
        encoder: the ViT shape (patch 16).
        slice_size: side of the demo slices (the MAE input).
        roi: the UNETR input (the sliding-window ROI), a multiple of 16; ``None``: the bundle's choice, whole
            training images (:func:`monai_prompt.data.whole_image_roi`: the 2D slices whole).
        feature_size: UNETR decoder width.
        unlabeled_copies: re-jittered copies of each training slice for pre-training.
        crops_3d: training, validation and test 3D crops of the data build.
        pretrain_epochs: MAE epochs.
        pretrain_batch_size: MAE batch size.
        tune_epochs: tuning epochs.
        batch_size: images per tuning batch.
        num_samples: ROI crops per image.
        learning_rate: tuning learning rate (AdamW, cosine; also the scratch baseline's).
        figure_slices: test slices in the figure.
    """

    labels: str = "lobes"
    method: str = "dvpt"
    method_config: Mapping[str, Any] | None = None
    encoder: Mapping[str, int] = field(default_factory=lambda: dict(DEMO_ENCODER))
    slice_size: int = 96
    roi: int | None = None
    feature_size: int = 16
    unlabeled_copies: int = 4
    crops_3d: tuple[int, int, int] = (24, 6, 6)
    pretrain_epochs: int = 30
    pretrain_batch_size: int = 32
    tune_epochs: int = 30
    batch_size: int = 8
    num_samples: int = 1
    learning_rate: float = 1e-3
    figure_slices: int = 4

    def resolved_method_config(self) -> dict[str, Any] | None:
        """The method config the demo passes (``None``: the bundle's)."""
        if self.method_config is not None:
            return dict(self.method_config)
        return dict(DEMO_DVPT) if self.method == "dvpt" else None


#: a run of seconds: 32 x 32 slices and ROI, a 4-block encoder of width 32, one epoch each.
TINY_SEGMENTATION_DEMO = SegmentationDemoConfig(
    method_config=None,
    encoder={"hidden_size": 32, "num_layers": 4, "num_heads": 2, "mlp_dim": 64, "patch_size": 16},
    slice_size=32,
    feature_size=8,
    unlabeled_copies=1,
    crops_3d=(2, 1, 1),
    pretrain_epochs=1,
    pretrain_batch_size=8,
    tune_epochs=1,
    batch_size=4,
    figure_slices=2,
)


def prepare_segmentation_data(folder: str | Path, config: SegmentationDemoConfig) -> tuple[Path, bool]:
    """Build the demo segmentation sets in ``folder``, or reuse them when built with these settings and complete.

    Returns:
        the 2D (NIfTI) datalist and whether an existing build was reused.
    """
    from monai_prompt.data.demo_segmentation import build_segmentation_demo

    folder = Path(folder)
    settings = {"labels": config.labels, "slice_size": config.slice_size,
                "unlabeled_copies": config.unlabeled_copies, "crops_3d": list(config.crops_3d)}
    stamp, datalist = folder / "build.json", folder / "datalist_2d.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == settings and datalist.is_file():
        content = json.loads(datalist.read_text())
        files = [item[key] for items in content.values() if isinstance(items, list) for item in items
                 for key in ("image", "label") if key in item]
        if all((folder / name).is_file() for name in files):
            return datalist, True
    shutil.rmtree(folder, ignore_errors=True)
    paths = build_segmentation_demo(folder, task=config.labels, slice_size=config.slice_size,
                                    unlabeled_copies=config.unlabeled_copies,
                                    crops_3d=config.crops_3d)
    stamp.write_text(json.dumps(settings))
    return paths["2d"], False


def _pretraining_images(datalist: Path) -> dict[str, list[dict[str, str]]]:
    """The training slab's images (training slices and their unlabelled copies) as the pre-training bundle's
    ``datalist`` (its ``unlabeled`` split; labels are never read)."""
    from monai_prompt.data.segmentation import read_segmentation_datalist

    splits = read_segmentation_datalist(datalist)
    return {"unlabeled": [{"image": item["image"]} for split in ("training", "unlabeled") for item in splits[split]]}


def _encoder_overrides(config: SegmentationDemoConfig) -> dict[str, Any]:
    return {"backbone": "vit_tiny", "backbone_overrides": dict(config.encoder), "in_channels": 1, "spatial_dims": 2}


def pretrain_encoder(
    out_dir: str | Path,
    datalist: Path,
    config: SegmentationDemoConfig,
    bundles: str | os.PathLike | None = None,
    verbose: bool = False,
    print_fn: Callable[[str], None] = _print,
) -> tuple[Path, str]:
    """MAE pre-training of the patch-16 encoder on whole training slices (``slice_size``), through
    :func:`monai_prompt.runs.demo_task.pretrain`: reused when its checkpoint in ``out_dir`` is for the same inputs.

    Returns:
        the MAE checkpoint and ``"reused"``, ``"resumed"`` or ``"trained"``.
    """
    mae = DemoConfig(pretrain_epochs=config.pretrain_epochs, pretrain_batch_size=config.pretrain_batch_size,
                     backbone_overrides=dict(config.encoder))
    overrides = {**_encoder_overrides(config), "img_size": config.slice_size,
                 "datalist": _pretraining_images(datalist), "pretrain_splits": ["unlabeled"]}
    return pretrain(out_dir, datalist, mae, bundles, verbose, print_fn, overrides=overrides)


def demo_overrides(
    config: SegmentationDemoConfig, data_dir: Path, pretrained: Path | None,
    extra_overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The segmentation bundles' overrides of a demo run: the encoder, the data, the ROI and the training settings.

    Args:
        config: the demo's sizes.
        data_dir: the demo data (:func:`prepare_segmentation_data`'s folder).
        pretrained: the MAE checkpoint of the encoder; ``None``: random initialisation.
        extra_overrides: more config overrides (e.g. ``datalist_file``, ``seed``, ``val_interval``).
    """
    return {
        **_encoder_overrides(config),
        "dataset_dir": str(data_dir),
        "pretrained": None if pretrained is None else str(pretrained),
        "layer_norm_eps": MONAI_LAYER_NORM_EPS,
        "feature_size": config.feature_size,
        "learning_rate": config.learning_rate,
        "batch_size": config.batch_size,
        "num_samples": config.num_samples,
        "num_workers": 0,
        "cache_rate": 1.0,
        **({} if config.roi is None else {
            "img_size": config.roi,
            "_meta_#network_data_format#inputs#image#spatial_shape": [config.roi] * 2,
            "_meta_#network_data_format#outputs#pred#spatial_shape": [config.roi] * 2,
        }),
        **(extra_overrides or {}),
    }


def tune_segmentation(
    name: str,
    out_dir: Path,
    data_dir: Path,
    pretrained: Path | None,
    config: SegmentationDemoConfig,
    bundles: str | os.PathLike | None = None,
    verbose: bool = False,
    print_fn: Callable[[str], None] = _print,
    extra_overrides: Mapping[str, Any] | None = None,
    infer: bool = True,
    zeroed_encoder: bool = False,
) -> dict[str, Any]:
    """Train ``name`` (a segmentation bundle) into ``out_dir`` with the demo's settings, evaluate its best delta on
    the test split and (``infer``) run ``inference.json`` on the test images.

    Args:
        name: the bundle, e.g. ``"dvpt_segmentation"``.
        out_dir: its ``bundle_root`` (emptied first).
        data_dir: the demo data (:func:`prepare_segmentation_data`'s folder).
        pretrained: the MAE checkpoint of the encoder; ``None``: random initialisation.
        config: the demo's sizes (``tune_epochs`` epochs).
        bundles: the bundles folder (default: the package's).
        verbose: show the bundle's own logs.
        print_fn: where progress lines go.
        extra_overrides: more config overrides (e.g. ``datalist_file``, ``seed``, ``val_interval``).
        infer: also run ``inference.json``.
        zeroed_encoder: also evaluate the best delta with every encoder output zeroed (:func:`zero_encoder_outputs`;
            into ``out_dir/eval_zeroed_encoder``): how much of the result the encoder carries.

    Returns:
        the test metrics (``zeroed_encoder_metrics`` too if asked), the parameter report and the seconds per epoch
        (validation included).
    """
    bundle = find_bundle(name, bundles)
    method = name.removesuffix("_segmentation")
    overrides = demo_overrides(config, data_dir, pretrained, extra_overrides)
    method_config = config.resolved_method_config() if method == config.method else None
    if method_config is not None:
        overrides["method_config"] = method_config
    progress = EpochProgress(f"{method}-UNETR", print_fn=print_fn)
    train, metrics = train_and_evaluate(bundle, out_dir, overrides, config.tune_epochs, verbose,
                                        attach_progress(progress, "validate#evaluator"))
    trainer = train.parser.get_parsed_content("train#trainer")
    seconds_per_epoch = trainer.state.times["COMPLETED"] / config.tune_epochs  # with validation
    if infer:
        run_bundle(bundle, ["inference.json"], "infer", quiet=not verbose, bundle_root=str(out_dir),
                   **{key: value for key, value in overrides.items() if not key.startswith("_meta_")})
    ablation = {}
    if zeroed_encoder:
        ablated = out_dir / "eval_zeroed_encoder"
        run_bundle(bundle, ["train.json", "evaluate.json"], "infer", quiet=not verbose,
                   attach=lambda workflow: zero_encoder_outputs(workflow.parser.get_parsed_content("network")),
                   **{**overrides, "bundle_root": str(out_dir), "output_dir": str(ablated)})
        ablation["zeroed_encoder_metrics"] = read_metrics(ablated / "metrics.csv")
    report = train.parser.get_parsed_content("network").parameter_report()
    keys = ("trainable", "backbone", "percent_of_backbone", "encoder_trainable", "decoder")
    return {"bundle": name, "metrics": metrics, **ablation, "seconds_per_epoch": round(seconds_per_epoch, 2),
            "img_size": train.parser.get_parsed_content("img_size"), **{key: report[key] for key in keys}}


def zero_encoder_outputs(network: torch.nn.Module) -> Callable[[], None]:
    """Make every encoder output a segmentation network's decoder reads zeros (its ``encoder_features``: a
    ``PromptUNETR``'s final tokens and hidden states; a SAM-family network's grids or stage maps and its neck's map),
    so only the decoder's convolutional path on the raw image is left (an ablation: how much of the segmentation the
    encoder carries).

    Returns:
        a function that undoes it.
    """
    import torch

    def zeros(output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return torch.zeros_like(output)
        return type(output)(zeros(item) for item in output)

    features = network.encoder_features
    network.encoder_features = lambda x_in: zeros(features(x_in))  # shadows the method on this instance only
    return functools.partial(delattr, network, "encoder_features")


