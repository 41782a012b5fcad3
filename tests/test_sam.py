"""SAM's ViT image encoder (``monai_prompt.backbones.sam``) against the official one, its weights, and the PEFT
methods on it.

The reference is ``ImageEncoderViT`` of the PyPI ``segment-anything`` 1.0 package, run from its source: the
package ``__init__`` imports torchvision (which it does not declare), so ``modeling/common.py`` and
``modeling/image_encoder.py`` are loaded as standalone modules under a stub package. The tests that need it skip,
naming the install command, when it is absent (the ``test`` extra installs it).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
import types
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.bundle import ConfigParser

from bundle_support import copy_bundle, tiny_overrides
from grid_support import SAM_TINY
from monai_prompt.backbones import CheckpointError, build_backbone
from monai_prompt.backbones.sam import SAM_KEY, SAM_PRESETS, SAMImageEncoder, build_sam, sam_from_pretrained
from monai_prompt.backbones.tinyvit import LayerNorm2d
from monai_prompt.bundle_gen.specs import BUNDLE_SPECS
from monai_prompt.nets import FPTClassifier
from monai_prompt.nets.classifier import PromptClassifier
from monai_prompt.nets.unetr import PromptUNETR
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
DISTRIBUTION = "segment-anything"
NO_PACKAGE = f"the {DISTRIBUTION} package is not installed (pip install --no-deps {DISTRIBUTION}==1.0)"
#: a tiny official encoder: an 8 x 8 patch grid, windows of 3 (padded to 9), global attention in blocks 1 and 3.
TINY = {"img_size": 64, **SAM_TINY}
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
def official() -> types.ModuleType:
    """The package's ``modeling/image_encoder.py`` (with its ``common.py``), loaded from the installed files."""
    try:
        distribution = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(NO_PACKAGE)
    folder = Path(distribution.locate_file("segment_anything/modeling"))
    package = types.ModuleType("official_sam")
    package.__path__ = [str(folder)]
    modules = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "official_sam", package)
        for name in ("common", "image_encoder"):  # image_encoder does `from .common import ...`
            spec = importlib.util.spec_from_file_location(f"official_sam.{name}", folder / f"{name}.py")
            modules[name] = importlib.util.module_from_spec(spec)
            patch.setitem(sys.modules, spec.name, modules[name])
            spec.loader.exec_module(modules[name])
    return modules["image_encoder"]


def official_encoder(module: types.ModuleType, seed: int = 0, **changes) -> nn.Module:
    """A tiny official ``ImageEncoderViT`` as ``build_sam`` configures SAM's (LayerNorm eps 1e-6, relative
    positions), every tensor random (the position tables are zero-initialised by default)."""
    settings = {**TINY, **changes}
    encoder = module.ImageEncoderViT(
        in_chans=settings.pop("in_chans", 3),
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        **settings,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in encoder.state_dict().values():
            tensor.copy_(0.3 * torch.randn(tensor.shape, generator=generator))
    return encoder.eval()


def ours_from(reference: nn.Module, **changes) -> SAMImageEncoder:
    """Our encoder of ``reference``'s tiny architecture, its weights loaded strictly."""
    settings = {**TINY, **changes}
    encoder = SAMImageEncoder(**settings)
    encoder.load_state_dict(reference.state_dict(), strict=True)
    return encoder.eval()


def neck_and_tokens(reference: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official encoder's output and its tokens before the neck (a hook on the neck's input)."""
    seen = []
    handle = reference.neck.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    with torch.no_grad():
        out = reference(x)
    handle.remove()
    return out, seen[0].permute(0, 2, 3, 1)


def save_whole_sam(reference: nn.Module, path: Path) -> Path:
    """``reference`` saved as a whole SAM/MedSAM checkpoint: ``image_encoder.*`` plus other parts' keys."""
    state = {f"image_encoder.{k}": v for k, v in reference.state_dict().items()}
    torch.save({**state, "mask_decoder.x": torch.zeros(2), "prompt_encoder.y": torch.ones(1)}, path)
    return path


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# --------------------------------------------------------------------------------------------------------
# The encoder against the official ImageEncoderViT.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sdpa", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_and_tokens_match_official(official, sdpa, dtype):
    reference = official_encoder(official).to(dtype)
    ours = ours_from(reference).to(dtype)
    ours.set_sdpa(sdpa)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=dtype)
    expected, expected_tokens = neck_and_tokens(reference, x)
    with torch.no_grad():
        got, tokens = ours(x), ours.forward_tokens(x)
    assert got.shape == (2, 16, 8, 8) and tokens.shape == (2, 8, 8, 32)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12  # measured: ~1e-6 (float32), ~1e-15 (float64)
    assert max_diff(got, expected) < tolerance and max_diff(tokens, expected_tokens) < tolerance


