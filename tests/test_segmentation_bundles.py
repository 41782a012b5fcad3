"""Every segmentation bundle trains, evaluates, infers, verifies and exports on tiny data; its metrics match numpy/
scipy on the saved masks, which keep the input's geometry; the data check, per-class metrics and input listing."""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser, ckpt_export, verify_metadata, verify_net_in_out
from monai.data import MetaTensor, list_data_collate
from monai.handlers import MeanDice, MetricsSaver, from_engine
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from monai.transforms import Activationsd, AsDiscreted, Compose, Invertd, ResampleToMatchd, SpatialResample
from PIL import Image

from monai_prompt.bundle_gen import check_bundles
from monai_prompt.bundle_gen.metadata import schema_file
from monai_prompt.bundle_gen.specs import SEGMENTATION_SPECS
from monai_prompt.data import DataCheckError, ScaleIntensityWindowd
from monai_prompt.data.segmentation import (
    check_segmentation_datalist,
    mask_dtype,
    mask_name_formatter,
    mask_root,
    mask_suffix,
    read_segmentation_datalist,
    resampled_shape,
)
from monai_prompt.engine import latest_checkpoint
from monai_prompt.engine.metrics.segmentation import (
    ClassHausdorffDistance,
    ClassMeanDice,
    ClassMetricsSaver,
    grid_spacing,
)
from monai_prompt.runs import root_cause
from monai_prompt.runs.bundles import find_bundle
from monai_prompt.runs.runner import read_metrics, run_bundle
from monai_prompt.tools import package_bundle
from segmentation_support import (
    SAM_FAMILY_BUNDLES,
    TINY_CLASSES,
    reference_scores,
    tiny_segmentation_overrides,
    write_sam_family_encoder,
    write_tiny_encoder,
    write_tiny_segmentation,
)

REPO = Path(__file__).resolve().parents[1]
FOREGROUND = TINY_CLASSES[1:]
#: the label values of the tiny 3D data's classes: not consecutive and above a byte, as an atlas' region codes.
ATLAS_VALUES = (0, 2, 5, 300)


def test_bundle_names_end_in_segmentation_and_the_generator_covers_them(tmp_path):
    assert len(SEGMENTATION_SPECS) == 18 and all(name.endswith("segmentation") for name in SEGMENTATION_SPECS)
    assert {spec.spatial_dims for spec in SEGMENTATION_SPECS.values()} == {2, 3}
    assert check_bundles(REPO / "bundles", sorted(SEGMENTATION_SPECS)) == []
    (tmp_path / "unknown_segmentation").mkdir()
    assert any("no bundle spec renders it" in problem for problem in check_bundles(tmp_path))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """Tiny datalists (2D NIfTI, 2D PNG, 3D NIfTI) and tiny encoders (2D, 3D), written once for the module."""
    root = tmp_path_factory.mktemp("tiny_segmentation")
    return {
        "2d": write_tiny_segmentation(root / "nifti2d", 2),
        "2d_png": write_tiny_segmentation(root / "png2d", 2, png=True),
        "3d": write_tiny_segmentation(root / "nifti3d", 3, label_values=ATLAS_VALUES),
        "encoder2": write_tiny_encoder(root / "vit2.pt", 2),
        "encoder3": write_tiny_encoder(root / "vit3.pt", 3),
        **{family: root / f"{family}.pt" for family in SAM_FAMILY_BUNDLES.values()},
    }


def _read(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """A mask or label file as MONAI's readers orient it ([X, Y(, Z)]), and its affine (None for PNG)."""
    if path.suffix == ".png":
        return np.asarray(Image.open(path)).T, None
    image = nib.load(path)
    return np.asarray(image.dataobj), image.affine


def _assert_masks_match_labels_and_metrics(bundle: Path, datalist: Path, png: bool) -> None:
    """Each saved mask has its input's shape (and affine) and holds the datalist's label values (uint16 above 255); the
    evaluation's metrics equal numpy/scipy's on the masks (the network and the test images are the same in both
    runs), HD95 in mm of the labels' anisotropic grids (pixels for PNG)."""
    metrics = read_metrics(bundle / "eval" / "metrics.csv")
    expected_names = {"mean_dice", "mean_hd95"} | {f"{m}_{c}" for m in ("dice", "hd95") for c in FOREGROUND}
    assert set(metrics) == expected_names
    scores: dict[str, list[list[float]]] = {"dice": [], "hd95": []}
    content = json.loads(datalist.read_text())
    values = sorted(int(key) for key in content["labels"])
    for item in content["test"]:
        image_path, label_path = datalist.parent / item["image"], datalist.parent / item["label"]
        suffix = ".png" if png else ".nii.gz"
        mask_path = bundle / "eval" / "masks" / image_path.name.replace(suffix, f"_seg{suffix}")
        mask, mask_affine = _read(mask_path)
        label, label_affine = _read(label_path)
        assert mask.shape == label.shape and set(np.unique(mask)) <= set(values)
        assert mask.dtype == (np.uint8 if max(values) <= 255 else np.uint16)
        if not png:
            np.testing.assert_allclose(mask_affine, nib.load(image_path).affine, atol=1e-5)
        spacing = None if png else np.linalg.norm(label_affine[:3, :3], axis=0)[:label.ndim]
        for key, class_scores in reference_scores(mask, label, values, spacing).items():
            scores[key].append(class_scores)
    for key in ("dice", "hd95"):
        table = np.array(scores[key])
        for index, name in enumerate(FOREGROUND):
            assert metrics[f"{key}_{name}"] == pytest.approx(np.nanmean(table[:, index]), abs=1e-4), (key, name)
    assert metrics["mean_dice"] == pytest.approx(np.nanmean(np.array(scores["dice"])), abs=1e-4)
    assert metrics["mean_hd95"] == pytest.approx(np.nanmean(np.array(scores["hd95"])), abs=1e-4)


def _copy(name: str, datalist: Path, encoder: Path, tmp_path: Path) -> tuple[Path, dict]:
    """A copy of the bundle under ``tmp_path/bundles`` and its overrides for the tiny data and encoder."""
    bundle = tmp_path / "bundles" / name
    shutil.copytree(REPO / "bundles" / name, bundle)
    return bundle, tiny_segmentation_overrides(SEGMENTATION_SPECS[name], datalist, encoder)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SEGMENTATION_SPECS))
def test_bundle_train_evaluate_infer_verify_export(name, tiny_data, tmp_path, capsys):
    spec = SEGMENTATION_SPECS[name]
    png = spec.spatial_dims == 2 and spec.method in ("linear", "lora", "bitfit", "dvpt")  # both 2D formats covered
    datalist = tiny_data["2d_png" if png else f"{spec.spatial_dims}d"]
    bundle, overrides = _copy(name, datalist, tiny_data[f"encoder{spec.spatial_dims}"], tmp_path)
    family = SAM_FAMILY_BUNDLES.get(name)
    if family:  # the network follows the encoder's family (segmentation_network)
        overrides.update(write_sam_family_encoder(tiny_data[family], family))
    run_bundle(bundle, ["train.json"], "train", quiet=True, **overrides, **{"train#trainer#max_epochs": 1})

    delta = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert list(delta) == ["peft", "model"] and delta["peft"]["method"] == spec.method
    assert delta["peft"]["backbone"]["config"].get("family", "vit") == (family or "vit")
    last_up = "decoder1" if family == "tinyvit" else "decoder2"  # the TinyViT decoder's full-resolution stage
    assert "out.conv.conv.weight" in delta["model"] and f"{last_up}.transp_conv.conv.weight" in delta["model"]
    assert ("vit.patch_embedding.patch_embeddings.weight" in delta["model"]) == (spec.method == "full")
    resume = torch.load(bundle / "models" / "checkpoint_epoch=1.pt", weights_only=True)
    assert resume["trainer"]["iteration"] == 2  # 4 training images, batch 2

    capsys.readouterr()
    run_bundle(bundle, ["train.json", "evaluate.json"], "infer", **overrides)
    last = capsys.readouterr().out.splitlines()[-1]  # the run ends with its score and where its metrics went
    metrics_file = re.escape(str(bundle / "eval" / "metrics.csv"))
    assert re.search(rf" - monai_prompt - INFO - evaluation: mean_dice \d\.\d{{4}} on the 2 images of split 'test'; "
                     rf"metrics in {metrics_file}$", last), last
    images = datalist.parent / "images" / "test"  # inference takes a folder or a glob of unlabelled images
    infer_images = str(images) if spec.spatial_dims == 2 else str(images / "*.nii.gz")
    capsys.readouterr()
    run_bundle(bundle, ["inference.json"], "infer", infer_images=infer_images, **overrides)
    _assert_masks_match_labels_and_metrics(bundle, datalist, png)
    finished, last = capsys.readouterr().out.splitlines()[-2:]  # the run ends saying where the masks went
    assert "Engine run finished" in finished
    assert last.endswith(f" - monai_prompt - INFO - inference: wrote 2 masks to {bundle / 'eval' / 'masks'}")

    meta, infer = bundle / "configs" / "metadata.json", bundle / "configs" / "inference.json"
    verify_metadata(meta_file=str(meta), filepath=str(schema_file()))
    verify_net_in_out(net_id="network_def", meta_file=str(meta), config_file=str(infer), **overrides)
    ts_file = bundle / "models" / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts_file), meta_file=str(meta), config_file=str(infer),
                ckpt_file=str(bundle / "models" / "model.pt"), key_in_ckpt="model", **overrides)
    scripted, image = torch.jit.load(str(ts_file)), torch.rand(1, 1, *[32] * spec.spatial_dims)
    network = ConfigParser(ConfigParser.load_config_file(infer))
    network.update({key: value for key, value in overrides.items() if not key.startswith("_meta_")})
    eager = network.get_parsed_content("network_def")
    eager.load_state_dict(delta["model"], strict=False)
    with torch.no_grad():
        torch.testing.assert_close(scripted(image), eager.eval()(image), atol=1e-5, rtol=1e-4)


