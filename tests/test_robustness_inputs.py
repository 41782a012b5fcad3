"""What the workflows do with awkward inputs, through the real command lines (docs/robustness.md, "Inputs and
outputs"): same-named inference inputs of two folders, a DICOM among PNGs, segmentation datalists and repeated
entries given to ``monai-prompt check-data``, the method of a delta overridden."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
import torch

from bundle_support import CLASSES, REPO, copy_bundle, tiny_overrides
from io_support import sha256
from monai_prompt.bundle_gen.specs import BUNDLE_SPECS, SEGMENTATION_SPECS
from monai_prompt.cli import main
from monai_prompt.data.datalist import ClassificationDatalist, DataCheckError
from monai_prompt.data.segmentation import check_segmentation_datalist
from monai_prompt.peft import DeltaMismatchError
from monai_prompt.runs import root_cause
from monai_prompt.runs.runner import run_bundle
from segmentation_support import tiny_segmentation_overrides, write_tiny_encoder, write_tiny_segmentation

LINEAR = BUNDLE_SPECS["linear_classification"]


def run_command(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``command`` on one CPU thread, without a GPU or an MLflow server."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)


def bundle_run(bundle: Path, config: str, overrides: dict) -> list[str]:
    """``python -m monai.bundle run`` of one of ``bundle``'s configs with ``overrides`` as Python literals."""
    args = {k: v for k, v in overrides.items() if not k.startswith("_meta_")}
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / config),
            "--bundle_root", str(bundle), *[item for key, value in args.items() for item in (f"--{key}", repr(value))]]


