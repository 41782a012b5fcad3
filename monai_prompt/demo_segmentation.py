"""``monai-prompt demo --task segmentation``: a prompt-tuned UNETR segments brain tissue on MNI152 slices.

Every output goes under ``out_dir`` (``runs/demo_segmentation``, git-ignored):

1. **data**: the 2D and 3D sets of :mod:`monai_prompt.data.demo_segmentation` (96 x 96 axial slices at 2 mm,
   background/CSF/grey/white matter, split by axial slab), built once and reused while the settings are unchanged.
2. **pre-training**: ``bundles/vit_pretraining`` (MONAI's ``MaskedAutoEncoderViT``, through
   :func:`monai_prompt.runs.demo_task.pretrain` and its cache) on the training slab's slices and their re-jittered
   copies (labels unused), with patch 16 on the whole 96 x 96 slice. The classification demo's encoder does not fit
   (patch 4 on 32 x 32 patches; UNETR's decoder needs patch 16), so this demo pre-trains its own; a second run
   reuses it.
3. **tuning**: the ``<method>_segmentation`` bundle (default DVPT) on 64 x 64 ROI crops, the encoder loaded from
   the MAE checkpoint (its 6 x 6 position embeddings resized to the ROI's 4 x 4 grid by the importer), frozen
   but for the method; the decoder trains. The best validation delta is kept.
4. **evaluation and inference**: ``train.json`` + ``evaluate.json`` on the test slab (Dice per class, HD95 in
   mm), then ``inference.json`` on the test images (masks on their grid) and a figure of a few test slices
   (image, ground truth, prediction) in ``segmentation_demo.png``.

With ``compare_scratch``, a UNETR trained from scratch (``full_segmentation``, random initialisation, every
weight trained) is evaluated the same way: the baseline that shows what the pre-trained, prompt-tuned encoder
is worth here. All bundles run through MONAI's bundle API, as ``python -m monai.bundle run`` runs them. The task
itself (sizes, data, encoder, tuning) is :mod:`monai_prompt.runs.segmentation_demo_task`, which the accuracy
benchmark shares; nothing imports this module.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monai_prompt.runs.progress import RunSteps
from monai_prompt.runs.segmentation_demo_task import (
    SegmentationDemoConfig,
    prepare_segmentation_data,
    pretrain_encoder,
    tune_segmentation,
)

__all__ = ["run_segmentation_demo"]

_print = functools.partial(print, flush=True)


def _figure(data_dir: Path, runs: dict[str, dict[str, Any]], out_dir: Path, slices: int) -> Path:
    """A PNG of ``slices`` test slices: the image, the ground truth and each run's prediction as overlays."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    datalist = json.loads((data_dir / "datalist_2d.json").read_text())
    test, classes = datalist["test"], list(datalist["labels"].values())
    chosen = [test[int(i)] for i in np.linspace(0, len(test) - 1, slices)]
    colours = ["#00000000", *plt.get_cmap("tab10").colors[: len(classes) - 1]]
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
    legend = [Patch(color=colours[i], label=name) for i, name in enumerate(classes) if i]
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=8, frameon=False)
    fig.suptitle(f"Test slab: {datalist['name'].removeprefix('monai-prompt demo: ')}", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    path = out_dir / "segmentation_demo.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_segmentation_demo(
    out_dir: str | Path = "runs/demo_segmentation",
    config: SegmentationDemoConfig = SegmentationDemoConfig(),
    compare_scratch: bool = False,
    bundles: str | os.PathLike | None = None,
    verbose: bool = False,
    print_fn: Callable[[str], None] = _print,
) -> dict[str, Any]:
    """Data, MAE pre-training (cached), tuning of ``<method>_segmentation``, evaluation, inference and the figure;
    prints progress and a summary.

    Args:
        out_dir: output folder (``data/``, ``vit_pretraining/``, ``<method>_pretrained/``, ``unetr_scratch/``,
            ``segmentation_demo.png``, ``results.json``).
        config: sizes (:class:`~monai_prompt.runs.segmentation_demo_task.SegmentationDemoConfig`;
            :data:`~monai_prompt.runs.segmentation_demo_task.TINY_SEGMENTATION_DEMO` for a smoke run).
        compare_scratch: also train a UNETR from scratch (``full_segmentation``, random initialisation).
        bundles: the bundles folder (default: the package's, :func:`~monai_prompt.runs.bundles.bundles_folder`).
        verbose: show the bundles' own logs.
        print_fn: where lines go.

    Returns:
        the results written to ``results.json``: test metrics and parameter counts per run, timings, the figure.
    """
    warnings.filterwarnings("ignore", message="torch.meshgrid")
    out_dir = Path(out_dir)
    steps = RunSteps(5 if compare_scratch else 4, print_fn)
    with steps.step("data_s", f"demo segmentation data ({config.labels} task) in {out_dir / 'data'}"):
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
                                               verbose, print_fn, zeroed_encoder=label == "pretrained"),
                           "out_dir": str(run_dir)}

    with steps.step("figure_s", f"figure of {config.figure_slices} test slices"):
        figure = _figure(datalist.parent, runs, out_dir, config.figure_slices)
    content = json.loads(datalist.read_text())
    results = {"config": dataclasses.asdict(config), "runs": runs, "figure": str(figure),
               "classes": list(content["labels"].values()), "test_images": len(content["test"]), "hd95_unit": "mm",
               "timings": steps.rounded()}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print_fn(_summary(results, out_dir))
    return results


