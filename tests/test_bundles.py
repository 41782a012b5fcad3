"""Every classification bundle trains, evaluates, infers, verifies and exports on tiny data; the generator check."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export, verify_metadata, verify_net_in_out
from monai.transforms import Compose
from PIL import Image

from bundle_support import (
    REPO,
    TINY_BACKBONE,
    TINY_IMG_SIZE,
    copy_bundle,
    metrics_from_predictions,
    tiny_overrides,
    write_tiny_backbone,
    write_tiny_dataset,
)
from monai_prompt.bundle_gen import BUNDLE_SPECS, check_bundles, write_bundles
from monai_prompt.bundle_gen.specs import ALL_BUNDLE_SPECS
from monai_prompt.data import RandLeftRightFlipd, classification_transforms
from monai_prompt.engine import latest_checkpoint
from monai_prompt.fpt.lpm import LPMExtractor
from monai_prompt.peft import DeltaMismatchError
from monai_prompt.runs.runner import read_metrics, run_bundle
from monai_prompt.tools.export import export_bundle


def workflow_error(bundle: Path, files: list[str], workflow_type: str, **overrides) -> BaseException:
    """The error a workflow raises (MONAI wraps errors of config expressions in a RuntimeError)."""
    with pytest.raises(RuntimeError) as info:
        run_bundle(bundle, files, workflow_type, **overrides)
    return info.value.__cause__


def test_committed_bundles_match_generator():
    assert check_bundles(REPO / "bundles") == []


def test_configs_name_only_what_a_package_exports():
    """Every ``monai_prompt`` name in a committed config is an attribute of a package (its ``__init__`` exports it) or
    of a module directly under ``monai_prompt``: no path into a module below a package, so modules can move freely."""
    import importlib.util

    names = {match for path in (REPO / "bundles").glob("*/configs/*.json")
             for match in re.findall(r"monai_prompt(?:\.\w+)+", path.read_text())}
    assert "monai_prompt.engine.ClassMeanDice" in names  # the segmentation bundles' metric
    for name in sorted(names):
        container, _, attribute = name.rpartition(".")
        module = importlib.import_module(container)
        assert hasattr(module, "__path__") or container.count(".") == 1, f"{name}: {container} is not a package"
        assert hasattr(module, attribute) or importlib.util.find_spec(name), f"{name} is not exported"


def test_generator_check_reports_drift(tmp_path):
    write_bundles(tmp_path, ["vpt_classification"])
    assert check_bundles(tmp_path, ["vpt_classification"]) == []
    train = tmp_path / "vpt_classification" / "configs" / "train.json"
    train.write_text(train.read_text().replace('"num_tokens": 5', '"num_tokens": 6'))
    (tmp_path / "vpt_classification" / "configs" / "extra.json").write_text("{}")
    (tmp_path / "vpt_classification" / "models").mkdir()
    (tmp_path / "vpt_classification" / "models" / "model.pt").write_bytes(b"ignored: a run's output")
    problems = check_bundles(tmp_path, ["vpt_classification"])
    assert len(problems) == 2
    assert "train.json: differs" in problems[0] and "extra.json: not rendered" in problems[1]
    (tmp_path / "unknown_classification").mkdir()
    assert any("no bundle spec renders it" in p for p in check_bundles(tmp_path))


def _strings(config) -> Iterator[str]:
    if isinstance(config, dict):
        config = list(config.values())
    if isinstance(config, list):
        for value in config:
            yield from _strings(value)
    elif isinstance(config, str):
        yield config


def test_rendered_configs_import_what_their_expressions_use():
    runs = (["train.json"], ["train.json", "evaluate.json"], ["train.json", "multi_gpu_train.json"], ["inference.json"])
    cases = [(name, files) for name in ALL_BUNDLE_SPECS for files in runs] + [("vit_pretraining", ["train.json"])]
    for name, files in cases:
        parser = ConfigParser()
        parser.read_config([str(REPO / "bundles" / name / "configs" / file) for file in files])
        expressions = [text for text in _strings(parser.get()) if text.startswith("$")]
        imports = {text.removeprefix("$import ") for text in expressions if text.startswith("$import ")}
        code = " ".join(text for text in expressions if not text.startswith("$import "))
        for statement in imports:
            module, _, alias = statement.partition(" as ")
            assert re.search(rf"\b{re.escape(alias or module)}\.", code), f"{name} {files}: {statement} unused"
        for module in set(re.findall(r"\b(monai_prompt\.\w+)\.", code)):
            assert module in imports, f"{name} {files}: expressions use {module} but do not import it"


def _network_setting(bundle: Path, files: list[str], key: str):
    """``key`` as the network of ``files`` (merged) reads it, ``bundle_root`` set as MONAI's tools set it."""
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / name) for name in files])
    parser.update({"bundle_root": str(bundle)})
    return parser.get_parsed_content(key)


