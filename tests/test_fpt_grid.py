"""FPT / FPT+ with a SAM-family LPM (SAM's ViT image encoder, LiteMedSAM's TinyViT): the extraction against a
literal float64 reference (windows, position bias, importance without CLS, top-k), the cache round trip with a
released LPM, and the trainable-parameter counts at full size."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser, ckpt_export
from monai.data import MetaTensor

from bundle_support import REPO, copy_bundle, write_training_record
from grid_support import (
    CHECK_SIZE,
    IMG,
    SAM_TINY,
    TINYVIT_TINY,
    _windows,
    randomise,
    sam_attention,
    tiny_encoder,
    tinyvit_attention,
)
from monai_prompt.backbones.tinyvit import build_tinyvit
from monai_prompt.fpt import FPTFeatureCache, cache_identity, content_key, preload_features
from monai_prompt.fpt.grid_lpm import SAMLPM, TinyViTLPM
from monai_prompt.nets import FPTClassifier
from monai_prompt.peft import delta_state_dict, save_delta, trainable_report
from monai_prompt.tools.export import export_bundle

PRESET = {"sam": ("sam_vit_b", SAM_TINY), "tinyvit": ("lite_medsam", TINYVIT_TINY)}


def tiny_grid_fpt(family: str, variant: str, size: int = IMG, **config) -> FPTClassifier:
    """An FPT classifier whose LPM is the tiny random ``family`` encoder of ``grid_support`` (side input 16 px)."""
    encoder = tiny_encoder(family) if size == IMG else randomise(build_tinyvit(img_size=size, **TINYVIT_TINY))
    return FPTClassifier(3, variant, {"side_img_size": 16, **config}, backbone=encoder, img_size=size)


def ref_window_kv(block, grid: torch.Tensor, family: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys, values [H, N, d] and importance [H, N] of one sample's block, literally: window by window (padded at the
    bottom/right), head by head, position bias added; a key's score is the attention it receives from the real
    queries of its window, over the N real queries of the image."""
    attn = block.attn
    height, width, channels = grid.shape
    side = block.window_size if block.window_size > 0 else height
    heads, dim = attn.num_heads, channels // attn.num_heads
    tokens = height * width
    keys = torch.zeros(heads, tokens, dim, dtype=grid.dtype)
    values = torch.zeros_like(keys)
    score = torch.zeros(heads, tokens, dtype=grid.dtype)
    pos = torch.arange(side * side)
    rows, cols = pos // side, pos % side
    for top, left, window in _windows(grid, side):
        if family == "sam":  # the grid is norm1's output; qkv ordered (q|k|v, head, d)
            qkv = (window @ attn.qkv.weight.t() + attn.qkv.bias).reshape(-1, 3, heads, dim)
            q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
            dh, dw = rows[:, None] - rows[None, :] + side - 1, cols[:, None] - cols[None, :] + side - 1
        else:  # the attention norms its window itself; qkv ordered (head, q|k|v, d)
            normed = F.layer_norm(window, (channels,), attn.norm.weight, attn.norm.bias, attn.norm.eps)
            qkv = (normed @ attn.qkv.weight.t() + attn.qkv.bias).reshape(-1, heads, 3, dim)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            offsets = (rows[:, None] - rows[None, :]).abs() * side + (cols[:, None] - cols[None, :]).abs()
        real = (top + rows < height) & (left + cols < width)
        for h in range(heads):
            logits = q[:, h] @ k[:, h].t() / math.sqrt(dim)
            if family == "sam":
                logits = logits + torch.einsum("id,ijd->ij", q[:, h], attn.rel_pos_h[dh])
                logits = logits + torch.einsum("id,ijd->ij", q[:, h], attn.rel_pos_w[dw])
            else:
                logits = logits + attn.attention_biases[h][offsets]
            received = logits.softmax(dim=-1)[real].sum(dim=0) / tokens  # over the window's real queries
            for j in torch.nonzero(real).flatten().tolist():
                token = (top + int(rows[j])) * width + left + int(cols[j])
                keys[h, token], values[h, token], score[h, token] = k[j, h], v[j, h], received[j]
    return keys, values, score


def ref_select(keys, values, score, keep: int) -> torch.Tensor:
    """[2, H, keep, d]: per head the ``keep`` tokens of highest score, highest first (a Python sort)."""
    out = torch.zeros(2, keys.shape[0], keep, keys.shape[-1], dtype=keys.dtype)
    for h in range(keys.shape[0]):
        order = sorted(range(keys.shape[1]), key=lambda j: -float(score[h, j]))[:keep]
        out[0, h], out[1, h] = keys[h, order], values[h, order]
    return out


