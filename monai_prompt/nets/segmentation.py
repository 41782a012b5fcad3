"""``segmentation_network``: the segmentation network a backbone's family takes (what the bundles build)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn as nn

from monai_prompt.backbones.pretrained import read_checkpoint
from monai_prompt.backbones.registry import resolve_family
from monai_prompt.nets.sam_unetr import PromptSAMUNETR, PromptTinyViTUNETR
from monai_prompt.nets.unetr import PromptUNETR

__all__ = ["SEGMENTATION_NETWORKS", "segmentation_network"]

#: the network of each backbone family that segments: a plain ViT's UNETR (2D, 3D), SAM's ViT with UNETR's decoder
#: and the TinyViT with a SwinUNETR-style one (2D only).
SEGMENTATION_NETWORKS: dict[str, type[nn.Module]] = {
    "vit": PromptUNETR,
    "sam": PromptSAMUNETR,
    "tinyvit": PromptTinyViTUNETR,
}


def segmentation_network(
    in_channels: int,
    out_channels: int,
    img_size: int | Sequence[int],
    method: str = "linear",
    method_config: dict[str, Any] | None = None,
    backbone: str | nn.Module = "vit_base",
    spatial_dims: int = 3,
    feature_size: int = 16,
    pretrained: str | None = None,
    layer_norm_eps: float = 1e-6,
    backbone_overrides: dict[str, Any] | None = None,
    sdpa: bool = False,
    **options: Any,
) -> nn.Module:
    """The segmentation network of ``backbone``'s family (:data:`SEGMENTATION_NETWORKS`): :class:`PromptUNETR` for
    a ViT, :class:`PromptSAMUNETR` for SAM's ViT image encoder, :class:`PromptTinyViTUNETR` for the TinyViT.

    Args:
        in_channels: image channels.
        out_channels: segmentation classes.
        img_size: input size (int or one per spatial dim).
        method: PEFT method name.
        method_config: overrides of the method's config.
        backbone: a preset of any family (``vit_base``, ``lite_medsam``, ``sam_vit_b``, ...), ``"auto"`` (the family
            read off ``pretrained``) or a ready module.
        spatial_dims: 2 or 3 (3 for a ViT only: the SAM family is 2D).
        feature_size: decoder width.
        pretrained: encoder weights.
        layer_norm_eps: LayerNorm epsilon of a ViT preset (unused by the SAM family: its checkpoints' 1e-6).
        backbone_overrides: the family's architecture overrides.
        sdpa: fused attention where the method's maths allows it.
        options: further arguments of the family's network (``grad_checkpointing``, ``autocast_dtype``, ...).
    """
    if isinstance(backbone, str) and backbone == "auto" and pretrained:
        pretrained = read_checkpoint(pretrained)  # read once: the family is picked off it and the network loads it
    family = resolve_family(backbone, pretrained, method)
    if family == "vit":
        options["layer_norm_eps"] = layer_norm_eps
    network = SEGMENTATION_NETWORKS.get(family, PromptUNETR)  # another family: PromptUNETR's task check says why not
    return network(
        in_channels, out_channels, img_size, method, method_config, backbone, spatial_dims, feature_size,
        pretrained=pretrained, backbone_overrides=backbone_overrides, sdpa=sdpa, **options,
    )