def _ids_where(content, found, at: str = "") -> Iterator[str]:
    """The ids of ``content`` whose value ``found`` accepts (e.g. a reference such as ``@flags#amp``)."""
    items = content.items() if isinstance(content, dict) else enumerate(content) if isinstance(content, list) else ()
    for key, value in items:
        child = f"{at}#{key}" if at else str(key)
        if found(value):
            yield child
        else:
            yield from _ids_where(value, found, child)


_FLAG_FILES = (["train.json"], ["train.json", "evaluate.json"], ["train.json", "multi_gpu_train.json"],
               ["inference.json"])


@pytest.mark.parametrize("name", [*sorted(ALL_BUNDLE_SPECS), "vit_pretraining"])
def test_every_boolean_setting_reads_the_command_line_spellings(name):
    """``python -m monai.bundle run ... --resume false`` passes the string ``'false'``: every boolean setting (each
    top-level ``true``/``false``, and ``amp``) is read only through ``flags``, whose entries give real bools for
    ``'false'``/``'true'``, as do the entries that pass a flag on to MONAI or ignite (``"amp": "@flags#amp"``);
    the method config's boolean entries (``--method_config#deep false``) reach the network and the record as bools."""
    configs = REPO / "bundles" / name / "configs"
    method_config = ALL_BUNDLE_SPECS[name].method_config() if name in ALL_BUNDLE_SPECS else {}
    method_flags = [key for key, value in method_config.items() if isinstance(value, bool)]
    for files in _FLAG_FILES:
        if not all((configs / file).is_file() for file in files):  # vit_pretraining: train.json only
            continue
        parser = ConfigParser()
        parser.read_config([str(configs / file) for file in files])
        config = parser.get()
        flags = config["flags"]
        settings = {key for key, value in config.items() if isinstance(value, bool)} | {"amp"}
        assert settings <= set(flags), (files, settings - set(flags))
        text = json.dumps({key: value for key, value in config.items() if key != "flags"})
        for setting in flags:
            assert flags[setting] == f"$monai_prompt.runs.flag(@{setting}, '{setting}')"
            assert not re.search(rf"@{setting}\b", text), (files, setting)  # every use reads @flags#<setting>
            uses = [f"flags#{setting}", *_ids_where(config, lambda value: value == f"@flags#{setting}")]
            for value in ("false", "true"):
                parser[setting] = value
                for use in uses:
                    assert parser.get_parsed_content(use) is (value == "true"), (files, use, value)
        uses = list(_ids_where(config, lambda value: str(value).startswith("$monai_prompt.runs.flag_entries(")))
        assert bool(uses) == bool(method_flags), files
        for key in method_flags:
            for value in ("false", "true"):
                for setting in ("method_config", "trained_method_config"):
                    parser[setting] = {**method_config, key: value}
                for use in uses:
                    assert parser.get_parsed_content(use)[key] is (value == "true"), (files, use, value)


