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
    loss = model.forward_features(x).square().sum()
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

    def counting(kind):
        def wrapped(fn, *args, **kwargs):
            calls.append(kind if kind == "block" else fn.__name__)
            return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

        return wrapped

    monkeypatch.setattr(vit_module, "checkpoint", counting("block"))
    monkeypatch.setattr(blocks, "checkpoint", counting("branch"))
    vit = build_vit("vit_tiny", img_size=16, **TINY).train()
    expected = {
        "none": [],
        "blocks": ["block"] * 4,
        "attn": ["attention_branch"] * 4,
        "mlp": ["mlp_branch"] * 4,
        "alternate": ["block"] * 2,
    }
    assert set(expected) == set(CHECKPOINT_MODES)
    for mode, wanted in expected.items():
        calls.clear()
        vit.set_grad_checkpointing(mode)
        vit.forward_features(torch.randn(1, 3, 16, 16))
        assert calls == wanted, mode
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