def test_masks_keep_the_input_folders_below_their_common_parent(tmp_path):
    from monai.data.utils import create_file_basename

    inputs = [tmp_path / "patients" / "a" / "t1.nii.gz", tmp_path / "patients" / "b" / "t1.nii.gz"]
    root = mask_root(inputs)
    assert root == str(tmp_path / "patients") and mask_root([inputs[0]]) == str(inputs[0].parent)
    assert mask_root([]) == ""
    saved = {create_file_basename("seg", str(p), "/out", root, separate_folder=False, makedirs=False) for p in inputs}
    assert saved == {"/out/a/t1_seg", "/out/b/t1_seg"}
    series = [tmp_path / "dicom" / uid for uid in ("1.2.840.5", "1.2.840.6")]  # DICOM series folders
    for folder in series:
        folder.mkdir(parents=True)
    names = {Path(name).name: mask_name_formatter({"filename_or_obj": str(tmp_path / name)}, None)["subject"]
             for name in ("A.NII.GZ", "b.Nii.gz", "c.nii.GZ", "d.NII", "e.nii.gz", "f.png", *map(str, series))}
    assert {name: create_file_basename("seg", subject, "/out", str(tmp_path), separate_folder=False,
                                       makedirs=False) for name, subject in names.items()} == {
        "A.NII.GZ": "/out/A_seg", "b.Nii.gz": "/out/b_seg", "c.nii.GZ": "/out/c_seg", "d.NII": "/out/d_seg",
        "e.nii.gz": "/out/e_seg", "f.png": "/out/f_seg", "1.2.840.5": "/out/dicom/1.2.840.5_seg",
        "1.2.840.6": "/out/dicom/1.2.840.6_seg"}
    assert mask_root(series) == str(tmp_path / "dicom")
    with pytest.raises(ValueError, match=r"\S+/a/t1\.nii\.gz and \S+/a/t1\.nii would both be saved as the mask t1_seg"):
        mask_root([inputs[0], tmp_path / "patients" / "a" / "t1.nii"])
    with pytest.raises(ValueError, match=r"\S+/a/t1\.nii\.gz and \S+/a/t1\.NII\.GZ would both be saved"):
        mask_root([inputs[0], tmp_path / "patients" / "a" / "t1.NII.GZ"])


def test_3d_inference_takes_a_dicom_series_folder_as_one_image(tmp_path):
    """``--infer_images`` of a folder of DICOM series: the 3D bundles infer each series (the folder, one volume;
    its mask ``<series>_seg.nii.gz``), the 2D bundles each slice."""
    from io_support import write_series

    series = tmp_path / "dicom" / "1.2.840.5"
    write_series(series, slices=3)
    files = {}
    for name in ("lora_3d_segmentation", "lora_segmentation"):
        parser = ConfigParser()
        parser.read_config(str(REPO / "bundles" / name / "configs" / "inference.json"))
        parser["infer_images"] = str(tmp_path / "dicom")
        files[name] = parser.get_parsed_content("infer_files")
    assert files["lora_3d_segmentation"] == [str(series)]
    assert files["lora_segmentation"] == [str(series / f"slice{k}.dcm") for k in range(3)]


def test_masks_are_png_for_png_inputs_and_nifti_otherwise():
    """PNG masks for PNG inputs unless a label value exceeds a byte; the smallest unsigned type of the values."""
    assert mask_suffix(["a.png", "b.PNG"]) == ".png" and mask_suffix(["a.nii.gz", "b.dcm"]) == ".nii.gz"
    assert mask_suffix(["a.png"], [0, 4, 255]) == ".png" and mask_suffix(["a.png"], [0, 256]) == ".nii.gz"
    with pytest.raises(ValueError, match="run inference separately"):
        mask_suffix(["a.png", "b.nii.gz"])
    assert [mask_dtype(values) for values in ([0, 1, 255], [0, 256], [0, 65535], [0, 65536])] == [
        np.uint8, np.uint16, np.uint16, np.uint32]


def test_label_values_other_than_0_to_k_name_their_classes(tmp_path):
    """A datalist whose label maps store the classes as 0, 4, 2, 300 (keys of 'labels' in any order): the classes in
    the order of their values, each voxel counted for its class; a value no key names and a bundle of other values
    are refused."""
    datalist = write_tiny_segmentation(tmp_path, 2, counts=(2, 1, 0), label_values=(0, 4, 2, 300))
    read = read_segmentation_datalist(datalist)
    assert read.label_values == [0, 2, 4, 300]
    assert read.classes == ["background", "gray_matter", "csf", "white_matter"]
    label = tmp_path / json.loads(datalist.read_text())["training"][0]["label"]
    stored = np.asarray(nib.load(label).dataobj)
    summary = check_segmentation_datalist(datalist, required_splits=["training", "validation"])
    fractions = [np.mean(stored == value) for value in read.label_values]  # of the one image checked alone below
    single = json.loads(datalist.read_text())
    (tmp_path / "single.json").write_text(json.dumps({**single, "training": single["training"][:1], "validation": []}))
    alone = check_segmentation_datalist(tmp_path / "single.json").voxel_fractions["training"]
    np.testing.assert_allclose(alone, fractions)
    assert summary.classes == read.classes and all(summary.voxel_fractions["training"])

    with pytest.raises(DataCheckError) as info:
        check_segmentation_datalist(datalist, TINY_CLASSES, label_values=[0, 1, 2, 3])
    assert "names the classes {0: 'background', 2: 'gray_matter', 4: 'csf', 300: 'white_matter'} but those " \
           "expected are ['background', 'csf', 'gray_matter', 'white_matter']" in str(info.value)
    stored[0, 0] = 1
    nib.save(nib.Nifti1Image(stored, nib.load(label).affine), label)
    with pytest.raises(DataCheckError, match=r"values \[1\] are no class's \(0, 2, 4, 300, the 'labels' keys\)"):
        check_segmentation_datalist(datalist)


def test_class_values_stored_as_floats_a_rounding_off_read_as_their_classes(tmp_path):
    """A label map of float32 class values a rounding off (2.0000002, 4.9999995, 300.00003, as a float label
    written by another tool holds): the check counts each voxel for its class (it refused the values as non-integer),
    and the bundles' transforms give the class indices of the integer label map (MapLabelValued left the values
    unmapped)."""
    datalist = write_tiny_segmentation(tmp_path, 3, counts=(1, 1, 0), label_values=ATLAS_VALUES)
    expected = check_segmentation_datalist(datalist).voxel_fractions
    item = json.loads(datalist.read_text())["training"][0]
    label = nib.load(tmp_path / item["label"])
    integer = np.asarray(label.dataobj)
    stored = integer.astype(np.float32) * np.float32(1.0000001)
    stored[integer == 5] = np.nextafter(np.float32(5), np.float32(0))
    assert not np.array_equal(np.unique(stored), ATLAS_VALUES)
    nib.save(nib.Nifti1Image(integer, label.affine), tmp_path / "integer.nii.gz")
    nib.save(nib.Nifti1Image(stored, label.affine), tmp_path / item["label"])
    assert check_segmentation_datalist(datalist).voxel_fractions == expected

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "lora_3d_segmentation" / "configs" / "train.json"))
    parser.update({"label_values": list(ATLAS_VALUES), "pixdim": None})
    transforms = Compose(parser.get_parsed_content("train#deterministic_transforms"))
    classes = [transforms({"image": str(tmp_path / item["image"]), "label": str(path)})["label"]
               for path in (tmp_path / item["label"], tmp_path / "integer.nii.gz")]
    assert torch.equal(classes[0], classes[1]) and set(classes[0].unique().tolist()) == {0, 1, 2, 3}


