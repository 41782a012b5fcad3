"""Linear probing: the backbone is frozen, only the task head (outside the ViT) trains."""

from __future__ import annotations

from dataclasses import dataclass

from monai_prompt.backbones.vit import PromptableViT
from monai_prompt.peft.registry import register_method

__all__ = ["LinearConfig"]


@dataclass
class LinearConfig:
    """Linear probing has no hyper-parameters of its own."""


@register_method("linear", LinearConfig, trainable=r"(?!)", families=("vit", "tinyvit", "sam"))
def apply_linear(vit: PromptableViT, config: LinearConfig) -> None:
    """Nothing to insert; no ViT parameter trains (the regex ``(?!)`` matches nothing)."""
