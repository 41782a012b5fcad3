"""VPT on the windowed SAM-family encoders (``monai_prompt.peft.vpt_windowed``), shallow and deep.

The reference is written out here, slowly and literally, in float64: one image at a time, every window cut from the
zero-padded grid by hand, the prompts concatenated in front of its tokens, attention computed head by head with the
relative-position bias (SAM) or attention bias (TinyViT) looked up entry by entry (zero for the prompts), the
prompt outputs averaged over the windows of the image, and every TinyViT convolution a prompt crosses run on a
constant map of the prompt (its centre read out). Only the frozen encoder's own norms, MLPs, convolutions and neck
are called as modules.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn as nn

from grid_support import IMG, tiny_encoder
from monai_prompt.nets.classifier import PromptClassifier
from monai_prompt.peft import apply_method
from peft_checks import assert_adamw_trains_exactly, assert_efficiency_paths_match

CLASSES, TOKENS = 3, 3


def encoder(family: str) -> nn.Module:
    """A tiny random encoder of ``family`` standing in for pre-trained weights, at a spread (0.5) where the first
    block's prompts still move the tiny TinyViT's output (at 0.3 its convolutions damp them to about 1e-8)."""
    return tiny_encoder(family, spread=0.5)


def images(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(5), dtype=dtype)


# --------------------------------------------------------------------------------------------------------
# The literal reference.
# --------------------------------------------------------------------------------------------------------


@functools.cache
def offsets(side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column offsets ``(y_i - y_j, x_i - x_j)`` of every query ``i`` and key ``j`` of a window, ``[N, N]``
    each (tokens in row-major order), written out pair by pair."""
    tokens = side * side
    dy, dx = torch.zeros(tokens, tokens, dtype=torch.long), torch.zeros(tokens, tokens, dtype=torch.long)
    for i in range(tokens):
        for j in range(tokens):
            dy[i, j] = i // side - j // side
            dx[i, j] = i % side - j % side
    return dy, dx


def sam_attention(attn: nn.Module, tokens: torch.Tensor, prompts: int, side: int) -> torch.Tensor:
    """SAM attention of one window's ``[prompts..., side * side tokens]`` ``[n, C]``, head by head: the bias of
    query ``i`` and key ``j`` (both patches) is ``q_i . R_h[dy + side - 1] + q_i . R_w[dx + side - 1]``."""
    width = tokens.shape[1]
    dim = width // attn.num_heads
    dy, dx = offsets(side)
    qkv = tokens @ attn.qkv.weight.T + attn.qkv.bias  # [q of every head, k of every head, v of every head]
    heads = []
    for h in range(attn.num_heads):
        q, k, v = (qkv[:, part * width + h * dim : part * width + (h + 1) * dim] for part in range(3))
        logits = q @ k.T / math.sqrt(dim)
        patches = q[prompts:, None, :]
        rel = (patches * attn.rel_pos_h[dy + side - 1]).sum(-1) + (patches * attn.rel_pos_w[dx + side - 1]).sum(-1)
        logits[prompts:, prompts:] += rel  # no bias to or from a prompt
        heads.append(logits.softmax(dim=-1) @ v)
    return torch.cat(heads, dim=-1) @ attn.proj.weight.T + attn.proj.bias


def tinyvit_attention(attn: nn.Module, tokens: torch.Tensor, prompts: int, side: int) -> torch.Tensor:
    """TinyViT attention (its own LayerNorm first) of one window's ``[prompts..., side * side tokens]``: the bias
    of two patches is ``attention_biases[head, |dy| * side + |dx|]``."""
    n = tokens.shape[0]
    dy, dx = offsets(side)
    qkv = attn.qkv(attn.norm(tokens)).view(n, attn.num_heads, 3, attn.head_dim)  # per head: q, k, v side by side
    heads = []
    for h in range(attn.num_heads):
        q, k, v = qkv[:, h, 0], qkv[:, h, 1], qkv[:, h, 2]
        logits = q @ k.T / math.sqrt(attn.head_dim)
        logits[prompts:, prompts:] += attn.attention_biases[h, dy.abs() * side + dx.abs()]  # none for a prompt
        heads.append(logits.softmax(dim=-1) @ v)
    return attn.proj(torch.cat(heads, dim=-1))