def test_data_check_reports_every_bad_pair(tmp_path):
    datalist = write_tiny_segmentation(tmp_path, 3, counts=(3, 1, 1))
    summary = check_segmentation_datalist(datalist, TINY_CLASSES, required_splits=["training", "validation"])
    assert summary.counts == {"training": 3, "validation": 1, "test": 1} and summary.classes == list(TINY_CLASSES)
    assert sum(summary.voxel_fractions["training"]) == pytest.approx(1.0)

    content = json.loads(datalist.read_text())
    first, second, third = (tmp_path / item["label"] for item in content["training"])
    values, affine = np.asarray(nib.load(first).dataobj), nib.load(first).affine
    nib.save(nib.Nifti1Image(values[:-1], affine), first)  # another shape
    nib.save(nib.Nifti1Image(values, np.eye(4)), second)  # another affine
    values = values.astype(np.float32)
    values[0, 0, 0], values[1, 0, 0] = 7, 0.5
    nib.save(nib.Nifti1Image(values, affine), third)  # a value outside the classes and a fraction
    content["validation"][0]["label"] = "labels/missing.nii.gz"
    content["test"].append({"image": content["training"][0]["image"]})  # in two splits, without label
    datalist.write_text(json.dumps(content))
    with pytest.raises(DataCheckError) as info:
        check_segmentation_datalist(datalist, [*TINY_CLASSES, "tumour"], required_splits=["training", "test"])
    problems = info.value.problems
    expected = [
        "'labels' names the classes ['background', 'csf', 'gray_matter', 'white_matter'] but those expected are",
        f"{first}: shape (35, 40, 34) differs",
        f"{second}: its voxels are not where its image's are",
        f"{third}: non-integer values (e.g. [0.5])",
        f"{third}: values [7] are no class's (0..4,",  # the bundle's 5 classes (values as integers: not [7.0])
        "missing.nii.gz: file not found",
        "case0.nii.gz: no label; a test item needs both",
        "case0.nii.gz: listed in several splits ['test', 'training']",
    ]
    for text in expected:
        assert sum(text in problem for problem in problems) == 1, (text, problems)
    assert len(problems) == len(expected)


def test_an_msd_task_folder_reads_as_msd_writes_it_and_unsafe_datalists_are_refused(tmp_path, caplog):
    """An MSD ``dataset.json`` (``training`` and bare ``test`` paths, no ``validation``) read from its folder: a
    validation split carved from training; a label stored in another axis order than its image (one grid) passes;
    ``labels`` keys that are not distinct non-negative integers with 0, an image of several files and a
    ``num_classes`` other than the classes' are refused with the fix."""
    datalist = write_tiny_segmentation(tmp_path, 3, counts=(8, 0, 2))
    content = json.loads(datalist.read_text())
    content["test"] = [item["image"] for item in content["test"]]  # MSD: bare test images
    first = tmp_path / content["training"][0]["label"]
    label = nib.load(first)
    flipped = label.affine.copy()  # the same voxels on the same grid, stored the other way along x
    flipped[:3, 3] += flipped[:3, 0] * (label.shape[0] - 1)
    flipped[:3, 0] *= -1
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj)[::-1], flipped), first)
    (tmp_path / "dataset.json").write_text(json.dumps(content))
    with caplog.at_level("INFO", logger="monai_prompt"):
        read = read_segmentation_datalist(tmp_path)
    assert [len(read[split]) for split in ("training", "validation", "test")] == [7, 1, 2]
    assert "has no 'validation' list: 1 of the training items" in caplog.text
    assert read["test"][0] == {"image": str(tmp_path / content["test"][0])}
    caplog.clear()
    with caplog.at_level("INFO", logger="monai_prompt"):  # the workflow's datalist, carved and logged once
        summary = check_segmentation_datalist(tmp_path, TINY_CLASSES, required_splits=["training", "validation"],
                                              datalist=read)
    assert summary.counts == {"training": 7, "validation": 1, "test": 2} and "no 'validation' list" not in caplog.text
    with pytest.raises(DataCheckError, match="no label; a test item needs both"):
        check_segmentation_datalist(tmp_path, TINY_CLASSES, required_splits=["test"])  # evaluating on it
    with pytest.raises(DataCheckError, match=r"num_classes 5 differs from the 4 classes .* drop --num_classes"):
        check_segmentation_datalist(tmp_path, TINY_CLASSES, num_classes=5)
    empty = tmp_path / read["validation"][0]["label"]
    nib.save(nib.Nifti1Image(np.zeros(nib.load(empty).shape, np.uint8), nib.load(empty).affine), empty)
    with pytest.raises(DataCheckError, match=r"the 'validation' labels hold only background \(0\): Dice is undefined"):
        check_segmentation_datalist(tmp_path, TINY_CLASSES, required_splits=["training", "validation"])
    with pytest.raises(FileNotFoundError, match="is a folder without a segmentation datalist"):
        read_segmentation_datalist(tmp_path / "images")

    for labels in ({"0": "background", "one": "liver"}, {"1": "liver", "2": "tumour"}, {"0": "a", "00": "b"}):
        datalist.write_text(json.dumps({**content, "labels": labels}))
        with pytest.raises(ValueError, match=r"each key is the value of its class in the label maps: distinct non-"):
            read_segmentation_datalist(datalist)
    content["training"][1]["image"] = [content["training"][1]["image"], content["training"][2]["image"]]
    datalist.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="stack the modalities of an image into one multi-channel file"):
        read_segmentation_datalist(datalist)


def test_the_segmentation_check_takes_the_channels_the_transforms_can_match(tmp_path):
    """An RGB PNG among grey ones is averaged to grey by the transforms (MatchInputd), a grey + alpha PNG (MONAI
    reads 2 channels) read as grey: no problem (both were refused)."""
    datalist = write_tiny_segmentation(tmp_path, 2, png=True, counts=(3, 1, 1))
    content = json.loads(datalist.read_text())
    for item, mode in zip(content["training"], ("RGB", "LA")):
        path = tmp_path / item["image"]
        Image.open(path).convert(mode).save(path)
    assert check_segmentation_datalist(datalist, TINY_CLASSES).channels == 1


def test_class_metrics_equal_numpy_and_scipy_with_undefined_classes_as_nan():
    rng = np.random.default_rng(0)
    truths = [rng.integers(0, 3, (24, 20)) for _ in range(3)]  # class 3 in no image
    truths[1][truths[1] == 2] = 1  # class 2 absent from image 1's truth: no Dice, no HD95 there
    predictions = [np.where(rng.random(t.shape) < 0.8, t, rng.integers(0, 3, t.shape)) for t in truths]
    predictions[2][predictions[2] == 1] = 0  # class 1 absent from image 2's prediction: no HD95 there
    names = ["one", "two", "three"]
    engine = Engine(lambda e, b: {"pred": [one_hot(torch.as_tensor(p)[None], 4, dim=0) for p in predictions],
                                  "label": [one_hot(torch.as_tensor(t)[None], 4, dim=0) for t in truths]})
    transform = from_engine(["pred", "label"])
    ClassMeanDice(names, include_background=False, output_transform=transform).attach(engine, "dice")
    ClassHausdorffDistance(names, mean_name="mean_hd95", percentile=95, output_transform=transform).attach(
        engine, "hd95"
    )
    engine.run([0])
    reference = [reference_scores(p, t, range(4)) for p, t in zip(predictions, truths)]
    dice, hd95 = (np.array([r[key] for r in reference]) for key in ("dice", "hd95"))
    assert np.isnan(dice[1, 1]) and np.isnan(hd95[1, 1]) and np.isnan(hd95[2, 0]) and np.isnan(hd95[:, 2]).all()
    for index, name in enumerate(names[:2]):
        assert engine.state.metrics[f"dice_{name}"] == pytest.approx(np.nanmean(dice[:, index]), abs=1e-6)
        assert engine.state.metrics[f"hd95_{name}"] == pytest.approx(np.nanmean(hd95[:, index]), abs=1e-5)
    assert engine.state.metrics["mean_hd95"] == pytest.approx(np.nanmean(hd95), abs=1e-5)
    # a class no image holds: MONAI's reductions would say 0 (a perfect HD95), the per-class metrics say NaN
    assert np.isnan(engine.state.metrics["dice_three"]) and np.isnan(engine.state.metrics["hd95_three"])
    assert "hd95" not in engine.state.metrics and "dice" not in engine.state.metrics  # only scalars are stored


