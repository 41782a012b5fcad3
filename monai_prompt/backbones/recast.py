"""Linears with a frozen weight under ``torch.autocast`` that keep no low-precision copy of it for backward.

Under autocast a linear casts its float32 weight to the autocast dtype on every call, and autograd keeps that cast
copy until backward (it needs the weight for the input's gradient): in a frozen backbone that is every block's
weights again, in bf16 or fp16, for each block whose activations are kept. :func:`linear` instead keeps a
reference to the float32 parameter (memory it holds anyway) and casts again in backward: the same kernels on the
same values, so the outputs and gradients are those of ``F.linear`` under autocast, at the cost of one more cast
per weight and step. The bias may train (BitFit): its gradient is the one autograd gives, the output gradient summed
over the rows and cast back. :class:`RecastLinear` is an ``nn.Linear`` (same keys) whose forward is :func:`linear`; the
blocks of :class:`~monai_prompt.backbones.vit.PromptableViT` use it for their four linears, and methods that swap
a linear's class (LoRA, SSF) keep the behaviour for the frozen product.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["RecastLinear", "linear"]


class _RecastLinearFunction(torch.autograd.Function):
    """``F.linear(x.to(dtype), weight.to(dtype), bias.to(dtype))`` whose backward casts ``weight`` again (the
    weight takes no gradient; the bias may)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
        # the parameter itself, not a saved tensor: nothing of this op is recomputed by activation checkpointing
        # (non-reentrant checkpointing stops recomputing after the last saved tensor, so a block's last frozen
        # linear is not run again)
        ctx.weight, ctx.dtype, ctx.input_dtype = weight, dtype, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None, None]:
        weight, rows = ctx.weight, grad.reshape(-1, grad.shape[-1])
        # what autograd computes for F.linear's cast input: grad.mm(weight), then the cast back to x's dtype
        grad_input = rows.mm(weight.to(ctx.dtype)).view(*grad.shape[:-1], -1).to(ctx.input_dtype)
        # and for its cast bias: the rows' sum in the autocast dtype, then the cast back to the bias's
        grad_bias = rows.sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return grad_input, None, grad_bias, None


@torch.jit.unused
def _linear_eager(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    device = x.device.type
    if (not weight.requires_grad and x.requires_grad and torch.is_grad_enabled()
            and torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
        dtype = torch.get_autocast_dtype(device)
        if x.dtype == torch.float32 or x.dtype == dtype:  # what autocast would cast (or has cast) to ``dtype``
            return _RecastLinearFunction.apply(x, weight, bias, dtype)
    return F.linear(x, weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; with a frozen ``weight`` (the bias may train) under autocast and ``x`` needing
    a gradient, the cast weight is not kept for backward but cast again there (eager only; TorchScript runs
    ``F.linear``).

    Args:
        x: input [..., in].
        weight: [out, in].
        bias: [out] or ``None``.
    """
    if torch.jit.is_scripting():
        return F.linear(x, weight, bias)
    return _linear_eager(x, weight, bias)


class RecastLinear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`linear` (the same parameters and keys).

    :meth:`from_linear` turns a plain ``nn.Linear`` into one in place, like LoRA's and SSF's layers do.
    """

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> RecastLinear:
        """Swap the class of the plain ``layer`` (its parameters, keys and references stay) and return it."""
        if type(layer) is not nn.Linear:
            raise TypeError(f"RecastLinear converts plain nn.Linear modules, got {type(layer).__name__}.")
        layer.__class__ = cls
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
