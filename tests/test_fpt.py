"""FPT / FPT+: token selection, LPM extraction, fusion, side network, parameter counts, gradients, export."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from monai_prompt.backbones import build_vit
from monai_prompt.fpt import (
    FPTConfig,
    LPMExtractor,
    PromptFusion,
    default_side_img_size,
    resolve_layers,
    select_important_tokens,
)
from monai_prompt.nets import OFFICIAL_LPM_PARAMETERS, FPTClassifier, paper_learnable_percent
from monai_prompt.peft import apply_method, delta_state_dict, load_delta, trainable_report
from monai_prompt.peft.delta import IDENTITY_KEYS
from net_support import TINY_FPT_BACKBONE as TINY
from net_support import tiny_fpt

# ---------------------------------------------------------------- literal references (float64, loops/einsum)


def ref_layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def ref_qkv(blk, x: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [B, H, N, d] of pre-LN tokens: MONAI's combined qkv is ordered (q|k|v, head, d)."""
    h = ref_layer_norm(x, blk.norm1)
    qkv = h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
    b, n, three_d = qkv.shape
    qkv = qkv.view(b, n, 3, heads, three_d // 3 // heads)
    return qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)


def ref_block(blk, x: torch.Tensor, heads: int) -> torch.Tensor:
    """Pre-LN ViT block: x + out_proj(attention(LN1 x)); x + W2 gelu(W1 LN2 x)."""
    q, k, v = ref_qkv(blk, x, heads)
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    attended = (probs @ v).transpose(1, 2).reshape(x.shape)
    x = x + attended @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias
    hidden = F.gelu(ref_layer_norm(x, blk.norm2) @ blk.mlp.linear1.weight.T + blk.mlp.linear1.bias)
    return x + hidden @ blk.mlp.linear2.weight.T + blk.mlp.linear2.bias


