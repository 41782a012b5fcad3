"""Segmentation on the SAM family: PromptSAMUNETR (UNETR's decoder on SAM's ViT image encoder), PromptTinyViTUNETR
(LiteMedSAM's TinyViT with a SwinUNETR-style decoder) and segmentation_network, on tiny random encoders."""

from __future__ import annotations

import pytest
import torch

from grid_support import TINYVIT_TINY, randomise
from monai_prompt.backbones import pretrained
from monai_prompt.backbones.sam import build_sam
from monai_prompt.nets import (
    PromptClassifier,
    PromptSAMUNETR,
    PromptTinyViTUNETR,
    PromptUNETR,
    segmentation_network,
)
from monai_prompt.nets.sam_unetr import tinyvit_levels
from monai_prompt.peft import method_names
from peft_checks import assert_adamw_trains_exactly, perturb_trainable

IMG, OUT = 32, 3
#: patch 16 (UNETR's): a 2 x 2 grid at 32 px, one padded window of 3, global attention in blocks 1 and 3.
SAM_SEG = {
    "embed_dim": 32, "depth": 4, "num_heads": 2, "out_chans": 16, "window_size": 3, "global_attn_indexes": (1, 3)
}
PRESETS = {"sam": ("sam_vit_b", SAM_SEG), "tinyvit": ("lite_medsam", TINYVIT_TINY)}
NETWORKS = {"sam": PromptSAMUNETR, "tinyvit": PromptTinyViTUNETR}
#: every method of the families but FPT's (classification only), VPT shallow and deep.
CASES = [(m, None) for m in method_names() if not m.startswith("fpt")] + [("vpt", {"deep": True})]


#: with a plain ViT (PromptUNETR) for what every segmentation network shares.
ALL_PRESETS = {**PRESETS, "vit": ("vit_tiny", {"hidden_size": 32, "num_layers": 4, "num_heads": 2, "mlp_dim": 64})}


def make_net(family: str, method: str, config: dict | None = None, **kwargs) -> torch.nn.Module:
    name, overrides = ALL_PRESETS[family]
    net = segmentation_network(3, OUT, IMG, method, config, name, 2, 4, backbone_overrides=overrides, **kwargs)
    torch.manual_seed(0)
    randomise(getattr(net, net.backbone_name))  # a stand-in for pre-trained weights (the method's tensors too)
    return net


@pytest.mark.parametrize("family", list(PRESETS))
@pytest.mark.parametrize(("method", "config"), CASES)
def test_every_method_trains_its_parameters_and_the_decoder(family, method, config):
    """The family's network, the method's parameters (as a classifier on the same encoder trains them) and the
    whole decoder train; logits at full resolution; the frozen encoder stays bit-identical under AdamW."""
    net = make_net(family, method, config).train()
    assert type(net) is NETWORKS[family]
    encoder = getattr(net, net.backbone_name)
    name, overrides = PRESETS[family]
    classifier = PromptClassifier(OUT, method, config, backbone=name, img_size=IMG, backbone_overrides=overrides)
    in_encoder = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert in_encoder == {n for n, p in classifier.backbone.named_parameters() if p.requires_grad}
    assert bool(in_encoder) == (method != "linear")
    report = net.parameter_report()
    assert report["encoder_trainable"] == sum(p.numel() for n, p in encoder.named_parameters() if n in in_encoder)
    assert report["decoder"] == sum(p.numel() for n, p in net.named_parameters() if not n.startswith(net.backbone_name))
    assert net(torch.zeros(1, 3, IMG, IMG)).shape == (1, OUT, IMG, IMG)
    perturb_trainable(net)
    assert_adamw_trains_exactly(net, {n for n, p in net.named_parameters() if p.requires_grad})


@pytest.mark.parametrize("family", list(PRESETS))
def test_windowed_vpt_scripts_and_its_prompts_stay_out_of_the_maps(family):
    """Deep VPT (prompts beside the grid in every block) scripts for ckpt_export; the decoder's maps are the grid's."""
    net = make_net(family, "vpt", {"deep": True}).eval()
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    # TorchScript takes the TinyViT's unfolded BatchNorm path: equal to float32 rounding
    torch.testing.assert_close(torch.jit.script(net)(x), net(x), rtol=1e-4, atol=1e-4)
    encoder = getattr(net, net.backbone_name)
    if family == "sam":  # channels-last grids, one per block
        assert [tuple(m.shape) for m in encoder.forward_hidden_states(x)] == [(2, 2, 2, SAM_SEG["embed_dim"])] * 4
    else:  # each stage's map after its merge, then the neck's
        sizes = [tuple(m.shape[1:]) for m in encoder.forward_stages(x)]
        assert sizes == [(16, 16, 16), (24, 8, 8), (32, 8, 8), (32, 8, 8), (16, 8, 8)]