@pytest.mark.parametrize("size", [32, 96])
@pytest.mark.parametrize("sdpa", [False, True])
def test_resized_input_matches_official_at_that_size(official, tmp_path, size, sdpa):
    """Ours, built by ``auto`` at another size from the 64 px weights, equals the official encoder built at that
    size with the SAM ecosystem's resize: the absolute embedding bilinearly (SAMed's and SAM-Med2D's
    ``interpolate_state_dict``) and the global blocks' tables left as they are, for the official ``get_rel_pos``
    to interpolate in the forward."""
    source = official_encoder(official)
    weights = save_whole_sam(source, tmp_path / "sam.pth")
    ours = build_backbone("auto", weights, img_size=size).double().eval()
    ours.set_sdpa(sdpa)
    reference = official_encoder(official, img_size=size).double()
    state = source.double().state_dict()
    pos = state.pop("pos_embed").permute(0, 3, 1, 2)
    grid = size // TINY["patch_size"]
    state["pos_embed"] = F.interpolate(pos, (grid, grid), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    tables = {k: state.pop(k) for k in list(state) if k.startswith(("blocks.1.attn.rel_pos", "blocks.3.attn.rel_pos"))}
    reference.load_state_dict(state, strict=False)
    for key, table in tables.items():
        reference.get_submodule(key.rsplit(".", 1)[0]).register_parameter(key.rsplit(".", 1)[1], nn.Parameter(table))
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected, expected_tokens = neck_and_tokens(reference, x)
    with torch.no_grad():
        got, tokens = ours(x), ours.forward_tokens(x)
    assert got.shape == (2, 16, grid, grid)  # ours stores the resized tables in float32, the file's dtype
    assert max_diff(got, expected) < 1e-6 and max_diff(tokens, expected_tokens) < 1e-6


def test_state_dict_keys_and_shapes_match_official_presets(official):
    builders = {
        "sam_vit_b": (768, 12, 12, [2, 5, 8, 11]),
        "sam_vit_l": (1024, 24, 16, [5, 11, 17, 23]),
        "sam_vit_h": (1280, 32, 16, [7, 15, 23, 31]),
    }
    for name, (width, depth, heads, global_blocks) in builders.items():
        with torch.device("meta"):  # shapes only: segment_anything.build_sam's _build_sam encoder arguments
            reference = official.ImageEncoderViT(
                depth=depth,
                embed_dim=width,
                img_size=1024,
                mlp_ratio=4,
                norm_layer=partial(nn.LayerNorm, eps=1e-6),
                num_heads=heads,
                patch_size=16,
                qkv_bias=True,
                use_rel_pos=True,
                global_attn_indexes=global_blocks,
                window_size=14,
                out_chans=256,
            )
            ours = build_sam(name)
        shapes = {k: v.shape for k, v in ours.state_dict().items()}
        assert shapes == {k: v.shape for k, v in reference.state_dict().items()}
        assert all(SAM_KEY.match(k) for k in shapes)
    count = sum(p.numel() for p in build_sam("sam_vit_b").parameters())
    assert count == 89_670_912  # SAM ViT-B's image encoder (MedSAM's: the same architecture)


# --------------------------------------------------------------------------------------------------------
# Weights: backbone="auto" reads a whole SAM/MedSAM checkpoint or the encoder alone.
# --------------------------------------------------------------------------------------------------------


def test_auto_recognises_whole_sam_checkpoint_and_reads_the_architecture(official, tmp_path):
    weights = save_whole_sam(official_encoder(official), tmp_path / "medsam_like.pth")
    encoder = build_backbone("auto", weights, img_size=64)
    assert encoder.family == "sam"
    expected = {**TINY, "img_size": [64, 64], "global_attn_indexes": [1, 3], "in_channels": 3, "mlp_ratio": 4.0}
    assert {k: encoder.config[k] for k in expected} == expected
    _, report = sam_from_pretrained(weights)
    assert report.inferred["num_heads"] == (2, "embed_dim / rel_pos_h width 16")
    assert report.ignored == {"2 keys": "not the image encoder (mask_decoder, prompt_encoder)"}
    assert not report.adapted and len(report.loaded) == len(encoder.state_dict())


def test_encoder_alone_and_global_blocks_from_the_table_sizes(official, tmp_path):
    reference = official_encoder(official, global_attn_indexes=(0,), window_size=2)
    torch.save(reference.state_dict(), tmp_path / "encoder.pth")
    encoder = build_backbone("auto", tmp_path / "encoder.pth", img_size=64)
    assert encoder.config["window_size"] == 2 and encoder.config["global_attn_indexes"] == [0]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert max_diff(encoder.eval()(x), reference(x)) < 1e-5


def test_grey_input_sums_the_patch_kernel(official, tmp_path):
    reference = official_encoder(official)
    weights = save_whole_sam(reference, tmp_path / "sam.pth")
    grey = build_backbone("auto", weights, in_channels=1, img_size=64).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert max_diff(grey(x), reference(x.repeat(1, 3, 1, 1))) < 1e-5


def test_contradicting_overrides_and_wrong_architecture_are_named(official, tmp_path):
    weights = save_whole_sam(official_encoder(official), tmp_path / "sam.pth")
    with pytest.raises(ValueError, match=r"num_heads=4 contradicts the checkpoint: .* 2 heads"):
        build_backbone("auto", weights, img_size=64, overrides={"num_heads": 4})
    with pytest.raises(ValueError, match=r"unknown SAM encoder overrides \['hidden_size'\]"):
        build_backbone("auto", weights, overrides={"hidden_size": 8})
    with pytest.raises(ValueError, match=r"sam\.pth: not a SAM image encoder of this architecture"):
        build_backbone("sam_vit_b", weights, img_size=64)
    with pytest.raises(ValueError, match="square 2D images"):
        build_sam("sam_vit_b", img_size=(32, 32, 32), spatial_dims=3)
    with pytest.raises(ValueError, match=r"resize the images to img_size \[64, 64\]"):
        build_backbone("auto", weights, img_size=64)(torch.zeros(1, 3, 32, 32))


def test_wrapped_checkpoints_load_and_bad_sizes_extra_layers_or_foreign_files_name_the_fix(tmp_path):
    source = build_sam("sam_vit_b", img_size=64, **SAM_TINY)
    state = {f"module.image_encoder.{k}": v for k, v in source.state_dict().items()}
    torch.save({"model": {**state, "module.mask_decoder.x": torch.zeros(2)}}, tmp_path / "dp.pth")
    encoder = build_backbone("auto", tmp_path / "dp.pth", img_size=64)
    assert isinstance(encoder, SAMImageEncoder) and torch.equal(encoder.pos_embed, source.pos_embed)
    torch.save({**state, "module.image_encoder.blocks.0.Adapter.spatial.0.weight": torch.zeros(2)}, tmp_path / "a.pth")
    with pytest.raises(CheckpointError, match=r"1 checkpoint keys the model lacks: blocks\.0\.Adapter.*SAM-Med2D.*"
                       r"pretrained_strict=False\)\.$"):
        build_backbone("auto", tmp_path / "a.pth", img_size=64)
    loose = build_backbone("auto", tmp_path / "a.pth", img_size=64, strict=False)
    assert torch.equal(loose.pos_embed, source.pos_embed)
    with pytest.raises(CheckpointError, match=r"\d+ tensors differ in shape .* and \d+ more; .* backbone='auto'"):
        build_backbone("sam_vit_b", tmp_path / "dp.pth", img_size=64)
    with pytest.raises(ValueError, match=r"input 60 is not a multiple of its patch 8 .* use img_size 56 or 64\.$"):
        build_backbone("auto", tmp_path / "dp.pth", img_size=60)
    vit_like = {"patch_embed.proj.weight": torch.zeros(8, 3, 4, 4), "pos_embed": torch.zeros(1, 5, 8)}
    torch.save(vit_like, tmp_path / "v.pth")
    with pytest.raises(CheckpointError, match=r"v\.pth: not a SAM image encoder: no prefix holds all of"):
        sam_from_pretrained(tmp_path / "v.pth")


def test_transformers_sam_folder_loads_through_auto_and_matches_its_vision_encoder(tmp_path):
    """The Hub's SAM and MedSAM in transformers' layout (``SamModel``: ``vision_encoder.*``; ``facebook/sam-vit-base``,
    ``wanglab/medsam-vit-base``), here saved sharded: ``auto`` renames the keys to segment_anything's, reads the
    architecture off them, and the neck map equals transformers' vision encoder."""
    from transformers import SamConfig, SamModel, SamVisionConfig

    vision = SamVisionConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, output_channels=16,
                             image_size=64, patch_size=8, window_size=3, global_attn_indexes=[1, 3], mlp_dim=128)
    torch.manual_seed(0)
    hf = SamModel(SamConfig(vision_config=vision.to_dict())).eval()
    with torch.no_grad():
        for name, parameter in hf.vision_encoder.named_parameters():
            parameter.add_(torch.randn_like(parameter) * (0.1 if "layer_norm" in name else 0.3))
    hf.save_pretrained(tmp_path / "sam", max_shard_size="100KB")
    assert (tmp_path / "sam" / "model.safetensors.index.json").is_file()
    encoder = build_backbone("auto", tmp_path / "sam", img_size=64).eval()
    assert isinstance(encoder, SAMImageEncoder) and encoder.config["global_attn_indexes"] == [1, 3]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert max_diff(encoder(x), hf.vision_encoder(pixel_values=x).last_hidden_state) < 1e-5


