"""MONAI-native prompt tuning and parameter-efficient fine-tuning of pre-trained Vision Transformers.

Importing the package also silences MONAI's notice that the GPU DICOM decoder (nvImageCodec) is missing: every
``LoadImage`` logs it (and warns once) on machines without it, where pydicom's own decoders read DICOM as before.
"""

import logging
import warnings
from importlib.metadata import version

__version__ = version("monai-prompt")

#: what MONAI's nvImageCodec pydicom plugin logs each time a ``LoadImage`` is built without the GPU decoder.
NVIMGCODEC_MISSING = "nvImageCodec is not available; skipping pydicom decoder plugin registration."

logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").addFilter(
    lambda record: record.getMessage() != NVIMGCODEC_MISSING
)
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register")
#: the start of what MONAI's ``Orientation.inverse`` warns on every 2D image it turns back (a 2D segmentation's
#: inference): it takes the axis codes of the image's 4 x 4 affine, a tuple of three, and rightly uses the first two.
#: The forward transform names its codes as a string, so its warning about a real mismatch still shows.
ORIENTATION_INVERSE_2D = r"axcodes \('\("
warnings.filterwarnings("ignore", message=ORIENTATION_INVERSE_2D, category=UserWarning)