@pytest.mark.slow
def test_same_named_inference_inputs_of_two_folders_get_a_mask_each(tmp_path):
    spec = SEGMENTATION_SPECS["linear_segmentation"]
    datalist = write_tiny_segmentation(tmp_path / "data", 2, counts=(2, 1, 2))
    bundle = tmp_path / "bundles" / spec.name
    shutil.copytree(REPO / "bundles" / spec.name, bundle)
    overrides = tiny_segmentation_overrides(spec, datalist, write_tiny_encoder(tmp_path / "vit.pt", 2, seed=1))
    # (seed 1: the random backbone of --pretrained '$None' below, seeded 0 by the bundle, differs from it)
    run_bundle(bundle, ["train.json"], "train", quiet=True, **overrides, **{"train#trainer#max_epochs": 1})
    inputs = []
    for patient, case in (("a", "case0"), ("b", "case1")):  # two different images, both named t1.nii.gz
        inputs.append(tmp_path / "patients" / patient / "t1.nii.gz")
        inputs[-1].parent.mkdir(parents=True)
        shutil.copy(datalist.parent / "images" / "test" / f"{case}.nii.gz", inputs[-1])
    models = {p.name: sha256(p) for p in (bundle / "models").glob("*.*")}

    # --pretrained None is dropped by MONAI's run (every None is), so the recorded weights load and the delta with them
    # (the bundle named relative to the working folder: the last line names the masks' folder absolute)
    infer = {**overrides, "infer_images": list(map(str, inputs)), "pretrained": None}
    result = run_command(bundle_run(bundle.relative_to(tmp_path), "inference.json", infer), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.rstrip().splitlines()[-1]
    assert last.endswith(f" - monai_prompt - INFO - inference: wrote 2 masks to {bundle / 'eval' / 'masks'}"), last
    masks = sorted(p.relative_to(bundle / "eval" / "masks").as_posix() for p in (bundle / "eval").rglob("*.nii.gz"))
    assert masks == ["a/t1_seg.nii.gz", "b/t1_seg.nii.gz"]
    for image in inputs:
        mask = nib.load(bundle / "eval" / "masks" / image.parent.name / "t1_seg.nii.gz")
        assert mask.shape == nib.load(image).shape and np.allclose(mask.affine, nib.load(image).affine, atol=1e-5)
    assert {p.name: sha256(p) for p in (bundle / "models").glob("*.*")} == models
    with pytest.raises(Exception) as caught:  # '$None' (an expression) builds a random backbone: the delta refuses
        run_bundle(bundle, ["inference.json"], "infer", quiet=True, **{**infer, "pretrained": "$None"})
    cause = root_cause(caught.value)[0]
    assert isinstance(cause, DeltaMismatchError) and "from pretrained=None: random weights" in str(cause)
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE((bundle / "models" / "training_config.json").stat().st_mode) == 0o666 & ~umask


@pytest.mark.slow
def test_a_dicom_and_a_metaimage_among_pngs_are_checked_and_train(tiny, tmp_path, capsys):
    from pydicom import examples

    dicom = tmp_path / "ct.dcm"  # 128 x 128 int16, read by ITK as [1, 128, 128, 1] with DICOM metadata
    shutil.copy(examples.get_path("ct"), dicom)
    metaimage = tmp_path / "flat.mha"  # ITK's 2D image: a 3 x 3 affine where the PIL reader gives 4 x 4
    itk.imwrite(itk.image_from_array(np.linspace(0, 1, 24 * 20, dtype=np.float32).reshape(24, 20)), str(metaimage))
    items = json.loads((tiny["data"] / "datalist.json").read_text())
    splits = {split: [(tiny["data"] / item["image"], item["label"]) for item in items[split]]
              for split in ("training", "validation")}
    splits["training"][1:1] = [(dicom, 2), (metaimage, 0)]  # in the first batch of 4, beside PNGs
    datalist = ClassificationDatalist(list(CLASSES), {
        split: [{"image": str(path), "label": label} for path, label in pairs] for split, pairs in splits.items()
    }).save_json(tmp_path / "mixed" / "datalist.json")

    assert main(["check-data", str(datalist)]) == 0
    out = capsys.readouterr().out
    assert "formats {'dicom': 1, 'itk': 1, 'pil': 18}" in out
    assert out.rstrip().splitlines()[-1] == (
        f"note: 2 of 20 images differ in size from the other 32 x 32: {dicom} (128 x 128), {metaimage} (20 x 24); the "
        f"bundle resizes every image to img_size (non-square ones are stretched)."
    )
    bundle = copy_bundle(LINEAR.name, tmp_path)
    overrides = {**tiny_overrides(LINEAR, datalist.parent, tiny["backbone"]), "shuffle": False,
                 "train#trainer#max_epochs": 1}
    result = run_command(bundle_run(bundle, "train.json", overrides), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]  # was: "Collate error on the key 'image'", no file named
    assert f"data check of {datalist}: 2 of 20 images differ in size" in result.stdout
    assert {"model.pt", "checkpoint_epoch=1.pt"} <= {p.name for p in (bundle / "models").iterdir()}


def test_a_missing_evaluation_split_names_the_splits_to_evaluate_instead(tmp_path):
    """Evaluating a datalist without a 'test' list names the splits it has and --evaluate_split (it said only that
    the workflow needs 'test' items)."""
    datalist = write_tiny_segmentation(tmp_path, 3, counts=(2, 1, 0))
    with pytest.raises(DataCheckError, match=rf"^1 problem\(s\) in {datalist}:\n  - {datalist}: no 'test' items; the "
                       r"workflow needs them; add a 'test' list, or evaluate a split it has \(training, validation\) "
                       r"with --evaluate_split validation\.$"):
        check_segmentation_datalist(datalist, required_splits=["test"])


def test_a_coronal_2d_slice_turns_to_ras_and_back():
    """A 2D slice of a coronal plane (its axes along world x and z; MONAI's Orientation failed with "Unable to find
    out axis 1.0 in start_ornt") is turned with its axes increasing (R, S) and back to its own voxels and affine, as
    Invertd turns an inference's prediction; an axial slice is turned as MONAI turns it."""
    from monai.data import MetaTensor
    from monai.transforms import Orientation

    from monai_prompt.data import SliceOrientation, refuse_slice_resampling, slice_orientation

    pixels = torch.arange(12.0).reshape(1, 4, 3)
    coronal = torch.tensor([[-1.5, 0, 0, 30.0], [0, 0, 0.8, -10.0], [0, -2.0, 0, 7.0], [0, 0, 0, 1]]).double()
    transform = SliceOrientation("RA", labels=None)
    turned = transform(MetaTensor(pixels.clone(), affine=coronal))
    assert torch.equal(turned.as_tensor(), pixels.flip(1, 2))
    assert torch.allclose(turned.affine, torch.tensor([[1.5, 0, 0, 25.5], [0, 0, 0.8, -10], [0, 2, 0, 3], [0, 0, 0, 1]],
                                                      dtype=torch.float64))
    back = transform.inverse(turned)
    assert torch.equal(back.as_tensor(), pixels) and torch.allclose(back.affine, coronal)
    assert not back.applied_operations
    with pytest.raises(ValueError, match=r"^slice\.nii\.gz: a 2D slice of a coronal or sagittal plane \(its axes run "
                                         r"along world x and z\), which pixdim cannot resample"):
        refuse_slice_resampling(turned, "slice.nii.gz")
    axial = torch.tensor([[-1.5, 0, 0, 30.0], [0, 2.0, 0, 7.0], [0, 0, 0.8, -10.0], [0, 0, 0, 1]], dtype=torch.float64)
    assert slice_orientation(axial, 2) is None and slice_orientation(coronal, 3) is None
    ours, monai = (t(MetaTensor(pixels.clone(), affine=axial)) for t in (transform, Orientation("RA", labels=None)))
    assert torch.equal(ours.as_tensor(), monai.as_tensor()) and torch.equal(ours.affine, monai.affine)


def test_the_segmentation_flip_mirrors_left_right_and_leaves_a_sagittal_slice(tmp_path):
    """The 2D segmentation bundles' training flip mirrors a coronal slice along its left-right axis and leaves a
    sagittal slice, which has none (MONAI's RandFlipd on axis 0 mirrored it front to back); image and label alike."""
    from monai.bundle import ConfigParser
    from monai.data import MetaTensor

    from monai_prompt.data import SliceOrientationd

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "linear_segmentation" / "configs" / "train.json"))
    flip = parser.get_parsed_content("train#random_transforms#2", instantiate=True)
    flip.prob = 1.0
    pixels = torch.arange(12.0).reshape(1, 4, 3)
    planes = {"coronal": [[-1.5, 0, 0, 0], [0, 0, 0.8, 0], [0, 2.0, 0, 0], [0, 0, 0, 1]],
              "sagittal": [[0, 0, 1.0, 0], [1.5, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 1]]}
    for plane, affine in planes.items():
        item = {key: MetaTensor(pixels.clone(), affine=torch.tensor(affine).double(),
                                meta={"original_affine": torch.tensor(affine).double()}) for key in ("image", "label")}
        turned = SliceOrientationd(["image", "label"], axcodes="RA", labels=None)(item)
        flipped = flip(turned)
        for key in ("image", "label"):
            expected = turned[key].flip(1) if plane == "coronal" else turned[key]
            assert torch.equal(flipped[key].as_tensor(), expected.as_tensor()), (plane, key)


