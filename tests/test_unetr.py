"""PromptUNETR: MONAI UNETR with a PEFT-tuned PromptableViT encoder, on tiny 2D and 3D models.

References are MONAI's own ``UNETR`` (keys, weights, outputs, its decoder's parameter count) and, for prompt
methods, MONAI's UNETR forward fed with the prompted encoder's tokens after removing the prompt slots by hand.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch
from monai.networks.nets import UNETR, ViTAutoEnc

from monai_prompt.backbones import CheckpointError, vit_from_pretrained
from monai_prompt.backbones.vit import BACKBONE_KEY, PromptableViT, build_vit
from monai_prompt.nets import PromptUNETR
from monai_prompt.nets.unetr import unetr_tap_layers
from monai_prompt.peft.delta import IDENTITY_KEYS, delta_state_dict, load_delta, save_delta
from peft_checks import assert_efficiency_paths_match

WIDTH, HEADS, MLP, LAYERS, FEATURES, OUT = 32, 2, 64, 4, 8, 3
TINY = {"hidden_size": WIDTH, "num_heads": HEADS, "mlp_dim": MLP}
IMG = {2: (32, 48), 3: (32, 32, 16)}  # patch grids (2, 3) and (2, 2, 1): not square, so axis mix-ups show
BLOCK_OPS = ("norm1", "norm2", "attn.qkv", "attn.out_proj", "mlp.linear1", "mlp.linear2")

#: case -> (method, config); dropouts are 0 so the efficiency paths are deterministic.
CASES = {
    "full": ("full", None),
    "linear": ("linear", None),
    "vpt": ("vpt", {"num_tokens": 3}),
    "vpt_deep": ("vpt", {"num_tokens": 3, "deep": True}),
    "lora": ("lora", {"rank": 4}),
    "adapter": ("adapter", {"bottleneck": 8, "dropout": 0.0}),
    "bitfit": ("bitfit", None),
    "ssf": ("ssf", None),
    "dvpt": ("dvpt", {"num_prompts": 4, "bottleneck": 4, "share": 2}),
    "ept": ("ept", {"prompt_length": 5}),
}
#: keys each method adds to MONAI UNETR's state_dict (DVPT's shared modules appear under every block).
ADDED_KEYS = {
    "vpt": r"^vit\.prompter\.prompts$",
    "lora": r"^vit\.blocks\.\d+\.attn\.qkv\.lora_[AB]$",
    "adapter": r"^vit\.blocks\.\d+\.parallel\.(down|up)_proj\.(weight|bias)$",
    "ssf": r"\.ssf_(scale|shift)$",
    "dvpt": r"^vit\.prompter\.(prompts|prompt_positions)$|^vit\.blocks\.\d+\.parallel\.(down\.|up\.|gate$)",
    "ept": r"^vit\.blocks\.\d+\.attn\.ept_prompt$",
}


def perturb(module: torch.nn.Module, trainable_only: bool = False, seed: int = 1) -> None:
    """Move parameters off their (often zero or one) init, like pre-trained weights, so every path is active."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            if param.requires_grad or not trainable_only:
                param.add_(0.1 * torch.randn(param.shape, generator=gen, dtype=param.dtype))


def pretrained_vit(dims: int, layers: int = LAYERS, seed: int = 0) -> PromptableViT:
    """A tiny CLS-free ViT with non-trivial weights (the same for the same seed)."""
    torch.manual_seed(seed)
    vit = build_vit(
        "vit_tiny", in_channels=1, img_size=IMG[dims], spatial_dims=dims, cls_token=False, num_layers=layers, **TINY
    )
    perturb(vit, seed=seed)
    return vit


def make_net(case: str, dims: int, backbone: PromptableViT | None = None, **kwargs) -> PromptUNETR:
    method, config = CASES[case]
    backbone = backbone if backbone is not None else pretrained_vit(dims)
    return PromptUNETR(
        1, OUT, IMG[dims], method, config, backbone=backbone, spatial_dims=dims, feature_size=FEATURES, **kwargs
    )


