"""DVPT, dynamic visual prompt tuning (He et al., Neural Networks 185:107168, 2025; arXiv 2307.09787;
official code github.com/NKUhealong/DVPT).

``M`` learnable prompt tokens (plus their own position embeddings) are placed *before* CLS,
``[prompts, cls, patches]`` (official ViT layout), before the ViT's pre-norm: on a CLIP tower ``norm_pre``
(``ln_pre``) normalises them with the other tokens, as the official code does. In every block a bottleneck
module reads the post-attention stream ``x`` and adds a zero-gated branch beside the frozen MLP:

    h   = QuickGELU(Down(x))                             [B, M+N, r]
    P_o = softmax(h_P h_T^T / sqrt(r)) h_T               prompt slots h_P query CLS + patches h_T
    x   = x + MLP(LN2(x)) + g * Up(cat[P_o, h_T])        g: scalar, initialised to 0

One module serves ``share`` consecutive blocks (official: 3). The feature is the mean of the final-normed
prompt and CLS tokens.

Variants (``DVPTConfig.variant``):

* ``"paper"`` (default): the abstract's pipeline above, prompts as dynamic queries (notes "DVPT-paper").
* ``"code"``: the official ViT release, where the cross-attention result is computed but never used, so
  the branch is ``g * Up(QuickGELU(Down(x)))`` for every token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_prompt.backbones.vit import PromptableViT, TokenPrompter
from monai_prompt.peft.registry import register_method

__all__ = ["DVPTConfig", "DVPTModule", "DVPTPrompter"]

DVPT_VARIANTS = ("paper", "code")


@dataclass
class DVPTConfig:
    """Hyper-parameters of DVPT (defaults: the official ViT code).

    Attributes:
        num_prompts: prompt tokens ``M`` (dynamic queries).
        bottleneck: latent width ``r`` of the Down/Up module.
        share: consecutive blocks that share one module (``1``: a module per block).
        variant: ``"paper"`` (live prompt cross-attention) or ``"code"`` (official ViT release, without it).
    """

    num_prompts: int = 50
    bottleneck: int = 20
    share: int = 3
    variant: str = "paper"

    def __post_init__(self) -> None:
        if self.variant not in DVPT_VARIANTS:
            raise ValueError(f"DVPT variant {self.variant!r} is not one of {DVPT_VARIANTS}.")
        for name in ("num_prompts", "bottleneck", "share"):
            if getattr(self, name) < 1:
                raise ValueError(f"DVPT {name} must be >= 1, got {getattr(self, name)}.")


class DVPTPrompter(TokenPrompter):
    """Token slots of DVPT: ``M`` prompts with their own position embeddings, placed first, before ``norm_pre``.

    Args:
        num_prompts: prompt tokens ``M``.
        hidden_size: token width ``D``.
        num_prefix_tokens: CLS tokens, read out with the prompts (1 with CLS, 0 without; registers are not read out).
    """

    def __init__(self, num_prompts: int, hidden_size: int, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        # official init: prompts randn, their position embeddings randn * D**-0.5
        self.prompts = nn.Parameter(torch.randn(num_prompts, hidden_size))
        self.prompt_positions = nn.Parameter(torch.randn(num_prompts, hidden_size) * hidden_size**-0.5)
        self.num_prompts = num_prompts
        self.num_readout = num_prompts + num_prefix_tokens

    def insert_embedded(self, x: torch.Tensor) -> torch.Tensor:
        prompts = (self.prompts + self.prompt_positions).to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat((prompts, x), dim=1)

    def strip(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.num_prompts :]

    def readout(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, : self.num_readout].mean(dim=1)


class DVPTModule(nn.Module):
    """The shared, zero-gated bottleneck: ``g * Up(cat[cross-attended prompts, tokens])`` (see module doc).

    Args:
        hidden_size: token width ``D``.
        bottleneck: latent width ``r``.
        num_prompts: leading prompt slots ``M`` of the token sequence.
        cross_attention: let the prompt slots cross-attend to the other tokens (``"paper"``) or not (``"code"``).
    """

    def __init__(self, hidden_size: int, bottleneck: int, num_prompts: int, cross_attention: bool = True) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck)
        self.up = nn.Linear(bottleneck, hidden_size)
        self.gate = nn.Parameter(torch.zeros(1))
        self.num_prompts = num_prompts
        self.cross_attention = cross_attention
        self.scale = bottleneck**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(x)
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU, as in the official (CLIP) code
        if self.cross_attention:
            queries, tokens = h[:, : self.num_prompts], h[:, self.num_prompts :]
            attended = F.scaled_dot_product_attention(queries, tokens, tokens, scale=self.scale)
            h = torch.cat((attended, tokens), dim=1)
        return self.gate.to(h.dtype) * self.up(h)


@register_method("dvpt", DVPTConfig, trainable=r"^prompter\.|^blocks\.\d+\.parallel\.")
def apply_dvpt(vit: PromptableViT, config: DVPTConfig) -> None:
    """Attach a :class:`DVPTPrompter` and set one :class:`DVPTModule` per ``share`` consecutive blocks as
    their parallel branch. A shared module appears under every block's state_dict keys but once in
    ``named_parameters()`` (under its first block), which is what training, reports and deltas use."""
    reference = vit.patch_embedding.position_embeddings
    prompter = DVPTPrompter(config.num_prompts, vit.hidden_size, vit.num_prefix_tokens - vit.num_registers)
    vit.set_prompter(prompter.to(reference))
    modules = [
        DVPTModule(vit.hidden_size, config.bottleneck, config.num_prompts, config.variant == "paper").to(reference)
        for _ in range(0, len(vit.blocks), config.share)
    ]
    for index, block in enumerate(vit.blocks):
        block.set_parallel(modules[index // config.share])
