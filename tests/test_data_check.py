"""The data check decodes every image as training reads it and reports every bad file at once; the inference inputs
from folders, globs and lists: ``monai_prompt.data.check``."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from PIL import Image

from io_support import write_datalist, write_nifti, write_png, write_series
from monai_prompt.data import (
    DataCheckError,
    MatchInputd,
    check_classification_datalist,
    check_images,
    classification_transforms,
    find_images,
    left_right_axis,
    read_header,
)


def test_data_check_decodes_pixels_and_reports_every_bad_file(tmp_path):
    good = [write_png(tmp_path / f"good{i}.png", seed=i) for i in range(4)]
    truncated_png = tmp_path / "truncated.png"
    truncated_png.write_bytes(good[0].read_bytes()[:200])
    volume = np.random.default_rng(0).random((16, 32))  # 2D, as the PNGs: a 3D volume would be reported
    truncated_nii = tmp_path / "truncated.nii"
    truncated_nii.write_bytes(write_nifti(tmp_path / "full.nii", volume).read_bytes()[:-500])
    volume[1, 2], volume[0, 0] = np.nan, np.inf
    nan_nii = write_nifti(tmp_path / "nan.nii.gz", volume)
    splits = {"training": [(p, i % 2) for i, p in enumerate(good)] + [(truncated_png, 0), (truncated_nii, 1)],
              "validation": [(nan_nii, 0), (good[0].with_name("good_val.png"), 1)]}
    write_png(tmp_path / "good_val.png", seed=9)
    datalist = write_datalist(tmp_path / "datalist.json", splits)
    with pytest.raises(DataCheckError) as caught:
        check_classification_datalist(datalist)
    problems = caught.value.problems
    assert len(problems) == 3, problems
    assert problems[0].startswith(f"{truncated_png}: pixel data unreadable (OSError: image file is truncated")
    assert problems[1].startswith(f"{truncated_nii}: pixel data unreadable (OSError: Expected ")
    assert problems[2] == f"{nan_nii}: 2 NaN/Inf value(s) of 512; training would get a NaN loss: fix the image or " \
        "drop it."
    summary = check_classification_datalist(datalist, read_pixels=False)  # headers only: the three pass (large sets)
    assert summary.counts == {"training": 6, "validation": 2} and summary.formats == {"pil": 6, "nifti": 2}


def test_a_plain_folder_of_images_is_unlabelled_data_not_a_failure(tmp_path, capsys):
    """No class sub-folders: the images are the unlabelled data pre-training reads, which check-data says (exit 0);
    an unreadable one is still a problem (exit 1), and a folder without images is one."""
    from monai_prompt.cli import main

    folder = tmp_path / "images"
    for index in range(3):
        write_png(folder / f"{index}.png", seed=index)
    summary = check_classification_datalist(folder)
    assert summary.counts == {"unlabeled": 3} and summary.classes == []
    assert main(["check-data", str(folder)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"datalist {folder}: unlabelled images only, 1 channel(s), formats {{'pil': 3}}",
        "split         images",
        "unlabeled          3",
        f"note: 3 unlabelled images (a plain folder: no class sub-folders): data for self-supervised pre-training "
        f"(bundles/vit_pretraining, --dataset_dir {folder}); classification needs a sub-folder per class "
        f"({folder}/<class>/<image>).",
    ]
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit, match=r"^check-data: 1 problem\(s\) in .*images:\n  - .*broken\.png: unreadable"):
        main(["check-data", str(folder)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataCheckError, match=r"empty: no images\.$"):
        check_classification_datalist(tmp_path / "empty")


def test_labels_outside_num_classes_name_the_file(tmp_path):
    images = [write_png(tmp_path / f"img{i}.png", seed=i) for i in range(6)]
    one_based = write_datalist(tmp_path / "one_based.json",
                               {"training": [(p, 1 + i % 3) for i, p in enumerate(images)]})
    with pytest.raises(DataCheckError) as caught:
        check_classification_datalist(one_based, read_pixels=False, num_classes=3)
    assert caught.value.problems == [
        f"{images[i]}: label 3 is outside 0..2: without a class map, labels must be class indices 0..num_classes-1 "
        f"(num_classes=3) (no image has label 0: are the labels 1-based? subtract 1); renumber them, or name the "
        f"classes (decathlon 'labels' map, --classes)." for i in (2, 5)
    ]
    zero_based = write_datalist(tmp_path / "zero_based.json", {"training": [(p, i % 3) for i, p in enumerate(images)]})
    assert check_classification_datalist(zero_based, read_pixels=False, num_classes=3).classes == ["0", "1", "2"]


def test_check_images_for_inference_inputs(tmp_path):
    good = write_png(tmp_path / "good.png")
    volume = np.zeros((8, 8))
    volume[0, 0] = np.nan
    nan = write_nifti(tmp_path / "nan.nii.gz", volume)
    assert set(check_images([good, str(good)])) == {str(good)}
    with pytest.raises(DataCheckError) as caught:
        check_images([good, tmp_path / "missing.png", nan])
    assert caught.value.problems == [
        f"{tmp_path / 'missing.png'}: file not found.",
        f"{nan}: 1 NaN/Inf value(s) of 64; training would get a NaN loss: fix the image or drop it.",
    ]
    with pytest.raises(DataCheckError, match="no images given"):
        check_images([])
    missing = tmp_path / "bundle" / ".." / "nowhere" / "images"  # a default folder resolved from another root
    with pytest.raises(DataCheckError) as caught:
        check_images([], source=str(missing))
    assert caught.value.problems[0].startswith(  # it said "no images in" a folder that is not there
        f"{str(missing)!r} does not exist (from {os.getcwd()}: {tmp_path / 'nowhere' / 'images'}); give a folder")
    with pytest.raises(DataCheckError, match=r"no images in '\S+\*\.png'"):
        check_images([], source=str(tmp_path / "*.png"))  # a glob that matches nothing


def test_a_nifti_extension_in_mixed_case_is_named_with_the_fix(tmp_path):
    """nibabel opens ``scan.NII.GZ`` but looks for ``scan.nii.gz`` when given ``scan.Nii.gz`` (and says "no such
    file" for a file that exists): the check names the extension and the name to rename it to."""
    upper = write_nifti(tmp_path / "upper.NII.GZ", np.ones((8, 8, 4)))
    mixed = write_nifti(tmp_path / "mixed.nii.gz", np.ones((8, 8, 4))).rename(tmp_path / "mixed.Nii.gz")
    assert set(check_images([upper])) == {str(upper)}
    with pytest.raises(DataCheckError) as caught:
        check_images([upper, mixed])
    assert caught.value.problems == [
        f"{mixed}: unreadable (ValueError: nibabel reads NIfTI files named .nii/.nii.gz in lower or upper case, not "
        f".Nii.gz: rename mixed.Nii.gz to mixed.nii.gz)."
    ]


def test_inference_inputs_of_another_dimensionality_than_the_network_are_refused_up_front(tmp_path):
    """A lone 3D volume given to a 2D network (and a slice to a 3D one) is named before anything runs; a slice stored
    as X x Y x 1 is 2D."""
    volume = write_nifti(tmp_path / "volume.nii.gz", np.zeros((16, 16, 8)))
    flat = write_nifti(tmp_path / "flat.nii.gz", np.zeros((16, 12, 1)))
    png = write_png(tmp_path / "slice.png")
    assert set(check_images([png, flat], spatial_dims=2)) == {str(png), str(flat)}
    assert set(check_images([volume], spatial_dims=3)) == {str(volume)}
    with pytest.raises(DataCheckError) as caught:
        check_images([volume], spatial_dims=2)
    assert caught.value.problems == [
        f"{volume}: 3D image (16 x 16 x 8) where the network takes 2D images (spatial_dims=2), and this one would "
        f"stop the run: convert it or drop it."]
    with pytest.raises(DataCheckError) as caught:
        check_images([volume, png], spatial_dims=3)
    assert [problem.split(":")[0] for problem in caught.value.problems] == [str(png)]


def test_find_images_folders_globs_and_lists(tmp_path):
    images = [write_png(tmp_path / name) for name in ("b/2.png", "a/1.png", "a/.hidden.png", ".cache/3.png")]
    (tmp_path / "notes.txt").write_text("not an image")
    assert find_images(tmp_path) == [str(images[1]), str(images[0])]  # recursive, sorted, hidden skipped
    assert find_images(str(tmp_path / "*" / "*.png")) == [str(images[1]), str(images[0])]
    assert find_images([images[0], str(tmp_path / "a" / "*.png"), images[0]]) == [str(images[0]), str(images[1])]
    assert find_images([tmp_path / "gone.png"]) == [str(tmp_path / "gone.png")]  # kept for check_images to report
    assert find_images(tmp_path / "no_such_folder") == [] and find_images(str(tmp_path / "*.jpg")) == []


def test_find_images_dicom_series_folders(tmp_path):
    """With ``dicom_series`` (the 3D bundles' inference) a folder of DICOM slices is one image, the folder, whether
    given itself, as its parent or in a list; without, each slice is one."""
    series = [tmp_path / "dicom" / uid for uid in ("1.2.840.5", "1.2.840.6")]
    for folder in series:
        write_series(folder, slices=3)
    volume = write_nifti(tmp_path / "dicom" / "ct.nii.gz", np.zeros((4, 4, 4)))
    assert find_images(tmp_path / "dicom", dicom_series=True) == [str(series[0]), str(series[1]), str(volume)]
    assert find_images(series[0], dicom_series=True) == [str(series[0])]
    assert find_images([series[1], volume, series[1]], dicom_series=True) == [str(series[1]), str(volume)]
    assert len(find_images(series[0])) == 3


def test_images_of_another_dimensionality_size_or_listed_twice(tmp_path, caplog):
    pngs = [write_png(tmp_path / f"img{i}.png", seed=i) for i in range(4)]  # 16 x 16
    wide = tmp_path / "wide.png"
    Image.fromarray(np.zeros((10, 40), np.uint8)).save(wide)
    volume = write_nifti(tmp_path / "volume.nii.gz", np.zeros((16, 16, 8)))
    flat = write_nifti(tmp_path / "flat.nii.gz", np.zeros((16, 12, 1)))  # a slice: 2D
    training = [(p, i % 2) for i, p in enumerate(pngs)] + [(wide, 0), (flat, 1)]
    mixed = write_datalist(tmp_path / "mixed.json", {"training": [*training, (volume, 1), (pngs[0], 0)],
                                                     "validation": [(pngs[1], 1)]})
    with pytest.raises(DataCheckError) as caught:
        check_classification_datalist(mixed)
    assert caught.value.problems == [
        f"{volume}: 3D image (16 x 16 x 8) where the other images are 2D; the network takes one (spatial_dims), and "
        f"this one would stop the run: convert it or drop it.",
        f"{pngs[0]}: listed 2 times in 'training'; keep it once (a repeated image weighs more in training and in the "
        f"metrics).",
        f"{pngs[1]}: listed in several splits ['training', 'validation'].",
    ]
    clean = write_datalist(tmp_path / "clean.json", {"training": training})
    with caplog.at_level("INFO", logger="monai_prompt"):
        summary = check_classification_datalist(clean)
    note = (f"2 of 6 images differ in size from the other 16 x 16: {wide} (40 x 10), {flat} (16 x 12); the bundle "
            f"resizes every image to img_size (non-square ones are stretched).")
    assert summary.notes == [note] and str(summary).endswith(f"\nnote: {note}")
    volumes = [write_nifti(tmp_path / f"v{i}.nii.gz", np.zeros((16, 16, 8 - 7 * (i == 0)))) for i in range(3)]
    summary = check_classification_datalist(write_datalist(tmp_path / "3d.json", {"training": [
        (v, i % 2) for i, v in enumerate(volumes)]}), read_pixels=False)  # one slice thick: a 3D image all the same
    assert summary.notes == [f"1 of 3 images differ in size from the other 16 x 16 x 8: {volumes[0]} (16 x 16); the "
                             f"bundle resizes every image to img_size (non-square ones are stretched)."]
    assert f"data check of {clean}: {note}" in caplog.text  # a bundle's log shows it too


def test_grey_and_colour_images_mix_as_the_transforms_map_them(tmp_path):
    """1 channel is repeated to any in_channels and RGB(A) averaged to 1: a grey + RGB set passes, training and
    inference checks alike; a count the transforms cannot bring to ``channels`` is reported with the rule."""
    rng = np.random.default_rng(0)
    grey = [write_png(tmp_path / f"grey{i}.png", seed=i) for i in range(3)]
    rgb = tmp_path / "rgb.png"
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(rgb)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)).save(rgba)
    datalist = write_datalist(tmp_path / "mixed.json", {"training": [(p, i % 2) for i, p in enumerate([*grey, rgb])]})
    assert check_classification_datalist(datalist).channels == 1
    assert check_classification_datalist(datalist, channels=3).channels == 3
    assert set(check_images([*grey, rgb, rgba])) == {str(p) for p in [*grey, rgb, rgba]}
    assert len(check_images([rgb, rgba, grey[0]], channels=3)) == 3
    two = write_nifti(tmp_path / "two.nii.gz", rng.random((16, 16, 1, 2)))  # 2 channels: only in_channels=2 takes it
    with pytest.raises(DataCheckError) as caught:
        check_images([*grey, rgb, two], channels=3)
    assert caught.value.problems == [
        f"{two}: 2 channel(s) cannot feed the network's in_channels=3 (the transforms repeat 1 channel to any count, "
        f"average 3 or 4 (RGB, RGBA) to 1 and cut 4 to 3); convert it, drop it, or set in_channels to what every "
        f"image can feed."
    ]
    assert len(check_images([*grey, two])) == 4  # in_channels=2 takes both
    with pytest.raises(DataCheckError, match=f"{two}: 2 channel\\(s\\) where the other images have 1, and the"):
        check_images([*grey, rgb, two])


