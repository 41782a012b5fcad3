"""Pre-trained weight import: HuggingFace parity, timm and MONAI layouts, resizing, adaption, bad files."""

import argparse
import json
import logging
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from safetensors.torch import load_file, save_file
from transformers import ViTConfig, ViTModel

from bundle_support import REPO
from monai_prompt.backbones import CheckpointError, build_vit, load_pretrained, resize_pos_embed, vit_from_pretrained
from monai_prompt.nets import FPTClassifier, PromptClassifier

ARCH = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "mlp_dim": 128, "patch_size": 8}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random HuggingFace ViTModel saved with save_pretrained (config.json + model.safetensors)."""
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8
    )
    model = ViTModel(config, add_pooling_layer=False).eval()
    # random non-trivial CLS/position embeddings so folding errors cannot hide behind zeros
    with torch.no_grad():
        model.embeddings.cls_token.normal_()
        model.embeddings.position_embeddings.normal_()
    path = tmp_path_factory.mktemp("hf") / "vit"
    model.save_pretrained(path)
    return path, model


def hf_to_timm(hf_state: dict) -> dict:
    """Independent rename of HuggingFace ViT keys to timm's (the layout timm checkpoints use)."""
    out = {}
    for key, value in hf_state.items():
        key = key.replace("embeddings.patch_embeddings.projection", "patch_embed.proj")
        key = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed"}.get(key, key)
        match = re.match(r"encoder\.layer\.(\d+)\.(.*)", key)
        if match:
            i, rest = match.groups()
            if rest.startswith("attention.attention."):
                continue
            rest = {
                "attention.output.dense.weight": "attn.proj.weight", "attention.output.dense.bias": "attn.proj.bias",
                "layernorm_before.weight": "norm1.weight", "layernorm_before.bias": "norm1.bias",
                "layernorm_after.weight": "norm2.weight", "layernorm_after.bias": "norm2.bias",
                "intermediate.dense.weight": "mlp.fc1.weight", "intermediate.dense.bias": "mlp.fc1.bias",
                "output.dense.weight": "mlp.fc2.weight", "output.dense.bias": "mlp.fc2.bias",
            }[rest]
            key = f"blocks.{i}.{rest}"
        key = key.replace("layernorm.", "norm.")
        out[key] = value
    for i in range(2):
        for kind in ("weight", "bias"):
            parts = [hf_state[f"encoder.layer.{i}.attention.attention.{n}.{kind}"] for n in ("query", "key", "value")]
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts)
    out["head.weight"] = torch.zeros(10, 64)
    return out


def tiny_vit(**kwargs):
    kwargs = {"img_size": 32, "layer_norm_eps": 1e-12, **ARCH, **kwargs}
    return build_vit("vit_tiny", **kwargs).eval()


def test_huggingface_parity(hf_dir):
    path, hf = hf_dir
    vit = tiny_vit()
    report = load_pretrained(vit, path)
    assert report.layout == "hf" and not report.missing and not report.unexpected
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = hf(pixel_values=x).last_hidden_state
        got = vit(x)[0]
    assert (got - expected).abs().max() < 1e-5


def test_timm_layout_loads_to_same_model(hf_dir, tmp_path):
    path, _ = hf_dir
    reference = tiny_vit()
    load_pretrained(reference, path)
    timm_state = hf_to_timm(load_file(path / "model.safetensors"))
    save_file(timm_state, tmp_path / "timm.safetensors")
    torch.save({"model": timm_state}, tmp_path / "timm.pth")
    x = torch.randn(2, 3, 32, 32)
    for file in ("timm.safetensors", "timm.pth"):
        vit = tiny_vit()
        report = load_pretrained(vit, tmp_path / file)
        assert report.layout == "timm" and report.unexpected == ["head.weight"]
        torch.testing.assert_close(vit(x)[0], reference(x)[0], rtol=0, atol=0)


