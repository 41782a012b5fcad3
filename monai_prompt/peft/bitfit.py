"""BitFit (Ben Zaken et al., ACL 2022): train only the bias terms of the frozen ViT.

Every bias trains: ``qkv``, ``out_proj``, ``linear1``, ``linear2``, both block LayerNorms, the patch
embedding and the final LayerNorm (MONAI's unused ``norm_cross_attn`` excepted). This is what V-PETL Bench
trains (``train_model_bitfit.py``: every parameter whose name contains ``bias``), 0.10M at ViT-B/16.
Nothing is inserted. With ``qkv_bias=False`` there is no ``qkv`` bias to train.
"""

from __future__ import annotations

from dataclasses import dataclass

from monai_prompt.backbones.vit import PromptableViT
from monai_prompt.peft.registry import register_method

__all__ = ["BitFitConfig"]


@dataclass
class BitFitConfig:
    """BitFit has no hyper-parameters of its own."""


@register_method("bitfit", BitFitConfig, trainable=r"(^|\.)bias$", families=("vit", "tinyvit", "sam"))
def apply_bitfit(vit: PromptableViT, config: BitFitConfig) -> None:
    """Nothing to insert; the trainable regex selects every ``bias``."""
