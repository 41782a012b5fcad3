"""Fixtures the bundle tests share (the helpers behind them are in ``bundle_support``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from bundle_support import write_tiny_backbone, write_tiny_dataset
from monai_prompt.bundle_gen.metadata import schema_file


def pytest_configure(config: pytest.Config) -> None:
    """In ``make test``'s worker processes (pytest-xdist) the CPU cores are shared: each worker's torch, and the
    subprocesses its tests start (``OMP_NUM_THREADS``, unless set already), take its share of them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Written once per session and only read by the tests: ``data`` (the folder of :func:`write_tiny_dataset`'s
    ``datalist.json``), ``backbone`` (:func:`write_tiny_backbone`'s file) and ``schema`` (MONAI's bundle metadata
    schema, shipped in the package so that ``verify_metadata`` downloads nothing)."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        "data": write_tiny_dataset(root / "data").parent,
        "backbone": write_tiny_backbone(root / "vit_tiny.pt"),
        "schema": schema_file(),
    }
