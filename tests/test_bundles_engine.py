"""The engine glue the bundles use: metrics, delta checkpoint objects, atomic saving, handlers, helpers."""

from __future__ import annotations

import itertools
import os
import resource
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from bundle_support import TINY_BACKBONE
from ignite.engine import Engine

from monai_prompt.engine import (
    AtomicCheckpointSaver,
    PeakMemoryHandler,
    PeftMeta,
    QuadraticWeightedKappa,
    TrainableReportHandler,
    TrainableState,
    class_decisions,
    latest_checkpoint,
    macro_f1,
    quadratic_weighted_kappa,
    unique_run_name,
)
from monai_prompt.nets import PromptClassifier
from monai_prompt.peft import DeltaMismatchError
from monai_prompt.peft.delta import IDENTITY_KEYS
from monai_prompt.runs import (
    bundle_root,
    check_task,
)


def tiny_net(method: str = "vpt", **config) -> PromptClassifier:
    torch.manual_seed(0)
    return PromptClassifier(3, method, config or None, "vit_tiny", img_size=32, backbone_overrides=TINY_BACKBONE)


def kappa_reference(truth: list[int], pred: list[int], classes: int) -> float:
    """Quadratic-weighted kappa by its definition: double sums over class pairs."""
    n = len(truth)
    pairs = list(zip(truth, pred))
    observed = [[pairs.count((i, j)) for j in range(classes)] for i in range(classes)]
    rows = [sum(observed[i]) for i in range(classes)]
    cols = [sum(observed[i][j] for i in range(classes)) for j in range(classes)]
    num = den = 0.0
    for i, j in itertools.product(range(classes), repeat=2):
        weight = (i - j) ** 2 / (classes - 1) ** 2
        num += weight * observed[i][j]
        den += weight * rows[i] * cols[j] / n
    return 1.0 - num / den


def test_quadratic_weighted_kappa_matches_its_definition_and_the_ignite_metric():
    generator = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 5, (60,), generator=generator)
    probs = torch.softmax(torch.randn(60, 5, generator=generator) + 3 * torch.nn.functional.one_hot(truth, 5), 1)
    pred = probs.argmax(1)
    expected = kappa_reference(truth.tolist(), pred.tolist(), 5)
    confusion = torch.zeros(5, 5)
    for t, p in zip(truth, pred):
        confusion[t, p] += 1
    assert quadratic_weighted_kappa(confusion) == pytest.approx(expected, abs=1e-12)
    metric = QuadraticWeightedKappa(num_classes=5)
    for start in range(0, 60, 16):  # batches accumulate into one confusion matrix
        metric.update((probs[start : start + 16], truth[start : start + 16]))
    assert metric.compute() == pytest.approx(expected, abs=1e-12)
    assert quadratic_weighted_kappa(torch.eye(4) * 7) == 1.0
    sklearn = pytest.importorskip("sklearn.metrics")
    assert expected == pytest.approx(sklearn.cohen_kappa_score(truth, pred, weights="quadratic"), abs=1e-12)


