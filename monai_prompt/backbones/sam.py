"""The Segment Anything ViT image encoder (SAM, MedSAM, SAM-Med2D): the backbone family ``"sam"``.

SAM's image encoder (Kirillov et al., ICCV 2023; ``segment_anything.modeling.ImageEncoderViT``, from ViTDet) is a
plain ViT on a 2D patch grid with no CLS token, and:

* an absolute position embedding ``pos_embed`` ``[1, H', W', C]`` added to the patch grid;
* windowed attention (``window_size`` x ``window_size`` windows, the grid zero-padded at the bottom/right to whole
  windows) in every block but the global-attention blocks ``global_attn_indexes``;
* decomposed relative positions (MViTv2): per block, tables ``rel_pos_h``/``rel_pos_w`` ``[2 S - 1, head_dim]``
  (``S``: the window side, or the grid side in a global block) give an additive attention bias
  ``q . R_h[i_h - j_h] + q . R_w[i_w - j_w]``;
* a convolutional neck (1x1 then 3x3 convolutions, each followed by a channel LayerNorm) to ``out_chans``.

This module re-implements it with the official module's state-dict keys, so the ``image_encoder.*`` keys of a SAM
or MedSAM checkpoint load after their prefix is stripped (a transformers ``SamModel``'s ``vision_encoder.*`` after
they are renamed to them), and ``tests/test_sam.py`` checks the forward against the
``segment-anything`` 1.0 package. ``backbone="auto"`` recognises such a checkpoint (:func:`is_sam_state`) and
:func:`infer_sam_config` reads the architecture off its shapes; :func:`load_sam_weights` fits the position tables
to another input size (the absolute embedding bilinearly, as SAMed's and SAM-Med2D's ``interpolate_state_dict``;
the relative tables linearly, as ``get_rel_pos`` does) and the patch kernel to other input channels.

For classification :meth:`SAMImageEncoder.forward_features` averages the neck's map over space. PEFT methods find
the seams of the other families: ``blocks`` (each with ``set_parallel``), ``block_linears`` (LoRA targets by MONAI
ViT name), ``backbone_key`` (the pre-trained parameter names) and each block's ``attn.attend(q, k, v, bias)``
(EPT's subclass overrides it).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from monai_prompt.backbones.pretrained import (
    CheckpointError,
    LoadReport,
    WeightFile,
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
)
from monai_prompt.backbones.tinyvit import LayerNorm2d

__all__ = [
    "SAM_AUTO_OVERRIDES",
    "SAM_KEY",
    "SAM_PRESETS",
    "SAMBlock",
    "SAMImageEncoder",
    "build_sam",
    "build_sam_backbone",
    "infer_sam_config",
    "is_sam_state",
    "load_sam_weights",
    "resize_rel_pos",
    "sam_encoder_state",
    "sam_from_pretrained",
]

logger = logging.getLogger(__name__)

_COMMON = {"patch_size": 16, "mlp_ratio": 4.0, "out_chans": 256, "qkv_bias": True, "window_size": 14}
#: architectures by name, as ``segment_anything.build_sam`` builds them (1024 x 1024 RGB inputs).
SAM_PRESETS: dict[str, dict[str, Any]] = {
    "sam_vit_b": {**_COMMON, "embed_dim": 768, "depth": 12, "num_heads": 12, "global_attn_indexes": (2, 5, 8, 11)},
    "sam_vit_l": {**_COMMON, "embed_dim": 1024, "depth": 24, "num_heads": 16, "global_attn_indexes": (5, 11, 17, 23)},
    "sam_vit_h": {**_COMMON, "embed_dim": 1280, "depth": 32, "num_heads": 16, "global_attn_indexes": (7, 15, 23, 31)},
}
#: what ``backbone="auto"`` takes besides the checkpoint (the network's input comes from the network): settings
#: the shapes leave open when a window equals the whole grid (windowed and global blocks then look alike).
SAM_AUTO_OVERRIDES = ("num_heads", "window_size", "global_attn_indexes")
#: keys every SAM image encoder has (under a prefix: ``image_encoder.`` in a whole SAM/MedSAM, ``module.`` ...).
_MARKERS = ("patch_embed.proj.weight", "pos_embed", "blocks.0.attn.rel_pos_h", "neck.0.weight")
#: transformers' ``SamModel``/``SamVisionModel`` (the Hub's ``facebook/sam-vit-base``, ``wanglab/medsam-vit-base``):
#: its ``vision_encoder.*`` names -> segment_anything's ``image_encoder.*`` (the first rule that matches).
_HF_ENCODER, _HF_MARKERS = "vision_encoder.", ("patch_embed.projection.weight", "pos_embed", "neck.conv1.weight")
_HF_RENAMES = (
    (re.compile(r"^patch_embed\.projection\."), "patch_embed.proj."),
    (re.compile(r"^layers\.(\d+)\.layer_norm([12])\."), r"blocks.\1.norm\2."),
    (re.compile(r"^layers\.(\d+)\."), r"blocks.\1."),
    (re.compile(r"^neck\.conv1\."), "neck.0."),
    (re.compile(r"^neck\.layer_norm1\."), "neck.1."),
    (re.compile(r"^neck\.conv2\."), "neck.2."),
    (re.compile(r"^neck\.layer_norm2\."), "neck.3."),
)

#: the pre-trained parameter names of a :class:`SAMImageEncoder` (what a method adds, e.g. ``lora_A``, matches none).
SAM_KEY = re.compile(
    r"^(patch_embed\.proj\.(weight|bias)|pos_embed"
    r"|blocks\.\d+\.(norm[12]\.(weight|bias)|attn\.(qkv|proj)\.(weight|bias)|attn\.rel_pos_[hw]"
    r"|mlp\.lin[12]\.(weight|bias))"
    r"|neck\.\d+\.weight|neck\.[13]\.bias)$"
)


def resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """A relative position table ``[L, C]`` resized to ``[length, C]`` by linear interpolation (``align_corners``
    False), as ``segment_anything``'s ``get_rel_pos`` does when the table does not fit the attention size."""
    if rel_pos.shape[0] == length:
        return rel_pos
    resized = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=length, mode="linear")
    return resized.reshape(-1, length).permute(1, 0)


