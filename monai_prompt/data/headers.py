"""Cheap image headers: channel count and spatial shape without decoding pixel data.

The training pipeline reads images with MONAI's ``LoadImage`` (ITK, pydicom, nibabel, PIL readers). Checking
a whole dataset that way decodes every pixel, so :func:`read_header` reads only what each format keeps in its
header, with the libraries those readers use: PIL for PNG/JPEG/TIFF/BMP, nibabel for NIfTI, pydicom for DICOM
files and series folders, ITK ``ImageIO`` for anything else ITK knows (MetaImage, NRRD, ...). The channel
count follows the transforms' reading of the same file (a NIfTI's 4th/5th dimensions are channels; a DICOM's
``SamplesPerPixel``; a PIL image's bands once :data:`PIL_CONVERSIONS` converted its mode, as
:class:`~monai_prompt.data.MatchInputd` does). :func:`channels_feed` is the rule by which the transforms bring an
image's channels to the network's ``in_channels``; the data check applies the same rule.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "IMAGE_SUFFIXES",
    "PIL_CONVERSIONS",
    "ImageHeader",
    "channels_feed",
    "image_suffix",
    "is_dicom_file",
    "is_image_file",
    "pil_channels",
    "read_header",
]

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
#: file suffixes taken as images when a folder is listed (extension-less DICOM files are found by their magic).
IMAGE_SUFFIXES = PIL_SUFFIXES + NIFTI_SUFFIXES + DICOM_SUFFIXES + ITK_SUFFIXES
#: PIL modes whose bands MONAI's PIL reader would hand over as other pixels than the image shows (a palette PNG's
#: indices, a CMYK JPEG's ink bands taken as RGBA, a grey+alpha PNG's alpha as a second channel), and the mode
#: :class:`~monai_prompt.data.MatchInputd` converts each to (with PIL's ``Image.convert``) for training and inference.
PIL_CONVERSIONS = {
    "P": "RGB",
    "PA": "RGBA",
    "LA": "L",
    "CMYK": "RGB",
    "YCbCr": "RGB",
    "LAB": "RGB",
    "HSV": "RGB",
    "RGBX": "RGB",
    "RGBa": "RGBA",
}


@dataclass(frozen=True)
class ImageHeader:
    """What a header tells about an image.

    Attributes:
        format: ``pil``, ``nifti``, ``dicom``, ``dicom-series`` or ``itk``.
        channels: channels MONAI's ``EnsureChannelFirst`` will produce (PIL images: after their mode is converted
            by :data:`PIL_CONVERSIONS`).
        spatial_shape: spatial size (a single-frame DICOM counts as 2D).
    """

    format: str
    channels: int
    spatial_shape: tuple[int, ...]


def image_suffix(path: str | os.PathLike) -> str:
    """Lower-case suffix of ``path``, with ``.nii.gz`` kept whole."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def channels_feed(found: int, channels: int) -> bool:
    """Whether the transforms (:func:`~monai_prompt.data.match_input`) bring an image of ``found`` channels to a
    ``channels``-channel network: the same count, one channel repeated, three or four (RGB, RGBA) averaged to one
    (alpha dropped), or four cut to three (alpha dropped).

    Args:
        found: the image's channels.
        channels: the network's ``in_channels``.
    """
    return found == channels or found == 1 or (found in (3, 4) and channels == 1) or (found == 4 and channels == 3)


