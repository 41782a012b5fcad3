"""EPT, embedded prompt tuning (Zu et al., Medical Image Analysis 97:103258, 2024; github.com/zuwenqiang/EPT).

Each prompted layer owns a learnable prompt ``P`` of shape ``[N, L]`` (``N`` tokens including CLS, ``L`` the
prompt length). Row ``i`` is concatenated in front of query ``i``'s scaled attention logits along the key
axis, the softmax runs over ``L + N`` entries and the prompt columns are dropped before multiplying by ``V``:

    A_i = softmax([P_i ; q_i K^T / sqrt(d)])[L:]        (shared over heads and samples)

Variants (``EPTConfig.variant``):

* ``"pure_cat"`` (default): the official code, exactly the equation above.
* ``"multi_cat"``: the paper's best ablation (Fig. 5): row ``i`` of the prompt is first multiplied by
  ``alpha_i = max_j U_ij - min_j U_ij`` of that query's logit row ``U_i`` (per sample and head).

Fast path: the prompt columns only enter through the softmax denominator, so ``pure_cat`` equals attention
with one extra key of value zero whose logit for query ``i`` is the "sink" ``c_i = logsumexp_k P_ik``.
:class:`EPTAttention` runs that on PyTorch SDPA when ``use_flash_attention`` is set (``vit.set_sdpa(True)``
or ``PromptClassifier(sdpa=True)``); otherwise it runs the literal concatenation. ``multi_cat`` has no such
path: ``alpha_i`` needs the max and min of the full logit row, i.e. the ``[N, N]`` matrix a fused kernel
never forms, so it always runs the literal path.

Windowed families (SAM's ViT image encoder, LiteMedSAM's TinyViT; docs/methods.md): the prompt joins each
attention's own logit rows. A windowed attention gets a prompt of ``window_size ** 2`` rows, one per position in
the window, shared by every window (as VPT's Swin variant shares its prompts over windows); a global-attention
block (SAM) gets one row per token of the whole grid. The logits ``U`` include the block's additive position bias
(SAM's decomposed relative positions, TinyViT's per-head offset bias), i.e. they are the rows the softmax sees.
:class:`SAMEPTAttention` and :class:`TinyViTEPTAttention` override the families' ``attend(q, k, v, bias)`` seam;
their fast path is the same sink key, its logit a column in front of the bias mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_prompt.backbones.blocks import Attention
from monai_prompt.backbones.sam import RelPosAttention, SAMImageEncoder
from monai_prompt.backbones.tinyvit import WindowAttention
from monai_prompt.peft.registry import register_method

__all__ = [
    "EPTAttention",
    "EPTConfig",
    "SAMEPTAttention",
    "TinyViTEPTAttention",
    "grid_ept_attend",
    "resize_ept_prompt",
]

EPT_VARIANTS = ("pure_cat", "multi_cat")


@dataclass
class EPTConfig:
    """Hyper-parameters of EPT.

    Attributes:
        prompt_length: prompt columns per token, ``L`` (paper grid 5..600; official configs 100).
        deep: prompt every layer (EPT-deep, default) or only the first (EPT-shallow).
        variant: ``"pure_cat"`` (official code) or ``"multi_cat"`` (paper's best, prompts scaled per query).
        init_std: standard deviation of the normal initialisation (official 0.02).
    """

    prompt_length: int = 100
    deep: bool = True
    variant: str = "pure_cat"
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.variant not in EPT_VARIANTS:
            raise ValueError(f"EPT variant {self.variant!r} is not one of {EPT_VARIANTS}.")
        if self.prompt_length < 1:
            raise ValueError(f"EPT prompt_length must be >= 1, got {self.prompt_length}.")


class EPTAttention(Attention):
    """MONAI self-attention whose softmax also runs over a learnable per-query prompt (EPT).

    Build it with :meth:`from_attention` to reuse a pre-trained block's ``qkv`` and ``out_proj`` modules.

    Args:
        hidden_size: token width.
        num_heads: attention heads.
        num_tokens: tokens the layer sees (CLS + patches); the prompt has one row per token.
        prompt_length: prompt columns per token.
        variant: ``"pure_cat"`` or ``"multi_cat"``.
        dropout_rate: dropout on attention weights and output.
        qkv_bias: whether ``qkv`` has a bias.
        init_std: standard deviation of the normal prompt initialisation.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_tokens: int,
        prompt_length: int = 100,
        variant: str = "pure_cat",
        dropout_rate: float = 0.0,
        qkv_bias: bool = True,
        init_std: float = 0.02,
    ) -> None:
        super().__init__(hidden_size, num_heads, dropout_rate, qkv_bias)
        if variant not in EPT_VARIANTS:
            raise ValueError(f"EPT variant {variant!r} is not one of {EPT_VARIANTS}.")
        self.variant = variant
        # channels appended to the head dimension for the sink key (a multiple of 8 suits fused kernels)
        self.sink_channels = 8
        self.ept_prompt = nn.Parameter(torch.empty(num_tokens, prompt_length))
        nn.init.normal_(self.ept_prompt, std=init_std)

    @classmethod
    def from_attention(cls, attn: Attention, num_tokens: int, config: EPTConfig) -> EPTAttention:
        """An EPT attention sharing ``attn``'s ``qkv``/``out_proj`` (so state_dict keys stay MONAI's)."""
        new = cls(
            attn.hidden_input_size,
            attn.num_heads,
            num_tokens,
            config.prompt_length,
            config.variant,
            attn.dropout_rate,
            attn.qkv.bias is not None,
            config.init_std,
        )
        new.qkv, new.out_proj = attn.qkv, attn.out_proj
        new.use_flash_attention = attn.use_flash_attention
        return new.to(attn.qkv.weight).train(attn.training)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """EPT attention of [B, H, N, d] queries over keys/values (SDPA sink path or literal concatenation)."""
        num_tokens = self.ept_prompt.shape[0]
        if q.shape[-2] != num_tokens:
            raise ValueError(
                f"EPT prompt was built for {num_tokens} tokens but the layer got {q.shape[-2]}; the prompt is tied "
                f"to the token grid: build the model for this input size and resize trained prompts with "
                f"monai_prompt.peft.ept.resize_ept_prompt."
            )
        if self.use_flash_attention and self.variant == "pure_cat":
            return self._attend_sink(q, k, v)
        return self._attend_literal(q, k, v)

    def _attend_literal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Reference path: concatenate prompt logits, softmax over prompts + keys, drop the prompt columns."""
        logits = torch.einsum("bhxd,bhyd->bhxy", q, k) * self.scale
        prompt = self.ept_prompt.to(logits.dtype)
        if self.variant == "multi_cat":
            span = logits.amax(dim=-1, keepdim=True) - logits.amin(dim=-1, keepdim=True)
            prompt = prompt * span
        else:
            prompt = prompt.expand(logits.shape[0], logits.shape[1], -1, -1)
        att = self.drop_weights(torch.cat((prompt, logits), dim=-1).softmax(dim=-1))
        return torch.einsum("bhxy,bhyd->bhxd", att[..., prompt.shape[-1] :], v)

    def _attend_sink(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Fast path: SDPA over the keys plus one zero-value sink key with logit ``logsumexp_k P_ik``.

        The per-query sink logit rides in an extra head channel (query ``c_i / scale``, sink key ``1``, real keys
        ``0``), so no attention mask is needed and PyTorch may pick its fused flash kernel.
        """
        b, h, n, d = q.shape
        sink = torch.logsumexp(self.ept_prompt, dim=-1).to(q.dtype) / self.scale
        q_extra = F.pad(sink.unsqueeze(-1), (0, self.sink_channels - 1)).expand(b, h, n, self.sink_channels)
        query = torch.cat((q, q_extra), dim=-1)
        key = F.pad(k, (0, self.sink_channels))
        sink_key = torch.zeros(b, h, 1, d + self.sink_channels, dtype=k.dtype, device=k.device)
        sink_key[..., d] = 1.0
        key = torch.cat((sink_key, key), dim=-2)
        value = F.pad(v, (0, self.sink_channels, 1, 0))
        dropout = self.dropout_rate if self.training else 0.0
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=self.scale)
        return out[..., :d]


