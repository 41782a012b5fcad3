"""A CNN from scratch beside the UNETR rows: MONAI's ``BasicUNet`` trained as a segmentation bundle trains its
UNETR, so that each PEFT row reads against the network a user would otherwise train.

The bundle's ``train.json`` is parsed with its network swapped for a ``BasicUNet`` (MONAI's default features
32, 32, 64, 128, 256, 32): the same datalist, deterministic and random transforms (ROI crops, flips, intensity),
loss (DiceCE), optimiser (AdamW), cosine schedule, epochs, sliding-window validation and metrics. The bundle's
PEFT bookkeeping (delta checkpoints, training record, run folder) is not used: the best validation epoch's
weights are kept in memory and evaluated on the test split with the validation's own inferer, post-processing
and metrics.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["BASIC_UNET", "train_basic_unet"]

#: the network a user would train instead: MONAI's BasicUNet at its default features.
BASIC_UNET = {"_target_": "BasicUNet", "spatial_dims": "@spatial_dims", "in_channels": "@in_channels",
              "out_channels": "@num_classes"}


def _strip_val(metrics: Mapping[str, float]) -> dict[str, float]:
    """Validation metric names as the bundles' evaluation writes them (``val_mean_dice`` -> ``mean_dice``)."""
    return {name.removeprefix("val_"): float(value) for name, value in metrics.items()}


def train_basic_unet(
    bundle: str | os.PathLike, overrides: Mapping[str, Any], epochs: int, val_interval: int = 1,
) -> dict[str, Any]:
    """Train a ``BasicUNet`` with ``bundle``'s recipe and evaluate its best validation epoch on the test split.

    Args:
        bundle: a segmentation bundle folder (its ``train.json`` gives the recipe).
        overrides: config overrides, as for the bundle (data, ROI, batch size, learning rate, seed).
        epochs: training epochs.
        val_interval: validate every that many epochs (the best validation is kept).

    Returns:
        ``{"metrics": test metrics, "trainable": parameters, "best_epoch": ...}``.
    """
    from ignite.engine import Events
    from monai.bundle import ConfigParser
    from monai.data import DataLoader, Dataset
    from monai.engines import SupervisedEvaluator, SupervisedTrainer
    from monai.handlers import LrScheduleHandler, ValidationHandler
    from monai.utils import set_determinism

    parser = ConfigParser()
    parser.read_config(str(Path(bundle) / "configs" / "train.json"))
    parser.update({**overrides, "network_def": BASIC_UNET, "train#trainer#max_epochs": epochs})
    set_determinism(seed=parser.get_parsed_content("seed"))
    device, amp = parser.get_parsed_content("device"), bool(parser.get_parsed_content("amp"))
    network = parser.get_parsed_content("network")
    optimizer = parser.get_parsed_content("optimizer")

    def evaluator(split: str) -> SupervisedEvaluator:
        items = parser.get_parsed_content("datalist")[split]
        data = Dataset(items, parser.get_parsed_content("validate#preprocessing", lazy=False))
        metrics = parser.get_parsed_content("validate#additional_metrics", lazy=False)
        return SupervisedEvaluator(
            device, DataLoader(data, batch_size=1, num_workers=0), network,
            inferer=parser.get_parsed_content("validate#inferer", lazy=False),
            postprocessing=parser.get_parsed_content("validate#postprocessing", lazy=False),
            key_val_metric=parser.get_parsed_content("validate#key_metric", lazy=False),
            additional_metrics=metrics, amp=amp,
        )

    validation, best = evaluator("validation"), {}

    @validation.on(Events.EPOCH_COMPLETED)
    def keep_best(engine) -> None:
        if engine.state.best_metric_epoch == engine.state.epoch:
            best["state"] = copy.deepcopy(network.state_dict())
            best["epoch"] = trainer.state.epoch

    trainer = SupervisedTrainer(
        device, epochs, parser.get_parsed_content("train#dataloader"), network, optimizer,
        parser.get_parsed_content("loss"), inferer=parser.get_parsed_content("train#inferer"), amp=amp,
        train_handlers=[LrScheduleHandler(parser.get_parsed_content("lr_scheduler"), print_lr=False),
                        ValidationHandler(val_interval, validation, exec_at_start=False)],
    )
    if epochs % val_interval:  # the last epoch is validated too, as the bundles do
        trainer.add_event_handler(Events.COMPLETED, lambda _: validation.run(trainer.state.epoch))
    trainer.run()
    network.load_state_dict(best["state"])
    test = evaluator("test")
    test.run()
    trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)
    return {"metrics": _strip_val(test.state.metrics), "trainable": trainable, "best_epoch": best["epoch"]}
