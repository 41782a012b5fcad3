"""The data check decodes every image as training reads it and reports every bad file at once; the inference inputs
from folders, globs and lists: ``monai_prompt.data.check``."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from io_support import write_datalist, write_nifti, write_png
from monai_prompt.data import DataCheckError, check_classification_datalist, check_images, find_images


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


def test_find_images_folders_globs_and_lists(tmp_path):
    images = [write_png(tmp_path / name) for name in ("b/2.png", "a/1.png", "a/.hidden.png", ".cache/3.png")]
    (tmp_path / "notes.txt").write_text("not an image")
    assert find_images(tmp_path) == [str(images[1]), str(images[0])]  # recursive, sorted, hidden skipped
    assert find_images(str(tmp_path / "*" / "*.png")) == [str(images[1]), str(images[0])]
    assert find_images([images[0], str(tmp_path / "a" / "*.png"), images[0]]) == [str(images[0]), str(images[1])]
    assert find_images([tmp_path / "gone.png"]) == [str(tmp_path / "gone.png")]  # kept for check_images to report
    assert find_images(tmp_path / "no_such_folder") == [] and find_images(str(tmp_path / "*.jpg")) == []


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
        f"this one would stop training: convert it or drop it.",
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