def test_monai_layouts_nested_and_prefixed(tmp_path):
    source = tiny_vit()
    state = source.state_dict()
    torch.save({"state_dict": {f"vit.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "unetr.pt")
    torch.save({"network": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "zoo.pt")
    x = torch.randn(2, 3, 32, 32)
    for file in ("unetr.pt", "zoo.pt"):
        vit = tiny_vit()
        report = load_pretrained(vit, tmp_path / file)
        assert report.layout == "monai" and not report.missing
        torch.testing.assert_close(vit(x)[0], source(x)[0], rtol=0, atol=0)


def test_monai_vit_defaults_load_into_a_preset(tmp_path):
    """MONAI's ViT has no qkv bias and LayerNorm eps 1e-5: build_vit(qkv_bias=False, layer_norm_eps=1e-5) loads its
    file strictly and gives its outputs (also as PromptClassifier's backbone); a wrong bias setting is an error
    naming the fix."""
    from monai.networks.nets import ViT

    torch.manual_seed(0)
    monai_vit = ViT(3, 32, 8, 64, 128, 2, 4, spatial_dims=2).eval()  # MONAI defaults: qkv_bias=False, no CLS
    torch.save(monai_vit.state_dict(), tmp_path / "monai_vit.pt")
    kwargs = {"cls_token": False, "layer_norm_eps": 1e-5}
    vit = tiny_vit(qkv_bias=False, **kwargs)
    report = load_pretrained(vit, tmp_path / "monai_vit.pt")
    assert vit.blocks[0].attn.qkv.bias is None and not report.missing and not report.unexpected
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(vit(x)[0], monai_vit(x)[0], rtol=0, atol=1e-6)
    fix = r"monai_vit.pt: .* lacks 2 backbone weights .*qkv.bias.* no qkv bias: build the model with qkv_bias=False"
    with pytest.raises(CheckpointError, match=fix):
        load_pretrained(tiny_vit(**kwargs), tmp_path / "monai_vit.pt")
    torch.save(tiny_vit(**kwargs).state_dict(), tmp_path / "biased.pt")
    with pytest.raises(CheckpointError, match=r"biased.pt: the checkpoint has qkv biases \(qkv_bias=True\) that the"):
        load_pretrained(tiny_vit(qkv_bias=False, **kwargs), tmp_path / "biased.pt")
    overrides = {**ARCH, "qkv_bias": False}
    net = PromptClassifier(
        2,
        backbone="vit_tiny",
        img_size=32,
        pretrained=str(tmp_path / "monai_vit.pt"),
        layer_norm_eps=1e-5,
        backbone_overrides=overrides,
    )
    attn = net.backbone.blocks[1].attn
    assert attn.qkv.bias is None and torch.equal(attn.qkv.weight, monai_vit.blocks[1].attn.qkv.weight)


def test_monai_perceptron_patch_embedding_is_converted(tmp_path):
    """Old MONAI ViTs with proj_type='perceptron' (Rearrange + Linear) load into a conv patch embedding."""
    from monai.networks.blocks import PatchEmbeddingBlock

    source = tiny_vit()
    perceptron = PatchEmbeddingBlock(3, (32, 32), (8, 8), 64, 4, proj_type="perceptron", spatial_dims=2)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("patch_embedding.")}
    state.update({f"patch_embedding.{k}": v for k, v in perceptron.state_dict().items()})
    torch.save(state, tmp_path / "old.pt")
    vit = tiny_vit()
    assert load_pretrained(vit, tmp_path / "old.pt").layout == "monai_perceptron"
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(vit.patch_embedding(x), perceptron(x), rtol=1e-5, atol=1e-5)


def test_monai_masked_autoencoder_encoder_is_imported(tmp_path):
    """MONAI's MaskedAutoEncoderViT keeps its final norm as the last entry of ``blocks``."""
    from monai.networks.nets import MaskedAutoEncoderViT

    mae = MaskedAutoEncoderViT(
        in_channels=3, img_size=32, patch_size=8, hidden_size=64, mlp_dim=128, num_layers=2, num_heads=4,
        decoder_hidden_size=32, decoder_mlp_dim=64, decoder_num_layers=1, decoder_num_heads=4, spatial_dims=2,
        qkv_bias=True,
    )
    torch.save({"state_dict": mae.state_dict()}, tmp_path / "mae.pt")
    vit = tiny_vit()
    report = load_pretrained(vit, tmp_path / "mae.pt")
    assert not report.missing and "decoder_pred.weight" in report.unexpected
    torch.testing.assert_close(vit.norm.weight, mae.blocks[2].weight, rtol=0, atol=0)
    torch.testing.assert_close(vit.blocks[1].attn.qkv.weight, mae.blocks[1].attn.qkv.weight, rtol=0, atol=0)


def test_gray_and_3d_inputs_adapt_the_patch_embedding(hf_dir):
    path, _ = hf_dir
    rgb = tiny_vit()
    load_pretrained(rgb, path)
    gray = tiny_vit(in_channels=1)
    report = load_pretrained(gray, path)
    assert any("summed over 3" in note for note in report.adapted)
    x = torch.randn(2, 1, 32, 32)
    # summing the RGB kernels == feeding the gray image to all three channels
    torch.testing.assert_close(gray(x)[0], rgb(x.repeat(1, 3, 1, 1))[0], rtol=1e-5, atol=1e-5)
    # a 3D model whose depth is one patch, on a volume constant along depth, equals the 2D model on the slice
    volume = tiny_vit(in_channels=1, img_size=(8, 32, 32), spatial_dims=3)
    report = load_pretrained(volume, path)
    assert any("inflated from 2D to 3D" in note for note in report.adapted)
    stack = x[:, :, None].repeat(1, 1, 8, 1, 1)
    torch.testing.assert_close(volume(stack)[0], gray(x)[0], rtol=1e-5, atol=1e-5)


def test_position_embeddings_resize_on_load(hf_dir):
    path, _ = hf_dir
    vit = tiny_vit(img_size=48)
    report = load_pretrained(vit, path)
    assert "position embeddings resized from grid (4, 4) to (6, 6)" in report.adapted
    assert vit.patch_embedding.position_embeddings.shape == (1, 36, 64)


def test_non_square_source_grid_needs_src_grid(hf_dir, tmp_path):
    """A 4 x 3 timm grid (13 slots with CLS) is no square: the error names the fix; with src_grid it loads."""
    path, _ = hf_dir
    state = hf_to_timm(load_file(path / "model.safetensors"))
    state["pos_embed"] = torch.randn(1, 13, 64)
    save_file(state, tmp_path / "wide.safetensors")
    with pytest.raises(CheckpointError, match=r"wide.safetensors: position embedding of 13 tokens .* pass src_grid"):
        load_pretrained(tiny_vit(), tmp_path / "wide.safetensors")
    with pytest.raises(CheckpointError, match=r"wide.safetensors: src_grid=\(4, 4\) needs 16 positions; .* has 13"):
        load_pretrained(tiny_vit(), tmp_path / "wide.safetensors", src_grid=(4, 4))
    vit = tiny_vit()
    report = load_pretrained(vit, tmp_path / "wide.safetensors", src_grid=(4, 3))
    assert report.adapted == [
        "CLS position embedding folded into cls_token",
        "position embeddings resized from grid (4, 3) to (4, 4)",
    ]
    grid = state["pos_embed"][0, 1:].T.reshape(1, 64, 4, 3)
    expected = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).reshape(64, 16).T[None]
    torch.testing.assert_close(vit.patch_embedding.position_embeddings.detach(), expected)
    torch.testing.assert_close(vit.cls_token.detach(), state["cls_token"] + state["pos_embed"][:, :1])


def test_ambiguous_grid_is_flagged_and_networks_take_src_grid(hf_dir, tmp_path, caplog):
    """25 slots are a 5 x 5 grid without CLS slot or CLS + 4 x 6: the square reading is reported as assumed, and a
    network takes the true grid as backbone_overrides={'src_grid': ...}, for a preset and for "auto"."""
    path, _ = hf_dir
    state = hf_to_timm(load_file(path / "model.safetensors"))
    state["pos_embed"] = torch.randn(1, 25, 64)
    save_file(state, tmp_path / "wide.safetensors")
    with caplog.at_level(logging.WARNING):
        report = load_pretrained(tiny_vit(), tmp_path / "wide.safetensors")
    assumed = r"25 tokens read as a 5 x 5 grid without the CLS slot .* backbone_overrides=\{'src_grid': \(h, w\)\}"
    assert re.search(assumed, report.adapted[0]) and re.search(assumed, caplog.text)
    folded = state["cls_token"] + state["pos_embed"][:, :1]
    for backbone, overrides in (("vit_tiny", ARCH), ("auto", {"num_heads": 4})):
        net = PromptClassifier(2, "lora", backbone=backbone, pretrained=str(tmp_path / "wide.safetensors"),
                               img_size=(64, 96), backbone_overrides={**overrides, "src_grid": (4, 6)})
        torch.testing.assert_close(net.backbone.cls_token.detach(), folded)
    fpt = FPTClassifier(2, "fpt", {"side_img_size": 32}, "vit_tiny", img_size=(64, 96),
                        pretrained=str(tmp_path / "wide.safetensors"), backbone_overrides={**ARCH, "src_grid": (4, 6)})
    torch.testing.assert_close(fpt.lpm.cls_token.detach(), folded)


def test_resize_pos_embed_identity_shapes_and_bicubic():
    pos2d = torch.randn(1, 16, 8)
    assert torch.equal(resize_pos_embed(pos2d, (4, 4), (4, 4)), pos2d)
    pos3d = torch.randn(1, 27, 8)
    assert torch.equal(resize_pos_embed(pos3d, (3, 3, 3), (3, 3, 3)), pos3d)
    assert resize_pos_embed(pos2d, (4, 4), (6, 5)).shape == (1, 30, 8)
    assert resize_pos_embed(pos3d, (3, 3, 3), (4, 5, 6)).shape == (1, 120, 8)
    assert resize_pos_embed(pos2d, (4, 4), (2, 6, 6)).shape == (1, 72, 8)
    # 2D: timm's formula, a single bicubic interpolation of the grid
    grid = pos2d[0].T.reshape(1, 8, 4, 4)
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).reshape(8, 36).T[None]
    torch.testing.assert_close(resize_pos_embed(pos2d, (4, 4), (6, 6)), expected)
    # 3D with unchanged depth: each depth slice is the 2D bicubic resize of that slice
    slices = torch.randn(2, 16, 8)
    pos = slices.reshape(1, 32, 8)
    resized = resize_pos_embed(pos, (2, 4, 4), (2, 6, 6)).reshape(2, 36, 8)
    for d in range(2):
        torch.testing.assert_close(resized[d : d + 1], resize_pos_embed(slices[d : d + 1], (4, 4), (6, 6)))


def test_bad_files_raise_clear_errors(hf_dir, tmp_path):
    path, hf = hf_dir
    weights = (path / "model.safetensors").read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match="truncated.safetensors: cannot be read"):
        load_pretrained(tiny_vit(), truncated)
    truncated_pth = tmp_path / "truncated.pth"
    torch.save(hf.state_dict(), tmp_path / "full.pth")
    truncated_pth.write_bytes((tmp_path / "full.pth").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated.pth: cannot be read"):
        load_pretrained(tiny_vit(), truncated_pth)
    resnet = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, resnet)
    with pytest.raises(CheckpointError, match=r"resnet.pth: not a ViT checkpoint .*conv1.weight"):
        load_pretrained(tiny_vit(), resnet)
    shapes = r"'embeddings.cls_token' \(MONAI 'cls_token'\) has shape \(1, 1, 64\) .* expects \(1, 1, 32\)"
    with pytest.raises(CheckpointError, match=shapes + r".*\(bundles: --backbone_overrides .*--backbone auto"):
        load_pretrained(tiny_vit(hidden_size=32), path)
    with pytest.raises(CheckpointError, match="lacks 12 backbone weights .*blocks.2"):
        load_pretrained(tiny_vit(num_layers=3), path)
    with pytest.raises(CheckpointError, match=r"checkpoint has 2 blocks, model has 3: build with num_layers=2; "
                       r"bundles: --backbone_overrides with 'num_layers': 2\); pass strict=False"):
        load_pretrained(tiny_vit(num_layers=3), path)
    report = load_pretrained(tiny_vit(num_layers=3), path, strict=False)
    assert len(report.missing) == 12 and all(k.startswith("blocks.2.") for k in report.missing)
    with pytest.raises(CheckpointError, match="no such file"):
        load_pretrained(tiny_vit(), tmp_path / "missing.pth")


