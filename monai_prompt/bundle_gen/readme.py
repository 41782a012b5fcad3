"""``docs/README.md`` of a classification bundle, in the model-zoo layout (overview, data, training,
performance, commands, references, license)."""

from __future__ import annotations

import json
from pathlib import Path

from monai_prompt.bundle_gen.configs import DEMO_DATASET_DIR
from monai_prompt.bundle_gen.metadata import PINNED_VERSIONS
from monai_prompt.bundle_gen.specs import BundleSpec

__all__ = ["MEASUREMENTS_FILE", "load_measurements", "readme"]

#: measured numbers per bundle, written by ``python -m monai_prompt.benchmarks.bundle_runs``.
MEASUREMENTS_FILE = Path(__file__).with_name("measurements.json")


def load_measurements() -> dict:
    """The numbers of :data:`MEASUREMENTS_FILE`."""
    return json.loads(MEASUREMENTS_FILE.read_text())


def _method_config(spec: BundleSpec) -> str:
    config = spec.method_config()
    if not config:
        return "none (the method has no hyper-parameters)"
    return ", ".join(f"`{key}={json.dumps(value)}`" for key, value in config.items())


def _network(spec: BundleSpec) -> str:
    """The overview paragraph on the network."""
    if spec.fpt:
        return f"""\
`network_def` is `monai_prompt.fpt.FPTClassifier` with `variant="{spec.method}"` and FPT config
{_method_config(spec)}. The frozen large pre-trained model (LPM, a MONAI `ViT` loaded from `pretrained`) sees
the {spec.img_size} x {spec.img_size} image; its important keys and values per tapped layer feed fine-grained
prompts through a fusion module into a small side ViT that sees a downsampled copy. Training never runs the LPM:
`initialize` preloads its features once into `cache/` (`fpt_cache_dir`; entries are keyed by image content and
tied to the LPM weights, so a stale cache fails loudly; `--fpt_preload False` skips the pass, `monai-prompt
preload` does the same from the command line), and the train/validation transforms read them back
(`LoadFPTFeaturesd`) before the augmentations. Inference runs the LPM online on the image."""
    return f"""\
The backbone is MONAI's `ViT` (`monai_prompt.backbones.PromptableViT`, same
state-dict keys), pre-trained weights are loaded by the network itself from `pretrained` (timm, HuggingFace
or MONAI layouts; see the repository's `docs/pretrained-weights.md`), the method is applied on top and a linear
head reads the CLS feature. `network_def` is `monai_prompt.nets.PromptClassifier` with `method="{spec.method}"`
and method config {_method_config(spec)}."""


def _demo_run(spec: BundleSpec, run: dict, pretraining: dict) -> str:
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


def _performance(spec: BundleSpec, measured: dict) -> str:
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
            _demo_run(spec, run, measured["pretraining"]),
            "",
            "| s / epoch | peak RSS (MiB) | test accuracy | macro AUC | macro F1 | quadratic kappa |",
            "|---|---|---|---|---|---|",
            f"| {run['seconds_per_epoch']:.1f} | {run['peak_rss_mb']:.0f} | {run['accuracy']:.3f} | {run['auc']:.3f} "
            f"| {run['f1']:.3f} | {run['kappa']:.3f} |",
            "",
        ]
    return "\n".join(lines)


_COMMANDS = """\
All commands run from the repository root (outputs go to `bundles/{name}/models` and `eval`) or from inside
the bundle folder (drop `bundles/{name}/` from the paths). The default `dataset_dir` is `{data}/`: build
it with `make demo` or alone with `monai-prompt demo-data`, or pass `--dataset_dir`.

Train (validation every epoch, best delta to `models/model.pt`, resumable checkpoints
`models/checkpoint_epoch=<N>.pt`). Each training command below starts a new run in `models/` and stops when the
folder holds a previous one: `--resume True` continues it, `--overwrite true` replaces it:

```bash
python -m monai.bundle run --config_file bundles/{name}/configs/train.json \\
    --pretrained /path/to/vit_base_patch16_224.safetensors
```

Resume an interrupted run from the newest `checkpoint_epoch=<N>.pt` (raise `--train#trainer#max_epochs` to
train longer: the cosine schedule is rebuilt for the new length):

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

Evaluate `models/model.pt` on the test split (metrics to `eval/metrics.csv`):

```bash
python -m monai.bundle run \\
    --config_file "['bundles/{name}/configs/train.json','bundles/{name}/configs/evaluate.json']" --pretrained ...
```

Infer (class probabilities per image to `eval/predictions.csv`; `--infer_images "['a.png','b.png']"` for
other images):

```bash
python -m monai.bundle run --config_file bundles/{name}/configs/inference.json --pretrained ...
```

Check and export (TorchScript of the network with the delta loaded on the pre-trained backbone):

```bash
SCHEMA=$(python -c "from monai_prompt.bundle_gen.metadata import schema_file; print(schema_file())")  # offline copy
python -m monai.bundle verify_metadata --meta_file bundles/{name}/configs/metadata.json --filepath $SCHEMA
python -m monai.bundle verify_net_in_out network_def --meta_file bundles/{name}/configs/metadata.json \\
    --config_file bundles/{name}/configs/inference.json --pretrained ...
python -m monai.bundle ckpt_export network_def --filepath bundles/{name}/models/model.ts \\
    --ckpt_file bundles/{name}/models/model.pt --meta_file bundles/{name}/configs/metadata.json \\
    --config_file bundles/{name}/configs/inference.json --key_in_ckpt model --pretrained ...
```

`monai-prompt export bundles/{name} --pretrained ...` writes one self-contained file instead: the full state
dict `models/model_full.pt` (with LoRA/SSF merged into the weights where the method allows it) and its
TorchScript `models/model_full.ts`.
"""


