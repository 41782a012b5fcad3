"""MONAI Label's stock ``monaibundle`` app serves two classification bundles (PromptClassifier, FPT+), a 2D (PNG) and
a 3D (NIfTI) segmentation bundle, and trains the 3D one from its datastore, against a real server on 127.0.0.1.

Run by ``make label-test`` in the MONAI Label environment (``make label-env``: monailabel needs numpy<2 and
pydicom<3, so it has a venv of its own); skipped where monailabel is not installed (the main ``make test``).

The bundles are trained here for one epoch on tiny data with a tiny backbone, then put into the app's ``model/``
folder with ``monai-prompt package`` (run by this venv's console script, as a user would): the backbone inside, the
trained network settings and classes written into the configs and metadata (MONAI Label gives a bundle no
command-line overrides), ``continue_model`` for the segmentation ``train.json``. Each ``/infer`` answer is compared
with what the packaged bundle's own ``inference.json`` writes for the same image.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("monailabel", reason="MONAI Label runs in its own environment: make label-test")

import nibabel as nib
import requests
from PIL import Image

from bundle_support import copy_bundle, tiny_overrides
from monai_prompt.bundle_gen.specs import ALL_BUNDLE_SPECS
from monai_prompt.runs.runner import run_bundle
from segmentation_support import (
    TINY_CLASSES,
    tiny_segmentation_overrides,
    write_tiny_encoder,
    write_tiny_segmentation,
)

#: a PromptClassifier and an FPTClassifier (frozen LPM + side network) bundle.
CLASSIFICATIONS = ("vpt_classification", "fptplus_classification")
SEGMENTATION_2D, SEGMENTATION = "vpt_segmentation", "vpt_3d_segmentation"
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 300


def _label_path() -> dict[str, str]:
    """The environment with this venv's ``bin`` first in ``PATH``: the ``monailabel`` script runs ``python``."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_tiny(name: str, root: Path, overrides: dict[str, Any]) -> Path:
    """A copy of bundle ``name`` under ``root`` trained for one epoch with ``overrides``."""
    bundle = copy_bundle(name, root)
    run_bundle(bundle, ["train.json"], "train", quiet=True, **overrides, **{"train#trainer#max_epochs": 1})
    return bundle


def _package(bundles: dict[str, Path], app: Path) -> dict[str, Path]:
    """``monai-prompt package`` of each trained bundle into ``<app>/model/<name>`` (its recorded backbone); the
    commands run at the same time (each spends most of its time importing torch and MONAI)."""
    targets = {name: app / "model" / name for name in bundles}
    runs = {name: subprocess.Popen([str(BIN / "monai-prompt"), "package", str(bundle), "--out", str(targets[name])],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_label_path())
            for name, bundle in bundles.items()}
    for name, run in runs.items():
        output, _ = run.communicate()
        assert run.returncode == 0, f"monai-prompt package {bundles[name]}:\n{output}"
    return targets


def _own_probabilities(bundle: Path, image: Path) -> list[float]:
    """The class probabilities the bundle's own ``inference.json`` writes for ``image``."""
    run_bundle(bundle, ["inference.json"], "infer", quiet=True, infer_images=str(image), num_workers=0)
    with open(bundle / "eval" / "predictions.csv") as f:
        rows = list(csv.reader(f))
    return [float(value) for value in rows[1][1:-1]]


def _own_mask_file(bundle: Path, image: Path) -> Path:
    """The mask file the bundle's own ``inference.json`` writes for ``image`` (NIfTI or PNG, as the image)."""
    run_bundle(bundle, ["inference.json"], "infer", quiet=True, infer_images=str(image), num_workers=0)
    suffix = ".png" if image.suffix == ".png" else ".nii.gz"
    return bundle / "eval" / "masks" / image.name.replace(suffix, f"_seg{suffix}")


def _weights_digest(bundle: Path) -> str:
    return hashlib.sha256((bundle / "models" / "model.pt").read_bytes()).hexdigest()


