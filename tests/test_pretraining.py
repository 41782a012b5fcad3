"""MAE pre-training: the masked-patch loss against a literal formula, and the vit_pretraining bundle end to end."""

from __future__ import annotations

import itertools
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from monai.bundle import verify_metadata
from monai.networks.blocks import PatchEmbeddingBlock

from bundle_support import REPO, TINY_BACKBONE, TINY_IMG_SIZE, copy_bundle
from monai_prompt.backbones import build_vit, check_sincos_width
from monai_prompt.backbones.pretrained import load_pretrained
from monai_prompt.bundle_gen.metadata import schema_file
from monai_prompt.data import ClassificationDatalist
from monai_prompt.losses import MaskedPatchLoss, patchify
from monai_prompt.nets import PromptClassifier
from monai_prompt.runs.runner import run_bundle


def write_unlabeled_images(root: Path, training: int = 4, unlabeled: int = 8) -> Path:
    """Random grey PNGs in the ``training`` (labelled) and ``unlabeled`` splits, and their ``datalist.json``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    splits: dict[str, list[dict]] = {"training": [], "unlabeled": []}
    for split, count in (("training", training), ("unlabeled", unlabeled)):
        for index in range(count):
            path = root / split / f"{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (TINY_IMG_SIZE, TINY_IMG_SIZE), dtype=np.uint8)).save(path)
            splits[split].append({"image": str(path)} | ({"label": index % 2} if split == "training" else {}))
    return ClassificationDatalist(["a", "b"], splits).save_json(root / "datalist.json")


def literal_mae_loss(image, pred, mask, patch, norm_pix, eps=1e-6):
    """The MAE loss written out with loops: patch (g1, g2) row-major, values ordered (p1, p2, c)."""
    batch, channels, height, width = image.shape
    p1, p2 = patch
    total, hidden = 0.0, 0.0
    for b in range(batch):
        for n, (g1, g2) in enumerate(itertools.product(range(height // p1), range(width // p2))):
            values = [
                float(image[b, c, g1 * p1 + i, g2 * p2 + j])
                for i in range(p1) for j in range(p2) for c in range(channels)
            ]
            if norm_pix:
                mean = sum(values) / len(values)
                var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
                values = [(v - mean) / (var + eps) ** 0.5 for v in values]
            error = sum((float(pred[b, n, k]) - v) ** 2 for k, v in enumerate(values)) / len(values)
            total += float(mask[b, n]) * error
            hidden += float(mask[b, n])
    return total / hidden


@pytest.mark.parametrize("norm_pix", [True, False])
def test_masked_patch_loss_matches_literal_formula(norm_pix):
    torch.manual_seed(0)
    patch = (4, 2)
    image = torch.rand(2, 3, 8, 6, dtype=torch.float64)
    pred = torch.randn(2, 6, 4 * 2 * 3, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 1, 1, 0, 1, 1]], dtype=torch.int32)
    loss = MaskedPatchLoss(patch, norm_pix=norm_pix)((pred, mask), image)
    expected = literal_mae_loss(image, pred, mask, patch, norm_pix)
    assert loss.item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_patchify_follows_monai_patch_embedding_order(spatial_dims):
    """A conv patch embedding whose output channel k copies value k of a patch gives exactly patchify's rows."""
    channels, patch, size = 2, 2, 4
    embed = PatchEmbeddingBlock(channels, size, patch, hidden_size=channels * patch**spatial_dims, num_heads=1,
                                pos_embed_type="none", spatial_dims=spatial_dims)
    conv = embed.patch_embeddings
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        offsets = itertools.product(*[range(patch)] * spatial_dims, range(channels))  # (p1, .., pn, c) order
        for k, (*position, c) in enumerate(offsets):
            conv.weight[(k, c, *position)] = 1.0
    image = torch.rand(2, channels, *[size] * spatial_dims)
    torch.testing.assert_close(patchify(image, patch), embed(image), rtol=0, atol=1e-6)


