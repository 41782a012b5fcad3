"""Delta checkpoint objects, the atomic saver that never writes NaN/Inf or half a file, the best score kept across a
resume, and the newest checkpoint of a run: ``monai_prompt.engine.checkpoint``."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator
from monai.handlers import CheckpointLoader, ValidationHandler

from io_support import sha256
from monai_prompt.engine import (
    AtomicCheckpointSaver,
    BestMetricState,
    CheckedCheckpointLoader,
    NonFiniteError,
    PeftMeta,
    TrainableState,
    latest_checkpoint,
    non_finite_entries,
)
from monai_prompt.io import DiskFullError
from monai_prompt.peft import DeltaMismatchError, UnreadableCheckpointError
from monai_prompt.peft.delta import IDENTITY_KEYS
from net_support import tiny_classifier


def test_delta_objects_round_trip_and_refuse_other_configs():
    net = tiny_classifier("vpt", {"num_tokens": 2})
    state, meta = TrainableState(net).state_dict(), PeftMeta(net).state_dict()
    assert set(state) == {"backbone.prompter.prompts", "head.weight", "head.bias", *IDENTITY_KEYS}
    assert meta["method"] == "vpt"
    other = tiny_classifier("vpt", {"num_tokens": 2})
    with torch.no_grad():
        other.head.weight.zero_()
    PeftMeta(other).load_state_dict(meta)
    TrainableState(other).load_state_dict(state)
    assert torch.equal(other.head.weight, net.head.weight)
    with pytest.raises(DeltaMismatchError, match="ckpt.pt: method config differs: num_tokens: 2 in the delta vs 3"):
        PeftMeta(tiny_classifier("vpt", {"num_tokens": 3}), source="ckpt.pt").load_state_dict(meta)
    ddp_like = torch.nn.DataParallel(net)  # unwrapped like DistributedDataParallel
    assert set(TrainableState(ddp_like).state_dict()) == set(state)


def test_prompt_classifier_loads_a_delta_strictly_but_not_a_wrong_one():
    net = tiny_classifier("lora", {"rank": 2})
    delta = TrainableState(net).state_dict()
    params = [key for key in delta if key not in IDENTITY_KEYS]
    assert not any("lora" in key for key in params) or all(net.get_parameter(k).requires_grad for k in params)
    fresh = tiny_classifier("lora", {"rank": 2})
    assert fresh.load_state_dict(delta, strict=True).missing_keys == []  # frozen backbone keys are not required
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict({k: v for k, v in delta.items() if k != "head.bias"}, strict=True)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fresh.load_state_dict({**delta, "extra.weight": torch.zeros(1)}, strict=True)


class _Counter:
    def __init__(self):
        self.value = torch.zeros(2)

    def state_dict(self):
        return {"value": self.value.clone()}

    def load_state_dict(self, state):
        self.value = state["value"]


@pytest.mark.parametrize("kind", ["fixed_name", "interval"])
def test_atomic_checkpoint_saver_keeps_the_last_good_file_when_a_save_fails(kind, tmp_path, monkeypatch):
    engine = Engine(lambda engine, batch: None)
    counter = _Counter()
    options = {"save_final": True, "final_filename": "model.pt"} if kind == "fixed_name" else {
        "save_interval": 1, "n_saved": 1}
    AtomicCheckpointSaver(str(tmp_path), {"counter": counter}, **options).attach(engine)
    engine.run([0], max_epochs=1)
    counter.value = torch.ones(2)
    engine.run([0], max_epochs=2)  # a good save supersedes the first file (n_saved=1 / fixed name)
    (good,) = os.listdir(tmp_path)
    saved = (tmp_path / good).read_bytes()
    assert torch.load(tmp_path / good, weights_only=True)["value"].tolist() == [1.0, 1.0]

    def crash(obj, f, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    counter.value = torch.full((2,), 2.0)
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        engine.run([0], max_epochs=3)
    assert os.listdir(tmp_path) == [good] and (tmp_path / good).read_bytes() == saved


def test_latest_checkpoint_picks_the_highest_epoch(tmp_path):
    with pytest.raises(FileNotFoundError, match="train once without --resume"):
        latest_checkpoint(tmp_path)
    for epoch in (2, 9, 10):
        torch.save({"epoch": epoch}, tmp_path / f"checkpoint_epoch={epoch}.pt")
    torch.save({}, tmp_path / "model.pt")
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint_epoch=10.pt")


def _truncate(path: Path, keep: float = 0.9) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_truncated_newest_checkpoint_is_named_and_the_previous_good_one_resumed(tmp_path, caplog):
    for epoch in (1, 2):
        torch.save({"run": {"run_id": "r"}, "epoch": torch.zeros(100)}, tmp_path / f"checkpoint_epoch={epoch}.pt")
    _truncate(tmp_path / "checkpoint_epoch=2.pt")  # e.g. a copy that stopped short
    assert latest_checkpoint(tmp_path, run_id="r") == str(tmp_path / "checkpoint_epoch=1.pt")
    assert f"resume: {tmp_path / 'checkpoint_epoch=2.pt'} cannot be read (" in caplog.text
    assert ("resume: continuing from checkpoint_epoch=1.pt, the newest readable checkpoint of this run, instead of "
            "checkpoint_epoch=2.pt; the epochs after it are trained again.") in caplog.text
    _truncate(tmp_path / "checkpoint_epoch=1.pt", keep=0.0)
    with pytest.raises(FileNotFoundError, match=r"no readable checkpoint_epoch=<N>\.pt of training run r in \S+ to "
                       r"resume from \(checkpoint_epoch=2\.pt: unreadable, \w+: .*; checkpoint_epoch=1\.pt: "
                       r"unreadable, the file is empty\); Delete the damaged files, then train once without --resume"):
        latest_checkpoint(tmp_path, run_id="r")


def test_an_unreadable_checkpoint_is_named_with_the_fix(tmp_path):
    net = torch.nn.Linear(2, 2)
    torch.save({"model": net.state_dict()}, tmp_path / "model.pt")
    _truncate(tmp_path / "model.pt")
    loader = CheckedCheckpointLoader(str(tmp_path / "model.pt"), {"model": net})
    with pytest.raises(UnreadableCheckpointError, match=rf"^{tmp_path}/model\.pt cannot be read \(\d+ bytes; \w+: "
                       r".*\): the file is truncated or damaged \(an interrupted copy or write, a full disk\), or "
                       r"not a checkpoint\. Copy it again from where it came from, train again to rewrite it "
                       r"\(configs/train\.json with --overwrite true\), or point --load_path at a good file\.$"):
        loader(Engine(lambda engine, batch: None))
    torch.save({"model": {"weight": torch.zeros(3, 3), "bias": torch.zeros(3)}}, tmp_path / "model.pt")
    with pytest.raises(RuntimeError, match="size mismatch"):  # a readable file's own error is kept
        loader(Engine(lambda engine, batch: None))
    (tmp_path / "model.pt").unlink()  # inference before any training
    with pytest.raises(FileNotFoundError, match=rf"^{tmp_path}/model\.pt does not exist: there is no trained model to "
                       r"load\. Train the bundle first \(configs/train\.json writes models/model\.pt\)"):
        loader(Engine(lambda engine, batch: None))


def test_a_full_disk_names_the_checkpoint_and_the_fix(tmp_path, monkeypatch):
    model = torch.nn.Linear(1, 1)
    trainer = Engine(lambda engine, batch: None)
    saver = AtomicCheckpointSaver(str(tmp_path), {"model": model, "trainer": trainer}, save_interval=1, n_saved=1)
    saver.attach(trainer)
    trainer.run([0], max_epochs=1)
    saved = sha256(tmp_path / "checkpoint_epoch=1.pt")

    def full(obj, handle, **kwargs):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskFullError, match=rf"^\[Errno 28\] No space left on device while writing {tmp_path}/"
                       r"checkpoint_epoch=2\.pt \(it is unchanged; nothing half-written is left\)\. Free space on "
                       rf"that disk \(the checkpoints already in {tmp_path} are kept\) and continue the run with "
                       r"--resume true, or train into a folder on another disk with --ckpt_dir <folder>\.$"):
        trainer.run([0], max_epochs=2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_epoch=1.pt"]
    assert sha256(tmp_path / "checkpoint_epoch=1.pt") == saved


def test_non_finite_entries_names_nested_tensors():
    state = {
        "model": {"w": torch.tensor([1.0, float("nan")]), "steps": torch.tensor([3]), "ok": torch.ones(2)},
        "optimizer": {"state": {0: {"exp_avg": torch.tensor([float("inf")])}}, "param_groups": [{"lr": 0.1}]},
        "epoch": 3,
    }
    assert non_finite_entries(state) == ["model/w", "optimizer/state/0/exp_avg"]
    assert non_finite_entries({"model": {"w": torch.ones(2)}}) == []


def test_atomic_saver_never_writes_a_non_finite_model(tmp_path):
    network = torch.nn.Linear(2, 1)
    engine = Engine(lambda engine, batch: None)
    resume = {"model": network, "optimizer": torch.optim.SGD(network.parameters(), lr=0.1)}
    AtomicCheckpointSaver(str(tmp_path), resume, save_interval=1, n_saved=1).attach(engine)
    AtomicCheckpointSaver(str(tmp_path), {"model": network}, save_final=True, final_filename="model.pt").attach(engine)
    engine.run([0], max_epochs=1)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_epoch=1.pt", "model.pt"]
    before = {name: sha256(tmp_path / name) for name in os.listdir(tmp_path)}
    with torch.no_grad():
        network.weight[0, 1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"refusing to write .*model\.pt: weight hold NaN/Inf") as caught:
        engine.run([0], max_epochs=2)  # the interval save fails, then the final save on the exception too
    assert "checkpoint_epoch=2.pt: model/weight hold NaN/Inf" in str(caught.value.__context__)
    assert {name: sha256(tmp_path / name) for name in os.listdir(tmp_path)} == before  # byte for byte, nothing new


class _Scripted(Metric):
    """Key metric whose value at each validation is the next of ``scores``."""

    def __init__(self, scores):
        self.scores = list(scores)
        super().__init__()

    def reset(self):
        pass

    def update(self, output):
        pass

    def compute(self):
        return self.scores.pop(0)


def _train(ckpt_dir: Path, scores, max_epochs: int, resume: bool, keep_best: bool = True) -> SupervisedEvaluator:
    """A trainer whose 'model' is its epoch number, validated each epoch with scripted scores; model.pt is the best."""
    model = torch.nn.Linear(1, 1, bias=False)
    evaluator = SupervisedEvaluator(
        device="cpu", network=torch.nn.Identity(), key_val_metric={"acc": _Scripted(scores)},
        val_data_loader=DataLoader([{"image": torch.zeros(1), "label": torch.zeros(1)}], batch_size=1),
    )
    model_saver = AtomicCheckpointSaver(str(ckpt_dir), {"model": model}, save_key_metric=True,
                                        key_metric_filename="model.pt")
    model_saver.attach(evaluator)
    trainer = Engine(lambda engine, batch: None)
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: model.weight.data.fill_(engine.state.epoch))
    ValidationHandler(1, evaluator).attach(trainer)
    checkpoint = {"trainer": trainer, "model": model}
    if keep_best:
        checkpoint["best_metric"] = BestMetricState(evaluator, model_saver)
    if resume:
        CheckpointLoader(latest_checkpoint(ckpt_dir), checkpoint).attach(trainer)
    AtomicCheckpointSaver(str(ckpt_dir), checkpoint, save_interval=1, n_saved=1).attach(trainer)
    trainer.run([0], max_epochs=max_epochs)
    return evaluator


def _best_epoch_on_disk(ckpt_dir: Path) -> float:
    return torch.load(ckpt_dir / "model.pt", weights_only=True)["weight"].item()


@pytest.mark.parametrize("keep_best", [True, False])
def test_best_model_survives_a_resume(tmp_path, keep_best):
    _train(tmp_path, [0.5, 0.8], max_epochs=2, resume=False, keep_best=keep_best)
    assert _best_epoch_on_disk(tmp_path) == 2.0
    evaluator = _train(tmp_path, [0.6], max_epochs=3, resume=True, keep_best=keep_best)  # worse than epoch 2's 0.8
    if not keep_best:  # what MONAI alone does: the first validation after a resume replaces model.pt
        assert _best_epoch_on_disk(tmp_path) == 3.0
        return
    assert _best_epoch_on_disk(tmp_path) == 2.0
    assert (evaluator.state.best_metric, evaluator.state.best_metric_epoch) == (0.8, 2)
    evaluator = _train(tmp_path, [0.9], max_epochs=4, resume=True)  # better: replaces it
    assert _best_epoch_on_disk(tmp_path) == 4.0
    assert (evaluator.state.best_metric, evaluator.state.best_metric_epoch) == (0.9, 4)


def test_a_resume_with_no_epochs_left_names_the_setting(tmp_path, caplog):
    """A checkpoint of more epochs than the run's max_epochs is refused naming --train#trainer#max_epochs (MONAI's
    error names an engine attribute); one of as many epochs trains nothing and says so."""
    model = torch.nn.Linear(1, 1)
    trainer = Engine(lambda engine, batch: None)
    saved = {"trainer": trainer, "model": model}
    AtomicCheckpointSaver(str(tmp_path), saved, save_interval=1, n_saved=1).attach(trainer)
    trainer.run([0], max_epochs=3)
    for max_epochs in (2, 3):
        trainer = Engine(lambda engine, batch: None)
        CheckedCheckpointLoader(latest_checkpoint(tmp_path), {"trainer": trainer, "model": model}).attach(trainer)
        if max_epochs == 2:
            with pytest.raises(ValueError, match=r"checkpoint_epoch=3\.pt has trained 3 epochs, more than this "
                                                 r"run's --train#trainer#max_epochs 2; .* above 3 \(nothing was "
                                                 r"changed\)\.$"):
                trainer.run([0], max_epochs=max_epochs)
        else:
            trainer.run([0], max_epochs=max_epochs)
            assert "has trained all 3 epochs of --train#trainer#max_epochs 3: nothing left to train" in caplog.text
    assert os.listdir(tmp_path) == ["checkpoint_epoch=3.pt"]


def test_a_resume_with_another_one_cycle_length_names_the_settings(tmp_path):
    """A one-cycle schedule's length is saved with it: resuming with another max_epochs would stop with torch's
    "Tried to step" error at the old schedule's end; the loader refuses it at once, naming the settings."""
    model = torch.nn.Linear(1, 1)

    def run(max_epochs: int, resume: bool) -> None:
        trainer = Engine(lambda engine, batch: (optimizer.step(), scheduler.step()))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=2 * max_epochs)
        saved = {"trainer": trainer, "lr_scheduler": scheduler}
        if resume:
            CheckedCheckpointLoader(latest_checkpoint(tmp_path), saved).attach(trainer)
        else:
            AtomicCheckpointSaver(str(tmp_path), saved, save_interval=1, n_saved=1).attach(trainer)
        trainer.run([0, 1], max_epochs=max_epochs)

    run(1, resume=False)
    with pytest.raises(ValueError, match=r"checkpoint_epoch=1\.pt holds a lr_scheduler schedule of 2 steps but this "
                       r"run's has 4 .*--train#trainer#max_epochs.*--overwrite true\.$"):
        run(2, resume=True)
