"""AdaptFormer (Chen et al., NeurIPS 2022): a bottleneck "AdaptMLP" in parallel with each frozen MLP.

Each block becomes ``h = x + attn(norm1(x))`` then ``h + mlp(norm2(h)) + s * up(dropout(relu(down(h))))``,
where the adapter reads the post-attention stream ``h`` (not ``norm2(h)``). This is the image setting of
ShoufaChen/AdaptFormer ``main_image.py``: ``ffn_option="parallel"``, ``ffn_adapter_layernorm_option="none"``,
``ffn_adapter_init_option="lora"``, ``ffn_adapter_scalar="0.1"``, ``ffn_num=64`` and the dropout 0.1 that
``models/custom_modules.py`` passes to every adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from monai_prompt.backbones.vit import PromptableViT
from monai_prompt.peft.registry import register_method

__all__ = ["AdaptMLP", "AdapterConfig"]


@dataclass
class AdapterConfig:
    """Hyper-parameters of AdaptFormer (defaults from the official image-classification code).

    Args:
        bottleneck: hidden width of the adapter (``ffn_num=64``; V-PETL's VTAB runs use 8).
        scale: output scale ``s`` (``ffn_adapter_scalar="0.1"``).
        dropout: dropout after the ReLU (0.1 in ``models/custom_modules.py``).
    """

    bottleneck: int = 64
    scale: float = 0.1
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.bottleneck < 1:
            raise ValueError(f"adapter bottleneck must be >= 1, got {self.bottleneck}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"adapter dropout must be in [0, 1), got {self.dropout}.")


class AdaptMLP(nn.Module):
    """``s * up_proj(dropout(relu(down_proj(x))))`` with AdaptFormer's "lora" init.

    ``down_proj`` is kaiming-uniform (``a=sqrt(5)``), ``up_proj`` and both biases are zero, so the branch
    adds nothing until it is trained.

    Args:
        hidden_size: token width ``D``.
        bottleneck: adapter width.
        scale: output scale ``s``.
        dropout: dropout after the ReLU.
    """

    def __init__(self, hidden_size: int, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.1) -> None:
        super().__init__()
        self.down_proj = nn.Linear(hidden_size, bottleneck)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.up_proj = nn.Linear(bottleneck, hidden_size)
        self.scale = scale
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down_proj.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down_proj.bias)
            nn.init.zeros_(self.up_proj.weight)
            nn.init.zeros_(self.up_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up_proj(self.dropout(self.act(self.down_proj(x)))) * self.scale


@register_method("adapter", AdapterConfig, trainable=r"\.parallel\.", families=("vit", "tinyvit", "sam"))
def apply_adapter(vit: PromptableViT, config: AdapterConfig) -> None:
    """Give every block an :class:`AdaptMLP` of its width as its parallel branch (TinyViT widths differ by stage)."""
    for block in vit.blocks:
        reference = next(block.parameters())
        width = getattr(block, "hidden_size", vit.hidden_size)
        adapter = AdaptMLP(width, config.bottleneck, config.scale, config.dropout)
        block.set_parallel(adapter.to(device=reference.device, dtype=reference.dtype))
