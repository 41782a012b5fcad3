"""``docs/README.md`` of a segmentation bundle, in the model-zoo layout (overview, data, training, input and output,
performance, commands, references, license). Measured numbers come from :data:`SEGMENTATION_MEASUREMENTS_FILE`
(``python -m monai_prompt.benchmarks.segmentation``)."""

from __future__ import annotations

import json
from pathlib import Path

from monai_prompt.bundle_gen.metadata import PINNED_VERSIONS
from monai_prompt.bundle_gen.segmentation import DEMO_DATASET_DIR
from monai_prompt.bundle_gen.specs import BundleSpec
from monai_prompt.data.demo_segmentation import SEGMENTATION_CLASSES

__all__ = ["SEGMENTATION_MEASUREMENTS_FILE", "load_segmentation_measurements", "segmentation_readme"]

#: parameter counts at ViT-B/16 and the demo run, written by ``python -m monai_prompt.benchmarks.segmentation``.
SEGMENTATION_MEASUREMENTS_FILE = Path(__file__).with_name("segmentation_measurements.json")


def load_segmentation_measurements() -> dict:
    """The numbers of :data:`SEGMENTATION_MEASUREMENTS_FILE` (empty when it was never written)."""
    if not SEGMENTATION_MEASUREMENTS_FILE.is_file():
        return {}
    return json.loads(SEGMENTATION_MEASUREMENTS_FILE.read_text())


def _method_config(spec: BundleSpec) -> str:
    config = spec.method_config()
    if not config:
        return "none (the method has no hyper-parameters)"
    return ", ".join(f"`{key}={json.dumps(value)}`" for key, value in config.items())


def _shape(spec: BundleSpec) -> str:
    return " x ".join([str(spec.img_size)] * spec.spatial_dims)


def _counts(spec: BundleSpec, measured: dict) -> list[str]:
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


def _demo(spec: BundleSpec, measured: dict) -> list[str]:
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
    classes = SEGMENTATION_CLASSES[1:]
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
         "scratch (`full_segmentation`, random initialisation). HD95 in pixels (2 mm); seconds per epoch with "
         "validation, on a shared CPU. It shows the pipeline working on real images, not how the method does with "
         "a real pre-trained ViT-B: here both reach the same Dice, as the convolutional decoder and its "
         "full-resolution skip connection do most of the work on this local task (see the repository's "
         "`docs/segmentation.md`)."),
        "",
        f"| encoder | trainable | mean Dice | {header} | mean HD95 | s / epoch |",
        "|---" * (5 + len(classes)) + "|",
        *rows,
        "",
    ]


_COMMANDS = """\
All commands run from the repository root (outputs go to `bundles/{name}/models` and `eval`) or from inside
the bundle folder (drop `bundles/{name}/` from the paths). Build the demo data first with
`monai-prompt demo-data --task segmentation` (it writes `{data}/`, the default `dataset_dir`) or pass
`--dataset_dir` / `--datalist_file`.

Train (sliding-window validation every epoch, best mean-Dice delta to `models/model.pt`, resumable checkpoints
`models/checkpoint_epoch=<N>.pt`; `--resume True` continues from the newest one):

```bash
python -m monai.bundle run --config_file bundles/{name}/configs/train.json --pretrained /path/to/vit_b16.pth
```

Track with MLflow (`--tracking mlflow`, local store `eval/mlruns.db` or `--tracking_uri http://host:port`);
multi-GPU (DDP; nccl on GPUs, gloo on CPUs):

```bash
torchrun --standalone --nnodes=1 --nproc_per_node=2 -m monai.bundle run \\
    --config_file "['bundles/{name}/configs/train.json','bundles/{name}/configs/multi_gpu_train.json']" \\
    --pretrained ...
```

Evaluate `models/model.pt` on the test split (`eval/metrics.csv`: `mean_dice`, `dice_<class>`, `mean_hd95`,
`hd95_<class>`; per image in `eval/mean_dice_raw.csv` and `eval/hd95_raw.csv`):

```bash
python -m monai.bundle run \\
    --config_file "['bundles/{name}/configs/train.json','bundles/{name}/configs/evaluate.json']" --pretrained ...
```

Infer on images without labels (default: the test split; `--infer_images` takes a folder, a glob or a list):

```bash
python -m monai.bundle run --config_file bundles/{name}/configs/inference.json --pretrained ... \\
    --infer_images "/data/new_scans/*.nii.gz"
```

Check and export (TorchScript of the network with the delta loaded on the pre-trained encoder):

```bash
SCHEMA=$(python -c "from monai_prompt.bundle_gen.metadata import schema_file; print(schema_file())")  # offline copy
python -m monai.bundle verify_metadata --meta_file bundles/{name}/configs/metadata.json --filepath $SCHEMA
python -m monai.bundle verify_net_in_out network_def --meta_file bundles/{name}/configs/metadata.json \\
    --config_file bundles/{name}/configs/inference.json --pretrained ...
python -m monai.bundle ckpt_export network_def --filepath bundles/{name}/models/model.ts \\
    --ckpt_file bundles/{name}/models/model.pt --meta_file bundles/{name}/configs/metadata.json \\
    --config_file bundles/{name}/configs/inference.json --key_in_ckpt model --pretrained ...
```
"""