def _validation_metrics_of_images(images: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """``lora_3d_segmentation``'s validation metrics (key metric and additional) of postprocessed ``images``."""
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "lora_3d_segmentation" / "configs" / "train.json"))
    parser.update({"class_names": list(TINY_CLASSES), "num_classes": len(TINY_CLASSES)})
    return _metric_values(images, {**parser.get_parsed_content("validate#key_metric"),
                                   **parser.get_parsed_content("validate#additional_metrics")})[0]


def _anisotropic_images() -> list[dict[str, torch.Tensor]]:
    """Two class-index map pairs on 1 x 1 x 3 mm and 2 x 0.5 x 1 mm grids (labels and predictions as MetaTensors)."""
    generator = torch.Generator().manual_seed(0)
    images = []
    for spacing in ((1.0, 1.0, 3.0), (2.0, 0.5, 1.0)):
        label = torch.randint(0, len(TINY_CLASSES), (1, 4, 4, 3), generator=generator)
        label = label.repeat_interleave(3, 1).repeat_interleave(3, 2).repeat_interleave(2, 3).float()
        prediction = torch.where(torch.rand(label.shape, generator=generator) < 0.8, label, 0.0)
        affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
        images.append({"pred": MetaTensor(prediction, affine=affine), "label": MetaTensor(label, affine=affine)})
    return images


def _rank_scores_its_image(local_rank: int, out_file: str) -> None:
    """A DDP rank: the validation metrics of its own image of :func:`_anisotropic_images`; rank 0 writes them."""
    metrics = _validation_metrics_of_images([_anisotropic_images()[idist.get_rank()]])
    if idist.get_rank() == 0:
        Path(out_file).write_text(json.dumps(metrics))


@pytest.mark.slow
def test_dice_and_hd95_in_mm_of_every_rank_add_up_under_ddp(tmp_path):
    """Two gloo processes, one image each (other spacings): the key metric, Dice and HD95 (mm) per class are those
    of one process scoring both images (about 20 s)."""
    out_file = tmp_path / "metrics.json"
    with idist.Parallel(backend="gloo", nproc_per_node=2) as parallel:
        parallel.run(_rank_scores_its_image, str(out_file))
    expected = _validation_metrics_of_images(_anisotropic_images())
    assert json.loads(out_file.read_text()) == pytest.approx(expected, rel=1e-6, nan_ok=True)
    assert set(expected) == {"val_mean_dice", "val_mean_hd95"} | {
        f"val_{metric}_{name}" for metric in ("dice", "hd95") for name in FOREGROUND}


def test_hd95_is_in_the_units_of_each_images_grid():
    """HD95 per image takes the spacing of the label's affine (mm; axes permuted and anisotropic), or of the
    prediction's where the label has no meta, for class-index maps and one-hot channels, lists and batches; scipy's
    distance transform with ``sampling`` agrees (the values were in voxels)."""
    rng = np.random.default_rng(0)
    truths = [np.repeat(rng.integers(0, 3, (5, 4, 4)), 4, axis=0) for _ in range(2)]
    predictions = [np.where(rng.random(t.shape) < 0.9, t, rng.integers(0, 3, t.shape)) for t in truths]
    permuted = np.array([[0, 1.2, 0, 5.0], [0.8, 0, 0, -3.0], [0, 0, 3.0, 1.0], [0, 0, 0, 1]])
    affines, spacings = [permuted, np.diag([2.0, 0.5, 1.5, 1.0])], [(0.8, 1.2, 3.0), (2.0, 0.5, 1.5)]
    reference = [reference_scores(p, t, range(3), spacing)["hd95"] for p, t, spacing in
                 zip(predictions, truths, spacings)]
    assert not np.allclose(reference, [reference_scores(p, t, range(3))["hd95"] for p, t in zip(predictions, truths)])
    label_maps = {  # image 0: the label has the meta; image 1: the prediction
        "pred": [torch.as_tensor(predictions[0])[None], MetaTensor(predictions[1][None], affine=affines[1])],
        "label": [MetaTensor(truths[0][None], affine=affines[0]), torch.as_tensor(truths[1])[None]],
    }
    one_hots = {key: [one_hot(image, 3, dim=0) for image in images] for key, images in label_maps.items()}
    batch = {key: list_data_collate([MetaTensor(array[None], affine=affine) for array, affine in zip(arrays, affines)])
             for key, arrays in (("pred", predictions), ("label", truths))}  # batch-first, as a DataLoader gives
    for outputs, num_classes in ((label_maps, 3), (one_hots, None), (batch, 3)):
        engine = Engine(lambda e, b, outputs=outputs: outputs)
        ClassHausdorffDistance(["one", "two"], num_classes=num_classes, percentile=95,
                               output_transform=from_engine(["pred", "label"], first=False)).attach(engine, "hd95")
        engine.run([0])
        np.testing.assert_allclose(engine.state.metric_details["hd95"], reference, rtol=1e-5)
    metric = ClassHausdorffDistance(["one", "two"], num_classes=3)
    with pytest.raises(ValueError, match="output must have length 2, got 3"):  # MONAI's message, not an unpacking one
        metric.update((label_maps["pred"], label_maps["label"], label_maps["label"]))
    sagittal = np.array([[0, 0, 1.0, 0], [0, 1.5, 0, 0], [2.5, 0, 0, 0], [0, 0, 0, 1]])  # a 2D slice's x along z
    assert grid_spacing(MetaTensor(torch.zeros(1, 4, 4), affine=sagittal), 2) == [2.5, 1.5]
    assert grid_spacing(torch.zeros(1, 4, 4), 2) == [1.0, 1.0]  # no meta: pixels


def test_hd95_silences_monai_s_own_deprecation_warning_only():
    """MONAI 1.6's HD95 hands ``get_mask_edges`` the argument MONAI deprecates (``always_return_as_numpy``), so
    each run that scored HD95 warned about it; that warning is silenced, any other still shows."""
    truth = torch.zeros(1, 8, 8)
    truth[:, 2:6, 2:6] = 1
    engine = Engine(lambda e, b: {"pred": [truth], "label": [truth]})
    with warnings.catch_warnings(record=True) as caught:
        ClassHausdorffDistance(["one"], num_classes=2, percentile=95,
                               output_transform=from_engine(["pred", "label"])).attach(engine, "hd95")
        engine.run([0])
        warnings.warn("another FutureWarning", FutureWarning)
    messages = [str(warning.message) for warning in caught]
    assert engine.state.metrics["hd95_one"] == 0.0 and "another FutureWarning" in messages
    assert not [message for message in messages if "get_mask_edges" in message], messages


def test_the_per_image_files_head_their_columns_with_the_class_names(tmp_path):
    """MONAI's ``MetricsSaver`` heads the classes ``class0, class1``; the bundles' saver writes their names (quoted
    where a name holds the delimiter) and leaves MONAI's values and summary as they are."""
    engine = Engine(lambda e, b: None)
    engine.run([0])
    engine.state.metrics = {"mean_dice": 0.5}
    engine.state.metric_details = {"mean_dice": torch.tensor([[0.25, 1.0], [0.5, float("nan")]])}
    files = {}
    for saver in (MetricsSaver(str(tmp_path / "monai"), metric_details=["mean_dice"]),
                  ClassMetricsSaver(["left, lobe", "right"], save_dir=str(tmp_path / "ours"),
                                    metric_details=["mean_dice"])):
        saver._filenames = ["a.nii.gz", "b.nii.gz"]
        saver(engine)
        files[type(saver)] = [(Path(saver.save_dir) / f).read_text() for f in ("metrics.csv", "mean_dice_raw.csv")]
    (monai_metrics, monai_raw), (metrics, raw) = files[MetricsSaver], files[ClassMetricsSaver]
    assert monai_raw.splitlines()[0] == "filename,class0,class1,mean"
    assert next(csv.reader(raw.splitlines())) == ["filename", "left, lobe", "right", "mean"]
    assert metrics == monai_metrics and raw.splitlines()[1:] == monai_raw.splitlines()[1:]
    assert [row[0] for row in csv.reader(raw.splitlines()[1:])] == ["a.nii.gz", "b.nii.gz"]


