"""Run a bundle's workflow in-process, as ``python -m monai.bundle run`` does (demo, benchmarks, tests)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigWorkflow

__all__ = ["run_bundle"]


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
