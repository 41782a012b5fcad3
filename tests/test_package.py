"""``monai-prompt package``: a trained bundle with its backbone inside, and deltas that refuse any other backbone
whichever loader reads them (MONAI Label: ``network.load_state_dict(ckpt["model"], strict=False)``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from bundle_support import TINY_BACKBONE, TINY_IMG_SIZE, copy_bundle, tiny_overrides, write_tiny_backbone
from monai_prompt.bundle_gen.specs import ALL_BUNDLE_SPECS, BUNDLE_SPECS
from monai_prompt.cli import main
from monai_prompt.engine import latest_checkpoint
from monai_prompt.engine.tracking import TRAINING_RUN_FILE, recorded_training_run
from monai_prompt.peft.delta import FINGERPRINT_KEY, IDENTITY_KEYS, SOURCE_KEY, DeltaMismatchError, backbone_source
from monai_prompt.runs.runner import run_bundle
from monai_prompt.tools.package import package_bundle
from segmentation_support import (
    TINY_CLASSES,
    TINY_ENCODER,
    TINY_ROI,
    tiny_segmentation_overrides,
    write_tiny_encoder,
    write_tiny_segmentation,
)

SPEC = BUNDLE_SPECS["lora_classification"]
#: what inference needs besides the training record: where the images are, and no worker processes.
DATA_ONLY = ("dataset_dir", "num_workers", "batch_size")


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory) -> tuple[Path, dict]:
    """The LoRA classification bundle trained one epoch on the tiny data and backbone, and its overrides."""
    bundle = copy_bundle(SPEC.name, tmp_path_factory.mktemp("trained"))
    overrides = tiny_overrides(SPEC, tiny["data"], tiny["backbone"])
    run_bundle(bundle, ["train.json"], "train", quiet=True, **overrides, **{"train#trainer#max_epochs": 1})
    return bundle, overrides


def network(bundle: Path, **overrides):
    """``network_def`` of ``inference.json`` as MONAI Label builds it: ``bundle_root`` set, no ``initialize``."""
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle), **overrides})
    return parser.get_parsed_content("network_def")


def predictions(bundle: Path, **overrides) -> list[list[str]]:
    run_bundle(bundle, ["inference.json"], "infer", quiet=True, **overrides)
    return (bundle / "eval" / "predictions.csv").read_text().splitlines()


def test_packaged_bundle_finds_its_backbone_and_predicts_as_the_original(trained, tiny, tmp_path):
    bundle, overrides = trained
    report = package_bundle(bundle, tmp_path / SPEC.name)  # the weights: the training record's pretrained
    out = report.out
    assert report.backbone == "models/backbone.pt" and report.method == "lora"
    assert sorted(p.name for p in (out / "models").iterdir()) == ["backbone.pt", "model.pt", "training_config.json"]
    assert not (out / "eval").exists() and not list(tmp_path.glob(".*.tmp"))
    assert (out / "models" / "backbone.pt").read_bytes() == Path(tiny["backbone"]).read_bytes()
    for name in ("train.json", "evaluate.json", "inference.json"):
        config = json.loads((out / "configs" / name).read_text())
        assert config["pretrained"] == "$@bundle_root + '/models/backbone.pt'"
    record = json.loads((out / "models" / "training_config.json").read_text())
    assert record["pretrained"] == "models/backbone.pt"
    assert record["packaged_from"]["pretrained"] == str(Path(tiny["backbone"]).resolve())

    # the network settings it was trained with, in every config (MONAI Label passes none); the classes in metadata
    for name in ("train.json", "evaluate.json", "inference.json"):
        config = json.loads((out / "configs" / name).read_text())
        assert config["backbone"] == "vit_tiny" and config["img_size"] == TINY_IMG_SIZE
        assert config["backbone_overrides"] == TINY_BACKBONE == record["backbone_overrides"]
        assert config["method_config"] == record["method_config"] and "continue_model" not in config
    train = json.loads((out / "configs" / "train.json").read_text())
    assert train["class_names"] == json.loads((bundle / "configs" / "train.json").read_text())["class_names"]
    meta = json.loads((out / "configs" / "metadata.json").read_text())["network_data_format"]
    classes = {str(i): name for i, name in enumerate(record["class_names"])}
    assert meta["outputs"]["pred"]["channel_def"] == meta["post_processed_outputs"]["pred"]["channel_def"] == classes
    assert meta["inputs"]["image"]["spatial_shape"] == [TINY_IMG_SIZE, TINY_IMG_SIZE]

    data_only = {key: overrides[key] for key in DATA_ONLY}
    assert predictions(out, **data_only) == predictions(bundle, **overrides)

    # MONAI Label's load: the network of the packaged config takes the delta's model entry as it is
    delta = torch.load(out / "models" / "model.pt", weights_only=True)
    net = network(out)
    assert backbone_source(net) == str(out / "models" / "backbone.pt")  # its own copy, not the original file
    net.load_state_dict(delta["model"], strict=False)
    assert torch.equal(net.head.weight, delta["model"]["head.weight"])


def test_the_packaged_delta_keeps_the_mlflow_run_that_trained_it(trained, tmp_path):
    """A tracked training run names its MLflow run beside its checkpoints; the package copies that record, so that
    evaluations of the packaged bundle log ``training_run_id`` (they logged none)."""
    bundle, _ = trained
    record = bundle / "models" / TRAINING_RUN_FILE
    record.write_text('{"run_id": "abc123", "run_name": "lora_train", "experiment_id": "1"}\n')
    try:
        out = package_bundle(bundle, tmp_path / SPEC.name).out
    finally:
        record.unlink()
    assert (out / "models" / TRAINING_RUN_FILE).read_bytes() == b'{"run_id": "abc123", "run_name": "lora_train", ' \
        b'"experiment_id": "1"}\n'
    assert recorded_training_run(out / "models" / "model.pt") == "abc123"  # what a packaged evaluation logs


def test_delta_refuses_a_random_or_other_backbone_and_takes_the_right_one(trained, tiny, tmp_path):
    bundle, _ = trained
    delta = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert set(IDENTITY_KEYS) <= set(delta["model"])
    recorded = str(Path(tiny["backbone"]).resolve())
    fingerprint = delta["peft"]["backbone"]["fingerprint"]

    with pytest.raises(DeltaMismatchError) as random_backbone:
        network(bundle, pretrained=None).load_state_dict(delta["model"], strict=False)
    message = str(random_backbone.value)
    assert "from pretrained=None: random weights" in message and f"recorded source {recorded!r}" in message
    assert f"(fingerprint {fingerprint[:12]}," in message and "monai-prompt package BUNDLE --pretrained" in message

    other = write_tiny_backbone(tmp_path / "other.pt", seed=1)
    with pytest.raises(DeltaMismatchError, match=f"from pretrained='{other}'"):
        network(bundle, pretrained=str(other)).load_state_dict(delta["model"], strict=False)

    right = network(bundle, pretrained=str(tiny["backbone"]))
    before = right.head.weight.detach().clone()
    right.load_state_dict(delta["model"], strict=False)  # the check does not fire for the backbone of the delta
    assert torch.equal(right.head.weight, delta["model"]["head.weight"])
    assert not torch.equal(before, right.head.weight)


def test_a_failed_package_leaves_nothing_and_names_the_cause(trained, tmp_path, capsys):
    bundle, _ = trained
    other = write_tiny_backbone(tmp_path / "other.pt", seed=1)
    out = tmp_path / "out" / SPEC.name
    with pytest.raises(SystemExit, match="package: .*model.pt: the frozen backbone weights differ"):
        main(["package", str(bundle), "--pretrained", str(other), "--out", str(out)])
    assert not out.exists() and list(out.parent.iterdir()) == []  # no partial copy, no temporary folder
    with pytest.raises(FileExistsError, match="choose another --out"):
        package_bundle(bundle, out.parent)
    with pytest.raises(ValueError, match=r"folder name, which must end in _classification for this classification "
                                         r"delta \(e\.g\. --out .*/out/lora_classification\)\.$"):
        package_bundle(bundle, out.parent / "my_model")  # MONAI Label would not know the task
    with pytest.raises(FileNotFoundError, match=r"--model .*models is a folder; pass the delta in it \(e\.g\. --model "
                                                r".*models/model\.pt\)\.$"):  # not "does not exist"
        package_bundle(bundle, out, model=bundle / "models")
    assert list(out.parent.iterdir()) == []


def test_a_delta_trained_without_pretrained_weights_is_named_so(trained, tmp_path):
    """A run trained without --pretrained (a random backbone, as a first try on new data does): package says that
    the backbone it needs is in no file and what to train instead (before: "pass --pretrained <the weights the delta
    was trained on>", of which there are none)."""
    bundle = tmp_path / "bundles" / SPEC.name
    shutil.copytree(trained[0], bundle, ignore=shutil.ignore_patterns(".lock", "checkpoint_*"))
    record = bundle / "models" / "training_config.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "pretrained": None}))
    with pytest.raises(SystemExit, match=(
        rf"^package: {record} names no pretrained weights: the delta was trained on a randomly initialised backbone "
        r"\(its training ran without --pretrained\), which no file holds for a packaged copy to load\. Train again "
        r"with --pretrained <ViT weights> and package that run; if the delta was trained on weights the record does "
        r"not name, pass --pretrained <those weights>\.$")):
        main(["package", str(bundle), "--out", str(tmp_path / "out" / SPEC.name)])


def test_a_truncated_delta_is_named_with_the_fix(trained, tmp_path):
    bundle = tmp_path / "bundles" / SPEC.name
    shutil.copytree(trained[0], bundle, ignore=shutil.ignore_patterns(".lock", "checkpoint_*"))
    delta = bundle / "models" / "model.pt"
    delta.write_bytes(delta.read_bytes()[:-100])  # a copy that stopped short
    out = tmp_path / "out" / SPEC.name
    with pytest.raises(SystemExit, match=(
        rf"^package: {delta} cannot be read \(\d+ bytes; OSError: \[Errno 22\] Invalid argument\): the file is "
        r"truncated or damaged \(an interrupted copy or write, a full disk\), or not a checkpoint\. Copy it again "
        r"from where it came from, or train the bundle again \(configs/train\.json with --overwrite true\), then "
        r"package it; or pass --model <a good delta>\.$")):
        main(["package", str(bundle), "--out", str(out)])
    assert not out.exists()


def test_a_delta_without_identity_keys_is_refused_and_packaged_with_them(trained, tiny, tmp_path):
    bundle, _ = trained
    old = torch.load(bundle / "models" / "model.pt", weights_only=True)
    old["model"] = {k: v for k, v in old["model"].items() if k not in IDENTITY_KEYS}  # as saved before they existed
    models = tmp_path / "old" / "models"
    models.mkdir(parents=True)
    torch.save(old, models / "model.pt")
    (models / "training_config.json").write_bytes((bundle / "models" / "training_config.json").read_bytes())
    with pytest.raises(DeltaMismatchError, match="holds trainable weights only and no 'peft_backbone_fingerprint'"):
        network(bundle, pretrained=str(tiny["backbone"])).load_state_dict(old["model"], strict=False)

    out = package_bundle(bundle, tmp_path / SPEC.name, model=models / "model.pt").out
    packaged = torch.load(out / "models" / "model.pt", weights_only=True)["model"]
    assert bytes(packaged[FINGERPRINT_KEY].tolist()).hex() == old["peft"]["backbone"]["fingerprint"]
    assert bytes(packaged[SOURCE_KEY].tolist()).decode() == str(Path(tiny["backbone"]).resolve())
    network(out).load_state_dict(packaged, strict=False)


@pytest.mark.parametrize("sharded", [False, True])
def test_a_huggingface_folder_travels_as_a_folder(tiny, tmp_path, sharded):
    """backbone='auto' from a HuggingFace ViT folder: the copy is models/backbone/ (hidden entries such as hf's
    .cache/ left out), and the packaged network builds the ViT from it and takes the delta. A sharded checkpoint
    trained from its index file (model.safetensors.index.json) travels with its folder, the index named in it."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    shape = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    hf = tmp_path / "hf_vit"
    ViTModel(ViTConfig(**shape, image_size=TINY_IMG_SIZE, patch_size=TINY_BACKBONE["patch_size"])).save_pretrained(
        hf, max_shard_size="20KB" if sharded else "5GB"
    )
    (hf / ".cache").mkdir()
    files = sorted(p.name for p in hf.iterdir() if not p.name.startswith("."))
    weights = hf / "model.safetensors.index.json" if sharded else hf
    assert sharded == (len(files) > 3)
    bundle = copy_bundle(SPEC.name, tmp_path)
    overrides = {**tiny_overrides(SPEC, tiny["data"], weights), "backbone": "auto", "backbone_overrides": {}}
    run_bundle(bundle, ["train.json"], "train", quiet=True, **overrides, **{"train#trainer#max_epochs": 1})

    out = package_bundle(bundle, tmp_path / "packaged" / SPEC.name).out
    assert sorted(p.name for p in (out / "models" / "backbone").iterdir()) == files
    net = network(out)
    packaged = out / "models" / "backbone"
    assert backbone_source(net) == str(packaged / "model.safetensors.index.json" if sharded else packaged)
    net.load_state_dict(torch.load(out / "models" / "model.pt", weights_only=True)["model"], strict=False)


def test_a_segmentation_package_continues_its_delta_under_the_recorded_run(tmp_path):
    """The packaged train.json sets continue_model and the trained network, so MONAI Label's /train (the datastore
    pairs as train#dataset#data / validate#dataset#data, nothing else) trains it; the run keeps the recorded run id,
    so --resume finds the checkpoint it writes."""
    spec = ALL_BUNDLE_SPECS["vpt_segmentation"]
    datalist = write_tiny_segmentation(tmp_path / "data", 2)
    overrides = tiny_segmentation_overrides(spec, datalist, write_tiny_encoder(tmp_path / "vit.pt", 2))
    bundle = copy_bundle(spec.name, tmp_path)
    run_bundle(bundle, ["train.json"], "train", quiet=True, **overrides, **{"train#trainer#max_epochs": 1})

    out = package_bundle(bundle, tmp_path / "app" / spec.name).out
    train = json.loads((out / "configs" / "train.json").read_text())
    assert train["continue_model"] is True
    assert train["backbone_overrides"] == TINY_ENCODER and train["img_size"] == TINY_ROI
    assert train["feature_size"] == overrides["feature_size"] and train["backbone"] == "vit_tiny"
    meta = json.loads((out / "configs" / "metadata.json").read_text())["network_data_format"]
    assert meta["outputs"]["pred"]["channel_def"] == {str(i): name for i, name in enumerate(TINY_CLASSES)}
    assert meta["inputs"]["image"]["spatial_shape"] == meta["outputs"]["pred"]["spatial_shape"] == [TINY_ROI] * 2

    record_file = out / "models" / "training_config.json"
    record = record_file.read_text()
    delta = (out / "models" / "model.pt").read_bytes()
    splits = json.loads(datalist.read_text())
    pairs = {split: [{key: str(datalist.parent / item[key]) for key in ("image", "label")} for item in splits[split]]
             for split in ("training", "validation")}
    run_bundle(out, ["train.json"], "train", quiet=True, num_workers=0, **{
        "train#dataset#data": pairs["training"], "validate#dataset#data": pairs["validation"],
        "train#trainer#max_epochs": 1})
    assert (out / "models" / "model.pt").read_bytes() != delta
    assert record_file.read_text() == record  # the record, its run id included, is kept
    run = json.loads(record)["run_id"]
    checkpoint = torch.load(latest_checkpoint(out / "models", run_id=run), weights_only=True)
    assert checkpoint["run"]["run_id"] == run
