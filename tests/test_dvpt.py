"""DVPT: the whole prompted network against a literal float64 reference and against the official modules on a CLIP
tower, sharing, counts, training plumbing."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dvpt_official
from grid_support import (
    CHECK_SIZE,
    FAMILIES,
    assert_efficiency_paths_and_torchscript_match,
    attention_blocks,
    reference_features,
    tiny_encoder,
)
from monai_prompt.backbones import build_vit
from monai_prompt.backbones.sam import build_sam
from monai_prompt.backbones.tinyvit import build_tinyvit
from monai_prompt.nets import PromptClassifier
from monai_prompt.peft import apply_method, delta_state_dict, trainable_report
from monai_prompt.peft.delta import IDENTITY_KEYS
from monai_prompt.peft.dvpt import DVPTConfig, DVPTModule
from peft_checks import assert_adamw_trains_exactly, assert_delta_round_trip, assert_efficiency_paths_match, rel_err

TINY = {"hidden_size": 32, "num_layers": 4, "num_heads": 4, "mlp_dim": 64, "patch_size": 8}
CONFIG = {"num_prompts": 5, "bottleneck": 6, "share": 2}
WIDTH, HEADS, PROMPTS = 32, 4, 5


def classifier(variant: str = "paper", **kwargs) -> PromptClassifier:
    torch.manual_seed(0)
    return PromptClassifier(
        3,
        "dvpt",
        {**CONFIG, "variant": variant},
        backbone="vit_tiny",
        img_size=32,
        backbone_overrides=TINY,
        **kwargs,
    )


def open_gates(model: PromptClassifier) -> None:
    """Give the gates non-zero values so the branch is live (it is exactly zero at initialisation)."""
    with torch.no_grad():
        for index, block in enumerate(model.backbone.blocks[:: CONFIG["share"]]):
            block.parallel.gate.fill_(0.5 + index)


def reference_logits(model: PromptClassifier, x: torch.Tensor, variant: str) -> torch.Tensor:
    """The DVPT classifier written out literally from its weights (einsum attention, per-prompt loop)."""
    vit = model.backbone
    pe = vit.patch_embedding
    patches = F.conv2d(x, pe.patch_embeddings.weight, pe.patch_embeddings.bias, stride=8).flatten(2).transpose(1, 2)
    batch = x.shape[0]
    prompts = (vit.prompter.prompts + vit.prompter.prompt_positions).expand(batch, -1, -1)
    t = torch.cat((prompts, vit.cls_token.expand(batch, -1, -1), patches + pe.position_embeddings), dim=1)
    modules = [block.parallel for block in vit.blocks[:: CONFIG["share"]]]  # one module per 2 blocks
    dim_head = WIDTH // HEADS
    for index, block in enumerate(vit.blocks):
        h = F.layer_norm(t, (WIDTH,), block.norm1.weight, block.norm1.bias, 1e-6)
        q, k, v = (h @ block.attn.qkv.weight.t() + block.attn.qkv.bias).reshape(batch, -1, 3, HEADS, dim_head).unbind(2)
        att = torch.einsum("bihd,bjhd->bhij", q, k).div(dim_head**0.5).softmax(-1)
        att_out = torch.einsum("bhij,bjhd->bihd", att, v).reshape(batch, -1, WIDTH)
        t = t + att_out @ block.attn.out_proj.weight.t() + block.attn.out_proj.bias

        module = modules[index // CONFIG["share"]]
        z = t @ module.down.weight.t() + module.down.bias
        z = z * torch.sigmoid(1.702 * z)
        if variant == "paper":
            keys = z[:, PROMPTS:]  # CLS + patches; each prompt slot queries them
            rows = [
                torch.softmax(keys[b] @ z[b, m] / 6**0.5, dim=0) @ keys[b] for b in range(batch) for m in range(PROMPTS)
            ]
            z = torch.cat((torch.stack(rows).reshape(batch, PROMPTS, -1), keys), dim=1)
        branch = module.gate * (z @ module.up.weight.t() + module.up.bias)

        h = F.layer_norm(t, (WIDTH,), block.norm2.weight, block.norm2.bias, 1e-6)
        mlp = F.gelu(h @ block.mlp.linear1.weight.t() + block.mlp.linear1.bias)
        t = t + mlp @ block.mlp.linear2.weight.t() + block.mlp.linear2.bias + branch
    t = F.layer_norm(t, (WIDTH,), vit.norm.weight, vit.norm.bias, 1e-6)
    feature = t[:, : PROMPTS + 1].mean(1)  # mean of the prompts and CLS
    return feature @ model.head.weight.t() + model.head.bias


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_forward_and_gradients_match_literal_reference(variant):
    model = classifier(variant).double()
    open_gates(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    logits, ref = model(x), reference_logits(model, x, variant)
    assert rel_err(logits, ref) < 1e-6
    grads = torch.autograd.grad(logits.square().sum(), params)
    ref_grads = torch.autograd.grad(ref.square().sum(), params)
    assert len(params) == 2 + 2 * 5 + 2  # prompts, positions; 2 shared modules x (down, up, gate); head
    for grad, ref_grad in zip(grads, ref_grads):
        assert rel_err(grad, ref_grad) < 1e-6


#: official DVPT parameter -> this package's (docs/methods.md); ``{i}``: a block that owns a Down/Up/gate module.
OFFICIAL_NAMES = {
    "prompt_token": "backbone.prompter.prompts",
    "prompt_positional_embedding": "backbone.prompter.prompt_positions",
    **{
        f"transformer.resblocks.{{i}}.prompt_proj.{theirs}": f"backbone.blocks.{{i}}.parallel.{ours}"
        for theirs, ours in (
            ("prompt_key_proj_d.weight", "down.weight"),
            ("prompt_key_proj_d.bias", "down.bias"),
            ("prompt_key_proj_u.weight", "up.weight"),
            ("prompt_key_proj_u.bias", "up.bias"),
            ("prompt_gate", "gate"),
        )
    },
}


def official_clip_dvpt(tmp_path) -> tuple[nn.Module, nn.Linear, str]:
    """The official DVPT CLIP tower (ViT-B layout shrunk: width 32, 4 blocks, 4 heads, 8 px patches, 32 px input;
    the official 50 prompts, bottleneck 20, a module per 3 blocks), every weight random and the gates open, its
    ``fc_head``, and its frozen CLIP weights saved as an open_clip ``visual.*`` file; in float64."""
    torch.manual_seed(3)
    official = dvpt_official.VisionTransformer(
        input_resolution=32, patch_size=8, width=32, layers=4, heads=4, output_dim=16
    )
    with torch.no_grad():
        for name, param in official.named_parameters():
            if "ln_" in name:  # LayerNorms start at (1, 0): move them so a misplaced norm cannot hide
                param.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
            elif name.endswith("prompt_gate"):
                param.fill_(0.7)
    head = nn.Linear(16, 3, bias=False)
    official, head = official.double(), head.double()  # drawn in float32: the float32 file holds them exactly
    frozen = {f"visual.{k}": v.float() for k, v in official.state_dict().items() if "prompt" not in k}
    path = str(tmp_path / "clip_visual.pt")
    torch.save(frozen, path)
    return official, head, path


def official_names(blocks: list[int]) -> dict[str, str]:
    """:data:`OFFICIAL_NAMES` for the blocks that own a module."""
    return {theirs.format(i=i): ours.format(i=i) for theirs, ours in OFFICIAL_NAMES.items() for i in blocks}


def load_official_dvpt(model: PromptClassifier, official: nn.Module, head: nn.Linear) -> None:
    """Copy the official trained DVPT parameters into ``model`` one to one (:data:`OFFICIAL_NAMES`); the official
    ``fc_head`` after CLIP's frozen ``proj`` is one linear map, ``head.weight = fc_head.weight @ proj.T``."""
    source = official.state_dict()
    with torch.no_grad():
        for theirs, ours in official_names([0, 3]).items():
            target = model.get_parameter(ours)
            target.copy_(source[theirs].reshape(target.shape))  # prompt_token [1, M, D] -> prompts [M, D]
        model.head.weight.copy_(head.weight @ official.proj.T)
        model.head.bias.zero_()