@pytest.mark.slow
def test_coronal_2d_slices_train_evaluate_and_get_masks_on_their_grid(tmp_path):
    """2D NIfTI slices of a coronal plane (an LSA volume's slices, X x Z x 1) train, evaluate and get masks with their
    shape and affine, whose Dice against the label files is the evaluation's (each step failed: MONAI orients and
    writes 2D images by the affine's world x and y rows, where such a slice has no second axis); pixdim, which
    MONAI's Spacing cannot apply to them, is refused naming the file."""
    spec = SEGMENTATION_SPECS["linear_segmentation"]
    coronal = np.array([[-1.5, 0, 0, 30.0], [0, 0, 0.8, -10.0], [0, 2.0, 0, 7.0], [0, 0, 0, 1]])
    datalist = write_tiny_segmentation(tmp_path / "data", 2, counts=(2, 1, 1), affine=coronal)
    bundle = tmp_path / "bundles" / spec.name
    shutil.copytree(REPO / "bundles" / spec.name, bundle)
    overrides = tiny_segmentation_overrides(spec, datalist, write_tiny_encoder(tmp_path / "vit.pt", 2))
    run_bundle(bundle, ["train.json"], "train", quiet=True, **overrides, **{"train#trainer#max_epochs": 1})
    run_bundle(bundle, ["train.json", "evaluate.json"], "infer", quiet=True, **overrides)
    metrics = dict(line.split(",") for line in (bundle / "eval" / "metrics.csv").read_text().splitlines())
    image, label = (datalist.parent / f"{kind}s" / "test" / "case0.nii.gz" for kind in ("image", "label"))
    run_bundle(bundle, ["inference.json"], "infer", quiet=True, **overrides, infer_images=[str(image)])
    mask = nib.load(bundle / "eval" / "masks" / "case0_seg.nii.gz")
    assert mask.shape == nib.load(image).shape and np.allclose(mask.affine, coronal)
    predicted, truth = np.asarray(mask.dataobj), np.asarray(nib.load(label).dataobj)
    dice = [2 * np.sum((predicted == c) & (truth == c)) / (np.sum(predicted == c) + np.sum(truth == c))
            for c in range(1, 4) if (truth == c).any()]
    assert np.mean(dice) == pytest.approx(float(metrics["mean_dice"]), abs=1e-6)
    shutil.copytree(REPO / "bundles" / spec.name, tmp_path / "resampled")
    with pytest.raises(Exception) as caught:
        run_bundle(tmp_path / "resampled", ["train.json"], "train", quiet=True, **overrides, pixdim=[2.0, 2.0])
    assert "a 2D slice of a coronal or sagittal plane (its axes run along world x and z), which pixdim cannot" in str(
        root_cause(caught.value)[0])