def _metric_values(outputs: list[dict[str, torch.Tensor]], metrics: dict[str, Any]) -> tuple[dict, dict]:
    """The ``state.metrics`` and per-image ``state.metric_details`` of ``metrics`` run on the postprocessed
    ``outputs`` (each image's ``pred`` and ``label``)."""
    engine = Engine(lambda e, b: {key: [output[key] for output in outputs] for key in ("pred", "label")})
    for name, metric in metrics.items():
        metric.attach(engine, name)
    engine.run([0])
    return engine.state.metrics, {name: value.tolist() for name, value in engine.state.metric_details.items()}


def test_class_index_maps_give_the_one_hot_metrics_of_many_classes():
    """The bundles' validation (the logits' argmax, metrics on class-index maps, one Dice handler for the key metric
    and the classes) gives the values of one-hot prediction and label with MONAI's ``MeanDice`` and a separate
    ``ClassMeanDice`` (as before 0.1.10), to the last bit, with 40 classes: absent from a truth (no Dice, no HD95),
    from a prediction (no HD95), or from every image; logits one float apart, which a softmax would round to a tie
    (and its argmax to the first class), are told apart."""
    classes = 40
    generator = torch.Generator().manual_seed(0)
    images = []
    for index in range(2):
        label = torch.randint(0, classes - 1, (1, 4, 5, 3), generator=generator)  # class 39 in no image
        label = label.repeat_interleave(4, 1).repeat_interleave(3, 2).repeat_interleave(5, 3).float()  # blocks
        logits = torch.randn(classes, *label.shape[1:], generator=generator) + 2.5 * one_hot(label, classes, dim=0)
        logits[5 + index] -= 50.0  # class 5 (6) in no prediction of image 0 (1)
        images.append({"pred": logits, "label": label})
    images[1]["label"][images[1]["label"] == 7] = 0  # class 7 absent from image 1's truth
    tied = images[0]["label"][0] == 3  # logits of classes 2 < 3 one float apart: equal after a softmax
    images[0]["pred"][:, tied] = 0.0
    low = torch.tensor(0.01)
    images[0]["pred"][2, tied], images[0]["pred"][3, tied] = low, torch.nextafter(low, torch.tensor(1.0))
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "lora_3d_segmentation" / "configs" / "train.json"))
    parser["class_names"] = ["background"] + [f"region{c}" for c in range(1, classes)]
    parser["num_classes"] = classes
    postprocessing = parser.get_parsed_content("validate#postprocessing")
    maps = _metric_values([postprocessing(dict(image)) for image in images], {
        **parser.get_parsed_content("validate#key_metric"), **parser.get_parsed_content("validate#additional_metrics")
    })
    one_hot_postprocessing = Compose([
AsDiscreted(["pred", "label"], argmax=[True, False], to_onehot=classes)])
    pairs, foreground = from_engine(["pred", "label"]), parser["class_names"][1:]
    one_hots = _metric_values([one_hot_postprocessing(dict(image)) for image in images], {
        "val_mean_dice": MeanDice(include_background=False, output_transform=pairs),
        "val_dice": ClassMeanDice(foreground, include_background=False, output_transform=pairs),
        "val_hd95": ClassHausdorffDistance(foreground, mean_name="val_mean_hd95", percentile=95,
                                           include_background=False, output_transform=pairs),
    })
    assert postprocessing(dict(images[0]))["pred"].shape[0] == 1  # no one-hot
    details = maps[1]  # [image][class - 1]
    assert np.isnan(maps[0]["val_dice_region39"]) and np.isnan(maps[0]["val_hd95_region39"])
    assert np.isnan(details["val_mean_dice"][1][6]) and np.isnan(details["val_hd95"][1][6])
    assert not np.isnan(details["val_mean_dice"][0][4]) and np.isnan(details["val_hd95"][0][4])
    assert len(maps[0]) == 2 * len(foreground) + 2
    assert (Activationsd("pred", softmax=True)(dict(images[0]))["pred"].argmax(0)[tied] == 2).all()  # a softmax's
    assert (postprocessing(dict(images[0]))["pred"][0][tied] == 3).all()  # the logits' argmax is right
    np.testing.assert_equal(maps[0], one_hots[0])  # NaN equals NaN, floats exactly
    np.testing.assert_equal(maps[1], {name: one_hots[1][name] for name in ("val_mean_dice", "val_hd95")})
    np.testing.assert_equal(one_hots[1]["val_dice"], one_hots[1]["val_mean_dice"])  # the one Dice handler's details


@pytest.mark.parametrize("config", ["train.json", "evaluate.json"])
def test_validation_and_evaluation_compute_dice_once_per_image(config, monkeypatch):
    """The key metric ``mean_dice`` and ``dice_<class>`` come from one computation of each image's Dice (there were
    two: MONAI's ``MeanDice`` and ``ClassMeanDice``, about 10 s each per 1 mm volume at 135 classes)."""
    calls = []
    compute = DiceMetric._compute_tensor
    monkeypatch.setattr(DiceMetric, "_compute_tensor", lambda self, *a, **k: calls.append(1) or compute(self, *a, **k))
    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles" / "lora_3d_segmentation" / "configs" / name)
                        for name in dict.fromkeys(["train.json", config])])
    parser.update({"class_names": list(TINY_CLASSES), "num_classes": len(TINY_CLASSES)})
    prefix, scope = ("val_", "validate#") if config == "train.json" else ("", "")
    metrics = {**parser.get_parsed_content(f"{scope}key_metric"),
               **parser.get_parsed_content(f"{scope}additional_metrics")}
    generator = torch.Generator().manual_seed(0)
    outputs = [{key: torch.randint(0, len(TINY_CLASSES), (1, 6, 5, 4), generator=generator).float()
                for key in ("pred", "label")} for _ in range(3)]
    scalars, details = _metric_values(outputs, metrics)
    assert len(calls) == len(outputs)
    assert set(scalars) == {f"{prefix}mean_dice", f"{prefix}mean_hd95"} | {
        f"{prefix}{metric}_{name}" for metric in ("dice", "hd95") for name in FOREGROUND}
    assert np.array(details[f"{prefix}mean_dice"]).shape == (len(outputs), len(FOREGROUND))  # mean_dice_raw.csv


