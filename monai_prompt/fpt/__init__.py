"""FPT and FPT+: fine-grained prompt tuning with a frozen high-resolution LPM and a small side ViT."""

from monai_prompt.fpt.cache import (
    CACHE_FORMAT,
    STORAGE_DTYPES,
    FPTCacheError,
    FPTFeatureCache,
    cache_identity,
    content_key,
)
from monai_prompt.fpt.config import (
    FPT_VARIANTS,
    PAPER_LPM_IMG_SIZE,
    PAPER_SIDE_IMG_SIZE,
    FPTConfig,
    default_side_img_size,
    resolve_layers,
)
from monai_prompt.fpt.fusion import PromptFusion
from monai_prompt.fpt.grid_lpm import SAMLPM, TinyViTLPM
from monai_prompt.fpt.lpm import FrozenLPM, LPMExtractor, keep_top_tokens, select_important_tokens
from monai_prompt.fpt.preload import PreloadReport, preload_features
from monai_prompt.fpt.side import SideViT
from monai_prompt.fpt.transforms import LoadFPTFeaturesd

__all__ = [
    "CACHE_FORMAT",
    "FPT_VARIANTS",
    "PAPER_LPM_IMG_SIZE",
    "PAPER_SIDE_IMG_SIZE",
    "STORAGE_DTYPES",
    "FPTCacheError",
    "FPTConfig",
    "FPTFeatureCache",
    "FrozenLPM",
    "LPMExtractor",
    "LoadFPTFeaturesd",
    "PreloadReport",
    "PromptFusion",
    "SAMLPM",
    "SideViT",
    "TinyViTLPM",
    "cache_identity",
    "content_key",
    "default_side_img_size",
    "keep_top_tokens",
    "preload_features",
    "resolve_layers",
    "select_important_tokens",
]
