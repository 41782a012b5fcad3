"""``monai-prompt demo --task segmentation``: a prompt-tuned UNETR segments brain tissue on MNI152 slices.

Every output goes under ``out_dir`` (``runs/demo_segmentation``, git-ignored):

1. **data**: the 2D and 3D sets of :mod:`monai_prompt.data.demo_segmentation` (96 x 96 axial slices at 2 mm,
   background/CSF/grey/white matter, split by axial slab), built once and reused while the settings are unchanged.
2. **pre-training**: ``bundles/vit_pretraining`` (MONAI's ``MaskedAutoEncoderViT``, through
   :func:`monai_prompt.demo.pretrain` and its cache) on the training slab's slices and their re-jittered copies
   (labels unused), with patch 16 on the whole 96 x 96 slice. The classification demo's encoder does not fit
   (patch 4 on 32 x 32 patches; UNETR's decoder needs patch 16), so this demo pre-trains its own; a second run
   reuses it.
3. **tuning**: the ``<method>_segmentation`` bundle (default DVPT) on 64 x 64 ROI crops, the encoder loaded from
   the MAE checkpoint (its 6 x 6 position embeddings resized to the ROI's 4 x 4 grid by the importer), frozen
   but for the method; the decoder trains. The best validation delta is kept.
4. **evaluation and inference**: ``train.json`` + ``evaluate.json`` on the test slab (Dice per class, HD95 in
   pixels), then ``inference.json`` on the test images (masks on their grid) and a figure of a few test slices
   (image, ground truth, prediction) in ``segmentation_demo.png``.

With ``compare_scratch``, a UNETR trained from scratch (``full_segmentation``, random initialisation, every
weight trained) is evaluated the same way: the baseline that shows what the pre-trained, prompt-tuned encoder
is worth here. All bundles run through MONAI's bundle API, as ``python -m monai.bundle run`` runs them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monai_prompt.demo import (
    BUNDLES,
    DEMO_DVPT,
    MONAI_LAYER_NORM_EPS,
    DemoConfig,
    DemoSteps,
    EpochProgress,
    attach_progress,
    pretrain,
    read_metrics,
    train_and_evaluate,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "TINY_SEGMENTATION_DEMO",
    "SegmentationDemoConfig",
    "prepare_segmentation_data",
    "pretrain_encoder",
    "run_segmentation_demo",
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
        method: the PEFT method: the ``<method>_segmentation`` bundle that tunes the encoder.
        method_config: its config (``None``: the bundle's; DVPT: :data:`monai_prompt.demo.DEMO_DVPT`).
        encoder: the ViT shape (patch 16).
        slice_size: side of the demo slices (the MAE input).
        roi: the UNETR input (the sliding-window ROI), a multiple of 16.
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

    method: str = "dvpt"
    method_config: Mapping[str, Any] | None = None
    encoder: Mapping[str, int] = field(default_factory=lambda: dict(DEMO_ENCODER))
    slice_size: int = 96
    roi: int = 64
    feature_size: int = 16
    unlabeled_copies: int = 4
    crops_3d: tuple[int, int, int] = (24, 6, 6)
    pretrain_epochs: int = 30
    pretrain_batch_size: int = 32
    tune_epochs: int = 30
    batch_size: int = 8
    num_samples: int = 2
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
    roi=32,
    feature_size=8,
    unlabeled_copies=1,
    crops_3d=(2, 1, 1),
    pretrain_epochs=1,
    pretrain_batch_size=8,
    tune_epochs=1,
    batch_size=4,
    num_samples=1,
    figure_slices=2,
)


def prepare_segmentation_data(folder: str | Path, config: SegmentationDemoConfig) -> tuple[Path, bool]:
    """Build the demo segmentation sets in ``folder``, or reuse them when built with these settings and complete.

    Returns:
        the 2D (NIfTI) datalist and whether an existing build was reused.
    """
    from monai_prompt.data.demo_segmentation import build_segmentation_demo

    folder = Path(folder)
    settings = {"slice_size": config.slice_size, "unlabeled_copies": config.unlabeled_copies,
                "crops_3d": list(config.crops_3d)}
    stamp, datalist = folder / "build.json", folder / "datalist_2d.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == settings and datalist.is_file():
        content = json.loads(datalist.read_text())
        files = [item[key] for items in content.values() if isinstance(items, list) for item in items
                 for key in ("image", "label") if key in item]
        if all((folder / name).is_file() for name in files):
            return datalist, True
    shutil.rmtree(folder, ignore_errors=True)
    paths = build_segmentation_demo(folder, slice_size=config.slice_size, unlabeled_copies=config.unlabeled_copies,
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
    bundles: str | Path = BUNDLES,
    verbose: bool = False,
    print_fn: Callable[[str], None] = _print,
) -> tuple[Path, str]:
    """MAE pre-training of the patch-16 encoder on whole training slices (``slice_size``), through
    :func:`monai_prompt.demo.pretrain`: reused when its checkpoint in ``out_dir`` is for the same inputs.

    Returns:
        the MAE checkpoint and ``"reused"``, ``"resumed"`` or ``"trained"``.
    """
    mae = DemoConfig(pretrain_epochs=config.pretrain_epochs, pretrain_batch_size=config.pretrain_batch_size,
                     backbone_overrides=dict(config.encoder))
    overrides = {**_encoder_overrides(config), "img_size": config.slice_size,
                 "datalist": _pretraining_images(datalist), "pretrain_splits": ["unlabeled"]}
    return pretrain(out_dir, datalist, mae, bundles, verbose, print_fn, overrides=overrides)


def tune_segmentation(
    name: str,
    out_dir: Path,
    data_dir: Path,
    pretrained: Path | None,
    config: SegmentationDemoConfig,
    bundles: Path = BUNDLES,
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
        bundles: the bundles folder.
        verbose: show the bundle's own logs.
        print_fn: where progress lines go.
        extra_overrides: more config overrides (e.g. ``datalist_file``, ``seed``, ``val_interval``).
        infer: also run ``inference.json``.
        zeroed_encoder: also evaluate the best delta with every ViT output zeroed (:func:`zero_encoder_outputs`;
            into ``out_dir/eval_zeroed_encoder``): how much of the result the encoder carries.

    Returns:
        the test metrics (``zeroed_encoder_metrics`` too if asked), the parameter report and the seconds per epoch
        (validation included).
    """
    from monai_prompt.engine.runner import run_bundle

    method = name.removesuffix("_segmentation")
    overrides: dict[str, Any] = {
        **_encoder_overrides(config),
        "dataset_dir": str(data_dir),
        "pretrained": None if pretrained is None else str(pretrained),
        "layer_norm_eps": MONAI_LAYER_NORM_EPS,
        "img_size": config.roi,
        "feature_size": config.feature_size,
        "learning_rate": config.learning_rate,
        "batch_size": config.batch_size,
        "num_samples": config.num_samples,
        "num_workers": 0,
        "cache_rate": 1.0,
        "_meta_#network_data_format#inputs#image#spatial_shape": [config.roi] * 2,
        "_meta_#network_data_format#outputs#pred#spatial_shape": [config.roi] * 2,
        **(extra_overrides or {}),
    }
    method_config = config.resolved_method_config() if method == config.method else None
    if method_config is not None:
        overrides["method_config"] = method_config
    progress = EpochProgress(f"{method}-UNETR", print_fn=print_fn)
    train, metrics = train_and_evaluate(bundles / name, out_dir, overrides, config.tune_epochs, verbose,
                                        attach_progress(progress, "validate#evaluator"))
    trainer = train.parser.get_parsed_content("train#trainer")
    seconds_per_epoch = trainer.state.times["COMPLETED"] / config.tune_epochs  # with validation
    if infer:
        run_bundle(bundles / name, ["inference.json"], "infer", quiet=not verbose, bundle_root=str(out_dir),
                   **{key: value for key, value in overrides.items() if not key.startswith("_meta_")})
    ablation = {}
    if zeroed_encoder:
        ablated = out_dir / "eval_zeroed_encoder"
        run_bundle(bundles / name, ["train.json", "evaluate.json"], "infer", quiet=not verbose,
                   attach=lambda workflow: zero_encoder_outputs(workflow.parser.get_parsed_content("network")),
                   **{**overrides, "bundle_root": str(out_dir), "output_dir": str(ablated)})
        ablation["zeroed_encoder_metrics"] = read_metrics(ablated / "metrics.csv")
    report = train.parser.get_parsed_content("network").parameter_report()
    keys = ("trainable", "backbone", "percent_of_backbone", "encoder_trainable", "decoder")
    return {"bundle": name, "metrics": metrics, **ablation, "seconds_per_epoch": round(seconds_per_epoch, 2),
            **{key: report[key] for key in keys}}


