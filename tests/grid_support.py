"""Tiny token-grid encoders (SAM's ViT image encoder, LiteMedSAM's TinyViT) with random weights, and literal float64
re-implementations of their forward with a method's pieces plugged in, for the EPT and DVPT tests.

The references recompute what the methods touch (window partition with padding, the attention with its position
bias, the parallel branch) from the weights, window by window; the frozen parts no method changes (the neck, the
TinyViT's convolutions and MLP) run as the encoder's own modules.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_prompt.backbones.sam import build_sam
from monai_prompt.backbones.tinyvit import build_tinyvit
from peft_checks import assert_efficiency_paths_match

IMG = 32
#: a 4 x 4 patch grid; windows of 3 (padded to 6 x 6: four windows), global attention in blocks 1 and 3.
SAM_TINY = {
    "patch_size": 8,
    "embed_dim": 32,
    "depth": 4,
    "num_heads": 2,
    "out_chans": 16,
    "window_size": 3,
    "global_attn_indexes": (1, 3),
}
#: at 32 x 32 the attention stages run at 16 (windows of 7, padded), 8 (one whole window) and 8 (windows of 5, padded).
TINYVIT_TINY = {
    "embed_dims": (8, 16, 24, 32),
    "depths": (1, 2, 1, 1),
    "num_heads": (1, 2, 3, 4),
    "window_sizes": (7, 7, 8, 5),
    "neck_dim": 16,
}
FAMILIES = ("sam", "tinyvit")
#: input side of the float64 checks: SAM's is fixed by its position embedding; the TinyViT takes any, and at 16 its
#: stages run at 8 (four padded windows of 7), 4 and 4 (one padded window each), which is cheaper.
CHECK_SIZE = {"sam": IMG, "tinyvit": 16}

#: EPT's prompt of a block (``[N, L]``, or None: plain attention), and a branch beside a block's MLP.
Prompt = Callable[[nn.Module], "torch.Tensor | None"]
Branch = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def randomise(module: nn.Module, seed: int = 0, spread: float = 0.3) -> nn.Module:
    """Every float tensor of the state (relative tables, attention biases, BatchNorm statistics) off its trivial
    init: normal with standard deviation ``spread``, BatchNorm variances positive."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif tensor.is_floating_point():
                tensor.copy_(spread * torch.randn(tensor.shape, generator=generator))
    return module


def tiny_encoder(family: str, seed: int = 0, spread: float = 0.3) -> nn.Module:
    """A tiny encoder of ``family`` standing in for pre-trained weights (all of its state random, see
    :func:`randomise`)."""
    if family == "sam":
        return randomise(build_sam("sam_vit_b", img_size=IMG, **SAM_TINY), seed, spread)
    return randomise(build_tinyvit("lite_medsam", img_size=IMG, **TINYVIT_TINY), seed, spread)


def assert_efficiency_paths_and_torchscript_match(model: nn.Module, family: str) -> None:
    """A classifier on a tiny ``family`` encoder: checkpointing and SDPA give its plain outputs and gradients
    (:func:`peft_checks.assert_efficiency_paths_match`, float64), and so does its TorchScript."""
    model = model.double().train()
    size = CHECK_SIZE[family]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert_efficiency_paths_match(model, model.backbone, x)
    model.eval()
    torch.testing.assert_close(torch.jit.script(model)(x), model(x), rtol=0, atol=1e-12)


