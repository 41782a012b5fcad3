"""PEFT core: registry, config validation, freezing, parameter report, delta save/load checks."""

from dataclasses import dataclass

import pytest
import torch

from monai_prompt.backbones import build_vit
from monai_prompt.nets import PromptClassifier
from monai_prompt.peft import (
    DeltaMismatchError,
    apply_method,
    format_report,
    load_delta,
    method_names,
    register_method,
    save_delta,
    trainable_report,
)

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "mlp_dim": 64, "patch_size": 8}


@dataclass
class NormTuneConfig:
    """A test-only method: train the LayerNorms of the first ``blocks`` blocks."""

    blocks: int = 1


@register_method("test_norm_tune", NormTuneConfig, trainable=r"^blocks\.0\.norm[12]\.")
def apply_norm_tune(vit, config):
    vit.extra_marker = config.blocks


def tiny_classifier(method="linear", config=None, seed=0):
    torch.manual_seed(seed)
    return PromptClassifier(3, method=method, method_config=config, backbone="vit_tiny", img_size=32, backbone_overrides=TINY)


def test_registry_lists_all_methods_and_rejects_unknown():
    assert {"full", "linear", "vpt", "lora", "adapter", "bitfit", "ssf", "dvpt", "ept"} <= set(method_names())
    with pytest.raises(ValueError, match="unknown PEFT method 'prefix'"):
        apply_method(build_vit("vit_tiny", **TINY), "prefix")
    with pytest.raises(ValueError, match=r"unknown 'test_norm_tune' config keys \['depth'\]; valid keys: \['blocks'\]"):
        apply_method(build_vit("vit_tiny", **TINY), "test_norm_tune", {"depth": 2})
    vit = apply_method(build_vit("vit_tiny", **TINY), "test_norm_tune", {"blocks": 2})
    assert vit.peft_method == "test_norm_tune" and vit.peft_config == {"blocks": 2} and vit.extra_marker == 2
    with pytest.raises(ValueError, match="already has method"):
        apply_method(vit, "full")


def test_freezing_follows_the_method_pattern():
    vit = apply_method(build_vit("vit_tiny", **TINY), "test_norm_tune")
    trainable = sorted(n for n, p in vit.named_parameters() if p.requires_grad)
    assert trainable == ["blocks.0.norm1.bias", "blocks.0.norm1.weight", "blocks.0.norm2.bias", "blocks.0.norm2.weight"]
    full = apply_method(build_vit("vit_tiny", **TINY), "full")
    frozen = sorted(n for n, p in full.named_parameters() if not p.requires_grad)
    assert frozen == [f"blocks.{i}.norm_cross_attn.{k}" for i in range(2) for k in ("bias", "weight")]


def test_trainable_report_counts_and_prints():
    net = tiny_classifier("test_norm_tune")
    report = trainable_report(net)
    head = 32 * 3 + 3
    assert report["trainable"] == 4 * 32 + head
    assert report["modules"]["head.weight"] == 96
    assert report["modules"]["backbone.blocks.*.norm1.weight"] == 32
    backbone = sum(p.numel() for n, p in net.backbone.named_parameters() if "norm_cross_attn" not in n)
    assert report["backbone"] == backbone and report["total"] == backbone + head
    assert report["percent_of_backbone"] == pytest.approx(100 * (4 * 32 + head) / backbone)
    text = format_report(report)
    assert "test_norm_tune" in text and f"{report['trainable']:,}" in text and "% of the backbone" in text


def test_delta_roundtrip_and_mismatch_messages(tmp_path):
    trained = tiny_classifier("test_norm_tune", {"blocks": 1})
    with torch.no_grad():
        trained.backbone.blocks[0].norm1.weight.add_(0.5)
        trained.head.bias.add_(1.0)
    path = save_delta(trained, tmp_path / "delta.pt")
    assert not list(tmp_path.glob(".*.tmp"))
    saved = torch.load(path, weights_only=True)
    assert set(saved) == {"model", "peft"} and set(saved["model"]) == {n for n, p in trained.named_parameters() if p.requires_grad}

    fresh = tiny_classifier("test_norm_tune", {"blocks": 1})  # same seed: same "pre-trained" backbone
    load_delta(fresh, path)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fresh.eval()(x), trained.eval()(x), rtol=0, atol=0)

    with pytest.raises(DeltaMismatchError, match="delta is for method 'test_norm_tune', the model uses 'linear'"):
        load_delta(tiny_classifier("linear"), path)
    with pytest.raises(DeltaMismatchError, match="method config differs: blocks: 1 in the delta vs 2 here"):
        load_delta(tiny_classifier("test_norm_tune", {"blocks": 2}), path)
    with pytest.raises(DeltaMismatchError, match="frozen backbone weights differ"):
        load_delta(tiny_classifier("test_norm_tune", {"blocks": 1}, seed=1), path)
    other = PromptClassifier(3, method="test_norm_tune", backbone="vit_tiny", img_size=32, backbone_overrides={**TINY, "mlp_dim": 128})
    with pytest.raises(DeltaMismatchError, match="backbone architecture differs: mlp_dim: 64 in the delta vs 128 here"):
        load_delta(other, path)
