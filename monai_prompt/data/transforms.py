"""MONAI transform chain that turns a datalist item into a classification network input.

``classification_transforms(img_size, spatial_dims, in_channels, augment)`` returns a list for
``monai.transforms.Compose``, the deterministic transforms first and the random ones last (the bundles'
``train#deterministic_transforms`` and ``train#random_transforms``): load with MONAI's readers, channel first,
match the network's layout (:class:`MatchInputd`), scale intensities to [0, 1], resize to the model size, make the
image float32 and the label a tensor, then optionally augment. Two transforms are written here: :class:`MatchInputd`
(MONAI has no transform that drops the singleton axis of a 2D DICOM or NIfTI slice, reads PIL palette/CMYK/grey+alpha
images as their colours and converts between grey and colour channels, with an error that names the file) and
:class:`RandLeftRightFlipd` (MONAI's ``RandFlipd`` flips a fixed array axis, which is the patient's left-right axis
only in some orientations). The segmentation bundles' postprocessing adds :class:`ResampledArgmaxd` (the argmax of a
softmax resampled a few classes at a time), :class:`NiftiMaskWriter` (masks that keep their input's NIfTI codes) and
:class:`ScaleIntensityWindowd` (min-max, or a fixed intensity window such as a CT's, recorded by training).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection, PathLike
from monai.data import ImageWriter, MetaTensor, NibabelWriter
from monai.data.meta_obj import get_track_meta
from monai.data.utils import to_affine_nd
from monai.transforms import (
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientation,
    Orientationd,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    Resized,
    ScaleIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SqueezeDim,
    ToTensord,
    Transform,
)
from monai.transforms.spatial.functional import orientation
from monai.utils import MetaKeys, TraceKeys, convert_to_numpy, convert_to_tensor, ensure_tuple_rep

from monai_prompt.data.headers import PIL_CONVERSIONS, channels_feed

__all__ = ["MatchInputd", "NiftiMaskWriter", "RandLeftRightFlipd", "ResampledArgmaxd", "ScaleIntensityWindowd",
           "SliceOrientation", "SliceOrientationd", "SliceSpacingd", "classification_transforms", "intensity_window",
           "left_right_axis", "match_input", "refuse_slice_resampling", "slice_orientation"]


def match_input(image: torch.Tensor, spatial_dims: int, channels: int, convert_modes: bool = True) -> torch.Tensor:
    """Bring a channel-first image to ``channels`` channels and ``spatial_dims`` spatial dimensions.

    With ``convert_modes``, an image MONAI's PIL reader read in a mode of :data:`PIL_CONVERSIONS` (a palette PNG, whose
    indices it reads; a CMYK JPEG; grey+alpha) is read again as PIL converts it (RGB, RGBA or grey). Singleton spatial
    dimensions are dropped while there are more than ``spatial_dims``, the last first (ITK reads a 2D DICOM as
    ``[C, W, H, 1]``; a coronal or sagittal NIfTI slice is ``1 x Y x Z`` or ``X x 1 x Z``; the affine's columns follow
    the axes). The metadata that readers record in different shapes is brought to one (``spatial_shape`` and
    ``spacing`` per spatial dim, 4 x 4 affines), so that a DICOM or MetaImage batches with PNGs. One channel is repeated
    to ``channels``; three or four colour channels are averaged to one (alpha dropped) or cut to three
    (:func:`channels_feed`).

    Args:
        image: ``[C, *spatial]`` image (a MONAI ``MetaTensor`` keeps its metadata).
        spatial_dims: 2 or 3.
        channels: the network's input channels.
        convert_modes: convert the PIL modes above (``False`` for a label map: a palette PNG's indices are its
            classes).

    Raises:
        ValueError: naming the file when the image has other dimensions or channels the rules above cannot map.
    """
    name = getattr(image, "meta", {}).get("filename_or_obj", "image")
    if convert_modes and isinstance(image, MetaTensor) and image.meta.get("mode") in PIL_CONVERSIONS:
        image = _convert_mode(image)
    image = _squeeze_singletons(image, spatial_dims)
    if isinstance(image, MetaTensor):
        image.meta = _uniform_meta(image.meta, image.ndim - 1)
    if image.ndim - 1 != spatial_dims:
        raise ValueError(
            f"{name}: shape {tuple(image.shape)} (channel first) has {image.ndim - 1} spatial dims but the network is "
            f"{spatial_dims}D; set spatial_dims={image.ndim - 1} or give {spatial_dims}D images."
        )
    found = image.shape[0]
    if not channels_feed(found, channels):
        raise ValueError(
            f"{name}: {found} channels cannot feed a {channels}-channel network; set in_channels={found}."
        )
    if found == channels:
        return image
    if found == 1:
        return image.repeat(channels, *[1] * spatial_dims)
    if channels == 1:
        return image[:3].mean(dim=0, keepdim=True)
    return image[:3]


def _convert_mode(image: MetaTensor) -> MetaTensor:
    """``image``, read by MONAI's PIL reader in a mode of :data:`PIL_CONVERSIONS`, read again from its file as PIL
    converts it, in the reader's layout (``[C, W, H]``) and dtype, with its metadata."""
    from PIL import Image

    mode, path = image.meta["mode"], image.meta.get("filename_or_obj")
    target = PIL_CONVERSIONS[mode]
    try:
        with Image.open(path) as pil:
            array = np.asarray(pil.convert(target))
    except (OSError, TypeError, ValueError) as err:
        raise ValueError(
            f"{path}: a PIL {mode!r} image, which is read as {target} from its file, could not be read again "
            f"({type(err).__name__}: {err}); convert it to {target} (PIL: Image.open(f).convert({target!r}))."
        ) from None
    array = np.moveaxis(array, 0, 1)  # MONAI's PIL reader: columns first
    array = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
    if array.shape[1:] != tuple(image.shape[1:]):
        raise ValueError(
            f"{path}: a PIL {mode!r} image of shape {tuple(image.shape)} (channel first) where its file gives "
            f"{array.shape[1:]}; convert modes (MatchInputd) before any transform that changes the shape."
        )
    converted = MetaTensor(torch.as_tensor(np.array(array), dtype=image.dtype), meta={**image.meta, "mode": target})
    converted.applied_operations = image.applied_operations
    return converted


