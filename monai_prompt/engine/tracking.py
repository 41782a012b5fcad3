"""MLflow additions for ``--tracking mlflow``: unique run names, PEFT parameters and the delta as an artifact.

``python -m monai.bundle run ... --tracking mlflow`` appends MONAI's ``MLFlowHandler`` to the engine's handlers
(``monai.bundle.utils.DEFAULT_MLFLOW_SETTINGS``). That handler logs ``max_epochs``, per-epoch metrics and the
executed config. :class:`MLflowPeftLogger`, placed in the same handler list, hands it more to log: the method,
its config, trainable/total parameter counts (as run parameters) and files such as the delta checkpoint (as
artifacts). Without ``--tracking`` there is no ``MLFlowHandler`` and it does nothing.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import uuid
from collections.abc import Sequence

import torch.nn as nn
from ignite.engine import Engine, Events
from monai.handlers import MLFlowHandler

from monai_prompt.backbones.vit import find_vit
from monai_prompt.engine.checkpoint import unwrap
from monai_prompt.peft.report import trainable_report

__all__ = ["MLflowPeftLogger", "find_mlflow_handlers", "peft_params", "unique_run_name"]


def unique_run_name(prefix: str) -> str:
    """``<prefix>_<YYYYmmdd_HHMMSS>_<6 hex>``: MONAI's ``MLFlowHandler`` appends to the newest unfinished run of the
    same name, so every workflow needs a name of its own (a crashed run would otherwise swallow the next one)."""
    return f"{prefix}_{datetime.datetime.now():%Y%m%d_%H%M%S}_{uuid.uuid4().hex[:6]}"


def peft_params(network: nn.Module) -> dict[str, str]:
    """Run parameters describing a tuned network: method, its config, backbone and parameter counts."""
    model = unwrap(network)
    report = trainable_report(model)
    vit = find_vit(model)
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


def find_mlflow_handlers(engine: Engine) -> list[MLFlowHandler]:
    """The ``MLFlowHandler`` instances attached to ``engine`` (ignite has no public listing of handlers)."""
    found: list[MLFlowHandler] = []
    for handlers in engine._event_handlers.values():
        for handler, _, _ in handlers:
            owner = getattr(handler, "__self__", None)
            if isinstance(owner, MLFlowHandler) and owner not in found:
                found.append(owner)
    return found


class MLflowPeftLogger:
    """Add PEFT parameters and artifact files to the ``MLFlowHandler`` that ``--tracking mlflow`` attaches.

    When the engine starts (before the MLflow run is opened) it sets the handler's ``experiment_param`` to
    :func:`peft_params`; when the engine completes (before the run is closed) it adds those of ``artifacts`` that
    exist to the handler's artifacts. Place it in the same handler list, before the tracking handler is appended.

    Args:
        network: the (possibly DDP-wrapped) network.
        artifacts: files or folders to log when the engine completes (e.g. ``models/model.pt``).
        extra_params: more run parameters (e.g. the pre-trained weight path).
    """

    def __init__(
        self, network: nn.Module, artifacts: Sequence[str] = (), extra_params: dict[str, object] | None = None
    ) -> None:
        self.network = network
        self.artifacts = [str(a) for a in artifacts]
        self.extra_params = {k: str(v) for k, v in (extra_params or {}).items()}
        self.logger = logging.getLogger("monai_prompt")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def started(self, engine: Engine) -> None:
        handlers = find_mlflow_handlers(engine)
        if handlers:
            params = {**peft_params(self.network), **self.extra_params}
            for handler in handlers:
                handler.experiment_param = {**(handler.experiment_param or {}), **params}

    def completed(self, engine: Engine) -> None:
        handlers = find_mlflow_handlers(engine)
        if not handlers:
            return
        existing = [path for path in self.artifacts if os.path.exists(path)]
        for path in sorted(set(self.artifacts) - set(existing)):
            self.logger.warning(f"MLflow artifact {path} does not exist; not logged.")
        for handler in handlers:
            handler.artifacts = (*[a for a in handler.artifacts if a], *existing)
