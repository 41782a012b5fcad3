"""The promptable MONAI ViT, its blocks, and the import of pre-trained weights into it."""

from monai_prompt.backbones.auto import build_backbone, vit_from_pretrained
from monai_prompt.backbones.blocks import Attention, LayerScale, PromptBlock
from monai_prompt.backbones.pos_embed import fit_pos_embed, resize_pos_embed
from monai_prompt.backbones.pretrained import CheckpointError, LoadReport, load_pretrained
from monai_prompt.backbones.tinyvit import TinyViT, build_tinyvit, load_lite_medsam_encoder, load_tinyvit_weights
from monai_prompt.backbones.vit import (
    BACKBONE_KEY,
    VIT_PRESETS,
    PromptableViT,
    TokenPrompter,
    build_vit,
    find_vit,
    vit_config,
)

__all__ = [
    "BACKBONE_KEY",
    "VIT_PRESETS",
    "Attention",
    "CheckpointError",
    "LayerScale",
    "LoadReport",
    "PromptBlock",
    "PromptableViT",
    "TinyViT",
    "TokenPrompter",
    "build_backbone",
    "build_tinyvit",
    "build_vit",
    "find_vit",
    "fit_pos_embed",
    "load_lite_medsam_encoder",
    "load_pretrained",
    "load_tinyvit_weights",
    "resize_pos_embed",
    "vit_config",
    "vit_from_pretrained",
]