def test_a_delta_given_as_pretrained_weights_names_what_to_pass(hf_dir, tmp_path):
    """A bundle's models/model.pt of a frozen-backbone method holds no backbone: refused, naming the weights it was
    trained on; a full fine-tuning delta holds the whole network and loads."""
    from monai_prompt.peft.delta import delta_state_dict

    path, _ = hf_dir
    for method in ("lora", "full"):
        net = PromptClassifier(2, method, backbone="vit_tiny", pretrained=str(path), img_size=64,
                               backbone_overrides=ARCH)
        torch.save(delta_state_dict(net), tmp_path / f"{method}.pt")
    with pytest.raises(CheckpointError, match=rf"lora\.pt: a monai_prompt delta \(the lora weights .* pass the weights "
                       rf"it was trained on as pretrained \({re.escape(str(path))}"):
        load_pretrained(tiny_vit(), tmp_path / "lora.pt")
    assert not load_pretrained(tiny_vit(), tmp_path / "full.pt").missing


def test_training_checkpoint_with_python_objects_names_the_one_line_fix(hf_dir, tmp_path):
    """DINO's and MAE's training checkpoints store their argparse arguments beside the weights, and some scripts save
    the whole model (``torch.save(model)``): weights_only loading refuses them, naming the object and a command that
    saves the tensors alone, which then load."""
    path, _ = hf_dir
    state = load_file(path / "model.safetensors")
    torch.save({"teacher": state, "epoch": 3, "args": argparse.Namespace(arch="vit_tiny")}, tmp_path / "full.pth")
    source = tiny_vit()
    load_pretrained(source, path)
    torch.save(source, tmp_path / "whole.pth")
    for name, what in (("full", r"argparse\.Namespace"), ("whole", r"monai_prompt\.backbones\.vit\.PromptableViT")):
        objects = rf"{name}\.pth: holds Python objects besides tensors \({what}"
        with pytest.raises(CheckpointError, match=objects) as error:
            load_pretrained(tiny_vit(), tmp_path / f"{name}.pth")
        exec(re.search(r'python -c "(.*)"$', str(error.value)).group(1), {})
        assert len(load_pretrained(tiny_vit(), tmp_path / f"{name}.weights.pth").missing) == 0


