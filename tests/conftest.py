"""Fixtures the bundle tests share (the helpers behind them are in ``bundle_support``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bundle_support import write_tiny_backbone, write_tiny_dataset
from monai_prompt.bundle_gen.metadata import schema_file


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
