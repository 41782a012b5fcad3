"""The forward of the project's networks: ``forward_logits``, optionally under ``torch.autocast``."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AUTOCAST_DTYPES", "AutocastForward", "check_autocast_dtype"]

#: accepted ``autocast_dtype`` names.
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def check_autocast_dtype(autocast_dtype: str | None) -> None:
    """Raise a clear error unless ``autocast_dtype`` is ``None`` or a key of :data:`AUTOCAST_DTYPES`."""
    if autocast_dtype is not None and autocast_dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast_dtype {autocast_dtype!r} is not one of {sorted(AUTOCAST_DTYPES)} or None.")


class AutocastForward(nn.Module):
    """``forward`` runs the subclass's ``forward_logits(x)``, under ``torch.autocast`` when the subclass's
    ``autocast_dtype`` attribute names a dtype (eager only; TorchScript runs the plain path); logits come back
    in float32.

    The autocast keeps no cache of cast weights: autocast's cache holds a low-precision copy of every trainable
    weight until the forward ends, which under activation checkpointing nothing else keeps (full fine-tuning of a
    ViT-B: 164 MiB at bf16); each weight is cast where it is used instead, once per forward (and once more where
    checkpointing recomputes it), the same values."""

    @torch.jit.unused
    def _autocast_logits(self, x: torch.Tensor, dtype: str) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, dtype=AUTOCAST_DTYPES[dtype], cache_enabled=False):
            return self.forward_logits(x).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.autocast_dtype is not None and not torch.jit.is_scripting():
            return self._autocast_logits(x, self.autocast_dtype)
        return self.forward_logits(x)