def zero_encoder_outputs(network: torch.nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Make ``network.vit`` (a ``PromptUNETR``'s encoder) output zeros: its final tokens and every hidden state
    UNETR taps, so only the decoder's convolutional path on the raw image is left (an ablation: how much of the
    segmentation the encoder carries).

    Returns:
        the forward hook's handle (``.remove()`` undoes it).
    """
    import torch

    def zeros(module: torch.nn.Module, args: tuple, output: tuple) -> tuple:
        tokens, hidden_states = output
        return torch.zeros_like(tokens), [torch.zeros_like(hidden) for hidden in hidden_states]

    return network.vit.register_forward_hook(zeros)


def _figure(data_dir: Path, runs: dict[str, dict[str, Any]], out_dir: Path, slices: int) -> Path:
    """A PNG of ``slices`` test slices: the image, the ground truth and each run's prediction as overlays."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from monai_prompt.data.demo_segmentation import SEGMENTATION_CLASSES

    test = json.loads((data_dir / "datalist_2d.json").read_text())["test"]
    chosen = [test[int(i)] for i in np.linspace(0, len(test) - 1, slices)]
    colours = ["#00000000", "#2b83ba", "#fdae61", "#d7191c"]
    cmap = ListedColormap(colours)
    method = next(run["bundle"] for run in runs.values()).removesuffix("_segmentation")
    columns = ["image", "ground truth", *(_run_label(label, method) for label in runs)]
    fig, axes = plt.subplots(slices, len(columns), figsize=(2.6 * len(columns), 2.6 * slices), squeeze=False)
    for row, item in enumerate(chosen):
        image_path = data_dir / item["image"]
        image = np.asarray(nib.load(image_path).dataobj, dtype=np.float32)
        masks = {"ground truth": np.asarray(nib.load(data_dir / item["label"]).dataobj)}
        for label, run in runs.items():
            mask_file = Path(run["out_dir"]) / "eval" / "masks" / image_path.name.replace(".nii.gz", "_seg.nii.gz")
            masks[_run_label(label, method)] = np.asarray(nib.load(mask_file).dataobj)
        for column, title in enumerate(columns):
            ax = axes[row][column]
            ax.imshow(image.T, cmap="gray", origin="lower")  # x right, y (anterior) up: MNI orientation
            if title != "image":
                ax.imshow(masks[title].T, cmap=cmap, vmin=0, vmax=len(colours) - 1, alpha=0.5, origin="lower",
                          interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9)
        axes[row][0].set_ylabel(image_path.name.removesuffix(".nii.gz"), fontsize=8)
    legend = [Patch(color=colours[i], label=name) for i, name in enumerate(SEGMENTATION_CLASSES) if i]
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=8, frameon=False)
    fig.suptitle("MNI152 test slab: tissue segmentation", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    path = out_dir / "segmentation_demo.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_segmentation_demo(
    out_dir: str | Path = "runs/demo_segmentation",
    config: SegmentationDemoConfig = SegmentationDemoConfig(),
    compare_scratch: bool = False,
    bundles: str | Path = BUNDLES,
    verbose: bool = False,
    print_fn: Callable[[str], None] = _print,
) -> dict[str, Any]:
    """Data, MAE pre-training (cached), tuning of ``<method>_segmentation``, evaluation, inference and the figure;
    prints progress and a summary.

    Args:
        out_dir: output folder (``data/``, ``vit_pretraining/``, ``<method>_pretrained/``, ``unetr_scratch/``,
            ``segmentation_demo.png``, ``results.json``).
        config: sizes (:class:`SegmentationDemoConfig`; :data:`TINY_SEGMENTATION_DEMO` for a smoke run).
        compare_scratch: also train a UNETR from scratch (``full_segmentation``, random initialisation).
        bundles: the bundles folder (default: the repository's).
        verbose: show the bundles' own logs.
        print_fn: where lines go.

    Returns:
        the results written to ``results.json``: test metrics and parameter counts per run, timings, the figure.
    """
    warnings.filterwarnings("ignore", message="torch.meshgrid")
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
    out_dir, bundles = Path(out_dir), Path(bundles)
    steps = DemoSteps(5 if compare_scratch else 4, print_fn)
    with steps.step("data_s", f"demo segmentation data (MNI152 T1 slices, tissue labels) in {out_dir / 'data'}"):
        datalist, reused = prepare_segmentation_data(out_dir / "data", config)
    steps.report("data_s", "reused" if reused else "built", datalist)
    with steps.step("pretraining_s", f"MAE pre-training of the patch-16 ViT encoder on the training slices "
                                     f"(bundles/vit_pretraining, {config.pretrain_epochs} epochs)"):
        checkpoint, status = pretrain_encoder(out_dir / "vit_pretraining", datalist, config, bundles, verbose,
                                              print_fn)
    steps.report("pretraining_s", status, checkpoint)

    name = f"{config.method}_segmentation"
    runs_to_do = [("pretrained", name, checkpoint)] + ([("scratch", "full_segmentation", None)]
                                                       if compare_scratch else [])
    runs: dict[str, dict[str, Any]] = {}
    for label, bundle, pretrained in runs_to_do:
        what = (f"{config.method} on the MAE-pre-trained encoder" if pretrained
                else "UNETR from scratch (every weight trained, random init)")
        run_dir = out_dir / (f"{config.method}_pretrained" if pretrained else "unetr_scratch")
        with steps.step(f"{label}_s", f"{what} (bundles/{bundle}, {config.tune_epochs} epochs), then evaluation on "
                                      "the test slab and inference"):
            runs[label] = {**tune_segmentation(bundle, run_dir, datalist.parent, pretrained, config, bundles,
                                               verbose, print_fn), "out_dir": str(run_dir)}

    with steps.step("figure_s", f"figure of {config.figure_slices} test slices"):
        figure = _figure(datalist.parent, runs, out_dir, config.figure_slices)
    results = {"config": dataclasses.asdict(config), "runs": runs, "figure": str(figure),
               "test_images": len(json.loads(datalist.read_text())["test"]),
               "timings": steps.rounded()}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print_fn(_summary(results, out_dir))
    return results


