"""The tiny networks the unit tests build: a ``PromptClassifier`` on the bundle tests' ViT and an ``FPTClassifier``."""

from __future__ import annotations

import torch

from bundle_support import TINY_BACKBONE, TINY_IMG_SIZE
from monai_prompt.nets import FPTClassifier, PromptClassifier

#: the frozen ViT of :func:`tiny_fpt`: 3 blocks of width 64 (patch 8 at 32 x 32: 16 patches).
TINY_FPT_BACKBONE = {"hidden_size": 64, "num_layers": 3, "num_heads": 4, "mlp_dim": 128, "patch_size": 8}


def tiny_classifier(method: str = "linear", config: dict | None = None, seed: int = 0) -> PromptClassifier:
    """A 3-class classifier of ``method`` on a random :data:`bundle_support.TINY_BACKBONE` ViT.

    Args:
        method: a registered PEFT method.
        config: its method config (None: the defaults).
        seed: seeds the random backbone and head (the same seed: the same "pre-trained" backbone).
    """
    torch.manual_seed(seed)
    return PromptClassifier(3, method, config, "vit_tiny", img_size=TINY_IMG_SIZE, backbone_overrides=TINY_BACKBONE)


def tiny_fpt(
    variant: str = "fptplus",
    num_classes: int = 3,
    seed: int | None = None,
    pretrained: str | None = None,
    backbone_overrides: dict | None = None,
    **config,
) -> FPTClassifier:
    """An FPT/FPT+ classifier on a random :data:`TINY_FPT_BACKBONE` ViT at 32 x 32, with a 16 x 16 side network.

    Args:
        variant: ``"fpt"`` or ``"fptplus"``.
        num_classes: output classes.
        seed: seeds the random weights; None draws them from the caller's random state.
        pretrained: weights of the frozen backbone (an LPM file), as ``FPTClassifier`` takes them.
        backbone_overrides: the ViT's shape (None: :data:`TINY_FPT_BACKBONE`).
        config: FPT config entries besides ``side_img_size``.
    """
    if seed is not None:
        torch.manual_seed(seed)
    return FPTClassifier(num_classes, variant, {"side_img_size": 16, **config}, backbone="vit_tiny", img_size=32,
                         backbone_overrides=backbone_overrides or TINY_FPT_BACKBONE, pretrained=pretrained)


def fpt_images(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``count`` random 3 x 32 x 32 images for :func:`tiny_fpt`, labelled ``i % 3``."""
    generator = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand(3, 32, 32, generator=generator), "label": i % 3} for i in range(count)]