def pil_channels(mode: str) -> int:
    """The channels the transforms read from a PIL image of ``mode``: its bands once :data:`PIL_CONVERSIONS`
    converted it.

    Args:
        mode: the PIL mode (``"L"``, ``"P"``, ``"RGBA"``, ...).
    """
    from PIL import Image

    return Image.getmodebands(PIL_CONVERSIONS.get(mode, mode))


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True for a ``.dcm``/``.dicom`` file or any file with the ``DICM`` magic at byte 128."""
    if image_suffix(path) in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def is_image_file(path: str | os.PathLike) -> bool:
    """True for a non-hidden file with an image suffix (or DICOM magic)."""
    path = Path(path)
    if not path.is_file() or path.name.startswith("."):
        return False
    return image_suffix(path) in IMAGE_SUFFIXES or is_dicom_file(path)


def read_header(path: str | os.PathLike) -> ImageHeader:
    """Read the header of an image file or DICOM series folder.

    Args:
        path: image file, or a folder holding the DICOM files of one series.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not an image this package can read, with the reason.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    if path.is_dir():
        return _dicom_series_header(path)
    suffix = image_suffix(path)
    if suffix in PIL_SUFFIXES:
        return _pil_header(path)
    if suffix in NIFTI_SUFFIXES:
        return _nifti_header(path)
    if is_dicom_file(path):
        return _dicom_header(path)
    return _itk_header(path)


def _pil_header(path: Path) -> ImageHeader:
    from PIL import Image

    with Image.open(path) as image:
        return ImageHeader("pil", pil_channels(image.mode), tuple(image.size))


def _nifti_header(path: Path) -> ImageHeader:
    import nibabel as nib

    at = path.name.lower().rindex(".nii")
    if path.name[at:at + 4] not in (".nii", ".NII"):  # nibabel looks for the lower-case name: "file not found"
        fixed = path.name[:at] + path.name[at:].lower()
        raise ValueError(
            f"nibabel reads NIfTI files named .nii/.nii.gz in lower or upper case, not {path.name[at:]}: rename "
            f"{path.name} to {fixed}"
        )
    shape = tuple(int(s) for s in nib.load(path).header.get_data_shape())
    return ImageHeader("nifti", math.prod(shape[3:]), shape[:3])


def _dicom_dataset(path: Path):
    import pydicom

    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    if "Rows" not in dataset or "Columns" not in dataset:
        raise ValueError("DICOM file without image (no Rows/Columns); it may be a report, SR or RT structure set.")
    return dataset


def _dicom_header(path: Path) -> ImageHeader:
    dataset = _dicom_dataset(path)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    shape = (int(dataset.Columns), int(dataset.Rows)) + ((frames,) if frames > 1 else ())
    return ImageHeader("dicom", int(dataset.get("SamplesPerPixel", 1)), shape)


def _dicom_series_header(folder: Path) -> ImageHeader:
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_dicom_file(p))
    if not files:
        raise ValueError("folder holds no DICOM files; a folder is read as one DICOM series.")
    layouts, unreadable = set(), []
    for file in files:
        try:
            dataset = _dicom_dataset(file)
        except Exception as err:  # noqa: BLE001 - every failure is reported with its file name
            unreadable.append(f"{file.name} ({err})")
            continue
        layouts.add((int(dataset.Columns), int(dataset.Rows), int(dataset.get("SamplesPerPixel", 1))))
    if unreadable:
        raise ValueError(f"unreadable slices: {', '.join(unreadable)}")
    if len(layouts) > 1:
        raise ValueError(f"slices differ in (columns, rows, samples per pixel): {sorted(layouts)}")
    columns, rows, channels = layouts.pop()
    return ImageHeader("dicom-series", channels, (columns, rows, len(files)))


def _itk_header(path: Path) -> ImageHeader:
    import itk

    image_io = itk.ImageIOFactory.CreateImageIO(str(path), itk.CommonEnums.IOFileMode_ReadMode)
    if image_io is None:
        raise ValueError(f"not an image format ITK can read (suffixes read: {', '.join(IMAGE_SUFFIXES)}).")
    image_io.SetFileName(str(path))
    image_io.ReadImageInformation()
    shape = tuple(int(image_io.GetDimensions(i)) for i in range(image_io.GetNumberOfDimensions()))
    return ImageHeader("itk", int(image_io.GetNumberOfComponents()), shape)