def _rel_pos_grid(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """``R[i, j] = table[i - j + size - 1]``, ``[size, size, C]``, for queries and keys on the same ``size`` axis."""
    table = resize_rel_pos(rel_pos, 2 * size - 1)
    coords = torch.arange(size, device=rel_pos.device)
    return table[coords[:, None] - coords[None, :] + (size - 1)]


def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``[B, H, W, C]`` to windows ``[B * n, window, window, C]`` (zero-padded at the bottom/right) and the padded
    ``(H, W)``."""
    b, h, w, c = x.shape
    pad_h, pad_w = (window_size - h % window_size) % window_size, (window_size - w % window_size) % window_size
    if pad_h > 0 or pad_w > 0:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window_size, window_size, wp // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c), (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window_size: int, padded: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """The inverse of :func:`window_partition`: windows back to ``[B, H, W, C]`` without the padding."""
    hp, wp = padded
    h, w = size
    b = windows.shape[0] // (hp * wp // window_size // window_size)
    x = windows.view(b, hp // window_size, wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w] if hp > h or wp > w else x


class PatchEmbed(nn.Module):
    """Patch embedding ``proj`` (a convolution with kernel = stride = ``patch_size``), channels last out.

    Args:
        in_channels: image channels.
        embed_dim: token width.
        patch_size: patch side.
    """

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class MLPBlock(nn.Module):
    """``lin2(gelu(lin1(x)))``.

    Args:
        dim: token width.
        hidden_dim: hidden width.
    """

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden_dim)
        self.lin2 = nn.Linear(hidden_dim, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class RelPosAttention(nn.Module):
    """Multi-head self-attention over a ``[B, H, W, C]`` grid with decomposed relative positions.

    ``softmax(q k^T / sqrt(d) + bias) v`` with ``bias[(i_h, i_w), (j_h, j_w)] = q . R_h[i_h - j_h] + q . R_w[i_w -
    j_w]``; with SDPA on, the bias is its additive mask (the same maths, PyTorch's fused kernel).

    Args:
        dim: token width.
        num_heads: attention heads (``dim`` must be divisible by it).
        qkv_bias: whether ``qkv`` has a bias.
        size: the attention's side (the window, or the grid for global attention): tables of ``2 size - 1`` rows.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, size: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"SAM encoder width {dim} is not divisible by its {num_heads} attention heads.")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.use_sdpa = False
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * size - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * size - 1, head_dim))

    def rel_pos_bias(self, q: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """The relative-position bias ``[B, heads, H W, H W]`` of queries ``q`` ``[B, heads, H W, head_dim]``."""
        b, heads, _, dim = q.shape
        grid_q = q.reshape(b, heads, h, w, dim)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, _rel_pos_grid(h, self.rel_pos_h))
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, _rel_pos_grid(w, self.rel_pos_w))
        return (rel_h[:, :, :, :, :, None] + rel_w[:, :, :, :, None, :]).reshape(b, heads, h * w, h * w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        out = self.attend(q, k, v, self.rel_pos_bias(q, h, w))
        return self.proj(out.transpose(1, 2).reshape(b, h, w, c))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``softmax(q k^T / sqrt(d) + bias) v`` of ``[B, heads, N, head_dim]`` queries, keys and values (the seam
        EPT's subclass overrides)."""
        if self.use_sdpa:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return ((q * self.scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1) @ v


class SAMBlock(nn.Module):
    """SAM encoder block on ``[B, H, W, C]``: ``x + attn(norm1(x))`` (windowed unless ``window_size`` is 0), then
    ``x + mlp(norm2(x)) + parallel(x)``: ``parallel`` is the seam of
    :meth:`~monai_prompt.backbones.PromptBlock.set_parallel` (AdaptFormer), off until set.

    Args:
        dim: token width (``hidden_size``).
        num_heads: attention heads.
        mlp_ratio: MLP hidden width = ``dim * mlp_ratio``.
        qkv_bias: whether ``qkv`` has a bias.
        window_size: attention window side; 0 for global attention over the whole grid.
        grid_size: side of the patch grid (the relative tables' size in a global block).
        layer_norm_eps: LayerNorm epsilon.
    """

    __constants__ = ["has_parallel", "window_size"]

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        window_size: int,
        grid_size: int,
        layer_norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.hidden_size = dim
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.attn = RelPosAttention(dim, num_heads, qkv_bias, window_size if window_size > 0 else grid_size)
        self.norm2 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))
        self.has_parallel = False
        self.parallel: nn.Module = nn.Identity()

    def set_parallel(self, branch: nn.Module) -> None:
        """Add ``branch(x_after_attention)`` beside the MLP in every later forward."""
        self.parallel = branch
        self.has_parallel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            windows, padded = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(windows), self.window_size, padded, (h, w))
        else:
            x = self.attn(x)
        x = shortcut + x
        if self.has_parallel:
            return x + self.mlp(self.norm2(x)) + self.parallel(x)
        return x + self.mlp(self.norm2(x))