def test_half_precision_checkpoint_is_resized_in_the_models_precision(tmp_path):
    """A float16 SAM file loads at another input size as the same values stored in float32: the position embedding
    and the global blocks' relative tables are resized in the model's float32, not rounded back to float16."""
    from grid_support import randomise

    state = {k: v.half() for k, v in randomise(build_sam("sam_vit_b", img_size=64, **SAM_TINY)).state_dict().items()}
    torch.save(state, tmp_path / "half.pth")
    torch.save({k: v.float() for k, v in state.items()}, tmp_path / "float.pth")
    expected, got = (build_backbone("auto", tmp_path / name, img_size=48) for name in ("float.pth", "half.pth"))
    assert all(torch.equal(got.state_dict()[k], v) for k, v in expected.state_dict().items())


# --------------------------------------------------------------------------------------------------------
# PEFT methods on the SAM family, in a classifier built with backbone="auto".
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sam_weights(official, tmp_path_factory) -> Path:
    return save_whole_sam(official_encoder(official), tmp_path_factory.mktemp("sam") / "sam.pth")


def make_model(method: str, weights: Path) -> PromptClassifier:
    return PromptClassifier(
        CLASSES, method, SUPPORTED.get(method), backbone="auto", pretrained=str(weights), img_size=IMG
    )