def test_pil_modes_are_read_as_their_colours(tmp_path):
    """A palette PNG, a CMYK JPEG and a grey+alpha PNG are read as PIL converts them (RGB, RGB, grey), for training
    and inference alike; the headers count those channels; a palette label map keeps its indices."""
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(colours).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(colours).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    Image.fromarray(colours[..., :2], "LA").save(tmp_path / "grey_alpha.png")
    expected_modes = {"palette.png": ("RGB", 3), "cmyk.jpg": ("RGB", 3), "grey_alpha.png": ("L", 1)}
    chain = Compose(classification_transforms(img_size=(30, 20), spatial_dims=2, in_channels=3))
    for name, (mode, channels) in expected_modes.items():
        assert read_header(tmp_path / name).channels == channels, name
        pixels = np.asarray(Image.open(tmp_path / name).convert(mode), np.float64)
        pixels = pixels.T if pixels.ndim == 2 else pixels.transpose(2, 1, 0)  # MONAI: channel, column, row
        pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min())
        image = chain({"image": str(tmp_path / name)})["image"]
        expected = torch.from_numpy(pixels).float().expand(3, 30, 20) if channels == 1 else torch.from_numpy(pixels)
        assert torch.allclose(image.as_tensor(), expected.float(), atol=1e-5), name
    paths = [tmp_path / name for name in expected_modes]
    assert len(check_images(paths, channels=1)) == 3  # LA is 1 channel, not 2 (which would ask for in_channels=2)
    label = {"label": str(tmp_path / "palette.png")}
    label = Compose([LoadImaged("label", image_only=True), EnsureChannelFirstd("label")])(label)
    kept = MatchInputd("label", spatial_dims=2, channels=1)(dict(label))["label"]
    assert torch.equal(kept, label["label"]) and kept.shape == (1, 30, 20)  # indices (classes), not colours


