"""Demo segmentation sets from real brain MRI that ships inside pip wheels: 2D slices and 3D crops with masks.

Two tasks (``task``):

- ``"tissues"``: the MNI ICBM152 2009a T1 template and its tissue probability maps from the nilearn wheel
  (:func:`~monai_prompt.data.demo.mni152_volumes`, 197 x 233 x 189 voxels of 1 mm, skull-stripped). Classes
  (:data:`SEGMENTATION_CLASSES`): ``background`` outside the brain mask (the template's non-zero voxels), else the
  tissue of highest probability, ``csf``, ``gray_matter`` or ``white_matter``: a local intensity task.
- ``"lobes"``: CAT12's T1 template (an average of 555 IXI subjects, 0.5 mm, skull-stripped) resampled to its
  LPBA40 atlas's 1 mm grid (161 x 197 x 161), both from the deepmriprep wheel (its data files only), with the 56
  LPBA40 structures grouped by the atlas's own ID ranges into :data:`LOBE_CLASSES`: frontal, parietal, occipital
  and temporal lobes, the deep structures (insula, cingulate, caudate, putamen, hippocampus) and the cerebellum with
  the brainstem; ``background`` elsewhere (CSF included). Grey and white matter look the same in every lobe, so a
  pixel's class depends on where it lies in the brain: a task that needs global context.

- **2D**: every 1 mm axial slice, resampled in-plane to ``slice_spacing`` mm (block means of the T1 and of the
  probabilities; a pixel is brain when at least half of its block is) and cropped/padded to ``slice_size`` x
  ``slice_size`` around the brain (96 x 96 at 2 mm holds the whole brain). Slices with less than
  ``min_brain_2d`` brain are dropped.
- **3D**: crops of ``crop_size_3d`` voxels at the template's 1 mm, at random in-plane positions with at least
  ``min_brain_3d`` brain. A crop spans its whole slab's usable depth: a slab split of crops needs slabs at least
  as thick as a crop, and the brain is only 155 mm tall, so 3D keeps 1 mm (2 mm crops of 32+ voxels would leave
  two slabs).

No leakage: the head is cut into axial slabs (2D: ``slab_thickness_2d`` slices; 3D: the crop depth plus
``slab_gap_3d`` slices on each side); 2D slabs go to training, training, training, validation, test in turn
(:data:`~monai_prompt.data.demo.SLAB_SPLITS`), 3D slabs to training, validation, training, test
(:data:`SLAB_SPLITS_3D`: the brain fills four). The ``slab_gap`` slices at each slab border are never used, so
no voxel and no neighbouring slice is shared by two splits. Each item's ``group`` is its slab. Each image gets a
random gamma, contrast and Gaussian noise (as the classification demo), so no fixed threshold segments it.
The 2D ``unlabeled`` split (for self-supervised pre-training) holds ``unlabeled_copies`` re-jittered copies of
every training slice (the training slabs only).

Output (deterministic: the same bytes on every run), under ``out_dir``:
``2d/{images,labels}/<split>/z<Z>.nii.gz`` (with the slice's affine in MNI space; ``unlabeled`` images are
``z<Z>_<copy>``) and the same slices as PNG in ``2d_png/``,
``3d/{images,labels}/<split>/x<X>_y<Y>_z<Z>.nii.gz`` (crop origin in template voxels, 1 mm affine), and MONAI
decathlon datalists ``datalist_2d.json`` (NIfTI), ``datalist_2d_png.json`` (PNG) and ``datalist_3d.json``
(``labels`` names every class; paths relative to ``out_dir``).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from monai_prompt.data.demo import SLAB_SPLITS, jitter_intensity, mni152_folder, mni152_volumes, write_png

__all__ = ["LOBE_CLASSES", "SEGMENTATION_CLASSES", "SEGMENTATION_TASKS", "SLAB_SPLITS_3D", "SegmentationSource",
           "build_segmentation_demo", "cat12_lobes", "mni152_tissues", "tissue_labels"]

SEGMENTATION_CLASSES = ("background", "csf", "gray_matter", "white_matter")
LOBE_CLASSES = ("background", "frontal", "parietal", "occipital", "temporal", "deep", "cerebellum_brainstem")
#: LPBA40 label IDs of each :data:`LOBE_CLASSES` foreground class (the atlas numbers its structures by region:
#: 21-34 frontal, 41-50 parietal, 61-68 occipital, 81-92 temporal, 101-122 insula and cingulate, 161-166
#: caudate, putamen and hippocampus, 181-182 cerebellum and brainstem).
LPBA40_LOBES = ((21, 34), (41, 50), (61, 68), (81, 92), (101, 166), (181, 182))
#: split of 3D slab ``k`` is ``SLAB_SPLITS_3D[k % 4]`` (the brain fills four 36 mm slabs).
SLAB_SPLITS_3D = ("training", "validation", "training", "test")
_LABELLED = ("training", "validation", "test")
#: the deepmriprep release whose data files the ``lobes`` task reads (installed with ``pip install --no-deps``).
DEEPMRIPREP = "deepmriprep==0.3.0"


@dataclass(frozen=True)
class SegmentationSource:
    """A labelled volume to cut the demo sets from.

    Attributes:
        task: the task's name (a key of :data:`SEGMENTATION_TASKS`).
        t1: the uint8 T1 volume ``[X, Y, Z]`` (1 mm).
        brain: where a voxel counts as foreground, ``[X, Y, Z]`` (float 0/1).
        probabilities: per foreground class, ``[C - 1, X, Y, Z]``; a foreground voxel gets the most probable.
        affine: voxel to world (mm).
        classes: class names, background first.
        title: what the datalists call the task.
        reference: where the volumes come from.
        licence: their terms.
    """

    task: str
    t1: np.ndarray
    brain: np.ndarray
    probabilities: np.ndarray
    affine: np.ndarray
    classes: tuple[str, ...]
    title: str
    reference: str
    licence: str


def mni152_tissues() -> SegmentationSource:
    """The ``tissues`` task: nilearn's MNI152 template, csf / grey / white matter."""
    t1, probabilities = mni152_volumes()
    return SegmentationSource(
        "tissues", t1, (t1 > 0).astype(np.float32), probabilities, _template_affine(), SEGMENTATION_CLASSES,
        "MNI152 tissue segmentation",
        "MNI ICBM152 2009a nonlinear symmetric template (Fonov et al. 2009, 2011), as bundled in nilearn",
        "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, "
        "McGill University (permissive; keep this notice with copies). Read from nilearn (BSD-3-Clause).",
    )


