"""The weights users have: DINOv2 (with/without registers), CLIP, MONAI ViTAutoEnc/UNETR, built by vit_from_pretrained.

References are independent implementations: random transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel`` /
``CLIPVisionModel`` saved with ``save_pretrained`` (their final hidden states, also at another input size through
their own ``interpolate_pos_encoding``), MONAI's ``ViTAutoEnc`` and ``UNETR``. The original DINOv2, timm and
open_clip layouts are the transformers weights renamed independently here, as those libraries store them.
"""

import json
import re

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import UNETR, ViTAutoEnc
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
)

from bundle_support import copy_bundle, write_training_record
from monai_prompt.backbones import (
    CheckpointError,
    PromptableViT,
    build_vit,
    load_pretrained,
    vit_from_pretrained,
)
from monai_prompt.backbones.auto import infer_vit_config
from monai_prompt.backbones.pretrained import open_checkpoint
from monai_prompt.nets import PromptClassifier
from monai_prompt.peft import apply_method, method_names, save_delta
from monai_prompt.peft.ept import resize_ept_prompt
from monai_prompt.peft.registry import get_method
from monai_prompt.tools.export import export_bundle

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 28, "patch_size": 7}
TOL = 1e-5


def randomise(model: torch.nn.Module, *parts: str) -> torch.nn.Module:
    """Normal-initialise the parameters whose names contain one of ``parts`` (tokens, positions, LayerScale,
    norms), so that a wrong fold, order or scale cannot hide behind zeros and ones."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(part in name for part in parts):
                param.normal_()
    return model.eval()


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory):
    """``{registers: (directory, model)}`` for a random Dinov2Model and a Dinov2WithRegistersModel (2 registers)."""
    torch.manual_seed(0)
    out = {}
    for registers in (0, 2):
        if registers:
            model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**TINY, num_register_tokens=registers))
        else:
            model = Dinov2Model(Dinov2Config(**TINY))
        randomise(model, "cls_token", "position_embeddings", "register_tokens", "mask_token", "lambda1", "norm")
        path = tmp_path_factory.mktemp("dinov2") / f"reg{registers}"
        model.save_pretrained(path)
        out[registers] = path, model
    return out


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A random CLIPVisionModel (QuickGELU, pre-norm, no patch bias) saved with save_pretrained."""
    torch.manual_seed(1)
    model = CLIPVisionModel(CLIPVisionConfig(**TINY, intermediate_size=64))
    randomise(model, "class_embedding", "position_embedding", "layrnorm", "layernorm")
    path = tmp_path_factory.mktemp("clip") / "vision"
    model.save_pretrained(path)
    return path, model


