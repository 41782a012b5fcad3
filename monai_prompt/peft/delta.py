"""Save and load only what a method trained (the "delta"), tied to the method, config and backbone.

A delta is a plain dict that ``torch.load(weights_only=True)`` reads, laid out like a MONAI/ignite
checkpoint of two objects, so MONAI tools read it as-is (``CheckpointLoader``, ``ckpt_export --key_in_ckpt
model``, MONAI Label's ``ckpt.get("model")``)::

    {"model": {name: tensor for every trainable parameter (head included)},
     "peft": {"format": "monai_prompt.delta/1", "method": "lora", "config": {...},
              "backbone": {"config": {...}, "fingerprint": "<sha256 of the frozen weights>"}}}
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn

from monai_prompt.backbones.vit import backbone_key, find_vit
from monai_prompt.io import atomic_write

__all__ = [
    "DeltaMismatchError",
    "allow_delta_load",
    "backbone_fingerprint",
    "check_delta_meta",
    "delta_meta",
    "delta_state_dict",
    "load_delta",
    "load_trainable_state",
    "save_delta",
    "trainable_state",
]

DELTA_FORMAT = "monai_prompt.delta/1"


class DeltaMismatchError(ValueError):
    """A delta was made for another method, config or backbone; the message says which."""


def backbone_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the ViT architecture and its *frozen* backbone weights (what a delta depends on)."""
    vit = find_vit(model)
    digest = hashlib.sha256(json.dumps(getattr(vit, "config", {}), sort_keys=True).encode())
    keys = backbone_key(vit)
    for name, param in sorted(vit.named_parameters(), key=lambda item: item[0]):
        if keys.match(name) and not param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter of ``model`` (head included), by its ``named_parameters`` name."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def delta_meta(model: nn.Module) -> dict:
    """Method, config and backbone identity a delta of ``model`` depends on."""
    vit = find_vit(model)
    method = getattr(vit, "peft_method", None)
    if method is None:
        raise ValueError("model has no PEFT method applied (see monai_prompt.peft.apply_method).")
    return {
        "format": DELTA_FORMAT,
        "method": method,
        "config": vit.peft_config,
        "backbone": {"config": getattr(vit, "config", {}), "fingerprint": backbone_fingerprint(model)},
    }


def delta_state_dict(model: nn.Module) -> dict:
    """Everything needed to restore the trained part of ``model`` on top of the same pre-trained backbone."""
    return {"model": trainable_state(model), "peft": delta_meta(model)}


def _differences(saved: dict, current: dict) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [
        f"{k}: {saved.get(k, '<absent>')!r} in the delta vs {current.get(k, '<absent>')!r} here"
        for k in keys
        if saved.get(k) != current.get(k)
    ]


def check_delta_meta(model: nn.Module, meta: dict, source: str = "delta") -> None:
    """Raise :class:`DeltaMismatchError` naming what differs between ``meta`` and ``model``."""
    if not isinstance(meta, dict) or meta.get("format") != DELTA_FORMAT:
        raise DeltaMismatchError(f"{source}: not a monai_prompt delta (format {DELTA_FORMAT!r} expected).")
    vit = find_vit(model)
    method = getattr(vit, "peft_method", None)
    if meta["method"] != method:
        raise DeltaMismatchError(f"{source}: delta is for method {meta['method']!r}, the model uses {method!r}.")
    diff = _differences(meta["config"], vit.peft_config)
    if diff:
        raise DeltaMismatchError(f"{source}: method config differs: {'; '.join(diff)}.")
    diff = _differences(meta["backbone"]["config"], getattr(vit, "config", {}))
    if diff:
        raise DeltaMismatchError(f"{source}: backbone architecture differs: {'; '.join(diff)}.")
    if meta["backbone"]["fingerprint"] != backbone_fingerprint(model):
        raise DeltaMismatchError(
            f"{source}: the frozen backbone weights differ from those the delta was trained on; load the same "
            f"pre-trained checkpoint into the backbone before loading the delta."
        )


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "delta") -> None:
    """Copy ``state`` into exactly the trainable parameters of ``model`` (names and shapes must match)."""
    params = dict(model.named_parameters())
    wanted = {name for name, p in params.items() if p.requires_grad}
    if set(state) != wanted:
        raise DeltaMismatchError(
            f"{source}: parameter names differ; missing {sorted(wanted - set(state))[:10]}, "
            f"unexpected {sorted(set(state) - wanted)[:10]}."
        )
    bad = [f"{n}: {tuple(t.shape)} vs {tuple(params[n].shape)}" for n, t in state.items() if t.shape != params[n].shape]
    if bad:
        raise DeltaMismatchError(f"{source}: parameter shapes differ (delta vs model): {bad[:10]}.")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def _drop_frozen_missing(module: nn.Module, incompatible_keys) -> None:
    params = {name: p for name, p in module.named_parameters(remove_duplicate=False)}
    aliases: dict[int, list[str]] = {}
    for name, param in params.items():
        aliases.setdefault(id(param), []).append(name)
    missing = set(incompatible_keys.missing_keys)

    def satisfied(key: str) -> bool:
        """Frozen (from the backbone), or a shared parameter loaded under another of its names."""
        for name, param in params.items():
            if key == name or key.endswith("." + name):
                prefix = key[: len(key) - len(name)]
                return not param.requires_grad or any(prefix + a not in missing for a in aliases[id(param)])
        return False

    incompatible_keys.missing_keys[:] = [key for key in incompatible_keys.missing_keys if not satisfied(key)]


def allow_delta_load(module: nn.Module) -> None:
    """Let ``module.load_state_dict(delta["model"])`` pass ``strict=True``: missing keys that name *frozen*
    parameters (they come from the pre-trained backbone) or other names of a shared parameter that was loaded
    (DVPT's shared modules) are not errors, so MONAI tools that load strictly
    (``ckpt_export --key_in_ckpt model``, ignite ``Checkpoint.load_objects``) accept a delta. Unexpected keys,
    missing trainable keys and shape mismatches still fail."""
    module.register_load_state_dict_post_hook(_drop_frozen_missing)


def load_delta(model: nn.Module, delta: dict | str | Path) -> None:
    """Load a delta (dict or file) into ``model``, after checking method, config and backbone.

    Args:
        model: a network with the same method and config applied to the same pre-trained backbone.
        delta: the dict of :func:`delta_state_dict` or a file written by :func:`save_delta`.

    Raises:
        DeltaMismatchError: method, config, backbone architecture/weights or parameter names/shapes differ.
    """
    source = str(delta) if isinstance(delta, (str, Path)) else "delta"
    if isinstance(delta, (str, Path)):
        delta = torch.load(delta, map_location="cpu", weights_only=True)
    if not isinstance(delta, dict) or "peft" not in delta or "model" not in delta:
        raise DeltaMismatchError(f"{source}: not a monai_prompt delta (keys 'model' and 'peft' expected).")
    check_delta_meta(model, delta["peft"], source)
    load_trainable_state(model, delta["model"], source)


def save_delta(model: nn.Module, path: str | Path) -> Path:
    """Write :func:`delta_state_dict` atomically (temp file + rename): a crash never leaves half a file."""
    return atomic_write(path, lambda tmp: torch.save(delta_state_dict(model), tmp))