def segmentation_readme(spec: BundleSpec, measured: dict | None = None) -> str:
    """The README text of ``spec``'s segmentation bundle."""
    measured = load_segmentation_measurements() if measured is None else measured
    dims = spec.spatial_dims
    classes = ", ".join(f"`{i}` {name}" for i, name in enumerate(SEGMENTATION_CLASSES))
    references = "\n".join(f"- {ref.citation}. {ref.url}" for ref in spec.references)
    demo_data = (
        "96 x 96 axial slices of the MNI ICBM152 2009a T1 template (every 1 mm slice, 2 mm pixels; "
        "`datalist_2d.json` lists NIfTI files, `datalist_2d_png.json` the same slices as PNG)"
        if dims == 2
        else "64 x 64 x 32 crops of the 1 mm MNI ICBM152 2009a T1 template (`datalist_3d.json`)"
    )
    performance = "\n".join([*_counts(spec, measured), *_demo(spec, measured)])
    axes = ", ".join(["H", "W", "D"][:dims])
    return f"""\
# {spec.title} {dims}D segmentation (MONAI UNETR)

## Model overview

{spec.title}: {spec.summary}.

`network_def` is `monai_prompt.nets.PromptUNETR`: MONAI's `UNETR` (same state-dict keys, a MONAI UNETR
checkpoint loads as-is) whose ViT encoder is a `monai_prompt.backbones.PromptableViT` without CLS token, loaded
from `pretrained` (timm, HuggingFace or MONAI ViT weights, or a MONAI UNETR checkpoint's `vit.` keys; position
embeddings are resized to the patch grid) with `method="{spec.method}"` and method config
{_method_config(spec)} applied on top. The decoder reads the encoder after blocks 3, 6, 9 of 12 and its last
tokens (prompt tokens removed) and always trains. Patch size 16 only: `img_size` must be a multiple of 16.

`models/model.pt` holds only what training changed (the delta: the method's parameters and the decoder), laid
out as an ignite checkpoint `{{"model": ..., "peft": ...}}`; `peft` records the method, its config and a
fingerprint of the frozen encoder, so a delta of another method, config or encoder fails to load with a
message that says what differs. No trained weights ship with the bundle.

This bundle is generated by `monai_prompt.bundle_gen` (`monai-prompt render-bundles`); edit the generator,
not the files.

## Data

Any MONAI decathlon datalist of image/label pairs (`training`, `validation`, `test`; a `labels` map names the
classes) read by `monai.data.load_decathlon_datalist`. The default `dataset_dir` is `{DEMO_DATASET_DIR}/` at the
repository root, built by `monai-prompt demo-data --task segmentation`: {demo_data}, labelled {classes} (the
most probable tissue of the template's probability maps inside its brain mask), split by axial slab with
unused slices between the slabs so no two splits share a voxel. `initialize` checks every pair first
(`monai_prompt.data.segmentation.check_segmentation_datalist`: readable, same shape and affine, label values in
`0..num_classes-1`, class count, splits) and lists every problem at once.

For other data set `class_names` (the datalist's `labels`; `num_classes` follows) and `channel_def` in
`metadata.json` (MONAI Label reads the label names from it), `in_channels`, and `pixdim` to resample to a
common spacing (default `None`: the data's own).

## Training configuration

- Network: `{spec.method}` on `backbone="vit_base"` (ViT-B/16), `img_size={spec.img_size}` ({dims}D, the ROI),
  `in_channels=1`, `feature_size=16`, `layer_norm_eps=1e-6` (timm checkpoints; 1e-12 HuggingFace, 1e-5 MONAI).
- Optimiser: {spec.optimizer}, learning rate {spec.learning_rate:g}, weight decay {spec.weight_decay:g}, cosine
  annealing to 0 over {spec.epochs} epochs; batches of `batch_size` images x `num_samples` ROI crops; source:
  {spec.recipe_source}.
- Loss: `DiceCELoss` (softmax, one-hot labels).
- Preprocessing: load, channel first, RAS orientation, optional `Spacingd` (`pixdim`), intensity to [0, 1]; training
  pads to the ROI and samples `num_samples` crops per image (`RandCropByPosNegLabeld`, half centred on
  foreground), with flips and contrast/intensity jitter.
- Validation every `val_interval` epochs with `SlidingWindowInferer` over whole images (ROI `img_size`,
  `--sw_overlap` 0.25, Gaussian blending, `--sw_batch_size`): mean Dice of the foreground classes (key metric,
  selects `models/model.pt`), Dice per class and HD95 (95th-percentile Hausdorff distance in voxels, mean and
  per class; MONAI's metrics).
- Device: CUDA with AMP when available, else CPU (`device`, `amp`). The trainable-parameter report is printed
  at start; each epoch logs peak memory.

## Input and output

- Input: `image`, 1 x {_shape(spec)} float32 crops in [0, 1] (inference: whole images of any size, covered by
  the sliding window).
- Output: `pred`, logits `[B, {len(SEGMENTATION_CLASSES)}, {axes}]`; inference applies softmax, inverts the preprocessing
  (`Invertd`: orientation, spacing) and writes the argmax mask per image to `eval/masks/<image>_seg.nii.gz`
  with the input's affine and shape (`_seg.png` for PNG inputs).

## Performance

{performance}
## MONAI bundle commands

{_COMMANDS.format(name=spec.name, data=DEMO_DATASET_DIR)}
Tested with MONAI {PINNED_VERSIONS['monai_version']}, PyTorch {PINNED_VERSIONS['pytorch_version']}. See
`docs/segmentation.md` of the repository.

## References

{references}

## License

Code and configs: Apache License 2.0 (`LICENSE`). The demo data comes from the MNI ICBM152 2009a template
(MNI copyright notice: free use with the notice kept) as shipped in nilearn (BSD-3-Clause). Pre-trained
weights keep their own licences.
"""
