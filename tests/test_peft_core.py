"""PEFT core: registry and method discovery, config validation, freezing, parameter report, delta checks."""

import pkgutil
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import monai_prompt.peft
from monai_prompt.backbones import build_vit
from monai_prompt.nets import PromptClassifier
from monai_prompt.peft import (
    DeltaMismatchError,
    apply_method,
    format_report,
    get_method,
    import_package_modules,
    load_delta,
    method_names,
    register_method,
    registry,
    save_delta,
    trainable_report,
)
from monai_prompt.peft.delta import IDENTITY_KEYS, trainable_state
from net_support import tiny_classifier

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "mlp_dim": 64, "patch_size": 8}


@dataclass
class NormTuneConfig:
    """A test-only method: train the LayerNorms of the first ``blocks`` blocks."""

    blocks: int = 1


def apply_norm_tune(vit, config):
    vit.extra_marker = config.blocks


@pytest.fixture
def registry_copy(monkeypatch):
    """Methods registered during the test go into a copy of the registry that is dropped afterwards."""
    method_names()  # the package's own methods are in the copy
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_IMPORTED_PACKAGES", set(registry._IMPORTED_PACKAGES))


@pytest.fixture
def norm_tune(registry_copy):
    """The test-only method ``test_norm_tune``, registered for one test."""
    register_method("test_norm_tune", NormTuneConfig, trainable=r"^blocks\.0\.norm[12]\.")(apply_norm_tune)


def test_registry_lists_exactly_the_method_modules_of_the_package():
    """A module of ``monai_prompt/peft`` is a method module iff its source declares a method; each declares one,
    named like the module, and the registry lists exactly those (the core modules are no methods)."""
    package = Path(monai_prompt.peft.__file__).parent
    modules = [info.name for info in pkgutil.iter_modules([str(package)])]
    declaring = {name for name in modules if "@register_method(" in (package / f"{name}.py").read_text()}
    assert declaring
    assert set(method_names()) == declaring
    assert all(get_method(name).module == f"monai_prompt.peft.{name}" for name in declaring)


@pytest.fixture
def fake_method_package(tmp_path, monkeypatch, registry_copy):
    """A package ``fake_methods`` on ``sys.path`` with a method module (``fake_dora.py``) and a helper module."""
    (tmp_path / "fake_methods").mkdir()
    (tmp_path / "fake_methods" / "__init__.py").write_text("")
    (tmp_path / "fake_methods" / "helpers.py").write_text("SCALE = 2.0\n")
    fake_dora = """
        from dataclasses import dataclass

        from monai_prompt.peft.registry import register_method


        @dataclass
        class FakeDoRAConfig:
            rank: int = 4


        @register_method("fake_dora", FakeDoRAConfig, trainable="(?!)")
        def apply_fake_dora(vit, config):
            vit.fake_rank = config.rank
        """
    (tmp_path / "fake_methods" / "fake_dora.py").write_text(textwrap.dedent(fake_dora))
    monkeypatch.syspath_prepend(tmp_path)
    yield "fake_methods"
    for name in [name for name in sys.modules if name.split(".")[0] == "fake_methods"]:
        del sys.modules[name]


def test_a_new_method_module_registers_itself_without_a_list(fake_method_package):
    before = set(method_names())
    import_package_modules(fake_method_package)
    assert set(method_names()) == before | {"fake_dora"}  # the helper module registers nothing
    assert get_method("fake_dora").module == "fake_methods.fake_dora"
    assert apply_method(build_vit("vit_tiny", **TINY), "fake_dora", {"rank": 2}).fake_rank == 2
    with pytest.raises(ValueError, match=r"unknown PEFT method 'dora'; available: \[.*'fake_dora'"):
        get_method("dora")


@pytest.mark.usefixtures("norm_tune")
def test_registry_rejects_unknown_methods_config_keys_and_double_registration():
    with pytest.raises(ValueError, match=r"unknown PEFT method 'prefix'; available: \['adapter', "):
        apply_method(build_vit("vit_tiny", **TINY), "prefix")
    with pytest.raises(ValueError, match=r"unknown 'test_norm_tune' config keys \['depth'\]; valid keys: \['blocks'\]"):
        apply_method(build_vit("vit_tiny", **TINY), "test_norm_tune", {"depth": 2})
    vit = apply_method(build_vit("vit_tiny", **TINY), "test_norm_tune", {"blocks": 2})
    assert vit.peft_method == "test_norm_tune" and vit.peft_config == {"blocks": 2} and vit.extra_marker == 2
    with pytest.raises(ValueError, match="already has method"):
        apply_method(vit, "full")
    with pytest.raises(ValueError, match=f"'lora' is registered twice: by monai_prompt.peft.lora and by {__name__}"):
        register_method("lora", NormTuneConfig, trainable="(?!)")(apply_norm_tune)


@pytest.mark.usefixtures("norm_tune")
def test_freezing_follows_the_method_pattern():
    vit = apply_method(build_vit("vit_tiny", **TINY), "test_norm_tune")
    trainable = sorted(n for n, p in vit.named_parameters() if p.requires_grad)
    assert trainable == ["blocks.0.norm1.bias", "blocks.0.norm1.weight", "blocks.0.norm2.bias", "blocks.0.norm2.weight"]
    full = apply_method(build_vit("vit_tiny", **TINY), "full")
    frozen = sorted(n for n, p in full.named_parameters() if not p.requires_grad)
    assert frozen == [f"blocks.{i}.norm_cross_attn.{k}" for i in range(2) for k in ("bias", "weight")]


@pytest.mark.usefixtures("norm_tune")
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


def test_the_trainable_state_of_a_gpu_network_is_on_the_cpu():
    """A delta saved from CUDA held CUDA tensors, which ``torch.load`` without ``map_location`` (ignite's
    ``Checkpoint.load_objects``: MONAI's ``ckpt_export``) cannot read on a machine without a GPU. CUDA parameters
    are emulated by fake tensors, which need no GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    net = tiny_classifier("lora")
    with FakeTensorMode(allow_non_fake_inputs=True):
        for module in net.modules():
            for name, param in module.named_parameters(recurse=False):
                gpu = torch.empty_like(param, device="cuda")
                module._parameters[name] = torch.nn.Parameter(gpu, requires_grad=param.requires_grad)
        assert net.head.weight.device.type == "cuda"
        state = trainable_state(net)
    assert state and {tensor.device.type for tensor in state.values()} == {"cpu"}


@pytest.mark.usefixtures("norm_tune")
def test_delta_roundtrip_and_mismatch_messages(tmp_path):
    trained = tiny_classifier("test_norm_tune", {"blocks": 1})
    with torch.no_grad():
        trained.backbone.blocks[0].norm1.weight.add_(0.5)
        trained.head.bias.add_(1.0)
    path = save_delta(trained, tmp_path / "delta.pt")
    assert not list(tmp_path.glob(".*.tmp"))
    saved = torch.load(path, weights_only=True)
    assert set(saved) == {"model", "peft"}
    assert set(saved["model"]) == {n for n, p in trained.named_parameters() if p.requires_grad} | set(IDENTITY_KEYS)

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
    wider = {**TINY, "mlp_dim": 128}
    other = PromptClassifier(3, method="test_norm_tune", backbone="vit_tiny", img_size=32, backbone_overrides=wider)
    with pytest.raises(DeltaMismatchError, match="backbone architecture differs: mlp_dim: 64 in the delta vs 128 here"):
        load_delta(other, path)
