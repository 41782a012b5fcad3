"""FPT's side network: a small, randomly initialised MONAI ViT that sees the low-resolution image.

Block ``i`` receives the fused prompts of tapped LPM layer ``i`` appended after CLS and patch tokens; their
outputs are dropped after the block (fresh prompts every block, as VPT-deep). The logits come from a Linear
head on the final-normed CLS token (official ``modules/side_vit.py``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from monai_prompt.backbones.vit import PromptableViT

__all__ = ["SideViT"]


class SideViT(nn.Module):
    """Side ViT with per-block appended prompts and a classification head.

    The official side net is a HuggingFace ViT, which has a CLS position embedding beside the CLS token; MONAI
    adds positions to patches only, so ``cls_position_embedding`` keeps that parameter (it reproduces the
    published parameter counts and the AdamW dynamics of the two separate parameters).

    Args:
        vit: the side :class:`PromptableViT` (width ``d``, CLS token); it is re-initialised HuggingFace-style:
            trunc-normal(0.02) Linear/Conv weights, CLS token and position embeddings, zero biases, LayerNorm (1, 0).
        num_classes: logits.
    """

    def __init__(self, vit: PromptableViT, num_classes: int) -> None:
        super().__init__()
        if not hasattr(vit, "cls_token"):
            raise ValueError("the FPT side network needs a ViT with a CLS token (cls_token=True).")
        self.vit = vit
        self.cls_position_embedding = nn.Parameter(torch.zeros(1, 1, vit.hidden_size))
        self.head = nn.Linear(vit.hidden_size, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """HuggingFace ``ViTPreTrainedModel._init_weights`` with ``initializer_range=0.02``."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for param in (self.vit.cls_token, self.cls_position_embedding, self.vit.patch_embedding.position_embeddings):
            nn.init.trunc_normal_(param, std=0.02)

    def forward(self, image: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes].

        Args:
            image: side input [B, C, *side_img_size].
            prompts: fused prompts [L, B, M, d], one slice per block.
        """
        vit = self.vit
        if list(image.shape[2:]) != vit.img_size:
            raise ValueError(f"side input size {list(image.shape[2:])} differs from the side size {vit.img_size}.")
        x = vit.patch_embedding(image)
        cls = (vit.cls_token + self.cls_position_embedding).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        num_tokens = x.shape[1]
        for index, blk in enumerate(vit.blocks):
            x = blk(torch.cat((x, prompts[index]), dim=1))[:, :num_tokens]
        return self.head(vit.norm(x)[:, 0])
