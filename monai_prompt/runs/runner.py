"""Run a bundle's workflow in-process, as ``python -m monai.bundle run`` does (demos, benchmarks, tests), and read
what its evaluation wrote."""

from __future__ import annotations

import csv
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigWorkflow

__all__ = ["read_metrics", "run_bundle", "train_and_evaluate"]


def run_bundle(
    bundle: str | os.PathLike,
    files: Sequence[str],
    workflow_type: str = "train",
    tracking: str | None = None,
    quiet: bool = False,
    attach: Callable[[ConfigWorkflow], None] | None = None,
    **overrides: Any,
) -> ConfigWorkflow:
    """Run ``configs/<files>`` of ``bundle`` through MONAI's ``ConfigWorkflow``, after checking the workflow's
    required properties (as the model-zoo CI does); returns the finished workflow.

    Args:
        bundle: the bundle folder (also ``bundle_root`` unless ``overrides`` set it).
        files: config files under ``configs/``, merged in order, e.g. ``["train.json", "evaluate.json"]``.
        workflow_type: ``"train"`` or ``"infer"``: which MONAI property set to check.
        tracking: ``"mlflow"`` to add MONAI's MLflow handlers (as ``--tracking mlflow``).
        quiet: show only warnings and errors of the bundle's logs.
        attach: called with the initialised workflow before it runs (e.g. to attach progress handlers).
        overrides: config overrides, as on the bundle command line.

    Raises:
        ValueError: the workflow lacks properties MONAI requires for ``workflow_type``.
    """
    bundle = Path(bundle)
    if quiet:
        logging.disable(logging.INFO)
    try:
        workflow = ConfigWorkflow(
            config_file=[str(bundle / "configs" / name) for name in files],
            workflow_type=workflow_type,
            tracking=tracking,
            **{"bundle_root": str(bundle), **overrides},
        )
        workflow.initialize()
        missing = workflow.check_properties()
        if missing:
            raise ValueError(f"{bundle}: {workflow_type} workflow lacks required properties {missing}.")
        if attach is not None:
            attach(workflow)
        workflow.run()
        workflow.finalize()
    finally:
        if quiet:
            logging.disable(logging.NOTSET)
    return workflow


def train_and_evaluate(
    bundle: str | os.PathLike, out_dir: str | os.PathLike, overrides: Mapping[str, Any], epochs: int,
    verbose: bool = False, attach: Callable[[ConfigWorkflow], None] | None = None,
) -> tuple[ConfigWorkflow, dict[str, float]]:
    """Train a classification or segmentation bundle into ``out_dir`` (its ``bundle_root``, emptied first), then
    evaluate the best delta on the test split (``train.json`` + ``evaluate.json``): both tasks' bundles have the
    same two workflows and write their test metrics to ``eval/metrics.csv``.

    Args:
        bundle: the bundle folder.
        out_dir: where checkpoints, metrics and (FPT) the feature cache go.
        overrides: config overrides for both runs.
        epochs: ``train#trainer#max_epochs``.
        verbose: show the bundle's own logs (else warnings and errors only).
        attach: ``attach`` hook of the training run (e.g. :func:`~monai_prompt.runs.progress.attach_progress`).

    Returns:
        the finished training workflow and the test metrics (:func:`read_metrics` of ``eval/metrics.csv``).
    """
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    overrides = {**overrides, "bundle_root": str(out_dir)}
    train = run_bundle(bundle, ["train.json"], quiet=not verbose, attach=attach, **overrides,
                       **{"train#trainer#max_epochs": epochs})
    run_bundle(bundle, ["train.json", "evaluate.json"], "infer", quiet=not verbose, **overrides)
    return train, read_metrics(out_dir / "eval" / "metrics.csv")


def read_metrics(path: str | os.PathLike) -> dict[str, float]:
    """The ``name,value`` rows of an evaluation's ``metrics.csv`` (MONAI's ``MetricsSaver``), as numbers.

    Args:
        path: the ``metrics.csv`` file.
    """
    with open(path) as f:
        return {name: float(value) for name, value in csv.reader(f)}