def resize_ept_prompt(
    prompt: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int], num_prefix_tokens: int | None = None
) -> torch.Tensor:
    """Resize a trained EPT prompt ``[prefix + prod(old_grid), L]`` to a new patch grid.

    The prefix rows (CLS, registers) are kept; the patch rows are interpolated over the grid (bicubic in 2D,
    trilinear in 3D, ``align_corners=False`` as for position embeddings), each prompt column as one channel.

    Args:
        prompt: ``blocks.<i>.attn.ept_prompt`` of a trained model.
        old_grid: patch grid the prompt was trained on (``vit.grid_size``), e.g. ``(14, 14)``.
        new_grid: patch grid of the new model, e.g. ``(24, 24)`` for 384 px with patch 16.
        num_prefix_tokens: leading non-patch rows, the trained ViT's ``vit.num_prefix_tokens`` (1 with CLS, plus
            the register tokens of a DINOv2 with registers; 0 without CLS). None: the rows before the
            ``prod(old_grid)`` patch rows; pass it to have the prompt's shape checked against ``old_grid``.

    Example::

        >>> new_vit = apply_method(build_vit("vit_base", img_size=384), "ept")
        >>> for name, value in trained_vit.state_dict().items():
        ...     if name.endswith("ept_prompt"):
        ...         resized = resize_ept_prompt(value, (14, 14), (24, 24), trained_vit.num_prefix_tokens)
        ...         new_vit.get_parameter(name).data.copy_(resized)
    """
    old_grid, new_grid = tuple(int(g) for g in old_grid), tuple(int(g) for g in new_grid)
    num_patches = int(torch.tensor(old_grid).prod())
    if num_prefix_tokens is None:
        num_prefix_tokens = max(prompt.shape[0] - num_patches, 0) if prompt.ndim == 2 else 0
    expected = num_prefix_tokens + num_patches
    if prompt.ndim != 2 or prompt.shape[0] != expected or len(old_grid) != len(new_grid) or len(old_grid) not in (2, 3):
        raise ValueError(
            f"EPT prompt of shape {tuple(prompt.shape)} does not fit {num_prefix_tokens} prefix rows plus the 2D/3D "
            f"grid {old_grid} (expected [{expected}, L]) or new grid {new_grid}; pass the grid it was trained on."
        )
    prefix, patches = prompt[:num_prefix_tokens], prompt[num_prefix_tokens:]
    grid = patches.t().reshape(1, prompt.shape[1], *old_grid)
    mode = "bicubic" if len(old_grid) == 2 else "trilinear"
    resized = F.interpolate(grid, size=new_grid, mode=mode, align_corners=False)
    return torch.cat((prefix, resized.reshape(prompt.shape[1], -1).t()), dim=0)


