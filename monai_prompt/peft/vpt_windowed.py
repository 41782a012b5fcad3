"""VPT on the windowed SAM-family encoders (``sam``: SAM's ViT image encoder; ``tinyvit``: LiteMedSAM's TinyViT).

These encoders attend inside windows of a token grid and have no CLS slot, so VPT follows its Swin variant (KMnP/vpt
``src/models/vit_prompt/swin_transformer.py``, ``LOCATION="prepend"``): the prompt tokens ride beside the grid, and
in every block each window attends over ``[prompts, window tokens]``: the same prompts are appended to the keys,
values and queries of every window, with a zero relative-position bias for them (as ``PromptedWindowAttention``
pads its bias with zeros). A global-attention block (SAM) is the one-window case: the prompts join the whole grid.
After the attention the prompt outputs of the windows are averaged (as KMnP's ``prompt_emb.mean(0)``), and the
prompts take the block's residuals and MLP like any token. The features are the encoder's own (the neck over the
grid): the prompts act through the keys and values of the grid's attention and are discarded at the end.

* *Shallow*: one prompt set enters at the first attention block and is carried through every later block.
* *Deep*: every attention block gets fresh prompts; the carried ones are dropped (their outputs are never
  computed), as KMnP's deep Swin replaces them before each block.

TinyViT's first stage is convolutional (MBConv), so the prompts start at its first attention stage, with that
stage's width; deep prompts have the width of their block's stage. Its blocks have a depthwise ``local_conv``
between attention and MLP, and its stages end in convolutional ``PatchMerging`` layers. A prompt has no place on
the grid, so every convolution it crosses sees it as a constant map: a ``k x k`` kernel acts as its spatial sum
(KMnP's Swin merging sees the prompt repeated over the 2 x 2 neighbourhood it merges, the same rule), followed by
the frozen BatchNorm. Only shallow prompts cross a ``PatchMerging``; deep ones are replaced after it.

Two deliberate differences from KMnP's code: each window is paired with the prompts of its own image (KMnP
expands the prompts window-major against batch-major windows and averages with ``view(-1, B, ...)``, which mixes
the images of a batch once shallow prompts differ per image), and the window average is taken before the output
projection (equal: the projection is affine).

The model changes by subclass swaps that keep every key (:func:`apply_windowed_vpt`): the encoder, its attention
stages, blocks and attentions gain a ``forward_prompted`` path; block ``i`` that inserts prompts holds them as
``prompts`` ``[p, width]``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from monai_prompt.backbones.sam import RelPosAttention, SAMBlock, SAMImageEncoder, window_partition, window_unpartition
from monai_prompt.backbones.tinyvit import AttentionStage, TinyViT, TinyViTBlock, WindowAttention

__all__ = [
    "PromptedAttentionStage",
    "PromptedRelPosAttention",
    "PromptedSAMBlock",
    "PromptedSAMImageEncoder",
    "PromptedTinyViT",
    "PromptedTinyViTBlock",
    "PromptedWindowAttention",
    "apply_windowed_vpt",
    "attend_with_prompts",
    "constant_map_conv",
    "first_token_size",
]


def attend_with_prompts(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    prompt_qkv: torch.Tensor,
    scale: float,
    use_sdpa: bool,
    carry: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Window attention over ``[prompts, window tokens]`` with the prompts shared by the windows of each image.

    Args:
        q: queries of the window tokens ``[n, heads, N, d]``, ``n = batch * windows`` (windows of an image adjacent).
        k: their keys, same shape.
        v: their values, same shape.
        bias: the windows' additive attention bias, broadcastable to ``[n, heads, N, N]`` (zero for the prompts).
        prompt_qkv: queries, keys and values of the prompts ``[3, batch, heads, p, d]``.
        scale: the logit scale (``d ** -0.5``).
        use_sdpa: run through PyTorch SDPA (the bias as an additive mask).
        carry: also return the prompts' outputs, averaged over the windows of each image (else an empty tensor).

    Returns:
        The window tokens' output ``[n, heads, N, d]`` and the prompts' ``[batch, heads, p, d]``.
    """
    n, heads, _, dim = q.shape
    batch, length = prompt_qkv.shape[1], prompt_qkv.shape[3]
    windows = n // batch
    # each image's prompts repeated for its windows (window_partition keeps the windows of an image adjacent)
    shared = prompt_qkv[:, :, None].expand(3, batch, windows, heads, length, dim).reshape(3, n, heads, length, dim)
    keys, values = torch.cat((shared[1], k), dim=2), torch.cat((shared[2], v), dim=2)
    mask = F.pad(bias, (length, 0)).to(q.dtype)
    if use_sdpa:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    else:
        out = ((q * scale) @ keys.transpose(-2, -1) + mask).softmax(dim=-1) @ values
    if not carry:
        return out, q.new_zeros(0)
    if use_sdpa:
        prompt_out = F.scaled_dot_product_attention(shared[0], keys, values)
    else:
        prompt_out = ((shared[0] * scale) @ keys.transpose(-2, -1)).softmax(dim=-1) @ values
    return out, prompt_out.view(batch, windows, heads, length, dim).mean(dim=1)