class Server:
    """``monailabel start_server`` in its own process group (stopped by its PID), its log kept in a file."""

    def __init__(self, app: Path, studies: Path, models: list[str], log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [
            str(BIN / "monailabel"), "start_server", "--app", str(app), "--studies", str(studies),
            "--conf", "models", ",".join(models), "--conf", "zoo_source", "github", "--conf", "sam2", "false",
            "--host", "127.0.0.1", "--port", str(self.port),
        ]
        with open(log, "w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=_label_path(),
                                            start_new_session=True)
        self.started_s = self._wait_until_up()

    def _wait_until_up(self) -> float:
        begin = time.monotonic()
        while time.monotonic() - begin < START_TIMEOUT_S:
            if self.process.poll() is not None:
                raise RuntimeError(f"monailabel exited with {self.process.returncode}:\n{self.logs()}")
            try:
                if requests.get(f"{self.url}/info/", timeout=5).ok:
                    return time.monotonic() - begin
            except requests.ConnectionError:
                pass
            time.sleep(1)
        raise RuntimeError(f"monailabel did not answer /info/ within {START_TIMEOUT_S} s:\n{self.logs()}")

    def logs(self) -> str:
        return self.log.read_text()[-20000:]

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        response = requests.post(f"{self.url}{path}", timeout=REQUEST_TIMEOUT_S, **kwargs)
        assert response.ok, f"POST {path}: HTTP {response.status_code} {response.text[:2000]}\n{self.logs()}"
        return response

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny):
    """The app with the four trained bundles, its studies (a classification PNG, a segmentation PNG, 3D NIfTI
    images with final labels) and the running server."""
    root = tmp_path_factory.mktemp("label")
    seg_data = write_tiny_segmentation(root / "seg_data", 3)
    png_data = write_tiny_segmentation(root / "png_data", 2, png=True)
    seg_overrides = tiny_segmentation_overrides(ALL_BUNDLE_SPECS[SEGMENTATION], seg_data,
                                                write_tiny_encoder(root / "vit3.pt", 3))
    png_overrides = tiny_segmentation_overrides(ALL_BUNDLE_SPECS[SEGMENTATION_2D], png_data,
                                                write_tiny_encoder(root / "vit2.pt", 2))
    trained = root / "trained"
    bundles = {name: _train_tiny(name, trained, tiny_overrides(ALL_BUNDLE_SPECS[name], tiny["data"], tiny["backbone"]))
               for name in CLASSIFICATIONS}
    bundles |= {SEGMENTATION_2D: _train_tiny(SEGMENTATION_2D, trained, png_overrides),
               SEGMENTATION: _train_tiny(SEGMENTATION, trained, seg_overrides)}

    subprocess.run([str(BIN / "monailabel"), "apps", "--download", "--name", "monaibundle", "--output",
                    str(root / "apps")], check=True, capture_output=True, env=_label_path())
    app = root / "apps" / "monaibundle"
    deployed = _package(bundles, app)
    # test-tiny only: a learning rate at which one epoch on six tiny volumes changes the mask, and no loader workers
    # (the 2 CPU cores that the server and its training child share)
    train = deployed[SEGMENTATION] / "configs" / "train.json"
    train.write_text(json.dumps({**json.loads(train.read_text()), "learning_rate": 0.05, "num_workers": 0}))

    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    cls_image = next((tiny["data"] / "images" / "test").glob("bright_*.png"))
    shutil.copy(cls_image, studies / "bright.png")
    shutil.copy(png_data.parent / json.loads(png_data.read_text())["test"][0]["image"], studies / "slice.png")
    for split in ("training", "validation", "test"):
        for item in json.loads(seg_data.read_text())[split]:
            name = f"{split}_{Path(item['image']).name}"
            shutil.copy(seg_data.parent / item["image"], studies / name)
            shutil.copy(seg_data.parent / item["label"], studies / "labels" / "final" / name)

    server = Server(app, studies, list(deployed), root / "server.log")
    try:
        yield {"server": server, "bundles": deployed, "studies": studies}
    finally:
        server.stop()


def test_info_lists_every_bundle_with_its_type_and_labels(served):
    info = requests.get(f"{served['server'].url}/info/", timeout=30).json()
    models = info["models"]
    assert all(models[name]["type"] == "classification" for name in CLASSIFICATIONS)
    assert models[SEGMENTATION_2D]["type"] == "segmentation" and models[SEGMENTATION_2D]["dimension"] == 2
    assert models[SEGMENTATION]["type"] == "segmentation" and models[SEGMENTATION]["dimension"] == 3
    assert models[SEGMENTATION]["labels"] == {name: i for i, name in enumerate(TINY_CLASSES) if i > 0}
    assert SEGMENTATION in info["trainers"]
    print(f"server start-up: {served['server'].started_s:.1f} s")