def grid_ept_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    prompt: torch.Tensor,
    scale: float,
    variant: str,
    sdpa: bool,
) -> torch.Tensor:
    """EPT attention with an additive position bias: ``softmax([P_i ; q_i K^T scale + bias_i])[L:] V``.

    Args:
        q: queries ``[B, heads, N, d]`` (``B``: windows times images in a windowed attention); ``k``, ``v`` alike.
        bias: the attention's additive bias, broadcastable to ``[B, heads, N, N]``.
        prompt: the prompt ``[N, L]``, one row per query position (shared over heads, samples and windows).
        scale: logit scale ``1 / sqrt(d)``.
        variant: ``"pure_cat"`` or ``"multi_cat"``.
        sdpa: run ``pure_cat`` as SDPA with a zero-value sink key whose logit, ``logsumexp_k P_ik``, is a column in
            front of the bias mask.
    """
    b, h, n, d = q.shape
    if n != prompt.shape[0]:
        raise ValueError(
            f"EPT prompt was built for {prompt.shape[0]} tokens per attention but the layer got {n}; the prompt is "
            f"tied to the window (or, in a global block, the grid) it was built for."
        )
    bias = bias.to(q.dtype).expand(b, h, n, k.shape[-2])
    if sdpa and variant == "pure_cat":
        sink = torch.logsumexp(prompt, dim=-1).to(q.dtype).view(1, 1, n, 1).expand(b, h, n, 1)
        mask = torch.cat((sink, bias), dim=-1)
        return F.scaled_dot_product_attention(q, F.pad(k, (0, 0, 1, 0)), F.pad(v, (0, 0, 1, 0)), mask, scale=scale)
    logits = (q @ k.transpose(-2, -1)) * scale + bias
    rows = prompt.to(logits.dtype)
    if variant == "multi_cat":
        rows = rows * (logits.amax(dim=-1, keepdim=True) - logits.amin(dim=-1, keepdim=True))
    else:
        rows = rows.expand(b, h, n, rows.shape[-1])
    att = torch.cat((rows, logits), dim=-1).softmax(dim=-1)
    return att[..., rows.shape[-1] :] @ v