@pytest.mark.parametrize("name", ["lora_classification", "fptplus_classification", "lora_3d_segmentation"])
def test_a_validation_interval_longer_than_the_run_is_refused_first(name):
    """``--val_interval 3`` with 2 epochs would end without ``models/model.pt``; ``initialize`` refuses it before the
    run folder is touched (``--val_interval 2`` passes), the values as the command line gives them."""
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / name / "configs" / "train.json"))
    steps = parser["initialize"]
    step = next(i for i, text in enumerate(steps) if "check_validation_interval" in text)
    assert step < next(i for i, text in enumerate(steps) if "claim_run_folder" in text)
    parser["train#trainer#max_epochs"] = 2
    parser["val_interval"] = 2
    parser.get_parsed_content(f"initialize#{step}")
    parser["val_interval"] = 3
    with pytest.raises(RuntimeError) as caught:  # MONAI wraps the error
        parser.get_parsed_content(f"initialize#{step}")
    assert re.search(r"--val_interval 3 with --train#trainer#max_epochs 2: .* would never write one",
                     str(caught.value.__cause__))


@pytest.mark.parametrize("name", [*sorted(ALL_BUNDLE_SPECS), "vit_pretraining"])
def test_a_learning_rate_no_optimiser_step_can_use_is_refused_first(name):
    """``--learning_rate 1e38`` stopped the first step with a float overflow naming nothing; ``initialize`` refuses
    it (and a negative weight decay) before the run folder is touched, the values as the command line gives them."""
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / name / "configs" / "train.json"))
    steps = parser["initialize"]
    step = next(i for i, text in enumerate(steps) if "check_optimizer_settings" in text)
    assert step < next(i for i, text in enumerate(steps) if "claim_run_folder" in text)
    parser.get_parsed_content(f"initialize#{step}")
    for key, value in (("learning_rate", 1e38), ("learning_rate", "inf"), ("weight_decay", -0.1)):
        default, parser[key] = parser[key], value
        with pytest.raises(RuntimeError) as caught:  # MONAI wraps the error
            parser.get_parsed_content(f"initialize#{step}")
        assert str(caught.value.__cause__).startswith(f"--{key} {value!r}: "), caught.value.__cause__
        parser[key] = default


@pytest.mark.parametrize("name", ["lora_classification", "lora_segmentation"])
def test_an_intensity_window_is_checked_first_and_recorded_as_the_transforms_read_it(name):
    """A window the transforms cannot take (``"[2000, -1000]"``) stopped the run only when the data loader was
    built, after the run folder had been claimed and the record written; ``initialize`` refuses it first. The record
    keeps the window as the transforms read it: ``--intensity_range none`` (a string from the command line) as None,
    so that a resume without the setting is the same run."""
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / name / "configs" / "train.json"))
    steps = parser["initialize"]
    step = next(i for i, text in enumerate(steps) if "intensity_window" in text)
    assert step < next(i for i, text in enumerate(steps) if "claim_run_folder" in text)
    for given, read in ((None, None), ("none", None), ("NULL", None), ([-1000, 2000], [-1000.0, 2000.0])):
        parser["intensity_range"] = given
        assert parser.get_parsed_content(f"initialize#{step}") == read
        assert parser.get_parsed_content("training_record#intensity_range") == read
    parser["intensity_range"] = [2000, -1000]
    with pytest.raises(RuntimeError) as caught:  # MONAI wraps the error
        parser.get_parsed_content(f"initialize#{step}")
    assert str(caught.value.__cause__).startswith("intensity_range [2000, -1000]: give [low, high], low below high")


