"""Baseline PEFT methods (full, linear, VPT shallow/deep, LoRA, AdaptFormer, BitFit, SSF) on tiny ViTs.

Every method is checked against a literal float64 ViT forward written here (patches by reshaping, attention
by matmuls, LayerNorm and GELU by their formulas) with the method's maths added by hand; against the
closed-form parameter counts of docs/methods.md at ViT-B/16; and for what trains, what stays frozen, delta
round trips, activation checkpointing, SDPA, bf16 autocast and TorchScript.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from monai_prompt.backbones.vit import BACKBONE_KEY, build_vit
from monai_prompt.nets.classifier import PromptClassifier
from monai_prompt.peft.delta import load_delta, save_delta
from monai_prompt.peft.merge import MergeableLayer, merge_and_unload
from monai_prompt.peft.registry import apply_method
from peft_checks import assert_efficiency_paths_match, perturb_trainable

LAYERS, WIDTH, HEADS, MLP, PATCH, IMG, CLASSES = 3, 32, 2, 64, 8, 32, 3
TINY = {"hidden_size": WIDTH, "num_layers": LAYERS, "num_heads": HEADS, "mlp_dim": MLP, "patch_size": PATCH}
BLOCK_LINEARS = ("attn.qkv", "attn.out_proj", "mlp.linear1", "mlp.linear2")
BLOCK_OPS = ("norm1", "norm2") + BLOCK_LINEARS
LORA_ALL = {"rank": 4, "alpha": 6.0, "targets": ("qkv", "out_proj", "linear1", "linear2")}

#: case -> (method, config); dropouts are 0 so eval/train and the efficiency paths are deterministic.
CASES = {
    "full": ("full", None),
    "linear": ("linear", None),
    "vpt_shallow": ("vpt", {"num_tokens": 3}),
    "vpt_deep": ("vpt", {"num_tokens": 3, "deep": True}),
    "lora": ("lora", {"rank": 4}),
    "lora_all": ("lora", LORA_ALL),
    "adapter": ("adapter", {"bottleneck": 8, "dropout": 0.0}),
    "bitfit": ("bitfit", None),
    "ssf": ("ssf", None),
}


def pretrained_vit(seed: int = 0, **kwargs):
    """A tiny ViT whose biases, LayerNorms and CLS are not at their trivial init (like real weights)."""
    torch.manual_seed(seed)
    vit = build_vit("vit_tiny", img_size=kwargs.pop("img_size", IMG), **{**TINY, **kwargs})
    with torch.no_grad():
        for param in vit.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return vit


def make_model(case: str, vit=None, dtype=torch.float32) -> PromptClassifier:
    method, config = CASES[case]
    model = PromptClassifier(CLASSES, method, config, backbone=vit if vit is not None else pretrained_vit())
    return model.to(dtype)


def images(dtype=torch.float32, batch: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def expected_trainable(case: str, model: PromptClassifier) -> set[str]:
    """What each method trains, spelled out from the papers (head always trains)."""
    method, config = CASES[case]
    blocks = [f"backbone.blocks.{i}" for i in range(LAYERS)]
    ops = ["backbone.patch_embedding.patch_embeddings", "backbone.norm"]
    ops += [f"{b}.{o}" for b in blocks for o in BLOCK_OPS]
    lora_paths = {"qkv": "attn.qkv", "out_proj": "attn.out_proj", "linear1": "mlp.linear1", "linear2": "mlp.linear2"}
    lora_targets = (config or {}).get("targets", ("qkv",))
    names = {
        "full": {n for n, _ in model.named_parameters() if n.startswith("backbone.") and BACKBONE_KEY.match(n[9:])},
        "linear": set(),
        "vpt": {"backbone.prompter.prompts"},
        "lora": {f"{b}.{lora_paths[t]}.lora_{m}" for b in blocks for t in lora_targets for m in "AB"},
        "adapter": {f"{b}.parallel.{p}_proj.{w}" for b in blocks for p in ("down", "up") for w in ("weight", "bias")},
        "bitfit": {f"{o}.bias" for o in ops},
        "ssf": {f"{o}.ssf_{k}" for o in ops for k in ("scale", "shift")},
    }[method]
    return names | {"head.weight", "head.bias"}


# --------------------------------------------------------------------------------------------------------
# The literal reference: a float64 ViT forward from the parameters, with each method's maths added by hand.
# --------------------------------------------------------------------------------------------------------


def reference_logits(case: str, model: PromptClassifier, x: torch.Tensor) -> torch.Tensor:
    method, config = CASES[case]
    config = config or {}
    p = {n[len("backbone.") :]: t for n, t in model.named_parameters() if n.startswith("backbone.")}
    eps = model.backbone.config["layer_norm_eps"]

    def scale_shift(name, y):  # SSF: y * scale + shift after every op
        return y * p[f"{name}.ssf_scale"] + p[f"{name}.ssf_shift"] if method == "ssf" else y

    def linear(name, y):
        weight = p[f"{name}.weight"]
        if f"{name}.lora_A" in p:  # LoRA: W + (alpha / r) B A
            scaling = config.get("alpha", 8.0) / config["rank"]
            weight = weight + scaling * p[f"{name}.lora_B"] @ p[f"{name}.lora_A"]
        return scale_shift(name, y @ weight.T + p[f"{name}.bias"])

    def layer_norm(name, y):
        mean, var = y.mean(-1, keepdim=True), y.var(-1, unbiased=False, keepdim=True)
        return scale_shift(name, (y - mean) / torch.sqrt(var + eps) * p[f"{name}.weight"] + p[f"{name}.bias"])

    def gelu(y):
        return 0.5 * y * (1.0 + torch.erf(y / math.sqrt(2.0)))

    def attention(name, y):
        b, n, d = y.shape
        q, k, v = linear(f"{name}.qkv", y).reshape(b, n, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // HEADS), dim=-1)
        return linear(f"{name}.out_proj", (weights @ v).transpose(1, 2).reshape(b, n, d))

    b, c, g = x.shape[0], x.shape[1], IMG // PATCH
    patches = x.reshape(b, c, g, PATCH, g, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * PATCH * PATCH)
    conv = "patch_embedding.patch_embeddings"
    tokens = scale_shift(conv, patches @ p[f"{conv}.weight"].reshape(WIDTH, -1).T + p[f"{conv}.bias"])
    tokens = torch.cat([p["cls_token"].expand(b, -1, -1), tokens + p["patch_embedding.position_embeddings"]], 1)
    for i in range(LAYERS):
        if method == "vpt" and (i == 0 or config.get("deep")):  # [cls, prompts_i, patches]
            kept = tokens[:, 1 + (config["num_tokens"] if i else 0) :]
            tokens = torch.cat([tokens[:, :1], p["prompter.prompts"][i].expand(b, -1, -1), kept], 1)
        blk = f"blocks.{i}"
        h = tokens + attention(f"{blk}.attn", layer_norm(f"{blk}.norm1", tokens))
        tokens = h + linear(f"{blk}.mlp.linear2", gelu(linear(f"{blk}.mlp.linear1", layer_norm(f"{blk}.norm2", h))))
        if method == "adapter":  # AdaptFormer: + s * up(relu(down(h)))
            down = torch.relu(h @ p[f"{blk}.parallel.down_proj.weight"].T + p[f"{blk}.parallel.down_proj.bias"])
            up = down @ p[f"{blk}.parallel.up_proj.weight"].T + p[f"{blk}.parallel.up_proj.bias"]
            tokens = tokens + config.get("scale", 0.1) * up
    cls = layer_norm("norm", tokens)[:, 0]
    return cls @ model.head.weight.T + model.head.bias


@pytest.mark.parametrize("case", list(CASES))
def test_matches_literal_reference(case):
    model = make_model(case, dtype=torch.float64).eval()
    perturb_trainable(model)
    x = images(torch.float64)
    torch.testing.assert_close(model(x), reference_logits(case, model, x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("case", list(CASES))
def test_exactly_intended_parameters_train(case):
    model = make_model(case).train()
    perturb_trainable(model)
    expected = expected_trainable(case, model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    model(images()).square().sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == expected


@pytest.mark.parametrize("case", list(CASES))
def test_frozen_weights_bit_identical_after_adamw_step(case):
    model = make_model(case).train()
    perturb_trainable(model)
    expected = expected_trainable(case, model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    torch.nn.functional.cross_entropy(model(images()), torch.tensor([0, 2])).backward()
    optimizer.step()
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) != (name in expected), name


@pytest.mark.parametrize("case", list(CASES))
def test_delta_round_trip_reproduces_outputs(case, tmp_path):
    pretrained_state = copy.deepcopy(pretrained_vit().state_dict())
    model = make_model(case, vit=pretrained_vit())
    perturb_trainable(model)
    path = save_delta(model, tmp_path / f"{case}.pt")

    torch.manual_seed(123)  # a fresh model: same pre-trained backbone, other method/head init
    fresh_vit = build_vit("vit_tiny", img_size=IMG, **TINY)
    fresh_vit.load_state_dict(pretrained_state)
    fresh = make_model(case, vit=fresh_vit)
    x = images()
    model.eval(), fresh.eval()
    assert not torch.equal(fresh(x), model(x))
    load_delta(fresh, path)
    assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("case", list(CASES))
def test_checkpointing_and_sdpa_match_plain_path(case):
    model = make_model(case, dtype=torch.float64).train()
    perturb_trainable(model)
    assert_efficiency_paths_match(model, model.backbone, images(torch.float64))


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_autocast_close_to_float32(case):
    model = make_model(case).eval()
    perturb_trainable(model)
    x = images()
    full_precision = model(x)
    model.autocast_dtype = "bf16"
    low_precision = model(x)
    assert low_precision.dtype == torch.float32
    assert (low_precision - full_precision).abs().max() <= 0.1 * full_precision.abs().max() + 1e-3
    low_precision.sum().backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)


@pytest.mark.parametrize("case", list(CASES))
def test_torchscript_matches_eager(case):
    model = make_model(case).eval()
    perturb_trainable(model)
    x = images()
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------------
# Parameter counts at ViT-B/16, 224 (closed forms of docs/methods.md), against V-PETL Bench's table.
# --------------------------------------------------------------------------------------------------------

D, L, M, C, P, N = 768, 12, 3072, 3, 16, (224 // 16) ** 2
COUNTS = [
    # (method, config, closed form, V-PETL Bench "Params" in M, or None where V-PETL has no such config)
    ("full", None, C * P * P * D + D + N * D + D + L * (4 * D * D + 2 * D * M + 9 * D + M) + 2 * D, 85.8),
    ("linear", None, 0, None),
    ("vpt", {"num_tokens": 100}, 100 * D, 0.08),  # V-PETL's 0.08M: mean p ~ 100 over its VTAB tasks
    ("vpt", {"num_tokens": 61, "deep": True}, L * 61 * D, 0.56),  # V-PETL's 0.56M: mean p ~ 61
    ("vpt", None, 5 * D, None),
    ("lora", None, L * 8 * (D + 3 * D), 0.29),  # r=8 on qkv == V-PETL's r=8 on q and v: 4 r D per layer
    ("lora", {"targets": ("qkv", "out_proj", "linear1", "linear2")}, L * 8 * (4 * D + 2 * D + 2 * (D + M)), None),
    ("adapter", {"bottleneck": 8}, L * (2 * D * 8 + 8 + D), 0.16),
    ("adapter", None, L * (2 * D * 64 + 64 + D), None),
    ("bitfit", None, L * (7 * D + M) + 2 * D, 0.10),
    ("ssf", None, 2 * (L * (7 * D + M) + 2 * D), 0.21),
]


@pytest.mark.parametrize("method, config, closed_form, vpetl", COUNTS)
def test_vit_b16_parameter_counts(method, config, closed_form, vpetl):
    with torch.device("meta"):
        vit = apply_method(build_vit("vit_base", img_size=224), method, config)
    count = sum(p.numel() for p in vit.parameters() if p.requires_grad)
    assert count == closed_form
    if vpetl is not None:
        assert round(count / 1e6, 1 if vpetl > 1 else 2) == vpetl


# --------------------------------------------------------------------------------------------------------
# Method-specific checks.
# --------------------------------------------------------------------------------------------------------


def test_vpt_slots_init_and_monai_contract():
    from monai_prompt.peft.vpt import prompt_init_bound

    assert prompt_init_bound(3, [16, 16], 768) == math.sqrt(6.0 / (3 * 16 * 16 + 768))  # KMnP/vpt's value
    vit = pretrained_vit(in_channels=1, spatial_dims=3, img_size=16)
    apply_method(vit, "vpt", {"num_tokens": 4, "deep": True})
    bound = prompt_init_bound(1, [PATCH] * 3, WIDTH)
    assert vit.prompter.prompts.shape == (LAYERS, 4, WIDTH) and vit.prompter.prompts.abs().max() <= bound
    x = torch.randn(2, 1, 16, 16, 16)
    tokens, _ = vit.forward_tokens(x)
    assert tokens.shape == (2, 1 + 4 + 8, WIDTH)
    out, hidden = vit(x)  # MONAI contract: prompt slots stripped
    assert out.shape == (2, 1 + 8, WIDTH) and all(h.shape == out.shape for h in hidden)
    torch.testing.assert_close(out, torch.cat([tokens[:, :1], tokens[:, 5:]], 1))
    torch.testing.assert_close(vit.forward_features(x), tokens[:, 0])


def test_lora_linear_formula_and_dropout():
    from monai_prompt.peft.lora import LoRALinear

    torch.manual_seed(0)
    layer = LoRALinear(5, 7, rank=3, alpha=6.0, dropout=0.5).double()
    assert set(dict(layer.named_parameters())) == {"weight", "bias", "lora_A", "lora_B"}
    assert layer.lora_B.abs().sum() == 0
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 5, dtype=torch.float64)
    expected = x @ (layer.weight + 2.0 * layer.lora_B @ layer.lora_A).T + layer.bias
    torch.testing.assert_close(layer.eval()(x), expected, rtol=0, atol=1e-12)
    layer.train()
    torch.manual_seed(5)
    dropped = layer(x)
    torch.manual_seed(5)
    mask_x = F.dropout(x, 0.5, training=True)  # dropout acts on the low-rank input only
    low_rank = 2.0 * mask_x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(dropped, x @ layer.weight.T + layer.bias + low_rank)
    merged = layer.eval().merge()  # folds (alpha / r) B A into weight and becomes a plain nn.Linear
    assert merged is layer and type(merged) is torch.nn.Linear and set(merged.state_dict()) == {"weight", "bias"}
    torch.testing.assert_close(merged(x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.jit.script(merged)(x), expected, rtol=0, atol=1e-12)


#: SSF host -> (plain module, input shape); without a bias, merging creates one.
SSF_HOSTS = {
    "linear": (lambda: torch.nn.Linear(5, 4), (3, 5)),
    "linear_without_bias": (lambda: torch.nn.Linear(5, 4, bias=False), (3, 5)),
    "layer_norm": (lambda: torch.nn.LayerNorm(4), (3, 4)),
    "conv2d": (lambda: torch.nn.Conv2d(2, 4, 3), (2, 2, 6, 6)),
    "conv3d_without_bias": (lambda: torch.nn.Conv3d(2, 4, 3, bias=False), (2, 2, 5, 5, 5)),
}


@pytest.mark.parametrize("host", list(SSF_HOSTS))
def test_ssf_layer_merges_into_its_plain_module(host):
    from monai_prompt.peft.ssf import add_ssf

    make, shape = SSF_HOSTS[host]
    torch.manual_seed(0)
    original = make().double()
    layer = add_ssf(copy.deepcopy(original), init_std=0.5)
    x = torch.randn(*shape, dtype=torch.float64)
    channels = [-1] + [1] * (len(shape) - 2) if isinstance(original, torch.nn.modules.conv._ConvNd) else [-1]
    expected = original(x) * layer.ssf_scale.view(channels) + layer.ssf_shift.view(channels)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
    merged = layer.merge()  # weight <- scale * weight, bias <- scale * bias + shift
    assert merged is layer and type(merged) is type(original)
    assert set(merged.state_dict()) == set(original.state_dict()) | {"bias"}
    torch.testing.assert_close(merged(x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.jit.script(merged)(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", [*CASES, "ssf_3d"])
def test_merge_and_unload_equals_unmerged_and_gives_a_plain_vit_where_possible(case):
    """Every mergeable layer is folded; a model whose added keys all belonged to mergeable layers (LoRA, SSF) or
    that added none (full, linear, BitFit) then loads strictly into a plain ViT (a MONAI ViT's keys); a model
    without mergeable layers is left exactly as it was."""
    spatial = {"spatial_dims": 3, "img_size": 16} if case == "ssf_3d" else {}
    method, config = CASES[case.replace("_3d", "")]
    vit = apply_method(pretrained_vit(**spatial), method, config).eval()
    perturb_trainable(vit)
    x = torch.randn(2, 3, *([16] * 3 if spatial else [IMG] * 2))
    unmerged = vit.forward_features(x)
    plain = pretrained_vit(seed=7, **spatial).eval()
    added = set(vit.state_dict()) - set(plain.state_dict())
    layers = {name: m for name, m in vit.named_modules() if isinstance(m, MergeableLayer)}
    mergeable = {f"{name}.{key}" for name, m in layers.items() for key in m.added_attributes}
    before = {"state": copy.deepcopy(vit.state_dict()), "types": [type(m) for m in vit.modules()]}

    merge_and_unload(merge_and_unload(vit))  # merging twice is merging once
    assert not any(isinstance(m, MergeableLayer) for m in vit.modules())
    assert (vit.forward_features(x) - unmerged).abs().max() < 1e-5
    if added <= mergeable:
        plain.load_state_dict(vit.state_dict(), strict=True)
        assert (plain.forward_features(x) - unmerged).abs().max() < 1e-5
    if not layers:
        assert [type(m) for m in vit.modules()] == before["types"]
        state = vit.state_dict()
        assert state.keys() == before["state"].keys()
        assert all(torch.equal(state[key], value) for key, value in before["state"].items())


def test_adapter_starts_as_identity_and_uses_official_init():
    vit = pretrained_vit().eval()
    before = vit.forward_features(images())
    apply_method(vit, "adapter")
    adapter = vit.blocks[0].parallel
    assert adapter.down_proj.weight.shape == (64, WIDTH) and adapter.scale == 0.1 and adapter.dropout.p == 0.1
    assert adapter.up_proj.weight.abs().sum() == 0 and adapter.up_proj.bias.abs().sum() == 0
    assert adapter.down_proj.bias.abs().sum() == 0 and adapter.down_proj.weight.abs().max() <= 1 / math.sqrt(WIDTH)
    torch.testing.assert_close(vit.forward_features(images()), before, rtol=0, atol=0)


def test_ssf_init_and_kept_keys():
    torch.manual_seed(0)
    vit = build_vit("vit_small", img_size=32)
    keys = set(vit.state_dict())
    apply_method(vit, "ssf")
    added = set(vit.state_dict()) - keys
    assert keys <= set(vit.state_dict()) and all(k.endswith((".ssf_scale", ".ssf_shift")) for k in added)
    scales = torch.cat([p.flatten() for n, p in vit.named_parameters() if n.endswith("ssf_scale")])
    shifts = torch.cat([p.flatten() for n, p in vit.named_parameters() if n.endswith("ssf_shift")])
    assert abs(scales.mean() - 1) < 2e-3 and abs(scales.std() - 0.02) < 2e-3
    assert abs(shifts.mean()) < 2e-3 and abs(shifts.std() - 0.02) < 2e-3


@pytest.mark.parametrize(
    "method, config, message",
    [
        ("lora", {"targets": ["qkv", "fc1"]}, "LoRA targets"),
        ("lora", {"rank": 0}, "rank"),
        ("vpt", {"num_tokens": 0}, "num_tokens"),
        ("adapter", {"bottleneck": 0}, "bottleneck"),
        ("ssf", {"init_std": -1.0}, "init_std"),
    ],
)
def test_bad_configs_raise_clear_errors(method, config, message):
    with pytest.raises(ValueError, match=message):
        apply_method(pretrained_vit(), method, config)