@pytest.mark.parametrize("variant", ["code", "paper"])
def test_code_variant_equals_the_official_modules_on_a_clip_tower(tmp_path, monkeypatch, variant):
    """The official CLIP tower (its source in dvpt_official.py) and ``variant="code"`` on the same weights: equal
    logits and gradients of every trainable tensor (float64); the prompts pass through CLIP's ``ln_pre`` with the
    other tokens in both. ``"paper"`` on the same weights differs (its cross-attention is live)."""
    # the official LayerNorm computes in float32 (for fp16 weights); here it computes in the input's float64
    monkeypatch.setattr(dvpt_official.LayerNorm, "forward", nn.LayerNorm.forward)
    official, head, path = official_clip_dvpt(tmp_path)
    config = {"num_prompts": 50, "bottleneck": 20, "share": 3, "variant": variant}
    model = PromptClassifier(
        3, "dvpt", config, backbone="auto", pretrained=path, img_size=32, backbone_overrides={"num_heads": 4}
    ).double()
    load_official_dvpt(model, official, head)
    with torch.no_grad():  # the loader folds CLS's position into cls_token in float32; fold it again in float64
        model.backbone.cls_token.copy_(official.class_embedding + official.positional_embedding[0])
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    logits, expected = model(x), head(official(x))
    if variant == "paper":
        assert rel_err(logits, expected) > 1e-3
        return
    assert rel_err(logits, expected) < 1e-10
    names = official_names([0, 3])
    ours, theirs = dict(model.named_parameters()), dict(official.named_parameters())
    assert {*names.values(), "head.weight", "head.bias"} == {n for n, p in ours.items() if p.requires_grad}
    grads = torch.autograd.grad(logits.square().sum(), [ours[n] for n in names.values()] + [model.head.weight])
    ref_grads = torch.autograd.grad(expected.square().sum(), [theirs[n] for n in names] + [head.weight])
    grads = [*grads[:-1], grads[-1] @ official.proj]  # d/d fc_head = (d/d head.weight) proj
    for name, grad, ref_grad in zip([*names, "fc_head.weight"], grads, ref_grads):
        assert rel_err(grad.reshape(ref_grad.shape), ref_grad) < 1e-10, name


