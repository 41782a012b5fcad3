"""MONAI ViT encoder with the defaults pre-trained checkpoints need, and the seams PEFT methods use.

:class:`PromptableViT` *is* a :class:`monai.networks.nets.ViT` (same state_dict keys, same ``forward``
contract ``(tokens, hidden_states)``), built with ``qkv_bias=True``, no Tanh head and a configurable
LayerNorm epsilon. A method may attach a :class:`TokenPrompter` (token slots: VPT, DVPT), replace modules
inside blocks (LoRA, SSF, EPT) or set a block's parallel branch (adapters).

The options other pre-trained families need (DINOv2: LayerScale and register tokens; CLIP: a LayerNorm before
the blocks and QuickGELU) add their own keys only when switched on, so a plain ViT keeps MONAI's keys exactly.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
from monai.networks.nets import ViT
from torch.utils.checkpoint import checkpoint

from monai_prompt.backbones.blocks import Attention, PromptBlock

__all__ = [
    "BACKBONE_KEY",
    "CHECKPOINT_MODES",
    "VIT_PRESETS",
    "PromptableViT",
    "TokenPrompter",
    "backbone_key",
    "build_vit",
    "is_vit_preset",
    "vit_config",
]

#: width, depth, heads and MLP width of the standard ViT sizes (Dosovitskiy et al.; DeiT for tiny/small).
VIT_PRESETS: dict[str, dict[str, int]] = {
    "vit_tiny": {"hidden_size": 192, "num_layers": 12, "num_heads": 3, "mlp_dim": 768},
    "vit_small": {"hidden_size": 384, "num_layers": 12, "num_heads": 6, "mlp_dim": 1536},
    "vit_base": {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "mlp_dim": 3072},
    "vit_large": {"hidden_size": 1024, "num_layers": 24, "num_heads": 16, "mlp_dim": 4096},
}

#: a preset name: a size of :data:`VIT_PRESETS`, optionally with a patch size (``vit_small_p8``).
_PRESET_NAME = re.compile(r"(vit_[a-z]+?)(?:_p(\d+))?")
_BLOCK_PARTS = r"(norm1|norm2|attn\.qkv|attn\.out_proj|mlp\.linear1|mlp\.linear2)"
#: the frozen backbone keys of a MONAI ViT (``norm_cross_attn`` is unused and never loaded), plus those of the
#: optional parts: ``register_tokens``, the pre-norm ``norm_pre`` and LayerScale ``blocks.<i>.ls1/ls2.gamma``.
BACKBONE_KEY = re.compile(
    rf"^(cls_token|register_tokens|patch_embedding\.(patch_embeddings|position_embeddings)(\.weight|\.bias)?"
    rf"|blocks\.\d+\.{_BLOCK_PARTS}\.(weight|bias)|blocks\.\d+\.ls[12]\.gamma|(norm|norm_pre)\.(weight|bias))$"
)
#: activation-checkpointing modes of :meth:`PromptableViT.set_grad_checkpointing`: block index -> what that block
#: recomputes in backward (``"block"``, ``"attn"``, ``"mlp"`` or ``"none"``, see
#: :meth:`PromptBlock.forward_recomputing`).
CHECKPOINT_MODES: dict[str, Callable[[int], str]] = {
    "none": lambda index: "none",
    "blocks": lambda index: "block",
    "attn": lambda index: "attn",
    "mlp": lambda index: "mlp",
    "alternate": lambda index: "block" if index % 2 == 0 else "none",
}
#: values of the optional constructor arguments at which PromptableViT is a plain MONAI ViT; ``config`` lists
#: them only when they differ, so a plain ViT's config (and the deltas tied to it) is unchanged.
_PLAIN_OPTIONS = {"layer_scale": False, "num_registers": 0, "pre_norm": False, "act": "gelu"}


class TokenPrompter(nn.Module):
    """Seam for methods that add token slots; this base adds none.

    ``insert_embedded`` runs once on the embedded tokens (CLS, registers and patches with their positions) before
    the ViT's pre-norm ``norm_pre`` (CLIP's ``ln_pre``), which then normalises the inserted slots too (DVPT);
    ``insert`` runs once on the tokens entering the first block, after ``norm_pre`` (VPT). Without ``norm_pre``
    the two are the same point. ``before_block(i, x)`` runs before block ``i``, ``strip`` removes the prompt slots
    (for consumers that expect only CLS + patches, e.g. UNETR) and ``readout`` turns the final normed tokens into
    one feature vector (CLS by default).
    """

    def insert_embedded(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def insert(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def before_block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return x

    def strip(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def readout(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


class PromptableViT(ViT):
    """MONAI ViT encoder (no classification head) whose blocks are :class:`PromptBlock`.

    Args:
        in_channels: image channels.
        img_size: spatial size of the input, one int per spatial dimension.
        patch_size: patch size, one int per spatial dimension.
        hidden_size: token width.
        mlp_dim: MLP hidden width.
        num_layers: number of transformer blocks.
        num_heads: attention heads.
        dropout_rate: dropout of embeddings, attention and MLP.
        spatial_dims: 2 or 3.
        qkv_bias: bias in ``qkv`` (``True`` for timm/HuggingFace checkpoints).
        layer_norm_eps: epsilon of every LayerNorm (1e-6 timm, 1e-12 HuggingFace; MONAI's own is 1e-5).
        cls_token: prepend a learnable CLS token (MONAI ``classification=True`` layout). UNETR-style
            encoders use ``False``.
        layer_scale: LayerScale on both residual branches of every block (DINOv2; ``blocks.<i>.ls1/ls2.gamma``).
        num_registers: register tokens (DINOv2 with registers; ``register_tokens`` [1, R, D]) placed after CLS,
            without position embedding.
        pre_norm: a LayerNorm ``norm_pre`` on the embedded tokens before the first block (CLIP's ``ln_pre``).
        act: MLP activation, ``"gelu"``, ``"quick_gelu"`` (OpenAI CLIP) or ``"gelu_tanh"``.

    Token layout inside the blocks: ``[CLS, registers, patches]`` (CLS and registers are the prefix tokens,
    ``num_prefix_tokens``); a method's prompter adds its slots (VPT after the prefix and after ``norm_pre``, DVPT
    before CLS and before ``norm_pre``).
    :meth:`forward_tokens` returns that whole sequence; :meth:`forward` returns MONAI's layout ``[CLS, patches]``
    (``[patches]`` without CLS), prompt slots and registers removed, so UNETR-style consumers get the patch grid.
    """

    #: the backbone family PEFT methods declare support for (the other one: ``TinyViT.family``).
    family = "vit"

    def __init__(
        self,
        in_channels: int,
        img_size: Sequence[int],
        patch_size: Sequence[int],
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        dropout_rate: float = 0.0,
        spatial_dims: int = 2,
        qkv_bias: bool = True,
        layer_norm_eps: float = 1e-6,
        cls_token: bool = True,
        layer_scale: bool = False,
        num_registers: int = 0,
        pre_norm: bool = False,
        act: str = "gelu",
    ) -> None:
        img_size, patch_size = tuple(int(s) for s in img_size), tuple(int(p) for p in patch_size)
        if len(img_size) != spatial_dims or len(patch_size) != spatial_dims:
            raise ValueError(f"img_size {img_size} and patch_size {patch_size} need {spatial_dims} entries each.")
        bad = [(i, p) for i, p in zip(img_size, patch_size) if i % p]
        if bad:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}.")
        super().__init__(
            in_channels=in_channels,
            img_size=img_size,
            patch_size=patch_size,
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_layers=0,
            num_heads=num_heads,
            classification=cls_token,
            dropout_rate=dropout_rate,
            spatial_dims=spatial_dims,
            post_activation="none",
            qkv_bias=qkv_bias,
        )
        if cls_token:
            del self.classification_head
        self.blocks = nn.ModuleList(
            PromptBlock(hidden_size, mlp_dim, num_heads, dropout_rate, qkv_bias, layer_norm_eps, layer_scale, act)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        if num_registers < 0:
            raise ValueError(f"num_registers must be >= 0, got {num_registers}.")
        if num_registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_registers, hidden_size))
        if pre_norm:
            self.norm_pre = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.config = {
            "in_channels": in_channels,
            "img_size": list(img_size),
            "patch_size": list(patch_size),
            "hidden_size": hidden_size,
            "mlp_dim": mlp_dim,
            "num_layers": num_layers,
            "num_heads": num_heads,
            "spatial_dims": spatial_dims,
            "qkv_bias": qkv_bias,
            "layer_norm_eps": layer_norm_eps,
            "cls_token": cls_token,
        }
        options = {"layer_scale": layer_scale, "num_registers": num_registers, "pre_norm": pre_norm, "act": act}
        self.config.update({k: v for k, v in options.items() if v != _PLAIN_OPTIONS[k]})
        self.in_channels = in_channels
        self.img_size = list(img_size)
        self.grid_size = [i // p for i, p in zip(img_size, patch_size)]
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_registers = num_registers
        self.num_prefix_tokens = int(cls_token) + num_registers
        self.prompter: TokenPrompter = TokenPrompter()
        self.grad_checkpointing = False
        self.recompute = ["none"] * num_layers

    @property
    def num_tokens(self) -> int:
        """Tokens the blocks see without prompts: CLS (if any), registers and patches."""
        return self.num_prefix_tokens + int(torch.tensor(self.grid_size).prod())

    def set_prompter(self, prompter: TokenPrompter) -> None:
        """Attach the token-slot logic of a method (VPT, DVPT)."""
        self.prompter = prompter

    def set_grad_checkpointing(self, enable: bool | str = True) -> None:
        """Choose what the backward pass recomputes instead of storing (activation checkpointing).

        Args:
            enable: ``True`` / ``"blocks"``: every whole block; ``False`` / ``"none"``: nothing; ``"attn"``: only
                each block's attention branch ``ls1(attn(norm1(x)))``; ``"mlp"``: only each block's MLP branch (and
                its parallel branch); ``"alternate"``: every other whole block (blocks 0, 2, 4, ...). A whole first
                block is recomputed with the patch embedding, so the embedded tokens are not kept either; under a
                readout (:meth:`forward_features`) the last block's whole-block or MLP recomputation is left out
                (:meth:`recompute_plan`). See
                :data:`CHECKPOINT_MODES` and docs/benchmarks.md for the memory/time trade-off.
        """
        mode = ("blocks" if enable else "none") if isinstance(enable, bool) else enable
        if mode not in CHECKPOINT_MODES:
            raise ValueError(f"grad checkpointing {enable!r} is not a bool or one of {list(CHECKPOINT_MODES)}.")
        self.grad_checkpointing = mode != "none"
        self.recompute = [CHECKPOINT_MODES[mode](index) for index in range(len(self.blocks))]

    def set_sdpa(self, enable: bool = True) -> None:
        """Run attention through ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels)."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.use_flash_attention = enable

    def recompute_plan(self, readout: bool = False) -> list[str]:
        """What each block recomputes in backward in this training forward (see :meth:`set_grad_checkpointing`).

        Args:
            readout: only the readout and a small head follow the blocks (:meth:`forward_features`): the last
                block's whole-block or MLP recomputation is then left out, since it would start as soon as the
                backward reaches the block and so hold the same activations at the same time, one block's forward
                later.
        """
        plan = list(self.recompute)
        if readout and plan and plan[-1] in ("block", "mlp"):
            plan[-1] = "none"
        return plan

    @torch.jit.unused
    def _checkpointed_block(self, index: int, part: str, x: torch.Tensor) -> torch.Tensor:
        """Block ``index`` recomputing ``part`` in backward (a :meth:`recompute_plan` entry)."""
        if part == "block":
            return checkpoint(self.blocks[index], x, use_reentrant=False)
        return self.blocks[index].forward_recomputing(part, x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The embedded tokens ``[CLS, registers, patches]`` (patches with their position embeddings) with the
        slots the prompter inserts before the pre-norm (:meth:`TokenPrompter.insert_embedded`), through ``norm_pre``
        when the ViT has one; :meth:`forward_tokens` then applies the prompter's ``insert``."""
        if list(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"input spatial size {list(x.shape[2:])} differs from the size this ViT was built for "
                f"{self.img_size}; resize the input (e.g. monai.transforms.Resized) or rebuild the model."
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"input has {x.shape[1]} channels, this ViT was built for in_channels={self.in_channels}; convert the "
                f"input (e.g. monai.transforms.RepeatChannel, or a single channel) or rebuild the model."
            )
        x = self.patch_embedding(x)
        if hasattr(self, "register_tokens"):
            x = torch.cat((self.register_tokens.expand(x.shape[0], -1, -1), x), dim=1)
        if hasattr(self, "cls_token"):
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.prompter.insert_embedded(x)
        if hasattr(self, "norm_pre"):
            x = self.norm_pre(x)
        return x

    def strip(self, x: torch.Tensor) -> torch.Tensor:
        """MONAI's token layout ``[CLS, patches]`` of a sequence from the blocks: prompt slots and registers removed."""
        x = self.prompter.strip(x)
        if self.num_registers > 0:
            start = self.num_prefix_tokens - self.num_registers
            x = torch.cat((x[:, :start], x[:, self.num_prefix_tokens :]), dim=1)
        return x

    def _start(self, x: torch.Tensor) -> torch.Tensor:
        """The first block's output from the image: embedding, the prompter's slots, block 0."""
        return self.blocks[0](self.prompter.before_block(0, self.prompter.insert(self.embed(x))))

    @torch.jit.unused
    def _checkpointed_start(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`_start` recomputed in backward: what is kept is the image (held by the caller anyway), not the
        embedded tokens."""
        return checkpoint(self._start, x, use_reentrant=False)

    def forward_tokens(self, x: torch.Tensor, readout: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """All tokens after the final norm (prompt slots and registers included) and each block's output.

        Args:
            x: images.
            readout: only the readout and a small head follow (see :meth:`recompute_plan`).
        """
        plan: list[str] = []
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            plan = self.recompute_plan(readout)
        with_start = len(plan) > 0 and plan[0] == "block"
        if not with_start:
            x = self.prompter.insert(self.embed(x))
        hidden_states_out: list[torch.Tensor] = []
        for index, blk in enumerate(self.blocks):
            if not torch.jit.is_scripting() and with_start and index == 0:
                x = self._checkpointed_start(x)
            else:
                x = self.prompter.before_block(index, x)
                if not torch.jit.is_scripting() and len(plan) > 0:
                    x = self._checkpointed_block(index, plan[index], x)
                else:
                    x = blk(x)
            hidden_states_out.append(x)
        return self.norm(x), hidden_states_out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """One feature vector per image, [B, D], read out as the attached method prescribes."""
        return self.prompter.readout(self.forward_tokens(x, readout=True)[0])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """MONAI ViT contract: ``(normed tokens, hidden states)`` in MONAI's layout ``[CLS, patches]`` (see
        :meth:`strip`): prompt slots and register tokens removed."""
        tokens, hidden_states_out = self.forward_tokens(x)
        return self.strip(tokens), [self.strip(h) for h in hidden_states_out]


def vit_config(name: str) -> dict[str, int]:
    """Width/depth/heads/MLP and patch size of a preset name such as ``vit_base`` or ``vit_small_p8``.

    Args:
        name: a key of :data:`VIT_PRESETS`, optionally followed by ``_p<patch>`` (default patch 16).
    """
    if not is_vit_preset(name):
        raise ValueError(f"unknown ViT preset {name!r}; use one of {sorted(VIT_PRESETS)} with an optional _p<N>.")
    match = _PRESET_NAME.fullmatch(name)
    return {**VIT_PRESETS[match.group(1)], "patch_size": int(match.group(2) or 16)}


def is_vit_preset(name: str) -> bool:
    """Whether ``name`` is a preset :func:`vit_config` knows: a key of :data:`VIT_PRESETS`, optionally ``_p<N>``."""
    match = _PRESET_NAME.fullmatch(name)
    return match is not None and match.group(1) in VIT_PRESETS


def build_vit(
    name: str = "vit_base",
    in_channels: int = 3,
    img_size: Sequence[int] | int = 224,
    spatial_dims: int = 2,
    layer_norm_eps: float = 1e-6,
    dropout_rate: float = 0.0,
    cls_token: bool = True,
    qkv_bias: bool = True,
    **overrides: int,
) -> PromptableViT:
    """Build a :class:`PromptableViT` from a preset.

    Args:
        name: preset such as ``vit_tiny``, ``vit_small``, ``vit_base``, ``vit_large`` or ``vit_base_p8``.
        in_channels: image channels.
        img_size: input size (an int is repeated over ``spatial_dims``).
        spatial_dims: 2 (default) or 3.
        layer_norm_eps: LayerNorm epsilon of the source checkpoint: 1e-6 timm, 1e-12 HuggingFace.
        dropout_rate: dropout in embeddings, attention and MLP.
        cls_token: prepend a CLS token.
        qkv_bias: bias in the attention's ``qkv`` projection (timm/HuggingFace checkpoints have one; MONAI's own
            ViT, ViTAutoEnc and UNETR default to ``qkv_bias=False``, with LayerNorm eps 1e-5).
        overrides: replace ``hidden_size``, ``num_layers``, ``num_heads``, ``mlp_dim`` or ``patch_size``
            (e.g. for tiny test models).

    Example::

        >>> vit = build_vit("vit_small_p8", in_channels=1, img_size=(96, 96, 96), spatial_dims=3)
    """
    config = vit_config(name)
    unknown = set(overrides) - set(config)
    if unknown:
        raise ValueError(f"unknown build_vit overrides {sorted(unknown)}; allowed: {sorted(config)}.")
    config.update(overrides)
    patch = config.pop("patch_size")
    sizes = (img_size,) * spatial_dims if isinstance(img_size, int) else tuple(img_size)
    return PromptableViT(
        in_channels=in_channels,
        img_size=sizes,
        patch_size=(patch,) * spatial_dims,
        dropout_rate=dropout_rate,
        spatial_dims=spatial_dims,
        layer_norm_eps=layer_norm_eps,
        cls_token=cls_token,
        qkv_bias=qkv_bias,
        **config,
    )


def backbone_key(vit: torch.nn.Module) -> re.Pattern:
    """The pre-trained parameter names of backbone ``vit``: its ``backbone_key`` (TinyViT), else ``BACKBONE_KEY``."""
    return getattr(vit, "backbone_key", BACKBONE_KEY)