@pytest.mark.slow
def test_mlflow_tracking_logs_dice_per_class_and_the_evaluation_files(tiny_data, tmp_path):
    from mlflow.tracking import MlflowClient

    bundle, overrides = _copy("linear_segmentation", tiny_data["2d"], tiny_data["encoder2"], tmp_path)
    mlflow_lines: list[logging.LogRecord] = []  # MLflow logs to its own handler, not the root's
    capture = logging.Handler()
    capture.emit = mlflow_lines.append
    logging.getLogger("mlflow").addHandler(capture)
    try:
        with warnings.catch_warnings(record=True) as caught:
            run_bundle(bundle, ["train.json"], "train", tracking="mlflow", pixdim=[1.5, 0.8], **overrides,
                       **{"train#trainer#max_epochs": 2})
            run_bundle(bundle, ["train.json", "evaluate.json"], "infer", tracking="mlflow", quiet=True, **overrides)
            images = str(tiny_data["2d"].parent / "images" / "test")
            run_bundle(bundle, ["inference.json"], "infer", tracking="mlflow", quiet=True, infer_images=images,
                       **overrides)
    finally:
        logging.getLogger("mlflow").removeHandler(capture)
    # neither MLflow's lines on creating eval/mlruns.db nor MONAI's warning about its own HD95 stand among the run's
    assert not [record.getMessage() for record in mlflow_lines if record.levelno < logging.WARNING]
    assert not [str(warning.message) for warning in caught if "get_mask_edges" in str(warning.message)]
    client = MlflowClient(f"sqlite:///{bundle / 'eval' / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("monai_prompt_segmentation")
    runs = {run.info.run_name.rsplit("_", 3)[0]: run for run in client.search_runs([experiment.experiment_id])}
    train, evaluate, infer = (runs[f"linear_segmentation_{kind}"] for kind in ("train", "evaluate", "infer"))
    per_class = {f"{metric}_{name}" for metric in ("dice", "hd95") for name in FOREGROUND}
    assert {"train_loss", "val_mean_dice", "val_mean_hd95"} | {f"val_{name}" for name in per_class} <= set(
        train.data.metrics
    )
    assert [m.step for m in client.get_metric_history(train.info.run_id, "val_dice_csf")] == [1, 2]
    assert {"mean_dice", "mean_hd95"} | per_class <= set(evaluate.data.metrics)
    artifacts = {artifact.path for artifact in client.list_artifacts(evaluate.info.run_id)}
    assert {"metrics.csv", "mean_dice_raw.csv", "hd95_raw.csv", "model.pt"} <= artifacts
    # the spacing and classes (only in training_config.json before) in both runs; the ROI sampling in training
    task = {"pixdim": "[1.5,0.8]", "class_names": json.dumps(list(TINY_CLASSES), separators=(",", ":")),
            "label_values": "[0,1,2,3]", "feature_size": "8", "sw_overlap": "0.25"}
    assert {key: train.data.params[key] for key in [*task, "num_samples", "img_size", "max_epochs"]} == {
        **task, "num_samples": "1", "img_size": str(overrides["img_size"]), "max_epochs": "2"}
    assert {key: evaluate.data.params[key] for key in task} == task
    assert not {"max_epochs", "epoch_length", "num_samples", "learning_rate"} & set(evaluate.data.params)
    # inference: the same settings, the images and where its masks went, the training run of its checkpoint
    assert {key: infer.data.params[key] for key in [*task, "infer_images", "training_run_id"]} == {
        **task, "infer_images": images, "training_run_id": train.info.run_id}
    assert Path(infer.data.params["mask_dir"]).resolve() == (bundle / "eval" / "masks").resolve()
    assert not {"max_epochs", "epoch_length", "num_samples", "learning_rate"} & set(infer.data.params)


@pytest.mark.slow
def test_resume_continues_from_the_last_checkpoint(tiny_data, tmp_path):
    bundle, overrides = _copy("dvpt_segmentation", tiny_data["2d"], tiny_data["encoder2"], tmp_path)
    run_bundle(bundle, ["train.json"], "train", quiet=True, **overrides, **{"train#trainer#max_epochs": 1})
    first = torch.load(bundle / "models" / "checkpoint_epoch=1.pt", weights_only=True)
    workflow = run_bundle(bundle, ["train.json"], "train", resume=True, quiet=True, **overrides,
                          **{"train#trainer#max_epochs": 2})
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 2 and trainer.state.iteration == 2 * first["trainer"]["iteration"]
    assert latest_checkpoint(bundle / "models").endswith("checkpoint_epoch=2.pt")
    second = torch.load(bundle / "models" / "checkpoint_epoch=2.pt", weights_only=True)
    assert second["run"] == first["run"]  # the same run, continued
    assert set(second["model"]) == set(first["model"])  # the delta's tensors (prompts, decoder), trained on
    assert any(not torch.equal(first["model"][key], second["model"][key]) for key in first["model"])

    # continue_model (MONAI Label's training of a served bundle) on a datalist given with --datalist_file: read,
    # checked and trained on (it ended with "TypeError: 'NoneType' object is not subscriptable")
    served = torch.load(bundle / "models" / "model.pt", weights_only=True)
    continued = run_bundle(bundle, ["train.json"], "train", continue_model=True, quiet=True, **overrides,
                           **{"train#trainer#max_epochs": 1})
    assert len(continued.parser.get_parsed_content("datalist")["training"]) > 0
    tuned = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert any(not torch.equal(served["model"][key], tuned["model"][key]) for key in served["model"])


@pytest.mark.slow
def test_pixdim_is_recorded_resampled_to_packaged_and_checked_on_resume(tiny_data, tmp_path):
    """A 3D bundle trained with --pixdim and img_size chosen from the data (48, not the declared 96): the record keeps
    both, and the label values; evaluation and inference resample to the recorded spacing without being told, and
    evaluation scores the masks inference writes against the label files; a resume with another spacing is refused;
    the packaged copy states them in its configs and metadata (the classes under their label values), so the
    README's checks and export run on it as it is; a record of an earlier version, without them, reads as no
    resampling and consecutive label values."""
    name, pixdim = "lora_3d_segmentation", [2.4, 2.0, 2.0]  # the tiny volumes are 1.2 x 1.0 x 2.0 mm
    bundle, overrides = _copy(name, tiny_data["3d"], tiny_data["encoder3"], tmp_path)
    overrides = {key: value for key, value in overrides.items() if key != "img_size" and not key.startswith("_meta_")}
    run_bundle(bundle, ["train.json"], "train", quiet=True, pixdim=pixdim, **overrides,
               **{"train#trainer#max_epochs": 1})
    record = json.loads((bundle / "models" / "training_config.json").read_text())
    assert record["pixdim"] == pixdim and record["img_size"] == 48 and record["label_values"] == list(ATLAS_VALUES)
    continued = ConfigParser()  # MONAI Label's training of the served bundle continues at the recorded spacing
    continued.read_config(str(bundle / "configs" / "train.json"))
    continued.update({"bundle_root": str(bundle), "continue_model": True})
    assert continued.get_parsed_content("pixdim") == pixdim
    assert continued.get_parsed_content("label_values") == list(ATLAS_VALUES)

    image = sorted((tiny_data["3d"].parent / "images" / "test").iterdir())[0]
    resampled = (19, 20, 34)  # 36 x 40 x 34 voxels of 1.2 x 1.0 x 2.0 mm at 2.4 x 2.0 x 2.0 mm, as Spacingd rounds
    evaluation = run_bundle(bundle, ["train.json", "evaluate.json"], "infer", quiet=True, **overrides)
    inference = run_bundle(bundle, ["inference.json"], "infer", quiet=True, infer_images=str(image.parent),
                           **overrides)
    for workflow in (evaluation, inference):
        assert workflow.parser.get_parsed_content("pixdim") == pixdim
        assert workflow.parser.get_parsed_content("img_size") == 48
        preprocessing = workflow.parser.get_parsed_content("preprocessing")
        assert preprocessing({"image": str(image)})["image"].shape[1:] == resampled
    mask = bundle / "eval" / "masks" / image.name.replace(".nii.gz", "_seg.nii.gz")
    assert nib.load(mask).shape == nib.load(image).shape  # inverted to the input's grid
    _assert_masks_match_labels_and_metrics(bundle, tiny_data["3d"], png=False)  # evaluated on the labels' grid

    with pytest.raises(Exception) as info:
        run_bundle(bundle, ["train.json"], "train", quiet=True, resume=True, pixdim=[1.2, 1.0, 2.0], **overrides,
                   **{"train#trainer#max_epochs": 2})
    assert "--pixdim [1.2, 1.0, 2.0] (recorded: [2.4, 2.0, 2.0])" in str(root_cause(info.value)[0])

    deploy = tmp_path / "deploy" / name
    package_bundle(bundle, deploy)
    for config in ("train.json", "evaluate.json", "inference.json"):
        assert json.loads((deploy / "configs" / config).read_text())["pixdim"] == pixdim, config
    meta, infer = deploy / "configs" / "metadata.json", deploy / "configs" / "inference.json"
    assert json.loads(meta.read_text())["network_data_format"]["inputs"]["image"]["spatial_shape"] == [48] * 3
    verify_metadata(meta_file=str(meta), filepath=str(schema_file()))
    verify_net_in_out(net_id="network_def", meta_file=str(meta), config_file=str(infer), bundle_root=str(deploy))
    ts_file = deploy / "models" / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts_file), meta_file=str(meta), config_file=str(infer),
                ckpt_file=str(deploy / "models" / "model.pt"), key_in_ckpt="model", bundle_root=str(deploy))
    extra = {"metadata.json": ""}
    torch.jit.load(str(ts_file), _extra_files=extra)
    exported = json.loads(extra["metadata.json"])["network_data_format"]
    assert exported["inputs"]["image"]["spatial_shape"] == [48] * 3
    assert exported["outputs"]["pred"]["channel_def"] == {str(v): name for v, name in zip(ATLAS_VALUES, TINY_CLASSES)}

    earlier = {key: value for key, value in record.items() if key not in ("pixdim", "label_values")}
    (bundle / "models" / "training_config.json").write_text(json.dumps(earlier))  # a record of version 0.1.6
    inference = ConfigParser()
    inference.read_config(str(bundle / "configs" / "inference.json"))
    inference.update({"bundle_root": str(bundle)})
    assert inference.get_parsed_content("pixdim") is None
    assert inference.get_parsed_content("label_values") == list(range(len(TINY_CLASSES)))


