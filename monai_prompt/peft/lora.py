"""LoRA (Hu et al., ICLR 2022): a trainable low-rank update ``W + (alpha / r) * B @ A`` of frozen linears.

Each targeted ``nn.Linear`` becomes a :class:`LoRALinear`: the same module (its ``weight``/``bias`` keys
and values are untouched) plus ``lora_A`` [r, in] and ``lora_B`` [out, r]. The init, scaling and dropout
follow HuggingFace ``peft`` (``tuners/lora/layer.py``): ``A`` kaiming-uniform with ``a=sqrt(5)``, ``B``
zeros (so training starts from the pre-trained model), dropout on the input of the low-rank path.
:meth:`LoRALinear.merge` (through :func:`~monai_prompt.peft.merge.merge_and_unload`) folds the update into
``weight`` for export and turns the layer back into a plain ``nn.Linear`` (no extra cost at inference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_prompt.backbones.recast import RecastLinear, linear
from monai_prompt.backbones.vit import PromptableViT
from monai_prompt.peft.merge import MergeableLayer
from monai_prompt.peft.registry import register_method

__all__ = ["LORA_TARGETS", "LoRAConfig", "LoRALinear"]

#: LoRA target name -> module path inside each transformer block.
LORA_TARGETS: dict[str, str] = {
    "qkv": "attn.qkv",
    "out_proj": "attn.out_proj",
    "linear1": "mlp.linear1",
    "linear2": "mlp.linear2",
}


@dataclass
class LoRAConfig:
    """Hyper-parameters of LoRA.

    Args:
        rank: rank ``r`` of the update (8: the LoRA paper and V-PETL's ViT-B runs).
        alpha: the update is scaled by ``alpha / rank`` (peft's default 8, i.e. scaling 1 at rank 8).
        dropout: dropout on the input of the low-rank path (peft default 0).
        targets: linears of every block to adapt, from :data:`LORA_TARGETS` (default the fused ``qkv``).
    """

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("qkv",)

    def __post_init__(self) -> None:
        self.targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown or not self.targets:
            raise ValueError(
                f"LoRA targets {list(self.targets)} invalid; choose a non-empty subset of {list(LORA_TARGETS)}."
            )
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}.")


class LoRALinear(MergeableLayer, nn.Linear):
    """``nn.Linear`` plus a low-rank update: ``y = x W^T + b + (alpha / r) * dropout(x) A^T B^T``.

    Build one from scratch like an ``nn.Linear`` or convert an existing (pre-trained) one in place with
    :meth:`from_linear`. :meth:`merge` adds the update to ``weight`` and turns the layer into a plain ``nn.Linear``.

    Args:
        in_features: input width.
        out_features: output width.
        rank: rank ``r``.
        alpha: scaling numerator; the update is multiplied by ``alpha / rank``.
        dropout: dropout on the input of the low-rank path.
        bias: whether the linear has a bias.
    """

    base_class = nn.Linear
    added_attributes = ("lora_A", "lora_B", "lora_dropout", "scaling")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self._init_lora(rank, alpha, dropout)

    def _init_lora(self, rank: int, alpha: float, dropout: float) -> None:
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout)
        self.scaling = alpha / rank

    @classmethod
    def from_linear(cls, layer: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> LoRALinear:
        """Turn ``layer`` (a plain ``nn.Linear`` or a block's :class:`~monai_prompt.backbones.recast.RecastLinear`)
        into a :class:`LoRALinear` in place (its parameters and keys stay) and return it.

        Like ``torch.nn.utils.parametrize``, this swaps the module's class, so every reference to the
        module (and its parent's slot) sees the new forward.
        """
        if type(layer) not in (nn.Linear, RecastLinear):
            raise TypeError(f"LoRA adapts plain nn.Linear modules, got {type(layer).__name__}.")
        layer.__class__ = cls
        layer._init_lora(rank, alpha, dropout)
        return layer

    def delta_weight(self) -> torch.Tensor:
        """The update ``(alpha / r) * B @ A`` in the shape of ``weight``."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def fold(self) -> None:
        """``weight <- weight + (alpha / r) * B @ A``."""
        self.weight += self.delta_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the frozen product keeps no cast copy of its weight under autocast (see ``recast.linear``); the update is
        # added and scaled inside its last matmul (one pass over the output instead of three)
        out = linear(x, self.weight, self.bias)
        low_rank = F.linear(self.lora_dropout(x), self.lora_A)
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), low_rank.reshape(-1, low_rank.shape[-1]), self.lora_B.t(),
                           alpha=self.scaling)
        return flat.view(out.shape)


@register_method("lora", LoRAConfig, trainable=r"\.lora_[AB]$", families=("vit", "tinyvit", "sam"))
def apply_lora(vit: PromptableViT, config: LoRAConfig) -> None:
    """Convert the targeted linears of every block to :class:`LoRALinear` (a TinyViT's paths: its ``block_linears``)."""
    paths = getattr(vit, "block_linears", LORA_TARGETS)
    for block in vit.blocks:
        for target in config.targets:
            LoRALinear.from_linear(block.get_submodule(paths[target]), config.rank, config.alpha, config.dropout)
