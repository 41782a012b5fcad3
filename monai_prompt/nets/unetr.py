"""``PromptUNETR``: MONAI's UNETR whose ViT encoder is a (pre-trained) :class:`PromptableViT` tuned by a PEFT method."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.nets import UNETR

from monai_prompt.backbones.registry import build_backbone
from monai_prompt.backbones.vit import PromptableViT
from monai_prompt.nets.base import PromptNetwork
from monai_prompt.peft.report import trainable_report

__all__ = ["UNETR_PATCH_SIZE", "PromptUNETR", "unetr_tap_layers"]

#: the only patch size MONAI's UNETR decoder fits: its last stage meets the full-resolution skip ``encoder1``
#: after four x2 up-samplings of the patch grid (``decoder5`` .. ``decoder2``), i.e. grid * 16 == image size.
UNETR_PATCH_SIZE = 16


def unetr_tap_layers(num_layers: int) -> list[int]:
    """0-based blocks whose outputs feed ``encoder2``/``3``/``4``: MONAI's ``[3, 6, 9]`` of 12 scaled to the
    depth, ``num_layers * k // 4`` for ``k = 1, 2, 3`` (``[6, 12, 18]`` of 24, ``[1, 2, 3]`` of 4).

    Args:
        num_layers: transformer blocks of the encoder (at least 1).
    """
    if num_layers < 1:
        raise ValueError(f"a UNETR encoder needs at least one transformer block, got num_layers={num_layers}.")
    return [num_layers * k // 4 for k in (1, 2, 3)]


class PromptUNETR(PromptNetwork, UNETR):
    """UNETR segmentation network (Hatamizadeh et al., WACV 2022) with a PEFT-tuned, pre-trainable ViT encoder.

    It *is* a :class:`monai.networks.nets.UNETR` whose ``vit`` is a :class:`PromptableViT` without CLS token,
    so the state_dict keys are exactly MONAI UNETR's (plus the keys the method adds): a MONAI UNETR state_dict
    loads as-is (``net.load_state_dict(unetr_state, strict=False)`` reports only the method's keys missing;
    with ``method="full"`` it loads strictly and gives MONAI UNETR's outputs; MONAI's ViT uses
    ``qkv_bias=False`` and LayerNorm eps 1e-5 by default, so build the backbone the same way:
    ``layer_norm_eps=1e-5, backbone_overrides={"qkv_bias": False}``, or ``backbone="auto"``). The decoder
    is MONAI's and always trains; the forward returns logits ``[B, out_channels, *img_size]``.

    The encoder's outputs after blocks :func:`unetr_tap_layers` (MONAI's 3, 6, 9 of 12, scaled for other
    depths) and its final normed tokens are reshaped to the patch grid; the method's prompt tokens are
    stripped before (``PromptableViT.forward``). Only patch size 16 works: MONAI's decoder up-samples the
    patch grid by ``2**4`` to meet the full-resolution skip connection, so ``img_size`` must be a multiple
    of 16 in every dimension and the backbone a ``_p16`` preset.

    Methods: every name of :func:`monai_prompt.peft.method_names` (``full``, ``linear`` = frozen encoder,
    ``vpt``, ``lora``, ``adapter``, ``bitfit``, ``ssf``, ``dvpt``, ``ept``). Without CLS, VPT prompts lead
    the sequence, DVPT prompts cross-attend to the patch tokens only and EPT's prompt has one row per
    patch. FPT/FPT+ are not available: their side network reads out a CLS token from a few selected
    (kept) tokens, so there is no dense per-patch feature map for the decoder's skip connections.

    Args:
        in_channels: image channels.
        out_channels: segmentation classes (logit channels).
        img_size: input size (int or one per spatial dim), a multiple of 16.
        method: PEFT method name (see :func:`monai_prompt.peft.method_names`).
        method_config: overrides of the method's config.
        backbone: ViT preset with patch 16 (``vit_base``, ``vit_small``, ...), ``"auto"`` (the ViT ``pretrained``
            needs, built from the checkpoint by :func:`~monai_prompt.backbones.vit_from_pretrained`, e.g. a MONAI
            ViTAutoEnc or UNETR file, without CLS token) or a ready :class:`PromptableViT` built with
            ``cls_token=False`` for these ``in_channels``/``img_size``.
        spatial_dims: 2 or 3.
        feature_size: decoder width (MONAI's ``feature_size``).
        norm_name: decoder normalisation (MONAI's ``norm_name``).
        conv_block: MONAI's ``conv_block``.
        res_block: MONAI's ``res_block``.
        dropout_rate: dropout inside the ViT (built from a preset).
        pretrained: weight file/directory for :func:`~monai_prompt.backbones.load_pretrained` (HuggingFace,
            timm, MONAI ViT or a MONAI UNETR checkpoint, whose ``vit.`` keys are used), loaded into the
            encoder before the method is applied. To also take a UNETR checkpoint's decoder, load the whole
            state_dict afterwards: ``net.load_state_dict(state, strict=False)`` (only the method's keys missing).
        layer_norm_eps: LayerNorm epsilon of the checkpoint (1e-6 timm, 1e-12 HuggingFace, 1e-5 MONAI; not used by
            ``"auto"``, which reads it from the checkpoint).
        backbone_overrides: ``hidden_size``/``num_layers``/``num_heads``/``mlp_dim``/``qkv_bias`` overrides of the
            preset (``"auto"``: what the checkpoint does not hold, see
            :data:`~monai_prompt.backbones.auto.AUTO_OVERRIDES`, e.g. ``num_heads`` without a config).
        grad_checkpointing: recompute encoder block activations in backward (saves memory): ``True`` every whole
            block, or a mode of :meth:`~monai_prompt.backbones.PromptableViT.set_grad_checkpointing`
            (``"attn"``, ``"mlp"``, ``"alternate"``).
        sdpa: fused scaled-dot-product attention where the method's maths allows it.
        autocast_dtype: ``"bf16"`` or ``"fp16"`` to run the forward under ``torch.autocast``; logits are
            returned in float32.
        pretrained_strict: ``strict`` of :func:`~monai_prompt.backbones.load_pretrained`: False loads a checkpoint
            with more blocks than the encoder (its first ``num_layers``, with a warning) or lacking some weights.

    Example::

        >>> net = PromptUNETR(1, 14, (96, 96, 96), method="lora", backbone="vit_base", pretrained="vit_b16.pth")
    """

    #: MONAI UNETR's name for its encoder (the ``vit.`` keys).
    backbone_name = "vit"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        img_size: int | Sequence[int],
        method: str = "linear",
        method_config: dict[str, Any] | None = None,
        backbone: str | PromptableViT = "vit_base",
        spatial_dims: int = 3,
        feature_size: int = 16,
        norm_name: tuple | str = "instance",
        conv_block: bool = True,
        res_block: bool = True,
        dropout_rate: float = 0.0,
        pretrained: str | None = None,
        layer_norm_eps: float = 1e-6,
        backbone_overrides: dict[str, Any] | None = None,
        grad_checkpointing: bool | str = False,
        sdpa: bool = False,
        autocast_dtype: str | None = None,
        pretrained_strict: bool = True,
    ) -> None:
        sizes = [img_size] * spatial_dims if isinstance(img_size, int) else [int(s) for s in img_size]
        backbone = build_backbone(
            backbone,
            pretrained,
            in_channels,
            sizes,
            spatial_dims,
            layer_norm_eps,
            dropout_rate,
            cls_token=False,
            overrides=backbone_overrides,
            strict=pretrained_strict,
            task="segmentation",
            method=method,
        )
        if backbone.family != "vit":
            raise ValueError(
                f"PromptUNETR decodes a plain ViT's hidden states; backbone {type(backbone).__name__} is of the "
                f"{backbone.family!r} family: use monai_prompt.nets.segmentation_network, which picks its network "
                "(PromptSAMUNETR, PromptTinyViTUNETR)."
            )
        _check_backbone(backbone, in_channels, sizes, spatial_dims)
        cfg = backbone.config
        # the parent builds the decoder and MONAI's own 12-block ViT (about a second at ViT-B), replaced right after
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            img_size=sizes,
            feature_size=feature_size,
            hidden_size=cfg["hidden_size"],
            mlp_dim=cfg["mlp_dim"],
            num_heads=cfg["num_heads"],
            norm_name=norm_name,
            conv_block=conv_block,
            res_block=res_block,
            dropout_rate=dropout_rate,
            spatial_dims=spatial_dims,
            qkv_bias=cfg["qkv_bias"],
        )
        self.attach_backbone(backbone, method, method_config, grad_checkpointing, sdpa, autocast_dtype)
        self.num_layers = cfg["num_layers"]
        self.tap_layers = unetr_tap_layers(self.num_layers)

    def forward_logits(self, x_in: torch.Tensor) -> torch.Tensor:
        """Logits without autocast handling: MONAI UNETR's forward with depth-scaled taps (tests/test_unetr.py pins
        it to ``UNETR.forward``: same weights, equal outputs, at 12 blocks and at other depths)."""
        x, hidden_states_out = self.encoder_features(x_in)
        enc1 = self.encoder1(x_in)
        enc2 = self.encoder2(self.proj_feat(hidden_states_out[self.tap_layers[0]]))
        enc3 = self.encoder3(self.proj_feat(hidden_states_out[self.tap_layers[1]]))
        enc4 = self.encoder4(self.proj_feat(hidden_states_out[self.tap_layers[2]]))
        dec3 = self.decoder5(self.proj_feat(x), enc4)
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        return self.out(self.decoder2(dec1, enc1))

    def encoder_features(self, x_in: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """What the decoder reads of the encoder: the ViT's final tokens and its hidden states."""
        return self.vit(x_in)

    def parameter_report(self) -> dict:
        """:func:`~monai_prompt.peft.trainable_report` plus ``encoder_trainable`` (what the method trains in
        the ViT) and ``decoder`` (every parameter outside the ViT; all of them train)."""
        report = trainable_report(self)
        report["encoder_trainable"] = sum(p.numel() for p in self.vit.parameters() if p.requires_grad)
        report["decoder"] = sum(p.numel() for name, p in self.named_parameters() if not name.startswith("vit."))
        return report


def _check_backbone(vit: PromptableViT, in_channels: int, img_size: list[int], spatial_dims: int) -> None:
    """Raise a clear error if ``vit`` cannot be UNETR's encoder for this input."""
    cfg = vit.config
    if cfg["cls_token"]:
        raise ValueError("PromptUNETR needs a ViT without CLS token (UNETR's layout): build it with cls_token=False.")
    if any(p != UNETR_PATCH_SIZE for p in cfg["patch_size"]):
        raise ValueError(
            f"PromptUNETR needs patch size {UNETR_PATCH_SIZE}, got {cfg['patch_size']}: MONAI's UNETR decoder "
            f"up-samples the patch grid 16x to meet the full-resolution skip connection; use a _p16 backbone "
            f"(bundles: --backbone_overrides with 'patch_size': {UNETR_PATCH_SIZE}; weights pre-trained with another "
            f"patch size, such as bundles/vit_pretraining's default 4, do not fit: pre-train with patch_size "
            f"{UNETR_PATCH_SIZE})."
        )
    wanted = {"in_channels": in_channels, "img_size": img_size, "spatial_dims": spatial_dims}
    differ = {k: (v, cfg[k]) for k, v in wanted.items() if cfg[k] != v}
    if differ:
        raise ValueError(f"PromptUNETR arguments differ from the backbone's config (argument, backbone): {differ}.")