@pytest.mark.parametrize("name", ["fpt_classification", "fptplus_classification"])
def test_fpt_side_input_follows_img_size_and_a_larger_one_is_refused(name):
    """``--img_size 32`` gives the side network the papers' side size at 512 scaled to 32 px (one 8 px patch for
    FPT+, two for FPT), not 224/128; a side input larger than the LPM's is refused, naming the setting."""
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / name / "configs" / "train.json"))
    parser.update({"backbone": "vit_tiny", "backbone_overrides": dict(TINY_BACKBONE), "img_size": TINY_IMG_SIZE,
                   "num_classes": 3})
    assert parser.get_parsed_content("network_def").side_img_size == [16 if name.startswith("fpt_") else 8] * 2
    parser["method_config#side_img_size"] = 64
    with pytest.raises(RuntimeError) as caught:  # MONAI wraps the network's error
        parser.get_parsed_content("network_def", lazy=False)
    assert re.search(r"side_img_size 64 is larger than the LPM input img_size 32: .*--method_config#side_img_size",
                     str(caught.value.__cause__))


@pytest.mark.parametrize("name", sorted(BUNDLE_SPECS))
def test_the_random_mirror_reads_the_orientation_and_its_png_axis_is_the_readme_s_override(name):
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / name / "configs" / "train.json"))
    assert "--train#random_transforms#0#spatial_axis 1" in (REPO / "bundles" / name / "docs" / "README.md").read_text()
    parser["train#random_transforms#0#spatial_axis"] = 1
    flip = parser.get_parsed_content("train#random_transforms#0")
    assert isinstance(flip, RandLeftRightFlipd) and flip.spatial_axis == 1


@pytest.mark.parametrize("name", ["vpt_classification", "vpt_segmentation"])
def test_evaluation_and_inference_read_the_training_record_without_defaults(name, tmp_path):
    """Before any training inference builds its ``untrained_network`` (MONAI's property checks, verify_net_in_out);
    a delta without its record, or an evaluation without one, stops with the fix; a record gives every setting."""
    bundle = copy_bundle(name, tmp_path)
    infer, evaluate = ["inference.json"], ["train.json", "evaluate.json"]
    assert _network_setting(bundle, infer, "img_size") == 224
    for files in (evaluate, infer):
        (bundle / "models").mkdir(exist_ok=True)
        (bundle / "models" / "model.pt").write_bytes(b"")
        with pytest.raises(RuntimeError) as info:
            _network_setting(bundle, files, "img_size")
        error = info.value.__cause__
        assert isinstance(error, FileNotFoundError) and "training_config.json does not exist" in str(error)
        assert "Train the bundle first" in str(error) and "--training_config" in str(error)
    record = json.loads(json.dumps(_network_setting(bundle, infer, "untrained_network")))
    (bundle / "models" / "model.pt").unlink()
    record.update(img_size=32, method_config={**record["method_config"], "num_tokens": 7})
    (bundle / "models" / "training_config.json").write_text(json.dumps(record))
    for files in (evaluate, infer):
        assert _network_setting(bundle, files, "img_size") == 32
        assert _network_setting(bundle, files, "trained_method_config")["num_tokens"] == 7


def _write_samples(folder: Path) -> tuple[Path, Path]:
    """A 20 x 30 RGB PNG and a 6 x 7 grey NIfTI image."""
    rng = np.random.default_rng(0)
    png, nii = folder / "rgb.png", folder / "grey.nii.gz"
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(png)
    nib.save(nib.Nifti1Image(rng.random((6, 7), dtype=np.float32), np.eye(4)), nii)
    return png, nii


def _assert_same(out: dict, expected: dict) -> None:
    image, reference = out["image"], expected["image"]
    assert type(image) is type(reference) and image.dtype == reference.dtype
    assert torch.equal(image.as_tensor(), reference.as_tensor()) and torch.equal(image.affine, reference.affine)
    assert out["label"].dtype == expected["label"].dtype and torch.equal(out["label"], expected["label"])


def _parser(bundle: str, file: str, overrides: dict) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / file))
    parser.update(overrides)
    return parser