def test_a_label_stored_in_another_axis_order_than_its_image_passes_the_data_check(tmp_path, capsys):
    """A label map on its image's grid whose file stores the axes in another order (as a tool that writes RAS order,
    ``nibabel.as_closest_canonical``, does beside an LSA image) passes check-data, as training reads it (both turned
    to RAS): it was refused as a shape mismatch, with the advice to resample it. A label of its image's stored shape
    whose axes are another order of the grid is refused, its shape given in RAS order."""
    datalist = write_tiny_segmentation(tmp_path, 3, counts=(2, 1, 0))
    first, second = (tmp_path / "labels" / "training" / f"case{index}.nii.gz" for index in (0, 1))
    label = nib.load(first)
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj).transpose(2, 0, 1), label.affine[:, [2, 0, 1, 3]]), first)
    assert nib.load(first).shape == (34, 36, 40)
    assert main(["check-data", str(datalist)]) == 0
    assert capsys.readouterr().out.startswith(f"segmentation datalist {datalist}: 4 classes")
    label = nib.load(second)
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), label.affine[:, [1, 0, 2, 3]]), second)
    with pytest.raises(SystemExit) as caught:
        main(["check-data", str(datalist)])
    assert str(caught.value).endswith(
        f"{second}: shape (40, 36, 34) in RAS order differs from its image's (36, 40, 34) "
        f"({tmp_path}/images/training/case1.nii.gz); the label must be on the image's grid (resample it with nearest "
        "neighbour).")


