"""Demo classification set from real brain MRI that ships inside the nilearn wheel.

Source: the MNI ICBM152 2009a nonlinear symmetric T1 template (197 x 233 x 189 voxels of 1 mm, skull-stripped)
and its grey- and white-matter probability maps, bundled in ``nilearn/datasets/data/`` (no download).
Task: which tissue lies at the centre of a 2D axial T1 patch: ``csf`` (1 - GM - WM inside the brain),
``gray_matter`` or ``white_matter``. The label is the tissue with the highest probability averaged over the
central 3 x 3 pixels, and only centres where that probability is at least ``min_confidence`` are kept. Each
patch gets a random gamma, contrast and noise, so the absolute grey level does not give the class away and a
network has to compare the centre with its surroundings.

No leakage: the volume is cut into axial slabs of ``slab_thickness`` slices, assigned in turn to training,
training, training, validation, test (interleaved from the skull base to the vertex); the ``slab_gap`` slices at
each slab border are never used, so patches of different splits are at least ``2 * slab_gap + 1`` mm apart and
share no voxel. Each item's ``group`` is its slab. The ``unlabeled`` split (for self-supervised pre-training)
holds patches at random brain positions of the training slabs only.

Output (deterministic: the same bytes on every run): ``images/<split>/<class>/x<X>_y<Y>_z<Z>.png`` (8-bit
grey, the name gives the patch centre in voxels), ``datalist.json`` (MONAI decathlon format) and
``datalist.csv``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from monai_prompt.data.datalist import SPLITS, UNLABELED, ClassificationDatalist

__all__ = [
    "DEMO_CLASSES",
    "SLAB_SPLITS",
    "build_demo_data",
    "jitter_intensity",
    "mni152_folder",
    "mni152_volumes",
    "write_png",
]

DEMO_CLASSES = ("csf", "gray_matter", "white_matter")
#: split of slab ``k`` is ``SLAB_SPLITS[k % 5]``: 60/20/20 of the slabs, interleaved along the head.
SLAB_SPLITS = ("training", "training", "training", "validation", "test")
_MNI_FILES = {
    tissue: f"mni_icbm152_{tissue}_tal_nlin_sym_09a_converted.nii.gz" for tissue in ("t1", "gm", "wm")
}


def mni152_folder() -> Path:
    """nilearn's folder of template files, found without importing nilearn (its import pulls in scikit-learn and
    pandas)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the demo data is cut from the MNI152 template inside nilearn: pip install nilearn")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


def mni152_volumes() -> tuple[np.ndarray, np.ndarray]:
    """The MNI152 T1 template (uint8) and tissue probabilities ``[3, X, Y, Z]`` (csf, gm, wm) from nilearn's files."""
    import nibabel as nib

    folder = mni152_folder()
    volumes = {name: np.asanyarray(nib.load(folder / file).dataobj) for name, file in _MNI_FILES.items()}
    grey, white = (volumes[name].astype(np.float32) / 255 for name in ("gm", "wm"))
    csf = np.clip(1 - grey - white, 0, 1) * (volumes["t1"] > 0)
    return volumes["t1"], np.stack([csf, grey, white])