def test_rendered_transforms_are_classification_transforms(tmp_path):
    """The spelled-out ``train#deterministic_transforms`` + ``train#random_transforms`` (train), the deterministic
    ones alone (validation, inference, MAE pre-training) give exactly what ``classification_transforms`` gives:
    augmentation off, and on with the same random state; the FPT bundles put the cache lookup between the lists."""
    png, nii = _write_samples(tmp_path)
    rgb_2d = {"img_size": 16, "spatial_dims": 2, "in_channels": 3}
    cases = [
        ({**rgb_2d, "multi_label": False}, {"image": str(png), "label": 2}),
        ({"img_size": 8, "spatial_dims": 2, "in_channels": 1, "multi_label": True},
         {"image": str(nii), "label": [1.0, 0.0, 1.0]}),
    ]
    for settings, item in cases:
        train_json = _parser("vpt_classification", "train.json", settings)
        train = train_json.get_parsed_content("train#preprocessing")
        validate = train_json.get_parsed_content("validate#preprocessing")
        infer = _parser("vpt_classification", "inference.json", settings).get_parsed_content("preprocessing")
        args = (settings["img_size"], settings["spatial_dims"], settings["in_channels"])
        plain = Compose(classification_transforms(*args, augment=False, multi_label=settings["multi_label"]))
        augmented = Compose(classification_transforms(*args, augment=True, multi_label=settings["multi_label"]))
        assert [type(t) for t in train.transforms] == [type(t) for t in augmented.transforms]
        expected = plain(item)
        _assert_same(validate(item), expected)
        _assert_same(infer(item), expected)
        changed = 0
        for seed in range(4):
            train.set_random_state(seed)
            augmented.set_random_state(seed)
            out = train(item)
            _assert_same(out, augmented(item))
            changed += not torch.equal(out["image"].as_tensor(), expected["image"].as_tensor())
        assert changed > 0  # the augmentations ran

    pretraining = _parser("vit_pretraining", "train.json", rgb_2d).get_parsed_content("train#deterministic_transforms")
    out = Compose(pretraining)({"image": str(png)})
    expected = Compose(classification_transforms(*rgb_2d.values(), track_meta=False))({"image": str(png)})
    assert type(out["image"]) is torch.Tensor and torch.equal(out["image"], expected["image"])
    for name, spec in BUNDLE_SPECS.items():
        train = ConfigParser.load_config_file(REPO / "bundles" / name / "configs" / "train.json")
        lookup = "[@fpt_features] + " if spec.fpt else ""
        assert train["train"]["preprocessing"]["transforms"] == (
            f"$@train#deterministic_transforms + {lookup}@train#random_transforms"
        )


@pytest.mark.parametrize("multi_label", [False, True], ids=["softmax", "sigmoid"])
def test_probabilities_of_fp16_logits_are_float32(multi_label):
    """Under CUDA AMP the evaluator's fp16 autocast gives fp16 logits (emulated here): validation, evaluation and
    inference turn them into float32 probabilities, which keep apart what fp16 rounds to 1.0 (margins 9 and 10)."""
    logits = [torch.tensor([9.0, 0.0], dtype=torch.float16), torch.tensor([10.0, 0.0], dtype=torch.float16)]
    for name in BUNDLE_SPECS:
        settings = {"multi_label": multi_label, "num_classes": 2}
        chains = [_parser(name, "train.json", settings).get_parsed_content("validate#postprocessing"),
                  _parser(name, "inference.json", settings).get_parsed_content("postprocessing")]
        for chain in chains:
            label = torch.tensor([1.0, 0.0] if multi_label else [0.0])
            first, second = (chain({"pred": pred, "label": label})["pred"] for pred in logits)
            assert first.dtype == second.dtype == torch.float32, name
            assert float(first[0]) < float(second[0]) < 1.0, name


