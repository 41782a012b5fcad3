"""``configs/metadata.json`` of a classification bundle (MONAI bundle metadata schema 2024-07-25)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from monai_prompt.bundle_gen.specs import BundleSpec
from monai_prompt.data.demo import DEMO_CLASSES

__all__ = ["METADATA_SCHEMA", "PINNED_VERSIONS", "REQUIRED_PACKAGES", "metadata", "schema_file"]

METADATA_SCHEMA = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)
#: the versions the bundles were tested with (all on PyPI; the model-zoo CI installs exactly these).
PINNED_VERSIONS = {"monai_version": "1.6.1", "pytorch_version": "2.13.0", "numpy_version": "2.4.6"}
#: packages the workflows import besides MONAI, torch and numpy, at the tested versions (all on PyPI).
REQUIRED_PACKAGES = {
    "pytorch-ignite": "0.5.5",
    "fire": "0.7.1",
    "jsonschema": "4.26.0",
    "einops": "0.8.2",
    "safetensors": "0.8.0",
    "pillow": "13.0.0",
    "nibabel": "5.4.2",
    "pydicom": "3.0.2",
    "itk": "5.4.7",
    "mlflow": "3.17.2",
}


def schema_file() -> Path:
    """A local copy of :data:`METADATA_SCHEMA` (MONAI-extra-test-data 0.8.1, Apache-2.0), so that
    ``python -m monai.bundle verify_metadata --filepath <it>`` needs no download."""
    return Path(str(files("monai_prompt.bundle_gen").joinpath("schema", METADATA_SCHEMA.rsplit("/", 1)[1])))


def metadata(spec: BundleSpec) -> dict[str, Any]:
    """The metadata dict of ``spec``'s bundle."""
    num_classes = len(DEMO_CLASSES)
    channel_def = {str(i): name for i, name in enumerate(DEMO_CLASSES)}
    network = "monai_prompt.fpt.FPTClassifier" if spec.fpt else "monai_prompt.nets.PromptClassifier"
    return {
        "schema": METADATA_SCHEMA,
        "version": spec.version,
        "changelog": dict(spec.changelog),
        **PINNED_VERSIONS,
        "required_packages_version": dict(REQUIRED_PACKAGES),
        "supported_apps": {},
        "name": f"{spec.title} classification (MONAI ViT)",
        "task": f"2D image classification with a pre-trained ViT tuned by {spec.title}",
        "description": (
            f"{spec.title}: {spec.summary}. The network ({network}) loads its pre-trained MONAI ViT itself "
            "(config 'pretrained'); models/model.pt holds only the trained delta (what trains, head included) with "
            "the method, config and backbone fingerprint it belongs to. Needs the monai_prompt package from its "
            "repository (pip install -e .; not on PyPI)."
        ),
        "authors": "monai-prompt contributors",
        "copyright": "Copyright (c) monai-prompt contributors",
        "data_source": (
            "demo: MNI ICBM152 2009a T1 template patches labelled by tissue (monai-prompt demo-data, from the "
            "nilearn wheel); any datalist of 2D images: class-per-folder tree, CSV or MONAI decathlon JSON"
        ),
        "data_type": "PNG/JPEG, DICOM or NIfTI images read by MONAI LoadImage",
        "image_classes": "image channels matched to in_channels (grey repeated to RGB), intensity scaled to [0, 1]",
        "label_classes": "one class index per image (multi_label: a multi-hot vector)",
        "pred_classes": "class probabilities (softmax; sigmoid when multi_label)",
        "intended_use": "research on parameter-efficient transfer of pre-trained ViTs; not for clinical use",
        "references": [f"{ref.citation}. {ref.url}" for ref in spec.references],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "any 2D image (demo: T1w MRI patches)",
                    "num_channels": 3,
                    "spatial_shape": [spec.img_size, spec.img_size],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {"0": "R", "1": "G", "2": "B"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "logits",
                    "format": "classes",
                    "num_channels": num_classes,
                    "spatial_shape": [1, num_classes],
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": False,
                    "channel_def": channel_def,
                }
            },
            "post_processed_outputs": {
                "pred": {
                    "type": "probabilities",
                    "format": "classes",
                    "num_channels": num_classes,
                    "spatial_shape": [1, num_classes],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": channel_def,
                }
            },
        },
    }
