"""PromptableViT: MONAI ViT compatibility, presets, TorchScript, clear errors."""

import pytest
import torch
from monai.networks.nets import ViT

from grid_support import SAM_TINY
from monai_prompt.backbones import build_sam, build_vit, vit_config
from monai_prompt.peft import backbone_parameter_count

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "mlp_dim": 64, "patch_size": 8}


def monai_reference(vit) -> ViT:
    """A stock MONAI ViT with the same architecture, LayerNorm eps set to the checkpoint's."""
    cfg = vit.config
    ref = ViT(
        cfg["in_channels"], cfg["img_size"], cfg["patch_size"], cfg["hidden_size"], cfg["mlp_dim"], cfg["num_layers"],
        cfg["num_heads"], classification=True, spatial_dims=cfg["spatial_dims"], post_activation="none",
        qkv_bias=cfg["qkv_bias"],
    )
    del ref.classification_head
    for module in ref.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = cfg["layer_norm_eps"]
    return ref


@pytest.mark.parametrize("spatial_dims,img_size", [(2, 32), (3, 16)])
def test_same_keys_and_outputs_as_monai_vit(spatial_dims, img_size):
    vit = build_vit("vit_tiny", in_channels=1, img_size=img_size, spatial_dims=spatial_dims, **TINY).eval()
    ref = monai_reference(vit).eval()
    assert list(vit.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(vit.state_dict())
    x = torch.randn(2, 1, *([img_size] * spatial_dims))
    tokens, hidden = vit(x)
    ref_tokens, ref_hidden = ref(x)
    torch.testing.assert_close(tokens, ref_tokens, rtol=0, atol=1e-6)
    assert len(hidden) == 2 and hidden[-1].shape == ref_hidden[-1].shape


def test_defaults_for_pretrained_checkpoints():
    vit = build_vit("vit_tiny", **TINY)
    assert vit.blocks[0].attn.qkv.bias is not None
    assert not hasattr(vit, "classification_head")
    norms = [m for n, m in vit.named_modules() if isinstance(m, torch.nn.LayerNorm) and "norm_cross_attn" not in n]
    assert len(norms) == 2 * 2 + 1 and all(m.eps == 1e-6 for m in norms)
    assert build_vit("vit_tiny", layer_norm_eps=1e-12, **TINY).norm.eps == 1e-12
    assert vit.config["spatial_dims"] == 2


def test_norm_cross_attn_neither_trained_nor_counted():
    vit = build_vit("vit_tiny", **TINY)
    unused = [p for n, p in vit.named_parameters() if "norm_cross_attn" in n]
    assert unused and not any(p.requires_grad for p in unused)
    total = sum(p.numel() for n, p in vit.named_parameters() if "norm_cross_attn" not in n)
    assert backbone_parameter_count(vit) == total


def test_presets_match_published_sizes():
    # timm vit_base_patch16_224 has 86,567,656 parameters with its 1000-class head (768*1000 + 1000); MONAI
    # has no CLS position slot (768 values, folded into cls_token on import).
    assert backbone_parameter_count(build_vit("vit_base")) == 86_567_656 - 769_000 - 768
    assert vit_config("vit_small_p8") == {
        "hidden_size": 384, "num_layers": 12, "num_heads": 6, "mlp_dim": 1536, "patch_size": 8
    }
    assert vit_config("vit_large")["num_layers"] == 24
    with pytest.raises(ValueError, match="unknown ViT preset 'vit_huge'"):
        vit_config("vit_huge")
    with pytest.raises(ValueError, match="unknown build_vit overrides"):
        build_vit("vit_tiny", depth=3)


def test_torchscript_and_checkpointing_match_eager():
    vit = build_vit("vit_tiny", img_size=32, **TINY).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    vit.eval()
    scripted = torch.jit.script(vit)
    torch.testing.assert_close(scripted(x)[0], vit(x)[0], rtol=0, atol=0)
    vit.train()
    params = [p for p in vit.parameters() if p.requires_grad]
    plain = vit.forward_features(x).sum()
    grads = torch.autograd.grad(plain, params)
    vit.set_grad_checkpointing(True)
    ckpt = vit.forward_features(x).sum()
    ckpt_grads = torch.autograd.grad(ckpt, params)
    torch.testing.assert_close(ckpt, plain)
    for a, b in zip(grads, ckpt_grads):
        torch.testing.assert_close(a, b)


def test_sdpa_matches_literal_attention():
    vit = build_vit("vit_tiny", img_size=32, **TINY).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    literal = vit(x)[0]
    vit.set_sdpa(True)
    torch.testing.assert_close(vit(x)[0], literal, rtol=1e-10, atol=1e-10)


def test_wrong_input_size_or_channels_is_a_clear_error():
    vit = build_vit("vit_tiny", img_size=32, **TINY)
    with pytest.raises(ValueError, match=r"input spatial size \[48, 48\] differs .* \[32, 32\]"):
        vit(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match=r"input has 1 channels, .* in_channels=3; .*RepeatChannel"):
        vit(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"SAM encoder input has 1 channels, .* in_channels=3"):
        build_sam("sam_vit_b", img_size=64, **SAM_TINY)(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="not divisible"):
        build_vit("vit_tiny", img_size=30, **TINY)