@pytest.mark.slow
def test_under_ddp_the_released_lpm_weights_are_not_held(tiny, tmp_path, monkeypatch):
    """``DistributedDataParallel`` keeps every parameter of the module it wraps: FPT's network wrapped before the
    LPM weights were released kept them on every GPU for the whole run. A one-process gloo group runs the
    initialization of ``train.json`` with ``multi_gpu_train.json``."""
    import torch.distributed as dist

    from io_support import free_port

    spec = BUNDLE_SPECS["fptplus_classification"]
    bundle = copy_bundle(spec.name, tmp_path)
    monkeypatch.setenv("LOCAL_RANK", "0")
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / name) for name in ("train.json", "multi_gpu_train.json")])
    overrides = tiny_overrides(spec, tiny["data"], tiny["backbone"])
    parser.update({"bundle_root": str(bundle), **{k: v for k, v in overrides.items() if not k.startswith("_meta_")}})
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        parser.get_parsed_content("initialize")
        network = parser.get_parsed_content("network")
        assert isinstance(network, torch.nn.parallel.DistributedDataParallel) and network.module.lpm.released
        held = {id(param) for param in network._module_parameters}  # what DDP keeps a reference to
        assert held <= {id(param) for param in network.module.parameters()}  # none of the released LPM weights
    finally:
        dist.destroy_process_group()


def test_an_intensity_window_is_recorded_and_scales_validation_evaluation_and_inference(tmp_path):
    """CT slices in Hounsfield units (an int16 NIfTI slice, -1024 .. 3000) classified with ``--intensity_range
    "[-1000, 2000]"``: training, validation, evaluation and inference scale by that window, clipped, as
    ``classification_transforms(intensity_range=...)`` does; the record keeps it; a record of an earlier version
    reads as min-max. (Before: each slice by its own min-max, and no setting; the override was ignored.)"""
    datalist = write_tiny_dataset(tmp_path / "data")
    ct = np.array([[-1024, -1000, 0], [226, 2000, 3000]], dtype=np.int16)
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(ct[..., None], np.eye(4)), path)
    item = {"image": str(path), "label": 1}
    settings = {"img_size": 8, "spatial_dims": 2, "in_channels": 1, "datalist_file": str(datalist),
                "intensity_range": [-1000, 2000]}
    expected = Compose(classification_transforms(8, 2, 1, intensity_range=(-1000, 2000)))(item)
    minmax = Compose(classification_transforms(8, 2, 1))(item)
    assert not torch.allclose(expected["image"], minmax["image"])
    train = _parser("lora_classification", "train.json", settings)
    record = json.loads(json.dumps(train.get_parsed_content("training_record")))
    assert record["intensity_range"] == [-1000, 2000]
    _assert_same(train.get_parsed_content("validate#preprocessing")(item), expected)
    earlier = {key: value for key, value in record.items() if key != "intensity_range"}
    for training_config, scaled in ((record, expected), (earlier, minmax)):
        for files in (["train.json", "evaluate.json"], ["inference.json"]):
            parser = ConfigParser()
            parser.read_config([str(REPO / "bundles" / "lora_classification" / "configs" / file) for file in files])
            parser.update({"datalist_file": str(datalist), "training_config": training_config})
            _assert_same(parser.get_parsed_content("preprocessing")(item), scaled)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BUNDLE_SPECS))
