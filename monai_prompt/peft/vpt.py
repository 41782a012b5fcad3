"""Visual Prompt Tuning (VPT; Jia et al., ECCV 2022), shallow and deep.

Learnable prompt tokens are placed right after the CLS token, ``[cls, prompts, patches]``. *Shallow* VPT
inserts them once, before the first block. *Deep* VPT gives every block its own prompts: before each block
after the first, the prompt slots coming out of the previous block are dropped and replaced with that
block's fresh prompts. The features are read out at CLS, and the frozen ViT never changes. This follows
KMnP/vpt ``src/models/vit_prompt/vit.py`` (``incorporate_prompt`` and ``forward_deep_prompt``) with
``PROJECT=-1`` (no prompt projection). On a ViT with a pre-norm (CLIP's ``ln_pre``, ``norm_pre``) the prompts
enter after it, unnormalised, where the deep prompts of later blocks enter too (KMnP's ViTs have no pre-norm).
On the windowed SAM-family encoders VPT follows its Swin variant (:mod:`monai_prompt.peft.vpt_windowed`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from monai_prompt.backbones.vit import PromptableViT, TokenPrompter
from monai_prompt.peft.registry import register_method
from monai_prompt.peft.vpt_windowed import apply_windowed_vpt, first_token_size

__all__ = ["VPTConfig", "VisualPrompter", "prompt_init_bound"]


@dataclass
class VPTConfig:
    """Hyper-parameters of VPT. The defaults are KMnP/vpt's ``src/configs/config.py`` ones.

    Args:
        num_tokens: prompt tokens per layer (``NUM_TOKENS=5``; the paper searches {1, 5, 10, 50, 100, 200}
            per task).
        deep: one set of prompts per block (VPT-deep) instead of only at the input (VPT-shallow).
        dropout: dropout on the prompt tokens each time they are inserted (``DROPOUT=0.0``; the paper's
            VPT-deep runs use 0.1).
    """

    num_tokens: int = 5
    deep: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.num_tokens < 1:
            raise ValueError(f"VPT num_tokens must be >= 1, got {self.num_tokens}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"VPT dropout must be in [0, 1), got {self.dropout}.")


def prompt_init_bound(in_channels: int, patch_size: list[int], hidden_size: int) -> float:
    """Bound ``v`` of VPT's uniform(-v, v) prompt init: Xavier-uniform over the patch embedding's fan-in.

    KMnP/vpt uses ``sqrt(6 / (3 * patch**2 + D))`` for RGB 2D patches. Here the fan-in is the real one of
    the patch embedding, ``in_channels * prod(patch_size) + D``: identical for RGB 2D input, and the same
    rule for 1-channel images and 3D patches.

    Args:
        in_channels: image channels.
        patch_size: patch size, one entry per spatial dimension.
        hidden_size: token width ``D``.
    """
    return math.sqrt(6.0 / float(in_channels * math.prod(patch_size) + hidden_size))


class VisualPrompter(TokenPrompter):
    """Token slots of VPT: ``prompts[0]`` at the input and, for VPT-deep, ``prompts[i]`` before block ``i``.

    Args:
        num_layers: transformer blocks of the ViT.
        num_tokens: prompt tokens ``p`` per layer.
        hidden_size: token width ``D``.
        deep: one prompt set per block (``[L, p, D]`` parameters) instead of one at the input (``[1, p, D]``).
        dropout: dropout on the prompts each time they are inserted.
        init_bound: the prompts start uniform in ``(-init_bound, init_bound)`` (see :func:`prompt_init_bound`).
        start: index of the first prompt slot (1 after CLS; 0 for a ViT without CLS).
    """

    def __init__(
        self,
        num_layers: int,
        num_tokens: int,
        hidden_size: int,
        deep: bool,
        dropout: float,
        init_bound: float,
        start: int = 1,
    ) -> None:
        super().__init__()
        self.prompts = nn.Parameter(torch.empty(num_layers if deep else 1, num_tokens, hidden_size))
        nn.init.uniform_(self.prompts, -init_bound, init_bound)
        self.prompt_dropout = nn.Dropout(dropout)
        self.num_tokens = num_tokens
        self.start = start

    def _with_prompts(self, x: torch.Tensor, layer: int, drop: int) -> torch.Tensor:
        """``x`` with ``drop`` tokens after the prefix replaced by the prompts of ``layer``."""
        prompts = self.prompt_dropout(self.prompts[layer]).expand(x.shape[0], -1, -1)
        return torch.cat((x[:, : self.start], prompts.to(x.dtype), x[:, self.start + drop :]), dim=1)

    def insert(self, x: torch.Tensor) -> torch.Tensor:
        return self._with_prompts(x, 0, 0)

    def before_block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if 0 < index < self.prompts.shape[0]:
            return self._with_prompts(x, index, self.num_tokens)
        return x

    def strip(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((x[:, : self.start], x[:, self.start + self.num_tokens :]), dim=1)


#: what the windowed families need from VPT, said when another family is refused.
_REQUIRES = "a plain token sequence with a CLS/prefix slot, or a windowed SAM/TinyViT encoder"


@register_method(
    "vpt",
    VPTConfig,
    trainable=r"^prompter\.prompts$|^(layers\.\d+\.)?blocks\.\d+\.prompts$",
    families=("vit", "tinyvit", "sam"),
    requires=_REQUIRES,
)
def apply_vpt(vit: PromptableViT, config: VPTConfig) -> None:
    """Attach a :class:`VisualPrompter`; only its prompts train (``L*p*D`` deep, ``p*D`` shallow).

    On a SAM or TinyViT encoder the prompts are shared by the windows of each block's attention instead
    (:mod:`monai_prompt.peft.vpt_windowed`): ``p`` times the first attention block's width shallow, the sum of the
    attention blocks' widths times ``p`` deep.
    """
    if vit.family in ("sam", "tinyvit"):
        side, width = first_token_size(vit)
        bound = prompt_init_bound(vit.config["in_channels"], [side, side], width)
        apply_windowed_vpt(vit, config.num_tokens, config.deep, config.dropout, bound)
        return
    cfg = vit.config
    bound = prompt_init_bound(cfg["in_channels"], cfg["patch_size"], cfg["hidden_size"])
    prompter = VisualPrompter(
        num_layers=cfg["num_layers"],
        num_tokens=config.num_tokens,
        hidden_size=cfg["hidden_size"],
        deep=config.deep,
        dropout=config.dropout,
        init_bound=bound,
        start=vit.num_prefix_tokens,
    )
    reference = vit.patch_embedding.position_embeddings
    vit.set_prompter(prompter.to(device=reference.device, dtype=reference.dtype))
