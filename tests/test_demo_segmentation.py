"""The demo segmentation sets (deterministic, split by slab without leakage, labels and geometry checked against the
template files read here) and ``monai-prompt demo --task segmentation`` end to end at its tiny size."""

from __future__ import annotations

import filecmp
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import LoadImage
from PIL import Image

from monai_prompt.cli import main
from monai_prompt.data.demo import mni152_folder
from monai_prompt.data.demo_segmentation import (
    LOBE_CLASSES,
    SEGMENTATION_CLASSES,
    SLAB_SPLITS_3D,
    build_segmentation_demo,
    cat12_folder,
)
from monai_prompt.data.segmentation import check_segmentation_datalist
from monai_prompt.runs.segmentation_demo_task import TINY_SEGMENTATION_DEMO, prepare_segmentation_data, pretrain_encoder

SMALL = {"unlabeled_copies": 1, "crops_3d": (3, 1, 1)}


def _template() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels recomputed from nilearn's files: 0 outside the T1's non-zero voxels, else 1 + argmax(csf, gm, wm)
    with csf = 1 - gm - wm; the brain mask; the 1 mm affine."""
    folder = mni152_folder()
    t1, gm, wm = (nib.load(folder / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz")
                  for name in ("t1", "gm", "wm"))
    # float32 as the module: same near-ties
    grey, white = (np.asarray(image.dataobj, dtype=np.float32) / 255 for image in (gm, wm))
    brain = np.asarray(t1.dataobj) > 0
    return np.stack([np.clip(1 - grey - white, 0, 1) * brain, grey, white]), brain, t1.affine


@pytest.fixture(scope="module")
def demo_sets(tmp_path_factory) -> Path:
    return build_segmentation_demo(tmp_path_factory.mktemp("segdemo"), **SMALL)["2d"].parent


def test_build_is_deterministic(demo_sets, tmp_path):
    build_segmentation_demo(tmp_path, **SMALL)
    files = sorted(p.relative_to(demo_sets) for p in demo_sets.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert all(filecmp.cmp(demo_sets / name, tmp_path / name, shallow=False) for name in files)


def _slice(path: str) -> int:
    return int(re.search(r"z(\d+)", Path(path).name).group(1))


def test_slabs_split_without_leakage(demo_sets):
    content = json.loads((demo_sets / "datalist_2d.json").read_text())
    z_of = {split: [_slice(item["image"]) for item in content[split]] for split in ("training", "validation", "test")}
    assert all(z_of.values())
    for split, zs in z_of.items():  # every slice 2 or more slices inside its 10-slice slab, one split per slab
        assert all(2 <= z % 10 < 8 for z in zs)
        others = [z for other, values in z_of.items() if other != split for z in values]
        assert min(abs(a - b) for a in zs for b in others) >= 5
    unlabeled = {_slice(item["image"]) for item in content["unlabeled"]}
    assert unlabeled == set(z_of["training"])  # pre-training images come from the training slab only

    crops = json.loads((demo_sets / "datalist_3d.json").read_text())
    ranges = {}
    for split in ("training", "validation", "test"):
        for item in crops[split]:
            z0 = int(re.search(r"_z(\d+)", Path(item["image"]).name).group(1))
            depth = nib.load(demo_sets / item["image"]).shape[2]
            assert SLAB_SPLITS_3D[int(item["group"].removeprefix("slab")) % 4] == split
            ranges.setdefault(split, set()).add((z0, z0 + depth))
    for split, spans in ranges.items():
        for other, other_spans in ranges.items():
            if other != split:  # 3D crops of different splits are 4 or more slices apart
                assert all(b0 - a1 >= 4 or a0 - b1 >= 4 for a0, a1 in spans for b0, b1 in other_spans)


def test_labels_and_geometry_match_the_template(demo_sets):
    probabilities, brain, affine = _template()
    truth = np.where(brain, 1 + probabilities.argmax(0), 0)
    to_voxel = np.linalg.inv(affine)
    crops = json.loads((demo_sets / "datalist_3d.json").read_text())
    for item in crops["training"][:2] + crops["test"]:
        label = nib.load(demo_sets / item["label"])
        x0, y0, z0 = np.round(to_voxel @ label.affine @ [0, 0, 0, 1])[:3].astype(int)  # the crop's origin
        assert f"x{x0:03d}_y{y0:03d}_z{z0:03d}" in item["label"]
        sx, sy, sz = label.shape
        np.testing.assert_array_equal(np.asarray(label.dataobj), truth[x0 : x0 + sx, y0 : y0 + sy, z0 : z0 + sz])

    slices = json.loads((demo_sets / "datalist_2d.json").read_text())
    rng = np.random.default_rng(0)
    for item in slices["test"][::4]:
        label = nib.load(demo_sets / item["label"])
        values = np.asarray(label.dataobj)
        for i, j in rng.integers(0, 96, (40, 2)):
            # pixel (i, j) is the centre of a 2 x 2 block of 1 mm voxels: its world position says which
            x, y, z = (to_voxel @ label.affine @ [i, j, 0, 1])[:3]
            block = (slice(int(x - 0.5), int(x - 0.5) + 2), slice(int(y - 0.5), int(y - 0.5) + 2), round(z))
            if block[0].start < 0 or block[1].start < 0 or block[0].stop > 197 or block[1].stop > 233:
                assert values[i, j] == 0  # padding outside the template
                continue
            inside = brain[block].mean() >= 0.5
            expected = 1 + probabilities[(slice(None), *block)].mean(axis=(1, 2)).argmax() if inside else 0
            assert values[i, j] == expected, (item["label"], i, j)


def test_png_copies_equal_the_nifti_slices_and_every_set_passes_the_check(demo_sets):
    load = LoadImage(image_only=True)
    nifti = json.loads((demo_sets / "datalist_2d.json").read_text())
    png = json.loads((demo_sets / "datalist_2d_png.json").read_text())
    for a, b in zip(nifti["test"] + nifti["unlabeled"][:3], png["test"] + png["unlabeled"][:3]):
        for key in set(a) - {"group"}:
            assert torch.equal(torch.as_tensor(load(demo_sets / a[key])), torch.as_tensor(load(demo_sets / b[key])))
    assert np.asarray(Image.open(demo_sets / png["test"][0]["label"])).dtype == np.uint8
    for name in ("datalist_2d.json", "datalist_2d_png.json", "datalist_3d.json"):
        summary = check_segmentation_datalist(demo_sets / name, SEGMENTATION_CLASSES,
                                              required_splits=["training", "validation"])
        assert summary.classes == list(SEGMENTATION_CLASSES)
        assert all(fractions[1] > 0 for fractions in summary.voxel_fractions.values())  # CSF in every split


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reuses_data_and_pretraining(tmp_path, capsys):
    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    try:
        main(["demo", "--task", "segmentation", "--tiny", "--out", str(out), "--compare-scratch"])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "[5/5] figure of 2 test slices" in printed
    assert "MAE epoch 1/1" in printed and "dvpt-UNETR epoch 1/1" in printed
    assert "trainable parameter" in printed  # the bundle's parameter report
    results = json.loads((out / "results.json").read_text())
    assert set(results["runs"]) == {"pretrained", "scratch"}
    assert results["classes"] == list(LOBE_CLASSES)  # the demo's task: the lobes
    assert "with the encoder's outputs zeroed (same delta): mean Dice" in printed
    assert 0 <= results["runs"]["pretrained"]["zeroed_encoder_metrics"]["mean_dice"] <= 1
    for run in results["runs"].values():
        metrics = run["metrics"]
        assert run["img_size"] == 32  # the bundle's choice: the whole 32 x 32 slices
        assert {"mean_dice", "mean_hd95", *(f"dice_{c}" for c in LOBE_CLASSES[1:])} <= set(metrics)
        assert 0 <= metrics["mean_dice"] <= 1 and f"{metrics['mean_dice']:.3f}" in printed
        assert run["trainable"] == run["encoder_trainable"] + run["decoder"]
        masks = sorted((Path(run["out_dir"]) / "eval" / "masks").iterdir())
        assert len(masks) == results["test_images"]
    pretrained, scratch = results["runs"]["pretrained"], results["runs"]["scratch"]
    assert 0 < pretrained["encoder_trainable"] < pretrained["backbone"] == scratch["encoder_trainable"]
    figure = Image.open(results["figure"])
    assert figure.format == "PNG" and figure.size[0] > figure.size[1]  # 4 columns, 2 rows

    datalist, reused = prepare_segmentation_data(out / "data", TINY_SEGMENTATION_DEMO)
    assert reused and datalist == out / "data" / "datalist_2d.json"
    checkpoint, status = pretrain_encoder(out / "vit_pretraining", datalist, TINY_SEGMENTATION_DEMO)
    assert status == "reused" and checkpoint == out / "vit_pretraining" / "models" / "model.pt"


@pytest.mark.slow
def test_demo_data_command_builds_the_segmentation_sets(tmp_path, capsys):
    main(["demo-data", "--task", "segmentation", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    for name in ("datalist_2d.json", "datalist_2d_png.json", "datalist_3d.json"):
        assert f"{tmp_path / name}" in printed
        content = json.loads((tmp_path / name).read_text())
        assert list(content["labels"].values()) == list(SEGMENTATION_CLASSES)
        assert f"test {len(content['test'])}" in printed
    assert "training 24, validation 6, test 6" in printed  # the 3D crops


#: LPBA40 structure names (lpba40.csv) of each lobe class, read here from the names rather than the ID ranges.
LOBE_WORDS = {
    "frontal": ("Frontal", "Orbitofrontal", "Gyrus Rectus", "Precentral"),
    "parietal": ("Postcentral", "Parietal", "Supramarginal", "Angular", "Precuneus"),
    "occipital": ("Occipital", "Cuneus"),
    "temporal": ("Temporal", "Parahippocampal", "Lingual", "Fusiform"),
    "deep": ("Insula", "Cingulate", "Caudate", "Putamen", "Hippocampus"),
    "cerebellum_brainstem": ("Cerebellar", "Brainstem"),
}


@pytest.fixture(scope="module")
def lobe_sets(tmp_path_factory) -> Path:
    return build_segmentation_demo(tmp_path_factory.mktemp("lobes"), task="lobes", **SMALL)["2d"].parent


def test_lobe_labels_and_image_match_the_atlas_and_template(lobe_sets):
    """3D crops: labels are the atlas's structures mapped by name to lobes; the image is the CAT12 template at the
    atlas's voxels (resampled here with scipy, correlated through the intensity jitter)."""
    from scipy.ndimage import map_coordinates

    folder = cat12_folder()
    atlas = nib.load(folder / "lpba40.nii.gz")
    table = [line.split(";") for line in (folder / "lpba40.csv").read_text().splitlines()[1:]]
    lookup = np.zeros(256, dtype=np.uint8)
    for row in table:
        (lobe,) = [i for i, words in enumerate(LOBE_WORDS.values(), 1) if any(w in row[2] for w in words)]
        lookup[int(row[0])] = lobe
    truth = lookup[np.asarray(atlas.dataobj)]
    template = nib.load(folder / "Template_05mm_bet.nii.gz")
    to_template = np.linalg.inv(template.affine) @ atlas.affine
    content = json.loads((lobe_sets / "datalist_3d.json").read_text())
    assert list(content["labels"].values()) == ["background", *LOBE_WORDS]
    for item in content["training"][:2] + content["test"]:
        label, image = nib.load(lobe_sets / item["label"]), nib.load(lobe_sets / item["image"])
        x0, y0, z0 = np.round(np.linalg.inv(atlas.affine) @ label.affine @ [0, 0, 0, 1])[:3].astype(int)
        sx, sy, sz = label.shape
        np.testing.assert_array_equal(np.asarray(label.dataobj), truth[x0 : x0 + sx, y0 : y0 + sy, z0 : z0 + sz])
        grid = np.stack(np.meshgrid(*(np.arange(n) for n in label.shape), indexing="ij"), -1).reshape(-1, 3)
        voxels = (to_template @ np.c_[grid + [x0, y0, z0], np.ones(len(grid))].T)[:3]
        expected = map_coordinates(np.asarray(template.dataobj, dtype=np.float32), voxels, order=1)
        assert np.corrcoef(expected, np.asarray(image.dataobj, dtype=np.float32).ravel())[0, 1] > 0.9


def test_lobe_slices_hold_every_lobe_and_pass_the_check(lobe_sets):
    datalist = lobe_sets / "datalist_2d.json"
    content = json.loads(datalist.read_text())
    for split in ("training", "test"):
        seen = set().union(*(np.unique(np.asarray(nib.load(lobe_sets / i["label"]).dataobj)) for i in content[split]))
        assert seen == set(range(len(LOBE_WORDS) + 1)), split
    check_segmentation_datalist(datalist, list(content["labels"].values()))


def test_lobes_without_deepmriprep_name_the_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepmriprep" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install --no-deps deepmriprep==0\.3\.0"):
        build_segmentation_demo("unused", task="lobes")
