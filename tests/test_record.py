"""The training record (``training_config.json``), the run id and a resume's settings against the record:
``monai_prompt.runs.record``."""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

import pytest

from monai_prompt.io import DiskFullError
from monai_prompt.runs import (
    RunIdentity,
    check_resumed_settings,
    read_training_config,
    recorded_method_config,
    run_id,
    write_training_config,
)


def test_training_record_round_trip_and_run_id(tmp_path, monkeypatch):
    weights = tmp_path / "vit.pt"
    weights.write_bytes(b"w")
    assert read_training_config(tmp_path / "models") == {}
    with pytest.raises(FileNotFoundError, match=r"no checkpoint_epoch=<N>\.pt of a recorded training run in \S+ to "
                                                r"resume from \(training_config\.json is missing\)"):
        run_id(tmp_path / "models", resume=True)
    first = run_id(tmp_path / "models", resume=False)
    assert first != run_id(tmp_path / "models", resume=False) and len(first) == 32
    monkeypatch.chdir(tmp_path)  # a relative pretrained path is stored absolute
    write_training_config(tmp_path / "models", first, {"pretrained": "vit.pt", "img_size": 32})
    record = read_training_config(tmp_path / "models" / "model.pt")  # a checkpoint file: its folder's record
    assert (record["run_id"], record["pretrained"], record["img_size"]) == (first, str(weights), 32)
    assert run_id(tmp_path / "models", resume=True) == first
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "models" / "training_config.json").stat().st_mode) == 0o666 & ~umask
    RunIdentity(first).load_state_dict({"run_id": first})
    with pytest.raises(ValueError, match="belongs to training run x, not to the run recorded"):
        RunIdentity(first).load_state_dict({"run_id": "x"})
    (tmp_path / "models" / "training_config.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"training_config\.json is not valid JSON"):
        read_training_config(tmp_path / "models")


def test_the_recorded_method_config_is_only_for_the_recorded_method(tmp_path):
    record = {"method": "lora", "method_config": {"rank": 4, "alpha": 8.0}}
    assert recorded_method_config(record, "lora", {"rank": 2}, tmp_path) == {"rank": 2, "alpha": 8.0}
    with pytest.raises(ValueError) as caught:  # not VPT's "unknown config keys ['alpha', 'rank']"
        recorded_method_config(record, "vpt", {}, tmp_path)
    assert str(caught.value) == (
        f"--method 'vpt' is not the method the delta was trained with: {tmp_path / 'training_config.json'} records "
        f"'lora' (method_config {{'rank': 4, 'alpha': 8.0}}), and a delta holds one method's weights. Leave --method "
        f"out (the recorded method is used), or train a 'vpt' run into another --ckpt_dir."
    )


def test_a_resume_refuses_settings_that_define_another_network(tmp_path):
    recorded = {"method": "lora", "method_config": {"r": 4}, "img_size": [32, 32], "pretrained": "/old/vit.pt"}
    write_training_config(tmp_path, "r1", recorded)
    check_resumed_settings(tmp_path, {**recorded, "img_size": (32, 32), "pretrained": "/moved/vit.pt"})  # the same
    with pytest.raises(ValueError, match=re.escape(
        f"--resume true continues training run r1 of {tmp_path}/training_config.json, whose network and data were "
        f'built with other settings: --method "vpt" (recorded: "lora"); --method_config {{"r": 8}} (recorded: '
        f'{{"r": 4}}). A resumed run keeps them: drop these overrides, or start a new run with --overwrite true (or '
        f"into another --ckpt_dir).")):
        check_resumed_settings(tmp_path, {**recorded, "method": "vpt", "method_config": {"r": 8}})


def test_a_full_disk_names_the_record_and_the_fix(tmp_path, monkeypatch):
    write_training_config(tmp_path, "r1", {"img_size": 32})
    before = (tmp_path / "training_config.json").read_bytes()

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(DiskFullError, match=re.escape(
        f"[Errno 28] No space left on device while writing {tmp_path}/training_config.json (it is unchanged; nothing "
        f"half-written is left). Free space on the disk that holds {tmp_path}, or write to a folder on another disk "
        f"(--ckpt_dir, --output_dir), and run again.")):
        write_training_config(tmp_path, "r2", {"img_size": 64})
    assert [path.name for path in tmp_path.iterdir()] == ["training_config.json"]
    assert (tmp_path / "training_config.json").read_bytes() == before