def preset_net(method: str, img, config: dict | None = None, qkv_bias: bool = True, **kwargs) -> PromptUNETR:
    """A 2D PromptUNETR built from the ``vit_tiny`` preset at the tiny width with 12 blocks (like MONAI's UNETR)."""
    overrides = {**TINY, "num_layers": 12, "qkv_bias": qkv_bias}
    return PromptUNETR(1, OUT, img, method, config, "vit_tiny", 2, FEATURES, backbone_overrides=overrides, **kwargs)


def stock_unetr(dims: int, qkv_bias: bool = True) -> UNETR:
    """MONAI's UNETR at the tiny width (always 12 blocks, patch 16), with perturbed weights."""
    torch.manual_seed(5)
    net = UNETR(1, OUT, IMG[dims], feature_size=FEATURES, spatial_dims=dims, qkv_bias=qkv_bias, **TINY)
    perturb(net, seed=5)
    return net


def images(dims: int, dtype=torch.float32, seed: int = 3) -> torch.Tensor:
    return torch.randn(2, 1, *IMG[dims], generator=torch.Generator().manual_seed(seed), dtype=dtype)


def expected_trainable(case: str, net: PromptUNETR, dims: int) -> set[str]:
    """The method's encoder parameters, spelled out from the papers, plus MONAI UNETR's whole decoder."""
    method = CASES[case][0]
    blocks = [f"vit.blocks.{i}" for i in range(LAYERS)]
    ops = ["vit.patch_embedding.patch_embeddings", "vit.norm"] + [f"{b}.{o}" for b in blocks for o in BLOCK_OPS]
    shared = [f"vit.blocks.{i}.parallel" for i in range(0, LAYERS, 2)]  # DVPT share=2: modules of blocks 0 and 2
    encoder = {
        "full": {n for n, _ in net.named_parameters() if n.startswith("vit.") and BACKBONE_KEY.match(n[4:])},
        "linear": set(),
        "vpt": {"vit.prompter.prompts"},
        "lora": {f"{b}.attn.qkv.lora_{m}" for b in blocks for m in "AB"},
        "adapter": {f"{b}.parallel.{p}_proj.{w}" for b in blocks for p in ("down", "up") for w in ("weight", "bias")},
        "bitfit": {f"{o}.bias" for o in ops},
        "ssf": {f"{o}.ssf_{k}" for o in ops for k in ("scale", "shift")},
        "dvpt": {"vit.prompter.prompts", "vit.prompter.prompt_positions"}
        | {f"{m}.{p}" for m in shared for p in ("down.weight", "down.bias", "up.weight", "up.bias", "gate")},
        "ept": {f"{b}.attn.ept_prompt" for b in blocks},
    }[method]
    decoder = {n for n, _ in stock_unetr(dims).named_parameters() if not n.startswith("vit.")}
    return encoder | decoder


# --------------------------------------------------------------------------------------------------------
# MONAI UNETR parity: keys, weights and outputs.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_keys_are_monai_unetr_plus_method_keys(case):
    net = make_net(case, 2, backbone=pretrained_vit(2, layers=12))
    stock = list(stock_unetr(2).state_dict())
    keys = list(net.state_dict())
    assert [k for k in keys if k in set(stock)] == stock
    added = {k for k in keys if k not in set(stock)}
    pattern = ADDED_KEYS.get(CASES[case][0], r"(?!)")
    assert added == {k for k in keys if re.search(pattern, k)}
    assert bool(added) == (CASES[case][0] in ADDED_KEYS)