def cat12_folder() -> Path:
    """deepmriprep's folder of CAT12 templates and atlases, found without importing deepmriprep."""
    spec = importlib.util.find_spec("deepmriprep")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the 'lobes' demo task reads the CAT12 template and LPBA40 atlas inside the deepmriprep wheel (data "
            f"files only): pip install --no-deps {DEEPMRIPREP}"
        )
    return Path(spec.submodule_search_locations[0]) / "data" / "templates"


def cat12_lobes() -> SegmentationSource:
    """The ``lobes`` task: CAT12's T1 template on the LPBA40 atlas grid, LPBA40 grouped into lobes."""
    import nibabel as nib
    from nibabel.processing import resample_from_to

    folder = cat12_folder()
    atlas = nib.load(folder / "lpba40.nii.gz")
    template = resample_from_to(nib.load(folder / "Template_05mm_bet.nii.gz"), atlas, order=1)
    # the file stores uint8 with a 1/255 scale: intensities in [0, 1], back to 0..255 as the tissues task's T1
    t1 = np.clip(np.round(255 * np.asanyarray(template.dataobj)), 0, 255).astype(np.uint8)
    ids = np.asanyarray(atlas.dataobj)
    lobes = np.stack([(ids >= low) & (ids <= high) for low, high in LPBA40_LOBES]).astype(np.float32)
    return SegmentationSource(
        "lobes", t1, lobes.max(0), lobes, atlas.affine, LOBE_CLASSES, "CAT12 template brain lobes",
        "CAT12 T1 template (Gaser et al. 2024, an IXI average) and the LPBA40 atlas (Shattuck et al. 2008), as "
        f"bundled in the deepmriprep wheel ({DEEPMRIPREP})",
        "deepmriprep: MIT. The CAT12 template and the LPBA40 atlas carry their upstream terms (LPBA40: LONI, for "
        "research use); read from the installed wheel, not redistributed here.",
    )