def test_training_checkpoints_nest_the_weights_beside_scalar_tensors(hf_dir, tmp_path):
    """timm's, torchvision's and Lightning's training scripts keep the weights under ``model``/``state_dict``/
    ``module`` (``module.`` after DataParallel) beside metrics that may be tensors: the nesting is unwrapped."""
    path, _ = hf_dir
    reference = tiny_vit()
    load_pretrained(reference, path)
    timm_state = hf_to_timm(load_file(path / "model.safetensors"))
    layouts = {
        "timm_train": {"model": timm_state, "epoch": 3, "metric": torch.tensor(81.2)},
        "torchvision": {"state_dict": {f"module.{k}": v for k, v in timm_state.items()}, "acc1": torch.tensor(76.)},
        "module": {"module": timm_state},
    }
    x = torch.randn(2, 3, 32, 32)
    for name, content in layouts.items():
        torch.save(content, tmp_path / f"{name}.pth")
        vit = tiny_vit()
        assert load_pretrained(vit, tmp_path / f"{name}.pth").layout == "timm"
        torch.testing.assert_close(vit(x)[0], reference(x)[0], rtol=0, atol=0)


def test_an_ema_copy_is_loaded_only_where_it_is_the_only_weights(tmp_path):
    """timm's (``state_dict_ema``), DeiT's/ConvNeXt's (``model_ema``) and other training scripts (``ema``) save an EMA
    copy of the model beside the plain weights, or alone: the plain weights are taken when both are there, the EMA
    copy when it is the only one, and the report says which."""
    plain, ema = tiny_vit(), tiny_vit()
    with torch.no_grad():
        for param in ema.parameters():
            param.add_(torch.randn_like(param))
    plain_state, ema_state = plain.state_dict(), ema.state_dict()
    both = "checkpoint[{!r}] (the plain weights; the EMA copy under {!r} is not loaded)"
    alone = "checkpoint[{!r}] (the EMA copy of the weights: the checkpoint holds no plain ones)"
    files = {
        "timm": (
            {"state_dict": plain_state, "state_dict_ema": ema_state}, plain, both.format("state_dict", "state_dict_ema")
        ),
        "deit": ({"model": plain_state, "model_ema": ema_state, "epoch": 3}, plain, both.format("model", "model_ema")),
        "timm_ema": ({"state_dict_ema": ema_state, "epoch": 3}, ema, alone.format("state_dict_ema")),
        "deit_ema": ({"model_ema": ema_state, "metric": torch.tensor(81.2)}, ema, alone.format("model_ema")),
        "ema": ({"ema": {f"module.{k}": v for k, v in ema_state.items()}}, ema, alone.format("ema")),
    }
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(plain(x)[0], ema(x)[0])
    for name, (content, expected, entry) in files.items():
        torch.save(content, tmp_path / f"{name}.pth")
        vit = tiny_vit()
        report = load_pretrained(vit, tmp_path / f"{name}.pth")
        assert report.entry == entry and f"weights: {entry}" in str(report) and not report.missing, name
        torch.testing.assert_close(vit(x)[0], expected(x)[0], rtol=0, atol=0, msg=name)
    torch.save({"model": plain_state}, tmp_path / "plain.pth")
    assert load_pretrained(tiny_vit(), tmp_path / "plain.pth").entry == "checkpoint['model']"
    torch.save(plain_state, tmp_path / "flat.pth")
    report = load_pretrained(tiny_vit(), tmp_path / "flat.pth")
    assert report.entry == "" and "weights:" not in str(report)