class SAMImageEncoder(nn.Module):
    """SAM's ViT image encoder (``segment_anything``'s ``ImageEncoderViT`` with relative positions), family ``"sam"``.

    :meth:`forward` returns the neck's image embedding ``[B, out_chans, H / p, W / p]``, :meth:`forward_tokens` the
    tokens before the neck ``[B, H / p, W / p, embed_dim]`` and :meth:`forward_features` the embedding averaged over
    space ``[B, out_chans]`` (what a classifier reads; ``hidden_size`` is ``out_chans``); :meth:`forward_hidden_states`
    the grid after every block (what a UNETR decoder taps). The input must be
    ``img_size`` square (the absolute position embedding has one entry per patch).

    Args:
        in_channels: image channels.
        img_size: input side.
        patch_size: patch side.
        embed_dim: token width.
        depth: blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / token width.
        out_chans: channels of the neck.
        qkv_bias: whether ``qkv`` has a bias.
        window_size: attention window of the windowed blocks (0: every block global).
        global_attn_indexes: the blocks with global attention.
        layer_norm_eps: LayerNorm epsilon (SAM: 1e-6).
    """

    #: the backbone family PEFT methods declare support for.
    family = "sam"
    #: pre-trained parameter names (counted as the backbone, fingerprinted by deltas).
    backbone_key = SAM_KEY
    #: the block linears by their MONAI ViT names (LoRA ``targets``).
    block_linears = {"qkv": "attn.qkv", "out_proj": "attn.proj", "linear1": "mlp.lin1", "linear2": "mlp.lin2"}

    def __init__(
        self,
        in_channels: int = 3,
        img_size: int = 1024,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        window_size: int = 14,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
        layer_norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        outside = sorted(set(global_attn_indexes) - set(range(depth)))
        if outside:
            raise ValueError(f"SAM encoder global_attn_indexes {outside} are not blocks of a depth-{depth} encoder.")
        grid = img_size // patch_size
        if grid < 1 or img_size % patch_size:
            raise ValueError(
                f"SAM encoder input {img_size} is not a multiple of its patch {patch_size} (its last "
                f"{img_size % patch_size} rows and columns would be cut off): use img_size "
                f"{max(grid, 1) * patch_size} or {(grid + 1) * patch_size}."
            )
        self.patch_embed = PatchEmbed(in_channels, embed_dim, patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            SAMBlock(
                embed_dim,
                num_heads,
                mlp_ratio,
                qkv_bias,
                0 if i in global_attn_indexes else window_size,
                grid,
                layer_norm_eps,
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        self.config = {
            "family": self.family,
            "in_channels": in_channels,
            "img_size": [img_size, img_size],
            "patch_size": patch_size,
            "embed_dim": embed_dim,
            "depth": depth,
            "num_heads": num_heads,
            "mlp_ratio": mlp_ratio,
            "out_chans": out_chans,
            "qkv_bias": qkv_bias,
            "window_size": window_size,
            "global_attn_indexes": sorted(int(i) for i in global_attn_indexes),
            "layer_norm_eps": layer_norm_eps,
        }
        self.in_channels = in_channels
        self.img_size = [img_size, img_size]
        self.grid_size = [grid, grid]
        self.hidden_size = out_chans
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations.

        Raises:
            TypeError: ``enable`` is not a bool (the ViT's modes ``"attn"``, ``"mlp"``, ... do not apply).
        """
        if not isinstance(enable, bool):
            raise TypeError(f"grad_checkpointing {enable!r}: the SAM encoder recomputes whole blocks; pass a bool.")
        self.grad_checkpointing = enable

    def set_sdpa(self, enable: bool = True) -> None:
        """Run attention (relative positions as an additive mask) through PyTorch SDPA."""
        for block in self.blocks:
            block.attn.use_sdpa = enable

    @torch.jit.unused
    def _checkpointed(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(block, x, use_reentrant=False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The patch grid with its absolute positions, ``[B, H / p, W / p, embed_dim]``: what block 0 takes."""
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"SAM encoder input has {x.shape[1]} channels, the encoder was built for in_channels="
                f"{self.in_channels}; convert the input or rebuild the model."
            )
        x = self.patch_embed(x)
        if x.shape[1:3] != self.pos_embed.shape[1:3]:
            raise ValueError(
                f"SAM encoder input {list(x.shape[1:3])} patches a side, its position embedding "
                f"{list(self.pos_embed.shape[1:3])}: resize the images to img_size {self.img_size}."
            )
        return x + self.pos_embed

    def forward_hidden_states(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The grid after every block, ``[B, H / p, W / p, embed_dim]`` each, of images ``[B, in_channels, H, W]``
        (what a UNETR decoder taps)."""
        x = self.embed(x)
        hidden_states: list[torch.Tensor] = []
        for block in self.blocks:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = self._checkpointed(block, x)
            else:
                x = block(x)
            hidden_states.append(x)
        return hidden_states

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The tokens before the neck, ``[B, H / p, W / p, embed_dim]``, of images ``[B, in_channels, H, W]``."""
        return self.forward_hidden_states(x)[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The image embedding ``[B, out_chans, H / p, W / p]`` (the neck's map)."""
        return self.neck(self.forward_tokens(x).permute(0, 3, 1, 2))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """One feature vector per image, ``[B, out_chans]``: the image embedding averaged over space."""
        return self.forward(x).mean(dim=(2, 3))


def build_sam(
    name: str = "sam_vit_b",
    in_channels: int = 3,
    img_size: int | Sequence[int] = 1024,
    spatial_dims: int = 2,
    **overrides: Any,
) -> SAMImageEncoder:
    """Build a randomly initialised :class:`SAMImageEncoder` from a preset.

    Args:
        name: a key of :data:`SAM_PRESETS`.
        in_channels: image channels.
        img_size: square input side (an int, or equal sides).
        spatial_dims: must be 2.
        overrides: replace preset fields (``embed_dim``, ``depth``, ``window_size``, ...), e.g. for tiny models.
    """
    fields = preset_fields(name, SAM_PRESETS, overrides, "SAM encoder", extra=("layer_norm_eps",))
    size = square_2d_side(img_size, spatial_dims, f"the SAM encoder ({name!r})")
    return SAMImageEncoder(in_channels=in_channels, img_size=size, **fields)


def _segment_anything_names(tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """``tensors`` with a transformers SAM's ``vision_encoder.*`` keys renamed to segment_anything's
    ``image_encoder.*`` (anything before them kept); a checkpoint of another layout as it is."""
    prefix = encoder_prefix(tensors, tuple(_HF_ENCODER + m for m in _HF_MARKERS))
    if prefix is None:
        return tensors
    renamed = {}
    for key, value in tensors.items():
        if key.startswith(prefix + _HF_ENCODER):
            rest = key[len(prefix + _HF_ENCODER) :]
            for pattern, new in _HF_RENAMES:
                rest, count = pattern.subn(new, rest, count=1)
                if count:
                    break
            key = f"{prefix}image_encoder.{rest}"
        renamed[key] = value
    return renamed


def sam_encoder_state(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The encoder's tensors of a checkpoint under :class:`SAMImageEncoder` keys, and the keys left out.

    A whole SAM/MedSAM checkpoint holds ``image_encoder.*``, ``prompt_encoder.*`` and ``mask_decoder.*``: the
    first lose their prefix, the others are left out. An encoder alone is taken as it is; a prefix before either
    (``module.`` of ``DataParallel``) is stripped too. A transformers ``SamModel``'s ``vision_encoder.*`` is renamed
    to segment_anything's keys first.
    """
    tensors = _segment_anything_names(tensors)
    prefix = encoder_prefix(tensors, _MARKERS) or ""
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    return state, sorted(k for k in tensors if not k.startswith(prefix))


def is_sam_state(tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether a checkpoint's tensors are a SAM image encoder's (alone, a whole SAM's ``image_encoder.*``, or a
    transformers ``SamModel``'s ``vision_encoder.*``)."""
    return encoder_prefix(_segment_anything_names(tensors), _MARKERS) is not None


def infer_sam_config(
    tensors: Mapping[str, torch.Tensor], **overrides: Any
) -> tuple[dict[str, Any], dict[str, tuple[Any, str]]]:
    """The :class:`SAMImageEncoder` arguments a checkpoint needs, read off its shapes, and where each came from.

    Width, patch size and input channels from ``patch_embed.proj.weight``; the grid from ``pos_embed``; depth from
    the block indices; heads from the width over the tables' ``head_dim`` (SAM's 64); MLP ratio from ``lin1``;
    ``qkv`` bias from its presence; ``out_chans`` from the neck; and which blocks are global from the relative
    tables: ``2 * grid - 1`` rows in a global block, ``2 * window - 1`` in a windowed one.

    Args:
        tensors: the checkpoint (whole SAM or encoder alone).
        overrides: :data:`SAM_AUTO_OVERRIDES`; a value the shapes contradict is an error.

    Raises:
        ValueError: unknown overrides, or shapes that are no SAM encoder's or contradict an override.
        CheckpointError: the tensors are no SAM image encoder's (named with their first keys).
    """
    unknown = sorted(set(overrides) - set(SAM_AUTO_OVERRIDES))
    if unknown:
        raise ValueError(f"unknown SAM encoder overrides {unknown} for backbone='auto'; allowed: {SAM_AUTO_OVERRIDES}.")
    if not is_sam_state(tensors):
        raise CheckpointError(
            f"not a SAM image encoder: no prefix holds all of {list(_MARKERS)}; first keys: {sorted(tensors)[:8]}."
        )
    state, _ = sam_encoder_state(tensors)
    patch = state["patch_embed.proj.weight"]
    embed_dim, in_channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[-1]
    grid = state["pos_embed"].shape[1]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    head_dim = state["blocks.0.attn.rel_pos_h"].shape[1]
    inferred: dict[str, tuple[Any, str]] = {
        "embed_dim": (embed_dim, "patch_embed.proj.weight"),
        "patch_size": (patch_size, "patch_embed.proj.weight"),
        "in_channels (checkpoint)": (in_channels, "patch_embed.proj.weight"),
        "img_size (checkpoint)": (grid * patch_size, "pos_embed grid x patch_size"),
        "depth": (depth, "block indices"),
        "mlp_ratio": (state["blocks.0.mlp.lin1.weight"].shape[0] / embed_dim, "blocks.0.mlp.lin1.weight"),
        "out_chans": (state["neck.0.weight"].shape[0], "neck.0.weight"),
        "qkv_bias": ("blocks.0.attn.qkv.bias" in state, "presence of blocks.0.attn.qkv.bias"),
    }
    heads = embed_dim // head_dim
    if embed_dim % head_dim:
        raise ValueError(f"SAM encoder width {embed_dim} is not a multiple of its relative tables' width {head_dim}.")
    if overrides.get("num_heads", heads) != heads:
        raise ValueError(
            f"num_heads={overrides['num_heads']} contradicts the checkpoint: width {embed_dim} over the relative "
            f"tables' {head_dim} channels per head is {heads} heads."
        )
    inferred["num_heads"] = (heads, f"embed_dim / rel_pos_h width {head_dim}")
    lengths = {i: state[f"blocks.{i}.attn.rel_pos_h"].shape[0] for i in range(depth)}
    if "global_attn_indexes" in overrides:
        global_blocks = sorted(int(i) for i in overrides["global_attn_indexes"])
        inferred["global_attn_indexes"] = (global_blocks, "override")
    else:
        global_blocks = [i for i, n in lengths.items() if n == 2 * grid - 1]
        inferred["global_attn_indexes"] = (global_blocks, f"blocks whose rel_pos_h has 2 * {grid} - 1 rows")
    windows = {(n + 1) // 2 for i, n in lengths.items() if i not in global_blocks}
    if "window_size" in overrides:
        window = int(overrides["window_size"])
        inferred["window_size"] = (window, "override")
    elif len(windows) > 1:
        raise ValueError(f"SAM encoder windowed blocks have relative tables of different sizes {dict(lengths)}.")
    else:
        window = windows.pop() if windows else 0
        origin = "rel_pos_h rows of the windowed blocks" if window else "no windowed block"
        inferred["window_size"] = (window, origin)
    kwargs = {
        "patch_size": patch_size,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": heads,
        "mlp_ratio": inferred["mlp_ratio"][0],
        "out_chans": inferred["out_chans"][0],
        "qkv_bias": inferred["qkv_bias"][0],
        "window_size": window,
        "global_attn_indexes": tuple(global_blocks),
    }
    return kwargs, inferred


def load_sam_weights(model: SAMImageEncoder, source: str | Path | WeightFile, strict: bool = True) -> LoadReport:
    """Load SAM image-encoder weights into ``model`` and report what was fitted.

    The absolute position embedding is resized bilinearly to ``model``'s grid (``align_corners`` False, as SAMed
    and SAM-Med2D do for 256/512 inputs), relative tables of another length linearly (as ``get_rel_pos``: the
    global blocks' tables follow the grid), and the patch kernel summed or repeated over other input channels.

    Args:
        model: a plain :class:`SAMImageEncoder` (load before applying a PEFT method).
        source: a whole SAM/MedSAM checkpoint (``image_encoder.*`` keys; the prompt encoder and mask decoder are
            left out) or an encoder's state_dict, as a torch file (read with ``weights_only=True``) or safetensors,
            or such a file already read (:class:`~monai_prompt.backbones.pretrained.WeightFile`).
        strict: every key of ``model`` must be loaded and no encoder key left over.

    Raises:
        ValueError: the encoder's keys or shapes do not fit ``model``'s architecture.
    """
    weights = read_checkpoint(source)
    state, others = sam_encoder_state(weights.tensors)
    target = model.state_dict()
    state = cast_like(state, target)
    report = LoadReport(path=weights.path, layout="segment_anything", entry=weights.entry)
    if others:
        report.ignored = {
            f"{len(others)} keys": f"not the image encoder ({', '.join(sorted({k.split('.')[0] for k in others}))})"
        }
    pos = state.get("pos_embed")
    if pos is not None and pos.dim() == 4 and pos.shape[1:3] != target["pos_embed"].shape[1:3]:
        resized = F.interpolate(pos.permute(0, 3, 1, 2).double(), size=model.grid_size, mode="bilinear")
        state["pos_embed"] = resized.permute(0, 2, 3, 1).to(pos.dtype)
        report.adapted.append(f"pos_embed resized bilinearly from {list(pos.shape[1:3])} to {model.grid_size}")
    resized_tables = []
    for key, value in state.items():
        if re.fullmatch(r"blocks\.\d+\.attn\.rel_pos_[hw]", key) and key in target:
            length = target[key].shape[0]
            if value.dim() == 2 and value.shape[0] != length:
                state[key] = resize_rel_pos(value.double(), length).to(value.dtype)
                resized_tables.append(f"{key} {value.shape[0]} -> {length}")
    if resized_tables:
        report.adapted.append(f"relative tables resized linearly: {', '.join(resized_tables)}")
    kernel = state.get("patch_embed.proj.weight")
    if kernel is not None and kernel.shape[1] != target["patch_embed.proj.weight"].shape[1]:
        state["patch_embed.proj.weight"] = _adapt_patch_weight(
            kernel, target["patch_embed.proj.weight"], report.adapted
        )
    if any(k in target and v.shape != target[k].shape for k, v in state.items()):
        raise CheckpointError(
            f"{source}: not a SAM image encoder of this architecture ({model.config}): {state_mismatch(state, target)}"
            f"; build it with backbone='auto' to read the architecture off the checkpoint."
        )
    report.missing = sorted(set(target) - set(state))
    report.unexpected = sorted(set(state) - set(target))
    if strict and (report.missing or report.unexpected):
        fix = (
            "build it with backbone='auto' to read the architecture off the checkpoint"
            if report.missing
            else "to load the encoder without the layers it lacks (e.g. SAM-Med2D's adapters), pass strict=False "
            "(in a network: pretrained_strict=False)"
        )
        raise CheckpointError(
            f"{source}: not a SAM image encoder of this architecture ({model.config}): {state_mismatch(state, target)}"
            f"; {fix}."
        )
    model.load_state_dict({k: v for k, v in state.items() if k in target}, strict=False)
    report.loaded = sorted(k for k in state if k in target)
    model.pretrained_source = str(source)  # what a delta's backbone identity names (monai_prompt.peft.delta)
    return report


def sam_from_pretrained(
    path: str | Path,
    in_channels: int | None = None,
    img_size: int | Sequence[int] | None = None,
    spatial_dims: int = 2,
    strict: bool = True,
    **overrides: Any,
) -> tuple[SAMImageEncoder, LoadReport]:
    """The :class:`SAMImageEncoder` a SAM/MedSAM checkpoint needs, built from its shapes, its weights loaded.

    Args:
        path: a whole SAM/MedSAM checkpoint (e.g. MedSAM's ``medsam_vit_b.pth``) or an encoder's state_dict.
        in_channels: the input's channels (default the checkpoint's; others adapt the patch kernel).
        img_size: the input side (default the checkpoint's; others resize the position tables).
        spatial_dims: must be 2.
        strict: as for :func:`load_sam_weights`.
        overrides: :data:`SAM_AUTO_OVERRIDES`.

    Example::

        >>> encoder, report = sam_from_pretrained("medsam_vit_b.pth", in_channels=1, img_size=256)
        >>> print(report)
    """
    weights = read_checkpoint(path)
    try:
        kwargs, inferred = infer_sam_config(weights.tensors, **overrides)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    in_channels = inferred["in_channels (checkpoint)"][0] if in_channels is None else in_channels
    size = inferred["img_size (checkpoint)"][0] if img_size is None else square_2d_side(img_size, spatial_dims, "SAM")
    encoder = SAMImageEncoder(in_channels=in_channels, img_size=size, **kwargs)
    report = load_sam_weights(encoder, weights, strict)
    report.inferred = inferred
    logger.info("built from %s: %s", path, ", ".join(f"{k}={v} ({o})" for k, (v, o) in inferred.items()))
    return encoder, report


def build_sam_backbone(
    backbone: str | SAMImageEncoder, pretrained: str | Path | None, request: BackboneRequest
) -> SAMImageEncoder:
    """The SAM family's builder (see :func:`~monai_prompt.backbones.build_backbone`): ``"auto"`` through
    :func:`sam_from_pretrained` (the architecture from the checkpoint, the input from ``request``), a preset
    through :func:`build_sam`, or a ready :class:`SAMImageEncoder`; then :func:`load_sam_weights`.

    Args:
        backbone: ``"auto"``, a key of :data:`SAM_PRESETS` or a ready :class:`SAMImageEncoder`.
        pretrained: a SAM/MedSAM checkpoint or an encoder's state_dict; required for ``"auto"``.
        request: the network's input (``in_channels``, ``img_size``, ``spatial_dims``), ``strict`` and
            ``overrides`` (preset fields; for ``"auto"``, :data:`SAM_AUTO_OVERRIDES`).
    """
    if isinstance(backbone, str) and backbone == "auto":
        encoder, _ = sam_from_pretrained(
            pretrained, request.in_channels, request.img_size, request.spatial_dims, request.strict, **request.overrides
        )
        return encoder
    if isinstance(backbone, str):
        backbone = build_sam(backbone, request.in_channels, request.img_size, request.spatial_dims, **request.overrides)
    if pretrained:
        load_sam_weights(backbone, pretrained, request.strict)
    return backbone


register_family(
    BackboneFamily(
        name=SAMImageEncoder.family,
        build=build_sam_backbone,
        is_preset=SAM_PRESETS.__contains__,
        presets=", ".join(SAM_PRESETS),
        recognises=is_sam_state,
        module=__name__,
    )
)
