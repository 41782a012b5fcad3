"""The inference outputs: the CSV, and the line that says where they went (``monai_prompt.engine.predictions``)."""

from __future__ import annotations

import csv
import logging
import os
import stat

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from monai.transforms import SaveImage

from monai_prompt.engine import PredictionSaver, SavedMasks


def test_prediction_saver_writes_a_header_and_the_decision(tmp_path):
    names = ["/data/a/t1.png", "/data/b/t1.png", "/data/t2.png"]  # same-named images of two folders: a row each
    probs = torch.tensor([[0.1, 0.7, 0.2], [0.6, 0.3, 0.9], [0.2, 0.2, 0.6]])
    for multi_label, decisions in ((False, ["b", "c", "c"]), (True, ["b", "a;c", "c"])):
        saver = PredictionSaver(tmp_path, ["a", "b", "c"], multi_label=multi_label)
        engine = Engine(lambda engine, batch: [{"pred": p} for p in batch["pred"]])
        saver.attach(engine)
        batches = [{"image": MetaTensor(torch.zeros(2, 1, 2, 2), meta={"filename_or_obj": names[:2]}),
                    "pred": probs[:2]},
                   {"image": MetaTensor(torch.zeros(1, 1, 2, 2), meta={"filename_or_obj": names[2:]}),
                    "pred": probs[2:]}]
        engine.run(batches)
        with open(tmp_path / "predictions.csv") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["image", "a", "b", "c", "predicted"]
        assert [row[0] for row in rows[1:]] == names and [row[-1] for row in rows[1:]] == decisions
        assert np.allclose([[float(v) for v in row[1:-1]] for row in rows[1:]], probs.numpy())
        assert stat.S_IMODE((tmp_path / "predictions.csv").stat().st_mode) == 0o666 & ~_umask()
    with pytest.raises(ValueError, match=r"the network predicts 3 classes but 2 class names \['a', 'b'\]"):
        saver = PredictionSaver(tmp_path, ["a", "b"])
        engine = Engine(lambda engine, batch: [{"pred": p} for p in batch["pred"]])
        saver.attach(engine)
        engine.run([batches[0]])


def _reports(report, caplog, monkeypatch) -> list[list[str]]:
    """What ``report()`` logs on rank 0, then on rank 1 of a process group."""
    lines = []
    for rank in (0, 1):
        caplog.clear()
        with monkeypatch.context() as patch, caplog.at_level(logging.INFO, logger="monai_prompt"):
            patch.setattr(torch.distributed, "is_initialized", lambda: True)
            patch.setattr(torch.distributed, "get_rank", lambda group=None: rank)
            report()
        lines.append([record.getMessage() for record in caplog.records])
    return lines


def test_each_output_says_where_it_went_on_rank_zero(tmp_path, caplog, monkeypatch):
    """An inference ended with ignite's ``Engine run finished`` and never said where its outputs went: the report
    names the count and the absolute path (the bundles' paths are relative to where they run), rank 0 only."""
    monkeypatch.chdir(tmp_path)
    saver = PredictionSaver("eval", ["a", "b"])
    engine = Engine(lambda engine, batch: [{"pred": p} for p in batch["pred"]])
    saver.attach(engine)
    names = [f"/data/{index}.png" for index in range(3)]
    engine.run([{"image": MetaTensor(torch.zeros(3, 1, 2, 2), meta={"filename_or_obj": names}),
                 "pred": torch.tensor([[0.2, 0.8], [0.6, 0.4], [0.1, 0.9]])}])
    assert _reports(saver.report, caplog, monkeypatch) == [
        [f"inference: wrote 3 prediction rows to {tmp_path / 'eval' / 'predictions.csv'}"], []]

    masks = SavedMasks("eval/masks")
    writer = SaveImage(output_dir="eval/masks", output_ext=".nii.gz", output_postfix="seg", separate_folder=False,
                       data_root_dir="/data", resample=False, savepath_in_metadict=True, print_log=False)
    inputs = ["/data/a/t1.nii.gz", "/data/b/t1.nii.gz", "/data/c.nii.gz"]  # masks in subfolders count too
    engine = Engine(lambda engine, batch: [{"pred": writer(MetaTensor(torch.zeros(1, 3, 3, 3), meta={
        "filename_or_obj": name}))} for name in batch])
    masks.attach(engine)
    engine.run([inputs[:2], inputs[2:]])
    assert len(list((tmp_path / "eval" / "masks").rglob("*_seg.nii.gz"))) == 3
    folder = tmp_path / "eval" / "masks"
    assert _reports(masks.report, caplog, monkeypatch) == [[f"inference: wrote 3 masks to {folder}"], []]
    engine.run([inputs[2:]])  # a second run counts its own masks
    assert _reports(masks.report, caplog, monkeypatch)[0] == [f"inference: wrote 1 mask to {folder}"]


def _umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask
