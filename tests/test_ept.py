"""EPT: maths against a literal float64 reference, the SDPA sink path, prompt resizing, training plumbing."""

import pytest
import torch

from bundle_support import TINY_BACKBONE as TINY
from grid_support import (
    CHECK_SIZE,
    FAMILIES,
    SAM_TINY,
    assert_efficiency_paths_and_torchscript_match,
    attention_blocks,
    reference_features,
    tiny_encoder,
)
from monai_prompt.backbones import build_vit
from monai_prompt.backbones.sam import build_sam
from monai_prompt.backbones.tinyvit import build_tinyvit
from monai_prompt.nets import PromptClassifier
from monai_prompt.peft import apply_method, trainable_report
from monai_prompt.peft.ept import EPTAttention, EPTConfig, resize_ept_prompt
from peft_checks import assert_adamw_trains_exactly, assert_delta_round_trip, assert_efficiency_paths_match, rel_err

HEADS, WIDTH, TOKENS = 4, 32, 17  # 32 px / patch 8 -> 16 patches + CLS


def reference_ept(x: torch.Tensor, attn: EPTAttention, prompt: torch.Tensor, variant: str) -> torch.Tensor:
    """EPT attention with plain loops over samples, heads and queries (float64)."""
    qkv = x @ attn.qkv.weight.t() + attn.qkv.bias  # [B, N, 3D], ordered (qkv, head, d)
    batch, tokens, _ = x.shape
    dim_head = WIDTH // HEADS
    qkv = qkv.reshape(batch, tokens, 3, HEADS, dim_head)
    out = torch.zeros(batch, tokens, HEADS, dim_head, dtype=x.dtype)
    for b in range(batch):
        for h in range(HEADS):
            q, k, v = qkv[b, :, 0, h], qkv[b, :, 1, h], qkv[b, :, 2, h]
            for i in range(tokens):
                logits = (k @ q[i]) / dim_head**0.5
                row = prompt[i] * (logits.max() - logits.min()) if variant == "multi_cat" else prompt[i]
                weights = torch.softmax(torch.cat((row, logits)), dim=0)[prompt.shape[1] :]
                out[b, i, h] = weights @ v
    return out.reshape(batch, tokens, WIDTH) @ attn.out_proj.weight.t() + attn.out_proj.bias


def make_attention(variant: str, sdpa: bool) -> EPTAttention:
    torch.manual_seed(0)
    attn = EPTAttention(WIDTH, HEADS, TOKENS, prompt_length=7, variant=variant).double()
    with torch.no_grad():
        attn.ept_prompt.normal_(std=1.0)  # well away from the near-uniform init, so the prompt matters
    attn.use_flash_attention = sdpa
    return attn


@pytest.mark.parametrize("variant", ["pure_cat", "multi_cat"])
@pytest.mark.parametrize("sdpa", [False, True])
def test_forward_and_gradients_match_literal_reference(variant, sdpa):
    attn = make_attention(variant, sdpa)
    x = torch.randn(2, TOKENS, WIDTH, dtype=torch.float64, requires_grad=True)
    out = attn(x)
    grads = torch.autograd.grad(out.square().sum(), (x, attn.ept_prompt))
    ref_x = x.detach().clone().requires_grad_(True)
    ref_prompt = attn.ept_prompt.detach().clone().requires_grad_(True)
    ref = reference_ept(ref_x, attn, ref_prompt, variant)
    ref_grads = torch.autograd.grad(ref.square().sum(), (ref_x, ref_prompt))
    assert rel_err(out, ref) < 1e-6
    for grad, ref_grad in zip(grads, ref_grads):
        assert rel_err(grad, ref_grad) < 1e-6


