"""Activation-checkpointing modes of ``PromptableViT.set_grad_checkpointing``: what each recomputes, and that
outputs and gradients equal the plain path in float64."""

from __future__ import annotations

import pytest
import torch

from monai_prompt.backbones.vit import CHECKPOINT_MODES, build_vit
from monai_prompt.nets import PromptClassifier
from monai_prompt.peft import apply_method

TINY = {"hidden_size": 32, "num_layers": 4, "num_heads": 2, "mlp_dim": 64, "patch_size": 8}


def _loss_and_grads(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    # both paths: the readout (forward_features) and the hidden states a decoder reads (forward)
    loss = model.forward_features(x).square().sum() + model(x)[1][-1].sin().sum()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [model.get_parameter(n) for n in names] + [x])
    return loss.detach(), dict(zip(names + ["input"], grads))


@pytest.mark.parametrize("method", ["full", "adapter", "lora"])
@pytest.mark.parametrize("mode", ["blocks", "attn", "mlp", "alternate"])
def test_modes_give_the_plain_gradients_in_float64(method, mode):
    torch.manual_seed(0)
    config = {"dropout": 0.0} if method == "adapter" else None  # no randomness between the two passes
    vit = apply_method(build_vit("vit_tiny", img_size=16, **TINY), method, config).double().train()
    if method == "adapter":  # its up projection starts at zero: make the parallel branch matter
        for block in vit.blocks:
            torch.nn.init.normal_(block.parallel.up_proj.weight, std=0.1)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    plain = _loss_and_grads(vit, x)
    vit.set_grad_checkpointing(mode)
    assert vit.grad_checkpointing
    recomputed = _loss_and_grads(vit, x)
    torch.testing.assert_close(recomputed[0], plain[0], rtol=1e-12, atol=0)
    assert recomputed[1].keys() == plain[1].keys()
    for name, grad in plain[1].items():
        torch.testing.assert_close(recomputed[1][name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_modes_recompute_what_they_name(monkeypatch):
    """Count the checkpointed calls per mode: whole blocks, one branch per block, or every other block."""
    from monai_prompt.backbones import blocks
    from monai_prompt.backbones import vit as vit_module

    calls: list[str] = []

    def counting(fn, *args, **kwargs):  # a whole block is a module: "block"; else the method's name
        calls.append(getattr(fn, "__name__", "block"))
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(vit_module, "checkpoint", counting)
    monkeypatch.setattr(blocks, "checkpoint", counting)
    vit = build_vit("vit_tiny", img_size=16, **TINY).train()
    # forward (hidden states: a decoder follows) recomputes every block the mode names, the first whole block with
    # the embedding; under the readout (forward_features) the last block's whole-block or MLP recomputation is
    # left out, since it would start right away
    expected = {
        "none": ([], []),
        "blocks": (["_start"] + ["block"] * 3, ["_start"] + ["block"] * 2),
        "attn": (["attention_branch"] * 4, ["attention_branch"] * 4),
        "mlp": (["mlp_branch"] * 4, ["mlp_branch"] * 3),
        "alternate": (["_start", "block"], ["_start", "block"]),
    }
    assert set(expected) == set(CHECKPOINT_MODES)
    for mode, (hidden, readout) in expected.items():
        vit.set_grad_checkpointing(mode)
        calls.clear()
        vit(torch.randn(1, 3, 16, 16))
        assert calls == hidden, mode
        calls.clear()
        vit.forward_features(torch.randn(1, 3, 16, 16))
        assert calls == readout, mode
    vit.set_grad_checkpointing(True)  # the bool form keeps its meaning: every whole block
    assert vit.recompute == ["block"] * 4
    vit.set_grad_checkpointing(False)
    assert not vit.grad_checkpointing and vit.recompute == ["none"] * 4
    calls.clear()
    vit.eval().set_grad_checkpointing("mlp")
    vit.forward_features(torch.randn(1, 3, 16, 16))
    assert calls == []  # nothing is recomputed outside training


def test_unknown_mode_is_a_clear_error_and_classifier_passes_modes():
    vit = build_vit("vit_tiny", img_size=16, **TINY)
    with pytest.raises(ValueError, match=r"grad checkpointing 'ffn' is not a bool or one of \['none', 'blocks'"):
        vit.set_grad_checkpointing("ffn")
    net = PromptClassifier(2, "lora", backbone=build_vit("vit_tiny", img_size=16, **TINY), img_size=16,
                           grad_checkpointing="attn")
    assert net.backbone.recompute == ["attn"] * 4
    torch.jit.script(net.eval())  # the recompute choice stays out of TorchScript


@pytest.mark.parametrize("method", ["lora", "bitfit"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_frozen_linears_under_autocast_keep_no_weight_copy_and_give_the_autocast_gradients(monkeypatch, dtype,
                                                                                           method):
    """Under autocast a frozen linear casts its weight again in backward instead of keeping the cast copy: the
    saved tensors hold no copy of a frozen weight, and the loss and gradients (BitFit: of the trained biases) are
    exactly those of ``F.linear``."""
    from monai_prompt.backbones import recast

    torch.manual_seed(0)
    vit = apply_method(build_vit("vit_tiny", img_size=16, **TINY), method).train()
    for block in vit.blocks if method == "lora" else ():  # B starts at zero: make the update matter
        torch.nn.init.normal_(block.attn.qkv.lora_B, std=0.1)
    x = torch.randn(2, 3, 16, 16)
    frozen = {(dtype, tuple(m.weight.shape)) for m in vit.modules() if isinstance(m, torch.nn.Linear)}
    names = [n for n, p in vit.named_parameters() if p.requires_grad]

    def run() -> tuple[torch.Tensor, list[torch.Tensor], set[tuple[torch.dtype, tuple[int, ...]]]]:
        saved = set()

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.add((t.dtype, tuple(t.shape)))
            return t

        with torch.autocast("cpu", dtype=dtype), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = vit.forward_features(x).float().square().sum()
        return loss, torch.autograd.grad(loss, [vit.get_parameter(n) for n in names]), saved

    loss, grads, saved = run()
    assert not saved & frozen
    monkeypatch.setattr(recast, "_linear_eager", torch.nn.functional.linear)  # the plain autocast linear
    plain_loss, plain_grads, plain_saved = run()
    assert plain_saved >= frozen - {(dtype, tuple(vit.blocks[0].attn.qkv.weight.shape))}  # (block 0: no input grad)
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    for name, grad, plain in zip(names, grads, plain_grads):
        torch.testing.assert_close(grad, plain, rtol=0, atol=0, msg=name)