def test_masked_patch_loss_rejects_wrong_inputs():
    loss = MaskedPatchLoss(4)
    with pytest.raises(TypeError, match="MaskedAutoEncoderViT"):
        loss(torch.zeros(1, 4, 16), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="does not match the image's patches"):
        loss((torch.zeros(1, 4, 32), torch.ones(1, 4)), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        patchify(torch.zeros(1, 1, 6, 8), 4)


@pytest.mark.slow
def test_pretraining_bundle_output_loads_into_prompt_classifier(tmp_path):
    data = write_unlabeled_images(tmp_path / "data").parent
    bundle = copy_bundle("vit_pretraining", tmp_path)
    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(schema_file()))
    decoder = {"hidden_size": 16, "mlp_dim": 32, "num_layers": 1, "num_heads": 2}
    workflow = run_bundle(
        bundle, ["train.json"], "train", tracking="mlflow", dataset_dir=str(data), img_size=TINY_IMG_SIZE,
        backbone_overrides=dict(TINY_BACKBONE), decoder=decoder, batch_size=4, **{"train#trainer#max_epochs": 1},
    )
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.iteration == 3  # 4 training (labels unused) + 8 unlabelled images, batch 4

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{bundle / 'eval' / 'mlruns.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("monai_prompt_pretraining").experiment_id])
    (logged,) = client.get_metric_history(run.info.run_id, "mean_train_loss")  # one epoch
    losses = [metric.value for metric in client.get_metric_history(run.info.run_id, "train_loss")]
    assert len(losses) == 3  # MONAI's handler: every iteration
    # the epoch metric is the mean of the iteration losses (three batches of 4)
    assert trainer.state.metrics["mean_train_loss"] == pytest.approx(np.mean(losses))
    assert logged.value == pytest.approx(trainer.state.metrics["mean_train_loss"])
    mae = workflow.parser.get_parsed_content("network")
    checkpoint = bundle / "models" / "model.pt"
    assert torch.load(checkpoint, weights_only=True).keys() == mae.state_dict().keys()

    shape = {"backbone": "vit_tiny", "in_channels": 1, "img_size": TINY_IMG_SIZE, "layer_norm_eps": 1e-5,
             "backbone_overrides": dict(TINY_BACKBONE)}
    net = PromptClassifier(num_classes=3, method="dvpt", pretrained=str(checkpoint), **shape)
    last = TINY_BACKBONE["num_layers"]  # MAE keeps its final LayerNorm as the last entry of `blocks`
    mae_state, vit_state = mae.state_dict(), net.backbone.state_dict()
    for key in ("patch_embedding.patch_embeddings.weight", "patch_embedding.position_embeddings", "cls_token",
                "blocks.1.attn.qkv.weight", "blocks.1.attn.qkv.bias", "blocks.0.mlp.linear2.weight"):
        torch.testing.assert_close(vit_state[key], mae_state[key], rtol=0, atol=0)
    torch.testing.assert_close(vit_state["norm.weight"], mae_state[f"blocks.{last}.weight"], rtol=0, atol=0)

    # the loaded ViT computes the MAE encoder's features when nothing is masked
    vit = build_vit(shape["backbone"], in_channels=1, img_size=TINY_IMG_SIZE, layer_norm_eps=1e-5, **TINY_BACKBONE)
    load_pretrained(vit, checkpoint)
    image = torch.rand(2, 1, TINY_IMG_SIZE, TINY_IMG_SIZE)
    with torch.no_grad():
        tokens = mae.patch_embedding(image)
        encoded = mae.blocks(torch.cat([mae.cls_token.expand(2, -1, -1), tokens], dim=1))
        torch.testing.assert_close(vit(image)[0], encoded, rtol=1e-5, atol=1e-5)


def test_pretraining_bundle_checks_a_plain_image_folder_before_training(tmp_path):
    """A plain folder of the user's images is the data; an unreadable one among them is named before training (the
    loader's error would come screens into caching), and too few images for a batch name --batch_size."""
    from monai.bundle import ConfigParser
    from PIL import Image

    from monai_prompt.data import DataCheckError
    from monai_prompt.runs import root_cause

    data = tmp_path / "images"
    data.mkdir()
    Image.fromarray(np.zeros((20, 24), dtype=np.uint8)).save(data / "grey.png")
    Image.fromarray(np.zeros((30, 30, 3), dtype=np.uint8)).save(data / "rgb.png")
    parser = ConfigParser()
    parser.read_config(str(copy_bundle("vit_pretraining", tmp_path) / "configs" / "train.json"))
    parser.update({"dataset_dir": str(data), "batch_size": 2})
    check = next(i for i, step in enumerate(parser["initialize"]) if "check_images" in step)
    assert [Path(item["image"]).name for item in parser.get_parsed_content("train#dataset#data")] == [
        "grey.png", "rgb.png"]
    parser.get_parsed_content(f"initialize#{check}")
    (data / "broken.png").write_bytes(b"not a png")
    parser.update({"batch_size": 4})
    parser.parse()
    with pytest.raises(RuntimeError) as error:  # MONAI wraps what a config expression raises
        parser.get_parsed_content("train#dataset#data")
    assert "3 images to pre-train on but --batch_size 4" in str(root_cause(error.value)[0])
    parser.update({"batch_size": 2})
    parser.parse()
    with pytest.raises(RuntimeError) as error:
        parser.get_parsed_content(f"initialize#{check}")
    cause = root_cause(error.value)[0]
    assert isinstance(cause, DataCheckError) and "broken.png: unreadable" in str(cause)


@pytest.mark.filterwarnings("ignore:torch.meshgrid")  # inside MONAI's sin-cos embedding
def test_pretraining_refuses_a_width_its_sin_cos_position_embeddings_cannot_take():
    """MONAI's fixed sin-cos position embedding needs widths that are multiples of 4 in 2D and of 6 in 3D (3D
    pre-training with the decoder's 64 ended in MONAI's AssertionError; 3D's default is now 72): refused before the
    run folder is
    touched, naming the setting and the nearest widths that work (and that the heads divide), which build."""
    from monai.bundle import ConfigParser
    from monai.networks.nets import MaskedAutoEncoderViT

    from monai_prompt.runs import root_cause

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "vit_pretraining" / "configs" / "train.json"))
    steps = parser["initialize"]
    encoder, decoder = (i for i, text in enumerate(steps) if "check_sincos_width" in text)
    assert decoder < next(i for i, text in enumerate(steps) if "claim_run_folder" in text)
    for step in (encoder, decoder):
        parser.get_parsed_content(f"initialize#{step}")  # 2D: 96 and 64 are multiples of 4
    parser["spatial_dims"] = 3
    for step in (encoder, decoder):  # 96 and the 3D default decoder's 72: multiples of 6
        parser.get_parsed_content(f"initialize#{step}")
    parser["decoder#hidden_size"] = 64  # the 2D width
    with pytest.raises(RuntimeError) as error:  # MONAI wraps what a config expression raises
        parser.get_parsed_content(f"initialize#{decoder}")
    assert str(root_cause(error.value)[0]) == (
        "--decoder#hidden_size 64: a 3D sin-cos position embedding needs a width that is a multiple of 6 (and of "
        "num_heads 4); give --decoder#hidden_size 60 or 72.")
    parser["backbone_overrides"] = {**parser["backbone_overrides"], "hidden_size": 100}
    with pytest.raises(RuntimeError) as error:
        parser.get_parsed_content(f"initialize#{encoder}")
    assert str(root_cause(error.value)[0]).endswith("give --backbone_overrides#hidden_size 96 or 108.")
    with pytest.raises(ValueError, match=r"^--hidden_size 90: a 2D sin-cos .* multiple of 4; give --hidden_size 88 or "
                       r"92\.$"):
        check_sincos_width(90, 2)

    shape = {"in_channels": 1, "img_size": 8, "patch_size": 4, "num_layers": 1, "decoder_num_layers": 1,
             "num_heads": 4, "decoder_num_heads": 4, "mlp_dim": 8, "decoder_mlp_dim": 8, "spatial_dims": 3}
    with pytest.raises(AssertionError, match="divisible by 6"):  # what the refusal spares the user
        MaskedAutoEncoderViT(hidden_size=96, decoder_hidden_size=64, **shape)
    MaskedAutoEncoderViT(hidden_size=96, decoder_hidden_size=60, **shape)
    MaskedAutoEncoderViT(hidden_size=108, decoder_hidden_size=72, **shape)