def hf_tokens(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The reference's final normed tokens: Dinov2's ``last_hidden_state``; for CLIP, whose ``last_hidden_state`` is
    before ``post_layernorm`` (applied to the pooled CLS only), ``post_layernorm`` of every token."""
    with torch.no_grad():
        if isinstance(model, CLIPVisionModel):
            out = model(pixel_values=x, interpolate_pos_encoding=True)
            return model.post_layernorm(out.last_hidden_state)
        return model(pixel_values=x).last_hidden_state


def max_diff(vit: PromptableViT, reference: torch.nn.Module, size: int) -> float:
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        return (vit.eval().forward_tokens(x)[0] - hf_tokens(reference, x)).abs().max().item()


@pytest.mark.parametrize("registers", [0, 2])
@pytest.mark.parametrize("size", [28, 42, 21])
def test_dinov2_matches_transformers(dinov2, registers, size):
    """Same final hidden states at the config's size (grid 4) and resized (grid 6 up, 3 down): transformers'
    ``interpolate_pos_encoding`` is bicubic at the output size without antialias for Dinov2 and with antialias for
    Dinov2WithRegisters; the resize happens once at load time here."""
    path, reference = dinov2[registers]
    vit, report = vit_from_pretrained(path, img_size=size)
    assert max_diff(vit, reference, size) < TOL
    assert report.inferred["architecture"][0] == ("dinov2_with_registers" if registers else "dinov2")
    assert report.inferred["num_registers"] == (registers, "weights")
    assert report.inferred["layer_scale"] == (True, "weights")
    assert report.inferred["num_heads"] == (4, "config.json num_attention_heads")
    assert report.inferred["layer_norm_eps"] == (1e-6, "config.json layer_norm_eps")
    assert report.inferred["patch_size"] == ((7, 7), "weights") and report.inferred["source_grid"][0] == (4, 4)
    assert not report.missing and not report.unexpected and list(report.ignored) == ["embeddings.mask_token"]


def test_register_resize_needs_antialias_and_forward_strips_registers(dinov2):
    """Without antialias the resized registers model drifts from transformers (the quirk is matched, not
    luck); ``forward`` returns MONAI's ``[CLS, patches]`` with the two register rows removed."""
    path, reference = dinov2[2]
    checkpoint = open_checkpoint(path)
    kwargs, _ = infer_vit_config(checkpoint, img_size=42)
    plain = PromptableViT(**kwargs)
    load_pretrained(plain, checkpoint, antialias=False)
    assert max_diff(plain, reference, 42) > 1e-3
    vit, _ = vit_from_pretrained(path)
    x = torch.randn(2, 3, 28, 28)
    tokens, hidden = vit.forward_tokens(x)
    stripped, stripped_hidden = vit(x)
    assert tokens.shape[1] == 1 + 2 + 16 and stripped.shape[1] == 1 + 16 and len(stripped_hidden) == 2
    torch.testing.assert_close(stripped, torch.cat((tokens[:, :1], tokens[:, 3:]), dim=1), rtol=0, atol=0)
    torch.testing.assert_close(stripped_hidden[0], torch.cat((hidden[0][:, :1], hidden[0][:, 3:]), 1), rtol=0, atol=0)


@pytest.mark.parametrize("size", [28, 42, 21])
def test_clip_matches_transformers(clip, size):
    """Pre-norm, QuickGELU and the CLS class embedding: the last block's output is transformers'
    ``last_hidden_state``, the final norm is its ``post_layernorm`` and CLS its ``pooler_output``."""
    path, reference = clip
    vit, report = vit_from_pretrained(path, img_size=size)
    assert max_diff(vit, reference, size) < TOL
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = reference(pixel_values=x, interpolate_pos_encoding=True)
        hidden = vit.forward_tokens(x)[1]
    assert (hidden[-1] - out.last_hidden_state).abs().max() < TOL
    assert (vit.forward_features(x) - out.pooler_output).abs().max() < TOL
    assert report.inferred["pre_norm"] == (True, "weights")
    assert report.inferred["act"] == ("quick_gelu", "config.json hidden_act")
    assert "patch embedding bias set to 0 (the checkpoint's patch convolution has none)" in report.adapted
    assert not report.missing and not report.unexpected


def test_clip_two_tower_checkpoint(tmp_path):
    """A whole CLIPModel: the vision_config is read, the projection and temperature are ignored with a reason and
    the text tower is unexpected; the vision tower equals transformers'."""
    torch.manual_seed(2)
    vision = {**TINY, "intermediate_size": 64}
    text = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64}
    model = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16))
    randomise(model, "class_embedding", "vision_model.embeddings.position_embedding", "layrnorm")
    model.save_pretrained(tmp_path / "clip")
    vit, report = vit_from_pretrained(tmp_path / "clip")
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        expected = model.vision_model(pixel_values=x).pooler_output
    assert (vit.eval().forward_features(x) - expected).abs().max() < TOL
    assert report.inferred["num_heads"] == (4, "config.json num_attention_heads")
    assert set(report.ignored) == {"visual_projection.weight", "logit_scale"}
    assert report.unexpected and all(k.startswith("text_") for k in report.unexpected)