def _run_label(label: str, method: str) -> str:
    return f"{method}, MAE encoder" if label == "pretrained" else "UNETR from scratch"


def _summary(results: dict[str, Any], out_dir: Path) -> str:
    """The closing table: test Dice / HD95 per class and run, the zeroed-encoder share, trainable parameters,
    timings, the figure."""
    classes, method = results["classes"][1:], results["config"]["method"]
    labels = [_run_label(label, method) for label in results["runs"]]
    width = max(22, *(len(label) + 2 for label in labels))
    lines = ["", f"Test slab ({results['test_images']} slices, best-validation delta; Dice / HD95 in mm):",
             f"  {'':<22}" + "".join(f"{label:>{width}}" for label in labels)]
    for name, key in [("mean", "mean"), *((c, c) for c in classes)]:
        dice, hd95 = ("mean_dice", "mean_hd95") if key == "mean" else (f"dice_{key}", f"hd95_{key}")
        cells = [f"{run['metrics'][dice]:.3f} / {run['metrics'][hd95]:.1f}" for run in results["runs"].values()]
        lines.append(f"  {name:<22}" + "".join(f"{cell:>{width}}" for cell in cells))
    for label, run in results["runs"].items():
        if "zeroed_encoder_metrics" in run:
            dice, zeroed = run["metrics"]["mean_dice"], run["zeroed_encoder_metrics"]["mean_dice"]
            share = (dice - zeroed) / dice if dice else 0.0
            lines.append(f"  {_run_label(label, method)} with the encoder's outputs zeroed (same delta): mean Dice "
                         f"{zeroed:.3f}: the encoder carries {100 * share:.0f}% of the Dice")
    for label, run in results["runs"].items():
        share = 100 * run["encoder_trainable"] / run["backbone"]
        lines.append(f"  {_run_label(label, method)}: {run['trainable']:,} trainable parameters: "
                     f"{run['encoder_trainable']:,} of the encoder's {run['backbone']:,} ({share:.2f}%) and the "
                     f"{run['decoder']:,}-parameter decoder; {run['seconds_per_epoch']:.1f} s/epoch with validation")
    lines.append("  time: " + ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in results["timings"].items()))
    lines.append(f"  figure: {results['figure']}; outputs and results.json in {out_dir}")
    return "\n".join(lines)