def test_half_precision_files_are_adapted_in_the_models_precision(hf_dir, tmp_path):
    """A float16/bfloat16 file (or tensors saved as non-contiguous views) loads as the same values stored in float32:
    position embeddings are resized in the model's float32, not rounded back to the file's precision."""
    path, _ = hf_dir
    state = load_file(path / "model.safetensors")
    for dtype in (torch.float16, torch.bfloat16):
        low = {k: v.to(dtype) for k, v in state.items()}
        save_file(low, tmp_path / "low.safetensors")
        save_file({k: v.float() for k, v in low.items()}, tmp_path / "up.safetensors")
        expected, got = tiny_vit(img_size=48), tiny_vit(img_size=48)
        load_pretrained(expected, tmp_path / "up.safetensors")
        load_pretrained(got, tmp_path / "low.safetensors")
        for key, value in expected.state_dict().items():
            assert torch.equal(got.state_dict()[key], value), (dtype, key)
    torch.save({k: v.t().contiguous().t() if v.dim() == 2 else v for k, v in state.items()}, tmp_path / "views.pth")
    expected, got = tiny_vit(), tiny_vit()
    load_pretrained(expected, path)
    load_pretrained(got, tmp_path / "views.pth")
    assert all(torch.equal(got.state_dict()[k], v) for k, v in expected.state_dict().items())