def test_the_decoders_read_what_they_say():
    """SAM: UNETR's taps (blocks 1, 2, 3 of 4) and the neck into decoder5; TinyViT: one skip per resolution."""
    sam = make_net("sam", "linear")
    assert sam.tap_layers == [1, 2, 3]
    assert sam.decoder5.transp_conv.conv.in_channels == SAM_SEG["out_chans"]
    assert sam.encoder2.transp_conv_init.conv.in_channels == SAM_SEG["embed_dim"]
    assert tinyvit_levels((2, 2, 1)) == [(2, 0), (4, 1)]  # LiteMedSAM: stage 0 at 1/2, stage 1 at 1/4
    assert tinyvit_levels((2, 1, 2)) == [(2, 0), (4, 2)]
    tiny = make_net("tinyvit", "linear")
    assert [level.index for level in tiny.decoder] == [1, 0]  # coarse to fine


def test_auto_builds_the_sam_network_from_a_checkpoint_of_another_size(tmp_path, monkeypatch):
    """A whole-SAM checkpoint at 64 px (its position embedding resized to 32 px), one input channel (the kernel
    summed): backbone='auto' picks PromptSAMUNETR, reading the file once for the choice and the weights."""
    encoder = randomise(build_sam("sam_vit_b", img_size=64, **SAM_SEG))
    path = tmp_path / "sam.pth"
    torch.save({f"image_encoder.{k}": v for k, v in encoder.state_dict().items()}, path)
    reads = []
    read_file = pretrained._read_file
    monkeypatch.setattr(pretrained, "_read_file", lambda file: reads.append(file) or read_file(file))
    net = segmentation_network(1, OUT, IMG, "lora", backbone="auto", pretrained=str(path), spatial_dims=2)
    assert isinstance(net, PromptSAMUNETR) and net.vit.grid_size == [2, 2]
    assert reads == [path] and net.vit.pretrained_source == str(path)
    assert net(torch.zeros(1, 1, IMG, IMG)).shape == (1, OUT, IMG, IMG)


def test_refusals_say_why():
    for family in PRESETS:
        name, overrides = PRESETS[family]
        with pytest.raises(ValueError, match=r"is a 2D encoder.*spatial_dims=3.*use a ViT backbone"):
            segmentation_network(3, OUT, IMG, "lora", backbone=name, spatial_dims=3, backbone_overrides=overrides)
    with pytest.raises(ValueError, match=r"PromptUNETR decodes a plain ViT.*'tinyvit'.*segmentation_network"):
        PromptUNETR(3, OUT, IMG, spatial_dims=2, backbone="lite_medsam", backbone_overrides=TINYVIT_TINY)
    with pytest.raises(ValueError, match=r"multiple of its total stride 4"):
        make_net_at("tinyvit", 30)
    with pytest.raises(ValueError, match=r"needs patch size 16, got 8"):
        segmentation_network(3, OUT, IMG, backbone="sam_vit_b", spatial_dims=2, backbone_overrides={**SAM_SEG,
                                                                                                   "patch_size": 8})
    with pytest.raises(ValueError, match=r"classification method.*no per-patch features"):
        make_net("sam", "fpt")


def make_net_at(family: str, size: int) -> torch.nn.Module:
    name, overrides = PRESETS[family]
    return segmentation_network(3, OUT, size, "linear", backbone=name, spatial_dims=2, backbone_overrides=overrides)


@pytest.mark.parametrize(("family", "method", "config"),
                         [("vit", "lora", None), ("sam", "vpt", {"deep": True}), ("tinyvit", "vpt", {"deep": True})])
def test_zeroed_encoder_leaves_the_decoder_alone(family, method, config):
    """The zeroed-encoder ablation (the segmentation benchmark's): zeroed, the logits no longer depend on the encoder
    (perturbed, they stay equal), without it they do, and undoing it restores the network."""
    from monai_prompt.runs.segmentation_demo_task import zero_encoder_outputs

    net = make_net(family, method, config).eval()
    encoder, image = getattr(net, net.backbone_name), torch.rand(2, 3, IMG, IMG)

    def perturbed() -> tuple[torch.Tensor, torch.Tensor]:
        before = net(image)
        for parameter in encoder.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
        return before, net(image)

    with torch.no_grad():
        before, after = perturbed()
        assert (before - after).abs().max() > 1e-3
        undo = zero_encoder_outputs(net)
        before, after = perturbed()
        torch.testing.assert_close(before, after, rtol=0, atol=0)
        undo()
        assert (net(image) - after).abs().max() > 1e-3