def test_slices_with_a_singleton_axis_anywhere_are_2d(tmp_path):
    """Coronal and sagittal NIfTI slices (``X x 1 x Z``, ``1 x Y x Z``) are 2D as ``X x Y x 1`` is: the check and the
    transforms squeeze the singleton axis, and the affine follows (a sagittal slice has no left-right axis)."""
    volume = np.random.default_rng(0).random((16, 12, 10))
    slices = {
        "axial": write_nifti(tmp_path / "axial.nii.gz", volume[:, :, 4:5]),
        "coronal": write_nifti(tmp_path / "coronal.nii.gz", volume[:, 4:5, :]),
        "sagittal": write_nifti(tmp_path / "sagittal.nii.gz", volume[4:5, :, :]),
    }
    pngs = [write_png(tmp_path / f"img{i}.png", seed=i) for i in range(4)]
    datalist = write_datalist(tmp_path / "slices.json",
                              {"training": [(p, i % 2) for i, p in enumerate([*pngs, *slices.values()])]})
    summary = check_classification_datalist(datalist)
    assert summary.notes[0].startswith("3 of 7 images differ in size from the other 16 x 16: ")
    assert f"{slices['coronal']} (16 x 10), {slices['sagittal']} (12 x 10)" in summary.notes[0]
    load = Compose(classification_transforms(img_size=(16, 16), spatial_dims=2, in_channels=1))
    native = {name: Compose(classification_transforms(img_size=size, spatial_dims=2, in_channels=1))
              for name, size in (("axial", (16, 12)), ("coronal", (16, 10)), ("sagittal", (12, 10)))}
    for name, path in slices.items():
        image = native[name]({"image": str(path)})["image"]
        plane = np.squeeze(volume[{"axial": np.s_[:, :, 4], "coronal": np.s_[:, 4, :], "sagittal": np.s_[4]}[name]])
        plane = (plane - plane.min()) / (plane.max() - plane.min())
        assert torch.allclose(image.as_tensor(), torch.from_numpy(plane[None]).float(), atol=1e-5), name
        assert load({"image": str(path)})["image"].shape == (1, 16, 16)
    axes = {name: left_right_axis(native[name]({"image": str(path)})["image"]) for name, path in slices.items()}
    assert axes == {"axial": 0, "coronal": 0, "sagittal": None}
