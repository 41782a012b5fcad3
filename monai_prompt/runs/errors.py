"""The real error as the last thing ``python -m monai.bundle run`` prints.

MONAI wraps every exception raised while it evaluates a config expression, instantiates a component or applies
a transform in a ``RuntimeError`` of its own (``Failed to evaluate ConfigExpression: "$..."``, ``Failed to
instantiate component ...``, ``applying transform ...``), so a bundle's data or setup error ends with that
generic line while the message naming the file and the fix sits screens above. :func:`show_cause_last`, the
first step of a bundle's ``initialize``, installs a ``sys.excepthook`` that prints the usual traceback and then
the innermost error of such a chain, after the config text it came from.

Under ``torchrun`` the hook also writes the root cause to the worker's error file, so that torchrun's failure
summary, the last thing it prints, shows it instead of "To enable traceback see ...".

Steps that must undo something when a run fails (a previous run set aside by ``--overwrite true`` is put back)
register with :func:`on_error`; the hook runs them before it prints, so the error stays the last thing shown.

``SIGTERM`` stops a run as Ctrl-C does (:class:`StoppedBySignal`), and the process then ends as one killed by it
(status 143 in a shell, not Python's 1 for an uncaught exception), after the interpreter's exit steps.

Python callers are unaffected: exceptions keep their types (``DataCheckError``, ``ValueError``, ...), and only an
uncaught exception wrapped by MONAI changes what is printed.
"""

from __future__ import annotations

import ast
import atexit
import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from traceback import format_exception_only
from types import TracebackType

__all__ = ["StoppedBySignal", "format_root_cause", "on_error", "root_cause", "show_cause_last"]

#: how MONAI's wrapping ``RuntimeError``s begin (config_item.py, utils/module.py, transforms/transform.py).
MONAI_WRAPPERS = ("Failed to evaluate ", "Failed to instantiate ", "applying transform ")
#: how MONAI's ``ReferenceResolver`` rewrites ``@id`` inside an expression before evaluating it.
_LOCAL_REF = re.compile(r"__local_refs\[['\"]([^'\"]*)['\"]\]")


def root_cause(error: BaseException) -> tuple[BaseException, str | None]:
    """The innermost error below MONAI's wrapping ``RuntimeError``s, and the message of the last wrapper (the
    config text or component closest to it; None when ``error`` is not wrapped)."""
    wrapper = None
    while isinstance(error, RuntimeError) and str(error).startswith(MONAI_WRAPPERS) and error.__cause__ is not None:
        wrapper, error = str(error), error.__cause__
    return error, wrapper


def format_root_cause(error: BaseException) -> str | None:
    """``Root cause (<MONAI wrapper>):`` and ``<type>: <message>`` of a MONAI-wrapped error (None if not wrapped)."""
    cause, wrapper = root_cause(error)
    if wrapper is None:
        return None
    lines = [line.strip() for line in wrapper.splitlines() if not line.strip().startswith("set '_mode_")]
    context = " ".join(lines)
    head, separator, expression = context.partition("ConfigExpression: ")
    if separator:  # MONAI pretty-prints the expression's string, a long one as ("..." "..."): show it as written
        with contextlib.suppress(ValueError, SyntaxError):
            context = f'{head}{separator}"{ast.literal_eval(expression)}"'
    # the config text as written (MONAI's resolver separates ids with "::", a config with "#")
    context = _LOCAL_REF.sub(lambda ref: "@" + ref.group(1).replace("::", "#"), context)
    return f"Root cause ({context}):\n{type(cause).__name__}: {cause}"


_previous_hook = sys.excepthook
#: what :func:`on_error` registered, run once by the hook before it prints.
_ON_ERROR: list[Callable[[], object]] = []


def on_error(callback: Callable[[], object]) -> None:
    """Run ``callback`` when an uncaught error reaches :func:`show_cause_last`'s hook, before the hook prints it (so
    that what the callback logs comes before the error, which stays last). It runs once; an error it raises is
    printed and the others still run.

    Args:
        callback: takes no argument.
    """
    _ON_ERROR.append(callback)


def _excepthook(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
    while _ON_ERROR:
        callback = _ON_ERROR.pop(0)
        try:
            callback()
        except Exception as failure:  # noqa: BLE001 - the run's own error matters more
            print(f"{type(failure).__name__} while handling the error below: {failure}", file=sys.stderr)
    _previous_hook(kind, error, traceback)
    summary = format_root_cause(error)
    if summary is not None:
        print(f"\n{summary}", file=sys.stderr)
    if isinstance(error, StoppedBySignal):  # torchrun stops the other ranks when one fails: not a root cause
        _end_as_killed(error.signum)
    else:
        _record_for_torchrun(error, summary)


def _record_for_torchrun(error: BaseException, summary: str | None) -> None:
    """Under ``torchrun``, write the error where its failure summary (printed last) reads it: the worker's
    ``TORCHELASTIC_ERROR_FILE``, in torch elastic's error-file format, with the root cause instead of the traceback
    (each rank's traceback is already above)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    message = "".join(format_exception_only(type(error), error)).strip()
    data = {"message": {"message": message,
                        "extraInfo": {"py_callstack": summary or message, "timestamp": str(int(time.time()))}}}
    with contextlib.suppress(OSError):
        Path(path).write_text(json.dumps(data))


class StoppedBySignal(KeyboardInterrupt):
    """A run stopped by ``SIGTERM`` (a job scheduler, ``kill``, ``torchrun``), raised as Ctrl-C's exception is.

    Args:
        signum: the signal's number.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signal.Signals(signum).name}")
        self.signum = signum


def _terminated(signum: int, frame: object) -> None:
    raise StoppedBySignal(signum)


def _end_as_killed(signum: int) -> None:
    """End the process as signal ``signum`` ends it by default (a shell's status ``128 + signum``; a parent's
    ``waitpid`` sees the signal), as Python itself ends after an uncaught ``KeyboardInterrupt`` (never reached for a
    subclass, which would exit with status 1): the ``atexit`` steps run first (MLflow runs ended ``KILLED``, the run
    folder's lock released, ...), then the streams are flushed.

    Args:
        signum: the signal that stopped the run.
    """
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken stream: the status matters more
            stream.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # the same status, should the signal not end the process at once (another thread's)


def show_cause_last() -> None:
    """Install (once) the ``sys.excepthook`` that repeats the root error of a MONAI-wrapped exception last, and
    make ``SIGTERM`` (what a job scheduler, ``kill`` or ``torchrun`` sends) stop the run as Ctrl-C does, so that
    what :func:`on_error` registered runs and an MLflow run ends ``KILLED`` instead of staying ``RUNNING`` (only where
    ``SIGTERM`` still has Python's default action, in the main thread).

    Put ``"$monai_prompt.runs.show_cause_last()"`` first in a bundle's ``initialize`` list.
    """
    global _previous_hook
    if sys.excepthook is not _excepthook:
        _previous_hook = sys.excepthook
        sys.excepthook = _excepthook
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminated)
