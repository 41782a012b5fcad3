"""The root error printed last, below MONAI's wrapping errors: ``monai_prompt.runs.errors``."""

from __future__ import annotations

from monai_prompt.data import DataCheckError
from monai_prompt.runs import format_root_cause


def test_format_root_cause_unwraps_monai_s_runtime_errors():
    try:
        try:
            try:
                raise DataCheckError(["/data/a.png: file not found."], "/data/datalist.json")
            except DataCheckError as err:
                wrapped = ("Failed to evaluate ConfigExpression: \n"
                           "\"$check(__local_refs['datalist_file'], __local_refs['flags::check_pixels'])\"")
                raise RuntimeError(wrapped) from err
        except RuntimeError as err:
            raise RuntimeError('Failed to evaluate ConfigExpression: \n"$run(@x)"') from err
    except RuntimeError as err:
        summary = format_root_cause(err)
    assert summary.splitlines() == [
        'Root cause (Failed to evaluate ConfigExpression: "$check(@datalist_file, @flags#check_pixels)"):',
        "DataCheckError: 1 problem(s) in /data/datalist.json:",
        "  - /data/a.png: file not found.",
    ]
    assert format_root_cause(ValueError("plain")) is None
    assert format_root_cause(RuntimeError("Failed to evaluate x")) is None  # nothing wrapped