@pytest.mark.parametrize("dims", [2, 3])
def test_full_method_reproduces_monai_unetr(dims):
    """MONAI's defaults (qkv_bias=False, LayerNorm eps 1e-5) through a ready backbone; the state_dict loads strictly."""
    stock = stock_unetr(dims, qkv_bias=False).eval()
    monai_like = {"spatial_dims": dims, "qkv_bias": False, "layer_norm_eps": 1e-5, "cls_token": False}
    vit = PromptableViT(1, IMG[dims], (16,) * dims, num_layers=12, **monai_like, **TINY)
    net = make_net("full", dims, backbone=vit).eval()
    net.load_state_dict(stock.state_dict())
    x = images(dims)
    torch.testing.assert_close(net(x), stock(x), rtol=0, atol=1e-5)
    assert net(x).shape == (2, OUT, *IMG[dims])


def test_preset_backbone_with_monai_eps_reproduces_monai_unetr():
    stock = stock_unetr(2, qkv_bias=True).eval()
    net = preset_net("full", IMG[2], layer_norm_eps=1e-5).eval()
    net.load_state_dict(stock.state_dict())
    torch.testing.assert_close(net(images(2)), stock(images(2)), rtol=0, atol=1e-5)


class _LeadingSlotsRemoved(torch.nn.Module):
    """A ViT stand-in for MONAI's UNETR: the prompted encoder's tokens with the first ``n`` slots cut off."""

    def __init__(self, vit: PromptableViT, n: int) -> None:
        super().__init__()
        self.tuned, self.n = vit, n

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        tokens, hidden = self.tuned.forward_tokens(x)
        return tokens[:, self.n :], [h[:, self.n :] for h in hidden]


@pytest.mark.parametrize("case, slots", [("vpt", 3), ("vpt_deep", 3), ("dvpt", 4)])
@pytest.mark.parametrize("dims", [2, 3])
def test_prompt_slots_stripped_before_reshape(case, slots, dims):
    """Without CLS, VPT and DVPT prompts lead the sequence; MONAI's UNETR forward (taps 3, 6, 9) on the
    tokens after them must give the same segmentation."""
    net = make_net(case, dims, backbone=pretrained_vit(dims, layers=12)).eval()
    perturb(net, trainable_only=True)
    stock = stock_unetr(dims).eval()
    assert stock.load_state_dict(net.state_dict(), strict=False).missing_keys == []
    stock.vit = _LeadingSlotsRemoved(net.vit, slots)
    x = images(dims)
    torch.testing.assert_close(net(x), stock(x), rtol=0, atol=1e-6)


class _TapsAtMonaiIndices(torch.nn.Module):
    """A ViT stand-in for MONAI's UNETR: the encoder's outputs after ``taps`` placed where MONAI's forward reads
    them (hidden states 3, 6 and 9)."""

    def __init__(self, vit: PromptableViT, taps: list[int]) -> None:
        super().__init__()
        self.tuned, self.taps = vit, taps

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        tokens, hidden = self.tuned(x)
        placed = [hidden[0]] * 10
        for monai_index, tap in zip((3, 6, 9), self.taps):
            placed[monai_index] = hidden[tap]
        return tokens, placed


@pytest.mark.parametrize("dims", [2, 3])
def test_depth_scaled_taps_follow_monai_unetr_forward(dims):
    """At another depth than MONAI's 12 blocks, the decoder path is still MONAI's own ``UNETR.forward``: same
    weights, the encoder's tap outputs handed to it where it reads them, equal outputs."""
    net = make_net("full", dims).eval()
    stock = stock_unetr(dims).eval()
    loaded = stock.load_state_dict(net.state_dict(), strict=False)
    assert not loaded.unexpected_keys and all(k.startswith("vit.blocks.") for k in loaded.missing_keys)
    stock.vit = _TapsAtMonaiIndices(net.vit, net.tap_layers)
    x = images(dims)
    torch.testing.assert_close(net(x), stock(x), rtol=0, atol=1e-6)


