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


def test_sigterm_stops_a_run_as_ctrl_c_does(monkeypatch, tmp_path, capsys):
    """A job scheduler's or torchrun's SIGTERM raises Ctrl-C's exception (so MLflow runs end KILLED and what
    on_error registered runs), is no root cause for torchrun's summary (it stops the ranks that did not fail), and
    ends the process as one killed by SIGTERM (a shell's 143; Python would exit with 1)."""
    import os
    import signal
    import subprocess

    from monai_prompt.runs import errors

    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    ended: list[int] = []
    monkeypatch.setattr(errors, "_end_as_killed", ended.append)  # not this test process
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        show_cause_last()
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # else the signal would end this process
        calls: list[str] = []
        on_error(lambda: calls.append("put back"))
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 1)  # the handler raises here at the latest
        except KeyboardInterrupt as err:
            assert str(err) == "stopped by signal SIGTERM"
            sys.excepthook(type(err), err, err.__traceback__)
        assert calls == ["put back"] and not (tmp_path / "error.json").exists()
        assert ended == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
    capsys.readouterr()

    # the real end, in a process of its own: the atexit steps run (MLflow runs ended KILLED, the lock released),
    # then the signal ends it (errors.py needs only the standard library: loaded alone, it starts in a blink)
    script = f"""
import atexit, importlib.util, os, signal, sys
spec = importlib.util.spec_from_file_location("errors", {errors.__file__!r})
errors = importlib.util.module_from_spec(spec)
spec.loader.exec_module(errors)
errors.show_cause_last()
atexit.register(print, "atexit ran")
os.kill(os.getpid(), signal.SIGTERM)
signal.sigtimedwait([], 10)
"""
    result = subprocess.run(["bash", "-c", f'"{sys.executable}" -c "$0"; echo "status $?"', script],
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.splitlines() == ["atexit ran", "status 143"], result
    assert "StoppedBySignal: stopped by signal SIGTERM" in result.stderr  # bash then says "Terminated"
