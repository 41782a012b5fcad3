"""What the segmentation bundle tests run with: tiny generated image/label pairs (2D NIfTI or PNG, 3D NIfTI) whose
affines are not RAS, and the overrides that make any segmentation bundle run in seconds on a tiny UNETR."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from monai_prompt.bundle_gen.specs import BundleSpec

#: ROI of the tiny UNETR (patch 16: a 2 x 2 (x 2) grid).
TINY_ROI = 32
#: a 4-block encoder of width 32 (UNETR taps blocks 1, 2, 3), a decoder of feature size 8.
TINY_ENCODER = {"hidden_size": 32, "num_layers": 4, "num_heads": 2, "mlp_dim": 64}
TINY_CLASSES = ("background", "csf", "gray_matter", "white_matter")
#: image sizes: not multiples of the ROI, so the sliding window pads and crops back.
TINY_SHAPES = {2: (40, 36), 3: (36, 40, 34)}
#: voxel-to-world affines with a flipped axis and anisotropic spacing (LAS/LPS), so orientation really changes.
TINY_AFFINES = {
    2: np.array([[-1.5, 0, 0, 30.0], [0, 0.8, 0, -10.0], [0, 0, 3.0, 7.0], [0, 0, 0, 1]]),
    3: np.array([[-1.2, 0, 0, 20.0], [0, -1.0, 0, 15.0], [0, 0, 2.0, -8.0], [0, 0, 0, 1]]),
}


def _pair(shape: tuple[int, ...], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An ellipsoid of three nested classes (1 outside, 3 inside) on background, and a noisy image whose
    brightness follows the class."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    centre = rng.uniform(-0.15, 0.15, size=(len(shape),) + (1,) * len(shape))
    radius = np.sqrt(((grid - centre) ** 2).sum(0))
    label = np.select([radius < 0.3, radius < 0.55, radius < 0.8], [3, 2, 1], 0).astype(np.uint8)
    image = label * 60.0 + rng.normal(0, 10, shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


def write_tiny_segmentation(
    root: str | os.PathLike, spatial_dims: int, png: bool = False, counts: tuple[int, int, int] = (4, 2, 2),
    seed: int = 0, label_values: Sequence[int] | None = None, affine: np.ndarray | None = None,
) -> Path:
    """Image/label pairs ``{images,labels}/<split>/case<i>.<ext>`` and ``datalist.json`` (decathlon, with
    ``labels``) under ``root``; 2D as NIfTI (``TINY_AFFINES[2]``, or ``affine``) or PNG, 3D as NIfTI
    (``TINY_AFFINES[3]``, or ``affine``); class ``k`` stored as ``label_values[k]`` (default ``k``; uint16 label maps
    when a value exceeds 255).

    Returns:
        the datalist path.
    """
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    suffix = ".png" if png else ".nii.gz"
    values = np.arange(len(TINY_CLASSES)) if label_values is None else np.asarray(label_values)
    dtype = np.uint8 if values.max() <= 255 else np.uint16
    splits: dict[str, list[dict[str, Any]]] = {}
    for split, count in zip(("training", "validation", "test"), counts):
        splits[split] = []
        for index in range(count):
            image, label = _pair(TINY_SHAPES[spatial_dims], rng)
            label = values[label].astype(dtype)
            item = {}
            for kind, array in (("image", image), ("label", label)):
                path = root / f"{kind}s" / split / f"case{index}{suffix}"
                path.parent.mkdir(parents=True, exist_ok=True)
                if png:  # MONAI's PIL reader gives [X, Y] for an [Y, X] file
                    Image.fromarray(np.ascontiguousarray(array.T)).save(path)
                else:
                    nib.save(nib.Nifti1Image(array, TINY_AFFINES[spatial_dims] if affine is None else affine), path)
                item[kind] = str(path.relative_to(root))
            splits[split].append(item)
    datalist = root / "datalist.json"
    labels = {str(value): name for value, name in zip(values.tolist(), TINY_CLASSES)}
    datalist.write_text(json.dumps({"labels": labels, **splits}, indent=1))
    return datalist


def tiny_segmentation_overrides(spec: BundleSpec, datalist: Path, pretrained: Path) -> dict[str, Any]:
    """Bundle overrides for the tiny data and a tiny encoder saved at ``pretrained``."""
    shape = [TINY_ROI] * spec.spatial_dims
    return {
        "datalist_file": str(datalist),
        "pretrained": str(pretrained),
        "backbone": "vit_tiny",
        "backbone_overrides": dict(TINY_ENCODER),
        "img_size": TINY_ROI,
        "feature_size": 8,
        "batch_size": 2,
        "num_samples": 1,
        "num_workers": 0,
        "_meta_#network_data_format#inputs#image#spatial_shape": shape,
        "_meta_#network_data_format#outputs#pred#spatial_shape": shape,
    }


def write_tiny_encoder(path: str | os.PathLike, spatial_dims: int, seed: int = 0) -> Path:
    """A random :data:`TINY_ENCODER` ViT (patch 16, no CLS token) saved as a MONAI-layout state dict, standing in
    for pre-trained weights."""
    import torch

    from monai_prompt.backbones.vit import build_vit

    torch.manual_seed(seed)
    vit = build_vit("vit_tiny", in_channels=1, img_size=TINY_ROI, spatial_dims=spatial_dims, cls_token=False,
                    **TINY_ENCODER)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(vit.state_dict(), path)
    return path


#: 2D bundles that the bundle test runs on a SAM-family encoder (their methods keep a ViT run in 3D): windowed VPT on
#: SAM's ViT (``backbone="auto"`` from a whole-SAM checkpoint at another size and channel count), EPT on the TinyViT.
SAM_FAMILY_BUNDLES = {"vpt_segmentation": "sam", "ept_segmentation": "tinyvit"}
#: a tiny SAM ViT with UNETR's patch 16 (a 4 x 4 grid at 64 px; windows of 3, global blocks 1 and 3).
TINY_SAM = {
    "embed_dim": 32, "depth": 4, "num_heads": 2, "out_chans": 16, "window_size": 3, "global_attn_indexes": (1, 3)
}


def write_sam_family_encoder(path: str | os.PathLike, family: str, seed: int = 0) -> dict[str, Any]:
    """A random tiny encoder of ``family`` saved at ``path`` as its checkpoints are (SAM: a whole SAM's
    ``image_encoder.*`` keys at 64 px, RGB; TinyViT: the encoder's state dict, one channel), and the bundle overrides
    that build it."""
    import torch

    from grid_support import TINYVIT_TINY
    from monai_prompt.backbones.sam import build_sam
    from monai_prompt.backbones.tinyvit import build_tinyvit

    torch.manual_seed(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if family == "sam":
        state = build_sam("sam_vit_b", in_channels=3, img_size=64, **TINY_SAM).state_dict()
        torch.save({f"image_encoder.{key}": value for key, value in state.items()}, path)
        return {"backbone": "auto", "backbone_overrides": {}, "pretrained": str(path)}
    torch.save(build_tinyvit("lite_medsam", in_channels=1, img_size=TINY_ROI, **TINYVIT_TINY).state_dict(), path)
    return {"backbone": "lite_medsam", "backbone_overrides": dict(TINYVIT_TINY), "pretrained": str(path)}


def reference_scores(
    prediction: np.ndarray, truth: np.ndarray, label_values: Sequence[int], spacing: Sequence[float] | None = None
) -> dict[str, list[float]]:
    """Dice and HD95 per foreground class (``label_values[1:]``, the value of each class in the masks) of one
    integer mask pair, computed with numpy/scipy: Dice is
    NaN when the truth lacks the class, HD95 when either mask does; surfaces are the masks minus their erosion,
    HD95 the larger of the two directed 95th percentiles of Euclidean surface distances, in the units of
    ``spacing`` (the voxel size per axis; default voxels)."""
    from scipy.ndimage import binary_erosion, distance_transform_edt

    dice, hd95 = [], []
    for c in label_values[1:]:
        p, t = prediction == c, truth == c
        dice.append(2 * (p & t).sum() / (p.sum() + t.sum()) if t.any() else float("nan"))
        if not (p.any() and t.any()):
            hd95.append(float("nan"))
            continue
        edges_p, edges_t = p ^ binary_erosion(p), t ^ binary_erosion(t)
        to_t = distance_transform_edt(~edges_t, sampling=spacing)[edges_p]
        to_p = distance_transform_edt(~edges_p, sampling=spacing)[edges_t]
        hd95.append(max(np.percentile(to_t, 95), np.percentile(to_p, 95)))
    return {"dice": dice, "hd95": hd95}