def test_class_decisions_and_macro_f1():
    output = [
        {"pred": torch.tensor([0.7, 0.2, 0.1]), "label": torch.tensor([1.0, 0.0, 0.0])},
        {"pred": torch.tensor([0.1, 0.3, 0.6]), "label": torch.tensor([0.0, 1.0, 0.0])},
        {"pred": torch.tensor([0.2, 0.5, 0.3]), "label": torch.tensor([0.0, 1.0, 0.0])},
    ]
    probs, index = class_decisions()(output)
    assert probs.shape == (3, 3) and index.tolist() == [0, 1, 1]
    hard, multi_hot = class_decisions(multi_label=True, threshold=0.4)(output)
    assert hard.tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 0]]
    assert multi_hot.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 0]]

    engine = Engine(lambda engine, batch: output)
    macro_f1(output_transform=class_decisions()).attach(engine, "f1")
    engine.run([0], max_epochs=1)
    # predictions 0, 2, 1 vs truth 0, 1, 1: class 0 F1 1, class 1 F1 2/3 (P 1, R 1/2), class 2 F1 0
    assert engine.state.metrics["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_delta_objects_round_trip_and_refuse_other_configs():
    net = tiny_net("vpt", num_tokens=2)
    state, meta = TrainableState(net).state_dict(), PeftMeta(net).state_dict()
    assert set(state) == {"backbone.prompter.prompts", "head.weight", "head.bias", *IDENTITY_KEYS}
    assert meta["method"] == "vpt"
    other = tiny_net("vpt", num_tokens=2)
    with torch.no_grad():
        other.head.weight.zero_()
    PeftMeta(other).load_state_dict(meta)
    TrainableState(other).load_state_dict(state)
    assert torch.equal(other.head.weight, net.head.weight)
    with pytest.raises(DeltaMismatchError, match="ckpt.pt: method config differs: num_tokens: 2 in the delta vs 3"):
        PeftMeta(tiny_net("vpt", num_tokens=3), source="ckpt.pt").load_state_dict(meta)
    ddp_like = torch.nn.DataParallel(net)  # unwrapped like DistributedDataParallel
    assert set(TrainableState(ddp_like).state_dict()) == set(state)


def test_prompt_classifier_loads_a_delta_strictly_but_not_a_wrong_one():
    net = tiny_net("lora", rank=2)
    delta = TrainableState(net).state_dict()
    params = [key for key in delta if key not in IDENTITY_KEYS]
    assert not any("lora" in key for key in params) or all(net.get_parameter(k).requires_grad for k in params)
    fresh = tiny_net("lora", rank=2)
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
        (tmp_path / f"checkpoint_epoch={epoch}.pt").write_bytes(b"")
    (tmp_path / "model.pt").write_bytes(b"")
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint_epoch=10.pt")


def test_check_task_names_the_fix():
    datalist = SimpleNamespace(classes=["a", "b"], multi_label=False)
    check_task(datalist, 2, False)
    with pytest.raises(ValueError, match=r"num_classes=3; run with --num_classes 2"):
        check_task(datalist, 3, False)
    with pytest.raises(ValueError, match="run with --multi_label False"):
        check_task(datalist, 2, True)


def test_bundle_root_from_the_repository_or_inside_the_bundle(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bundle_root("x_classification") == "."
    (tmp_path / "bundles" / "x_classification" / "configs").mkdir(parents=True)
    assert bundle_root("x_classification") == os.path.join("bundles", "x_classification")
    monkeypatch.chdir(tmp_path / "bundles" / "x_classification")
    (tmp_path / "bundles" / "x_classification" / "configs" / "metadata.json").write_text("{}")
    assert bundle_root("x_classification") == "."


def test_report_and_peak_memory_handlers(capsys):
    net = tiny_net("linear")
    resident = []  # resident pages during each iteration (Linux /proc/self/statm)
    engine = Engine(lambda engine, batch: resident.append(int(Path("/proc/self/statm").read_text().split()[1])))
    TrainableReportHandler(net).attach(engine)
    PeakMemoryHandler("cpu").attach(engine)
    engine.run([0, 1], max_epochs=2)
    assert "trainable = " in capsys.readouterr().out and engine.state.trainable_report["trainable"] == 32 * 3 + 3
    # in MiB, between the resident set seen while running and the kernel's max RSS (KiB) of this process (1 MiB
    # slack: the kernel updates its peak counters lazily)
    seen_mib = max(resident) * os.sysconf("SC_PAGE_SIZE") / 2**20
    max_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    assert seen_mib - 1 <= engine.state.metrics["peak_rss_mb"] <= max_rss_mib + 1


def test_unique_run_names():
    names = {unique_run_name("vpt_classification_train") for _ in range(50)}
    assert len(names) == 50 and all(name.startswith("vpt_classification_train_2") for name in names)
