"""The promptable MONAI ViT, its blocks, the import of pre-trained weights into it, and the backbone families.

Importing this package registers its families (:mod:`~monai_prompt.backbones.registry`): the ViT
(:mod:`~monai_prompt.backbones.auto`), LiteMedSAM's TinyViT (:mod:`~monai_prompt.backbones.tinyvit`) and SAM's ViT
image encoder (:mod:`~monai_prompt.backbones.sam`).
"""

from monai_prompt.backbones.auto import vit_from_pretrained
from monai_prompt.backbones.blocks import Attention, LayerScale, PromptBlock
from monai_prompt.backbones.pos_embed import check_sincos_width, fit_pos_embed, resize_pos_embed
from monai_prompt.backbones.pretrained import CheckpointError, LoadReport, load_pretrained
from monai_prompt.backbones.registry import (
    BackboneFamily,
    BackboneRequest,
    build_backbone,
    family_names,
    find_backbone,
    register_family,
)
from monai_prompt.backbones.sam import SAMImageEncoder, build_sam, load_sam_weights, sam_from_pretrained
from monai_prompt.backbones.tinyvit import TinyViT, build_tinyvit, load_lite_medsam_encoder, load_tinyvit_weights
from monai_prompt.backbones.vit import (
    BACKBONE_KEY,
    VIT_PRESETS,
    PromptableViT,
    TokenPrompter,
    build_vit,
    vit_config,
)

__all__ = [
    "BACKBONE_KEY",
    "VIT_PRESETS",
    "Attention",
    "BackboneFamily",
    "BackboneRequest",
    "CheckpointError",
    "LayerScale",
    "LoadReport",
    "PromptBlock",
    "PromptableViT",
    "SAMImageEncoder",
    "TinyViT",
    "TokenPrompter",
    "build_backbone",
    "build_sam",
    "build_tinyvit",
    "build_vit",
    "check_sincos_width",
    "family_names",
    "find_backbone",
    "fit_pos_embed",
    "load_lite_medsam_encoder",
    "load_pretrained",
    "load_sam_weights",
    "load_tinyvit_weights",
    "register_family",
    "resize_pos_embed",
    "sam_from_pretrained",
    "vit_config",
    "vit_from_pretrained",
]
