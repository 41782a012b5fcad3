"""MLflow additions for ``--tracking mlflow``: unique run names, PEFT parameters and the delta as an artifact.

``python -m monai.bundle run ... --tracking mlflow`` appends MONAI's ``MLFlowHandler`` to the engine's handlers
(``monai.bundle.utils.DEFAULT_MLFLOW_SETTINGS``). That handler logs ``max_epochs`` and ``epoch_length``, per-epoch
metrics and the executed config. :class:`MLflowPeftLogger`, placed in the same handler list, hands it more to log:
the method, its config, trainable/total parameter counts and the bundle's settings (as run parameters, readable in
MLflow's UI: :func:`param_value`, :func:`capped_params`) and files such as the delta checkpoint (as artifacts); an
evaluation or inference run logs no ``max_epochs``/``epoch_length`` (training's schedule), a training run the number
of processes (``world_size``) and the batch size they make together. A training run records its MLflow run id beside
its checkpoints (:data:`TRAINING_RUN_FILE`); an evaluation or inference of such a checkpoint logs it as
``training_run_id``. Without ``--tracking`` there is no ``MLFlowHandler`` and it does nothing (but remove the run id
a previous training run recorded in the folder).

Tracking never holds training up: before the run, :func:`check_tracking_uri` fails within seconds when the
tracking server is unreachable (naming the URI and the fix), MLflow's HTTP retries are cut to a few seconds, and
a server that goes away mid-run costs one warning, after which the run's MLflow handlers are skipped. A workflow
that ends with an uncaught error ends its open MLflow runs ``FAILED`` (``KILLED`` after Ctrl-C) at exit, where
MONAI's handler would leave them ``RUNNING``.

Importing the module silences the two lines MLflow logs when it first creates a SQLite store, such as the bundles'
default ``eval/mlruns.db``, which would stand among the run's own; every other MLflow message shows as before.
"""

from __future__ import annotations

import atexit
import datetime
import functools
import json
import logging
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import ignite.distributed as idist
from ignite.engine import Engine, Events
from monai.engines import Evaluator
from monai.handlers import MLFlowHandler, ValidationHandler
from torch import nn

from monai_prompt.backbones.registry import find_backbone
from monai_prompt.engine.checkpoint import unwrap
from monai_prompt.io import atomic_write
from monai_prompt.peft.report import trainable_report

__all__ = [
    "LONG_PARAMS_ARTIFACT",
    "MLFLOW_HTTP_LIMITS",
    "MLFLOW_PARAM_LIMIT",
    "MLflowPeftLogger",
    "TRAINING_RUN_FILE",
    "capped_params",
    "check_tracking_uri",
    "find_mlflow_handlers",
    "param_value",
    "peft_params",
    "recorded_training_run",
    "unique_run_name",
    "without_login",
]

#: MLflow's HTTP settings while we run training (MLflow's defaults: 7 retries with backoff, 120 s timeout, so a
#: dead server blocks each logging call for minutes); an environment variable the user set wins.
MLFLOW_HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}

#: the longest run parameter value MLflow stores (``mlflow.utils.validation.MAX_PARAM_VAL_LENGTH``): it cuts a longer
#: one without a mark, or refuses the run's parameters with ``MLFLOW_TRUNCATE_LONG_VALUES=false``.
MLFLOW_PARAM_LIMIT = 6000
#: the artifact holding the full values of the parameters :func:`capped_params` cut.
LONG_PARAMS_ARTIFACT = "long_params.json"
#: the file in a training run's checkpoint folder that names the run's MLflow run (``run_id``, ``run_name``,
#: ``experiment_id``, ``tracking_uri`` without its login); absent when the run that trained the folder's checkpoints
#: was not tracked.
TRAINING_RUN_FILE = "mlflow_run.json"

logger = logging.getLogger("monai_prompt")

#: what MLflow logs (INFO, ``mlflow.store.db.utils``) when it creates the tables of a new SQLite store.
_STORE_CREATED = ("Creating initial MLflow database tables...", "Updating database tables")

logging.getLogger("mlflow.store.db.utils").addFilter(lambda record: record.getMessage() not in _STORE_CREATED)


def unique_run_name(prefix: str) -> str:
    """``<prefix>_<YYYYmmdd_HHMMSS>_<6 hex>``: MONAI's ``MLFlowHandler`` appends to the newest unfinished run of the
    same name, so every workflow needs a name of its own (a crashed run would otherwise swallow the next one)."""
    return f"{prefix}_{datetime.datetime.now():%Y%m%d_%H%M%S}_{uuid.uuid4().hex[:6]}"


