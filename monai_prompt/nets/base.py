"""``PromptNetwork``: what every network of the project does with its backbone.

A network builds its backbone with :func:`~monai_prompt.backbones.build_backbone` (never itself), then
:meth:`PromptNetwork.attach_backbone` applies the PEFT method, sets activation checkpointing, SDPA and the
forward's autocast dtype, stores the backbone under the network's ``backbone_name`` (its state_dict prefix) and
installs the delta-load guard (:func:`~monai_prompt.peft.delta.allow_delta_load`).
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from monai_prompt.nets.autocast import AutocastForward, check_autocast_dtype
from monai_prompt.peft.delta import allow_delta_load
from monai_prompt.peft.registry import apply_method

__all__ = ["PromptNetwork"]


class PromptNetwork(AutocastForward):
    """Base of ``PromptClassifier``, ``PromptUNETR`` and ``FPTClassifier``.

    A subclass sets ``backbone_name``, the attribute that holds its backbone (``backbone``; MONAI UNETR's ``vit``;
    FPT's ``lpm``), which :func:`~monai_prompt.backbones.find_backbone` reads; its ``forward`` is
    :class:`~monai_prompt.nets.autocast.AutocastForward`'s (``forward_logits`` under ``torch.autocast`` when
    ``autocast_dtype`` names a dtype) unless it defines its own.
    """

    #: the attribute holding the backbone (its keys' prefix in the state_dict).
    backbone_name = "backbone"

    def attach_backbone(
        self,
        backbone: nn.Module,
        method: str | None,
        method_config: dict[str, Any] | None = None,
        grad_checkpointing: bool | str = False,
        sdpa: bool = False,
        autocast_dtype: str | None = None,
    ) -> nn.Module:
        """Apply ``method`` to ``backbone``, set its switches, store it as ``backbone_name``, guard delta loads.

        Args:
            backbone: what :func:`~monai_prompt.backbones.build_backbone` returned.
            method: a PEFT method name (:func:`~monai_prompt.peft.method_names`), or ``None`` for a backbone the
                network tunes otherwise (FPT's frozen LPM).
            method_config: overrides of the method's config.
            grad_checkpointing: the backbone's ``set_grad_checkpointing`` argument.
            sdpa: the backbone's ``set_sdpa`` argument.
            autocast_dtype: ``"bf16"``, ``"fp16"`` or ``None`` for the forward.

        Returns:
            the backbone, tuned.
        """
        check_autocast_dtype(autocast_dtype)
        if method is not None:
            backbone = apply_method(backbone, method, method_config)
        backbone.set_grad_checkpointing(grad_checkpointing)
        backbone.set_sdpa(sdpa)
        setattr(self, self.backbone_name, backbone)
        self.autocast_dtype = autocast_dtype
        allow_delta_load(self)
        return backbone
