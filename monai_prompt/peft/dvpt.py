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

Token-grid families (SAM's ViT image encoder, LiteMedSAM's TinyViT; docs/methods.md) have no CLS and no token
slots outside their windows, so, as in the official hierarchical (Swin-B) code, each block owns its own static
prompts and one Down/Up/gate module serves ``share`` consecutive blocks of a stage (never across a stage, whose
width changes). With ``x`` the block's post-attention grid flattened to ``[B, N, C]`` (all windows):

    h   = QuickGELU(Down(x))                              [B, N, r]
    P_o = softmax(P_b h^T / sqrt(r)) h                    the block's prompts P_b [M, r] query every token
    h'  = h + softmax(h P_o^T / sqrt(r)) P_o              every token reads the dynamic prompts back
    x   = x + MLP(...) + g * Up(h')                       g: scalar, initialised to 0

The readout stays the family's CLS-free one (the mean of the neck's map). ``"code"`` drops the prompts (the
official ViT release's effective branch ``g * Up(QuickGELU(Down(x)))``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_prompt.backbones.vit import TokenPrompter
from monai_prompt.peft.registry import register_method

__all__ = ["DVPTConfig", "DVPTModule", "DVPTPrompter", "GridDVPTBranch", "GridDVPTModule"]

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


class GridDVPTModule(nn.Module):
    """The shared, zero-gated bottleneck of a token-grid family: ``Down``, ``Up`` and the gate ``g``.

    Args:
        hidden_size: token width ``C`` of the blocks that share it.
        bottleneck: latent width ``r``.
    """

    def __init__(self, hidden_size: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck)
        self.up = nn.Linear(bottleneck, hidden_size)
        self.gate = nn.Parameter(torch.zeros(1))


class GridDVPTBranch(nn.Module):
    """A block's DVPT branch on a channels-last grid ``[B, H, W, C]``: its own prompts, a shared
    :class:`GridDVPTModule` (see the module doc for the equations).

    Args:
        module: the bottleneck module this block shares.
        num_prompts: prompts ``M`` of this block (0: none, the ``"code"`` variant).
    """

    def __init__(self, module: GridDVPTModule, num_prompts: int) -> None:
        super().__init__()
        self.bottleneck = module
        bottleneck = module.down.out_features
        self.cross_attention = num_prompts > 0
        prompts = torch.randn(num_prompts, bottleneck).to(module.down.weight)  # official ViT code: randn (std 1)
        if self.cross_attention:
            self.prompts = nn.Parameter(prompts)
        else:  # an empty stand-in, so that the (scripted) forward has the attribute
            self.register_buffer("prompts", prompts, persistent=False)
        self.scale = bottleneck**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, height, width, c = x.shape
        h = self.bottleneck.down(x.reshape(b, height * width, c))
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU, as in the official code
        if self.cross_attention:
            queries = self.prompts.to(h.dtype).expand(b, -1, -1)
            dynamic = F.scaled_dot_product_attention(queries, h, h, scale=self.scale)
            h = h + F.scaled_dot_product_attention(h, dynamic, dynamic, scale=self.scale)
        out = self.bottleneck.gate.to(h.dtype) * self.bottleneck.up(h)
        return out.reshape(b, height, width, c)


def _stages(encoder: nn.Module) -> list[list[nn.Module]]:
    """The attention blocks of a token-grid encoder by stage (the SAM encoder: one stage; TinyViT: one per
    attention stage, whose width differs)."""
    if encoder.family == "tinyvit":
        return [list(layer.blocks) for layer in encoder.layers[1:]]
    return [list(encoder.blocks)]


def _apply_grid_dvpt(encoder: nn.Module, config: DVPTConfig) -> None:
    """DVPT on a token-grid family: a :class:`GridDVPTBranch` per block, one module per ``share`` blocks of a stage."""
    prompts = config.num_prompts if config.variant == "paper" else 0
    for stage in _stages(encoder):
        module = None
        for index, block in enumerate(stage):
            reference = next(block.parameters())
            if index % config.share == 0:
                module = GridDVPTModule(block.hidden_size, config.bottleneck).to(reference)
            block.set_parallel(GridDVPTBranch(module, prompts).to(reference))


@register_method("dvpt", DVPTConfig, trainable=r"^prompter\.|\.parallel\.", families=("vit", "tinyvit", "sam"))
def apply_dvpt(vit: nn.Module, config: DVPTConfig) -> None:
    """Attach a :class:`DVPTPrompter` and set one :class:`DVPTModule` per ``share`` consecutive blocks as
    their parallel branch (on the SAM encoder and the TinyViT: :class:`GridDVPTBranch`). A shared module appears
    under every block's state_dict keys but once in ``named_parameters()`` (under its first block), which is what
    training, reports and deltas use."""
    if vit.family != "vit":
        _apply_grid_dvpt(vit, config)
        return
    reference = vit.patch_embedding.position_embeddings
    prompter = DVPTPrompter(config.num_prompts, vit.hidden_size, vit.num_prefix_tokens - vit.num_registers)
    vit.set_prompter(prompter.to(reference))
    modules = [
        DVPTModule(vit.hidden_size, config.bottleneck, config.num_prompts, config.variant == "paper").to(reference)
        for _ in range(0, len(vit.blocks), config.share)
    ]
    for index, block in enumerate(vit.blocks):
        block.set_parallel(modules[index // config.share])