def test_closed_form_is_a_learnable_per_query_sink():
    # softmax over [P_i ; U_i] restricted to keys = sigmoid(LSE_j U_ij - LSE_k P_ik) * softmax(U_i)
    attn = make_attention("pure_cat", sdpa=False)
    q, k, v = torch.randn(3, 2, HEADS, TOKENS, WIDTH // HEADS, dtype=torch.float64)
    logits = q @ k.transpose(-1, -2) * attn.scale
    scale = torch.sigmoid(logits.logsumexp(-1) - attn.ept_prompt.logsumexp(-1))
    expected = scale.unsqueeze(-1) * (logits.softmax(-1) @ v)
    assert rel_err(attn.attend(q, k, v), expected) < 1e-12


def test_parameter_count_vit_base():
    vit = apply_method(build_vit("vit_base"), "ept")
    prompts = {n: p.shape for n, p in vit.named_parameters() if p.requires_grad}
    assert len(prompts) == 12 and set(prompts.values()) == {torch.Size([197, 100])}
    assert trainable_report(vit)["trainable"] == 12 * 197 * 100 == 236_400
    shallow = apply_method(build_vit("vit_base"), "ept", {"deep": False, "prompt_length": 20})
    assert [n for n, p in shallow.named_parameters() if p.requires_grad] == ["blocks.0.attn.ept_prompt"]
    assert trainable_report(shallow)["trainable"] == 197 * 20


def test_backbone_keys_and_modules_are_reused():
    vit = build_vit("vit_tiny", img_size=32, **TINY)
    keys, qkv = list(vit.state_dict()), vit.blocks[1].attn.qkv
    apply_method(vit, "ept", {"prompt_length": 3})
    assert vit.blocks[1].attn.qkv is qkv
    assert [k for k in vit.state_dict() if k not in keys] == ["blocks.0.attn.ept_prompt", "blocks.1.attn.ept_prompt"]
    assert all(k in vit.state_dict() for k in keys)


def test_bad_config_and_wrong_token_count_raise_clear_errors():
    with pytest.raises(ValueError, match="'multi'"):
        EPTConfig(variant="multi")
    model = PromptClassifier(2, "ept", {"prompt_length": 3}, backbone="vit_tiny", img_size=32, backbone_overrides=TINY)
    with pytest.raises(ValueError, match=r"input spatial size \[48, 48\]"):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="built for 17 tokens but the layer got 37.*resize_ept_prompt"):
        model.backbone.blocks[0].attn(torch.randn(1, 37, WIDTH))


def test_resize_prompt_keeps_cls_row_and_grid_layout():
    rows = torch.arange(4.0).repeat_interleave(4)  # value = grid row of the patch (row-major token order)
    prompt = torch.cat((torch.full((1, 2), 7.0), torch.stack((rows, torch.ones(16)), dim=1)))
    resized = resize_ept_prompt(prompt, (4, 4), (6, 6))
    assert resized.shape == (37, 2)
    assert torch.equal(resized[0], prompt[0])
    grid = resized[1:, 0].reshape(6, 6)
    assert torch.allclose(grid, grid[:, :1].expand(6, 6)) and bool((grid[1:, 0] > grid[:-1, 0]).all())
    assert torch.allclose(resized[1:, 1], torch.ones(36))  # a constant column stays constant
    assert torch.allclose(resize_ept_prompt(prompt, (4, 4), (4, 4)), prompt)
    assert resize_ept_prompt(torch.randn(8, 3), (2, 2, 2), (4, 4, 4), num_prefix_tokens=0).shape == (64, 3)
    with pytest.raises(ValueError, match=r"\(17, 2\).*\(5, 5\)"):
        resize_ept_prompt(prompt, (5, 5), (6, 6))


def test_resized_prompts_run_at_the_new_resolution():
    small = apply_method(build_vit("vit_tiny", img_size=32, **TINY), "ept", {"prompt_length": 3})
    large = apply_method(build_vit("vit_tiny", img_size=48, **TINY), "ept", {"prompt_length": 3})
    for name, value in small.state_dict().items():
        target = large.get_parameter(name) if name.endswith("ept_prompt") else None
        if target is not None:
            target.data.copy_(resize_ept_prompt(value, small.grid_size, large.grid_size))
    assert large.blocks[0].attn.ept_prompt.shape == (37, 3)
    assert large.forward_features(torch.randn(1, 3, 48, 48)).shape == (1, WIDTH)