def test_variants_differ_only_through_the_cross_attention():
    paper, code = classifier("paper"), classifier("code")
    open_gates(paper)
    open_gates(code)
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(paper(x), code(x))
    for block in (*paper.backbone.blocks, *code.backbone.blocks):
        block.parallel.cross_attention = False
    torch.testing.assert_close(paper(x), code(x), rtol=0, atol=0)


def test_added_branch_is_exactly_zero_at_initialisation():
    module = DVPTModule(WIDTH, 6, PROMPTS)
    assert torch.equal(module(torch.randn(2, 21, WIDTH)), torch.zeros(2, 21, WIDTH))
    model = classifier().eval()
    x = torch.randn(2, 3, 32, 32)
    with_branch = model(x)
    for block in model.backbone.blocks:
        block.has_parallel = False
    assert torch.equal(with_branch, model(x))


def test_parameter_counts_vit_base_with_and_without_sharing():
    # 50x768 prompts + 50x768 positions + modules of 2x768x20 + 20 + 768 + 1
    vit = apply_method(build_vit("vit_base"), "dvpt")
    report = trainable_report(vit)
    assert report["trainable"] == 2 * 50 * 768 + 4 * (2 * 768 * 20 + 20 + 768 + 1) == 202_836
    assert report["modules"]["blocks.*.parallel.down.weight"] == 4 * 768 * 20
    assert len({id(block.parallel) for block in vit.blocks}) == 4
    assert vit.blocks[2].parallel is vit.blocks[0].parallel and vit.blocks[3].parallel is not vit.blocks[0].parallel
    unshared = apply_method(build_vit("vit_base"), "dvpt", {"share": 1})
    assert trainable_report(unshared)["trainable"] == 2 * 50 * 768 + 12 * 31_509 == 454_908


def test_sharing_in_state_dict_delta_and_report():
    model = classifier()
    parallel_keys = [k for k in model.state_dict() if ".parallel." in k]
    assert len(parallel_keys) == 4 * 5  # every block lists its (shared) module
    delta = delta_state_dict(model)["model"]
    assert sorted(k for k in delta if ".parallel." in k) == sorted(
        f"backbone.blocks.{i}.parallel.{n}"
        for i in (0, 2)
        for n in ("down.weight", "down.bias", "up.weight", "up.bias", "gate")
    )
    head = 3 * WIDTH + 3
    expected = 2 * PROMPTS * WIDTH + 2 * (2 * WIDTH * 6 + 6 + WIDTH + 1) + head
    delta_numel = sum(t.numel() for k, t in delta.items() if k not in IDENTITY_KEYS)
    assert trainable_report(model)["trainable"] == delta_numel == expected


