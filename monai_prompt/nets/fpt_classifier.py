"""``FPTClassifier``: FPT / FPT+ as one network for ``network_def`` (frozen LPM + fusion + side ViT).

``forward(image)`` runs the frozen LPM online on the high-resolution image and feeds the side network a
downsampled copy: one input tensor, so MONAI bundle checks, inferers and MONAI Label work as for any classifier.
``forward(image, fpt_kv)`` uses LPM features read from a preload cache (:mod:`monai_prompt.fpt.cache`) and never
runs the LPM: that is how training gets its memory saving.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_prompt.backbones.registry import build_backbone
from monai_prompt.backbones.vit import PromptableViT
from monai_prompt.fpt.config import FPTConfig, default_side_img_size
from monai_prompt.fpt.fusion import PromptFusion
from monai_prompt.fpt.lpm import FrozenLPM
from monai_prompt.fpt.side import SideViT
from monai_prompt.nets.base import PromptNetwork

__all__ = ["OFFICIAL_LPM_PARAMETERS", "FPTClassifier", "paper_learnable_percent"]

#: parameters of the LPM as the official FPT code counts them: HuggingFace ``ViTForImageClassification``
#: google/vit-base-patch16-384 (its 384-px position table and 1000-class head included, no pooler).
OFFICIAL_LPM_PARAMETERS = 86_859_496


def paper_learnable_percent(learnable: int, frozen: int = OFFICIAL_LPM_PARAMETERS) -> float:
    """Learnable share in the FPT papers' convention: ``learnable / (frozen LPM + learnable)`` in percent."""
    return 100.0 * learnable / (frozen + learnable)


def _side_img_size(config: FPTConfig, lpm: FrozenLPM) -> int:
    """``config.side_img_size``, or the variant's default for the LPM input
    (:func:`~monai_prompt.fpt.config.default_side_img_size`).

    Raises:
        ValueError: a side input larger than the LPM's, naming the setting and the fix.
    """
    lpm_size = min(lpm.img_size)
    patch = lpm.side_settings()["patch_size"]
    default = default_side_img_size(config.variant, lpm_size, patch if isinstance(patch, int) else max(patch))
    if config.side_img_size is None:
        return default
    side = int(config.side_img_size)
    if side > lpm_size:
        raise ValueError(
            f"side_img_size {side} is larger than the LPM input img_size {lpm_size}: FPT's side network sees a "
            f"downsampled copy of the LPM input; set side_img_size (bundles: --method_config#side_img_size) to at "
            f"most {lpm_size}, or leave it null for {default} (the {config.variant} default at this img_size)."
        )
    return side