@pytest.mark.parametrize("cls_token", [True, False])
def test_forward_contract_shapes_equal_unprompted(cls_token):
    plain = build_vit("vit_tiny", img_size=32, cls_token=cls_token, **TINY)
    tuned = apply_method(build_vit("vit_tiny", img_size=32, cls_token=cls_token, **TINY), "ept", {"prompt_length": 3})
    x = torch.randn(2, 3, 32, 32)
    (tokens, hidden), (ref_tokens, ref_hidden) = tuned(x), plain(x)
    assert tokens.shape == ref_tokens.shape and [h.shape for h in hidden] == [h.shape for h in ref_hidden]


def classifier(sdpa: bool = False, **kwargs) -> PromptClassifier:
    torch.manual_seed(0)
    return PromptClassifier(
        3,
        "ept",
        {"prompt_length": 5, **kwargs.pop("config", {})},
        backbone="vit_tiny",
        img_size=32,
        backbone_overrides=TINY,
        sdpa=sdpa,
        **kwargs,
    )


@pytest.mark.parametrize("variant", ["pure_cat", "multi_cat"])
def test_sdpa_and_checkpointing_give_the_literal_logits_and_gradients(variant):
    """The bundles build EPT with ``sdpa=True`` (``pure_cat``: the sink path; ``multi_cat``: literal, as its prompt
    scales with each row's logit span): the classifier's logits and gradients are those of the literal path."""
    model = classifier(config={"variant": variant}).double().train()
    with torch.no_grad():
        for block in model.backbone.blocks:
            block.attn.ept_prompt.normal_()
    assert_efficiency_paths_match(model, model.backbone, torch.randn(2, 3, 32, 32, dtype=torch.float64))


@pytest.mark.parametrize("sdpa", [False, True])
def test_only_prompts_and_head_train(sdpa):
    prompts = {"backbone.blocks.0.attn.ept_prompt", "backbone.blocks.1.attn.ept_prompt"}
    assert_adamw_trains_exactly(classifier(sdpa), prompts | {"head.weight", "head.bias"})


def test_delta_round_trip_reproduces_outputs(tmp_path):
    assert_delta_round_trip(classifier(), classifier(), tmp_path / "ept.pt")


