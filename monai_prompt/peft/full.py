"""Full fine-tuning: every backbone weight trains (the upper-bound baseline of every PEFT paper)."""

from __future__ import annotations

from dataclasses import dataclass

from monai_prompt.backbones.vit import PromptableViT
from monai_prompt.peft.registry import register_method

__all__ = ["FullConfig"]


@dataclass
class FullConfig:
    """Full fine-tuning has no hyper-parameters of its own."""


@register_method("full", FullConfig, trainable=r".", families=("vit", "tinyvit", "sam"))
def apply_full(vit: PromptableViT, config: FullConfig) -> None:
    """Nothing to insert; every parameter (except the unused ``norm_cross_attn``) trains."""