def attention_blocks(encoder: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention blocks by their parameter prefix, in order."""
    return [(n, m) for n, m in encoder.named_modules() if n and hasattr(m, "window_size") and hasattr(m, "attn")]


def _ept_softmax(logits: torch.Tensor, prompt: torch.Tensor | None, variant: str) -> torch.Tensor:
    """Softmax of each query's logit row, with EPT's prompt row ``i`` concatenated in front and dropped after."""
    if prompt is None:
        return logits.softmax(-1)
    if variant == "multi_cat":  # row i scaled by the span of query i's logits
        prompt = prompt * (logits.max(dim=1).values - logits.min(dim=1).values)[:, None]
    return torch.softmax(torch.cat((prompt, logits), dim=1), dim=1)[:, prompt.shape[1] :]


def _windows(grid: torch.Tensor, side: int) -> list[tuple[int, int, torch.Tensor]]:
    """``(top, left, tokens [side * side, C])`` of every window of a ``[H, W, C]`` grid zero-padded at the
    bottom/right, windows in row-major order, tokens row-major inside each window."""
    height, width, channels = grid.shape
    rows, cols = -(-height // side), -(-width // side)
    padded = grid.new_zeros(rows * side, cols * side, channels)
    padded[:height, :width] = grid
    return [
        (r * side, c * side, padded[r * side : (r + 1) * side, c * side : (c + 1) * side].reshape(side * side, -1))
        for r in range(rows)
        for c in range(cols)
    ]


def _scatter(out: torch.Tensor, top: int, left: int, side: int, tokens: torch.Tensor) -> None:
    """Write a window's ``[side * side, C]`` outputs into ``out`` ``[H, W, C]``, dropping the padded positions."""
    window = tokens.reshape(side, side, -1)
    height, width = min(side, out.shape[0] - top), min(side, out.shape[1] - left)
    out[top : top + height, left : left + width] = window[:height, :width]


def sam_attention(block: nn.Module, normed: torch.Tensor, prompt: torch.Tensor | None, variant: str) -> torch.Tensor:
    """SAM's attention of one block on ``[B, H, W, C]`` normed tokens, literally: window by window (the whole grid
    in a global block), head by head, with the decomposed relative positions ``q . R_h[i_h - j_h] + q . R_w[i_w -
    j_w]`` indexed out of the tables, and EPT's prompt rows (position in the window) in each query's softmax."""
    attn = block.attn
    batch, height, width, channels = normed.shape
    side = block.window_size if block.window_size > 0 else height
    heads, dim = attn.num_heads, channels // attn.num_heads
    assert attn.rel_pos_h.shape[0] == 2 * side - 1  # the tables fit the attention: no resize in the reference
    pos = torch.arange(side * side)
    dh = pos[:, None] // side - pos[None, :] // side + side - 1  # [N, N] row offsets, shifted
    dw = pos[:, None] % side - pos[None, :] % side + side - 1
    out = torch.zeros_like(normed)
    for b in range(batch):
        for top, left, tokens in _windows(normed[b], side):
            qkv = (tokens @ attn.qkv.weight.t() + attn.qkv.bias).reshape(-1, 3, heads, dim)
            per_head = []
            for h in range(heads):
                q, k, v = qkv[:, 0, h], qkv[:, 1, h], qkv[:, 2, h]
                bias = torch.einsum("id,ijd->ij", q, attn.rel_pos_h[dh]) + torch.einsum(
                    "id,ijd->ij", q, attn.rel_pos_w[dw]
                )
                per_head.append(_ept_softmax(q @ k.t() * dim**-0.5 + bias, prompt, variant) @ v)
            result = torch.cat(per_head, dim=-1) @ attn.proj.weight.t() + attn.proj.bias
            _scatter(out[b], top, left, side, result)
    return out


def tinyvit_attention(block: nn.Module, grid: torch.Tensor, prompt: torch.Tensor | None, variant: str) -> torch.Tensor:
    """TinyViT's window attention of one block on ``[B, H, W, C]`` (pre-norm inside, padded tokens normed too),
    literally: window by window, head by head, the bias ``attention_biases[head, |dy| * window + |dx|]``, and EPT's
    prompt rows in each query's softmax."""
    attn = block.attn
    batch, _, _, channels = grid.shape
    side, heads = block.window_size, attn.num_heads
    dim = channels // heads
    pos = torch.arange(side * side)
    offsets = (pos[:, None] // side - pos[None, :] // side).abs() * side + (
        pos[:, None] % side - pos[None, :] % side
    ).abs()
    out = torch.zeros_like(grid)
    for b in range(batch):
        for top, left, tokens in _windows(grid[b], side):
            normed = F.layer_norm(tokens, (channels,), attn.norm.weight, attn.norm.bias, attn.norm.eps)
            qkv = (normed @ attn.qkv.weight.t() + attn.qkv.bias).reshape(-1, heads, 3, dim)  # per head: q, k, v
            per_head = []
            for h in range(heads):
                q, k, v = qkv[:, h, 0], qkv[:, h, 1], qkv[:, h, 2]
                logits = q @ k.t() * dim**-0.5 + attn.attention_biases[h][offsets]
                per_head.append(_ept_softmax(logits, prompt, variant) @ v)
            result = torch.cat(per_head, dim=-1) @ attn.proj.weight.t() + attn.proj.bias
            _scatter(out[b], top, left, side, result)
    return out


def no_branch(block: nn.Module, grid: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(grid)


def reference_features(
    encoder: nn.Module,
    x: torch.Tensor,
    prompt: Prompt = lambda block: None,
    variant: str = "pure_cat",
    branch: Branch = no_branch,
) -> torch.Tensor:
    """The encoder's features ``[B, C]`` (mean of the neck's map), written out with literal attention, EPT's
    ``prompt(block)`` (or None) in its softmax and ``branch(block, post_attention_grid)`` beside the MLP."""
    if encoder.family == "sam":
        patch = encoder.patch_embed.proj
        t = F.conv2d(x, patch.weight, patch.bias, stride=patch.stride).permute(0, 2, 3, 1) + encoder.pos_embed
        for block in encoder.blocks:
            width = t.shape[-1]
            normed = F.layer_norm(t, (width,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
            t = t + sam_attention(block, normed, prompt(block), variant)
            normed = F.layer_norm(t, (width,), block.norm2.weight, block.norm2.bias, block.norm2.eps)
            mlp = F.gelu(normed @ block.mlp.lin1.weight.t() + block.mlp.lin1.bias) @ block.mlp.lin2.weight.t()
            t = t + mlp + block.mlp.lin2.bias + branch(block, t)
        return encoder.neck(t.permute(0, 3, 1, 2)).mean(dim=(2, 3))
    t = encoder.layers[0](encoder.patch_embed(x))
    for layer in encoder.layers[1:]:
        t = t.permute(0, 2, 3, 1)
        for block in layer.blocks:
            t = t + tinyvit_attention(block, t, prompt(block), variant)
            t = block.local_conv(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            t = t + block.mlp(t) + branch(block, t)
        t = t.permute(0, 3, 1, 2)
        t = t if layer.downsample is None else layer.downsample(t)
    return encoder.neck(t).mean(dim=(2, 3))