@pytest.mark.parametrize("name", CLASSIFICATIONS)
def test_classification_infer_equals_the_bundles_own_inference(served, name):
    server, bundle = served["server"], served["bundles"][name]
    begin = time.monotonic()
    answer = server.post(f"/infer/{name}", params={"image": "bright", "output": "json"}).json()
    print(f"{name} /infer: {time.monotonic() - begin:.2f} s")
    expected = _own_probabilities(bundle, served["studies"] / "bright.png")
    assert [entry["label"] for entry in answer["prediction"]] == ["dark", "mid", "bright"]
    np.testing.assert_allclose([entry["score"] for entry in answer["prediction"]], expected, atol=1e-5)
    assert sum(expected) == pytest.approx(1.0, abs=1e-5)


def _served_mask(server: Server, model: str, image_id: str, out: Path) -> Path:
    """The mask file ``/infer/<model>`` returns for the datastore image ``image_id``."""
    begin = time.monotonic()
    response = server.post(f"/infer/{model}", params={"image": image_id, "output": "image"})
    print(f"{model} /infer: {time.monotonic() - begin:.2f} s")
    out.write_bytes(response.content)
    return out


def _assert_same_mask(served_file: Path, own_file: Path, image: Path) -> None:
    """Voxel for voxel the bundle's own mask, on the input's grid (shape and affine)."""
    served_mask, own, source = nib.load(served_file), nib.load(own_file), nib.load(image)
    assert served_mask.shape == own.shape == source.shape
    np.testing.assert_array_equal(np.asarray(served_mask.dataobj), np.asarray(own.dataobj))
    np.testing.assert_allclose(served_mask.affine, source.affine, atol=1e-5)
    np.testing.assert_allclose(own.affine, source.affine, atol=1e-5)


def test_2d_segmentation_infer_equals_the_bundles_own_png_mask(served, tmp_path):
    server, bundle, image = served["server"], served["bundles"][SEGMENTATION_2D], served["studies"] / "slice.png"
    served_mask = np.asarray(Image.open(_served_mask(server, SEGMENTATION_2D, "slice", tmp_path / "mask.png")))
    own = np.asarray(Image.open(_own_mask_file(bundle, image)))
    assert served_mask.shape == own.shape == np.asarray(Image.open(image)).shape
    np.testing.assert_array_equal(served_mask, own)
    assert set(np.unique(own)) <= set(range(len(TINY_CLASSES)))


def test_segmentation_infer_then_train_then_infer_with_the_new_delta(served, tmp_path):
    server, bundle, studies = served["server"], served["bundles"][SEGMENTATION], served["studies"]
    image_id = "test_case0"
    image = studies / f"{image_id}.nii.gz"
    before = _served_mask(server, SEGMENTATION, image_id, tmp_path / "before.nii.gz")
    _assert_same_mask(before, _own_mask_file(bundle, image), image)
    assert set(np.unique(np.asarray(nib.load(before).dataobj))) <= set(range(len(TINY_CLASSES)))

    digest = _weights_digest(bundle)
    begin = time.monotonic()
    server.post(f"/train/{SEGMENTATION}", params={"run_sync": "true"},
                json={"max_epochs": 1, "val_split": 0.25, "device": "cpu", "multi_gpu": False})
    print(f"{SEGMENTATION} /train (1 epoch): {time.monotonic() - begin:.1f} s")
    assert _weights_digest(bundle) != digest, f"/train wrote no new models/model.pt\n{server.logs()}"

    after = _served_mask(server, SEGMENTATION, image_id, tmp_path / "after.nii.gz")
    own_after = _own_mask_file(bundle, image)
    _assert_same_mask(after, own_after, image)
    # the new delta changed the mask, so the served one is the new delta's
    assert not np.array_equal(np.asarray(nib.load(own_after).dataobj), np.asarray(nib.load(before).dataobj))