def _run_label(label: str, method: str) -> str:
    return f"{method}, MAE encoder" if label == "pretrained" else "UNETR from scratch"


def _summary(results: dict[str, Any], out_dir: Path) -> str:
    """The closing table: test Dice per class and HD95 per run, trainable parameters, timings, the figure."""
    from monai_prompt.data.demo_segmentation import SEGMENTATION_CLASSES

    classes, method = SEGMENTATION_CLASSES[1:], results["config"]["method"]
    columns = ["mean Dice", *(f"Dice {c}" for c in classes), "mean HD95", *(f"HD95 {c}" for c in classes)]
    keys = ["mean_dice", *(f"dice_{c}" for c in classes), "mean_hd95", *(f"hd95_{c}" for c in classes)]
    width = max(len(column) for column in columns) + 2
    lines = ["", f"Test slab ({results['test_images']} slices, best-validation delta; HD95 in 2 mm pixels):",
             f"  {'':<22}" + "".join(f"{column:>{width}}" for column in columns)]
    for label, run in results["runs"].items():
        values = "".join(f"{run['metrics'][key]:>{width}.3f}" for key in keys)
        lines.append(f"  {_run_label(label, method):<22}{values}")
    for label, run in results["runs"].items():
        share = 100 * run["encoder_trainable"] / run["backbone"]
        lines.append(f"  {_run_label(label, method)}: {run['trainable']:,} trainable parameters: "
                     f"{run['encoder_trainable']:,} of the encoder's {run['backbone']:,} ({share:.2f}%) and the "
                     f"{run['decoder']:,}-parameter decoder; {run['seconds_per_epoch']:.1f} s/epoch with validation")
    lines.append("  time: " + ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in results["timings"].items()))
    lines.append(f"  figure: {results['figure']}; outputs and results.json in {out_dir}")
    return "\n".join(lines)
