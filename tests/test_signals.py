"""The warnings that a model learned nothing useful (``monai_prompt.engine.metrics.signals``): a segmentation model
collapsed to background, images predicted as background only, classes never predicted, classes predicted only
where they are not; each logged when it starts and once when it clears, on rank 0 only, summed over DDP processes,
with advice whose settings are the bundles' config ids; and what a segmentation bundle's evaluation logs."""

from __future__ import annotations

import json
import logging
import re
import shutil

import ignite.distributed as idist
import pytest
import torch
from ignite.engine import Engine

from bundle_support import REPO
from monai_prompt.bundle_gen.specs import SEGMENTATION_SPECS
from monai_prompt.engine import SegmentationCollapseHandler
from monai_prompt.engine.metrics.classification import TRIVIAL_ADVICE
from monai_prompt.engine.metrics.signals import MISPLACED_ADVICE, SEGMENTATION_ADVICE
from monai_prompt.runs.runner import run_bundle
from segmentation_support import tiny_segmentation_overrides, write_tiny_encoder, write_tiny_segmentation

CLASSES = ["background", "csf", "gray_matter"]
#: three 4 x 4 label maps: csf in the first two (4 and 2 voxels), gray matter in the second (8 voxels), the third
#: background only
LABELS = torch.zeros(3, 4, 4, dtype=torch.long)
LABELS[0, 0] = 1
LABELS[1, 0, :2], LABELS[1, 2:] = 1, 2
#: :data:`LABELS` with gray matter predicted only where it is not: on the background row of the second image (whose
#: gray matter is predicted as background) and on the third image
MISPLACED = torch.where(LABELS == 2, 0, LABELS)
MISPLACED[1, 1], MISPLACED[2, 3] = 2, 2