def windows_with_prompts(attention, attn, grid, prompts, side) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a ``[H, W, C]`` grid, window by window over its zero-padded copy, with ``prompts`` ``[p, C]``
    in front of every window; the grid's output and the prompts' output averaged over the windows."""
    h, w, width = grid.shape
    padded = grid.new_zeros(math.ceil(h / side) * side, math.ceil(w / side) * side, width)
    padded[:h, :w] = grid
    out, prompt_outs = torch.zeros_like(padded), []
    for top in range(0, padded.shape[0], side):
        for left in range(0, padded.shape[1], side):
            window = padded[top : top + side, left : left + side].reshape(side * side, width)
            result = attention(attn, torch.cat((prompts, window)), len(prompts), side)
            out[top : top + side, left : left + side] = result[len(prompts) :].view(side, side, width)
            prompt_outs.append(result[: len(prompts)])
    return out[:h, :w], torch.stack(prompt_outs).mean(dim=0)


def sam_reference(model: nn.Module, x: torch.Tensor, deep: bool) -> torch.Tensor:
    """The prompted SAM encoder's image embedding, one image at a time."""
    embeddings = []
    for image in x:
        grid = model.patch_embed.proj(image[None])[0].permute(1, 2, 0) + model.pos_embed[0]
        for index, block in enumerate(model.blocks):
            if deep or index == 0:
                prompts = block.prompts
            side = block.window_size or grid.shape[0]  # a global block: the whole grid is the one window
            out, prompt_out = windows_with_prompts(
                sam_attention, block.attn, block.norm1(grid), block.norm1(prompts), side
            )
            grid, prompts = grid + out, prompts + prompt_out
            grid, prompts = grid + block.mlp(block.norm2(grid)), prompts + block.mlp(block.norm2(prompts))
        embeddings.append(model.neck(grid.permute(2, 0, 1)[None]))
    return torch.cat(embeddings)


def on_constant_map(module: nn.Module, prompts: torch.Tensor, size: int) -> torch.Tensor:
    """``module`` run on ``size x size`` maps filled with each prompt ``[p, C]``, read at the centre."""
    out = module(prompts[:, :, None, None].expand(-1, -1, size, size))
    return out[:, :, out.shape[2] // 2, out.shape[3] // 2]


def tinyvit_reference(model: nn.Module, x: torch.Tensor, deep: bool) -> torch.Tensor:
    """The prompted TinyViT's image embedding, one image at a time; prompts start at the first attention stage."""
    maps = model.layers[0](model.patch_embed(x))  # the convolutional stage: no prompts
    embeddings = []
    for image in maps:
        grid, prompts = image.permute(1, 2, 0), None
        for stage in model.layers[1:]:
            for block in stage.blocks:
                if deep or prompts is None:
                    prompts = block.prompts
                out, prompt_out = windows_with_prompts(
                    tinyvit_attention, block.attn, grid, prompts, block.window_size
                )
                grid, prompts = grid + out, prompts + prompt_out
                grid = block.local_conv(grid.permute(2, 0, 1)[None])[0].permute(1, 2, 0)
                prompts = on_constant_map(block.local_conv, prompts, 5)
                grid, prompts = grid + block.mlp(grid), prompts + block.mlp(prompts)
            if stage.downsample is not None:
                grid = stage.downsample(grid.permute(2, 0, 1)[None])[0].permute(1, 2, 0)
                prompts = on_constant_map(stage.downsample, prompts, 9)  # the centre stays clear of the border
        embeddings.append(model.neck(grid.permute(2, 0, 1)[None]))
    return torch.cat(embeddings)


@pytest.mark.parametrize("deep", [False, True])
@pytest.mark.parametrize("family", ["sam", "tinyvit"])
def test_prompted_forward_matches_literal_reference_in_float64(family, deep):
    model = encoder(family).double().eval()
    apply_method(model, "vpt", {"num_tokens": TOKENS, "deep": deep})
    x = images()
    reference = sam_reference if family == "sam" else tinyvit_reference
    with torch.no_grad():
        expected = reference(model, x, deep)
        got = model(x)
        model.set_sdpa(True)
        fused = model(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-10)


# --------------------------------------------------------------------------------------------------------
# Training, efficiency switches and TorchScript (shallow; the family tests cover deep VPT).
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("deep", [False, True])
@pytest.mark.parametrize("family", ["sam", "tinyvit"])
def test_prompts_train_alone_and_move_the_features(family, deep):
    torch.manual_seed(0)  # the prompts' and head's initialisation draw (unseeded, some draws failed)
    model = PromptClassifier(CLASSES, "vpt", {"num_tokens": TOKENS, "deep": deep}, backbone=encoder(family)).train()
    blocks = [f"blocks.{i}" for i in range(4)] if family == "sam" else ["layers.1.blocks.0", "layers.1.blocks.1"]
    blocks += [] if family == "sam" else ["layers.2.blocks.0", "layers.3.blocks.0"]  # the attention blocks
    expected = {f"backbone.{b}.prompts" for b in (blocks if deep else blocks[:1])} | {"head.weight", "head.bias"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    x = images(torch.float32)
    with torch.no_grad():
        features = model.backbone.forward_features(x)
    assert_adamw_trains_exactly(model, expected)  # gradients reach every prompt set; the encoder stays bit-equal
    with torch.no_grad():
        assert (model.backbone.forward_features(x) - features).abs().max() > 1e-4  # measured >= 9e-4


@pytest.mark.parametrize("family", ["sam", "tinyvit"])
def test_shallow_checkpointing_sdpa_and_torchscript_match_plain_path(family):
    model = PromptClassifier(CLASSES, "vpt", {"num_tokens": TOKENS}, backbone=encoder(family)).double().train()
    assert_efficiency_paths_match(model, model.backbone, images())
    model.backbone.set_sdpa(False)
    x = images(torch.float32)
    model = model.float().eval()
    torch.testing.assert_close(torch.jit.script(model)(x), model(x), rtol=0, atol=1e-6)