def expected_trainable(method: str, model: PromptClassifier) -> set[str]:
    """What each method trains on the SAM encoder, spelled out (the head always trains)."""
    blocks = [f"blocks.{i}" for i in range(TINY["depth"])]
    backbone = {n for n, _ in model.backbone.named_parameters() if SAM_KEY.match(n)}
    linears = ("attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2")
    modules = dict(model.backbone.named_modules())
    ssf_hosts = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.LayerNorm, nn.Conv2d, LayerNorm2d))]
    names = {
        "full": backbone,
        "linear": set(),
        "lora": {f"{b}.{path}.lora_{m}" for b in blocks for path in linears for m in "AB"},
        "adapter": {f"{b}.parallel.{p}_proj.{w}" for b in blocks for p in ("down", "up") for w in ("weight", "bias")},
        "bitfit": {n for n in backbone if n.endswith(".bias")},  # patch embed, LayerNorms, linears, neck norms
        "ssf": {f"{n}.ssf_{k}" for n in ssf_hosts for k in ("scale", "shift")},  # patch embed, blocks, neck
        "vpt": {f"{b}.prompts" for b in blocks},  # deep: one prompt set per block, windowed and global
    }[method]
    return {f"backbone.{n}" for n in names} | {"head.weight", "head.bias"}