#: the demo segmentation tasks by name.
SEGMENTATION_TASKS = {"tissues": mni152_tissues, "lobes": cat12_lobes}


def tissue_labels(brain_fraction: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Class index per voxel: 0 where less than half of the voxel is brain, else 1 + the most probable class.

    Args:
        brain_fraction: fraction of each voxel inside the brain mask, ``[*spatial]``.
        probabilities: foreground class probabilities, ``[C - 1, *spatial]`` (tissues: csf, gray and white matter).

    Returns:
        uint8 labels in ``0..C - 1`` (e.g. :data:`SEGMENTATION_CLASSES`).
    """
    return np.where(brain_fraction >= 0.5, 1 + probabilities.argmax(0), 0).astype(np.uint8)


def _in_plane_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor`` x ``factor`` in-plane blocks of ``[..., X, Y, Z]`` (pixels that fill no block dropped)."""
    *lead, x, y, z = volume.shape
    x, y = x // factor, y // factor
    return volume[..., : x * factor, : y * factor, :].reshape(*lead, x, factor, y, factor, z).mean(axis=(-4, -2))


def _template_affine() -> np.ndarray:
    """The voxel-to-MNI affine of nilearn's 1 mm template files."""
    import nibabel as nib

    return nib.load(mni152_folder() / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz").affine


def _save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, path)


def _nifti_writer(affine: np.ndarray):
    """``write(path, array)`` saving NIfTI files with ``affine``."""
    return lambda path, array: _save_nifti(path, array, affine)


def _centred_crop(start: int, extent: int, size: int) -> int:
    """Origin of a ``size`` window centred on ``[start, start + extent)``."""
    return start + (extent - size) // 2


def _crop_2d(volume: np.ndarray, origin: tuple[int, int], size: int) -> np.ndarray:
    """``[..., X, Y, Z]`` cut to ``size`` x ``size`` in-plane from ``origin`` (zero-padded where it leaves)."""
    out = np.zeros((*volume.shape[:-3], size, size, volume.shape[-1]), dtype=volume.dtype)
    (x0, y0), (nx, ny) = origin, volume.shape[-3:-1]
    xs, ys = slice(max(x0, 0), min(x0 + size, nx)), slice(max(y0, 0), min(y0 + size, ny))
    out[..., xs.start - x0 : xs.stop - x0, ys.start - y0 : ys.stop - y0, :] = volume[..., xs, ys, :]
    return out


def _build_2d(
    out: Path,
    source: SegmentationSource,
    rng: np.random.Generator,
    size: int,
    spacing: int,
    thickness: int,
    gap: int,
    min_brain: float,
    unlabeled_copies: int,
    noise: float,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Any]]]]:
    """Write the 2D slices; return the NIfTI and the PNG datalist splits."""
    image = _in_plane_mean(source.t1.astype(np.float32), spacing)
    brain = _in_plane_mean(source.brain, spacing)
    labels = tissue_labels(brain, _in_plane_mean(source.probabilities, spacing))
    inside = np.argwhere(labels.any(axis=2))
    (x_lo, y_lo), (x_hi, y_hi) = inside.min(0), inside.max(0) + 1
    origin = (_centred_crop(x_lo, x_hi - x_lo, size), _centred_crop(y_lo, y_hi - y_lo, size))
    image, labels = _crop_2d(image, origin, size), _crop_2d(labels, origin, size)
    # pixel (i, j) of slice z is the centre of the 1 mm voxels spacing * (origin + (i, j)) + (spacing - 1) / 2, z
    grid = np.diag([spacing, spacing, 1.0, 1.0])
    grid[:2, 3] = [spacing * origin[0] + (spacing - 1) / 2, spacing * origin[1] + (spacing - 1) / 2]
    nifti: dict[str, list[dict[str, Any]]] = {split: [] for split in (*_LABELLED, "unlabeled")}
    png: dict[str, list[dict[str, Any]]] = {split: [] for split in nifti}
    for z in range(labels.shape[2]):
        slab, offset = divmod(z, thickness)
        if not gap <= offset < thickness - gap or (labels[..., z] > 0).mean() < min_brain:
            continue
        split = SLAB_SPLITS[slab % len(SLAB_SPLITS)]
        grey = np.round(image[..., z]).astype(np.uint8)
        slice_affine = source.affine @ grid @ _translation(0, 0, z)
        stems = [(split, f"z{z:03d}")]
        if split == "training":
            stems += [("unlabeled", f"z{z:03d}_{copy}") for copy in range(unlabeled_copies)]
        for item_split, stem in stems:
            arrays = {"image": jitter_intensity(grey, noise, rng)}
            if item_split != "unlabeled":
                arrays["label"] = labels[..., z]
            for items, folder, suffix, save in ((nifti, "2d", ".nii.gz", _nifti_writer(slice_affine)),
                                                (png, "2d_png", ".png", write_png)):
                paths = {key: f"{folder}/{key}s/{item_split}/{stem}{suffix}" for key in arrays}
                for key, array in arrays.items():
                    save(out / paths[key], array)
                items[item_split].append({**paths, "group": f"slab{slab:02d}"})
    return nifti, png