def peft_params(network: nn.Module) -> dict[str, str]:
    """Run parameters describing a tuned network: method, its config, backbone and parameter counts."""
    model = unwrap(network)
    report = trainable_report(model)
    vit = find_backbone(model)
    vit_config = getattr(vit, "config", {})
    params = {
        "peft_method": str(report["method"]),
        "peft_config": json.dumps(getattr(vit, "peft_config", {}), sort_keys=True),
        "trainable_params": str(report["trainable"]),
        "total_params": str(report["total"]),
        "backbone_params": str(report["backbone"]),
        "trainable_percent_of_backbone": f"{report['percent_of_backbone']:.4f}",
    }
    if vit_config:
        params["backbone_config"] = json.dumps(vit_config, sort_keys=True)
    return params


def _plain(value: object) -> object:
    """A value JSON cannot write as itself: NumPy values and tensors as lists or numbers, anything else as ``str``."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def param_value(value: object) -> str:
    """``value`` as a run parameter: lists, tuples, dicts and arrays as compact JSON (``["csf","gray_matter"]``,
    ``[1.5,1.5,2.0]``), anything else as ``str`` (``None``, ``0.001``, a path)."""
    value = value.tolist() if hasattr(value, "tolist") else value
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, separators=(",", ":"), default=_plain)
    return str(value)


def capped_params(params: Mapping[str, object]) -> tuple[dict[str, str], dict[str, object]]:
    """``params`` as run parameters (:func:`param_value`) that MLflow accepts: a value longer than
    :data:`MLFLOW_PARAM_LIMIT` is cut, ending in a marker that gives its length and names the artifact
    :data:`LONG_PARAMS_ARTIFACT`, where the full value is.

    Args:
        params: parameter name -> value.

    Returns:
        The parameters to log, and the full values of those that were cut.
    """
    logged, long = {}, {}
    for key, value in params.items():
        text = param_value(value)
        if len(text) > MLFLOW_PARAM_LIMIT:
            marker = f"...[cut: {len(text)} characters, the full value is in the artifact {LONG_PARAMS_ARTIFACT}]"
            text, long[key] = text[: MLFLOW_PARAM_LIMIT - len(marker)] + marker, value
        logged[key] = text
    return logged, long


def recorded_training_run(checkpoint: str | os.PathLike) -> str | None:
    """The MLflow run id of the training run that wrote ``checkpoint``, as that run recorded it beside it
    (:data:`TRAINING_RUN_FILE`); ``None`` when none is recorded (a checkpoint from elsewhere, an untracked run) or
    the record is unreadable (with a warning).

    Args:
        checkpoint: a checkpoint file (``models/model.pt``).
    """
    record = Path(checkpoint).parent / TRAINING_RUN_FILE
    if not record.is_file():
        return None
    try:
        return str(json.loads(record.read_text())["run_id"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning(f"{record} names no MLflow run ({type(err).__name__}: {err}); training_run_id not logged.")
        return None


def _attached(engine: Engine, kind: type) -> list:
    """The handler objects of type ``kind`` whose methods are attached to ``engine`` (ignite has no public
    listing of handlers)."""
    found: list = []
    for handlers in engine._event_handlers.values():
        for handler, _, _ in handlers:
            bound = getattr(handler, "__wrapped__", handler)  # also behind _tolerate_failures' wrapper
            owner = getattr(bound, "__self__", None)
            if isinstance(owner, kind) and owner not in found:
                found.append(owner)
    return found


def find_mlflow_handlers(engine: Engine) -> list[MLFlowHandler]:
    """The ``MLFlowHandler`` instances attached to ``engine``."""
    return _attached(engine, MLFlowHandler)


def without_login(uri: str) -> str:
    """``uri`` without the ``user:password@`` of its address (MLflow accepts one in an ``http(s)://`` URI), for what
    is shown or written: ``http://alice:secret@host:5000`` -> ``http://host:5000``; other URIs are unchanged.

    Args:
        uri: the tracking URI.
    """
    parsed = urllib.parse.urlsplit(uri)
    if "@" not in parsed.netloc:
        return uri
    return urllib.parse.urlunsplit(parsed._replace(netloc=parsed.netloc.rpartition("@")[2]))


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast when an ``http(s)://`` MLflow tracking server does not answer (other URIs, e.g. SQLite, pass).

    Asks the server's ``/health`` endpoint, without the login a URI may hold (:func:`without_login`); any answer
    below 500 counts as reachable (also 401/403/404: a server is there, MLflow reports what it wants).

    Args:
        uri: the tracking URI.
        timeout: seconds to wait for an answer.

    Raises:
        ConnectionError: naming the URI, the reason and the fix.
    """
    parsed, address = urllib.parse.urlparse(uri), without_login(uri)
    if parsed.scheme not in ("http", "https"):
        return
    try:
        with urllib.request.urlopen(f"{address.rstrip('/')}/health", timeout=timeout):
            return
    except urllib.error.HTTPError as err:
        if err.code < 500:
            return
        reason = f"HTTP {err.code} {err.reason}"
    except (OSError, ValueError) as err:  # URLError, refused connection, timeout, bad port
        reason = str(getattr(err, "reason", err))
    raise ConnectionError(
        f"MLflow tracking server {address} is unreachable ({reason}). Start it (e.g. mlflow server --host "
        f"{parsed.hostname} --port {parsed.port or (443 if parsed.scheme == 'https' else 80)}), pass a reachable "
        f"--tracking_uri (or MLFLOW_TRACKING_URI), or run without --tracking mlflow."
    )


def _tracking_uri(handler: MLFlowHandler) -> str:
    """The URI ``handler``'s client talks to."""
    import mlflow

    return str(getattr(handler.client, "tracking_uri", None) or mlflow.get_tracking_uri())


def _tolerate_failures(engine: Engine, handlers: Sequence[MLFlowHandler], failed: list[str]) -> None:
    """Wrap the callbacks of ``handlers`` on ``engine`` so that the first failing one logs a warning and marks
    ``failed``; from then on every wrapped callback is skipped (the tracking server is gone, each call would wait
    for it)."""

    def tolerant(callback: Callable) -> Callable:
        @functools.wraps(callback)
        def call(*args, **kwargs):
            if failed:
                return None
            try:
                return callback(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - any tracking failure: warn once, keep training
                failed.append(f"{type(err).__name__}: {err}")
                logger.warning(
                    f"MLflow tracking failed ({failed[0]}); training continues without tracking from here "
                    f"(epoch {engine.state.epoch}). Check the tracking server and --tracking_uri."
                )
                return None

        call.tolerant = True
        return call

    for entries in engine._event_handlers.values():
        for index, (callback, args, kwargs) in enumerate(entries):
            if getattr(callback, "__self__", None) in handlers and not getattr(callback, "tolerant", False):
                entries[index] = (tolerant(callback), args, kwargs)


def _end_open_runs(handlers: Sequence[MLFlowHandler], failed: list[str]) -> None:
    """At exit after an uncaught error, end the MLflow runs the workflow left open (MONAI's handler ends its run
    only when its engine completes): ``KILLED`` after Ctrl-C, else ``FAILED``; nothing after a clean run or when
    the tracking server has gone (``failed``).

    Args:
        handlers: the workflow's ``MLFlowHandler``s.
        failed: the tracking failures of the run so far.
    """
    error = getattr(sys, "last_type", None)  # set by the interpreter for the error that ended the program
    if error is None or failed:
        return
    status = "KILLED" if issubclass(error, KeyboardInterrupt) else "FAILED"
    for handler in handlers:
        if handler.cur_run is not None:
            handler.run_finish_status = status
            handler.close()


def _write_long_params(values: Mapping[str, object]) -> str:
    """``values`` as :data:`LONG_PARAMS_ARTIFACT` in a temporary folder removed at exit; its path."""
    folder = tempfile.mkdtemp(prefix="monai_prompt_mlflow_")
    atexit.register(shutil.rmtree, folder, True)
    path = os.path.join(folder, LONG_PARAMS_ARTIFACT)
    with open(path, "w") as file:
        json.dump(values, file, indent=1, default=_plain)
    return path


class MLflowPeftLogger:
    """Add PEFT parameters and artifact files to the ``MLFlowHandler`` that ``--tracking mlflow`` attaches, and
    keep tracking from stopping or stalling training.

    When the engine starts (before the MLflow run is opened) it checks every tracking server the run logs to
    (:func:`check_tracking_uri`, also those of the validator behind a ``ValidationHandler``), sets
    :data:`MLFLOW_HTTP_LIMITS`, makes the MLflow handlers of the engine and its validators skip themselves after
    a first failure (one warning), and sets the handler's ``experiment_param`` to :func:`peft_params` and
    ``extra_params`` (through :func:`capped_params`; the full values of those it cuts go to the artifact
    :data:`LONG_PARAMS_ARTIFACT`). On a trainer it adds ``world_size`` (``torchrun``'s processes) and, with a
    ``batch_size`` in ``extra_params``, ``effective_batch_size`` (``batch_size`` x ``world_size``: the images of
    one optimiser step); on an evaluator it adds ``training_run_id`` (:func:`recorded_training_run` of
    ``checkpoint``, when recorded) and stops the handler from logging the engine's ``max_epochs`` and
    ``epoch_length``, training's schedule. With ``run_folder`` (training) it removes the folder's
    :data:`TRAINING_RUN_FILE` when the engine starts (on rank 0: this run's checkpoints replace those it names)
    and writes this run's, atomically, once the MLflow run is open (the first epoch's start). When the engine
    completes (before the run is closed) it adds those of ``artifacts`` that exist to the handler's artifacts.
    Place it in the same handler list, before the tracking handler is appended.

    Args:
        network: the (possibly DDP-wrapped) network.
        artifacts: files or folders to log when the engine completes (e.g. ``models/model.pt``).
        extra_params: more run parameters (e.g. the pre-trained weight path, the class names).
        run_folder: a training run's checkpoint folder, where it records its MLflow run.
        checkpoint: the checkpoint an evaluation or inference loads, whose training run it logs.
    """

    def __init__(
        self,
        network: nn.Module,
        artifacts: Sequence[str] = (),
        extra_params: dict[str, object] | None = None,
        run_folder: str | os.PathLike | None = None,
        checkpoint: str | os.PathLike | None = None,
    ) -> None:
        self.network = network
        self.artifacts = [str(a) for a in artifacts]
        self.extra_params = dict(extra_params or {})
        self.run_folder = run_folder
        self.checkpoint = checkpoint
        self.long_params_file: str | None = None
        self.run_to_record: MLFlowHandler | None = None
        self.logger = logger

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_STARTED, self.record_run)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def started(self, engine: Engine) -> None:
        if self.run_folder is not None and idist.get_rank() == 0:
            Path(self.run_folder, TRAINING_RUN_FILE).unlink(missing_ok=True)
        engines = [engine, *(v.validator for v in _attached(engine, ValidationHandler) if v.validator is not None)]
        tracked = {e: find_mlflow_handlers(e) for e in engines}
        tracked = {e: handlers for e, handlers in tracked.items() if handlers}
        if not tracked:
            return
        for uri in sorted({_tracking_uri(h) for handlers in tracked.values() for h in handlers}):
            check_tracking_uri(uri)
        for name, value in MLFLOW_HTTP_LIMITS.items():
            os.environ.setdefault(name, value)
        failed: list[str] = []  # shared: one dead server stops all of this run's handlers
        for tracked_engine, handlers in tracked.items():
            _tolerate_failures(tracked_engine, handlers, failed)
        atexit.register(_end_open_runs, [h for handlers in tracked.values() for h in handlers], failed)
        params, long = capped_params({**peft_params(self.network), **self.extra_params, **self._run_params(engine)})
        self.long_params_file = _write_long_params(long) if long else None
        for handler in tracked.get(engine, []):
            handler.experiment_param = {**(handler.experiment_param or {}), **params}
            if isinstance(engine, Evaluator):
                handler.default_tracking_params = []
        if self.run_folder is not None:
            self.run_to_record = next(iter(tracked.get(engine, [])), None)

    def _run_params(self, engine: Engine) -> dict[str, object]:
        """A trainer's ``world_size`` and ``effective_batch_size``; an evaluator's ``training_run_id``."""
        if isinstance(engine, Evaluator):
            run = recorded_training_run(self.checkpoint) if self.checkpoint is not None else None
            return {} if run is None else {"training_run_id": run}
        world_size = idist.get_world_size()
        batch_size = self.extra_params.get("batch_size")
        effective = {"effective_batch_size": batch_size * world_size} if isinstance(batch_size, int) else {}
        return {"world_size": world_size, **effective}

    def record_run(self, engine: Engine) -> None:
        """Write the MLflow run the handler opened at the start to ``run_folder``'s :data:`TRAINING_RUN_FILE`
        (once)."""
        handler, self.run_to_record = self.run_to_record, None
        if handler is None or handler.cur_run is None:
            return
        info = handler.cur_run.info
        text = json.dumps({"run_id": info.run_id, "run_name": info.run_name, "experiment_id": info.experiment_id,
                           "tracking_uri": without_login(_tracking_uri(handler))}, indent=1) + "\n"
        atomic_write(Path(self.run_folder, TRAINING_RUN_FILE), lambda tmp: Path(tmp).write_text(text))

    def completed(self, engine: Engine) -> None:
        handlers = find_mlflow_handlers(engine)
        if not handlers:
            return
        existing = [path for path in self.artifacts if os.path.exists(path)]
        existing += [self.long_params_file] if self.long_params_file else []
        for path in sorted(set(self.artifacts) - set(existing)):
            self.logger.warning(f"MLflow artifact {path} does not exist; not logged.")
        for handler in handlers:
            handler.artifacts = (*[a for a in handler.artifacts if a], *existing)