@pytest.mark.parametrize("method", list(SUPPORTED))
def test_method_trains_exactly_intended_parameters(method, sam_weights):
    model = make_model(method, sam_weights).train()
    assert model.backbone.family == "sam" and model.backbone.img_size == [IMG, IMG]
    perturb_trainable(model)
    expected = expected_trainable(method, model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert_adamw_trains_exactly(model, expected)


@pytest.mark.parametrize("method", list(SUPPORTED))
def test_delta_round_trip(method, sam_weights, tmp_path):
    model, fresh = make_model(method, sam_weights), make_model(method, sam_weights)
    assert_delta_round_trip(model.eval(), fresh.eval(), tmp_path / f"{method}.pt")


@pytest.mark.parametrize("method", ["full", "adapter", "vpt"])
def test_checkpointing_and_sdpa_match_plain_path(method, sam_weights):
    model = make_model(method, sam_weights).double().train()
    perturb_trainable(model)
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert_efficiency_paths_match(model, model.backbone, x)


@pytest.mark.parametrize("method", ["lora", "ssf"])
def test_merge_equals_unmerged_and_torchscript_matches(method, sam_weights):
    model = make_model(method, sam_weights).eval()
    perturb_trainable(model)
    x = torch.randn(2, 3, IMG, IMG)
    tuned = model(x)
    torch.testing.assert_close(torch.jit.script(model)(x), tuned, rtol=0, atol=1e-6)
    merge_and_unload(model)
    assert not any(isinstance(m, MergeableLayer) for m in model.modules())
    torch.testing.assert_close(model(x), tuned, rtol=1e-5, atol=1e-5)


def test_lora_parameter_count_at_sam_vit_b_size():
    net = PromptClassifier(CLASSES, "lora", backbone="sam_vit_b", img_size=1024)
    trained = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert trained == 256 * CLASSES + CLASSES + 12 * 8 * (768 + 3 * 768)  # head + rank 8 on qkv of 12 blocks


@pytest.mark.parametrize("method", ["fpt", "fptplus"])
def test_fpt_in_a_prompt_classifier_names_the_fpt_network(method, sam_weights):
    with pytest.raises(ValueError, match=rf"method '{method}' is FPT, not a method inside a backbone: build it with"):
        make_model(method, sam_weights)


@pytest.mark.parametrize("variant", ["fpt", "fptplus"])
def test_fpt_lpm_from_a_sam_checkpoint_through_auto(variant, sam_weights):
    """``backbone="auto"`` reads the SAM encoder off a whole SAM checkpoint; the LPM holds its weights, frozen, and
    taps its global-attention blocks (all for FPT, the last half for FPT+)."""
    net = FPTClassifier(CLASSES, variant, {"side_img_size": 16}, backbone="auto", pretrained=str(sam_weights),
                        img_size=IMG)
    reference = sam_from_pretrained(sam_weights, img_size=IMG)[0]
    assert net.lpm.family == "sam" and net.lpm.taps == ([1, 3] if variant == "fpt" else [3])
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in net.lpm.state_dict().items())
    assert not any(p.requires_grad for p in net.lpm.parameters())
    assert net(torch.rand(2, 3, IMG, IMG)).shape == (2, CLASSES)


def test_promptunetr_sends_the_family_to_its_network(sam_weights):
    with pytest.raises(ValueError, match=r"decodes a plain ViT.*'sam' family.*PromptSAMUNETR"):
        PromptUNETR(3, 2, IMG, "lora", backbone="auto", pretrained=str(sam_weights), spatial_dims=2)


def test_presets_are_registered():
    assert set(SAM_PRESETS) == {"sam_vit_b", "sam_vit_l", "sam_vit_h"}
    assert build_backbone("sam_vit_b", img_size=64, overrides={"depth": 2, "global_attn_indexes": (1,)}).family == "sam"


# --------------------------------------------------------------------------------------------------------
# Bundles take it with --backbone auto --pretrained PATH.
# --------------------------------------------------------------------------------------------------------


def sam_bundle_overrides(dataset_dir: Path, weights: Path) -> dict:
    """The tiny bundle overrides with ``backbone="auto"`` and a whole-SAM-style checkpoint as ``--pretrained``."""
    overrides = tiny_overrides(BUNDLE_SPECS["lora_classification"], dataset_dir, weights)
    return {**overrides, "backbone": "auto", "backbone_overrides": {}}


@pytest.mark.parametrize("method", ["lora", "ssf", "vpt", "ept", "dvpt"])
def test_bundle_network_def_builds_sam_from_auto(method, official, sam_weights, tmp_path):
    overrides = sam_bundle_overrides(tmp_path, sam_weights)
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / f"{method}_classification" / "configs" / "train.json"))
    parser.update({k: overrides[k] for k in ("backbone", "backbone_overrides", "img_size", "pretrained")})
    parser.update({"num_classes": 3})  # else it follows the datalist, which this test does not write
    network = parser.get_parsed_content("network_def")
    assert network.backbone.family == "sam" and network.backbone.peft_method == method
    expected = official_encoder(official).state_dict()
    assert torch.equal(network.backbone.state_dict()["blocks.0.attn.qkv.weight"], expected["blocks.0.attn.qkv.weight"])


@pytest.mark.slow
def test_lora_bundle_trains_and_exports_on_sam(tiny, sam_weights, tmp_path):
    bundle = copy_bundle("lora_classification", tmp_path)
    overrides = sam_bundle_overrides(tiny["data"], sam_weights)
    run_bundle(bundle, ["train.json"], "train", quiet=True, **overrides, **{"train#trainer#max_epochs": 1})
    delta = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert delta["peft"]["backbone"]["config"]["family"] == "sam"
    assert all("lora_" in k or k.startswith("head.") for k in delta["model"] if k not in IDENTITY_KEYS)
    report = export_bundle(bundle, overrides=overrides)
    assert report.merged and report.max_abs_diff < 1e-4