def _init_grid_prompt(attn: nn.Module, rows: int, config: EPTConfig) -> None:
    """Give a (class-swapped) window attention its ``ept_prompt`` ``[rows, L]`` and ``variant``."""
    factory = {"device": attn.qkv.weight.device, "dtype": attn.qkv.weight.dtype}
    attn.ept_prompt = nn.Parameter(torch.empty(rows, config.prompt_length, **factory))
    nn.init.normal_(attn.ept_prompt, std=config.init_std)
    attn.variant = config.variant


class _GridEPTAttention:
    """What EPT adds to a token-grid family's attention: a conversion in place from the family's plain attention
    (``plain``), so its keys stay the encoder's and ``ept_prompt`` is the one key it adds, and EPT's prompt in its
    softmax (:func:`grid_ept_attend`)."""

    plain: type[nn.Module]

    @classmethod
    def convert(cls, attn: nn.Module, rows: int, config: EPTConfig) -> nn.Module:
        """Turn ``attn`` into this class in place, with a prompt of ``rows`` rows, and return it."""
        if type(attn) is not cls.plain:
            raise TypeError(f"EPT converts a plain {cls.plain.__name__}, got {type(attn).__name__}.")
        attn.__class__ = cls
        _init_grid_prompt(attn, rows, config)
        return attn

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return grid_ept_attend(q, k, v, bias, self.ept_prompt, self.scale, self.variant, self.use_sdpa)


class SAMEPTAttention(_GridEPTAttention, RelPosAttention):
    """SAM's relative-position attention (:class:`~monai_prompt.backbones.sam.RelPosAttention`) with EPT's prompt."""

    plain = RelPosAttention


class TinyViTEPTAttention(_GridEPTAttention, WindowAttention):
    """TinyViT's window attention (:class:`~monai_prompt.backbones.tinyvit.WindowAttention`) with EPT's prompt."""

    plain = WindowAttention


def _apply_grid_ept(encoder: nn.Module, config: EPTConfig) -> None:
    """EPT on a windowed family: a prompt per prompted block, its rows the positions of one window (shared by
    all windows) or, in a SAM global-attention block, of the whole grid."""
    sam = isinstance(encoder, SAMImageEncoder)
    attention = SAMEPTAttention if sam else TinyViTEPTAttention
    blocks = list(encoder.blocks) if config.deep else list(encoder.blocks)[:1]
    for block in blocks:
        global_block = sam and block.window_size == 0
        rows = encoder.grid_size[0] * encoder.grid_size[1] if global_block else block.window_size**2
        attention.convert(block.attn, rows, config)


@register_method("ept", EPTConfig, trainable=r"\.attn\.ept_prompt$", families=("vit", "tinyvit", "sam"))
def apply_ept(vit: nn.Module, config: EPTConfig) -> None:
    """Swap the attention of every prompted block (all for EPT-deep, the first for EPT-shallow) for an EPT
    attention: :class:`EPTAttention` sized to a ViT's token count, or a window-sized prompt on the SAM encoder and
    the TinyViT (global-attention blocks: grid-sized)."""
    if vit.family != "vit":
        _apply_grid_ept(vit, config)
        return
    blocks = vit.blocks if config.deep else vit.blocks[:1]
    for block in blocks:
        block.attn = EPTAttention.from_attention(block.attn, vit.num_tokens, config)
