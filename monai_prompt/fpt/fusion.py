"""FPT's fusion module: per-layer fine-grained prompts cross-attend to the LPM's selected keys/values.

One module serves all tapped layers. Prompts are per layer; the prompt LayerNorm, the prompt projection and the
output projection are one set of weights shared across layers (official ``modules/bridge.py::FusionModule``; the
published parameter counts confirm the sharing). For layer ``i`` with prompts ``P_i`` [M, d_p]::

    FPT+ (d_p == D):  F_i = Drop( W_o( softmax(LN(P_i) K_i^T / sqrt(d_h)) V_i + P_i ) + b_o )
    FPT  (d_p == d):  F_i = Drop( W_o( softmax((W_q P_i + b_q) K_i^T / sqrt(d_h)) V_i ) + b_o + P_i )

per LPM head, heads concatenated. The keys/values come straight from the LPM (no projections here).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["PromptFusion"]


class PromptFusion(nn.Module):
    """Fine-grained prompts and their cross-attention over frozen LPM keys/values.

    Args:
        num_layers: tapped LPM layers (= side-network blocks).
        num_prompts: prompts per layer (M).
        lpm_dim: LPM width (D).
        num_heads: LPM heads (H); the head dim is ``D / H``.
        side_dim: side-network width (d), the width of the fused prompts.
        prompt_dim: prompt width (d_p): ``D`` (FPT+, residual before ``out_proj``) or ``d`` (FPT, residual after).
        prompt_norm: LayerNorm on the prompts before they query.
        prompt_proj: Linear ``d_p -> D`` on the prompts before they query (needed when ``d_p != D``).
        dropout: dropout on the fused prompts.
    """

    def __init__(
        self,
        num_layers: int,
        num_prompts: int,
        lpm_dim: int,
        num_heads: int,
        side_dim: int,
        prompt_dim: int,
        prompt_norm: bool,
        prompt_proj: bool,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if lpm_dim % num_heads:
            raise ValueError(f"LPM width {lpm_dim} is not divisible by its {num_heads} heads.")
        if not prompt_proj and prompt_dim != lpm_dim:
            raise ValueError(f"prompt dim {prompt_dim} != LPM width {lpm_dim} needs prompt_proj=True.")
        if prompt_dim not in (lpm_dim, side_dim):
            raise ValueError(
                f"prompt dim {prompt_dim} must equal the LPM width {lpm_dim} (FPT+) or the side width {side_dim} "
                f"(FPT) for the residual connection; adjust prompt_reduction."
            )
        self.num_heads = num_heads
        self.scale = 1.0 / math.sqrt(lpm_dim // num_heads)
        self.residual_before_out_proj = prompt_dim == lpm_dim
        self.prompts = nn.Parameter(torch.zeros(num_layers, 1, num_prompts, prompt_dim))
        nn.init.normal_(self.prompts, std=1e-6)
        self.prompt_norm = nn.LayerNorm(prompt_dim) if prompt_norm else nn.Identity()
        self.prompt_proj = nn.Linear(prompt_dim, lpm_dim) if prompt_proj else nn.Identity()
        self.out_proj = nn.Linear(lpm_dim, side_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, kv: torch.Tensor) -> torch.Tensor:
        """Fused prompts ``[L, B, M, d]`` from LPM features ``kv`` [B, 2, L, H, n, d_h] (0 keys, 1 values)."""
        keys, values = kv[:, 0].to(self.prompts.dtype), kv[:, 1].to(self.prompts.dtype)
        num_layers, _, num_prompts, _ = self.prompts.shape
        batch = kv.shape[0]
        query = self.prompt_proj(self.prompt_norm(self.prompts))
        query = query.view(num_layers, 1, num_prompts, self.num_heads, -1).permute(0, 1, 3, 2, 4)
        query = query.expand(-1, batch, -1, -1, -1)
        att = (torch.einsum("lbhmd,blhnd->lbhmn", query, keys) * self.scale).softmax(dim=-1)
        context = torch.einsum("lbhmn,blhnd->lbmhd", att, values).reshape(num_layers, batch, num_prompts, -1)
        if self.residual_before_out_proj:
            fused = self.out_proj(context + self.prompts)
        else:
            fused = self.out_proj(context) + self.prompts
        return self.dropout(fused)
