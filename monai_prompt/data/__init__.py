"""Data layer: classification datalists (folders, CSV, decathlon JSON), header checks, transforms, demo set."""

from monai_prompt.data.check import DataSummary, check_datalist
from monai_prompt.data.datalist import (
    SPLITS,
    UNLABELED,
    ClassificationDatalist,
    DataCheckError,
    datalist_from_csv,
    datalist_from_folder,
    datalist_from_json,
    read_datalist,
    split_items,
)
from monai_prompt.data.demo import DEMO_CLASSES, build_demo_data
from monai_prompt.data.headers import ImageHeader, read_header

_TRANSFORMS = ("MatchInputd", "classification_transforms", "match_input")


def __getattr__(name: str):
    """Import the MONAI transforms on first use, so the CLI's data commands start without importing MONAI."""
    if name in _TRANSFORMS:
        from monai_prompt.data import transforms

        return getattr(transforms, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