def test_bundle_train_evaluate_infer_verify_export(name, tiny, tmp_path, monkeypatch, capsys):
    spec = BUNDLE_SPECS[name]
    bundle = copy_bundle(name, tmp_path)
    overrides = tiny_overrides(spec, tiny["data"], tiny["backbone"])
    capsys.readouterr()
    run_bundle(bundle, ["train.json"], "train", **overrides, **{"train#trainer#max_epochs": 1})
    last = capsys.readouterr().out.splitlines()[-1]  # the run ends saying what it reached and where the model went
    assert re.search(rf" - monai_prompt - INFO - training: best val_accuracy \d\.\d{{4}} at epoch 1 of 1; best model "
                     rf"{re.escape(str(bundle / 'models' / 'model.pt'))}$", last), last

    delta = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert list(delta) == ["peft", "model"] and delta["peft"]["method"] == spec.method
    assert any(key.endswith("head.weight") for key in delta["model"])  # the delta holds the head, not the backbone
    frozen_weights = {"backbone.patch_embedding.patch_embeddings.weight", "lpm.patch_embedding.patch_embeddings.weight"}
    assert frozen_weights.isdisjoint(delta["model"]) or spec.method == "full"
    resume = torch.load(bundle / "models" / "checkpoint_epoch=1.pt", weights_only=True)
    assert set(resume) == {"run", "trainer", "optimizer", "lr_scheduler", "peft", "model", "best_metric"}
    assert resume["trainer"]["iteration"] == 3  # 12 training images, batch 4, one epoch
    if spec.fpt:  # every labelled image was preloaded once; training and validation then never run the LPM
        assert len(list((bundle / "cache" / "kv").rglob("*.safetensors"))) == 24
        with monkeypatch.context() as patch:
            patch.setattr(LPMExtractor, "extract", lambda *args: pytest.fail("the LPM ran during training"))
            run_bundle(bundle, ["train.json"], "train", **overrides, fpt_preload=False, overwrite=True,
                       **{"train#trainer#max_epochs": 1})

    run_bundle(bundle, ["train.json", "evaluate.json"], "infer", **overrides)
    metrics = read_metrics(bundle / "eval" / "metrics.csv")
    assert capsys.readouterr().out.splitlines()[-1].endswith(
        f" - monai_prompt - INFO - evaluation: accuracy {metrics['accuracy']:.4f} on the 6 images of split 'test'; "
        f"metrics in {bundle / 'eval' / 'metrics.csv'}")
    assert set(metrics) == {"accuracy", "auc", "f1", "kappa", "ece"}

    capsys.readouterr()
    run_bundle(bundle, ["inference.json"], "infer", **overrides)
    finished, last = capsys.readouterr().out.splitlines()[-2:]  # the run ends saying where the predictions went
    assert "Engine run finished" in finished
    predictions = bundle / "eval" / "predictions.csv"
    assert last.endswith(f" - monai_prompt - INFO - inference: wrote 6 prediction rows to {predictions}")
    with open(predictions) as f:
        header, *rows = list(csv.reader(f))
    assert header == ["image", "dark", "mid", "bright", "predicted"]  # the class names of the training record
    assert len(rows) == 6 and all(len(row) == 5 for row in rows)
    assert all(abs(sum(float(v) for v in row[1:-1]) - 1.0) < 1e-5 for row in rows)
    assert all(row[-1] == header[1 + int(np.argmax([float(v) for v in row[1:-1]]))] for row in rows)
    # the evaluation's metrics are scikit-learn's of the inference's predictions for the same test images
    assert metrics == pytest.approx(metrics_from_predictions(bundle / "eval" / "predictions.csv"), abs=1e-6)

    meta, infer = bundle / "configs" / "metadata.json", bundle / "configs" / "inference.json"
    verify_metadata(meta_file=str(meta), filepath=str(tiny["schema"]))
    verify_net_in_out(net_id="network_def", meta_file=str(meta), config_file=str(infer), **overrides)
    ts_file = bundle / "models" / "model.ts"
    if spec.fpt:  # also the export path: ckpt_export of the full state dict (the delta loads too, test_fpt.py)
        export_bundle(bundle, overrides=overrides)
        ckpt = {"ckpt_file": str(bundle / "models" / "model_full.pt")}
    else:
        ckpt = {"ckpt_file": str(bundle / "models" / "model.pt"), "key_in_ckpt": "model"}
    ckpt_export(net_id="network_def", filepath=str(ts_file), meta_file=str(meta), config_file=str(infer), **ckpt,
                **overrides)
    scripted = torch.jit.load(str(ts_file))
    assert scripted(torch.rand(2, 3, 32, 32)).shape == (2, 3)


