"""The inference CSV: ``monai_prompt.engine.predictions``."""

from __future__ import annotations

import csv
import os
import stat

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor

from monai_prompt.engine import PredictionSaver


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


def _umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask
