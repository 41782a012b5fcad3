"""The last line of a training or an evaluation run, after ignite's ``Engine run finished``: what it reached and
where its files are (rank 0 only), as ``inference: wrote ...`` ends an inference (:mod:`.predictions`)."""

from __future__ import annotations

import logging
import os

from ignite.engine import Engine

from monai_prompt.engine.eta import is_main_process

__all__ = ["report_evaluation", "report_training"]


def report_training(trainer: Engine, validator: Engine, best_model: str | os.PathLike, name: str = "monai_prompt"
                    ) -> None:
    """Log ``training: best val_accuracy 0.8533 at epoch 4 of 6; best model /abs/models/model.pt`` on rank 0:
    the validator's best key metric (restored on a resume) and the file the key-metric saver wrote it to.

    Args:
        trainer: the finished trainer (its ``epoch`` and ``max_epochs``).
        validator: its validation evaluator (``state.key_metric_name``, ``best_metric``, ``best_metric_epoch``).
        best_model: the best model's file.
        name: logger name.
    """
    if not is_main_process():
        return
    state, path = validator.state, os.path.abspath(best_model)
    if state.best_metric_epoch < 0 or not os.path.isfile(path):
        message = f"training: {trainer.state.epoch} epoch(s); no validation chose a model, so {path} was not written"
    else:
        message = (f"training: best {state.key_metric_name} {state.best_metric:.4f} at epoch "
                   f"{state.best_metric_epoch} of {trainer.state.max_epochs}; best model {path}")
    logging.getLogger(name).info(message)


def report_evaluation(evaluator: Engine, split: str, metrics_file: str | os.PathLike, name: str = "monai_prompt"
                      ) -> None:
    """Log ``evaluation: accuracy 0.8178 on the 225 images of split 'test'; metrics in /abs/eval/metrics.csv`` on
    rank 0.

    Args:
        evaluator: the finished evaluator (its key metric and data).
        split: the datalist split it evaluated.
        metrics_file: the metrics file its handlers wrote.
        name: logger name.
    """
    if not is_main_process():
        return
    state = evaluator.state
    images = len(state.dataloader.dataset)
    logging.getLogger(name).info(
        f"evaluation: {state.key_metric_name} {state.metrics[state.key_metric_name]:.4f} on the {images} image"
        f"{'' if images == 1 else 's'} of split '{split}'; metrics in {os.path.abspath(metrics_file)}")