class FPTClassifier(PromptNetwork):
    """Fine-grained prompt tuning classifier (FPT or FPT+).

    Args:
        num_classes: logits.
        variant: ``"fptplus"`` (default) or ``"fpt"``.
        fpt_config: overrides of :class:`~monai_prompt.fpt.config.FPTConfig` (``side_img_size``, ``layers``,
            ``num_prompts``, ``token_ratio``, ...).
        backbone: LPM preset of the ViT (``vit_base``, ...), SAM (``sam_vit_b``, ...) or TinyViT (``lite_medsam``)
            family, ``"auto"`` (the encoder ``pretrained`` needs, read off the checkpoint: a ViT, a SAM/MedSAM
            checkpoint, LiteMedSAM's) or a ready plain encoder of one (its weights are copied); built by
            :func:`~monai_prompt.fpt.lpm.build_lpm` through :func:`~monai_prompt.backbones.build_backbone`.
        in_channels: image channels (LPM and side network).
        img_size: LPM input size, the size of the images ``forward`` receives online (512 in the papers).
        spatial_dims: 2 or 3.
        pretrained: LPM weight file/directory for :func:`~monai_prompt.backbones.load_pretrained`.
        layer_norm_eps: LayerNorm epsilon of the LPM checkpoint (1e-6 timm, 1e-12 HuggingFace); the side network
            uses the same value, as the official code does.
        backbone_overrides: ViT ``hidden_size``/``num_layers``/``num_heads``/``mlp_dim``/``patch_size``/``qkv_bias``
            overrides.
        pretrained_strict: ``strict`` of :func:`~monai_prompt.backbones.load_pretrained`: False loads a checkpoint
            with more blocks than the LPM (its first ``num_layers``, with a warning) or lacking some weights.
        sdpa: run the side network's attention on PyTorch SDPA (same maths; no attention matrix is stored for the
            backward, which is most of FPT's training memory from the cache). The LPM always computes its attention
            literally (it needs the probabilities to select tokens).

    Example::

        >>> net = FPTClassifier(num_classes=5, variant="fptplus", pretrained="vit-base-patch16-384/")
        >>> logits = net(image_512)                   # online: runs the frozen LPM
        >>> logits = net(image_side, batch["fpt_kv"])  # training from the preload cache
    """

    #: the frozen LPM is the backbone (``lpm.`` keys).
    backbone_name = "lpm"

    def __init__(
        self,
        num_classes: int,
        variant: str = "fptplus",
        fpt_config: dict[str, Any] | None = None,
        backbone: str | nn.Module = "vit_base",
        in_channels: int = 3,
        img_size: int | tuple[int, ...] = 512,
        spatial_dims: int = 2,
        pretrained: str | None = None,
        layer_norm_eps: float = 1e-6,
        backbone_overrides: dict[str, int] | None = None,
        pretrained_strict: bool = True,
        sdpa: bool = False,
    ) -> None:
        super().__init__()
        config = FPTConfig.from_dict(variant, fpt_config)
        lpm = build_backbone(
            backbone,
            pretrained,
            in_channels,
            img_size,
            spatial_dims,
            layer_norm_eps,
            overrides=backbone_overrides,
            strict=pretrained_strict,
            task="classification",
            method=variant,
            options={
                "layers": config.layers,
                "token_ratio": config.token_ratio,
                "token_importance": config.token_importance,
            },
        )
        layers = lpm.taps
        width, heads = lpm.kv_width, lpm.kv_heads
        side_width = width // config.side_reduction
        if width % config.side_reduction or side_width % heads or width % config.prompt_reduction:
            raise ValueError(
                f"LPM width {width} with {heads} heads: side_reduction {config.side_reduction} and prompt_reduction "
                f"{config.prompt_reduction} must divide it, and the side width must be divisible by {heads} heads."
            )
        config = dataclasses.replace(config, side_img_size=_side_img_size(config, lpm))
        side = lpm.side_settings()
        dims = side["spatial_dims"]
        side_vit = PromptableViT(
            in_channels=side["in_channels"],
            img_size=(config.side_img_size,) * dims,
            patch_size=side["patch_size"],
            hidden_size=side_width,
            mlp_dim=4 * side_width,
            num_layers=len(layers),
            num_heads=heads,
            spatial_dims=dims,
            layer_norm_eps=side["layer_norm_eps"],
        )
        self.attach_backbone(lpm, None)  # frozen as built: no PEFT method, and its attention stays literal
        self.fusion = PromptFusion(
            num_layers=len(layers),
            num_prompts=config.num_prompts,
            lpm_dim=width,
            num_heads=heads,
            side_dim=side_width,
            prompt_dim=width // config.prompt_reduction,
            prompt_norm=bool(config.prompt_norm),
            prompt_proj=bool(config.prompt_proj),
            dropout=config.fusion_dropout,
        )
        self.side = SideViT(side_vit, num_classes)
        side_vit.set_sdpa(sdpa)
        self.fpt_config = dataclasses.replace(config, layers=layers)
        lpm.peft_method = variant
        lpm.peft_config = dataclasses.asdict(self.fpt_config)
        self.feature_shape = list(lpm.feature_shape)
        self.lpm_img_size = list(lpm.img_size)
        self.side_img_size = list(side_vit.img_size)
        self.side_resize_mode = "bilinear" if dims == 2 else "area"

    def learnable_parameters(self) -> int:
        """Parameters that train: side network and fusion module (the LPM is frozen)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @torch.jit.unused
    def release_lpm(self) -> None:
        """Free the frozen LPM's weights: training from preloaded features (``forward(image, fpt_kv)``) then holds
        only the side network, the fusion module and the features.

        The LPM keeps its config, parameter counts and fingerprints, so :meth:`cache_fingerprint`,
        :func:`~monai_prompt.fpt.cache_identity`, the trainable report and the delta (tied to the LPM weights, and
        loadable into a fresh ``FPTClassifier`` built with them) work as before; ``to(device)`` leaves the LPM
        alone and DDP skips it. Online calls (``forward(image)``) then raise: inference and export build the
        network again with ``pretrained=``.
        """
        self.lpm.release()
        # DistributedDataParallel would broadcast the (meta) LPM weights; it skips the names listed here
        self._ddp_params_and_buffers_to_ignore = [f"lpm.{name}" for name in self.lpm.state_dict()]

    @torch.jit.unused
    def cache_fingerprint(self) -> str:
        """Fingerprint of the LPM weights and feature-extraction config that a preload cache must match."""
        return self.lpm.fingerprint()

    def lpm_features(self, image: torch.Tensor) -> torch.Tensor:
        """Selected LPM keys/values ``[B, 2, L, H, n, d_h]`` of LPM-size images, computed on the LPM's device."""
        device = self.lpm.weight_device()
        return self.lpm.extract(image.to(device)).to(image.device)

    def side_input(self, image: torch.Tensor) -> torch.Tensor:
        """The side network's input: ``image`` itself at the side size, or its downsampling from the LPM size."""
        size = list(image.shape[2:])
        if size == self.side_img_size:
            return image
        if size != self.lpm_img_size:
            raise ValueError(
                f"input spatial size {size} is neither the LPM size {self.lpm_img_size} nor the side size "
                f"{self.side_img_size}; resize the image to one of them."
            )
        if self.side_resize_mode == "bilinear":
            return F.interpolate(image, size=self.side_img_size, mode="bilinear", align_corners=False, antialias=True)
        return F.interpolate(image, size=self.side_img_size, mode="area")

    def forward(self, image: torch.Tensor, fpt_kv: Optional[torch.Tensor] = None) -> torch.Tensor:  # noqa: UP045
        """Logits [B, num_classes].

        Args:
            image: the LPM-size image (online, or with cached features) or the (augmented) side-size image
                (with cached features).
            fpt_kv: cached LPM features [B, 2, L, H, n, d_h]; ``None`` runs the LPM on ``image`` (LPM size).
        """
        if fpt_kv is None:
            fpt_kv = self.lpm_features(image)
        elif list(fpt_kv.shape[1:]) != self.feature_shape:
            raise ValueError(
                f"fpt_kv has shape {list(fpt_kv.shape)}, but this model expects [B] + {self.feature_shape} "
                f"(2, layers, heads, kept tokens, head dim): the cache was made for another LPM or FPT variant."
            )
        return self.side(self.side_input(image), self.fusion(fpt_kv))
