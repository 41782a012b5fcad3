"""The root error printed last, below MONAI's wrapping errors, and what must happen before it is printed:
``monai_prompt.runs.errors``."""

from __future__ import annotations

import sys

from monai_prompt.data import DataCheckError
from monai_prompt.runs import format_root_cause, on_error, show_cause_last


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


def test_what_on_error_registered_runs_before_the_error_is_printed(monkeypatch, capsys):
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    show_cause_last()
    calls: list[str] = []
    on_error(lambda: print("previous run put back", file=sys.stderr) or calls.append("put back"))
    on_error(lambda: 1 / 0)  # a failing callback does not hide the error
    try:
        raise RuntimeError('Failed to evaluate ConfigExpression: "$run()"') from ValueError("the cause")
    except RuntimeError as err:
        sys.excepthook(type(err), err, err.__traceback__)
    sys.excepthook(ValueError, ValueError("again"), None)  # each callback runs once
    lines = capsys.readouterr().err.rstrip().splitlines()
    assert calls == ["put back"] and lines[0] == "previous run put back"
    assert lines[1] == "ZeroDivisionError while handling the error below: division by zero"
    assert lines[-3:] == ['Root cause (Failed to evaluate ConfigExpression: "$run()"):', "ValueError: the cause",
                          "ValueError: again"]


def test_under_torchrun_the_error_file_holds_the_root_cause(monkeypatch, tmp_path, capsys):
    """torchrun's failure summary shows a worker's error file (its ``py_callstack``) in place of "To enable traceback
    see ...": the hook writes the root cause there, in torch elastic's format, and the message of an unwrapped error."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    show_cause_last()
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    try:
        raise RuntimeError('Failed to evaluate ConfigExpression: "$run()"') from ValueError("the cause")
    except RuntimeError as err:
        sys.excepthook(type(err), err, err.__traceback__)
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=1, error_file=str(error_file))  # what torchrun reads
    assert failure.message["extraInfo"]["py_callstack"] == (
        'Root cause (Failed to evaluate ConfigExpression: "$run()"):\nValueError: the cause')
    sys.excepthook(ValueError, ValueError("plain"), None)
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=1, error_file=str(error_file))
    assert failure.message["extraInfo"]["py_callstack"] == "ValueError: plain"
    capsys.readouterr()