def build_demo_data(
    out_dir: str | os.PathLike,
    *,
    patch_size: int = 32,
    train_per_class: int = 300,
    eval_per_class: int = 75,
    unlabeled: int = 600,
    slab_thickness: int = 10,
    slab_gap: int = 2,
    min_confidence: float = 0.6,
    noise: float = 0.03,
    seed: int = 0,
) -> ClassificationDatalist:
    """Write the demo set under ``out_dir`` and return its datalist (absolute paths).

    Args:
        out_dir: output folder (created; files of an earlier build with other settings are left in place).
        patch_size: patch side in pixels (1 mm).
        train_per_class: training patches per class.
        eval_per_class: validation and test patches per class.
        unlabeled: unlabelled patches from the training slabs.
        slab_thickness: slices per slab (the unit of the split).
        slab_gap: slices left out at each slab border.
        min_confidence: least mean tissue probability over the central 3 x 3 pixels.
        noise: standard deviation of the Gaussian noise added to the [0, 1] patch.
        seed: random seed of positions and intensity changes.
    """
    from scipy.ndimage import uniform_filter

    if not 0 <= 2 * slab_gap < slab_thickness:
        raise ValueError(f"slab_gap={slab_gap} leaves no slice of a {slab_thickness}-slice slab; need 2*gap < it.")
    t1, probabilities = mni152_volumes()
    centre_probabilities = uniform_filter(probabilities, size=(1, 3, 3, 1), mode="constant")
    tissue, confidence = centre_probabilities.argmax(0), centre_probabilities.max(0)
    slices = np.arange(t1.shape[2])
    slab = slices // slab_thickness
    usable = (slices % slab_thickness >= slab_gap) & (slices % slab_thickness < slab_thickness - slab_gap)
    slab_split = np.array([SLAB_SPLITS[k % len(SLAB_SPLITS)] for k in slab])
    half = patch_size // 2
    padded = np.pad(t1, ((half, half), (half, half), (0, 0)))
    rng = np.random.default_rng(seed)
    out = Path(out_dir).absolute()
    splits: dict[str, list[dict]] = {}
    for split in (*SPLITS, UNLABELED):
        in_split = (t1 > 0) & (usable & (slab_split == (split if split in SPLITS else "training")))
        if split == UNLABELED:
            pools, count = [(None, in_split)], unlabeled
        else:
            confident = in_split & (confidence >= min_confidence)
            pools = [(label, confident & (tissue == label)) for label in range(len(DEMO_CLASSES))]
            count = train_per_class if split == "training" else eval_per_class
        splits[split] = []
        for label, pool in pools:
            centres = np.argwhere(pool)
            if len(centres) < count:
                raise ValueError(f"only {len(centres)} {split} centres for class {label}; ask for fewer than {count}.")
            for x, y, z in centres[np.sort(rng.choice(len(centres), count, replace=False))]:
                folder = out / "images" / split / ("" if label is None else DEMO_CLASSES[label])
                path = folder / f"x{x:03d}_y{y:03d}_z{z:03d}.png"
                write_png(path, jitter_intensity(padded[x : x + patch_size, y : y + patch_size, z], noise, rng))
                item = {"image": str(path)} | ({} if label is None else {"label": int(label)})
                splits[split].append(item | {"group": f"slab{slab[z]:02d}"})
    datalist = ClassificationDatalist(list(DEMO_CLASSES), splits)
    datalist.save_json(
        out / "datalist.json",
        name="monai-prompt demo: MNI152 tissue patches",
        description=f"{patch_size}x{patch_size} axial T1 patches labelled by the tissue at their centre; split by "
        f"{slab_thickness}-slice axial slab (group), {slab_gap} slices left out at each slab border.",
        reference="MNI ICBM152 2009a nonlinear symmetric template (Fonov et al. 2009, 2011), as bundled in nilearn",
        licence="Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological "
        "Institute, McGill University (permissive; keep this notice with copies). Read from nilearn (BSD-3-Clause).",
        tensorImageSize="2D",
        modality={"0": "T1w MRI"},
    )
    datalist.save_csv(out / "datalist.csv")
    return datalist


def jitter_intensity(patch: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Random gamma (0.6-1.6), contrast (0.7-1) and Gaussian noise on a uint8 image (any shape), back to uint8."""
    gamma = np.exp(rng.uniform(np.log(0.6), np.log(1.6)))
    image = (patch / 255.0) ** gamma * rng.uniform(0.7, 1.0) + rng.normal(0.0, noise, patch.shape)
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def write_png(path: Path, patch: np.ndarray) -> None:
    """Save a ``[X, Y]`` patch so that MONAI's PIL reader loads it back as ``[X, Y]``."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(patch.T)).save(path)