def _one_hot(masks: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(masks, len(CLASSES)).movedim(-1, 1).float()


def _evaluate(epochs: list[torch.Tensor], one_hot: bool = True) -> None:
    """An evaluator whose epoch ``e`` predicts ``epochs[e - 1]`` (class indices ``[3, 4, 4]``) for :data:`LABELS`,
    one image per iteration, as one-hot ``[C, 4, 4]`` masks (``one_hot``) or class indices ``[1, 4, 4]``."""
    form = _one_hot if one_hot else (lambda masks: masks[:, None])

    def step(engine: Engine, index: int) -> list[dict[str, torch.Tensor]]:
        prediction = form(epochs[engine.state.epoch - 1])[index]
        return [{"pred": prediction, "label": form(LABELS)[index]}]

    engine = Engine(step)
    SegmentationCollapseHandler(CLASSES).attach(engine)
    engine.run(range(len(LABELS)), max_epochs=len(epochs))


def _ours(caplog) -> list[logging.LogRecord]:
    """The records of the package's loggers (not ignite's engine lines, should the root logger be at INFO)."""
    return [record for record in caplog.records if record.name.startswith("monai_prompt")]


def _messages(caplog) -> list[tuple[str, str]]:
    """Level and message of each record, less the advice it ends with (:data:`MISPLACED_ADVICE` as ``<misplaced>``)."""
    return [(r.levelname, r.getMessage().removesuffix(" " + SEGMENTATION_ADVICE).replace(MISPLACED_ADVICE,
                                                                                           "<misplaced>"))
            for r in _ours(caplog)]


def test_a_model_collapsed_to_background_is_named_once_and_its_recovery_too(caplog):
    background = torch.zeros_like(LABELS)
    with caplog.at_level(logging.INFO, logger="monai_prompt"):
        _evaluate([background, background, LABELS])
    assert _messages(caplog) == [
        ("WARNING", "epoch 1: every prediction is background, although the ground truth of 2 image(s) holds "
                    "foreground: the model has collapsed to background (Dice 0 for every class)."),
        ("INFO", "epoch 3: the predictions hold foreground again."),
    ]
    assert _ours(caplog)[0].getMessage().endswith(SEGMENTATION_ADVICE)


def test_classes_never_predicted_and_images_predicted_as_background_only(caplog):
    csf_only = torch.where(LABELS == 2, 0, LABELS)  # gray matter never predicted
    first_missed = csf_only.clone()
    first_missed[0] = 0  # the first image (csf) predicted as background only
    with caplog.at_level(logging.INFO, logger="monai_prompt"):
        for one_hot in (True, False):  # one-hot or class-index masks
            _evaluate([csf_only, first_missed, LABELS], one_hot=one_hot)
    expected = [
        ("WARNING", "epoch 1: class(es) 'gray_matter' (in 1 image(s), 50 % of their voxels) of the ground truth are "
                    "never predicted: their Dice is 0."),
        ("WARNING", "epoch 2: 1 of 2 image(s) whose ground truth holds foreground got a prediction of background "
                    "only."),
        ("INFO", "epoch 3: every image whose ground truth holds foreground has a foreground prediction again."),
        ("INFO", "epoch 3: every class of the ground truth is predicted again."),
    ]
    assert _messages(caplog) == expected * 2


def test_classes_predicted_only_where_they_are_not_are_named(caplog):
    """Gray matter predicted, but never on a voxel of its own (its Dice 0, its HD95 finite): named with the images
    that have it and that get it, until a prediction overlaps it; one that overlaps in part is no such class."""
    overlapping = LABELS.clone()
    overlapping[1, 1:3] = 2  # gray matter on a background row and on half its own
    with caplog.at_level(logging.INFO, logger="monai_prompt"):
        for one_hot in (True, False):
            _evaluate([MISPLACED, MISPLACED, overlapping], one_hot=one_hot)
    expected = [
        ("WARNING", "epoch 1: class(es) 'gray_matter' (in 1 image(s), predicted in 2) of the ground truth are "
                    "predicted only where the ground truth does not have them: their Dice is 0 although they are "
                    "predicted. <misplaced>"),
        ("INFO", "epoch 3: no class is predicted only where the ground truth does not have it any more."),
    ]
    assert _messages(caplog) == expected * 2
    assert "two classes swapped?" in MISPLACED_ADVICE and "check-data" in MISPLACED_ADVICE


def test_a_collapse_stands_for_the_other_warnings_without_saying_they_cleared(caplog):
    """Missed classes, then a collapse to background: no line says every class is predicted again; after the
    collapse the classes still missed are named again."""
    csf_only = torch.where(LABELS == 2, 0, LABELS)
    with caplog.at_level(logging.INFO, logger="monai_prompt"):
        _evaluate([csf_only, torch.zeros_like(LABELS), csf_only])
    assert [(level, message[:40]) for level, message in _messages(caplog)] == [
        ("WARNING", "epoch 1: class(es) 'gray_matter' (in 1 i"),
        ("WARNING", "epoch 2: every prediction is background,"),
        ("INFO", "epoch 3: the predictions hold foreground"),
        ("WARNING", "epoch 3: class(es) 'gray_matter' (in 1 i"),
    ]


def test_a_perfect_model_gets_no_line_and_other_ranks_none(caplog, monkeypatch):
    with caplog.at_level(logging.INFO, logger="monai_prompt"):
        _evaluate([LABELS])
        monkeypatch.setattr(idist, "get_rank", lambda: 1)
        _evaluate([torch.zeros_like(LABELS)])
    assert not _ours(caplog)


def test_the_advice_names_settings_the_bundles_have():
    """Every ``--id`` of the advice is a config id of the bundles it is given for (the crop sampling's is
    ``RandCropByPosNegLabeld``), so that it works as an override."""

    def ids(node, prefix=""):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        return {name for key, value in items for name in (f"{prefix}{key}", *ids(value, f"{prefix}{key}#"))}

    for bundle, advice in (("dvpt_segmentation", SEGMENTATION_ADVICE), ("dvpt_3d_segmentation", SEGMENTATION_ADVICE),
                           ("dvpt_classification", TRIVIAL_ADVICE)):
        config = json.loads((REPO / "bundles" / bundle / "configs" / "train.json").read_text())
        flags = re.findall(r"--([\w#]+)", advice)
        assert flags and set(flags) <= ids(config), (bundle, set(flags) - ids(config))
        if "segmentation" in bundle:  # and validation and evaluation have the handler
            assert config["train"]["random_transforms"][1]["_target_"] == "RandCropByPosNegLabeld"
            evaluate = json.loads((REPO / "bundles" / bundle / "configs" / "evaluate.json").read_text())
            for handlers in (config["validate"]["handlers"], evaluate["handlers"]):
                assert {"_target_": "monai_prompt.engine.SegmentationCollapseHandler",
                        "class_names": "@class_names"} in handlers


def _ranks_see_half(local_rank: int, log_file: str) -> None:
    """Rank 0 validates images 0 and 2, rank 1 image 1. Epoch 1: gray matter (image 1) is never predicted, csf only
    by rank 0, so only the sums over both ranks tell the classes apart. Epoch 2: gray matter is predicted on image
    2 only (:data:`MISPLACED`), so rank 0 alone sees no ground truth of it, and rank 1 alone no prediction."""
    logger = logging.getLogger("monai_prompt.ddp_test")
    logger.addHandler(logging.FileHandler(f"{log_file}.{local_rank}"))
    logger.setLevel(logging.INFO)
    second_image = torch.arange(len(LABELS))[:, None, None] == 1
    epochs = [torch.where(LABELS == 2, 0, LABELS), torch.where(second_image & (MISPLACED == 2), 0, MISPLACED)]
    images = [0, 2] if local_rank == 0 else [1]
    engine = Engine(lambda e, i: [{"pred": _one_hot(epochs[e.state.epoch - 1])[i], "label": _one_hot(LABELS)[i]}])
    SegmentationCollapseHandler(CLASSES, name="monai_prompt.ddp_test").attach(engine)
    engine.run(images, max_epochs=2)


@pytest.mark.slow
def test_the_counts_of_every_rank_add_up_under_ddp(tmp_path):
    """Two gloo processes (about 20 s)."""
    log_file = str(tmp_path / "log")
    with idist.Parallel(backend="gloo", nproc_per_node=2) as parallel:
        parallel.run(_ranks_see_half, log_file)
    assert (tmp_path / "log.1").read_text() == ""  # rank 1 logs nothing
    assert (tmp_path / "log.0").read_text().splitlines() == [
        "epoch 1: class(es) 'gray_matter' (in 1 image(s), 50 % of their voxels) of the ground truth are never "
        "predicted: their Dice is 0. " + SEGMENTATION_ADVICE,
        "epoch 2: every class of the ground truth is predicted again.",
        "epoch 2: class(es) 'gray_matter' (in 1 image(s), predicted in 1) of the ground truth are predicted only "
        f"where the ground truth does not have them: their Dice is 0 although they are predicted. {MISPLACED_ADVICE} "
        + SEGMENTATION_ADVICE,
    ]


@pytest.mark.slow
def test_a_segmentation_bundle_whose_model_predicts_only_background_says_so(tmp_path, capfd):
    """The linear 2D bundle trained one epoch, its output layer then set to answer background everywhere: the
    evaluation's log says the model collapsed (about 10 s)."""
    spec = SEGMENTATION_SPECS["linear_segmentation"]
    bundle = tmp_path / "bundles" / spec.name
    shutil.copytree(REPO / "bundles" / spec.name, bundle)
    overrides = tiny_segmentation_overrides(spec, write_tiny_segmentation(tmp_path / "data", 2),
                                            write_tiny_encoder(tmp_path / "vit.pt", 2))
    run_bundle(bundle, ["train.json"], "train", quiet=True, **overrides, **{"train#trainer#max_epochs": 1})
    delta = torch.load(bundle / "models" / "model.pt", weights_only=True)
    delta["model"]["out.conv.conv.weight"].zero_()
    delta["model"]["out.conv.conv.bias"].copy_(torch.tensor([10.0, -10.0, -10.0, -10.0]))
    torch.save(delta, bundle / "models" / "model.pt")
    capfd.readouterr()
    run_bundle(bundle, ["train.json", "evaluate.json"], "infer", quiet=True, **overrides)
    logged = capfd.readouterr()  # the bundle's logging.conf writes the monai_prompt logger to the console
    lines = (logged.out + logged.err).splitlines()
    assert [line.split(" - ", 3)[-1] for line in lines if " - monai_prompt - " in line] == [
        "epoch 1: every prediction is background, although the ground truth of 2 image(s) holds foreground: the "
        "model has collapsed to background (Dice 0 for every class). " + SEGMENTATION_ADVICE
    ]