@pytest.mark.parametrize("sdpa", [False, True])
@pytest.mark.parametrize("variant", ["pure_cat", "multi_cat"])
def test_grad_checkpointing_autocast_and_torchscript(sdpa, variant):
    x = torch.randn(2, 3, 32, 32)
    model = classifier(sdpa, config={"variant": variant}).train()
    model(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    checkpointed = classifier(sdpa, config={"variant": variant}, grad_checkpointing=True).train()
    checkpointed(x).sum().backward()
    for grad, p in zip(grads, (p for p in checkpointed.parameters() if p.requires_grad)):
        torch.testing.assert_close(p.grad, grad)

    bf16 = classifier(sdpa, config={"variant": variant}, autocast_dtype="bf16")
    logits = bf16(x)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, model(x), atol=0.05, rtol=0.05)
    logits.sum().backward()
    assert bf16.backbone.blocks[0].attn.ept_prompt.grad.dtype == torch.float32

    model.eval()
    torch.testing.assert_close(torch.jit.script(model)(x), model(x), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------------
# Token-grid families: SAM's ViT image encoder and LiteMedSAM's TinyViT (prompts inside each window).
# --------------------------------------------------------------------------------------------------------


def grid_classifier(family: str, config: dict | None = None, sdpa: bool = False) -> PromptClassifier:
    torch.manual_seed(0)
    return PromptClassifier(3, "ept", {"prompt_length": 5, **(config or {})}, backbone=tiny_encoder(family), sdpa=sdpa)


#: the prompted blocks of the tiny encoders and their prompt rows: window positions (SAM's windows of 3, TinyViT's
#: 7, 8 and 5), or in SAM's global blocks 1 and 3 the 4 x 4 grid.
GRID_PROMPT_ROWS = {
    "sam": {"blocks.0": 9, "blocks.1": 16, "blocks.2": 9, "blocks.3": 16},
    "tinyvit": {"layers.1.blocks.0": 49, "layers.1.blocks.1": 49, "layers.2.blocks.0": 64, "layers.3.blocks.0": 25},
}


@pytest.mark.parametrize("variant", ["pure_cat", "multi_cat"])
@pytest.mark.parametrize("family", FAMILIES)
def test_grid_families_match_literal_reference_on_both_paths(family, variant):
    """Features and prompt gradients of the whole encoder against the window-by-window reference (float64), with
    the literal path and with SDPA (the sink-key fast path for ``pure_cat``)."""
    model = grid_classifier(family, {"variant": variant}).double().eval()
    encoder = model.backbone
    with torch.no_grad():
        for _, block in attention_blocks(encoder):
            block.attn.ept_prompt.normal_(std=1.0)  # well away from the near-uniform init
    prompts = [block.attn.ept_prompt for _, block in attention_blocks(encoder)]
    size = CHECK_SIZE[family]
    x = torch.randn(1, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = reference_features(encoder, x, lambda block: block.attn.ept_prompt, variant)
    ref_grads = torch.autograd.grad(ref.square().sum(), prompts)
    for sdpa in (False, True):
        encoder.set_sdpa(sdpa)
        out = encoder.forward_features(x)
        assert rel_err(out, ref) < 1e-10
        for grad, ref_grad in zip(torch.autograd.grad(out.square().sum(), prompts), ref_grads):
            assert rel_err(grad, ref_grad) < 1e-10


@pytest.mark.parametrize("family", FAMILIES)
def test_grid_only_prompts_and_head_train_and_delta_round_trips(family, tmp_path):
    model = grid_classifier(family)
    rows = {f"backbone.{n}.attn.ept_prompt": (r, 5) for n, r in GRID_PROMPT_ROWS[family].items()}
    assert {n: tuple(p.shape) for n, p in model.named_parameters() if "ept_prompt" in n} == rows
    assert_adamw_trains_exactly(model, set(rows) | {"head.weight", "head.bias"})
    assert_delta_round_trip(grid_classifier(family).eval(), grid_classifier(family).eval(), tmp_path / "ept.pt")
    shallow = grid_classifier(family, {"deep": False})
    first = next(iter(GRID_PROMPT_ROWS[family]))
    assert [n for n, p in shallow.named_parameters() if "ept_prompt" in n] == [f"backbone.{first}.attn.ept_prompt"]


@pytest.mark.parametrize("family", FAMILIES)
def test_grid_checkpointing_sdpa_and_torchscript_match(family):
    assert_efficiency_paths_and_torchscript_match(grid_classifier(family), family)


def test_grid_parameter_counts_at_full_size():
    """SAM ViT-B at 1024 px: 8 windowed blocks (14 x 14 windows) and 4 global blocks (the 64 x 64 grid);
    LiteMedSAM's TinyViT at 256 px: 2 + 6 + 2 blocks with windows of 7, 14 and 7 (docs/methods.md)."""
    with torch.device("meta"):
        sam = apply_method(build_sam("sam_vit_b", img_size=1024), "ept")
        tinyvit = apply_method(build_tinyvit("lite_medsam", img_size=256), "ept")
    assert trainable_report(sam)["trainable"] == (8 * 14**2 + 4 * 64**2) * 100 == 1_795_200
    assert trainable_report(tinyvit)["trainable"] == (2 * 7**2 + 6 * 14**2 + 2 * 7**2) * 100 == 137_200
    assert {tuple(b.attn.ept_prompt.shape) for i, b in enumerate(sam.blocks) if i in (2, 5, 8, 11)} == {(4096, 100)}


def test_grid_global_prompts_resize_with_the_grid():
    small = grid_classifier("sam").backbone
    large = apply_method(build_sam("sam_vit_b", img_size=48, **SAM_TINY), "ept", {"prompt_length": 5})
    resized = resize_ept_prompt(small.blocks[1].attn.ept_prompt.detach(), (4, 4), (6, 6), num_prefix_tokens=0)
    large.blocks[1].attn.ept_prompt.data.copy_(resized)  # windowed blocks' prompts keep their shape
    assert large.blocks[0].attn.ept_prompt.shape == small.blocks[0].attn.ept_prompt.shape
    assert large.forward_features(torch.randn(1, 3, 48, 48)).shape == (1, 16)
