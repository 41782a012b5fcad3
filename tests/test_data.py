"""Data layer: datalists from folders/CSV/JSON, the pre-training check, transforms and the demo set."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from monai.transforms import (
    AsDiscreted,
    Compose,
    EnsureChannelFirstd,
    Invertd,
    LoadImage,
    LoadImaged,
    Orientationd,
    ResampleToMatchd,
    Spacingd,
)
from PIL import Image

from io_support import write_dicom, write_series
from monai_prompt.cli import main
from monai_prompt.data import (
    DataCheckError,
    RandLeftRightFlipd,
    ResampledArgmaxd,
    SplitOptions,
    build_demo_data,
    check_classification_datalist,
    classification_transforms,
    datalist_from_csv,
    datalist_from_folder,
    datalist_from_json,
    left_right_axis,
    read_classification_datalist,
    read_header,
    split_items,
)
from monai_prompt.data.demo import SLAB_SPLITS, mni152_volumes

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------------------------- file writers
def write_png(path: Path, channels: int = 1, size: tuple[int, int] = (20, 30)) -> np.ndarray:
    """A (rows, cols[, 3]) uint8 PNG; returns the array as PIL stores it."""
    shape = size if channels == 1 else (*size, channels)
    array = RNG.integers(0, 256, shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return array


def write_nifti(path: Path, shape: tuple[int, ...] = (20, 30)) -> np.ndarray:
    array = RNG.random(shape, dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    return array


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def names(items: list[dict]) -> list[str]:
    return [Path(item["image"]).name for item in items]


# ---------------------------------------------------------------------------------------------- headers
def test_headers_agree_with_monai_reading(tmp_path):
    """Channels and spatial shape from headers only equal what MONAI's LoadImage decodes, for every format."""
    write_png(tmp_path / "grey.png")
    write_png(tmp_path / "rgb.png", channels=3)
    write_png(tmp_path / "grey.tif")
    write_nifti(tmp_path / "slice.nii.gz")
    write_nifti(tmp_path / "volume.nii.gz", (6, 7, 8))
    write_nifti(tmp_path / "two_channel.nii", (6, 7, 8, 2))
    write_dicom(tmp_path / "single.dcm")
    write_series(tmp_path / "series")
    load = LoadImage(image_only=True, ensure_channel_first=True)
    formats = {}
    for path in sorted(tmp_path.iterdir()):
        header, image = read_header(path), load(path)
        shape = tuple(image.shape[1:])
        shape = shape[:-1] if header.format == "dicom" and shape[-1] == 1 else shape  # ITK: 2D DICOM as W x H x 1
        assert (header.channels, header.spatial_shape) == (image.shape[0], shape), path.name
        formats[path.name] = header.format
    assert formats == {"grey.png": "pil", "rgb.png": "pil", "grey.tif": "pil", "slice.nii.gz": "nifti",
                       "volume.nii.gz": "nifti", "two_channel.nii": "nifti", "single.dcm": "dicom",
                       "series": "dicom-series"}