def test_tap_layers_scale_monai_3_6_9_with_depth():
    assert unetr_tap_layers(12) == [3, 6, 9]
    assert unetr_tap_layers(24) == [6, 12, 18]
    assert unetr_tap_layers(4) == [1, 2, 3]
    assert make_net("linear", 2).tap_layers == [1, 2, 3]
    with pytest.raises(ValueError, match="at least one transformer block"):
        unetr_tap_layers(0)


def test_monai_unetr_checkpoint_loads_into_lora_net(tmp_path):
    stock = stock_unetr(2)
    net = preset_net("lora", IMG[2], {"rank": 4})
    result = net.load_state_dict(stock.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == {f"vit.blocks.{i}.attn.qkv.lora_{m}" for i in range(12) for m in "AB"}
    state = net.state_dict()
    assert all(torch.equal(state[k], v) for k, v in stock.state_dict().items())

    # pretrained=: the encoder (vit. keys) of a UNETR checkpoint through load_pretrained. A square grid: from a
    # file alone, load_pretrained infers the checkpoint's grid from its token count.
    square = UNETR(1, OUT, 32, feature_size=FEATURES, spatial_dims=2, qkv_bias=True, **TINY)
    perturb(square)
    torch.save(square.state_dict(), tmp_path / "unetr.pt")
    encoder_only = preset_net("lora", 32, {"rank": 4}, pretrained=str(tmp_path / "unetr.pt"))
    vit_state = encoder_only.vit.state_dict()
    loaded = {k[4:]: v for k, v in square.state_dict().items() if k.startswith("vit.") and BACKBONE_KEY.match(k[4:])}
    assert len(loaded) == 12 * 12 + 5 and all(torch.equal(vit_state[k], v) for k, v in loaded.items())


def test_non_square_monai_unetr_file_loads_without_resizing(tmp_path):
    """A UNETR at 32 x 48 has 6 position embeddings (grid 2 x 3, no CLS) and no config: loaded at its own size they
    are taken as they are, not read as 2 leading slots + a 2 x 2 grid and resized; the network gives its outputs."""
    stock = stock_unetr(2, qkv_bias=False).eval()
    torch.save({"state_dict": stock.state_dict()}, tmp_path / "unetr_32x48.pt")
    net = preset_net(
        "full",
        IMG[2],
        qkv_bias=False,
        layer_norm_eps=1e-5,
        pretrained=str(tmp_path / "unetr_32x48.pt"),
    ).eval()
    pos = stock.vit.patch_embedding.position_embeddings
    torch.testing.assert_close(net.vit.patch_embedding.position_embeddings, pos, rtol=0, atol=0)
    decoder = {k: v for k, v in stock.state_dict().items() if not k.startswith("vit.")}
    assert net.load_state_dict(decoder, strict=False).unexpected_keys == []
    torch.testing.assert_close(net(images(2)), stock(images(2)), rtol=0, atol=1e-5)


def test_deeper_unetr_file_needs_pretrained_strict_false(tmp_path, caplog):
    """MONAI's 12-block UNETR into a 4-block encoder: an error naming the fix, or with pretrained_strict=False its
    first 4 blocks and a warning."""
    stock = stock_unetr(2, qkv_bias=False)
    torch.save(stock.state_dict(), tmp_path / "unetr.pt")
    kwargs = {"layer_norm_eps": 1e-5, "pretrained": str(tmp_path / "unetr.pt"), "spatial_dims": 2}
    overrides = {**TINY, "num_layers": LAYERS, "qkv_bias": False}
    with pytest.raises(CheckpointError, match=r"unetr.pt: checkpoint has 12 blocks, model has 4: build with num_l"):
        PromptUNETR(1, OUT, IMG[2], backbone="vit_tiny", backbone_overrides=overrides, **kwargs)
    with caplog.at_level(logging.WARNING):
        net = PromptUNETR(
            1, OUT, IMG[2], backbone="vit_tiny", backbone_overrides=overrides, pretrained_strict=False, **kwargs
        )
    assert any(r.levelno == logging.WARNING and "loading the first 4" in r.message for r in caplog.records)
    for key, value in net.vit.state_dict().items():
        if BACKBONE_KEY.match(key):
            assert torch.equal(value, stock.state_dict()[f"vit.{key}"]), key


@pytest.mark.parametrize("source", ["unetr", "vitautoenc"])
def test_auto_backbone_is_built_from_a_monai_file(source, tmp_path):
    """``backbone="auto"``: the encoder a MONAI UNETR (2D, 32 x 48) or ViTAutoEnc (3D, 32 x 32 x 16) file needs,
    without config: 12 blocks, no qkv bias, LayerNorm eps 1e-5 (MONAI's default, assumed), its non-square grid taken
    as it is; the encoder gives the source's hidden states."""
    dims = 2 if source == "unetr" else 3
    if source == "unetr":
        model = stock_unetr(2, qkv_bias=False)
        encoder = model.vit
    else:
        torch.manual_seed(6)
        model = encoder = ViTAutoEnc(1, IMG[3], 16, spatial_dims=3, **TINY)
        perturb(model, seed=6)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    net = PromptUNETR(
        1,
        OUT,
        IMG[dims],
        "lora",
        backbone="auto",
        spatial_dims=dims,
        feature_size=FEATURES,
        pretrained=str(tmp_path / "weights.pt"),
        backbone_overrides={"num_heads": HEADS},
    ).eval()
    config = net.vit.config
    assert (config["num_layers"], config["qkv_bias"], config["layer_norm_eps"], config["cls_token"]) == (
        12,
        False,
        1e-5,
        False,
    )
    x = images(dims)
    with torch.no_grad():
        _, expected = encoder.eval()(x)
        _, hidden = net.vit(x)  # LoRA's B starts at zero: the pre-trained encoder's outputs
    assert len(hidden) == len(expected) == 12
    for got, want in zip(hidden, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert net(x).shape == (2, OUT, *IMG[dims])
    _, report = vit_from_pretrained(tmp_path / "weights.pt", num_heads=HEADS, img_size=IMG[dims], cls_token=False)
    grid = tuple(s // 16 for s in IMG[dims])
    assert report.inferred["source_grid"] == (grid, "position embeddings: the patch count of img_size")


# --------------------------------------------------------------------------------------------------------
# What trains, what stays frozen, deltas.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_shapes_and_exactly_intended_parameters_train(case, dims):
    net = make_net(case, dims).train()
    perturb(net, trainable_only=True)
    expected = expected_trainable(case, net, dims)
    assert {n for n, p in net.named_parameters() if p.requires_grad} == expected
    out = net(images(dims))
    assert out.shape == (2, OUT, *IMG[dims])
    out.square().mean().backward()
    assert {n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0} == expected


@pytest.mark.parametrize("case", list(CASES))
def test_frozen_weights_bit_identical_after_adamw_step(case):
    net = make_net(case, 2).train()
    perturb(net, trainable_only=True)
    expected = expected_trainable(case, net, 2)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    torch.nn.functional.cross_entropy(net(images(2)), torch.zeros(2, *IMG[2], dtype=torch.long)).backward()
    optimizer.step()
    for name, param in net.named_parameters():
        assert torch.equal(param, before[name]) != (name in expected), name


@pytest.mark.parametrize(
    "case, dims", [(case, 2) for case in CASES] + [(case, 3) for case in ("linear", "vpt_deep", "dvpt", "ept")]
)
def test_delta_round_trip_reproduces_outputs(case, dims, tmp_path):
    net = make_net(case, dims).eval()
    perturb(net, trainable_only=True)
    assert set(delta_state_dict(net)["model"]) == expected_trainable(case, net, dims) | set(IDENTITY_KEYS)
    path = save_delta(net, tmp_path / f"{case}.pt")
    torch.manual_seed(123)  # same pre-trained encoder, other method and decoder init
    fresh = make_net(case, dims, backbone=pretrained_vit(dims)).eval()
    x = images(dims)
    assert not torch.equal(fresh(x), net(x))
    load_delta(fresh, path)
    assert torch.equal(fresh(x), net(x))
    again = make_net(case, dims).eval()  # MONAI tools load strictly (ckpt_export --key_in_ckpt model)
    again.load_state_dict(torch.load(path, weights_only=True)["model"], strict=True)
    assert torch.equal(again(x), net(x))


def test_parameter_report_splits_encoder_and_decoder():
    stock = stock_unetr(2)
    decoder = sum(p.numel() for n, p in stock.named_parameters() if not n.startswith("vit."))
    report = make_net("lora", 2).parameter_report()
    assert report["decoder"] == decoder
    assert report["encoder_trainable"] == LAYERS * 4 * (WIDTH + 3 * WIDTH)  # r (D + 3D) per block
    assert report["trainable"] == report["encoder_trainable"] + decoder
    assert make_net("linear", 2).parameter_report()["encoder_trainable"] == 0


# --------------------------------------------------------------------------------------------------------
# Efficiency switches and TorchScript.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_checkpointing_and_sdpa_match_plain_path(case):
    net = make_net(case, 2).double().train()
    perturb(net, trainable_only=True)
    assert_efficiency_paths_match(net, net.vit, images(2, torch.float64))


def test_constructor_switches_reach_the_encoder():
    net = make_net("ept", 2, grad_checkpointing=True, sdpa=True)
    assert net.vit.grad_checkpointing and all(b.attn.use_flash_attention for b in net.vit.blocks)


@pytest.mark.parametrize("case", ["full", "vpt_deep", "dvpt", "ept"])
def test_bf16_autocast_close_to_float32(case):
    net = make_net(case, 3).eval()
    perturb(net, trainable_only=True)
    x = images(3)
    full_precision = net(x)
    net.autocast_dtype = "bf16"
    low_precision = net(x)
    assert low_precision.dtype == torch.float32
    assert (low_precision - full_precision).abs().max() <= 0.03 * full_precision.abs().max()
    low_precision.sum().backward()
    trained = [p for p in net.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)


@pytest.mark.parametrize("case", ["full", "vpt_deep", "dvpt", "ept"])  # each encoder seam; all methods: test_baselines
def test_torchscript_matches_eager(case):
    net = make_net(case, 2).eval()
    perturb(net, trainable_only=True)
    x = images(2)
    torch.testing.assert_close(torch.jit.script(net)(x), net(x), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------------
# Clear errors.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fpt", "fptplus"])
def test_fpt_is_refused(method):
    with pytest.raises(ValueError, match="classification method.*no per-patch features"):
        PromptUNETR(1, OUT, 32, method, spatial_dims=2, backbone="vit_tiny", backbone_overrides=TINY)


def test_other_families_are_sent_to_their_network():
    with pytest.raises(ValueError, match=r"decodes a plain ViT.*'tinyvit' family.*segmentation_network"):
        PromptUNETR(3, OUT, 32, spatial_dims=2, backbone="lite_medsam")


def test_unsupported_backbones_are_refused():
    with pytest.raises(ValueError, match=r"needs patch size 16, got \[8, 8\].*_p16 backbone \(bundles: "
                       r"--backbone_overrides with 'patch_size': 16; .*pre-train with patch_size 16\)\.$"):
        PromptUNETR(1, OUT, 32, spatial_dims=2, backbone="vit_tiny_p8", backbone_overrides=TINY)
    with_cls = build_vit("vit_tiny", in_channels=1, img_size=32, cls_token=True, **TINY)
    with pytest.raises(ValueError, match="without CLS token"):
        PromptUNETR(1, OUT, 32, spatial_dims=2, backbone=with_cls)
    with pytest.raises(ValueError, match=r"differ from the backbone's config.*'in_channels': \(3, 1\)"):
        PromptUNETR(3, OUT, IMG[2], spatial_dims=2, backbone=pretrained_vit(2))
