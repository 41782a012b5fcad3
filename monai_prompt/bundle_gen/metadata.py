"""``configs/metadata.json`` of a bundle (MONAI bundle metadata schema 2024-07-25): :func:`metadata` for
classification, :func:`segmentation_metadata` (``channel_def`` names every label: MONAI Label reads them there)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from monai_prompt.bundle_gen.specs import BundleSpec
from monai_prompt.data.demo import DEMO_CLASSES
from monai_prompt.data.demo_segmentation import SEGMENTATION_CLASSES

__all__ = [
    "METADATA_SCHEMA",
    "PINNED_VERSIONS",
    "REQUIRED_PACKAGES",
    "metadata",
    "schema_file",
    "segmentation_metadata",
]

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


def _release(spec: BundleSpec) -> dict[str, Any]:
    """Schema, version, changelog and the tested package versions."""
    return {
        "schema": METADATA_SCHEMA,
        "version": spec.version,
        "changelog": dict(spec.changelog),
        **PINNED_VERSIONS,
        "required_packages_version": dict(REQUIRED_PACKAGES),
        "supported_apps": {},
    }


_AUTHORS = {"authors": "monai-prompt contributors", "copyright": "Copyright (c) monai-prompt contributors"}
_INTENDED_USE = "research on parameter-efficient transfer of pre-trained ViTs; not for clinical use"
_DELTA = (
    "models/model.pt holds only the trained delta (what trains, {trained} included) with the method, config and "
    "backbone fingerprint it belongs to. Needs the monai_prompt package from its repository (pip install -e .; "
    "not on PyPI)."
)


def _references(spec: BundleSpec) -> list[str]:
    return [f"{ref.citation}. {ref.url}" for ref in spec.references]


def _tensor(
    kind: str, layout: str, channel_def: dict[str, str], shape: list[int], value_range: list[float], patch: bool,
    **extra: str,
) -> dict[str, Any]:
    """One ``network_data_format`` entry (float32; ``extra``: e.g. ``modality``)."""
    return {
        "type": kind,
        "format": layout,
        **extra,
        "num_channels": len(channel_def),
        "spatial_shape": shape,
        "dtype": "float32",
        "value_range": value_range,
        "is_patch_data": patch,
        "channel_def": channel_def,
    }


def metadata(spec: BundleSpec) -> dict[str, Any]:
    """The metadata dict of ``spec``'s classification bundle."""
    num_classes = len(DEMO_CLASSES)
    channel_def = {str(i): name for i, name in enumerate(DEMO_CLASSES)}
    network = "monai_prompt.nets.FPTClassifier" if spec.fpt else "monai_prompt.nets.PromptClassifier"
    rgb = {"0": "R", "1": "G", "2": "B"}
    return {
        **_release(spec),
        "name": f"{spec.title} classification (MONAI ViT)",
        "task": f"2D image classification with a pre-trained ViT tuned by {spec.title}",
        "description": (
            f"{spec.title}: {spec.summary}. The network ({network}) loads its pre-trained MONAI ViT itself "
            "(config 'pretrained'); " + _DELTA.format(trained="head")
        ),
        **_AUTHORS,
        "data_source": (
            "demo: MNI ICBM152 2009a T1 template patches labelled by tissue (monai-prompt demo-data, from the "
            "nilearn wheel); any datalist of 2D images: class-per-folder tree, CSV or MONAI decathlon JSON"
        ),
        "data_type": "PNG/JPEG, DICOM or NIfTI images read by MONAI LoadImage",
        "image_classes": "image channels matched to in_channels (grey repeated to RGB), intensity scaled to [0, 1]",
        "label_classes": "one class index per image (multi_label: a multi-hot vector)",
        "pred_classes": "class probabilities (softmax; sigmoid when multi_label)",
        "intended_use": _INTENDED_USE,
        "references": _references(spec),
        "network_data_format": {
            "inputs": {
                "image": _tensor("image", "magnitude", rgb, [spec.img_size, spec.img_size], [0, 1], False,
                                 modality="any 2D image (demo: T1w MRI patches)")
            },
            "outputs": {"pred": _tensor("logits", "classes", channel_def, [1, num_classes], [], False)},
            "post_processed_outputs": {
                "pred": _tensor("probabilities", "classes", channel_def, [1, num_classes], [0, 1], False)
            },
        },
    }


def segmentation_metadata(spec: BundleSpec) -> dict[str, Any]:
    """The metadata dict of ``spec``'s segmentation bundle (2D or 3D)."""
    dims = spec.spatial_dims
    shape = [spec.img_size] * dims
    channel_def = {str(i): name for i, name in enumerate(SEGMENTATION_CLASSES)}
    return {
        **_release(spec),
        "name": f"{spec.title} {dims}D segmentation (MONAI UNETR)",
        "task": f"{dims}D semantic segmentation with a UNETR whose pre-trained ViT encoder is tuned by {spec.title}",
        "description": (
            f"{spec.title}: {spec.summary}. The network (monai_prompt.nets.segmentation_network: a MONAI UNETR on a "
            "ViT; in 2D also SAM's ViT or LiteMedSAM's TinyViT with UNETR-style decoders) loads its pre-trained "
            "encoder itself (config 'pretrained'); the decoder always trains. "
            + _DELTA.format(trained="decoder")
        ),
        **_AUTHORS,
        "data_source": (
            f"demo: MNI ICBM152 2009a T1 template {'axial slices' if dims == 2 else 'crops'} with tissue labels from "
            "its probability maps (monai-prompt demo-data --task segmentation, from the nilearn wheel); any MONAI "
            "decathlon datalist of image/label pairs"
        ),
        "data_type": "NIfTI, DICOM, PNG or any image MONAI LoadImage reads; masks are saved as NIfTI (PNG for PNG "
        "input) on the input's grid",
        "image_classes": "image channels matched to in_channels, intensity scaled to [0, 1], RAS orientation",
        "label_classes": ", ".join(f"{i}: {name}" for i, name in enumerate(SEGMENTATION_CLASSES)),
        "pred_classes": ", ".join(f"{i}: {name}" for i, name in enumerate(SEGMENTATION_CLASSES)),
        "intended_use": _INTENDED_USE,
        "references": _references(spec),
        "network_data_format": {
            "inputs": {"image": _tensor("image", "magnitude", {"0": "image"}, shape, [0, 1], True, modality="MR")},
            "outputs": {"pred": _tensor("image", "segmentation", channel_def, shape, [], True)},
        },
    }