def test_an_intensity_window_is_recorded_and_scales_evaluation_and_inference_as_training(tmp_path):
    """A CT in Hounsfield units: ``--intensity_range "[-1000, 2000]"`` scales every image by that window, clipped,
    where min-max put the same HU at another value in each image (a crop without the scan's brightest voxel); the
    record keeps it, and evaluation, inference and a continued run read it without being told; with a record of an
    earlier version, each image's min-max; a window that is no [low, high] names the setting. (Before: no such
    setting; ``--intensity_range`` was an unknown key that MONAI ignored.)"""
    datalist = write_tiny_segmentation(tmp_path / "data", 3, counts=(1, 1, 0))
    ct = np.array([-1024, -1000, 0, 226, 2000, 3000], dtype=np.int16).reshape(1, 2, 3).repeat(2, axis=0)
    path, label = tmp_path / "ct.nii.gz", tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(ct, np.eye(4)), path)  # RAS already: the transforms move no voxel
    nib.save(nib.Nifti1Image((ct > 200).astype(np.uint8) * 2, np.eye(4)), label)  # 2: a class of the tiny data
    window = np.clip((ct + 1000.0) / 3000.0, 0, 1)
    min_max = (ct + 1024.0) / 4024.0
    bundle = find_bundle("lora_3d_segmentation") / "configs"

    def parsed(configs: list[str], key: str, **overrides: Any) -> Any:
        parser = ConfigParser()
        parser.read_config([str(bundle / config) for config in configs])
        parser.update({"bundle_root": str(tmp_path), "datalist_file": str(datalist), **overrides})
        return parser.get_parsed_content(key)

    record = json.loads(json.dumps(parsed(["train.json"], "training_record", intensity_range=[-1000, 2000])))
    assert record["intensity_range"] == [-1000, 2000]
    train = Compose(parsed(["train.json"], "train#deterministic_transforms", intensity_range=[-1000, 2000]))
    np.testing.assert_allclose(train({"image": str(path), "label": str(label)})["image"][0], window, atol=1e-6)
    earlier = {key: value for key, value in record.items() if key != "intensity_range"}
    for configs in (["train.json", "evaluate.json"], ["inference.json"]):
        for training_config, expected in ((record, window), (earlier, min_max)):
            preprocessing = parsed(configs, "preprocessing", training_config=training_config)
            np.testing.assert_allclose(preprocessing({"image": str(path)})["image"][0], expected, atol=1e-6)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "training_config.json").write_text(json.dumps(record))
    # MONAI Label's training of the served bundle scales by the recorded window
    assert parsed(["train.json"], "intensity_range", continue_model=True) == [-1000, 2000]
    with pytest.raises(ValueError, match=r"intensity_range \[2000, -1000\]: give \[low, high\], low below high"):
        ScaleIntensityWindowd("image", [2000, -1000])
    for spelling in ("none", "Null"):  # the command line passes --intensity_range none (or null) as a string
        assert ScaleIntensityWindowd("image", spelling).intensity_range is None
    with pytest.raises(ValueError, match="intensity_range 'bone': give"):
        ScaleIntensityWindowd("image", "bone")


