"""Build the :class:`~monai_prompt.backbones.PromptableViT` a checkpoint needs from the checkpoint itself.

:func:`vit_from_pretrained` reads the architecture off the weights' shapes and keys: width, depth, MLP width,
patch size, spatial dims, input channels, ``qkv`` bias, CLS token, register tokens, LayerScale, pre-norm and the
patch grid of the position embeddings. Three settings are not in the shapes:

* attention heads: read from the config file beside the weights (HuggingFace ``config.json``, timm hub
  ``config.json`` through its model name, ``open_clip_config.json``) or given as ``num_heads=``; never guessed;
* LayerNorm epsilon and MLP activation: read from the config or given; otherwise the layout's default is
  *assumed*, logged as a warning and marked ``assumed`` in the report.

This module registers the ViT family (:func:`build_vit_backbone`) with
:func:`~monai_prompt.backbones.registry.register_family`: ``backbone="auto"`` goes through :func:`vit_from_pretrained`,
a preset name through :func:`~monai_prompt.backbones.build_vit` and :func:`~monai_prompt.backbones.load_pretrained`.
It is ``"auto"``'s fallback family: a checkpoint no other family recognises is read as a ViT.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai_prompt.backbones.pos_embed import source_grid
from monai_prompt.backbones.pretrained import (
    Checkpoint,
    CheckpointError,
    LoadReport,
    config_activation,
    load_pretrained,
    open_checkpoint,
)
from monai_prompt.backbones.registry import BackboneFamily, BackboneRequest, register_family
from monai_prompt.backbones.vit import VIT_PRESETS, PromptableViT, build_vit, is_vit_preset

__all__ = ["AUTO_OVERRIDES", "build_vit_backbone", "infer_vit_config", "vit_from_pretrained"]

logger = logging.getLogger(__name__)

#: what :func:`vit_from_pretrained` accepts besides the checkpoint: the target's input (channels, size, spatial
#: dims, patch size for a 3D model from 2D weights), whether it has a CLS token, dropout, and the settings the
#: weights do not hold.
AUTO_OVERRIDES = (
    "in_channels",
    "img_size",
    "spatial_dims",
    "patch_size",
    "cls_token",
    "dropout_rate",
    "num_heads",
    "layer_norm_eps",
    "act",
)


def _layout_defaults(checkpoint: Checkpoint) -> tuple[float, str, str]:
    """LayerNorm epsilon, MLP activation and why, assumed for a checkpoint whose config does not say."""
    layer_scale = "blocks.0.ls1.gamma" in checkpoint.state
    pre_norm = "norm_pre.weight" in checkpoint.state
    if checkpoint.layout == "hf":
        if layer_scale:
            return 1e-6, "gelu", "transformers Dinov2Config defaults"
        if pre_norm:
            return 1e-5, "quick_gelu", "transformers CLIPVisionConfig defaults"
        return 1e-12, "gelu", "transformers ViTConfig defaults"
    if checkpoint.layout == "timm":
        if pre_norm:
            return 1e-5, "gelu", "timm CLIP ViT defaults; OpenAI CLIP weights need act='quick_gelu'"
        return 1e-6, "gelu", "timm / DINO / DINOv2 / MAE defaults"
    if checkpoint.layout == "open_clip":
        return 1e-5, "quick_gelu", "OpenAI CLIP defaults; open_clip weights trained without QuickGELU need act='gelu'"
    return 1e-5, "gelu", "MONAI ViT defaults (nn.LayerNorm, GELU)"


def _num_blocks(checkpoint: Checkpoint) -> int:
    """Number of transformer blocks (each with attention and a two-layer MLP)."""
    found = {int(m.group(1)) for k in checkpoint.state if (m := re.match(r"^blocks\.(\d+)\.attn\.qkv\.weight$", k))}
    if not found:
        raise CheckpointError(
            f"{checkpoint.path}: no transformer blocks of a plain ViT (attention weights blocks.<i>.attn.qkv after "
            f"renaming the {checkpoint.layout} layout): a hierarchical network (Swin, ConvNeXt, ...) is not supported; "
            f"first keys: {sorted(checkpoint.tensors)[:8]}."
        )
    if sorted(found) != list(range(len(found))):
        raise CheckpointError(
            f"{checkpoint.path}: cannot tell the transformer blocks: attention weights for blocks {sorted(found)}."
        )
    if "blocks.0.mlp.linear1.weight" not in checkpoint.state:
        keys = sorted(k for k in checkpoint.state if k.startswith("blocks.0."))
        raise CheckpointError(f"{checkpoint.path}: block 0 has no two-layer MLP (mlp.linear1); its keys: {keys}.")
    return len(found)


def _patch_shape(checkpoint: Checkpoint, overrides: dict[str, Any]) -> tuple[int, int, tuple[int, ...]]:
    """Width, input channels and patch size of the checkpoint's patch embedding."""
    weight = checkpoint.state.get("patch_embedding.patch_embeddings.weight")
    if weight is not None:
        return weight.shape[0], weight.shape[1], tuple(weight.shape[2:])
    # MONAI proj_type="perceptron": a Linear over flattened patches, [D, prod(patch) * C]
    weight = checkpoint.state["patch_embedding.patch_embeddings.1.weight"]
    if "patch_size" not in overrides or "spatial_dims" not in overrides:
        raise CheckpointError(
            f"{checkpoint.path}: an old MONAI perceptron patch embedding {tuple(weight.shape)} does not tell the patch "
            f"size or spatial dims; pass patch_size=... and spatial_dims=... (e.g. 16 and 3 for a UNETR)."
        )
    dims = overrides["spatial_dims"]
    patch = overrides["patch_size"]
    patch = tuple(patch) if isinstance(patch, Sequence) else (int(patch),) * dims
    return weight.shape[0], weight.shape[1] // math.prod(patch), patch