def _squeeze_singletons(image: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """``image`` without singleton spatial dims, the last first, while it has more than ``spatial_dims``; a
    MetaTensor's affine keeps its 4 x 4 shape, the column of a dropped axis moved last."""
    while image.ndim - 1 > spatial_dims:
        singletons = [axis for axis in range(1, image.ndim) if image.shape[axis] == 1]
        if not singletons:
            break
        axis = singletons[-1]
        if axis != image.ndim - 1:  # move it last, with its affine column and spatial_shape entry
            order = [0, *[a for a in range(1, image.ndim) if a != axis], axis]
            moved = image.permute(order)
            if isinstance(image, MetaTensor):
                spatial = [a - 1 for a in order[1:]]
                meta = dict(image.meta)
                affine = image.affine.clone()
                if affine.ndim == 2 and affine.shape[1] > len(spatial):
                    affine[:, : len(spatial)] = affine[:, spatial]
                    meta[MetaKeys.AFFINE] = affine
                if np.ndim(meta.get("spatial_shape")) == 1 and len(meta["spatial_shape"]) == len(spatial):
                    meta["spatial_shape"] = np.asarray(meta["spatial_shape"])[spatial]
                moved = MetaTensor(moved.as_tensor(), meta=meta, applied_operations=image.applied_operations)
            image = moved
        image = SqueezeDim(dim=-1, update_meta=False)(image)  # keep the 4 x 4 affine other 2D readers give
    return image


def _uniform_meta(meta: Mapping[str, Any], spatial_dims: int) -> dict[str, Any]:
    """``meta`` with the entries every reader records recorded in one shape, so that images of different formats
    batch (MONAI collates the metadata keys they share): ``spatial_shape`` and ``spacing`` with one value per spatial
    dim (ITK's 2D DICOM has three), affines at least 4 x 4 (ITK's 2D MetaImage/NRRD/PNG: 3 x 3; PIL's and nibabel's
    2D images: 4 x 4)."""
    meta = dict(meta)
    for key in ("spatial_shape", "spacing"):
        if key in meta and np.ndim(meta[key]) == 1:
            meta[key] = np.asarray(meta[key])[:spatial_dims]
    for key in (MetaKeys.AFFINE, MetaKeys.ORIGINAL_AFFINE):
        if key in meta and np.ndim(meta[key]) == 2 and len(meta[key]) < 4:
            meta[key] = to_affine_nd(3, meta[key])
    return meta


class MatchInputd(MapTransform):
    """Dictionary version of :func:`match_input`.

    Args:
        keys: image keys.
        spatial_dims: the network's spatial dims.
        channels: the network's input channels.
        allow_missing_keys: skip absent keys.
        convert_modes: convert PIL palette/CMYK/grey+alpha images (:func:`match_input`); ``None``: for every key but
            ``label`` (a palette PNG label map holds class indices).
    """

    def __init__(
        self,
        keys: KeysCollection,
        spatial_dims: int,
        channels: int,
        allow_missing_keys: bool = False,
        convert_modes: bool | None = None,
    ):
        super().__init__(keys, allow_missing_keys)
        self.spatial_dims = spatial_dims
        self.channels = channels
        self.convert_modes = convert_modes

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            convert = key != "label" if self.convert_modes is None else self.convert_modes
            d[key] = match_input(d[key], self.spatial_dims, self.channels, convert_modes=convert)
        return d


def left_right_axis(image: torch.Tensor, spatial_axis: int = 0) -> int | None:
    """The spatial axis of ``image`` that a left-right mirror flips.

    An image whose reader recorded its orientation (NIfTI, DICOM: MONAI keeps its ``original_affine``): the axis
    whose direction in the image's affine runs mostly along the world x axis, the patient's left-right (in RAS and
    LPS alike), or ``None`` when no axis of the image does (a sagittal slice has no left-right axis to mirror). An
    image without one (PNG, JPEG, a plain tensor): ``spatial_axis``; MONAI reads PNG/JPEG width first, so 0 mirrors
    them horizontally.

    Args:
        image: a channel-first image (a MONAI ``MetaTensor`` carries its affine).
        spatial_axis: the axis for an image without a recorded orientation.
    """
    if not isinstance(image, MetaTensor) or MetaKeys.ORIGINAL_AFFINE not in image.meta:
        return spatial_axis
    affine = image.affine.double()
    directions = affine[: affine.shape[0] - 1, : image.ndim - 1].abs()  # world axes x spatial axes
    along_x = [axis for axis in range(directions.shape[1]) if int(directions[:, axis].argmax()) == 0]
    if not along_x:
        return None
    return max(along_x, key=lambda axis: float(directions[0, axis] / directions[:, axis].norm()))


class RandLeftRightFlipd(RandFlipd):
    """MONAI ``RandFlipd`` along the patient's left-right axis: :func:`left_right_axis` of each image (from its
    affine for NIfTI/DICOM, ``spatial_axis`` for PNG/JPEG; no flip where the image has no left-right axis).

    Args:
        keys: image keys.
        prob: probability of the mirror.
        spatial_axis: the axis for images without a recorded orientation (PNG, JPEG).
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self, keys: KeysCollection, prob: float = 0.5, spatial_axis: int = 0, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, prob, spatial_axis, allow_missing_keys)
        self.spatial_axis = spatial_axis

    def __call__(self, data: Mapping[Hashable, torch.Tensor], lazy: bool | None = None) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        chosen, lazy_ = self._do_transform, self.lazy if lazy is None else lazy
        for key in self.key_iterator(d):
            axis = left_right_axis(d[key], self.spatial_axis)
            self._do_transform = chosen and axis is not None  # what push_transform records
            if self._do_transform:
                self.flipper.spatial_axis = axis
                d[key] = self.flipper(d[key], lazy=lazy_)
            else:
                d[key] = convert_to_tensor(d[key], track_meta=get_track_meta())
            self.push_transform(d[key], replace=True, lazy=lazy_)
        self._do_transform = chosen
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            if self.pop_transform(d[key])[TraceKeys.DO_TRANSFORM]:
                self.flipper.spatial_axis = left_right_axis(d[key], self.spatial_axis)  # a flip keeps the axis
                with self.flipper.trace_transform(False):
                    d[key] = self.flipper(d[key])
        return d


def slice_orientation(affine: np.ndarray | torch.Tensor, spatial_dims: int) -> np.ndarray | None:
    """The nibabel orientation of a 2D slice whose 4 x 4 affine lies in a coronal or sagittal plane (its two axes run
    mostly along world x and z, or y and z), each axis given the rank of its world axis among the two and its
    direction; ``None`` for an axial slice or a volume, which MONAI's ``Orientation`` turns itself. MONAI orients a 2D
    image by the affine's world x and y rows only, where such a slice has no axis (nibabel's "Unable to find out axis
    1.0 in start_ornt").

    Args:
        affine: the image's affine.
        spatial_dims: the image's spatial dims.
    """
    affine = convert_to_numpy(affine, wrap_sequence=True).astype(np.float64)
    if spatial_dims != 2 or affine.shape != (4, 4):
        return None
    world = nib.orientations.io_orientation(affine[:, [0, 1, 3]])  # the slice's axes in the three world axes
    if set(world[:, 0].tolist()) == {0.0, 1.0}:
        return None
    world[:, 0] = np.argsort(np.argsort(world[:, 0]))
    return world


class SliceOrientation(Orientation):
    """MONAI's ``Orientation`` that also turns a 2D slice of a coronal or sagittal plane (:func:`slice_orientation`):
    its axes ordered and flipped as their world axes run, R before A before S, each increasing (the ``RAS`` order the
    bundles turn every image to), and back in :meth:`inverse`. Axial slices and volumes are MONAI's."""

    def __call__(self, data_array: torch.Tensor, lazy: bool | None = None) -> torch.Tensor:
        meta = isinstance(data_array, MetaTensor)
        plane = slice_orientation(data_array.affine, data_array.ndim - 1) if meta else None
        if plane is None:
            return super().__call__(data_array, lazy)
        spatial = nib.orientations.ornt_transform(plane, np.array([[0, 1], [1, 1]]))
        return orientation(data_array, convert_to_numpy(data_array.peek_pending_affine()), spatial,
                           lazy=self.lazy if lazy is None else lazy, transform_info=self.get_transform_info())

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        original = self.get_most_recent_transform(data)[TraceKeys.EXTRA_INFO]["original_affine"]
        plane = slice_orientation(original, data.ndim - 1)
        if plane is None:
            return super().inverse(data)
        self.pop_transform(data)
        with self.trace_transform(False):
            return orientation(data, convert_to_numpy(data.affine),
                               nib.orientations.ornt_transform(np.array([[0, 1], [1, 1]]), plane),
                               lazy=False, transform_info=self.get_transform_info())


class SliceOrientationd(Orientationd):
    """MONAI's ``Orientationd`` with :class:`SliceOrientation`: 2D slices of any plane are turned (the segmentation
    bundles' orientation to RAS), and turned back by ``Invertd``. Arguments: ``Orientationd``'s."""

    def __init__(
        self,
        keys: KeysCollection,
        axcodes: str | None = None,
        as_closest_canonical: bool = False,
        labels: Sequence[tuple[str, str]] | None = None,
        allow_missing_keys: bool = False,
        lazy: bool = False,
    ):
        super().__init__(keys, axcodes, as_closest_canonical, labels, allow_missing_keys, lazy)
        self.ornt_transform = SliceOrientation(axcodes, as_closest_canonical, labels, lazy)


def refuse_slice_resampling(image: torch.Tensor, name: str | os.PathLike | None = None) -> None:
    """Raise, naming the file, for a 2D slice of a coronal or sagittal plane (:func:`slice_orientation`), which
    ``pixdim`` cannot resample: MONAI's ``Spacing`` resamples a 2D image in the world x-y plane, where such a slice has
    no second axis (numpy's "Matrix is not positive definite").

    Args:
        image: a channel-first ``MetaTensor``.
        name: the file named (default: the image's ``filename_or_obj``).
    """
    if not isinstance(image, MetaTensor) or slice_orientation(image.affine, image.ndim - 1) is None:
        return
    axes = "xyz"[int(nib.orientations.io_orientation(image.affine.numpy()[:, [0, 1, 3]])[0, 0])]
    raise ValueError(
        f"{name or image.meta.get('filename_or_obj', 'image')}: a 2D slice of a coronal or sagittal plane (its axes "
        f"run along world {axes} and z), which pixdim cannot resample (MONAI resamples 2D images in the world x-y "
        "plane); leave pixdim unset (the slices' own spacing), or resample the slices before training."
    )


class SliceSpacingd(Spacingd):
    """MONAI's ``Spacingd`` that refuses a 2D slice of a coronal or sagittal plane with the file and the fix
    (:func:`refuse_slice_resampling`). Arguments: ``Spacingd``'s."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor], lazy: bool | None = None) -> dict[Hashable, torch.Tensor]:
        for key in self.key_iterator(dict(data)):
            refuse_slice_resampling(data[key])
        return super().__call__(data, lazy)


class ScaleIntensityWindowd(MapTransform):
    """Image intensities to [0, 1]: each image's own minimum and maximum (``intensity_range`` ``None``: MONAI's
    ``ScaleIntensityd``), or one fixed window ``[low, high]`` for every image, clipped outside it (MONAI's
    ``ScaleIntensityRanged`` with ``clip=True``). A window keeps a CT's Hounsfield units meaning the same in every
    image (bone at 226 HU lands where it does in training whatever an image's own extremes), where min-max maps it
    elsewhere in each crop, slab or whole volume.

    Args:
        keys: image keys.
        intensity_range: ``[low, high]`` in the images' units (e.g. ``[-1000, 2000]`` for bone in CT), or ``None``.
        allow_missing_keys: skip absent keys.

    Raises:
        ValueError: ``intensity_range`` is not two finite numbers, low below high.
    """

    def __init__(
        self, keys: KeysCollection, intensity_range: Sequence[float] | None = None, allow_missing_keys: bool = False
    ):
        super().__init__(keys, allow_missing_keys)
        self.intensity_range = intensity_window(intensity_range)
        if self.intensity_range is None:
            self.scale: MapTransform = ScaleIntensityd(keys, minv=0.0, maxv=1.0, allow_missing_keys=allow_missing_keys)
        else:
            low, high = self.intensity_range
            self.scale = ScaleIntensityRanged(keys, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True,
                                              allow_missing_keys=allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        return self.scale(data)


def intensity_window(value: Sequence[float] | str | None) -> list[float] | None:
    """The ``intensity_range`` setting as ``[low, high]``, or ``None`` (also the command line's ``none``/``null``,
    which reach the config as strings): what :class:`ScaleIntensityWindowd` applies and the training record keeps;
    the bundles check it before the run folder is touched.

    Args:
        value: the setting as given.

    Raises:
        ValueError: not two finite numbers, low below high, nor none, naming the setting with an example.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
        return None
    try:
        low, high = (float(bound) for bound in value)
    except (TypeError, ValueError):
        low = high = math.nan
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(
            f"intensity_range {value!r}: give [low, high], low below high, in the images' units (CT Hounsfield "
            "units: e.g. --intensity_range \"[-1000, 2000]\" for bone, \"[-160, 240]\" for soft tissue), or none to "
            "scale each image by its own minimum and maximum."
        )
    return [low, high]


class ResampledArgmaxd(MapTransform):
    """The argmax over the channels (classes) of ``keys`` after ``transform`` resamples them, a few channels at a
    time: ``AsDiscreted(argmax=True)`` after ``transform`` with the resampled probabilities of ``channels`` classes
    in memory at once, not of every class (``Invertd`` resamples in float64: 6.6 GB for 117 classes at
    181 x 217 x 181 voxels). Resampling moves each channel on its own, so the result is the same: the largest
    probability's class, the first of equal ones, as a float32 ``MetaTensor`` with the metadata ``transform`` gives.

    Args:
        keys: the probabilities, channel first.
        transform: a dictionary transform that resamples ``keys`` (``Invertd``, ``ResampleToMatchd``); it is given
            the data with a slice of the channels in their place.
        channels: the channels resampled at once.
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        transform: Callable[[Mapping[Hashable, Any]], Mapping[Hashable, Any]],
        channels: int = 8,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.transform = transform
        self.channels = channels

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            probabilities, best, argmax = d[key], None, None
            for start in range(0, len(probabilities), self.channels):
                part = self.transform({**d, key: probabilities[start:start + self.channels]})[key]
                index = torch.argmax(part, dim=0, keepdim=True)
                largest = torch.gather(part, 0, index)
                if best is None:
                    best, argmax = largest, index
                else:  # strictly larger: a tie keeps the earlier class, as torch.argmax does
                    better = largest > best
                    best, argmax = torch.where(better, largest, best), torch.where(better, index + start, argmax)
            d[key] = argmax.to(torch.float32)
        return d


class NiftiMaskWriter(NibabelWriter):
    """MONAI's ``NibabelWriter`` that keeps the sform and qform codes of the image a mask was predicted for (NIfTI
    inputs: 2 aligned, 4 MNI, ... which FSL and others compare); ``NibabelWriter`` writes both as 1 (scanner).
    Where the metadata has neither code set (DICOM and other ITK inputs), both are 1, as ``NibabelWriter`` writes
    them. Without ``resample`` (the bundles' masks) the mask is written as it is, with its affine: MONAI's writer
    resamples it onto its own grid, which inverts the affine's world x and y rows (singular for a 2D slice of a
    coronal or sagittal plane)."""

    def set_metadata(self, meta_dict: Mapping | None = None, resample: bool = True, **options: Any) -> None:
        if resample:
            super().set_metadata(meta_dict, resample, **options)
        else:
            _, affine, _ = self.get_meta_info(meta_dict)
            if self.output_dtype is None and hasattr(self.data_obj, "dtype"):
                self.output_dtype = self.data_obj.dtype
            self.affine = None if affine is None else convert_to_numpy(affine)
        codes = [int(np.asarray((meta_dict or {}).get(f"{form}_code", 0))) for form in ("sform", "qform")]
        self.codes = codes if any(codes) else [1, 1]

    def write(self, filename: PathLike, verbose: bool = False, **obj_kwargs: Any) -> None:
        """Save the mask as :meth:`NibabelWriter.write` does, with the input's codes (:meth:`set_metadata`)."""
        ImageWriter.write(self, filename, verbose=verbose)
        image = self.create_backend_obj(self.data_obj, affine=self.affine, dtype=self.output_dtype, **obj_kwargs)
        affine = to_affine_nd(3, np.eye(4) if self.affine is None else convert_to_numpy(self.affine))
        image.set_sform(affine, code=self.codes[0])
        image.set_qform(affine, code=self.codes[1])
        nib.save(image, filename)


def classification_transforms(
    img_size: int | Sequence[int],
    spatial_dims: int = 2,
    in_channels: int = 1,
    augment: bool = False,
    multi_label: bool = False,
    track_meta: bool = True,
    image_key: str = "image",
    label_key: str = "label",
    intensity_range: Sequence[float] | None = None,
) -> list[Transform]:
    """Transforms from a datalist item ``{"image": path, "label": ...}`` to network input and target.

    Load (MONAI ``LoadImaged``: PIL, ITK for DICOM files/series, nibabel), channel first, :class:`MatchInputd`,
    scale to [0, 1] (min-max, or the window ``intensity_range``: :class:`ScaleIntensityWindowd`), resize to
    ``img_size`` (anti-aliased when shrinking), a float32 image and the label as a tensor (``long`` index, or
    ``float32`` multi-hot; a missing label, unlabelled data, is allowed); then, with ``augment``, a random left-right
    mirror (:class:`RandLeftRightFlipd`), a small random rotation/scaling and random contrast. The bundles spell out
    the same chain as ``train#deterministic_transforms`` and ``train#random_transforms``.

    Args:
        img_size: the network's input size, one int or one per spatial dim.
        spatial_dims: 2 or 3.
        in_channels: the network's input channels.
        augment: add the random training augmentations.
        multi_label: labels are multi-hot lists.
        track_meta: keep MONAI metadata (file name, affine) on the image (images of different formats batch:
            :class:`MatchInputd` brings their metadata to one shape); False drops it (plain tensors, or with
            ``augment`` MetaTensors with default metadata), and the random mirror then has no orientation to read
            and flips axis 0.
        image_key: key of the image path.
        label_key: key of the label.
        intensity_range: ``[low, high]`` scaled to [0, 1] for every image, clipped (a CT's HU window), or ``None``:
            each image's own minimum and maximum.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims={spatial_dims}; use 2 or 3.")
    size = ensure_tuple_rep(img_size, spatial_dims)
    chain: list[Transform] = [
        LoadImaged(keys=image_key, image_only=True),
        EnsureChannelFirstd(keys=image_key),
        MatchInputd(keys=image_key, spatial_dims=spatial_dims, channels=in_channels),
        ScaleIntensityWindowd(keys=image_key, intensity_range=intensity_range),
        Resized(keys=image_key, spatial_size=size, mode="bilinear" if spatial_dims == 2 else "trilinear",
                anti_aliasing=True),
        EnsureTyped(keys=image_key, dtype=torch.float32, track_meta=track_meta),
        ToTensord(keys=label_key, dtype=torch.float32 if multi_label else torch.long, track_meta=False,
                  allow_missing_keys=True),
    ]
    if augment:
        angle = math.pi / 12
        chain += [
            RandLeftRightFlipd(keys=image_key, prob=0.5, spatial_axis=0),
            RandAffined(keys=image_key, prob=0.5, rotate_range=angle if spatial_dims == 2 else (angle,) * 3,
                        scale_range=0.1, padding_mode="zeros"),
            RandAdjustContrastd(keys=image_key, prob=0.3, gamma=(0.7, 1.5)),
        ]
    return chain