def write_bin_shards(state: dict, folder, parts: int) -> None:
    """``state`` as the ``.bin`` shards and ``pytorch_model.bin.index.json`` of a sharded transformers 4 checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    weight_map = {}
    for i in range(parts):
        shard = f"pytorch_model-{i + 1:05d}-of-{parts:05d}.bin"
        torch.save({k: state[k] for k in names[i::parts]}, folder / shard)
        weight_map.update(dict.fromkeys(names[i::parts], shard))
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
             "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def test_sharded_huggingface_checkpoints_load_wherever_a_folder_is_taken(hf_dir, tmp_path):
    """``save_pretrained(max_shard_size=...)`` (a large model on the Hub) writes ``model.safetensors.index.json`` and
    shards; transformers 4 also ``pytorch_model.bin.index.json`` and ``.bin`` shards. Both load as the single file, with
    the config beside the index: load_pretrained, vit_from_pretrained, networks with backbone="auto" and a bundle's
    --backbone auto --pretrained DIR. A missing shard is named with its index."""
    path, hf = hf_dir
    hf.save_pretrained(tmp_path / "st", max_shard_size="20KB")
    assert len(list((tmp_path / "st").glob("model-*-of-*.safetensors"))) > 1
    write_bin_shards(load_file(path / "model.safetensors"), tmp_path / "bin", parts=3)
    shutil.copy(path / "config.json", tmp_path / "bin")
    reference = tiny_vit()
    load_pretrained(reference, path)
    x = torch.randn(2, 3, 32, 32)
    for source in (tmp_path / "st", tmp_path / "bin", tmp_path / "st" / "model.safetensors.index.json"):
        vit = tiny_vit()
        report = load_pretrained(vit, source)
        assert report.layout == "hf" and not report.missing and not report.unexpected
        torch.testing.assert_close(vit(x)[0], reference(x)[0], rtol=0, atol=0)
        vit, report = vit_from_pretrained(source)
        assert report.inferred["num_heads"] == (4, "config.json num_attention_heads")
        torch.testing.assert_close(vit.eval()(x)[0], reference(x)[0], rtol=0, atol=0)
    net = PromptClassifier(2, "lora", backbone="auto", pretrained=str(tmp_path / "st"), img_size=32)
    torch.testing.assert_close(net.backbone.blocks[1].mlp.linear2.weight, reference.blocks[1].mlp.linear2.weight)
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "lora_classification" / "configs" / "train.json"))
    parser.update({"backbone": "auto", "pretrained": str(tmp_path / "bin"), "img_size": 32, "num_classes": 3})
    bundle_net = parser.get_parsed_content("network_def")
    torch.testing.assert_close(bundle_net.backbone.blocks[0].attn.qkv.bias, reference.blocks[0].attn.qkv.bias)

    shards = sorted((tmp_path / "st").glob("model-*-of-*.safetensors"))
    shards[1].unlink()
    missing = rf"model\.safetensors\.index\.json: 1 of its {len(shards)} shards are missing from .*: {shards[1].name}"
    with pytest.raises(CheckpointError, match=missing):
        load_pretrained(tiny_vit(), tmp_path / "st")
    with pytest.raises(CheckpointError, match=missing):
        PromptClassifier(2, "lora", backbone="auto", pretrained=str(tmp_path / "st"), img_size=32)
    (tmp_path / "bin" / "pytorch_model-00002-of-00003.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"pytorch_model-00002-of-00003\.bin: cannot be read as a weight file"):
        load_pretrained(tiny_vit(), tmp_path / "bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty: directory holds none of .*'model\.safetensors\.index\.json'"):
        load_pretrained(tiny_vit(), tmp_path / "empty")


def test_deeper_checkpoint_is_an_error_or_a_warning(hf_dir, tmp_path, caplog):
    """2 blocks into a 1-block model: strict (default) raises naming the fix and the keys left over; strict=False
    (a network's ``pretrained_strict``, also as a bundle config override) loads block 0 with a warning. A wider MLP
    stays a shape error."""
    path, _ = hf_dir
    fix = (
        r"vit: checkpoint has 2 blocks, model has 1: build with num_layers=2, or pass strict=False \(a network's "
        r"pretrained_strict=False\) to load the first 1; not loaded: \['encoder\.layer\.1\..*'\] and 13 more\.$"
    )
    with pytest.raises(CheckpointError, match=fix):
        load_pretrained(tiny_vit(num_layers=1), path)
    reference = tiny_vit()
    load_pretrained(reference, path)
    with caplog.at_level(logging.INFO, logger="monai_prompt.backbones.pretrained"):
        shallow = tiny_vit(num_layers=1)
        report = load_pretrained(shallow, path, strict=False)
    warnings = [r for r in caplog.records if "checkpoint has 2 blocks, model has 1: loading the first 1" in r.message]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert not report.missing and any(k.startswith("encoder.layer.1.") for k in report.unexpected)
    shallow_state, reference_state = shallow.state_dict(), reference.state_dict()
    assert all(torch.equal(value, reference_state[key]) for key, value in shallow_state.items())
    shape = r"\(MONAI 'blocks\.0\.mlp\.linear1\.bias'\) has shape \(128,\) but the model expects \(256,\)"
    with pytest.raises(CheckpointError, match=shape):
        load_pretrained(tiny_vit(mlp_dim=256), path)

    network = {
        "_target_": "monai_prompt.nets.PromptClassifier",
        "num_classes": 2,
        "backbone": "vit_tiny",
        "img_size": 32,
        "pretrained": str(path),
        "layer_norm_eps": 1e-12,
        "backbone_overrides": {**ARCH, "num_layers": 1},
    }
    parser = ConfigParser({"network_def": network})
    with pytest.raises(RuntimeError) as error:
        parser.get_parsed_content("network_def")
    assert isinstance(error.value.__cause__, CheckpointError) and "model has 1" in str(error.value.__cause__)
    parser = ConfigParser({"network_def": network})
    parser.update({"network_def#pretrained_strict": False})  # what --network_def#pretrained_strict false sets
    net = parser.get_parsed_content("network_def")
    assert torch.equal(net.backbone.blocks[0].mlp.linear1.weight, reference.blocks[0].mlp.linear1.weight)
    lpm_kwargs = {"backbone": "vit_tiny", "img_size": 32, "pretrained": str(path), "layer_norm_eps": 1e-12}
    lpm_kwargs["backbone_overrides"] = {**ARCH, "num_layers": 1}
    with pytest.raises(CheckpointError, match="checkpoint has 2 blocks, model has 1"):
        FPTClassifier(2, "fpt", {"side_img_size": 16}, **lpm_kwargs)
    lpm = FPTClassifier(2, "fpt", {"side_img_size": 16}, **lpm_kwargs, pretrained_strict=False).lpm
    assert torch.equal(lpm.blocks[0].attn.qkv.weight, reference.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("size", [32, 48])
def test_vit_from_pretrained_builds_the_huggingface_vit(hf_dir, size):
    """The architecture and eps come from config.json; resized, it matches transformers' interpolate_pos_encoding."""
    path, hf = hf_dir
    vit, report = vit_from_pretrained(path, img_size=size)
    assert report.inferred["architecture"] == ("vit", "config.json model_type")
    assert report.inferred["layer_norm_eps"] == (1e-12, "config.json layer_norm_eps")
    assert not report.missing and not report.unexpected
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = hf(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        got = vit.eval()(x)[0]
    assert (got - expected).abs().max() < 1e-5


def test_unreadable_configs_indexes_and_jax_weights_are_named(hf_dir, tmp_path):
    """A damaged config.json or shard index beside good weights, and the original JAX ViT releases (.npz), are named
    as such, not with a JSON or torch traceback."""
    path, _ = hf_dir
    folder = tmp_path / "hf"
    shutil.copytree(path, folder)
    (folder / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(CheckpointError, match=r"config\.json: cannot be read as a model config \(a JSON object\)"):
        vit_from_pretrained(folder)
    (folder / "config.json").write_text("[64]")
    with pytest.raises(CheckpointError, match=r"config\.json: holds a JSON list, not a model config"):
        load_pretrained(tiny_vit(), folder)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(CheckpointError, match=r"index\.json: cannot be read as a shard index"):
        load_pretrained(tiny_vit(), tmp_path / "model.safetensors.index.json")
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=r"index\.json: a shard index without its 'weight_map'"):
        load_pretrained(tiny_vit(), tmp_path / "model.safetensors.index.json")
    (tmp_path / "ViT-B_16.npz").write_bytes(b"PK\x03\x04")
    with pytest.raises(CheckpointError, match=r"ViT-B_16\.npz: JAX/Flax weights .* from timm"):
        vit_from_pretrained(tmp_path / "ViT-B_16.npz")


def test_a_hugging_face_cache_folder_names_its_snapshot(hf_dir, tmp_path):
    """``~/.cache/huggingface/hub/models--org--name`` holds the weights under ``snapshots/<revision>/``: the error names
    the snapshot ``refs/main`` points to."""
    path, _ = hf_dir
    cache = tmp_path / "models--google--vit"
    for revision in ("0a1b", "9f8e"):
        shutil.copytree(path, cache / "snapshots" / revision)
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("9f8e\n")
    with pytest.raises(CheckpointError, match=r"it is a Hugging Face cache folder: pass its snapshot folder, "
                       rf"{re.escape(str(cache / 'snapshots' / '9f8e'))}\.$"):
        load_pretrained(tiny_vit(), cache)


@pytest.mark.parametrize(("name", "argument"), [("tf_model.h5", "from_tf"), ("flax_model.msgpack", "from_flax")])
def test_a_hugging_face_folder_of_another_framework_says_where_pytorch_weights_come_from(tmp_path, name, argument):
    (tmp_path / "config.json").write_text('{"model_type": "vit"}')
    (tmp_path / name).write_bytes(b"\x89HDF")
    with pytest.raises(CheckpointError, match=rf"it holds {re.escape(name)}, another framework's weights: .*"
                       rf"model\.safetensors.* {argument}=True"):
        load_pretrained(tiny_vit(), tmp_path)
