from monai_prompt.backbones.blocks import Attention, PromptBlock
from monai_prompt.backbones.vit import VIT_PRESETS, PromptableViT, TokenPrompter, build_vit, vit_config