def ref_grid_features(lpm, image: torch.Tensor, family: str) -> torch.Tensor:
    """[B, 2, L, H, n, d] written out: the encoder's blocks with grid_support's literal attention, the tapped ones
    read by :func:`ref_window_kv`."""
    per_sample = [[] for _ in range(image.shape[0])]

    def tap(block, grid):
        for b in range(grid.shape[0]):
            per_sample[b].append(ref_select(*ref_window_kv(block, grid[b], family), lpm.num_keep))

    if family == "sam":
        patch = lpm.patch_embed.proj
        t = F.conv2d(image, patch.weight, patch.bias, stride=patch.stride).permute(0, 2, 3, 1) + lpm.pos_embed
        for index, block in enumerate(lpm.blocks):
            normed = F.layer_norm(t, (t.shape[-1],), block.norm1.weight, block.norm1.bias, block.norm1.eps)
            if index in lpm.taps:
                tap(block, normed)
            t = t + sam_attention(block, normed, None, "pure_cat")
            t = t + block.mlp(block.norm2(t))
    else:
        t = lpm.layers[0](lpm.patch_embed(image))
        index = 0
        for layer in lpm.layers[1:]:
            t = t.permute(0, 2, 3, 1)
            for block in layer.blocks:
                if index in lpm.taps:
                    tap(block, t)
                t = t + tinyvit_attention(block, t, None, "pure_cat")
                t = block.local_conv(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
                t = t + block.mlp(t)
                index += 1
            t = t.permute(0, 3, 1, 2)
            t = t if layer.downsample is None else layer.downsample(t)
    return torch.stack([torch.stack(layers, dim=1) for layers in per_sample])


@pytest.mark.parametrize(
    ("family", "variant", "layers", "taps"),
    [
        ("sam", "fpt", None, [1, 3]),  # default: the global-attention blocks (4 x 4 grid, no padding)
        ("sam", "fptplus", [0, 2], [0, 2]),  # windowed blocks: windows of 3 on a 4 x 4 grid, padded to 6 x 6
        ("tinyvit", "fpt", None, [3]),  # default: the last stage (at 16 px: one window of 5 on 4 x 4, padded)
        ("tinyvit", "fptplus", [0, 1], [0, 1]),  # first attention stage: windows of 7 on 8 x 8, padded
    ],
)
def test_grid_lpm_features_match_the_literal_reference(family, variant, layers, taps):
    size = CHECK_SIZE[family]
    chosen = {} if layers is None else {"layers": layers}
    net = tiny_grid_fpt(family, variant, size, token_ratio=0.3, **chosen).double()
    lpm = net.lpm
    assert isinstance(lpm, SAMLPM if family == "sam" else TinyViTLPM) and lpm.taps == taps
    image = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    features = lpm.extract(image)
    assert list(features.shape[1:]) == net.feature_shape
    torch.testing.assert_close(features, ref_grid_features(lpm, image, family), rtol=0, atol=1e-10)
    assert torch.equal(lpm.extract(MetaTensor(image)).as_tensor(), features)  # what a bundle's preload hands in
    # the LPM keeps its encoder's outputs and keys
    plain = (tiny_encoder(family) if size == IMG else randomise(build_tinyvit(img_size=size, **TINYVIT_TINY))).double()
    assert lpm.state_dict().keys() == plain.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(lpm(image), plain(image), rtol=0, atol=1e-12)


def test_grid_lpm_errors_and_layer_keywords():
    with pytest.raises(ValueError, match="needs a CLS token"):
        tiny_grid_fpt("sam", "fpt", token_importance="class_token")
    with pytest.raises(ValueError, match=r"differ in \(width, heads, grid\)"):
        tiny_grid_fpt("tinyvit", "fpt", layers=[1, 2])
    lite = FPTClassifier(2, "fpt", backbone="lite_medsam", img_size=64, backbone_overrides=TINYVIT_TINY)
    assert lite.lpm.taps == [3] and lite.feature_shape == [2, 1, 4, int(16 * 16 * 0.2), 8]


def test_cache_round_trip_with_a_released_sam_family_lpm(tmp_path):
    net = tiny_grid_fpt("tinyvit", "fptplus").eval()
    items = [{"image": torch.rand(3, IMG, IMG, generator=torch.Generator().manual_seed(i))} for i in range(3)]
    report = preload_features(net, items, tmp_path, batch_size=2, storage_dtype="float16")
    assert (report.computed, report.entries) == (3, 3)
    identity, delta = cache_identity(net), delta_state_dict(net)["peft"]
    assert identity["lpm"]["family"] == "tinyvit" and identity["feature_shape"] == net.feature_shape
    images = torch.stack([item["image"] for item in items])
    with torch.no_grad():
        online = net(images)
    net.release_lpm()
    assert cache_identity(net) == identity and delta_state_dict(net)["peft"] == delta
    cache = FPTFeatureCache(tmp_path, cache_identity(net))
    kv = torch.stack([cache.load(content_key(item["image"])) for item in items])
    with torch.no_grad():
        cached = net(images, kv)
    torch.testing.assert_close(cached, online, rtol=0, atol=2e-3)  # fp16 storage
    again = preload_features(tiny_grid_fpt("tinyvit", "fptplus"), items, tmp_path, storage_dtype="float16")
    assert again.computed == 0 and again.reused == 3  # the same LPM again: every entry found by its content key


@pytest.mark.parametrize(
    ("backbone", "size", "variant", "taps", "side", "learnable", "percent"),
    [
        ("lite_medsam", 256, "fpt", [8, 9], 112, 99_765, 1.742),
        ("lite_medsam", 256, "fptplus", [9], 64, 70_085, 1.224),
        ("sam_vit_b", 1024, "fpt", [2, 5, 8, 11], 448, 751_781, 0.838),
        ("sam_vit_b", 1024, "fptplus", [8, 11], 256, 422_885, 0.472),
    ],
)
def test_parameter_counts_at_full_size(backbone, size, variant, taps, side, learnable, percent):
    with torch.device("meta"):
        net = FPTClassifier(5, variant, backbone=backbone, img_size=size)
    width = net.lpm.kv_width
    d, layers = width // 8, len(taps)
    vit_layer = 4 * (d * d + d) + 2 * (4 * d * d) + 4 * d + d + 4 * d
    tokens = (side // 16) ** 2 + 1
    side_vit = layers * vit_layer + 3 * 16 * 16 * d + d + d + tokens * d + 2 * d + 5 * d + 5
    prompts = 16 * (d if variant == "fpt" else width)
    fusion = layers * prompts + (d * width + width if variant == "fpt" else 2 * width) + width * d + d
    assert net.lpm.taps == taps and net.side_img_size == [side, side]
    assert net.learnable_parameters() == side_vit + fusion == learnable
    report = trainable_report(net)
    assert report["trainable"] == learnable and round(report["percent_of_backbone"], 3) == percent


@pytest.mark.parametrize("name", ["fpt_classification", "fptplus_classification"])
def test_fpt_bundles_build_the_tinyvit_lpm(name):
    """``--backbone lite_medsam`` (tiny shape) gives the bundle's network a TinyViT LPM and its side input."""
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / name / "configs" / "train.json"))
    parser.update({"backbone": "lite_medsam", "backbone_overrides": dict(TINYVIT_TINY), "img_size": 64,
                   "pretrained": None, "num_classes": 3})
    net = parser.get_parsed_content("network_def")
    assert isinstance(net.lpm, TinyViTLPM) and net.lpm.taps == [3]
    assert net.side_img_size == ([32, 32] if name.startswith("fpt_") else [16, 16])  # 224 / 128 at 512, in patches