# ---------------------------------------------------------------------------------------------- splitting
def test_split_is_grouped_stratified_seeded_and_order_free():
    items = [
        {"image": f"/d/vol{v:02d}_s{s}.png", "label": v % 3, "group": f"vol{v:02d}"}
        for v in range(60)
        for s in range(4)
    ]
    splits = split_items(items, SplitOptions(val_fraction=0.2, test_fraction=0.1, seed=3))
    assert sum(len(v) for v in splits.values()) == len(items)
    groups = {split: {item["group"] for item in its} for split, its in splits.items()}
    assert not (groups["training"] & groups["validation"] or groups["training"] & groups["test"]
                or groups["validation"] & groups["test"])
    for label in range(3):  # 20 volumes per class: 4 validation, 2 test, 14 training
        per_class = {split: sum(1 for i in its if i["label"] == label) // 4 for split, its in splits.items()}
        assert per_class == {"training": 14, "validation": 4, "test": 2}
    shuffled = [items[i] for i in np.random.default_rng(1).permutation(len(items))]
    again = split_items(shuffled, {"val_fraction": 0.2, "test_fraction": 0.1, "seed": 3})  # a dict, as in configs
    assert {k: sorted(names(v)) for k, v in again.items()} == {k: sorted(names(v)) for k, v in splits.items()}
    other = split_items(items, SplitOptions(val_fraction=0.2, test_fraction=0.1, seed=4))
    assert names(other["validation"]) != names(splits["validation"])
    # group_by names the group of items without one, from the image path
    ungrouped = [{k: v for k, v in item.items() if k != "group"} for item in items]
    by_path = split_items(ungrouped, SplitOptions(val_fraction=0.2, test_fraction=0.1, seed=3, group_by=r"(vol\d+)_"))
    assert {k: names(v) for k, v in by_path.items()} == {k: names(v) for k, v in splits.items()}


def test_split_options_reject_bad_values_and_unknown_keys(tmp_path):
    assert SplitOptions.of(None) == SplitOptions() == SplitOptions(0.1, 0.1, None, 0)
    assert SplitOptions.of({"seed": 2, "group_by": "p(\\d)"}) == SplitOptions(seed=2, group_by="p(\\d)")
    with pytest.raises(ValueError, match="sum to < 1"):
        SplitOptions(val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="must be numbers >= 0"):
        SplitOptions(val_fraction=-0.1)
    with pytest.raises(ValueError, match="not a valid regex"):
        SplitOptions(group_by="pat(")
    with pytest.raises(ValueError, match=r"unknown split option\(s\) \['val_frac'\]; valid ones are \['val_fraction'"):
        SplitOptions.of({"val_frac": 0.2})
    with pytest.raises(TypeError, match="not float"):
        SplitOptions.of(0.2)
    with pytest.raises(ValueError, match=r"unknown split option\(s\) \['test'\]"):  # readers check before reading
        read_classification_datalist(tmp_path, split={"val_fraction": 0.2, "test": 0.0})


# ---------------------------------------------------------------------------------------------- sources
def test_folder_datalist_all_formats(tmp_path):
    root = tmp_path / "tree"
    for k in range(5):
        write_png(root / "benign" / f"pat{k}_a.png")
        write_nifti(root / "benign" / f"pat{k}_b.nii.gz")
        write_png(root / "malignant" / f"pat{k}_a.tif")
        write_series(root / "malignant" / f"pat{k}_series", slices=2)
    (root / "benign" / "notes.txt").write_text("not an image")
    split = SplitOptions(group_by=r"pat\d", val_fraction=0.2, test_fraction=0.2)
    datalist = datalist_from_folder(root, dicom_series=True, split=split)
    assert datalist.classes == ["benign", "malignant"] and not datalist.multi_label
    everything = [item for _, item in datalist.all_items()]
    assert len(everything) == 20 and all(Path(item["image"]).is_absolute() for item in everything)
    for item in everything:
        assert item["label"] == (0 if "/benign/" in item["image"] else 1)
        assert item["group"] == re.search(r"pat\d", item["image"]).group(0)
    series = {Path(item["image"]).name for item in everything if Path(item["image"]).is_dir()}
    assert series == {f"pat{k}_series" for k in range(5)}
    groups = {split: {item["group"] for item in datalist[split]} for split in ("training", "validation", "test")}
    assert groups["training"].isdisjoint(groups["validation"]) and groups["training"].isdisjoint(groups["test"])
    assert all(datalist[split] for split in ("training", "validation", "test"))
    # without dicom_series each DICOM file is an image; split folders set the splits
    split_root = tmp_path / "split_tree"
    for split, count in (("train", 3), ("val", 2)):
        for k in range(count):
            write_png(split_root / split / "a" / f"{k}.png")
            write_dicom(split_root / split / "b" / f"{k}.dcm")
    write_png(split_root / "unlabeled" / "u0.png")
    datalist = read_classification_datalist(split_root, split={"test_fraction": 0.0})
    assert {split: len(items) for split, items in datalist.splits.items()} == {
        "training": 6, "validation": 4, "unlabeled": 1}
    assert "label" not in datalist["unlabeled"][0]


def test_csv_single_and_multi_label(tmp_path):
    for k in range(6):
        write_png(tmp_path / "img" / f"{k}.png")
    groups = ["g0", "g0", "t2", "g1", "g2", "t5"]
    rows = [[f"img/{k}.png", ["cyst", "tumour", "normal"][k % 3], ["train", "", "test"][k % 3], groups[k]]
            for k in range(6)]
    datalist = datalist_from_csv(write_csv(tmp_path / "single.csv", ["image", "label", "split", "group"], rows),
                                 split={"val_fraction": 0.5, "test_fraction": 0.0})
    assert datalist.classes == ["cyst", "normal", "tumour"]
    labels = {Path(i["image"]).name: i["label"] for _, i in datalist.all_items()}
    assert labels == {f"{k}.png": datalist.classes.index(["cyst", "tumour", "normal"][k % 3]) for k in range(6)}
    assert names(datalist["test"]) == ["2.png", "5.png"]  # the stated split is kept
    # validation is carved from the training pool (stated "train" and empty cells) by group: the cyst stratum
    # {g0 (cyst + tumour, tie -> cyst), g1} gives one group, the tumour stratum {g2} keeps its only group
    assert names(datalist["validation"]) in (["0.png", "1.png"], ["3.png"])
    # integer labels index the classes directly; classes= fixes names and order
    rows = [[f"img/{k}.png", str(k % 2)] for k in range(6)]
    indexed = datalist_from_csv(write_csv(tmp_path / "idx.csv", ["path", "y"], rows), image_column="path",
                                label_columns="y", classes=["neg", "pos"], split=SplitOptions(test_fraction=0.0))
    assert {Path(i["image"]).name: i["label"] for _, i in indexed.all_items()} == {f"{k}.png": k % 2 for k in range(6)}
    # several label columns: multi-hot floats, the columns are the classes
    rows = [[f"img/{k}.png", str(k % 2), str(k // 3), "1"] for k in range(6)]
    multi = datalist_from_csv(write_csv(tmp_path / "multi.csv", ["image", "effusion", "mass", "nodule"], rows),
                              label_columns=["effusion", "mass", "nodule"])
    assert multi.multi_label and multi.classes == ["effusion", "mass", "nodule"]
    assert {Path(i["image"]).name: i["label"] for _, i in multi.all_items()} == {
        f"{k}.png": [float(k % 2), float(k // 3), 1.0] for k in range(6)}
    with pytest.raises(ValueError, match=r"no column\(s\) \['label'\]"):
        datalist_from_csv(tmp_path / "idx.csv", image_column="path")


def test_decathlon_json_and_round_trips(tmp_path):
    for k in range(8):
        write_nifti(tmp_path / "imgs" / f"case{k}.nii.gz", (6, 7, 8))
    content = {
        "labels": {"0": "normal", "1": "abnormal"},
        "training": [{"image": f"imgs/case{k}.nii.gz", "label": k % 2, "group": f"pt{k // 2}"} for k in range(6)]
        + [{"image": "imgs/case6.nii.gz", "label": "abnormal"}],
        "test": ["imgs/case7.nii.gz"],
        "unlabeled": [{"image": "imgs/case0.nii.gz"}],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(content))
    datalist = datalist_from_json(tmp_path / "dataset.json", split={"val_fraction": 0.3})
    assert datalist.classes == ["normal", "abnormal"]
    assert names(datalist["test"]) == ["case7.nii.gz"] and "label" not in datalist["test"][0]  # MSD-style path
    labels = {Path(i["image"]).name: i.get("label") for s, i in datalist.all_items() if s in ("training", "validation")}
    assert labels == {f"case{k}.nii.gz": k % 2 for k in range(6)} | {"case6.nii.gz": 1}
    groups = {i.get("group") for i in datalist["validation"]}
    assert not groups & {i.get("group") for i in datalist["training"]}
    # the decathlon JSON (and, with labels everywhere, the CSV) written by a datalist reads back to it
    again = read_classification_datalist(datalist.save_json(tmp_path / "out" / "copy.json"))
    assert (again.classes, again.splits) == (datalist.classes, datalist.splits)
    datalist.splits["test"][0]["label"] = 1
    again = read_classification_datalist(datalist.save_csv(tmp_path / "copy.csv"), classes=datalist.classes)
    assert (again.classes, again.splits) == (datalist.classes, datalist.splits)
    # multi-hot list labels make a multi-label datalist
    multi = {"training": [{"image": f"imgs/case{k}.nii.gz", "label": [k % 2, 1, 0]} for k in range(8)]}
    (tmp_path / "multi.json").write_text(json.dumps(multi))
    datalist = read_classification_datalist(tmp_path / "multi.json")
    assert datalist.multi_label and datalist.classes == ["0", "1", "2"]


# ---------------------------------------------------------------------------------------------- check
def test_check_reports_every_problem_with_paths(tmp_path, capsys):
    for k in range(4):
        write_png(tmp_path / f"good{k}.png")
    write_png(tmp_path / "colour.png", channels=3)  # grey and RGB mix: the transforms repeat or average channels
    write_nifti(tmp_path / "two.nii.gz", (20, 30, 1, 2))  # 2 channels: neither 1 nor 3 feeds a 2-channel network
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG but not really")
    write_series(tmp_path / "series")
    (tmp_path / "series" / "slice1.dcm").write_bytes(b"garbage")
    rows = [[f"good{k}.png", "a", "train", f"g{k}"] for k in range(4)] + [
        ["colour.png", "b", "train", "g5"],
        ["corrupt.png", "a", "train", "g6"],
        ["missing.png", "b", "train", "g7"],
        ["series", "b", "val", "g8"],
        ["good0.png", "", "test", "g9"],  # missing label; good0.png in two splits
        ["good1.png", "zebra", "test", "g1"],  # unknown class; good1.png and its group g1 in two splits
        ["good2.png", "7", "nonsense", "g10"],  # an unknown split: read into training, where good2.png is twice
        ["two.nii.gz", "b", "train", "g11"],
    ]
    source = write_csv(tmp_path / "bad.csv", ["image", "label", "split", "group"], rows)
    with pytest.raises(DataCheckError) as caught:
        check_classification_datalist(source, classes=["a", "b"])
    problems = caught.value.problems
    expected = [
        ("two.nii.gz", "2 channel(s) where the other images have 1, and the transforms cannot bring both to one"),
        ("corrupt.png", "unreadable"),
        ("missing.png", "file not found"),
        ("series", "unreadable slices: slice1.dcm"),
        ("line 10", "missing label"),
        ("line 11", "label 'zebra' is not one of the classes ['a', 'b']"),
        ("line 12", "unknown split 'nonsense'"),
        ("line 12", "label '7' is not one of the classes ['a', 'b'] (nor an index below 2)"),
        ("good0.png: listed in several splits", "['test', 'training']"),
        ("good1.png: listed in several splits", "['test', 'training']"),
        ("group 'g1'", "['test', 'training']"),
        ("good2.png: listed 2 times in 'training'", "keep it once"),
    ]
    for where, message in expected:
        assert any(where in p and message in p for p in problems), (where, problems)
    assert len(problems) == len(expected), "\n".join(problems)
    assert all(str(tmp_path) in p for p in problems if not p.startswith("group")), problems
    with pytest.raises(SystemExit, match="12 problem"):
        main(["check-data", str(source), "--classes", "a", "b"])
    # a clean dataset: a summary, also from the CLI
    clean = write_csv(tmp_path / "clean.csv", ["image", "label"], [[f"good{k}.png", "ab"[k % 2]] for k in range(4)])
    summary = check_classification_datalist(clean, split={"test_fraction": 0.0, "val_fraction": 0.25})
    assert summary.counts == {"training": 2, "validation": 2} and summary.channels == 1  # 1 of 2 per class
    assert summary.class_counts["training"] == [1, 1] and summary.formats == {"pil": 4}
    assert main(["check-data", str(clean)]) == 0 and "2 classes, 1 channel(s)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- transforms
def test_transforms_give_network_input_2d(tmp_path):
    grey, rgb = write_png(tmp_path / "grey.png"), write_png(tmp_path / "rgb.png", channels=3)
    write_dicom(tmp_path / "single.dcm")
    write_nifti(tmp_path / "slice.nii.gz", (40, 10))
    itk.imwrite(itk.image_from_array(np.ones((12, 14), np.float32)), str(tmp_path / "flat.mha"))  # a 3 x 3 affine
    items = [{"image": str(tmp_path / name), "label": k} for k, name in
             enumerate(["grey.png", "rgb.png", "single.dcm", "slice.nii.gz", "flat.mha"])]
    for augment in (False, True):
        chain = Compose(classification_transforms(img_size=16, spatial_dims=2, in_channels=3, augment=augment))
        for item in items:
            out = chain(item)
            assert out["image"].shape == (3, 16, 16) and out["image"].dtype == torch.float32, item
            assert 0 <= out["image"].min() and out["image"].max() <= 1
            assert out["label"].dtype == torch.long and out["label"].item() == item["label"]
    # at the native size nothing is resampled: grey is repeated, colour averaged, both min-max scaled (PIL rows
    # are the second axis in MONAI's reading)
    def scaled(array):
        return (array - array.min()) / (array.max() - array.min())

    native = classification_transforms(img_size=(30, 20), spatial_dims=2, in_channels=3)
    expected = torch.from_numpy(scaled(grey.T.astype(np.float64))).float().expand(3, 30, 20)
    assert torch.allclose(Compose(native)(items[0])["image"], expected, atol=1e-5)
    native = classification_transforms(img_size=(30, 20), spatial_dims=2, in_channels=1)
    expected = scaled(rgb.astype(np.float64).mean(-1).T)[None]
    assert torch.allclose(Compose(native)(items[1])["image"], torch.from_numpy(expected).float(), atol=1e-5)
    for track_meta in (True, False):  # the readers' metadata, brought to one shape, batches (the bundles keep it)
        mixed_formats = Compose(classification_transforms(16, 2, 1, augment=True, track_meta=track_meta))
        for order in (items, items[::-1]):
            batch = next(iter(DataLoader(Dataset(order, mixed_formats), batch_size=5)))
            assert batch["image"].shape == (5, 1, 16, 16) and batch["label"].tolist() == [i["label"] for i in order]
            assert not track_meta or batch["image"].meta["filename_or_obj"] == [i["image"] for i in order]


def test_transforms_give_network_input_3d_and_multilabel(tmp_path):
    write_nifti(tmp_path / "volume.nii.gz", (6, 7, 8))
    write_series(tmp_path / "series", slices=5)
    for augment in (False, True):
        chain = Compose(classification_transforms(img_size=8, spatial_dims=3, in_channels=1, augment=augment,
                                                  multi_label=True))
        for name in ("volume.nii.gz", "series"):
            out = chain({"image": str(tmp_path / name), "label": [1.0, 0.0, 1.0]})
            assert out["image"].shape == (1, 8, 8, 8)
            assert out["label"].dtype == torch.float32 and out["label"].tolist() == [1.0, 0.0, 1.0]
    unlabelled = Compose(classification_transforms(img_size=8, spatial_dims=3))({"image": str(tmp_path / "series")})
    assert "label" not in unlabelled and unlabelled["image"].shape == (1, 8, 8, 8)
    with pytest.raises(RuntimeError) as caught:  # MONAI wraps the error of a transform in a RuntimeError
        Compose(classification_transforms(img_size=8, spatial_dims=2))({"image": str(tmp_path / "series")})
    assert re.search(r"series: .* 3 spatial dims but the network is 2D", str(caught.value.__cause__))


def test_random_mirror_flips_the_patients_left_right_axis(tmp_path):
    """NIfTI/DICOM: the axis along world x (the patient's left-right) per the affine, none for a sagittal slice;
    PNG: ``spatial_axis`` (``--train#random_transforms#0#spatial_axis`` in the bundles)."""
    array = RNG.random((20, 30), dtype=np.float32)
    swapped = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])  # array axis 1 runs along x
    sagittal = np.array([[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1.0]])  # along y and z only
    for name, affine in (("axial", np.diag([-1.0, -1.0, 1.0, 1.0])), ("swapped", swapped), ("sagittal", sagittal)):
        nib.save(nib.Nifti1Image(array[..., None], affine), tmp_path / f"{name}.nii.gz")
    write_dicom(tmp_path / "rows_along_x.dcm")
    write_dicom(tmp_path / "rows_along_y.dcm", orientation=(0.0, 1.0, 0.0, 1.0, 0.0, 0.0))
    write_dicom(tmp_path / "sagittal.dcm", orientation=(0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    write_png(tmp_path / "photo.png")
    load = Compose(classification_transforms(img_size=16, spatial_dims=2, in_channels=1))

    def axis(name: str, spatial_axis: int = 0) -> int | None:
        image = load({"image": str(tmp_path / name)})["image"]
        found = left_right_axis(image, spatial_axis)
        flipped = RandLeftRightFlipd("image", prob=1.0, spatial_axis=spatial_axis)({"image": image})["image"]
        mirrored = image if found is None else torch.flip(image, (found + 1,))
        assert torch.equal(flipped.as_tensor(), mirrored.as_tensor()), name
        return found

    assert [axis(name) for name in ("axial.nii.gz", "swapped.nii.gz", "sagittal.nii.gz")] == [0, 1, None]
    along_x, along_y = axis("rows_along_x.dcm"), axis("rows_along_y.dcm")
    assert {along_x, along_y} == {0, 1} and axis("sagittal.dcm") is None
    assert axis("photo.png") == 0 and axis("photo.png", spatial_axis=1) == 1
    assert left_right_axis(torch.zeros(1, 4, 4), spatial_axis=1) == 1  # a plain tensor has no orientation
    augment = classification_transforms(img_size=16, spatial_dims=2, in_channels=1, augment=True)
    assert isinstance(augment[-3], RandLeftRightFlipd) and augment[-3].spatial_axis == 0



def test_resampled_argmax_is_the_argmax_of_the_whole_resampled_softmax(tmp_path):
    """``ResampledArgmaxd`` three classes at a time gives the class map, dtype and affine of ``AsDiscreted(argmax)``
    after ``Invertd`` (orientation, spacing) or ``ResampleToMatchd`` of all twenty: each class is resampled as it is
    among all, equal probabilities (classes 2 = 3 across a chunk boundary, 6 = 7 within one) go to the first."""
    affine = np.array([[-1.0, 0, 0, 20.0], [0, 0, 1.2, -10.0], [0, 3.0, 0, 5.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(RNG.random((17, 13, 19), dtype=np.float32), affine), tmp_path / "image.nii.gz")
    preprocessing = Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image"),
                             Orientationd("image", "RAS", labels=None), Spacingd("image", pixdim=2.0)])
    data = preprocessing({"image": str(tmp_path / "image.nii.gz")})
    logits = torch.randn(20, *data["image"].shape[1:], generator=torch.Generator().manual_seed(0))
    logits[3], logits[7] = logits[2], logits[6]
    data["pred"] = MetaTensor(torch.softmax(logits, 0), meta=data["image"].meta)
    data["label"] = MetaTensor(torch.zeros(1, 17, 13, 19), affine=torch.as_tensor(affine))
    invert = Invertd("pred", transform=preprocessing, orig_keys="image", nearest_interp=False)
    for step in (invert, ResampleToMatchd("pred", key_dst="label", dtype=torch.float32)):
        expected = AsDiscreted("pred", argmax=True)(step(dict(data)))["pred"]
        chunks = []
        found = ResampledArgmaxd("pred", transform=lambda d, step=step: chunks.append(len(d["pred"])) or step(d),
                                 channels=3)(data)["pred"]
        assert chunks == [3] * 6 + [2], step
        assert found.dtype == expected.dtype and torch.equal(found.as_tensor(), expected.as_tensor()), step
        assert torch.equal(found.affine, expected.affine) and found.shape == (1, 17, 13, 19)
        assert (expected == 2).any() and not (expected == 3).any() and not (expected == 7).any()

# ---------------------------------------------------------------------------------------------- demo set
def test_demo_data_is_deterministic_leak_free_and_correctly_labelled(tmp_path):
    size = {"train_per_class": 8, "eval_per_class": 4, "unlabeled": 8}
    datalist = build_demo_data(tmp_path / "a", patch_size=24, **size)
    main(["demo-data", "--out", str(tmp_path / "b"), "--patch-size", "24", "--train-per-class", "8",
          "--eval-per-class", "4", "--unlabeled", "8"])
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert len(files) == 3 * (8 + 4 + 4) + 8 + 2  # images + datalist.json + datalist.csv

    summary = check_classification_datalist(tmp_path / "a" / "datalist.json")
    assert summary.counts == {"training": 24, "validation": 12, "test": 12, "unlabeled": 8}
    assert summary.class_counts == {"training": [8, 8, 8], "validation": [4, 4, 4], "test": [4, 4, 4]}

    # leakage: slices of different splits are >= 5 slices apart, and the slab of every slice gives its split
    t1, _ = mni152_volumes()
    z_of = {split: [int(re.search(r"_z(\d+)", i["image"]).group(1)) for i in datalist[split]]
            for split in datalist.splits}
    for split, zs in z_of.items():
        assert all(SLAB_SPLITS[(z // 10) % 5] == ("training" if split == "unlabeled" else split) for z in zs)
        assert all(f"slab{z // 10:02d}" == i["group"] for z, i in zip(zs, datalist[split]))
    for a, b in (("training", "validation"), ("training", "test"), ("validation", "test")):
        assert min(abs(za - zb) for za in z_of[a] for zb in z_of[b]) >= 5

    # labels against an independent reading of the GM/WM maps: mean over the central 3 x 3 pixels, literally
    folder = Path(__import__("nilearn").__file__).parent / "datasets" / "data"
    maps = [np.asarray(nib.load(folder / f"mni_icbm152_{t}_tal_nlin_sym_09a_converted.nii.gz").dataobj, np.float64)
            / 255 for t in ("gm", "wm")]
    load = LoadImage(image_only=True)
    for split in ("training", "validation", "test"):
        for item in datalist[split]:
            x, y, z = (int(v) for v in re.search(r"x(\d+)_y(\d+)_z(\d+)", item["image"]).groups())
            grey = sum(maps[0][x + i, y + j, z] for i in (-1, 0, 1) for j in (-1, 0, 1)) / 9
            white = sum(maps[1][x + i, y + j, z] for i in (-1, 0, 1) for j in (-1, 0, 1)) / 9
            csf = sum(max(0.0, 1 - maps[0][x + i, y + j, z] - maps[1][x + i, y + j, z]) * (t1[x + i, y + j, z] > 0)
                      for i in (-1, 0, 1) for j in (-1, 0, 1)) / 9
            tissue = [csf, grey, white]
            assert int(np.argmax(tissue)) == item["label"] and max(tissue) >= 0.6 - 1e-6, (item, tissue)
    # without noise a PNG is a monotone (gamma, contrast) function of the T1 patch centred on (x, y)
    exact = build_demo_data(tmp_path / "exact", patch_size=24, train_per_class=2, eval_per_class=1, unlabeled=2,
                            noise=0.0)
    for _, item in exact.all_items():
        x, y, z = (int(v) for v in re.search(r"x(\d+)_y(\d+)_z(\d+)", item["image"]).groups())
        patch = t1[x - 12 : x + 12, y - 12 : y + 12, z].ravel()
        png = np.asarray(load(item["image"])).ravel()[np.argsort(patch, kind="stable")]
        assert png.shape == patch.shape and np.all(np.diff(png) >= 0) and png[-1] > png[0], item


# ---------------------------------------------------------------------------------------------- user-data pitfalls
def test_plain_folder_of_images_is_unlabeled(tmp_path):
    """A folder without sub-folders is no class tree: its images are the ``unlabeled`` split that pre-training
    reads, where they used to be left out without a word."""
    write_png(tmp_path / "a.png")
    write_nifti(tmp_path / "b.nii.gz")
    datalist = read_classification_datalist(tmp_path)
    assert {split: len(items) for split, items in datalist.splits.items()} == {"unlabeled": 2}
    assert datalist.classes == [] and "label" not in datalist["unlabeled"][0]


def test_folder_groups_a_patients_slices_into_one_split(tmp_path):
    """``root/<class>/<patient>/<slice>.png``: the first sub-folder names the group (in any class), so a patient's
    slices never land in two splits; ``group_by`` replaces it; a pattern that does not match is one problem."""
    root = tmp_path / "tree"
    for patient in range(10):
        for k in range(4):
            write_png(root / ("normal" if patient % 2 else "tumour") / f"pt{patient}" / f"slice{k}.png", size=(8, 8))
    write_png(root / "normal" / "pt0" / "slice9.png", size=(8, 8))  # pt0 has slices of both classes
    write_png(root / "normal" / "loose.png", size=(8, 8))  # directly in its class folder: a group of its own
    datalist = datalist_from_folder(root, split={"val_fraction": 0.2, "test_fraction": 0.2})
    split_of: dict[str, set[str]] = {}
    for split, item in datalist.all_items():
        if item["image"].endswith("loose.png"):
            assert "group" not in item
            continue
        assert item["group"] == Path(item["image"]).parent.name
        split_of.setdefault(item["group"], set()).add(split)
    assert len(split_of) == 10 and all(len(splits) == 1 for splits in split_of.values()), split_of
    assert all(datalist[split] for split in ("training", "validation", "test"))
    check_classification_datalist(root, read_pixels=False)  # no group in two splits
    by_slice = datalist_from_folder(root, split={"group_by": r"slice\d|loose"})
    assert {item["group"] for _, item in by_slice.all_items()} == {"loose", *(f"slice{k}" for k in (0, 1, 2, 3, 9))}
    with pytest.raises(DataCheckError) as caught:
        datalist_from_folder(root, split={"group_by": r"pt\d"})
    assert caught.value.problems == [
        f"{root.absolute()}: group_by pattern 'pt\\\\d' does not match 1 of 42 image paths (it is tried on each path "
        f"relative to {root.absolute()}, e.g. 'normal/loose.png'); fix the pattern."
    ]
    csv_path = write_csv(tmp_path / "list.csv", ["image", "label"], [["tree/normal/loose.png", "a"]] * 2)
    with pytest.raises(DataCheckError, match=r"does not match 2 of 2 image paths \(it is tried on each path as the "
                                             r"datalist file writes it, e\.g\. 'tree/normal/loose\.png', "):
        datalist_from_csv(csv_path, split={"group_by": "pt"})
    with pytest.raises(ValueError, match="group_by pattern 'pt' does not match the path '/d/x.png'; fix the pattern"):
        split_items([{"image": "/d/x.png", "label": 0}], {"group_by": "pt"})


def test_datalists_with_a_byte_order_mark_read(tmp_path):
    """Excel's "CSV UTF-8" and some editors' JSON start with a UTF-8 BOM; non-UTF-8 or broken JSON names the file."""
    for k in range(4):
        write_png(tmp_path / f"bild_ä{k}.png", size=(8, 8))
    rows = "".join(f"bild_ä{k}.png,{'ab'[k % 2]}\n" for k in range(4))
    (tmp_path / "excel.csv").write_text("image,label\n" + rows, encoding="utf-8-sig")
    datalist = datalist_from_csv(tmp_path / "excel.csv")
    assert datalist.classes == ["a", "b"] and len(list(datalist.all_items())) == 4
    content = {"training": [{"image": f"bild_ä{k}.png", "label": k % 2} for k in range(4)]}
    (tmp_path / "bom.json").write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8-sig")
    assert read_classification_datalist(tmp_path / "bom.json").splits == datalist.splits
    again = read_classification_datalist(datalist.save_csv(tmp_path / "copy.csv"))  # written as UTF-8, read back
    assert again.splits == datalist.splits and (tmp_path / "copy.csv").read_bytes().decode("utf-8")
    (tmp_path / "broken.json").write_text('{"training": [', encoding="utf-8")
    with pytest.raises(ValueError, match=f"{tmp_path / 'broken.json'}: not valid JSON"):
        read_classification_datalist(tmp_path / "broken.json")
    (tmp_path / "latin1.csv").write_bytes("image,label\nbild_ä0.png,a\n".encode("latin-1"))
    with pytest.raises(ValueError, match=f"{tmp_path / 'latin1.csv'}: not UTF-8 text"):
        datalist_from_csv(tmp_path / "latin1.csv")


def test_integer_class_folders_are_in_numeric_order(tmp_path):
    """Class folders 0 1 2 10 (grades) are the classes in that order, not text-sorted 0 1 10 2, and only the folders
    found (1 2 3: three classes, no empty class 0); integers written otherwise (01, 02, 10) too. CSV integer labels
    are class indices instead (0..max), and the check notes the indices without images."""
    for name in ("0", "1", "2", "10"):
        for k in range(2):
            write_png(tmp_path / "plain" / name / f"{k}.png", size=(8, 8))
    folder = datalist_from_folder(tmp_path / "plain", split={"val_fraction": 0.0, "test_fraction": 0.0})
    assert folder.classes == ["0", "1", "2", "10"]
    assert {Path(i["image"]).parent.name: i["label"] for i in folder["training"]} == {"0": 0, "1": 1, "2": 2, "10": 3}
    rows = [[str(Path(i["image"]).relative_to(tmp_path)), Path(i["image"]).parent.name] for i in folder["training"]]
    table = datalist_from_csv(write_csv(tmp_path / "same.csv", ["image", "label"], rows),
                              split={"val_fraction": 0.0, "test_fraction": 0.0})
    assert table.classes == [str(i) for i in range(11)]
    summary = check_classification_datalist(tmp_path / "same.csv", read_pixels=False)
    assert summary.notes == [
        "classes ['3', '4', '5', '6', '7', '8', '9'] have no images (class indices run 0..10 when every label is an "
        "integer); the network still has an output for each (num_classes=11); name the "
        "classes (--classes) to drop them."
    ]
    for name in ("1", "2", "3"):
        write_png(tmp_path / "one_based" / name / "0.png", size=(8, 8))
    assert datalist_from_folder(tmp_path / "one_based").classes == ["1", "2", "3"]
    for name in ("01", "02", "10"):
        write_png(tmp_path / "padded" / name / "0.png", size=(8, 8))
    assert datalist_from_folder(tmp_path / "padded").classes == ["01", "02", "10"]
    for name in ("2", "10", "low"):
        write_png(tmp_path / "named" / name / "0.png", size=(8, 8))
    assert datalist_from_folder(tmp_path / "named").classes == ["10", "2", "low"]