def _per_dim(value: int | Sequence[int], dims: int) -> tuple[int, ...]:
    """A size setting (``img_size``, ``patch_size``) as one int per spatial dim."""
    return tuple(int(v) for v in value) if isinstance(value, Sequence) else (int(value),) * dims


def _target_grid(overrides: dict[str, Any], src_patch: tuple[int, ...]) -> tuple[int, ...] | None:
    """The patch grid of the model ``overrides`` describe (``img_size`` over the patch size), or None without
    ``img_size`` or for other spatial dims than the checkpoint's."""
    dims = len(src_patch)
    if "img_size" not in overrides or overrides.get("spatial_dims", dims) != dims:
        return None
    size, patch = _per_dim(overrides["img_size"], dims), _per_dim(overrides.get("patch_size", src_patch), dims)
    return tuple(s // p for s, p in zip(size, patch))


def infer_vit_config(
    checkpoint: Checkpoint, src_grid: Sequence[int] | None = None, **overrides: Any
) -> tuple[dict[str, Any], dict[str, tuple[Any, str]]]:
    """The :class:`PromptableViT` arguments ``checkpoint`` needs, and where each came from.

    Args:
        checkpoint: an opened checkpoint (:func:`~monai_prompt.backbones.pretrained.open_checkpoint`).
        src_grid: patch grid of a non-square position embedding without config (see ``load_pretrained``).
        overrides: any of :data:`AUTO_OVERRIDES`. ``in_channels``, ``img_size``, ``spatial_dims``,
            ``patch_size`` and ``cls_token`` describe the target model (the weights are adapted to it); the
            others replace what the config says or the layout assumes.

    Returns:
        the constructor arguments and, per setting, ``(value, origin)``.

    Raises:
        ValueError: an unknown override.
        CheckpointError: the number of heads is neither in a config nor given, or the weights are not a ViT.
    """
    unknown = sorted(set(overrides) - set(AUTO_OVERRIDES))
    if unknown:
        raise ValueError(
            f"unknown vit_from_pretrained overrides {unknown}; allowed: {list(AUTO_OVERRIDES)} (width, depth and MLP "
            f"width come from the weights)."
        )
    state, config, config_name = checkpoint.state, checkpoint.config, checkpoint.config_name or "config"
    inferred: dict[str, tuple[Any, str]] = {}

    def choose(name: str, found: Any, origin: str) -> Any:
        """``overrides[name]`` if given, else ``found`` (from ``origin``); recorded in ``inferred``."""
        value, origin = (overrides[name], "override") if name in overrides else (found, origin)
        if name in ("img_size", "patch_size"):
            value = _per_dim(value, dims)
        inferred[name] = (value, origin)
        return value

    hidden, src_channels, src_patch = _patch_shape(checkpoint, overrides)
    src_dims = len(src_patch)
    num_layers = _num_blocks(checkpoint)
    architecture = config.get("model_type") or _describe(checkpoint)
    inferred["architecture"] = (architecture, f"{config_name} model_type" if config.get("model_type") else "keys")
    inferred["layout"] = (checkpoint.layout, "keys")
    if src_grid is None:
        hint = 0 if checkpoint.layout.startswith("monai") else 1
        n_positions = state["patch_embedding.position_embeddings"].shape[1]
        target_grid = _target_grid(overrides, src_patch)
        try:
            _, src_grid = source_grid(n_positions, src_dims, config, hint, target_grid)
        except ValueError as err:
            raise CheckpointError(f"{checkpoint.path}: {err}") from err
        if config.get("image_size"):
            grid_origin = f"{config_name} image_size/patch_size"
        elif src_grid == target_grid:
            grid_origin = "position embeddings: the patch count of img_size"
        else:
            grid_origin = "position embeddings"
    else:
        grid_origin = "src_grid"
    inferred["source_grid"] = (tuple(src_grid), grid_origin)
    dims = choose("spatial_dims", src_dims, "weights")
    if "patch_size" in overrides and dims == src_dims and _per_dim(overrides["patch_size"], dims) != src_patch:
        raise CheckpointError(
            f"{checkpoint.path}: patch_size={overrides['patch_size']} but the weights' patch is {src_patch}: a patch "
            f"kernel is not resampled; patch_size sets only the depth of a 3D model's patch from 2D weights."
        )
    if dims < src_dims:
        raise CheckpointError(
            f"{checkpoint.path}: {src_dims}D weights (patch {src_patch}) cannot make a {dims}D model (only 2D weights "
            f"are inflated to 3D): build it with spatial_dims={src_dims}."
        )
    if "img_size" not in overrides and dims != src_dims:
        raise CheckpointError(
            f"{checkpoint.path}: a {dims}D model from {src_dims}D weights needs img_size=... (the volume size)."
        )
    heads = overrides.get("num_heads", config.get("num_attention_heads"))
    if heads is None:
        raise CheckpointError(
            f"{checkpoint.path}: the number of attention heads is not in the weights and no config file beside them "
            f"names it; pass num_heads=... (in a network: backbone_overrides={{'num_heads': ...}}); ViTs with "
            f"64-wide heads have hidden_size // 64 = {hidden // 64}."
        )
    if hidden % int(heads):
        raise CheckpointError(
            f"{checkpoint.path}: num_heads={heads} ({'override' if 'num_heads' in overrides else config_name}) does "
            f"not divide the width {hidden} of the weights; ViTs with 64-wide heads have {hidden // 64}."
        )
    eps, act, why = _layout_defaults(checkpoint)
    config_act = config_activation(checkpoint)
    has_eps = "layer_norm_eps" in config
    return {
        "in_channels": choose("in_channels", src_channels, "weights"),
        "img_size": choose("img_size", [g * p for g, p in zip(src_grid, src_patch)], "weights"),
        "patch_size": choose("patch_size", (src_patch[0],) * (dims - src_dims) + src_patch, "weights"),
        "hidden_size": choose("hidden_size", hidden, "weights"),
        "mlp_dim": choose("mlp_dim", state["blocks.0.mlp.linear1.weight"].shape[0], "weights"),
        "num_layers": choose("num_layers", num_layers, "weights"),
        "num_heads": choose("num_heads", heads, f"{config_name} num_attention_heads"),
        "dropout_rate": overrides.get("dropout_rate", 0.0),
        "spatial_dims": dims,
        "qkv_bias": choose("qkv_bias", "blocks.0.attn.qkv.bias" in state, "weights"),
        "layer_norm_eps": choose(
            "layer_norm_eps",
            config["layer_norm_eps"] if has_eps else eps,
            f"{config_name} layer_norm_eps" if has_eps else f"assumed: {why}",
        ),
        "cls_token": choose("cls_token", "cls_token" in state, "weights"),
        "layer_scale": choose("layer_scale", "blocks.0.ls1.gamma" in state, "weights"),
        "num_registers": choose(
            "num_registers", state["register_tokens"].shape[1] if "register_tokens" in state else 0, "weights"
        ),
        "pre_norm": choose("pre_norm", "norm_pre.weight" in state, "weights"),
        "act": choose("act", config_act or act, f"{config_name} hidden_act" if config_act else f"assumed: {why}"),
    }, inferred


def _describe(checkpoint: Checkpoint) -> str:
    """A family name from the keys alone: DINOv2-like (LayerScale), CLIP-like (pre-norm) or a plain ViT."""
    state = checkpoint.state
    if "blocks.0.ls1.gamma" in state:
        return "dinov2_with_registers" if "register_tokens" in state else "dinov2"
    if "norm_pre.weight" in state:
        return "clip_vision"
    return "vit"


def vit_from_pretrained(
    path: str | Path, strict: bool = True, src_grid: Sequence[int] | None = None, **overrides: Any
) -> tuple[PromptableViT, LoadReport]:
    """Build the PromptableViT that the checkpoint at ``path`` needs and load it.

    Args:
        path: anything :func:`~monai_prompt.backbones.load_pretrained` reads (HuggingFace / open_clip directory,
            timm, original DINOv2 or MONAI weight file).
        strict: as for ``load_pretrained``.
        src_grid: patch grid of a non-square position embedding without config.
        overrides: any of :data:`AUTO_OVERRIDES` (see :func:`infer_vit_config`); ``num_heads`` is required when no
            config file names it.

    Returns:
        the loaded ViT and the :class:`~monai_prompt.backbones.LoadReport`, whose ``inferred`` says where each
        architecture setting came from (assumed ones are also logged as a warning).

    Example::

        >>> vit, report = vit_from_pretrained("weights/rad-dino", in_channels=1, img_size=224)
        >>> print(report)
    """
    checkpoint = open_checkpoint(path)
    kwargs, inferred = infer_vit_config(checkpoint, src_grid, **overrides)
    assumed = [
        f"{name}={value!r} ({origin})" for name, (value, origin) in inferred.items() if origin.startswith("assumed")
    ]
    if assumed:
        logger.warning(
            f"{path}: the checkpoint's config does not say, so vit_from_pretrained assumed {'; '.join(assumed)}. "
            f"Pass the right value as an override if the checkpoint was trained otherwise."
        )
    vit = PromptableViT(**kwargs)
    report = load_pretrained(vit, checkpoint, strict=strict, src_grid=src_grid)
    report.inferred = inferred
    logger.info("built from %s: %s", path, ", ".join(f"{k}={v} ({o})" for k, (v, o) in inferred.items()))
    return vit, report


def build_vit_backbone(
    backbone: str | PromptableViT, pretrained: str | Path | None, request: BackboneRequest
) -> PromptableViT:
    """The ViT family's builder (see :func:`~monai_prompt.backbones.build_backbone`): ``"auto"`` through
    :func:`vit_from_pretrained` (architecture and LayerNorm epsilon from the checkpoint, the input from
    ``request``), a preset through :func:`~monai_prompt.backbones.build_vit`; then
    :func:`~monai_prompt.backbones.load_pretrained` for a preset or a ready :class:`PromptableViT`.

    Args:
        backbone: ``"auto"``, a preset name or a ready :class:`PromptableViT`.
        pretrained: weights; required for ``"auto"``.
        request: the network's input and settings (``overrides``: :func:`build_vit` overrides for a preset,
            :data:`AUTO_OVERRIDES` for ``"auto"``; for both, ``src_grid``: the patch grid of a checkpoint's non-square
            position embeddings, see :func:`~monai_prompt.backbones.load_pretrained`).
    """
    target = {"in_channels": request.in_channels, "img_size": request.img_size, "spatial_dims": request.spatial_dims}
    overrides = dict(request.overrides)
    src_grid = overrides.pop("src_grid", None)
    if isinstance(backbone, str) and backbone == "auto":
        target.update(cls_token=request.cls_token, dropout_rate=request.dropout_rate)
        vit, _ = vit_from_pretrained(pretrained, request.strict, src_grid, **{**target, **overrides})
        return vit
    if isinstance(backbone, str):
        backbone = build_vit(
            backbone,
            **target,
            layer_norm_eps=request.layer_norm_eps,
            dropout_rate=request.dropout_rate,
            cls_token=request.cls_token,
            **overrides,
        )
    if pretrained:
        load_pretrained(backbone, pretrained, request.strict, src_grid)
    return backbone


register_family(
    BackboneFamily(
        name=PromptableViT.family,
        build=build_vit_backbone,
        is_preset=is_vit_preset,
        presets=f"{', '.join(VIT_PRESETS)} (optionally _p<patch>, e.g. vit_small_p8)",
        module=__name__,
    )
)
