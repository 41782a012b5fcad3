"""The optimiser step fused into the backward pass: each parameter is updated, and its gradient freed, as soon as
backward has accumulated it, so a training step never holds every gradient at once (up to the gradients' size
less at the peak: full fine-tuning of a ViT-B/16 with checkpointing and bf16, 1,004 -> 738 MiB). The recipe of
PyTorch's tutorial "How to save memory by fusing the optimizer step into the backward pass"
(``Tensor.register_post_accumulate_grad_hook``), made a ``torch.optim.Optimizer`` so that MONAI's trainer, the LR
schedulers and the resumable checkpoints take it like any other.

What it cannot do, because no step ever sees all gradients: gradient clipping by the global norm, gradient
accumulation over iterations, a ``GradScaler`` (fp16 AMP: use bf16 autocast, which needs no scaling) and
``DistributedDataParallel`` (a hook would step on the local gradient before the processes average it).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["OptimizerInBackward", "in_backward"]

#: the group entries that are not hyperparameters.
_GROUP_PARAMS = ("params", "param_names")


def _hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in group.items() if key not in _GROUP_PARAMS}


class OptimizerInBackward(Optimizer):
    """``optimizer_class`` stepped parameter by parameter inside backward; :meth:`step` itself does nothing.

    Each parameter has an ``optimizer_class`` of its own over that parameter alone, which shares this optimiser's
    ``state`` and, at every step, takes its group's current hyperparameters (so a scheduler's learning rate
    applies). ``state_dict``/``load_state_dict`` are those of ``optimizer_class`` over the same groups: a
    checkpoint loads into either.

    Args:
        params: parameters or parameter groups, as for any optimiser.
        optimizer_class: the optimiser applied to each parameter, e.g. ``torch.optim.AdamW``.
        defaults: its arguments besides the parameters (``lr``, ``weight_decay``, ...).

    Raises:
        RuntimeError: under ``torch.distributed`` with more than one process.
    """

    def __init__(self, params: Iterable[Any], optimizer_class: type[Optimizer], **defaults: Any) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise RuntimeError(
                "the optimiser step in backward (step_in_backward) updates each parameter from this process's "
                "gradient before DistributedDataParallel averages it: run it in one process, or set "
                "--step_in_backward false for a multi-process (torchrun) run.")
        self.optimizer_class = optimizer_class
        self._per_parameter: dict[torch.Tensor, Optimizer] = {}
        # every argument of optimizer_class, its defaults filled in (read from an instance over a placeholder), so
        # that the groups, and the state_dict, are those optimizer_class itself keeps
        placeholder = torch.zeros(1, requires_grad=True)
        super().__init__(params, optimizer_class([placeholder], **defaults).defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (as :meth:`torch.optim.Optimizer.add_param_group`) and hook each of its parameters."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for param in (p for p in group["params"] if p.requires_grad):  # a frozen one never has a gradient
            optimizer = self.optimizer_class([{**_hyperparameters(group), "params": [param]}])
            optimizer.state = self.state
            self._per_parameter[param] = optimizer
            param.register_post_accumulate_grad_hook(self._step_parameter)
        self._map_groups()

    def _map_groups(self) -> None:
        self._group_of = {param: group for group in self.param_groups for param in group["params"]}

    def _step_parameter(self, param: torch.Tensor) -> None:
        optimizer = self._per_parameter[param]
        optimizer.param_groups[0].update(_hyperparameters(self._group_of[param]))
        optimizer.step()
        param.grad = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as ``optimizer_class`` does, then point every parameter's optimiser at the loaded state and
        groups."""
        super().load_state_dict(state_dict)
        for optimizer in self._per_parameter.values():
            optimizer.state = self.state
        self._map_groups()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Nothing to update (backward did it); runs ``closure`` when given, as optimisers do."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()


def in_backward(optimizer: Optimizer) -> OptimizerInBackward:
    """``optimizer``'s class, groups and arguments, stepped in backward instead (:class:`OptimizerInBackward`).

    Args:
        optimizer: a freshly built optimiser (no state yet); it is not used afterwards.

    Raises:
        ValueError: when ``optimizer`` has already stepped.
    """
    if optimizer.state:
        raise ValueError(f"{type(optimizer).__name__} has already stepped; wrap it in in_backward() before training.")
    # the groups hold every hyperparameter; the defaults (for groups added later) are the constructor's arguments
    arguments = inspect.signature(type(optimizer)).parameters
    return OptimizerInBackward([dict(group) for group in optimizer.param_groups], type(optimizer),
                               **{key: value for key, value in optimizer.defaults.items() if key in arguments})