def constant_map_conv(maps: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """A convolution applied to constant maps, ``[N, C, 1, 1]`` in (one value per channel): its ``kernel`` (any
    size, stride or groups, no bias: a TinyViT ``Conv2dBN``'s) summed over space.

    Args:
        maps: one constant map per row, ``[N, C_in, 1, 1]``.
        kernel: the convolution's weight ``[C_out, C_in / groups, k, k]``.
    """
    return F.conv2d(maps, kernel.sum(dim=(2, 3), keepdim=True), None, 1, 0, 1, maps.shape[1] // kernel.shape[1])


class PromptedRelPosAttention(RelPosAttention):
    """SAM's attention with prompts appended to every window (:func:`attend_with_prompts`)."""

    @torch.jit.export
    def forward_prompted(
        self, x: torch.Tensor, prompts: torch.Tensor, carry: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows ``[n, h, w, C]`` (normalised) and their images' normalised prompts ``[B, p, C]`` in; the windows'
        and (if ``carry``) the prompts' window-averaged attention outputs out."""
        n, h, w, c = x.shape
        qkv = self.qkv(x).reshape(n, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        prompt_qkv = self.qkv(prompts).reshape(prompts.shape[0], prompts.shape[1], 3, self.num_heads, -1)
        out, prompt_out = attend_with_prompts(
            q, k, v, self.rel_pos_bias(q, h, w), prompt_qkv.permute(2, 0, 3, 1, 4), self.scale, self.use_sdpa, carry
        )
        out = self.proj(out.transpose(1, 2).reshape(n, h, w, c))
        if carry:
            prompt_out = self.proj(prompt_out.transpose(1, 2).reshape(prompts.shape))
        return out, prompt_out


class PromptedWindowAttention(WindowAttention):
    """TinyViT's window attention with prompts appended to every window (:func:`attend_with_prompts`)."""

    @torch.jit.export
    def forward_prompted(
        self, x: torch.Tensor, prompts: torch.Tensor, carry: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows ``[n, N, C]`` and their images' prompts ``[B, p, C]`` (both before the attention's own norm) in;
        the windows' and (if ``carry``) the prompts' window-averaged attention outputs out."""
        n, tokens, dim = x.shape
        qkv = self.qkv(self.norm(x)).view(n, tokens, self.num_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        prompt_qkv = self.qkv(self.norm(prompts)).view(prompts.shape[0], prompts.shape[1], self.num_heads, 3, -1)
        bias = self.attention_biases[:, self.attention_bias_idxs]
        out, prompt_out = attend_with_prompts(
            qkv[0], qkv[1], qkv[2], bias, prompt_qkv.permute(3, 0, 2, 1, 4), self.scale, self.use_sdpa, carry
        )
        out = self.proj(out.transpose(1, 2).reshape(n, tokens, dim))
        if carry:
            prompt_out = self.proj(prompt_out.transpose(1, 2).reshape(prompts.shape))
        return out, prompt_out


class _PromptSlot(nn.Module):
    """What a prompted block adds: ``prompts`` ``[p, width]`` when it inserts them, their dropout, and whether the
    prompts it outputs are used (``carry``)."""

    #: added to each host block's own ``__constants__`` (TorchScript compiles no branch on a false constant).
    prompt_constants = ["insert_prompts", "carry_prompts"]

    def _init_prompts(
        self, width: int, num_tokens: int, insert: bool, carry: bool, dropout: float, bound: float
    ) -> None:
        self.insert_prompts = insert
        self.carry_prompts = carry
        if insert:
            reference = next(self.parameters())
            self.prompts = nn.Parameter(torch.empty(num_tokens, width, device=reference.device, dtype=reference.dtype))
            nn.init.uniform_(self.prompts, -bound, bound)
        self.prompt_dropout = nn.Dropout(dropout)

    def _inserted(self, x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        if self.insert_prompts:
            return self.prompt_dropout(self.prompts).to(x.dtype).expand(x.shape[0], -1, -1)
        return prompts


class PromptedSAMBlock(_PromptSlot, SAMBlock):
    """A SAM block that also takes prompt tokens ``[B, p, C]`` (:meth:`forward_prompted`)."""

    __constants__ = SAMBlock.__constants__ + _PromptSlot.prompt_constants

    @torch.jit.export
    def forward_prompted(self, x: torch.Tensor, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block on the grid ``[B, H, W, C]`` with the prompts beside it; the grid and the prompts out."""
        prompts = self._inserted(x, prompts)
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            windows, padded = window_partition(x, self.window_size)
            out, prompt_out = self.attn.forward_prompted(windows, self.norm1(prompts), self.carry_prompts)
            x = window_unpartition(out, self.window_size, padded, (h, w))
        else:
            x, prompt_out = self.attn.forward_prompted(x, self.norm1(prompts), self.carry_prompts)
        x = shortcut + x
        if self.carry_prompts:
            prompts = prompts + prompt_out
            prompts = prompts + self.mlp(self.norm2(prompts))
        if self.has_parallel:
            return x + self.mlp(self.norm2(x)) + self.parallel(x), prompts
        return x + self.mlp(self.norm2(x)), prompts


class PromptedSAMImageEncoder(SAMImageEncoder):
    """The SAM encoder running its blocks' prompted path (keys unchanged)."""

    @torch.jit.unused
    def _checkpointed_prompted(
        self, block: nn.Module, x: torch.Tensor, prompts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return checkpoint(block.forward_prompted, x, prompts, use_reentrant=False)

    def forward_hidden_states(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The grid after every block ``[B, H / p, W / p, embed_dim]``; the prompts ride beside it, never in it."""
        x = self.embed(x)
        prompts = x.new_zeros(x.shape[0], 0, x.shape[-1])
        hidden_states: list[torch.Tensor] = []
        for block in self.blocks:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x, prompts = self._checkpointed_prompted(block, x, prompts)
            else:
                x, prompts = block.forward_prompted(x, prompts)
            hidden_states.append(x)
        return hidden_states


class PromptedTinyViTBlock(_PromptSlot, TinyViTBlock):
    """A TinyViT block that also takes prompt tokens ``[B, p, C]`` (:meth:`forward_prompted`)."""

    __constants__ = TinyViTBlock.__constants__ + _PromptSlot.prompt_constants

    @torch.jit.export
    def forward_prompted(self, x: torch.Tensor, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block on the channels-last map ``[B, H, W, C]`` with the prompts beside it; both out."""
        prompts = self._inserted(x, prompts)
        h, w = x.shape[1], x.shape[2]
        windows, padded = window_partition(x, self.window_size)
        windows = windows.flatten(1, 2)
        out, prompt_out = self.attn.forward_prompted(windows, prompts, self.carry_prompts)
        out = out.view(-1, self.window_size, self.window_size, x.shape[-1])
        x = x + window_unpartition(out, self.window_size, padded, (h, w))
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        if self.carry_prompts:
            maps = (prompts + prompt_out).reshape(-1, prompts.shape[-1], 1, 1)
            prompts = self.local_conv.bn(constant_map_conv(maps, self.local_conv.c.weight)).view(prompts.shape)
            prompts = prompts + self.mlp(prompts)
        if self.has_parallel:
            return x + self.mlp(x) + self.parallel(x), prompts
        return x + self.mlp(x), prompts


class PromptedAttentionStage(AttentionStage):
    """A TinyViT attention stage carrying prompts through its blocks and (shallow VPT) its ``PatchMerging``."""

    __constants__ = ["carry_prompts"]

    @torch.jit.unused
    def _checkpointed_prompted(
        self, block: nn.Module, x: torch.Tensor, prompts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return checkpoint(block.forward_prompted, x, prompts, use_reentrant=False)

    @torch.jit.export
    def forward_prompted(self, x: torch.Tensor, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, C, H, W]`` and prompts ``[B, p, C]`` in; the stage's output map and prompts out."""
        x = x.permute(0, 2, 3, 1)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x, prompts = self._checkpointed_prompted(block, x, prompts)
            else:
                x, prompts = block.forward_prompted(x, prompts)
        x = x.permute(0, 3, 1, 2)
        if self.downsample is not None:
            if self.carry_prompts:
                maps = prompts.reshape(-1, prompts.shape[-1], 1, 1)
                maps = self.downsample.conv1.bn(constant_map_conv(maps, self.downsample.conv1.c.weight))
                maps = self.downsample.conv2.bn(constant_map_conv(F.gelu(maps), self.downsample.conv2.c.weight))
                maps = self.downsample.conv3.bn(constant_map_conv(F.gelu(maps), self.downsample.conv3.c.weight))
                prompts = maps.view(prompts.shape[0], prompts.shape[1], -1)
            x = self.downsample(x)
        return x, prompts


class PromptedTinyViT(TinyViT):
    """The TinyViT running its attention stages' prompted path (keys unchanged)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image embedding ``[B, neck_dim, H / s, W / s]``; the prompts are dropped before the neck."""
        x = self.layers[0](self.patch_embed(x))
        prompts = x.new_zeros(x.shape[0], 0, x.shape[1])
        for layer in self.layers[1:]:
            x, prompts = layer.forward_prompted(x, prompts)
        return self.neck(x)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """:meth:`TinyViT.forward_stages` with the prompts carried through the attention stages, dropped at the end."""
        x = self.layers[0](self.patch_embed(x))
        maps = [x]
        prompts = x.new_zeros(x.shape[0], 0, x.shape[1])
        for layer in self.layers[1:]:
            x, prompts = layer.forward_prompted(x, prompts)
            maps.append(x)
        maps.append(self.neck(x))
        return maps


def first_token_size(encoder: nn.Module) -> tuple[int, int]:
    """The side in pixels of a token of the first attention block and its width (SAM: the patch and ``embed_dim``;
    TinyViT: the stride of its first stage transition and the first attention stage's width), for VPT's prompt
    init (:func:`~monai_prompt.peft.vpt.prompt_init_bound`; one bound for every block, as KMnP's Swin uses the
    first stage's)."""
    cfg = encoder.config
    if isinstance(encoder, TinyViT):
        return cfg["merge_strides"][0], cfg["embed_dims"][1]
    return cfg["patch_size"], cfg["embed_dim"]


def apply_windowed_vpt(encoder: nn.Module, num_tokens: int, deep: bool, dropout: float, bound: float) -> None:
    """Turn a :class:`SAMImageEncoder` or :class:`TinyViT` into its prompted subclass in place (keys unchanged).

    Args:
        encoder: the encoder (family ``sam`` or ``tinyvit``).
        num_tokens: prompt tokens ``p`` per inserted set.
        deep: fresh prompts for every attention block (else one set at the first, carried).
        dropout: dropout on the prompts each time they are inserted.
        bound: the prompts start uniform in ``(-bound, bound)``.
    """
    blocks = encoder.blocks
    for index, block in enumerate(blocks):
        insert = deep or index == 0
        carry = not deep and index < len(blocks) - 1
        block.__class__ = PromptedSAMBlock if isinstance(block, SAMBlock) else PromptedTinyViTBlock
        block.attn.__class__ = PromptedRelPosAttention if isinstance(block, SAMBlock) else PromptedWindowAttention
        block._init_prompts(block.hidden_size, num_tokens, insert, carry, dropout, bound)
    if isinstance(encoder, TinyViT):
        for layer in encoder.layers[1:]:
            layer.__class__ = PromptedAttentionStage
            layer.carry_prompts = not deep
        encoder.__class__ = PromptedTinyViT
    else:
        encoder.__class__ = PromptedSAMImageEncoder