class _IntensityClasses(torch.nn.Module):
    """A network without weights for the tiny data (class ``k`` is about ``60 k`` of an image whose brightest voxels
    are about 220): logits that peak where the image, in [0, 1], is at its class's brightness."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        centres = torch.arange(len(TINY_CLASSES), dtype=image.dtype, device=image.device) * 0.27
        return -(((image - centres.view(1, -1, *[1] * (image.ndim - 2))) / 0.1) ** 2)


#: handlers that a workflow of :func:`_recorded_workflow` runs without: the delta (there is none) and MLflow.
_NO_DELTA = ("monai_prompt.engine.CheckedCheckpointLoader", "monai_prompt.engine.MLflowPeftLogger")


def _recorded_workflow(configs: list[str], root: Path, record: dict[str, Any], **overrides: Any) -> Any:
    """The evaluator of ``lora_3d_segmentation``'s ``configs`` with the training record ``record``, outputs under
    ``root`` and :class:`_IntensityClasses` as the network (no delta, no MLflow), run."""
    parser = ConfigParser()
    parser.read_config([str(find_bundle("lora_3d_segmentation") / "configs" / config) for config in configs])
    parser.update({"bundle_root": str(root), "training_config": record, "num_workers": 0, **overrides})
    parser["network"] = _IntensityClasses()
    parser["handlers"] = [handler for handler in parser["handlers"]  # inference's "@outputs" (the mask count) stays
                          if not isinstance(handler, dict) or handler["_target_"] not in _NO_DELTA]
    evaluator = parser.get_parsed_content("evaluator")
    evaluator.run()
    return evaluator


def test_evaluation_with_pixdim_scores_each_label_on_its_own_grid(tmp_path):
    """On 0.8 x 1 x 3 mm volumes evaluated at pixdim 2 mm (one label stored in another axis order than its image),
    evaluation's Dice and HD95 (mm: 0.8 per voxel along x; they were in voxels) per class and per image are
    numpy/scipy's of the masks inference writes against the label files, on the labels' own grid (they were the
    scores of the label resampled to pixdim);
    without pixdim, evaluation's postprocessing is validation's argmax alone."""
    affine = np.array([[-0.8, 0, 0, 20.0], [0, 1.0, 0, -10.0], [0, 0, 3.0, 5.0], [0, 0, 0, 1]])
    datalist = write_tiny_segmentation(tmp_path / "data", 3, counts=(0, 0, 2), affine=affine)
    items = json.loads(datalist.read_text())["test"]
    flipped = tmp_path / "data" / items[1]["label"]  # the same voxels stored the other way along x
    label = nib.load(flipped)
    moved = label.affine.copy()
    moved[:3, 3] += moved[:3, 0] * (label.shape[0] - 1)
    moved[:3, 0] *= -1
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj)[::-1], moved), flipped)
    record = {"class_names": list(TINY_CLASSES), "label_values": list(range(len(TINY_CLASSES))),
              "num_classes": len(TINY_CLASSES), "in_channels": 1, "spatial_dims": 3, "img_size": 32, "pixdim": 2.0}
    evaluation = _recorded_workflow(["train.json", "evaluate.json"], tmp_path / "bundle", record,
                                    datalist_file=str(datalist))
    _recorded_workflow(["inference.json"], tmp_path / "bundle", record,
                       infer_images=str(tmp_path / "data" / "images" / "test"))

    canonical = {}  # mask and label of each image turned to RAS (Dice and distances do not change)
    for item in items:
        name = Path(item["image"]).name.replace(".nii.gz", "_seg.nii.gz")
        canonical[item["image"]] = [np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj) for path in
                                    (tmp_path / "bundle" / "eval" / "masks" / name, tmp_path / "data" / item["label"])]
    scores = [reference_scores(mask, label, range(len(TINY_CLASSES)), spacing=(0.8, 1.0, 3.0))
              for mask, label in canonical.values()]
    dice, hd95 = (np.array([image[key] for image in scores]) for key in ("dice", "hd95"))
    metrics = read_metrics(tmp_path / "bundle" / "eval" / "metrics.csv")
    assert metrics == pytest.approx(evaluation.state.metrics, abs=1e-4)
    assert metrics["mean_dice"] == pytest.approx(np.nanmean(dice), abs=1e-4)
    assert metrics["mean_hd95"] == pytest.approx(np.nanmean(hd95), abs=1e-4)
    for index, name in enumerate(FOREGROUND):
        assert metrics[f"dice_{name}"] == pytest.approx(np.nanmean(dice[:, index]), abs=1e-4), name
        assert metrics[f"hd95_{name}"] == pytest.approx(np.nanmean(hd95[:, index]), abs=1e-4), name
    for raw, table in (("mean_dice_raw.csv", dice), ("hd95_raw.csv", hd95)):  # per image: the classes, their mean
        header, *lines = (tmp_path / "bundle" / "eval" / raw).read_text().splitlines()
        assert header.split(",") == ["filename", *FOREGROUND, "mean"]
        rows = [line.split(",") for line in lines]
        assert [Path(row[0]).name for row in rows] == [Path(item["image"]).name for item in items]
        np.testing.assert_allclose(np.array([row[1:-1] for row in rows], dtype=float), table, atol=1e-4)
    assert 0.5 < metrics["mean_dice"] < 0.999

    parser = ConfigParser()
    parser.read_config([str(find_bundle("lora_3d_segmentation") / "configs" / config)
                        for config in ("train.json", "evaluate.json")])
    parser.update({"training_config": {**record, "pixdim": None}})
    transforms = parser.get_parsed_content("postprocessing").transforms
    assert [type(transform).__name__ for transform in transforms] == ["AsDiscreted"]



def test_masks_are_named_as_the_input_in_any_case_and_keep_its_nifti_codes(tmp_path):
    """The mask of ``SCAN.NII.GZ`` is ``SCAN_seg.nii.gz`` (MONAI's own naming gave ``SCAN.NII_seg.nii.gz``), as is
    that of a ``.NII`` input (nibabel reads no ``.Nii.gz``); each keeps its input's sform and qform codes (MONAI
    writes 1 and 1), both 1 where the input had none."""
    datalist = write_tiny_segmentation(tmp_path / "data", 3, counts=(0, 0, 1))
    source = nib.load(tmp_path / "data" / json.loads(datalist.read_text())["test"][0]["image"])
    inputs = {"SCAN.NII.GZ": (4, 2), "b.NII": (2, 0), "c.nii.gz": (0, 1), "d.nii.gz": (0, 0)}
    (tmp_path / "inputs").mkdir()
    for name, (sform, qform) in inputs.items():
        image = nib.Nifti1Image(np.asarray(source.dataobj), source.affine)
        image.set_sform(source.affine, code=sform)
        image.set_qform(source.affine, code=qform)
        nib.save(image, tmp_path / "inputs" / name.lower())  # nibabel writes the extension in lower case
        (tmp_path / "inputs" / name.lower()).rename(tmp_path / "inputs" / name)
    record = {"class_names": list(TINY_CLASSES), "label_values": list(range(len(TINY_CLASSES))),
              "num_classes": len(TINY_CLASSES), "in_channels": 1, "spatial_dims": 3, "img_size": 32, "pixdim": None}
    _recorded_workflow(["inference.json"], tmp_path / "bundle", record, infer_images=str(tmp_path / "inputs"))
    masks = tmp_path / "bundle" / "eval" / "masks"
    assert sorted(path.name for path in masks.iterdir()) == [
        "SCAN_seg.nii.gz", "b_seg.nii.gz", "c_seg.nii.gz", "d_seg.nii.gz"]
    for name, codes in inputs.items():
        mask = nib.load(masks / f"{name.split('.')[0]}_seg.nii.gz")
        written = (int(mask.header["sform_code"]), int(mask.header["qform_code"]))
        assert written == (codes if any(codes) else (1, 1)), name
        np.testing.assert_allclose(mask.affine, nib.load(tmp_path / "inputs" / name).affine, atol=1e-5)


def test_the_softmax_goes_back_to_the_input_grid_a_few_classes_at_a_time(tmp_path, monkeypatch):
    """With pixdim, evaluation and inference resample the softmax of 20 classes 8 at a time onto the label's and the
    input's grid (not the 20 x that volume at once; inference's ``Invertd`` resamples in float64), to the class map
    of the whole softmax resampled."""
    datalist = write_tiny_segmentation(tmp_path / "data", 3, counts=(0, 0, 1))
    item = {key: str(tmp_path / "data" / path) for key, path in json.loads(datalist.read_text())["test"][0].items()}
    record = {"class_names": [f"class{k}" for k in range(20)], "label_values": list(range(20)), "num_classes": 20,
              "in_channels": 1, "spatial_dims": 3, "img_size": 32, "pixdim": 2.0}
    channels, resample = [], SpatialResample.__call__

    def counted(self, img, *args, **kwargs):
        channels.append(len(img))
        return resample(self, img, *args, **kwargs)

    monkeypatch.setattr(SpatialResample, "__call__", counted)
    for configs, keys in ((["train.json", "evaluate.json"], ("image", "label")), (["inference.json"], ("image",))):
        parser = ConfigParser()
        parser.read_config([str(find_bundle("lora_3d_segmentation") / "configs" / config) for config in configs])
        parser.update({"bundle_root": str(tmp_path / "bundle"), "training_config": record})
        preprocessing = parser.get_parsed_content("preprocessing")
        data = preprocessing({key: item[key] for key in keys})
        logits = torch.randn(20, *data["image"].shape[1:], generator=torch.Generator().manual_seed(0))
        data["pred"] = MetaTensor(logits, meta=data["image"].meta)
        step = (ResampleToMatchd("pred", key_dst="label", dtype=torch.float32) if "label" in keys
                else Invertd("pred", transform=preprocessing, orig_keys="image", nearest_interp=False))
        expected = torch.argmax(step({**data, "pred": torch.softmax(data["pred"], 0)})["pred"], 0)
        channels.clear()
        found = parser.get_parsed_content("postprocessing")(data)["pred"]
        assert [count for count in channels if count > 1] == [8, 8, 4], configs  # the mask writer's: 1
        assert np.array_equal(np.asarray(found).squeeze(), np.asarray(expected)), configs


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_training_img_size_takes_whole_training_images_unless_set(spatial_dims, tmp_path, caplog):
    """The tiny images are 40 x 36 (3D 36 x 40 x 34): the ROI is 48, their largest side rounded up to 16; an
    --img_size on the command line replaces the choice."""
    datalist = write_tiny_segmentation(tmp_path / "data", spatial_dims)
    name = "lora_segmentation" if spatial_dims == 2 else "lora_3d_segmentation"
    parser = ConfigParser()
    parser.read_config(str(find_bundle(name) / "configs" / "train.json"))
    parser.update({"datalist_file": str(datalist), "bundle_root": str(tmp_path)})
    with caplog.at_level("INFO", logger="monai_prompt"):
        assert parser.get_parsed_content("roi_size") == (48,) * spatial_dims
    assert f"img_size 48: the ROI and sliding window take whole training images (the largest, {tmp_path}" in caplog.text
    parser.update({"img_size": 32})
    assert parser.get_parsed_content("roi_size", lazy=False) == (32,) * spatial_dims


@pytest.mark.parametrize(("png", "spatial_dims", "pixdim"), [
    (False, 3, [2.4, 2.0, 2.0]), (False, 3, 1.0), (False, 2, [0.7, 0.9]), (True, 2, [0.5, 2.0])])
def test_whole_image_roi_measures_images_after_the_resampling(png, spatial_dims, pixdim, tmp_path, caplog):
    """With --pixdim the ROI takes the images as the bundle's preprocessing gives them (read from the headers,
    checked against the validation preprocessing of train.json on the image itself)."""
    datalist = write_tiny_segmentation(tmp_path / "data", spatial_dims, png=png, counts=(1, 0, 0))
    items = read_segmentation_datalist(datalist)["training"]
    parser = ConfigParser()
    parser.read_config(str(find_bundle("lora_segmentation" if spatial_dims == 2 else "lora_3d_segmentation")
                           / "configs" / "train.json"))
    parser.update({"datalist_file": str(datalist), "bundle_root": str(tmp_path), "pixdim": pixdim})
    preprocessed = parser.get_parsed_content("validate#preprocessing")(dict(items[0]))["image"].shape[1:]
    assert resampled_shape(items[0]["image"], spatial_dims, pixdim) == tuple(preprocessed)
    with caplog.at_level("INFO", logger="monai_prompt"):
        side = parser.get_parsed_content("img_size")
    assert side == min(16 * math.ceil(max(preprocessed) / 16), 256 if spatial_dims == 2 else 96)
    assert f"is {max(preprocessed)} wide at pixdim {pixdim}" in caplog.text


def test_whole_image_roi_keeps_to_the_memory_budget(tmp_path, caplog):
    from monai_prompt.data import whole_image_roi

    for name, size in (("small.png", (20, 30)), ("wide.png", (300, 40))):
        Image.fromarray(np.zeros(size[::-1], dtype=np.uint8)).save(tmp_path / name)
    items = [{"image": str(tmp_path / "small.png")}]
    assert whole_image_roi(items, 2) == 32
    with caplog.at_level("INFO", logger="monai_prompt"):
        assert whole_image_roi([*items, {"image": str(tmp_path / "wide.png")}], 2) == 256
    assert "is 300 wide; a multiple of 16, cut to 256, the memory budget" in caplog.text
    with pytest.raises(ValueError, match="there are none; add 'training' items or set --img_size"):
        whole_image_roi([], 3)
