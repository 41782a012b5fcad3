"""Transformer blocks of :class:`~monai_prompt.backbones.vit.PromptableViT`.

They subclass MONAI's ``SABlock`` and ``TransformerBlock`` and keep every parameter name, so MONAI ViT
checkpoints load unchanged. What they add are the two seams PEFT methods plug into:

* :class:`Attention` splits attention into ``project_qkv`` and ``attend`` so a method may change the
  attention maths (EPT) or read keys and values (FPT), and it can run on PyTorch SDPA.
* :class:`PromptBlock` has a ``parallel`` branch whose output is added beside the frozen MLP, fed by the
  post-attention stream (AdaptFormer, DVPT).

Their linears are :class:`~monai_prompt.backbones.recast.RecastLinear` (plain ``nn.Linear`` keys): frozen under
autocast, they keep no low-precision copy of their weights for backward.

For the pre-trained families that need them, a block optionally has LayerScale (DINOv2: ``ls1``/``ls2``, one
``gamma`` per channel) and another MLP activation (CLIP's QuickGELU); a plain block keeps MONAI's keys exactly.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import SABlock, TransformerBlock
from monai.networks.layers import get_act_layer
from torch.utils.checkpoint import checkpoint

from monai_prompt.backbones.recast import RecastLinear

__all__ = ["MLP_ACTIVATIONS", "Attention", "LayerScale", "ParallelSeam", "PromptBlock"]

#: MLP activations of pre-trained ViTs, as MONAI activation specs: exact GELU (ViT, DINOv2; MONAI's default),
#: QuickGELU ``x * sigmoid(1.702 x)`` (OpenAI CLIP; MONAI's Swish with alpha 1.702) and tanh-approximated GELU.
MLP_ACTIVATIONS: dict[str, str | tuple] = {
    "gelu": "GELU",
    "quick_gelu": ("swish", {"alpha": 1.702}),
    "gelu_tanh": ("gelu", {"approximate": "tanh"}),
}


class Attention(SABlock):
    """MONAI ``SABlock`` (combined ``qkv`` and ``out_proj``) with an optional PyTorch SDPA path.

    Args:
        hidden_size: token width.
        num_heads: number of attention heads.
        dropout_rate: dropout on attention weights and output.
        qkv_bias: whether ``qkv`` has a bias (pre-trained ViTs need ``True``).
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout_rate: float = 0.0, qkv_bias: bool = True) -> None:
        super().__init__(hidden_size, num_heads, dropout_rate, qkv_bias=qkv_bias)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of ``x`` [B, N, D], each [B, H, N, D/H] (views of the ``qkv`` output, as
        ``input_rearrange`` gives them; unbound along their own axis, so backward stacks their gradients into the
        ``qkv`` layout once)."""
        qkv = self.qkv(x)
        parts = qkv.reshape(qkv.shape[0], qkv.shape[1], 3, self.num_heads, -1).unbind(2)
        return parts[0].transpose(1, 2), parts[1].transpose(1, 2), parts[2].transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Softmax attention of [B, H, N, d] queries over keys/values, [B, H, N, d] out."""
        if self.use_flash_attention:
            dropout = self.dropout_rate if self.training else 0.0
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.scale)
        att = (torch.einsum("bhxd,bhyd->bhxy", q, k) * self.scale).softmax(dim=-1)
        return torch.einsum("bhxy,bhyd->bhxd", self.drop_weights(att), v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        q, k, v = self.project_qkv(x)
        return self.drop_output(self.out_proj(self.out_rearrange(self.attend(q, k, v))))


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch, ``x * gamma`` (Touvron et al., CaiT; used by DINOv2).

    Args:
        hidden_size: token width.
        init_value: initial value of every ``gamma`` entry (pre-trained weights overwrite it).
    """

    def __init__(self, hidden_size: int, init_value: float = 1.0) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((hidden_size,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.to(x.dtype)


class ParallelSeam(nn.Module):
    """A block's ``parallel`` branch, added beside its MLP (AdaptFormer, DVPT) and off until :meth:`set_parallel`:
    the seam :class:`PromptBlock` and TinyViT's block share. A subclass calls :meth:`init_parallel` in its
    ``__init__`` and adds ``parallel(x)`` to its MLP branch when ``has_parallel``."""

    def init_parallel(self) -> None:
        """No branch: ``parallel`` is an identity the forward skips."""
        self.has_parallel = False
        self.parallel: nn.Module = nn.Identity()

    def set_parallel(self, branch: nn.Module) -> None:
        """Add ``branch(x)`` beside the MLP in every later forward, ``x`` being the stream the MLP reads."""
        self.parallel = branch
        self.has_parallel = True


class PromptBlock(ParallelSeam, TransformerBlock):
    """Pre-norm ViT block, ``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x))) + parallel(x)``.

    ``parallel`` is off until a method sets it with :meth:`set_parallel`; ``norm_cross_attn`` (built by
    MONAI but unused without cross-attention) is kept for key compatibility and always frozen. ``ls1``/``ls2``
    are identities (no keys) unless ``layer_scale``.

    Args:
        hidden_size: token width.
        mlp_dim: MLP hidden width.
        num_heads: number of attention heads.
        dropout_rate: dropout rate of attention and MLP.
        qkv_bias: whether ``qkv`` has a bias.
        layer_norm_eps: epsilon of ``norm1`` and ``norm2`` (1e-6 timm, 1e-12 HuggingFace).
        layer_scale: scale each residual branch per channel (:class:`LayerScale`, DINOv2).
        act: MLP activation, a key of :data:`MLP_ACTIVATIONS` (``quick_gelu`` for OpenAI CLIP).
    """

    __constants__ = ["with_cross_attention", "has_parallel"]

    def __init__(
        self,
        hidden_size: int,
        mlp_dim: int,
        num_heads: int,
        dropout_rate: float = 0.0,
        qkv_bias: bool = True,
        layer_norm_eps: float = 1e-6,
        layer_scale: bool = False,
        act: str = "gelu",
    ) -> None:
        super().__init__(hidden_size, mlp_dim, num_heads, dropout_rate, qkv_bias)
        if act not in MLP_ACTIVATIONS:
            raise ValueError(f"MLP activation {act!r} is not one of {sorted(MLP_ACTIVATIONS)}.")
        self.attn = Attention(hidden_size, num_heads, dropout_rate, qkv_bias)
        self.norm1 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.norm_cross_attn.requires_grad_(False)
        for layer in (self.attn.qkv, self.attn.out_proj, self.mlp.linear1, self.mlp.linear2):
            RecastLinear.from_linear(layer)
        if act != "gelu":
            self.mlp.fn = get_act_layer(MLP_ACTIVATIONS[act])
        self.ls1: nn.Module = LayerScale(hidden_size) if layer_scale else nn.Identity()
        self.ls2: nn.Module = LayerScale(hidden_size) if layer_scale else nn.Identity()
        self.init_parallel()

    def attention_branch(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch around attention, ``ls1(attn(norm1(x)))``."""
        return self.ls1(self.attn(self.norm1(x)))

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch after attention, ``ls2(mlp(norm2(x)))`` plus the parallel branch if set."""
        if self.has_parallel:
            return self.ls2(self.mlp(self.norm2(x))) + self.parallel(x)
        return self.ls2(self.mlp(self.norm2(x)))

    @torch.jit.unused
    def forward_recomputing(self, part: str, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` whose ``part`` (``"attn"``: :meth:`attention_branch`; ``"mlp"``: :meth:`mlp_branch`;
        ``"none"``) is recomputed in backward instead of storing its activations (eager only)."""
        if part == "attn":
            x = x + checkpoint(self.attention_branch, x, use_reentrant=False)
        else:
            x = x + self.attention_branch(x)
        if part == "mlp":
            return x + checkpoint(self.mlp_branch, x, use_reentrant=False)
        return x + self.mlp_branch(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x + self.attention_branch(x)
        return x + self.mlp_branch(x)