def ref_embed(vit, image: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    conv = vit.patch_embedding.patch_embeddings
    patches = F.conv2d(image, conv.weight, conv.bias, stride=conv.stride).flatten(2).transpose(1, 2)
    patches = patches + vit.patch_embedding.position_embeddings
    return torch.cat((cls.expand(image.shape[0], -1, -1), patches), dim=1)


def ref_select(probs: torch.Tensor, tensor: torch.Tensor, keep: int, importance: str) -> torch.Tensor:
    """Per (sample, head): rank keys by mean received attention (or CLS attention) with Python loops."""
    b_size, heads, n_tokens, _ = probs.shape
    out = torch.empty(b_size, heads, keep, tensor.shape[-1], dtype=tensor.dtype)
    for b in range(b_size):
        for h in range(heads):
            if importance == "global":
                score = [sum(probs[b, h, i, j].item() for i in range(n_tokens)) / n_tokens for j in range(n_tokens)]
            else:
                score = [probs[b, h, 0, j].item() for j in range(n_tokens)]
            order = sorted(range(n_tokens), key=lambda j: -score[j])[:keep]
            for slot, j in enumerate(order):
                out[b, h, slot] = tensor[b, h, j]
    return out


def ref_lpm_features(lpm: LPMExtractor, image: torch.Tensor) -> torch.Tensor:
    x = ref_embed(lpm, image, lpm.cls_token)
    keys, values = [], []
    for index, blk in enumerate(lpm.blocks):
        if index in lpm.taps:
            q, k, v = ref_qkv(blk, x, lpm.num_heads)
            probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
            keys.append(ref_select(probs, k, lpm.num_keep, lpm.token_importance))
            values.append(ref_select(probs, v, lpm.num_keep, lpm.token_importance))
        x = ref_block(blk, x, lpm.num_heads)
    return torch.stack((torch.stack(keys, 1), torch.stack(values, 1)), 1)


def ref_fusion(fusion: PromptFusion, kv: torch.Tensor, heads: int) -> torch.Tensor:
    """Layer by layer, head by head: prompts query the selected keys; FPT+ residual before out_proj, FPT after."""
    layers, _, num_prompts, prompt_dim = fusion.prompts.shape
    lpm_dim = fusion.out_proj.weight.shape[1]
    head_dim = lpm_dim // heads
    out = []
    for layer in range(layers):
        per_sample = []
        for b in range(kv.shape[0]):
            p = fusion.prompts[layer, 0]
            q = ref_layer_norm(p, fusion.prompt_norm) if isinstance(fusion.prompt_norm, torch.nn.LayerNorm) else p
            if isinstance(fusion.prompt_proj, torch.nn.Linear):
                q = q @ fusion.prompt_proj.weight.T + fusion.prompt_proj.bias
            heads_out = []
            for h in range(heads):
                q_h = q[:, h * head_dim : (h + 1) * head_dim]
                att = torch.softmax(q_h @ kv[b, 0, layer, h].T / math.sqrt(head_dim), dim=-1)
                heads_out.append(att @ kv[b, 1, layer, h])
            context = torch.cat(heads_out, dim=-1)
            if prompt_dim == lpm_dim:
                fused = (context + p) @ fusion.out_proj.weight.T + fusion.out_proj.bias
            else:
                fused = context @ fusion.out_proj.weight.T + fusion.out_proj.bias + p
            per_sample.append(fused)
        out.append(torch.stack(per_sample))
    return torch.stack(out)


def ref_side(side, image: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """Embed, then per block: append that block's prompts, run the block, drop the prompt outputs."""
    vit = side.vit
    x = ref_embed(vit, image, vit.cls_token + side.cls_position_embedding)
    n_tokens = x.shape[1]
    for index, blk in enumerate(vit.blocks):
        x = ref_block(blk, torch.cat((x, prompts[index]), 1), vit.num_heads)[:, :n_tokens]
    cls = ref_layer_norm(x, vit.norm)[:, 0]
    return cls @ side.head.weight.T + side.head.bias


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("importance", ["global", "class_token"])
def test_select_important_tokens_matches_loops(importance):
    torch.manual_seed(0)
    probs = torch.randn(2, 3, 7, 7, dtype=torch.float64).softmax(-1)
    keys, values = torch.randn(2, 2, 3, 7, 5, dtype=torch.float64)
    k_sel, v_sel = select_important_tokens(probs, keys, values, 3, importance)
    assert torch.equal(k_sel, ref_select(probs, keys, 3, importance))
    assert torch.equal(v_sel, ref_select(probs, values, 3, importance))


@pytest.mark.parametrize("variant,importance", [("fpt", "global"), ("fptplus", "class_token")])
def test_lpm_features_match_reference(variant, importance):
    torch.manual_seed(1)
    net = tiny_fpt(variant, token_importance=importance).double()
    image = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    features = net.lpm_features(image)
    # 17 tokens (16 patches + CLS), int(17 * 0.2) = 3 kept per head, head dim 16.
    expected_layers = [0, 1, 2] if variant == "fpt" else [2]
    assert net.lpm.taps == expected_layers
    assert list(features.shape) == [2, 2, len(expected_layers), 4, 3, 16]
    torch.testing.assert_close(features, ref_lpm_features(net.lpm, image), rtol=0, atol=1e-12)
    assert not features.requires_grad


@pytest.mark.parametrize("variant", ["fpt", "fptplus"])
def test_fusion_matches_reference(variant):
    torch.manual_seed(2)
    net = tiny_fpt(variant).double().eval()
    fusion = net.fusion
    with torch.no_grad():
        fusion.prompts.normal_()  # the 1e-6 init would hide the prompt path
    kv = torch.randn(2, *net.feature_shape, dtype=torch.float64)
    expected_dim = 64 if variant == "fptplus" else 8
    assert fusion.prompts.shape == (len(net.lpm.taps), 1, 16, expected_dim)
    torch.testing.assert_close(fusion(kv), ref_fusion(fusion, kv, heads=4), rtol=0, atol=1e-12)


def test_fusion_dropout_is_on_the_output_in_training():
    torch.manual_seed(3)
    fusion = PromptFusion(2, 64, 64, 4, 64, 64, prompt_norm=True, prompt_proj=False, dropout=0.5)
    kv = torch.randn(3, 2, 2, 4, 5, 16)
    clean = fusion.eval()(kv)
    noisy = fusion.train()(kv)
    dropped = noisy == 0
    assert 0.4 < dropped.float().mean().item() < 0.6
    torch.testing.assert_close(noisy[~dropped], 2 * clean[~dropped])


def test_side_network_matches_reference():
    torch.manual_seed(4)
    net = tiny_fpt("fpt").double()
    image = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    prompts = torch.randn(3, 2, 16, 8, dtype=torch.float64)
    torch.testing.assert_close(net.side(image, prompts), ref_side(net.side, image, prompts), rtol=0, atol=1e-12)


def test_online_forward_composes_lpm_fusion_and_downsampled_side_input():
    torch.manual_seed(5)
    net = tiny_fpt("fptplus").double().eval()
    image = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    side_image = F.interpolate(image, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    expected = ref_side(net.side, side_image, ref_fusion(net.fusion, ref_lpm_features(net.lpm, image), heads=4))
    torch.testing.assert_close(net(image), expected, rtol=0, atol=1e-12)
    # cached features with the LPM-size image (evaluation) or an already small side image (training)
    features = net.lpm_features(image)
    torch.testing.assert_close(net(image, features), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(net(side_image, features), expected, rtol=0, atol=1e-12)


def test_no_gradient_reaches_the_lpm():
    torch.manual_seed(6)
    net = tiny_fpt("fptplus").train()
    assert not net.lpm.training, "the LPM stays in eval mode"
    image = torch.randn(2, 3, 32, 32)
    loss = F.cross_entropy(net(image), torch.tensor([0, 2]))
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in net.lpm.parameters())
    assert net.fusion.prompts.grad is not None and net.fusion.prompts.grad.abs().sum() > 0
    assert net.side.head.weight.grad.abs().sum() > 0
    assert net.lpm_features(image).grad_fn is None


def vit_layer(d: int, mlp: int) -> int:
    return 3 * (d * d + d) + (d * d + d) + (d * mlp + mlp) + (mlp * d + d) + 4 * d


def hf_vit(d: int, mlp: int, depth: int, img: int, ncls: int, patch: int = 16, channels: int = 3) -> int:
    """HuggingFace ViT(ForImageClassification) parameters: conv, CLS, CLS+patch positions, blocks, LN, head."""
    tokens = (img // patch) ** 2 + 1
    return depth * vit_layer(d, mlp) + channels * patch * patch * d + d + d + tokens * d + 2 * d + d * ncls + ncls


@pytest.mark.parametrize(
    "variant,side_depth,side_img,prompt_params,learnable,percent",
    [
        ("fpt", 12, 224, 12 * 16 * 96 + (96 * 768 + 768), 1_602_341, 1.811),
        ("fptplus", 6, 128, 6 * 16 * 768 + 2 * 768, 900_965, 1.027),
    ],
)
def test_parameter_counts_vit_b16_512(variant, side_depth, side_img, prompt_params, learnable, percent):
    net = FPTClassifier(num_classes=5, variant=variant)  # ViT-B/16 LPM at 512, built only (no forward)
    side = hf_vit(96, 384, side_depth, side_img, ncls=5)
    fusion = prompt_params + 768 * 96 + 96
    assert sum(p.numel() for p in net.side.parameters() if p.requires_grad) == side
    assert sum(p.numel() for p in net.fusion.parameters()) == fusion
    assert net.learnable_parameters() == side + fusion == learnable
    assert OFFICIAL_LPM_PARAMETERS == hf_vit(768, 3072, 12, 384, ncls=1000)
    assert round(paper_learnable_percent(net.learnable_parameters()), 3) == percent
    report = trainable_report(net)
    assert report["method"] == variant and report["trainable"] == learnable
    # the report's own convention: learnable / MONAI ViT-B at 512 (no CLS position slot, no head)
    monai_lpm = hf_vit(768, 3072, 12, 512, ncls=0) - 768
    assert report["backbone"] == monai_lpm
    assert not any(p.requires_grad for p in net.lpm.parameters())


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_torchscript_and_trace_match_eager():
    torch.manual_seed(7)
    net = tiny_fpt("fpt").eval()
    image = torch.randn(2, 3, 32, 32)
    scripted = torch.jit.script(net)
    torch.testing.assert_close(scripted(image), net(image), rtol=0, atol=0)
    features = net.lpm_features(image)
    torch.testing.assert_close(scripted(image[:, :, ::2, ::2], features), net(image[:, :, ::2, ::2], features))
    traced = torch.jit.trace(net, image)
    other = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(traced(other), net(other), rtol=0, atol=1e-6)


def test_delta_checkpoint_holds_side_and_fusion_only():
    torch.manual_seed(8)
    net = tiny_fpt("fptplus")
    delta = delta_state_dict(net)
    assert delta["peft"]["method"] == "fptplus" and delta["peft"]["config"]["layers"] == [2]
    assert all(name.startswith(("side.", "fusion.")) for name in delta["model"] if name not in IDENTITY_KEYS)
    other = tiny_fpt("fptplus")
    other.lpm.load_state_dict(net.lpm.state_dict())
    load_delta(other, delta)
    image = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(other.eval()(image), net.eval()(image))


def test_three_dimensional_lpm_runs():
    net = FPTClassifier(
        2, "fpt", {"side_img_size": 8}, backbone="vit_tiny", img_size=16, spatial_dims=3, backbone_overrides=TINY
    )
    assert net(torch.randn(1, 3, 16, 16, 16)).shape == (1, 2)


def test_layer_resolution():
    assert resolve_layers("all", 12) == list(range(12))
    assert resolve_layers("last_half", 12) == list(range(6, 12))
    assert resolve_layers("last_half", 24) == list(range(12, 24))
    assert FPTConfig("fpt").prompt_reduction == 8 and FPTConfig("fptplus").side_img_size is None


def test_side_input_follows_the_lpm_input_and_a_larger_one_is_refused():
    # the papers' sizes at 512 px, scaled to whole patches elsewhere (at least one, at most the LPM input)
    assert [default_side_img_size(v, 512, 16) for v in ("fpt", "fptplus")] == [224, 128]
    assert [default_side_img_size(v, 224, 16) for v in ("fpt", "fptplus")] == [96, 64]
    assert [default_side_img_size(v, 32, 16) for v in ("fpt", "fptplus")] == [16, 16]
    tiny = {"backbone": "vit_tiny", "img_size": 32, "backbone_overrides": TINY}
    net = FPTClassifier(2, "fpt", **tiny)
    assert net.side_img_size == [16, 16] and net.fpt_config.side_img_size == 16
    assert net.lpm.peft_config["side_img_size"] == 16
    with pytest.raises(ValueError, match=r"side_img_size 64 is larger than the LPM input img_size 32: .*"
                                         r"--method_config#side_img_size\) to at most 32, or leave it null for 8 "):
        FPTClassifier(2, "fptplus", {"side_img_size": 64}, **tiny)


def test_clear_errors():
    net = tiny_fpt("fpt").eval()
    with pytest.raises(ValueError, match=r"size \[24, 24\] differs from the LPM size \[32, 32\]"):
        net(torch.randn(1, 3, 24, 24))
    with pytest.raises(ValueError, match="neither the LPM size"):
        net(torch.randn(1, 3, 24, 24), net.lpm_features(torch.randn(1, 3, 32, 32)))
    with pytest.raises(ValueError, match="another LPM or FPT variant"):
        net(torch.randn(1, 3, 16, 16), torch.randn(1, 2, 1, 4, 3, 16))
    with pytest.raises(ValueError, match="unknown FPT variant"):
        FPTConfig("fpt++")
    with pytest.raises(ValueError, match="unknown FPT config keys"):
        FPTConfig.from_dict("fpt", {"prompts": 8})
    with pytest.raises(ValueError, match="strictly increasing"):
        resolve_layers([3, 1], 12)
    vit = apply_method(build_vit("vit_tiny", img_size=32, **TINY), "linear")
    vit.peft_method = "lora"
    with pytest.raises(ValueError, match="plain pre-trained ViT"):
        FPTClassifier(2, "fpt", backbone=vit)


def test_delta_loads_strictly_for_monai_tools():
    """MONAI's ckpt_export / ignite load a delta (trainable keys only) with strict=True."""
    torch.manual_seed(0)
    trained, fresh = tiny_fpt("fptplus"), tiny_fpt("fptplus")
    fresh.lpm.load_state_dict(trained.lpm.state_dict())
    fresh.load_state_dict(delta_state_dict(trained)["model"], strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fresh.eval()(x), trained.eval()(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict({k: v for k, v in delta_state_dict(trained)["model"].items() if "fusion" not in k})