def test_only_dvpt_parameters_and_head_train():
    model = classifier()
    open_gates(model)
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith(("backbone.prompter.", "head.")) or ".parallel." in n for n in expected)
    assert_adamw_trains_exactly(model, expected)


def test_delta_round_trip_keeps_sharing(tmp_path):
    model, fresh = classifier(), classifier()
    assert_delta_round_trip(model, fresh, tmp_path / "dvpt.pt")
    assert torch.equal(fresh.backbone.blocks[1].parallel.up.weight, model.backbone.blocks[0].parallel.up.weight)


@pytest.mark.parametrize("cls_token", [True, False])
def test_forward_strips_prompts_for_segmentation(cls_token):
    plain = build_vit("vit_tiny", img_size=32, cls_token=cls_token, **TINY)
    tuned = apply_method(build_vit("vit_tiny", img_size=32, cls_token=cls_token, **TINY), "dvpt", CONFIG)
    x = torch.randn(2, 3, 32, 32)
    (tokens, hidden), (ref_tokens, ref_hidden) = tuned(x), plain(x)
    assert tokens.shape == ref_tokens.shape and [h.shape for h in hidden] == [h.shape for h in ref_hidden]
    assert tuned.forward_tokens(x)[0].shape[1] == ref_tokens.shape[1] + PROMPTS
    assert tuned.forward_features(x).shape == (2, WIDTH)


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_sdpa_and_checkpointing_give_the_literal_logits_and_gradients(variant):
    """The bundles build DVPT with ``sdpa=True``: the backbone's attention on SDPA changes no output or gradient."""
    model = classifier(variant).double().train()
    open_gates(model)
    assert_efficiency_paths_match(model, model.backbone, torch.randn(2, 3, 32, 32, dtype=torch.float64))