def readme(spec: BundleSpec, measured: dict | None = None) -> str:
    """The README text of ``spec``'s bundle."""
    measured = load_measurements() if measured is None else measured
    recipe = f"{spec.optimizer}, learning rate {spec.learning_rate:g}, weight decay {spec.weight_decay:g}"
    if spec.optimizer_args:
        recipe += ", " + ", ".join(f"{key} {value}" for key, value in spec.optimizer_args.items())
    references = "\n".join(f"- {ref.citation}. {ref.url}" for ref in spec.references)
    return f"""\
# {spec.title} classification (MONAI ViT)

## Model overview

{spec.title}: {spec.summary}.

{_network(spec)}

`models/model.pt` holds only what training changed (the delta: the trainable parameters, head included), laid out as
an ignite checkpoint `{{"model": ..., "peft": ...}}`; `peft` records the method, its config and a fingerprint
of the frozen backbone, so loading a delta of another method, config or backbone fails with a message that
says what differs. No trained weights ship with the bundle: training produces them for your data and backbone.

This bundle is generated by `monai_prompt.bundle_gen` (`monai-prompt render-bundles`); edit the generator,
not the files.

## Data

The default `dataset_dir` is `{DEMO_DATASET_DIR}/` below the repository root, the demo data that `make demo`
builds (`monai-prompt demo-data` builds it alone): 32 x 32 axial patches of the MNI
ICBM152 2009a T1 template (shipped inside the nilearn wheel), labelled by the tissue at their centre (`csf`,
`gray_matter`, `white_matter`), split by axial slab so no two splits share a voxel. `datalist_file` may be any
datalist `monai_prompt.data.read_datalist` reads: a MONAI decathlon JSON, a CSV (one label column, or several 0/1
columns for multi-label) or a class-per-folder tree. Images are read
with MONAI `LoadImaged` (PNG/JPEG, DICOM, NIfTI), matched to `in_channels` (grey repeated to RGB), scaled to
[0, 1] and resized to `img_size`; training adds a flip, a small affine and contrast jitter.
`initialize` checks that the datalist's classes match `num_classes` and `multi_label`.

For other data set `num_classes` (and `channel_def` in `metadata.json`); `--multi_label True` switches to
sigmoid outputs and `BCEWithLogitsLoss` for multi-hot labels.

## Training configuration

- Network: `{spec.method}` on `backbone="vit_base"` (ViT-B/16), `img_size={spec.img_size}`, `in_channels=3`,
  `layer_norm_eps=1e-6` (timm checkpoints; 1e-12 for HuggingFace ones).
- Optimiser: {recipe}, cosine annealing to 0 over {spec.epochs} epochs, batch size 16; source:
  {spec.recipe_source}.
- Loss: cross-entropy (`BCEWithLogitsLoss` with `multi_label`).
- Device: CUDA with AMP when available, else CPU, chosen at run time (`device`, `amp`).
- Validation every `val_interval` epochs: accuracy (key metric, selects `models/model.pt`), macro ROC AUC,
  macro F1 and quadratic-weighted kappa (not for multi-label).
- At start the trainable-parameter report is printed; each epoch logs peak memory (CUDA max allocated on GPU,
  peak RSS on CPU).
- Overrides: any id, e.g. `--dataset_dir`, `--pretrained`, `--img_size`, `--batch_size`, `--num_workers`,
  `--learning_rate`, `--train#trainer#max_epochs`, `--method_config "{{...}}"`, `--backbone vit_small`;
  `--cache_rate 1.0` keeps the loaded, resized images in memory (fast for small sets; mind the RAM).

## Input and output

- Input: `image`, 3 x {spec.img_size} x {spec.img_size} float32 in [0, 1].
- Output: `pred`, logits `[B, num_classes]`; after postprocessing, class probabilities. Inference writes
  `eval/predictions.csv`: one row per image, `<image path>,<p_class0>,<p_class1>,...` (no header; MONAI's
  `ClassificationSaver` format). Evaluation writes `eval/metrics.csv` (`accuracy`, `auc`, `f1`, `kappa`).

## Performance

{_performance(spec, measured)}
## MONAI bundle commands

{_COMMANDS.format(name=spec.name, data=DEMO_DATASET_DIR)}
Tested with MONAI {PINNED_VERSIONS['monai_version']}, PyTorch {PINNED_VERSIONS['pytorch_version']}. See
`docs/bundles.md` of the repository for MONAI Label notes and limits.

## References

{references}

## License

Code and configs: Apache License 2.0 (`LICENSE`). The demo data comes from the MNI ICBM152 2009a template
(MNI copyright notice: free use with the notice kept) as shipped in nilearn (BSD-3-Clause). Pre-trained
weights keep their own licences.
"""
