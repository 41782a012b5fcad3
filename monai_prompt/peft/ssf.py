"""SSF (Lian et al., NeurIPS 2022): a trainable per-channel scale and shift after each frozen operation.

As in dongzelian/SSF ``models/vision_transformer.py`` (``tuning_mode="ssf"``), ``y -> y * scale + shift``
follows the patch embedding, ``norm1``, ``qkv``, ``out_proj``, ``norm2``, ``linear1`` (before the GELU),
``linear2`` and the final ``norm``; scale starts at N(1, 0.02), shift at N(0, 0.02). Each such module becomes
an SSF subclass of its own type (:class:`SSFLinear`, :class:`SSFLayerNorm`, :class:`SSFLayerNorm2d`,
:class:`SSFConv2d`, :class:`SSFConv3d`) that keeps its ``weight``/``bias`` keys and adds
``ssf_scale``/``ssf_shift``. Because each op is affine per output channel, each layer's ``merge`` (through
:func:`~monai_prompt.peft.merge.merge_and_unload`) folds scale and shift into its weight and bias and turns it
back into the plain module (re-parameterisation: the merged model is a plain ViT).

On the SAM-family encoders (``tinyvit``, ``sam``) the same rule covers their convolutions and the neck's channel
LayerNorms (``LayerNorm2d``), as the official ConvNeXt variant (``models/convnext.py``) scales after every
convolution and every channels-first LayerNorm. A TinyViT's BatchNorms are not scaled: each follows a scaled
convolution and, frozen in eval mode, is a per-channel affine map itself, so a second scale and shift after it
would span the same per-channel affine maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_prompt.backbones.recast import RecastLinear, linear
from monai_prompt.backbones.tinyvit import LayerNorm2d
from monai_prompt.backbones.vit import PromptableViT, backbone_key
from monai_prompt.peft.merge import MergeableLayer
from monai_prompt.peft.registry import register_method

__all__ = ["SSFConfig", "SSFConv2d", "SSFConv3d", "SSFLayerNorm", "SSFLayerNorm2d", "SSFLinear", "add_ssf"]


@dataclass
class SSFConfig:
    """Hyper-parameters of SSF.

    Args:
        init_std: standard deviation of the init, scale ~ N(1, init_std) and shift ~ N(0, init_std)
            (0.02 in ``init_ssf_scale_shift`` of the official code).
    """

    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.init_std < 0:
            raise ValueError(f"SSF init_std must be >= 0, got {self.init_std}.")


class _ScaleShift(MergeableLayer):
    """Per-output-channel ``ssf_scale``/``ssf_shift`` after the host module's own op, foldable into it.

    ``spatial_dims`` is how many axes follow the channel axis of the op's output: 0 for linears and
    LayerNorms (channels last), 2 or 3 for convolutions and channels-first norms (``[B, C, *spatial]``).
    """

    #: axes after the channel axis of the output of a channels-first op that is no convolution.
    channels_first_dims = 0

    added_attributes = ("ssf_scale", "ssf_shift", "spatial_dims")

    def _init_ssf(self, init_std: float) -> None:
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.ssf_scale = nn.Parameter(torch.empty(self.weight.shape[0], **factory))
        self.ssf_shift = nn.Parameter(torch.empty(self.weight.shape[0], **factory))
        nn.init.normal_(self.ssf_scale, mean=1.0, std=init_std)
        nn.init.normal_(self.ssf_shift, mean=0.0, std=init_std)
        conv = isinstance(self, nn.modules.conv._ConvNd)
        self.spatial_dims = self.weight.dim() - 2 if conv else self.channels_first_dims

    def _scale_shift(self, y: torch.Tensor) -> torch.Tensor:
        shape = [-1] + [1] * self.spatial_dims
        return y * self.ssf_scale.view(shape).to(y.dtype) + self.ssf_shift.view(shape).to(y.dtype)

    def fold(self) -> None:
        """Fold ``y * scale + shift`` into the op: ``weight <- scale * weight`` (per output channel),
        ``bias <- scale * bias + shift`` (a bias is created if the op had none)."""
        self.weight.mul_(self.ssf_scale.view([-1] + [1] * (self.weight.dim() - 1)))
        if self.bias is None:
            self.bias = nn.Parameter(self.ssf_shift.clone(), requires_grad=False)
        else:
            self.bias.mul_(self.ssf_scale).add_(self.ssf_shift)


class SSFLinear(_ScaleShift, nn.Linear):
    """``nn.Linear`` followed by a per-channel scale and shift (same ``weight``/``bias`` keys)."""

    base_class = nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._scale_shift(linear(x, self.weight, self.bias))


class SSFLayerNorm(_ScaleShift, nn.LayerNorm):
    """``nn.LayerNorm`` followed by a per-channel scale and shift (same ``weight``/``bias`` keys)."""

    base_class = nn.LayerNorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._scale_shift(F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps))


class SSFLayerNorm2d(_ScaleShift, LayerNorm2d):
    """The SAM-family neck's channel ``LayerNorm2d`` followed by a per-channel scale and shift (same keys)."""

    base_class = LayerNorm2d
    channels_first_dims = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, self.eps)
        return self._scale_shift(y.permute(0, 3, 1, 2))