def test_bad_config_raises_clear_errors():
    with pytest.raises(ValueError, match="'official'"):
        DVPTConfig(variant="official")
    with pytest.raises(ValueError, match="share must be >= 1, got 0"):
        DVPTConfig(share=0)


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_grad_checkpointing_autocast_and_torchscript(variant):
    x = torch.randn(2, 3, 32, 32)
    model = classifier(variant).train()
    open_gates(model)
    model(x).sum().backward()
    checkpointed = classifier(variant, grad_checkpointing=True).train()
    open_gates(checkpointed)
    checkpointed(x).sum().backward()
    for p, q in zip(model.parameters(), checkpointed.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad)

    bf16 = classifier(variant, autocast_dtype="bf16")
    open_gates(bf16)
    logits = bf16(x)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, model(x), atol=0.1, rtol=0.05)
    logits.sum().backward()
    assert bf16.backbone.blocks[0].parallel.down.weight.grad.dtype == torch.float32

    model.eval()
    torch.testing.assert_close(torch.jit.script(model)(x), model(x), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------------
# Token-grid families: SAM's ViT image encoder and LiteMedSAM's TinyViT (per-block prompts, modules per stage).
# --------------------------------------------------------------------------------------------------------

#: where the tiny encoders' shared modules live (CONFIG's share=2; TinyViT's stages hold 2, 1 and 1 blocks).
GRID_MODULE_OWNERS = {
    "sam": ["blocks.0", "blocks.2"],
    "tinyvit": ["layers.1.blocks.0", "layers.2.blocks.0", "layers.3.blocks.0"],
}
MODULE_PARAMS = ("gate", "down.weight", "down.bias", "up.weight", "up.bias")


def grid_classifier(family: str, variant: str = "paper", open_gate: bool = True) -> PromptClassifier:
    torch.manual_seed(0)
    model = PromptClassifier(3, "dvpt", {**CONFIG, "variant": variant}, backbone=tiny_encoder(family))
    if open_gate:
        with torch.no_grad():
            for index, owner in enumerate(GRID_MODULE_OWNERS[family]):
                model.backbone.get_submodule(f"{owner}.parallel.bottleneck").gate.fill_(0.5 + index)
    return model


def literal_grid_branch(variant: str):
    """The grid DVPT branch from its weights: a loop over the prompts (dynamic queries) and over the tokens (each
    reading the dynamic prompts back)."""

    def branch(block: nn.Module, grid: torch.Tensor) -> torch.Tensor:
        module = block.parallel.bottleneck
        batch, height, width, channels = grid.shape
        h = grid.reshape(batch, height * width, channels) @ module.down.weight.t() + module.down.bias
        h = h * torch.sigmoid(1.702 * h)
        if variant == "paper":
            scale = h.shape[-1] ** -0.5
            rows = []
            for b in range(batch):
                dynamic = torch.stack([torch.softmax(h[b] @ p * scale, 0) @ h[b] for p in block.parallel.prompts])
                rows.append(torch.stack([t + torch.softmax(dynamic @ t * scale, 0) @ dynamic for t in h[b]]))
            h = torch.stack(rows)
        out = module.gate * (h @ module.up.weight.t() + module.up.bias)
        return out.reshape(batch, height, width, channels)

    return branch


@pytest.mark.parametrize("variant", ["paper", "code"])
@pytest.mark.parametrize("family", FAMILIES)
def test_grid_families_match_literal_reference(family, variant):
    model = grid_classifier(family, variant).double()
    encoder = model.backbone
    params = [p for p in encoder.parameters() if p.requires_grad]
    size = CHECK_SIZE[family]
    x = torch.randn(1, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out, ref = encoder.forward_features(x), reference_features(encoder, x, branch=literal_grid_branch(variant))
    assert rel_err(out, ref) < 1e-10
    modules = len(GRID_MODULE_OWNERS[family])
    assert len(params) == modules * 5 + (len(attention_blocks(encoder)) if variant == "paper" else 0)
    grads = torch.autograd.grad(out.square().sum(), params)
    for grad, ref_grad in zip(grads, torch.autograd.grad(ref.square().sum(), params)):
        assert rel_err(grad, ref_grad) < 1e-10


@pytest.mark.parametrize("family", FAMILIES)
def test_grid_what_trains_sharing_zero_init_and_delta_round_trip(family, tmp_path):
    model = grid_classifier(family)
    blocks = [name for name, _ in attention_blocks(model.backbone)]
    expected = {f"backbone.{b}.parallel.prompts" for b in blocks} | {"head.weight", "head.bias"}
    expected |= {f"backbone.{o}.parallel.bottleneck.{p}" for o in GRID_MODULE_OWNERS[family] for p in MODULE_PARAMS}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    shared = [model.backbone.get_submodule(f"{b}.parallel.bottleneck") for b in blocks[:2]]
    assert shared[0] is shared[1]  # the first two blocks share one module (of one stage in both encoders)
    assert_adamw_trains_exactly(model, expected)
    assert_delta_round_trip(grid_classifier(family).eval(), grid_classifier(family).eval(), tmp_path / "dvpt.pt")
    x = torch.randn(2, 3, 32, 32)
    closed, plain = grid_classifier(family, open_gate=False).eval(), tiny_encoder(family).eval()
    assert torch.equal(closed.backbone.forward_features(x), plain.forward_features(x))  # the branch is 0 at init


@pytest.mark.parametrize("family", FAMILIES)
def test_grid_checkpointing_sdpa_and_torchscript_match(family):
    assert_efficiency_paths_and_torchscript_match(grid_classifier(family), family)


def test_grid_parameter_counts_at_full_size():
    """SAM ViT-B at 1024 px: 12 blocks, 4 modules of width 768; LiteMedSAM's TinyViT at 256 px: stages of 2, 6
    and 2 blocks (widths 128, 160, 320), modules never shared across a stage: 1 + 2 + 1 (docs/methods.md)."""

    def module(width: int) -> int:
        return 2 * width * 20 + 20 + width + 1

    with torch.device("meta"):
        counts = {
            (name, variant): trainable_report(apply_method(build(), "dvpt", {"variant": variant}))["trainable"]
            for name, build in (
                ("sam", lambda: build_sam("sam_vit_b", img_size=1024)),
                ("tinyvit", lambda: build_tinyvit("lite_medsam", img_size=256)),
            )
            for variant in ("paper", "code")
        }
    sam, tinyvit = 4 * module(768), module(128) + 2 * module(160) + module(320)
    expected = {
        ("sam", "paper"): sam + 12 * 50 * 20,  # a prompt [50, 20] per block
        ("sam", "code"): sam,
        ("tinyvit", "paper"): tinyvit + 10 * 50 * 20,
        ("tinyvit", "code"): tinyvit,
    }
    assert counts == expected
    assert list(expected.values()) == [138_036, 126_036, 41_572, 31_572]  # docs/methods.md