@pytest.mark.slow
def test_resume_continues_from_the_last_checkpoint(tiny, tmp_path):
    spec = BUNDLE_SPECS["linear_classification"]
    bundle = copy_bundle(spec.name, tmp_path)
    overrides = tiny_overrides(spec, tiny["data"], tiny["backbone"])
    error = workflow_error(bundle, ["train.json"], "train", resume=True, **overrides)
    assert isinstance(error, FileNotFoundError) and "no checkpoint_epoch=<N>.pt" in str(error)

    run_bundle(bundle, ["train.json"], "train", **overrides, **{"train#trainer#max_epochs": 1})
    first = torch.load(bundle / "models" / "checkpoint_epoch=1.pt", weights_only=True)
    workflow = run_bundle(bundle, ["train.json"], "train", resume=True, **overrides, **{"train#trainer#max_epochs": 2})
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 2 and trainer.state.iteration == 2 * first["trainer"]["iteration"]
    assert latest_checkpoint(bundle / "models").endswith("checkpoint_epoch=2.pt")


@pytest.mark.slow
def test_delta_of_another_config_or_method_fails_loudly(tiny, tmp_path):
    vpt = BUNDLE_SPECS["vpt_classification"]
    bundle = copy_bundle(vpt.name, tmp_path)
    overrides = tiny_overrides(vpt, tiny["data"], tiny["backbone"])
    run_bundle(bundle, ["train.json"], "train", **overrides, **{"train#trainer#max_epochs": 1})
    error = workflow_error(bundle, ["inference.json"], "infer", **overrides, **{"method_config#num_tokens": 7})
    assert isinstance(error, DeltaMismatchError)
    assert str(error).endswith("model.pt: method config differs: num_tokens: 5 in the delta vs 7 here.")
    lora = copy_bundle("lora_classification", tmp_path)
    vpt_delta = str(bundle / "models" / "model.pt")
    error = workflow_error(lora, ["inference.json"], "infer", **overrides, load_path=vpt_delta)
    assert isinstance(error, DeltaMismatchError) and "delta is for method 'vpt', the model uses 'lora'" in str(error)
    other_backbone = write_tiny_backbone(tmp_path / "other.pt", seed=1)
    error = workflow_error(bundle, ["inference.json"], "infer", **{**overrides, "pretrained": str(other_backbone)})
    assert isinstance(error, DeltaMismatchError) and "frozen backbone weights differ" in str(error)


@pytest.mark.slow
def test_multi_label_trains_and_evaluates_with_sigmoid(tmp_path, tiny):
    spec = BUNDLE_SPECS["linear_classification"]
    data = tmp_path / "multi"
    write_tiny_dataset(data, multi_label=True)
    bundle = copy_bundle(spec.name, tmp_path)
    overrides = {**tiny_overrides(spec, data, tiny["backbone"]), "multi_label": True}
    error = workflow_error(bundle, ["train.json"], "train", **{**overrides, "multi_label": False})
    assert isinstance(error, ValueError) and "run with --multi_label True" in str(error)
    run_bundle(bundle, ["train.json"], "train", **overrides, **{"train#trainer#max_epochs": 1})
    run_bundle(bundle, ["train.json", "evaluate.json"], "infer", **overrides)
    assert set(read_metrics(bundle / "eval" / "metrics.csv")) == {"accuracy", "auc", "f1", "ece"}
    run_bundle(bundle, ["inference.json"], "infer", **overrides)
    with open(bundle / "eval" / "predictions.csv") as f:
        rows = list(csv.reader(f))[1:]
    assert any(abs(sum(float(v) for v in row[1:-1]) - 1.0) > 1e-3 for row in rows)  # sigmoid, not softmax
    names = ("dark", "mid", "bright")
    assert all(row[-1] == ";".join(n for n, v in zip(names, row[1:-1]) if float(v) > 0.5) for row in rows)