@pytest.mark.parametrize("family", ["sam", "tinyvit"])
def test_torchscript_matches_eager(family):
    """FPT (default taps) and FPT+ on padded windowed taps script; online and cached logits equal eager ones (the
    TinyViT's scripted convolutions keep their BatchNorm unfolded: float32 rounding)."""
    padded = {"sam": [0, 2], "tinyvit": [0, 1]}[family]
    image = torch.rand(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(2))
    for variant, config in (("fpt", {}), ("fptplus", {"layers": padded})):
        net = tiny_grid_fpt(family, variant, **config).eval()
        scripted = torch.jit.script(net)
        with torch.no_grad():
            eager = net(image)
            torch.testing.assert_close(scripted(image), eager, rtol=0, atol=1e-5)
            features = net.lpm_features(image)
            torch.testing.assert_close(scripted.lpm.extract(image), features, rtol=0, atol=1e-4)
            side = image[:, :, ::2, ::2]
            torch.testing.assert_close(scripted(side, features), net(side, features), rtol=0, atol=0)
            assert torch.equal(net(image), eager)  # the scripted copy left the eager LPM's capture alone


@pytest.mark.parametrize(("name", "family"), [("fpt_classification", "tinyvit"), ("fptplus_classification", "sam")])
def test_export_and_ckpt_export_write_torchscript(name, family, tmp_path):
    """``monai-prompt export`` and MONAI's ``ckpt_export`` of its state dict script an FPT bundle's network on a
    SAM-family LPM; both files give the eager logits."""
    bundle = copy_bundle(name, tmp_path)
    weights = tmp_path / f"{family}.pt"
    torch.save(tiny_encoder(family).state_dict(), weights)
    backbone, shape = PRESET[family]
    overrides = {"backbone": backbone, "backbone_overrides": {k: list(v) if isinstance(v, tuple) else v
                                                              for k, v in shape.items()},
                 "img_size": IMG, "pretrained": str(weights), "num_classes": 3,
                 "method_config": {"side_img_size": 16}}
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.update(overrides)
    net = parser.get_parsed_content("network_def").eval()
    save_delta(net, bundle / "models" / "model.pt")
    write_training_record(bundle, **overrides)
    report = export_bundle(bundle, overrides=overrides)
    ts_file = bundle / "models" / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts_file), ckpt_file=str(report.state_dict),
                meta_file=str(bundle / "configs" / "metadata.json"),
                config_file=str(bundle / "configs" / "inference.json"), **overrides)
    image = torch.rand(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        eager = net(image)
        for path in (report.torchscript, ts_file):
            torch.testing.assert_close(torch.jit.load(str(path))(image), eager, rtol=0, atol=1e-5)