def test_check_data_reads_a_segmentation_datalist_as_one(tmp_path, capsys):
    datalist = write_tiny_segmentation(tmp_path, 2, counts=(2, 1, 0))
    assert main(["check-data", str(datalist)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"segmentation datalist {datalist}: 4 classes, 1 channel(s)" and out[-1].startswith("(class")
    content = json.loads(datalist.read_text())
    content["training"].append(content["training"][0])  # listed twice: reported, and no label taken for a class
    datalist.write_text(json.dumps(content))
    with pytest.raises(SystemExit) as caught:
        main(["check-data", str(datalist)])
    assert str(caught.value) == (
        f"check-data: 1 problem(s) in {datalist}:\n  - {tmp_path}/images/training/case0.nii.gz: listed 2 times in "
        f"'training'; keep it once (a repeated image weighs more in training and in the metrics)."
    )


def test_a_ct_in_hounsfield_units_is_told_about_the_intensity_window(tmp_path, capsys, caplog):
    """Images whose values span air to bone in HU (int16, -1024 .. 1308): check-data, and a bundle's check in its
    log, note that each image is scaled by its own min-max and name --intensity_range (before: nothing said that
    a CT was min-max scaled per crop); not when the bundle has a window, nor for images without negative HU."""
    datalist = write_tiny_segmentation(tmp_path, 3, counts=(1, 1, 0))
    assert main(["check-data", str(datalist)]) == 0 and "note:" not in capsys.readouterr().out  # 0 .. 255
    for item in json.loads(datalist.read_text())["training"] + json.loads(datalist.read_text())["validation"]:
        path = tmp_path / item["image"]
        stored = nib.load(path)
        hu = np.asarray(stored.dataobj).astype(np.int16) * 11 - 1024  # 0 .. 212 -> -1024 .. 1308
        nib.save(nib.Nifti1Image(hu, stored.affine), path)
    assert main(["check-data", str(datalist)]) == 0
    note = (
        "note: intensities from -1024 to 1308, as a CT's Hounsfield units: each image is scaled to [0, 1] by its own "
        "minimum and maximum, so one HU value lands at a different input value in each crop or scan; set one window "
        'for every image, e.g. --intensity_range "[-1000, 2000]" (bone) or "[-160, 240]" (soft tissue), which the '
        "training record keeps for evaluation and inference."
    )
    assert capsys.readouterr().out.splitlines()[-1] == note
    caplog.clear()  # check-data's own log records, captured when an earlier test left the logger at INFO
    with caplog.at_level("INFO", logger="monai_prompt"):
        assert check_segmentation_datalist(datalist, intensity_range=[-1000, 2000]).notes == []
    assert "note:" not in caplog.text


def test_a_label_with_padding_rows_is_told_to_be_cropped_not_resampled(tmp_path):
    """A mask one voxel larger than its CT along every axis (InVesalius writes its masks with a padding row and
    column): check-data says to crop the padding off, with the slices, where resampling (its advice before) would
    stretch the mask over the image; a label of another size altogether is still told to be resampled."""
    datalist = write_tiny_segmentation(tmp_path, 3, counts=(2, 1, 0))
    content = json.loads(datalist.read_text())
    for item, pad in zip(content["training"], (((1, 0), (1, 0), (0, 0)), ((0, 9), (0, 0), (0, 0)))):
        path = tmp_path / item["label"]
        stored = nib.load(path)
        nib.save(nib.Nifti1Image(np.pad(np.asarray(stored.dataobj), pad), stored.affine), path)
    with pytest.raises(SystemExit) as caught:
        main(["check-data", str(datalist)])
    problems = str(caught.value).splitlines()[1:]
    assert problems == [
        f"  - {tmp_path}/labels/training/case0.nii.gz: shape (37, 41, 34) differs from its image's (36, 40, 34) "
        f"({tmp_path}/images/training/case0.nii.gz); the label must be on the image's grid (it is 1 x 1 x 0 voxels "
        "larger than the image: padding rows or columns? Crop them off rather than resample, which would stretch the "
        "label over the image: label[1:, 1:, :] (padding first) or label[:-1, :-1, :] (padding last; axes in the "
        "order of the shapes above), saved with the image's header).",
        f"  - {tmp_path}/labels/training/case1.nii.gz: shape (45, 40, 34) differs from its image's (36, 40, 34) "
        f"({tmp_path}/images/training/case1.nii.gz); the label must be on the image's grid (resample it with nearest "
        "neighbour).",
    ]


def test_a_0_255_mask_and_an_instance_mask_are_named_with_their_fix(tmp_path):
    """A bone mask stored as 0/255 under ``"1": "bone"`` and a nuclei instance mask (one value per nucleus) given
    as-is: check-data names what each is and its fix (before: "name their classes", with five of the instance
    values and no count, and a 0/255 mask also told that its labels "hold only background")."""
    datalist = write_tiny_segmentation(tmp_path, 2, counts=(1, 1, 0))
    content = json.loads(datalist.read_text())
    content["labels"] = {"0": "background", "1": "bone"}
    datalist.write_text(json.dumps(content))
    for split, scale in (("training", 255), ("validation", None)):
        path = tmp_path / content[split][0]["label"]
        stored = np.asarray(nib.load(path).dataobj)
        if scale:  # a binary mask, foreground 255
            label = (stored > 0).astype(np.uint8) * scale
        else:  # an instance mask: 12 objects, values 1..12
            label = np.zeros_like(stored)
            for index in range(12):
                label[3 * index:3 * index + 2, 5:9] = index + 1
        nib.save(nib.Nifti1Image(label, nib.load(path).affine), path)
    with pytest.raises(SystemExit) as caught:
        main(["check-data", str(datalist)])
    problems = str(caught.value).splitlines()[1:]
    assert problems == [
        f"  - {tmp_path}/labels/training/case0.nii.gz: values [255] are no class's (0..1, the 'labels' keys); a "
        "binary mask stored as 0/255? Then its foreground value is 255, not 1: key the foreground class by it in the "
        "datalist's 'labels' (\"255\": \"<class name>\" in place of \"1\"), or set 255 to 1 in a copy of the label "
        "maps.",
        f"  - {tmp_path}/labels/validation/case0.nii.gz: values [2, 3, 4, 5, 6] and 6 more are no class's "
        "(0..1, the 'labels' keys); an instance mask (one value per object)? The bundles segment classes, not "
        "instances: for one foreground class set every value above 0 to 1 in a copy of the label maps (numpy: "
        "(label > 0).astype(np.uint8)); else name their classes in the datalist's 'labels'.",
    ]