class _ScaleShiftConv(_ScaleShift):
    """The forward of both SSF convolutions: the host's ``_conv_forward``, then the scale and shift."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._scale_shift(self._conv_forward(x, self.weight, self.bias))


class SSFConv2d(_ScaleShiftConv, nn.Conv2d):
    """``nn.Conv2d`` (the 2D patch embedding) followed by a per-channel scale and shift."""

    base_class = nn.Conv2d


class SSFConv3d(_ScaleShiftConv, nn.Conv3d):
    """``nn.Conv3d`` (the 3D patch embedding) followed by a per-channel scale and shift."""

    base_class = nn.Conv3d


#: plain module class -> its SSF subclass (a ViT block's linears are :class:`RecastLinear`).
_SSF_CLASSES: dict[type, type] = {
    **{cls.base_class: cls for cls in (SSFLinear, SSFLayerNorm, SSFLayerNorm2d, SSFConv2d, SSFConv3d)},
    RecastLinear: SSFLinear,
}


def add_ssf(module: nn.Module, init_std: float = 0.02) -> nn.Module:
    """Turn a plain ``nn.Linear``/``nn.LayerNorm``/``LayerNorm2d``/``nn.Conv2d``/``nn.Conv3d`` into its SSF subclass.

    Like ``torch.nn.utils.parametrize``, this swaps the module's class: its parameters, keys and every
    reference to it stay, and ``ssf_scale``/``ssf_shift`` are added.

    Args:
        module: the module to scale and shift.
        init_std: init spread, scale ~ N(1, init_std), shift ~ N(0, init_std).
    """
    cls = _SSF_CLASSES.get(type(module))
    if cls is None or getattr(module, "weight", None) is None:
        raise TypeError(
            f"SSF needs a plain {[c.__name__ for c in _SSF_CLASSES]} with a weight, got {type(module).__name__}."
        )
    module.__class__ = cls
    module._init_ssf(init_std)
    return module


@register_method("ssf", SSFConfig, trainable=r"\.ssf_(scale|shift)$", families=("vit", "tinyvit", "sam"))
def apply_ssf(vit: PromptableViT, config: SSFConfig) -> None:
    """Add scale and shift after every frozen op with a weight: the backbone's own linears, LayerNorms, neck
    LayerNorm2d and convolutions (the modules with an SSF subclass whose ``<name>.weight`` is a pre-trained backbone
    key). On a MONAI ViT that is every such key; a TinyViT's BatchNorms are not scaled (each follows a scaled
    convolution); merging gives the bias-free convolutions of the TinyViT and the SAM neck a bias."""
    keys = backbone_key(vit)
    for name, module in list(vit.named_modules()):
        if name and keys.match(f"{name}.weight") and type(module) in _SSF_CLASSES:
            add_ssf(module, config.init_std)