def _translation(x: float, y: float, z: float) -> np.ndarray:
    shift = np.eye(4)
    shift[:3, 3] = [x, y, z]
    return shift


def _build_3d(
    out: Path,
    source: SegmentationSource,
    rng: np.random.Generator,
    crop: tuple[int, int, int],
    gap: int,
    counts: tuple[int, int, int],
    min_brain: float,
    noise: float,
) -> dict[str, list[dict[str, Any]]]:
    """Write the 3D crops; return the datalist splits."""
    t1, labels = source.t1, tissue_labels(source.brain, source.probabilities)
    thickness = crop[2] + 2 * gap
    splits: dict[str, list[dict[str, Any]]] = {split: [] for split in _LABELLED}
    origins: dict[str, list[tuple[int, int, int, int]]] = {split: [] for split in _LABELLED}
    stride = 4
    for slab in range(labels.shape[2] // thickness):
        z0 = slab * thickness + gap
        brain = (labels[..., z0 : z0 + crop[2]] > 0).mean(axis=2)
        for x0 in range(0, labels.shape[0] - crop[0] + 1, stride):
            for y0 in range(0, labels.shape[1] - crop[1] + 1, stride):
                if brain[x0 : x0 + crop[0], y0 : y0 + crop[1]].mean() >= min_brain:
                    origins[SLAB_SPLITS_3D[slab % len(SLAB_SPLITS_3D)]].append((x0, y0, z0, slab))
    for split, count in zip(_LABELLED, counts):
        if len(origins[split]) < count:
            raise ValueError(f"only {len(origins[split])} 3D {split} crop positions; ask for fewer than {count}.")
        for index in np.sort(rng.choice(len(origins[split]), count, replace=False)):
            x0, y0, z0, slab = origins[split][index]
            window = (slice(x0, x0 + crop[0]), slice(y0, y0 + crop[1]), slice(z0, z0 + crop[2]))
            stem = f"x{x0:03d}_y{y0:03d}_z{z0:03d}"
            crop_affine = source.affine @ _translation(x0, y0, z0)
            image_path, label_path = (Path("3d", kind, split, f"{stem}.nii.gz") for kind in ("images", "labels"))
            _save_nifti(out / image_path, jitter_intensity(t1[window], noise, rng), crop_affine)
            _save_nifti(out / label_path, labels[window], crop_affine)
            splits[split].append({"image": str(image_path), "label": str(label_path), "group": f"slab{slab:02d}"})
    return splits


def _save_datalist(path: Path, splits: dict[str, list[dict[str, Any]]], dims: str, description: str,
                   source: SegmentationSource) -> Path:
    content = {
        "name": f"monai-prompt demo: {source.title} ({dims})",
        "description": description,
        "reference": source.reference,
        "licence": source.licence,
        "tensorImageSize": dims,
        "modality": {"0": "T1w MRI"},
        "labels": {str(i): name for i, name in enumerate(source.classes)},
        "numTraining": len(splits["training"]),
        **{split: items for split, items in splits.items() if items},
    }
    path.write_text(json.dumps(content, indent=1) + "\n")
    return path


def build_segmentation_demo(
    out_dir: str | os.PathLike,
    *,
    slice_size: int = 96,
    slice_spacing: int = 2,
    slab_thickness_2d: int = 10,
    slab_gap_2d: int = 2,
    min_brain_2d: float = 0.1,
    unlabeled_copies: int = 4,
    crop_size_3d: Sequence[int] = (64, 64, 32),
    slab_gap_3d: int = 2,
    crops_3d: Sequence[int] = (24, 6, 6),
    min_brain_3d: float = 0.3,
    noise: float = 0.03,
    seed: int = 0,
    task: str = "tissues",
) -> dict[str, Path]:
    """Write the 2D and 3D demo segmentation sets under ``out_dir``.

    Args:
        out_dir: output folder (created).
        slice_size: side of the 2D slices in voxels (a multiple of 16 fits UNETR's patch grid).
        slice_spacing: 2D pixel size in mm (a whole number: block means of the 1 mm template).
        slab_thickness_2d: 1 mm slices per 2D slab.
        slab_gap_2d: 2D slices left out at each slab border.
        min_brain_2d: least fraction of brain in a kept 2D slice.
        unlabeled_copies: re-jittered copies of each training slice in the 2D ``unlabeled`` split.
        crop_size_3d: 3D crop size in 1 mm voxels (x, y, z); the z size sets the slab thickness.
        slab_gap_3d: 1 mm slices left out at each 3D slab border.
        crops_3d: training, validation and test crops.
        min_brain_3d: least fraction of brain in a 3D crop.
        noise: standard deviation of the Gaussian noise on the [0, 1] image.
        seed: random seed of crop positions and intensity changes.
        task: ``"tissues"`` (MNI152 csf/grey/white matter) or ``"lobes"`` (CAT12 template, LPBA40 lobes).

    Returns:
        ``{"2d": datalist_2d.json, "2d_png": datalist_2d_png.json, "3d": datalist_3d.json}`` paths.
    """
    if task not in SEGMENTATION_TASKS:
        raise ValueError(f"unknown demo segmentation task {task!r}; use one of {sorted(SEGMENTATION_TASKS)}.")
    if not 0 <= 2 * slab_gap_2d < slab_thickness_2d:
        raise ValueError(f"slab_gap_2d={slab_gap_2d} leaves no slice of a {slab_thickness_2d}-slice slab.")
    if len(crop_size_3d) != 3 or len(crops_3d) != 3:
        raise ValueError(f"crop_size_3d {crop_size_3d} and crops_3d {crops_3d} need three values each.")
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    source = SEGMENTATION_TASKS[task]()
    rng = np.random.default_rng(seed)
    nifti, png = _build_2d(out, source, rng, slice_size, slice_spacing, slab_thickness_2d, slab_gap_2d, min_brain_2d,
                           unlabeled_copies, noise)
    crops = _build_3d(out, source, rng, tuple(crop_size_3d), slab_gap_3d, tuple(crops_3d), min_brain_3d, noise)
    classes = "/".join(source.classes)
    split_2d = (f"{slice_size}x{slice_size} axial T1 slices (every 1 mm slice, {slice_spacing} mm pixels) labelled "
                f"{classes}; split by {slab_thickness_2d}-slice axial slab (group), {slab_gap_2d} slice(s) left out "
                "at each slab border")
    return {
        "2d": _save_datalist(out / "datalist_2d.json", nifti, "2D", split_2d + " (NIfTI).", source),
        "2d_png": _save_datalist(out / "datalist_2d_png.json", png, "2D", split_2d + " (PNG).", source),
        "3d": _save_datalist(
            out / "datalist_3d.json", crops, "3D",
            f"{'x'.join(map(str, crop_size_3d))} crops of the 1 mm T1 template labelled {classes}; split by "
            f"{crop_size_3d[2] + 2 * slab_gap_3d}-slice axial slab (group), {slab_gap_3d} slices left out at each "
            "slab border.",
            source,
        ),
    }