def clip_to_open_clip(hf_state: dict) -> dict:
    """Independent rename of transformers CLIP vision keys to open_clip's ``visual.*`` (OpenAI CLIP layout)."""
    top = {
        "embeddings.class_embedding": "class_embedding",
        "embeddings.patch_embedding.weight": "conv1.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "pre_layrnorm.weight": "ln_pre.weight",
        "pre_layrnorm.bias": "ln_pre.bias",
        "post_layernorm.weight": "ln_post.weight",
        "post_layernorm.bias": "ln_post.bias",
    }
    parts = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "self_attn.out_proj": "attn.out_proj",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
    }
    out = {}
    for key, value in hf_state.items():
        match = re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
        if key in top:
            out[f"visual.{top[key]}"] = value
        elif match and match.group(2) in parts:
            i, part, kind = match.groups()
            out[f"visual.transformer.resblocks.{i}.{parts[part]}.{kind}"] = value
    for i in range(2):
        for kind in ("weight", "bias"):
            qkv = [hf_state[f"encoder.layers.{i}.self_attn.{n}_proj.{kind}"] for n in "qkv"]
            out[f"visual.transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(qkv)
    # the projection and a text tower in the same file (its blocks are also transformer.resblocks, without prefix)
    out["visual.proj"] = torch.randn(32, 16)
    out["transformer.resblocks.0.attn.in_proj_weight"] = torch.randn(96, 32)
    out["ln_final.weight"] = torch.ones(32)
    return out


def test_open_clip_layout(clip, tmp_path):
    """open_clip ``visual.*`` weights, bare (QuickGELU assumed: OpenAI CLIP; heads given) and in a directory with
    ``open_clip_config.json`` (heads from width / head_width, activation from ``quick_gelu``)."""
    path, reference = clip
    state = clip_to_open_clip(load_file(path / "model.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "openai.pt")
    with pytest.raises(CheckpointError, match=r"openai.pt: the number of attention heads .* pass num_heads"):
        vit_from_pretrained(tmp_path / "openai.pt")
    vit, report = vit_from_pretrained(tmp_path / "openai.pt", num_heads=4)
    assert max_diff(vit, reference, 28) < TOL
    assert report.layout == "open_clip" and report.inferred["act"][0] == "quick_gelu"
    assert report.inferred["act"][1].startswith("assumed") and report.inferred["layer_norm_eps"][0] == 1e-5
    assert "visual.proj" in report.ignored and report.unexpected == [
        "ln_final.weight",
        *[k for k in sorted(state) if k.startswith("transformer.")],
    ]
    folder = tmp_path / "hub"
    folder.mkdir()
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    config = {
        "model_cfg": {
            "quick_gelu": True,
            "vision_cfg": {"image_size": 28, "patch_size": 7, "width": 32, "head_width": 8, "layers": 2},
        }
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    vit, report = vit_from_pretrained(folder, img_size=42)
    assert max_diff(vit, reference, 42) < TOL
    assert report.inferred["num_heads"] == (4, "open_clip_config.json num_attention_heads")
    assert report.inferred["act"] == ("quick_gelu", "open_clip_config.json hidden_act")


def dinov2_to_original(hf_state: dict, timm: bool = False) -> dict:
    """Independent rename of transformers DINOv2 keys to the original release's (facebookresearch/dinov2), or with
    ``timm`` to timm's: ``reg_token``, and (timm's ``_convert_dinov2``) the CLS position folded into ``cls_token``,
    a position embedding without CLS slot and no mask token."""
    top = {
        "embeddings.cls_token": "cls_token",
        "embeddings.mask_token": "mask_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.register_tokens": "register_tokens",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    parts = {
        "norm1": "norm1",
        "norm2": "norm2",
        "attention.output.dense": "attn.proj",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    out = {}
    for key, value in hf_state.items():
        match = re.match(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$", key)
        if key in top:
            out[top[key]] = value
        elif match and match.group(3) == "lambda1":
            out[f"blocks.{match.group(1)}.ls{match.group(2)[-1]}.gamma"] = value
        elif match and match.group(2) in parts:
            out[f"blocks.{match.group(1)}.{parts[match.group(2)]}.{match.group(3)}"] = value
    for i in range(2):
        for kind in ("weight", "bias"):
            parts_qkv = [
                hf_state[f"encoder.layer.{i}.attention.attention.{n}.{kind}"] for n in ("query", "key", "value")
            ]
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts_qkv)
    if timm:
        out.pop("mask_token")
        if "register_tokens" in out:
            out["reg_token"] = out.pop("register_tokens")
            out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
            out["pos_embed"] = out["pos_embed"][:, 1:]
    return out


@pytest.mark.parametrize("timm", [False, True])
@pytest.mark.parametrize("registers", [0, 2])
def test_original_and_timm_dinov2_layouts(dinov2, tmp_path, timm, registers):
    """The original DINOv2 ``.pth`` and timm ``.safetensors`` of the same weights give transformers' tokens
    (also resized); without config the heads are given and the eps / activation assumed (and reported so)."""
    path, reference = dinov2[registers]
    state = dinov2_to_original(load_file(path / "model.safetensors"), timm)
    file = tmp_path / ("timm.safetensors" if timm else "dinov2.pth")
    save_file(state, file) if timm else torch.save(state, file)
    for size in (28, 42):
        vit, report = vit_from_pretrained(file, num_heads=4, img_size=size)
        assert max_diff(vit, reference, size) < TOL
    assert report.layout == "timm" and report.inferred["num_registers"][0] == registers
    assert report.inferred["layer_norm_eps"] == (1e-6, "assumed: timm / DINO / DINOv2 / MAE defaults")
    assert list(report.ignored) == ([] if timm else ["mask_token"]) and not report.unexpected


def test_state_dict_only_infers_shapes_but_asks_for_heads(dinov2, tmp_path):
    """HF DINOv2 weights without config.json: width, depth, MLP, patch, grid, registers come from the shapes; the
    heads must be given, eps and activation are the Dinov2Config defaults, marked as assumed."""
    path, reference = dinov2[2]
    file = tmp_path / "weights.safetensors"
    file.write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"weights.safetensors: the number of attention heads .* = 0\."):
        vit_from_pretrained(file)
    vit, report = vit_from_pretrained(file, num_heads=4)
    assert max_diff(vit, reference, 28) < TOL
    inferred = report.inferred
    assert inferred["architecture"] == ("dinov2_with_registers", "keys")
    assert inferred["num_heads"] == (4, "override")
    assert [inferred[k] for k in ("hidden_size", "num_layers", "mlp_dim", "num_registers")] == [
        (32, "weights"),
        (2, "weights"),
        (128, "weights"),
        (2, "weights"),
    ]
    assert inferred["source_grid"] == ((4, 4), "position embeddings")
    assert inferred["layer_norm_eps"] == (1e-6, "assumed: transformers Dinov2Config defaults")
    assert "assumed" in str(report) and "num_heads = 4 (override)" in str(report)
    with pytest.raises(ValueError, match=r"unknown vit_from_pretrained overrides \['hidden_size'\]"):
        vit_from_pretrained(file, num_heads=4, hidden_size=64)


def test_plain_model_refuses_dinov2_parts(dinov2):
    """Loading DINOv2 into a ViT built without LayerScale/registers is an error naming the fix, not a silent
    half-load."""
    path, _ = dinov2[2]
    vit = build_vit("vit_tiny", img_size=28, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=128, patch_size=7)
    lacks = (
        r"reg2: the checkpoint has 2 register tokens \(num_registers=2\), LayerScale \(layer_scale=True\) "
        r"that the model"
    )
    with pytest.raises(CheckpointError, match=lacks):
        load_pretrained(vit, path)


def test_gated_mlp_is_refused(dinov2, tmp_path):
    state = dinov2_to_original(load_file(dinov2[0][0] / "model.safetensors"))
    state["blocks.0.mlp.w12.weight"] = state.pop("blocks.0.mlp.fc1.weight")
    torch.save(state, tmp_path / "giant.pth")
    with pytest.raises(CheckpointError, match=r"giant.pth: the blocks have a gated \(SwiGLU\) MLP"):
        vit_from_pretrained(tmp_path / "giant.pth", num_heads=4)


def test_foreign_networks_and_impossible_settings_name_the_fix(tmp_path):
    """A hierarchical network, 3D weights for a 2D model and heads that do not divide the width are refused with the
    file and the fix, not with a deep shape error."""
    swin = {"patch_embed.proj.weight": torch.zeros(8, 3, 4, 4), "layers.0.blocks.0.attn.qkv.weight": torch.zeros(24, 8)}
    torch.save(swin, tmp_path / "swin.pth")
    with pytest.raises(CheckpointError, match=r"swin\.pth: no transformer blocks of a plain ViT .*\(Swin, ConvNeXt"):
        vit_from_pretrained(tmp_path / "swin.pth", num_heads=2)
    volume = build_vit("vit_tiny", spatial_dims=3, img_size=16, patch_size=8, **MONAI_TINY)
    torch.save(volume.state_dict(), tmp_path / "3d.pt")
    with pytest.raises(CheckpointError, match=r"3d\.pt: 3D weights .* cannot make a 2D model .* spatial_dims=3\.$"):
        vit_from_pretrained(tmp_path / "3d.pt", spatial_dims=2, img_size=16)
    with pytest.raises(CheckpointError, match=r"3d\.pt: num_heads=3 \(override\) does not divide the width 32"):
        vit_from_pretrained(tmp_path / "3d.pt", num_heads=3)
    with pytest.raises(CheckpointError, match=r"3d\.pt: patch_size=16 but the weights' patch is \(8, 8, 8\)"):
        vit_from_pretrained(tmp_path / "3d.pt", patch_size=16, img_size=32)
    with pytest.raises(CheckpointError, match=r"another width.*: build the model from the checkpoint with backbone="):
        load_pretrained(build_vit("vit_tiny", spatial_dims=3, img_size=16, patch_size=8), tmp_path / "3d.pt")


MONAI_TINY = {"hidden_size": 32, "mlp_dim": 64, "num_heads": 4}


def test_monai_vitautoenc_weights(tmp_path):
    """MONAI's self-supervised ViTAutoEnc state_dict (3D, no CLS, qkv without bias, eps 1e-5): the encoder gives
    ViTAutoEnc's hidden states; into a classifier the CLS token is new (reported as initialised)."""
    torch.manual_seed(3)
    autoenc = ViTAutoEnc(1, 16, 4, num_layers=2, **MONAI_TINY).eval()
    torch.save(autoenc.state_dict(), tmp_path / "vitautoenc_weights.pt")
    vit, report = vit_from_pretrained(tmp_path / "vitautoenc_weights.pt", num_heads=4)
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        _, expected_hidden = autoenc(x)
        tokens, hidden = vit.eval()(x)
    for got, expected in zip(hidden, expected_hidden):
        assert (got - expected).abs().max() < TOL
    assert (tokens - autoenc.norm(expected_hidden[-1])).abs().max() < TOL
    assert report.layout == "monai" and report.inferred["cls_token"] == (False, "weights")
    assert report.inferred["qkv_bias"] == (False, "weights") and report.inferred["img_size"][0] == (16, 16, 16)
    assert report.unexpected == sorted(k for k in autoenc.state_dict() if k.startswith("conv3d_transpose"))
    net = PromptClassifier(
        2,
        "lora",
        backbone="auto",
        pretrained=str(tmp_path / "vitautoenc_weights.pt"),
        in_channels=1,
        img_size=16,
        spatial_dims=3,
        backbone_overrides={"num_heads": 4},
    )
    torch.testing.assert_close(net.backbone.blocks[1].attn.qkv.weight, autoenc.blocks[1].attn.qkv.weight)
    _, report = vit_from_pretrained(tmp_path / "vitautoenc_weights.pt", num_heads=4, cls_token=True)
    assert report.initialised == ["cls_token"] and not report.missing


def test_monai_unetr_checkpoint(tmp_path):
    """A MONAI UNETR checkpoint (``vit.`` keys, nested under ``state_dict``): its encoder's outputs."""
    torch.manual_seed(4)
    unetr = UNETR(1, 2, 32, feature_size=8, **MONAI_TINY).eval()
    torch.save({"state_dict": unetr.state_dict()}, tmp_path / "unetr.pt")
    vit, report = vit_from_pretrained(tmp_path / "unetr.pt", num_heads=4)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        expected, expected_hidden = unetr.vit(x)
        tokens, hidden = vit.eval()(x)
    assert (tokens - expected).abs().max() < TOL and (hidden[5] - expected_hidden[5]).abs().max() < TOL
    assert report.inferred["num_layers"] == (12, "weights") and report.inferred["layer_norm_eps"][0] == 1e-5
    assert all(not k.startswith("vit.") for k in report.unexpected)


VIT_METHODS = [m for m in method_names() if "vit" in getattr(get_method(m), "families", ("vit",))]


@pytest.mark.parametrize("method", VIT_METHODS)
@pytest.mark.parametrize("family", ["dinov2_registers", "clip"])
def test_every_method_trains_on_dinov2_and_clip(dinov2, clip, family, method):
    """``backbone="auto"`` in PromptClassifier: forward + backward reach exactly the trainable parameters
    (registers, LayerScale and the pre-norm frozen unless the method trains them); the ViT's ``forward``
    still returns ``[CLS, patches]``."""
    path = dinov2[2][0] if family == "dinov2_registers" else clip[0]
    net = PromptClassifier(3, method, backbone="auto", pretrained=str(path), img_size=28)
    x = torch.randn(2, 3, 28, 28)
    logits = net(x)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    logits.square().sum().backward()
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    reached = {n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"head.weight", "head.bias"} <= reached <= trainable
    assert method == "linear" or reached - {"head.weight", "head.bias"}
    assert net.backbone(x)[0].shape == (2, 1 + 16, 32)


def test_token_layout_of_prompt_methods_with_registers(dinov2):
    """Registers are prefix tokens: EPT has one prompt row per CLS, register and patch token, VPT inserts after
    them, DVPT reads out its prompts and CLS (not the registers)."""
    path = str(dinov2[2][0])
    ept = PromptClassifier(2, "ept", {"prompt_length": 3}, backbone="auto", pretrained=path, img_size=28)
    assert ept.backbone.blocks[0].attn.ept_prompt.shape == (1 + 2 + 16, 3)
    vpt = PromptClassifier(2, "vpt", {"num_tokens": 4}, backbone="auto", pretrained=path, img_size=28).backbone
    assert vpt.prompter.start == 3
    dvpt = PromptClassifier(2, "dvpt", {"num_prompts": 5}, backbone="auto", pretrained=path, img_size=28).backbone
    x = torch.randn(2, 3, 28, 28)
    tokens = dvpt.forward_tokens(x)[0]
    assert tokens.shape[1] == 5 + 1 + 2 + 16
    torch.testing.assert_close(dvpt.forward_features(x), tokens[:, :6].mean(dim=1))


def test_ept_prompt_resize_keeps_cls_and_register_rows():
    """With 2 registers the EPT prompt has 1 + 2 prefix rows (``vit.num_prefix_tokens``, also the default read off
    the shape): they are kept, the 4 x 4 patch rows are resized bicubically to 6 x 6, and the ViT at the new size
    runs with it; 1 prefix row is refused."""
    arch = {"hidden_size": 32, "num_layers": 1, "num_heads": 4, "mlp_dim": 64, "num_registers": 2}
    small = apply_method(PromptableViT(3, (28, 28), (7, 7), **arch), "ept", {"prompt_length": 3})
    large = apply_method(PromptableViT(3, (42, 42), (7, 7), **arch), "ept", {"prompt_length": 3})
    prompt = small.blocks[0].attn.ept_prompt.detach()
    assert small.num_prefix_tokens == 3 and prompt.shape == (3 + 16, 3)
    grid = prompt[3:].T.reshape(1, 3, 4, 4)
    patches = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).reshape(3, 36).T
    for prefix in (small.num_prefix_tokens, None):
        resized = resize_ept_prompt(prompt, small.grid_size, large.grid_size, prefix)
        assert torch.equal(resized[:3], prompt[:3])
        torch.testing.assert_close(resized[3:], patches)
    with pytest.raises(ValueError, match=r"\(19, 3\) does not fit 1 prefix rows plus the 2D/3D grid \(4, 4\)"):
        resize_ept_prompt(prompt, small.grid_size, large.grid_size, 1)
    large.blocks[0].attn.ept_prompt.data.copy_(resized)
    assert large.forward_features(torch.randn(2, 3, 42, 42)).shape == (2, 32)


def test_auto_classifier_reads_eps_and_needs_weights(clip):
    path, reference = clip
    net = PromptClassifier(2, "linear", backbone="auto", pretrained=str(path), img_size=28, layer_norm_eps=1e-6)
    assert net.backbone.norm.eps == 1e-5 and net.backbone.blocks[0].norm1.eps == 1e-5
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        expected = reference(pixel_values=x).pooler_output
    assert (net.backbone.forward_features(x) - expected).abs().max() < TOL
    with pytest.raises(ValueError, match="backbone='auto' builds the ViT from its checkpoint: pass pretrained"):
        PromptClassifier(2, backbone="auto")


def test_options_add_only_their_keys_and_script():
    """A plain ViT's config and keys are unchanged; each option adds exactly its keys and config entry; the
    model with all of them is TorchScript-able (ckpt_export) and matches eager."""
    arch = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "mlp_dim": 64}
    plain = PromptableViT(3, (28, 28), (7, 7), **arch)
    full = (
        PromptableViT(3, (28, 28), (7, 7), **arch, layer_scale=True, num_registers=2, pre_norm=True, act="quick_gelu")
        .double()
        .eval()
    )
    assert set(full.config) - set(plain.config) == {"layer_scale", "num_registers", "pre_norm", "act"}
    added = set(full.state_dict()) - set(plain.state_dict())
    expected = {"register_tokens", "norm_pre.weight", "norm_pre.bias"}
    expected |= {f"blocks.{i}.ls{j}.gamma" for i in range(2) for j in (1, 2)}
    assert added == expected and set(plain.state_dict()) <= set(full.state_dict())
    x = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    scripted = torch.jit.script(full)
    torch.testing.assert_close(scripted(x)[0], full(x)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="MLP activation 'relu' is not one of"):
        PromptableViT(3, (28, 28), (7, 7), **arch, act="relu")


@pytest.mark.parametrize("method", ["vpt", "dvpt", "ept"])
def test_prompt_insertion_around_the_pre_norm(method):
    """On a pre-norm (CLIP) ViT: DVPT's prompts go through ``norm_pre`` with CLS and patches (the official DVPT
    code's ``ln_pre``); VPT's enter after it, where its deep prompts enter every later block; EPT adds no token, so
    the first block sees exactly the unprompted ViT's tokens."""
    arch = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "mlp_dim": 64}
    torch.manual_seed(0)
    vit = PromptableViT(3, (28, 28), (7, 7), **arch, pre_norm=True).double()
    with torch.no_grad():
        vit.norm_pre.weight.normal_(1.0, 0.3)
        vit.norm_pre.bias.normal_(0.0, 0.3)
    x = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    unprompted = vit.embed(x)  # norm_pre([CLS, patches])
    configs = {"vpt": {"num_tokens": 3}, "dvpt": {"num_prompts": 3}, "ept": {"prompt_length": 3}}
    apply_method(vit, method, configs[method])
    seen = []
    vit.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    vit.forward_tokens(x)
    tokens = seen[0]
    if method == "ept":
        torch.testing.assert_close(tokens, unprompted, rtol=0, atol=0)
        return
    embedded = torch.cat((vit.cls_token.expand(2, -1, -1), vit.patch_embedding(x)), dim=1)
    if method == "vpt":  # [CLS, prompts, patches], the prompts as they are
        expected = torch.cat((unprompted[:, :1], vit.prompter.prompts[0].expand(2, -1, -1), unprompted[:, 1:]), 1)
    else:  # norm_pre([prompts + positions, CLS, patches])
        prompts = (vit.prompter.prompts + vit.prompter.prompt_positions).expand(2, -1, -1)
        expected = vit.norm_pre(torch.cat((prompts, embedded), dim=1))
    torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-12)


def test_auto_bundle_network_exports_merged(dinov2, tmp_path):
    """The bundle's network_def with ``--backbone auto --pretrained DIR``: the delta of a LoRA network exports to a
    merged plain network and TorchScript (the plain network reads its architecture from the same weights)."""
    bundle = copy_bundle("lora_classification", tmp_path)
    overrides = {"backbone": "auto", "pretrained": str(dinov2[2][0]), "img_size": 28}
    network = PromptClassifier(3, "lora", backbone="auto", pretrained=overrides["pretrained"], img_size=28)
    with torch.no_grad():
        network.backbone.blocks[0].attn.qkv.lora_B.normal_()
    save_delta(network, bundle / "models" / "model.pt")
    write_training_record(bundle, **overrides)
    report = export_bundle(bundle, overrides=overrides)
    assert report.merged and report.max_abs_diff < 1e-5
    scripted = torch.jit.load(str(report.torchscript))
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(scripted(x), network.eval()(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["dinov2_registers", "clip"])
def test_fpt_lpm_reads_the_keys_and_values_of_the_family(dinov2, clip, family):
    """FPT's LPM runs its own block loop: with registers, LayerScale and the pre-norm its keys/values of block 1 are
    those of the ViT's own forward (summed over tokens, as the LPM orders them by importance)."""
    from monai_prompt.fpt.lpm import LPMExtractor

    path = dinov2[2][0] if family == "dinov2_registers" else clip[0]
    vit, _ = vit_from_pretrained(path)
    lpm = LPMExtractor.from_vit(vit.eval(), layers=[1], token_ratio=1.0)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        features = lpm.extract(x)
        hidden = vit.forward_tokens(x)[1]
        _, keys, values = vit.blocks[1].attn.project_qkv(vit.blocks[1].norm1(hidden[0]))
    torch.testing.assert_close(features[:, 0, 0].sum(-2), keys.sum(-2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(features[:, 1, 0].sum(-2), values.sum(-2), rtol=1e-5, atol=1e-5)
