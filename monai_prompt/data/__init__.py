"""Data layer: classification datalists (folders, CSV, decathlon JSON) and their check, splits, header checks,
transforms, the demo set; segmentation datalists and their check are in :mod:`monai_prompt.data.segmentation`."""

from monai_prompt.data.check import (
    ClassificationSummary,
    check_classification_datalist,
    check_images,
    find_images,
)
from monai_prompt.data.datalist import (
    UNLABELED,
    ClassificationDatalist,
    DataCheckError,
    Datalist,
    datalist_from_csv,
    datalist_from_folder,
    datalist_from_json,
    read_classification_datalist,
)
from monai_prompt.data.demo import DEMO_CLASSES, build_demo_data
from monai_prompt.data.headers import PIL_CONVERSIONS, ImageHeader, channels_feed, read_header
from monai_prompt.data.segmentation import (
    SegmentationDatalist,
    SegmentationSummary,
    check_segmentation_datalist,
    is_segmentation_datalist,
    mask_dtype,
    mask_name_formatter,
    mask_root,
    mask_suffix,
    read_segmentation_datalist,
    whole_image_roi,
)
from monai_prompt.data.split import SPLITS, SplitOptions, split_items

_TRANSFORMS = ("MatchInputd", "NiftiMaskWriter", "RandLeftRightFlipd", "ResampledArgmaxd", "ScaleIntensityWindowd",
               "SliceOrientation", "SliceOrientationd", "SliceSpacingd", "classification_transforms",
               "intensity_window", "left_right_axis", "match_input", "refuse_slice_resampling", "slice_orientation")

__all__ = [
    "DEMO_CLASSES",
    "SPLITS",
    "UNLABELED",
    "ClassificationDatalist",
    "ClassificationSummary",
    "DataCheckError",
    "Datalist",
    "ImageHeader",
    "PIL_CONVERSIONS",
    "SegmentationDatalist",
    "SegmentationSummary",
    "SplitOptions",
    "build_demo_data",
    "check_classification_datalist",
    "check_images",
    "check_segmentation_datalist",
    "channels_feed",
    "datalist_from_csv",
    "datalist_from_folder",
    "datalist_from_json",
    "find_images",
    "is_segmentation_datalist",
    "mask_dtype",
    "mask_name_formatter",
    "mask_root",
    "mask_suffix",
    "read_classification_datalist",
    "read_header",
    "read_segmentation_datalist",
    "whole_image_roi",
    "split_items",
    *_TRANSFORMS,
]


def __getattr__(name: str):
    """Import the MONAI transforms on first use, so the CLI's data commands start without importing MONAI."""
    if name in _TRANSFORMS:
        from monai_prompt.data import transforms

        return getattr(transforms, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
