"""Save and load only what a method trained (the "delta"), tied to the method, config and backbone.

A delta is a plain dict that ``torch.load(weights_only=True)`` reads, laid out like a MONAI/ignite
checkpoint of two objects, so MONAI tools read it as-is (``CheckpointLoader``, ``ckpt_export --key_in_ckpt
model``, MONAI Label's ``ckpt.get("model")``)::

    {"model": {name: tensor for every trainable parameter (head included),
               "peft_backbone_fingerprint": <the sha256 below, 32 uint8>, "peft_backbone_source": <path, uint8>},
     "peft": {"format": "monai_prompt.delta/1", "method": "lora", "config": {...},
              "backbone": {"config": {...}, "fingerprint": "<sha256 of the frozen weights>", "source": "<path>"}}}

The backbone's identity travels inside the ``model`` entry too, so that a loader that reads only that entry
(MONAI Label: ``network.load_state_dict(ckpt["model"], strict=False)``) cannot apply the delta to another backbone:
networks that call :func:`allow_delta_load` check it in a ``load_state_dict`` pre-hook.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from monai_prompt.backbones.registry import find_backbone
from monai_prompt.backbones.vit import backbone_key
from monai_prompt.io import atomic_write

__all__ = [
    "FINGERPRINT_KEY",
    "IDENTITY_KEYS",
    "SOURCE_KEY",
    "DeltaMismatchError",
    "UnreadableCheckpointError",
    "allow_delta_load",
    "backbone_fingerprint",
    "backbone_identity",
    "backbone_source",
    "check_backbone_identity",
    "check_delta_meta",
    "delta_meta",
    "delta_model_state",
    "delta_state_dict",
    "identity_state",
    "load_delta",
    "load_trainable_state",
    "read_checkpoint",
    "save_delta",
    "trainable_state",
]

DELTA_FORMAT = "monai_prompt.delta/1"
#: key of the frozen backbone's fingerprint (:func:`backbone_fingerprint`, 32 bytes as uint8) in a delta's ``model``
#: entry.
FINGERPRINT_KEY = "peft_backbone_fingerprint"
#: key of the weights the backbone was loaded from (UTF-8 bytes as uint8; empty: none) in a delta's ``model`` entry.
SOURCE_KEY = "peft_backbone_source"
#: the keys of a delta's ``model`` entry that are not trainable parameters.
IDENTITY_KEYS = (FINGERPRINT_KEY, SOURCE_KEY)
#: what to do about an unreadable delta or checkpoint, unless the caller knows better.
REWRITE_FIX = "copy it again from where it came from, or train again to rewrite it"


class UnreadableCheckpointError(OSError):
    """A checkpoint or delta file that ``torch.load`` cannot read (truncated, damaged, not a checkpoint).

    Args:
        path: the file.
        reason: what ``torch.load`` raised, in short.
        fix: what the user can do.
    """

    def __init__(self, path: str | os.PathLike, reason: str, fix: str = REWRITE_FIX) -> None:
        self.path, self.reason = str(path), reason
        size = os.path.getsize(path) if os.path.isfile(path) else 0
        super().__init__(
            f"{path} cannot be read ({size} bytes; {reason}): the file is truncated or damaged (an interrupted copy "
            f"or write, a full disk), or not a checkpoint. {fix[0].upper()}{fix[1:]}."
        )


def read_checkpoint(
    path: str | os.PathLike, map_location: Any = "cpu", fix: str = REWRITE_FIX, mmap: bool = False
) -> Any:
    """``torch.load(path, weights_only=True)``, a file it cannot read reported with its path, size and ``fix``.

    A truncated file (an interrupted copy, a full disk) makes ``torch.load`` fail with a bare ``RuntimeError``
    from its zip reader or ``OSError: [Errno 22] Invalid argument``, naming no file.

    Args:
        path: the checkpoint (``models/model.pt``, ``checkpoint_epoch=<N>.pt``).
        map_location: as ``torch.load``'s.
        fix: what the user can do, completing the message.
        mmap: as ``torch.load``'s (tensors read when used).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnreadableCheckpointError: it exists but cannot be read.
    """
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise UnreadableCheckpointError(path, "the file is empty", fix)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - torch reports damaged files as RuntimeError/OSError/EOFError/...
        # torch's messages go on for lines: the first sentence says what failed
        reason = re.split(r"(?<=\.)\s", str(err).strip(), maxsplit=1)[0][:120].rstrip(".")
        kind = type(err).__name__
        raise UnreadableCheckpointError(path, f"{kind}: {reason}" if reason else kind, fix) from err


class DeltaMismatchError(ValueError):
    """A delta was made for another method, config or backbone; the message says which."""


def _frozen_backbone(vit: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The frozen pre-trained parameters of backbone ``vit``, by name."""
    keys = backbone_key(vit)
    return sorted(
        (item for item in vit.named_parameters() if keys.match(item[0]) and not item[1].requires_grad),
        key=lambda item: item[0],
    )


def backbone_fingerprint(model: nn.Module, replace: Mapping[str, torch.Tensor] | None = None) -> str:
    """SHA-256 over the ViT architecture and its *frozen* backbone weights (what a delta depends on).

    Args:
        model: a ViT or TinyViT, or a network holding one (:func:`~monai_prompt.backbones.find_backbone`).
        replace: tensors to hash instead of some of the frozen weights, by their name in the ViT (those a state
            dict is about to load).
    """
    vit = find_backbone(model)
    recorded = getattr(vit, "recorded_fingerprint", None)
    if recorded is not None:  # a frozen backbone whose weights were released (FPT's LPM when training from a cache)
        return recorded
    digest = hashlib.sha256(json.dumps(getattr(vit, "config", {}), sort_keys=True).encode())
    for name, param in _frozen_backbone(vit):
        tensor = (replace or {}).get(name, param)
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def backbone_source(model: nn.Module) -> str | None:
    """The pre-trained weights loaded into the backbone of ``model`` (recorded by
    :func:`~monai_prompt.backbones.load_pretrained`), or None: none were, so they are random."""
    return getattr(find_backbone(model), "pretrained_source", None)


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.tensor(list(data), dtype=torch.uint8)


def identity_state(fingerprint: str, source: str | None) -> dict[str, torch.Tensor]:
    """The :data:`FINGERPRINT_KEY` and :data:`SOURCE_KEY` entries of a delta's ``model`` entry, as uint8 tensors (so
    that every state-dict reader takes them).

    Args:
        fingerprint: the backbone fingerprint (:func:`backbone_fingerprint`, hex).
        source: the weights the backbone was loaded from (None: none).
    """
    return {
        FINGERPRINT_KEY: _bytes_tensor(bytes.fromhex(fingerprint)),
        SOURCE_KEY: _bytes_tensor((source or "").encode()),
    }


def backbone_identity(model: nn.Module) -> dict[str, torch.Tensor]:
    """The entries that tie a delta's ``model`` entry to the backbone of ``model`` (:func:`identity_state`)."""
    return identity_state(backbone_fingerprint(model), backbone_source(model))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter of ``model`` (head included), by its ``named_parameters`` name, copied to the CPU: a
    delta or checkpoint saved from a GPU then loads on a machine without one, whatever reads it (``torch.load``
    without ``map_location``, ignite's ``Checkpoint.load_objects`` in MONAI's ``ckpt_export``)."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


def delta_meta(model: nn.Module) -> dict:
    """Method, config and backbone identity a delta of ``model`` depends on."""
    vit = find_backbone(model)
    method = getattr(vit, "peft_method", None)
    if method is None:
        raise ValueError("model has no PEFT method applied (see monai_prompt.peft.apply_method).")
    return {
        "format": DELTA_FORMAT,
        "method": method,
        "config": vit.peft_config,
        "backbone": {
            "config": getattr(vit, "config", {}),
            "fingerprint": backbone_fingerprint(model),
            "source": backbone_source(model),
        },
    }


def delta_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A delta's ``model`` entry: the trainable parameters of ``model`` and its :func:`backbone_identity`."""
    return {**trainable_state(model), **backbone_identity(model)}


def delta_state_dict(model: nn.Module) -> dict:
    """Everything needed to restore the trained part of ``model`` on top of the same pre-trained backbone."""
    return {"model": delta_model_state(model), "peft": delta_meta(model)}


def _mismatch(
    source: str, model: nn.Module, actual: str, expected: str, trained_from: str | None
) -> DeltaMismatchError:
    """The error for a delta trained on another backbone than the one ``model`` holds, naming both and the fix."""
    built_from = backbone_source(model)
    built = f"from pretrained={built_from!r}" if built_from else "from pretrained=None: random weights"
    trained = f"recorded source {trained_from!r}" if trained_from else "source not recorded"
    return DeltaMismatchError(
        f"{source}: the frozen backbone weights differ from those the delta was trained on: the backbone this network "
        f"was built with (fingerprint {actual[:12]}, {built}) is not the one the delta was trained on (fingerprint "
        f"{expected[:12]}, {trained}). Set the bundle's pretrained (--pretrained) to the weights the delta was trained "
        f"on, or package the bundle with its backbone: monai-prompt package BUNDLE --pretrained WEIGHTS --out DIR."
    )


def check_backbone_identity(
    model: nn.Module, state: Mapping[str, object], prefix: str = "", source: str = "the state dict being loaded"
) -> None:
    """Raise :class:`DeltaMismatchError` when the frozen backbone ``model`` will hold after loading ``state`` is not
    the one ``state`` records (:data:`FINGERPRINT_KEY`).

    Weights ``state`` holds itself replace the model's in that comparison, so a full state dict is checked against
    its own backbone. Nothing is checked for a model without frozen backbone weights (``method="full"``) or for a
    state dict without a fingerprint that holds every frozen weight (e.g. a MONAI UNETR checkpoint).

    Args:
        model: the network about to load ``state``.
        state: a state dict (a delta's ``model`` entry, a full state dict).
        prefix: where ``model``'s keys start in ``state`` (``load_state_dict`` pre-hooks get it).
        source: name of ``state`` in the error.

    Raises:
        DeltaMismatchError: the fingerprints differ, or ``state`` lacks frozen weights and has no fingerprint.
    """
    vit = find_backbone(model)
    frozen = _frozen_backbone(vit)
    if not frozen:
        return
    path = next(name for name, module in model.named_modules() if module is vit)
    at = prefix + (path + "." if path else "")
    supplied = {name: state[at + name] for name, _ in frozen if at + name in state}
    recorded = state.get(prefix + FINGERPRINT_KEY)
    if recorded is None:
        if len(supplied) == len(frozen):
            return
        raise DeltaMismatchError(
            f"{source}: it holds trainable weights only and no {FINGERPRINT_KEY!r} entry, so nothing ties it to the "
            f"frozen backbone it was trained on (a delta saved before monai_prompt recorded it there); load it with "
            f"monai_prompt.peft.load_delta (it checks the delta's 'peft' entry), or re-save it with "
            f"`monai-prompt package BUNDLE --pretrained WEIGHTS --out DIR`."
        )
    expected = bytes(torch.as_tensor(recorded).tolist()).hex()
    actual = backbone_fingerprint(model, supplied)
    if actual != expected:
        trained_from = state.get(prefix + SOURCE_KEY)
        trained_from = bytes(torch.as_tensor(trained_from).tolist()).decode() if trained_from is not None else None
        raise _mismatch(source, model, actual, expected, trained_from)


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
    vit = find_backbone(model)
    method = getattr(vit, "peft_method", None)
    if meta["method"] != method:
        raise DeltaMismatchError(f"{source}: delta is for method {meta['method']!r}, the model uses {method!r}.")
    diff = _differences(meta["config"], vit.peft_config)
    if diff:
        raise DeltaMismatchError(f"{source}: method config differs: {'; '.join(diff)}.")
    diff = _differences(meta["backbone"]["config"], getattr(vit, "config", {}))
    if diff:
        raise DeltaMismatchError(f"{source}: backbone architecture differs: {'; '.join(diff)}.")
    actual = backbone_fingerprint(model)
    if meta["backbone"]["fingerprint"] != actual:
        raise _mismatch(source, model, actual, meta["backbone"]["fingerprint"], meta["backbone"].get("source"))


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "delta") -> None:
    """Copy ``state`` into exactly the trainable parameters of ``model`` (names and shapes must match), after
    checking the backbone fingerprint ``state`` holds (:func:`check_backbone_identity`; older deltas hold none)."""
    if FINGERPRINT_KEY in state:
        check_backbone_identity(model, state, source=source)
    state = {name: tensor for name, tensor in state.items() if name not in IDENTITY_KEYS}
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
    # the backbone's buffers (the TinyViT's BatchNorm statistics, kept in eval mode) come from it, as frozen weights do
    backbone = f"{getattr(module, 'backbone_name', 'vit')}."
    buffers = [name for name, _ in module.named_buffers() if name.startswith(backbone)]

    def satisfied(key: str) -> bool:
        """Frozen (from the backbone), or a shared parameter loaded under another of its names."""
        if any(key == name or key.endswith("." + name) for name in buffers):
            return True
        for name, param in params.items():
            if key == name or key.endswith("." + name):
                prefix = key[: len(key) - len(name)]
                return not param.requires_grad or any(prefix + a not in missing for a in aliases[id(param)])
        return False

    incompatible_keys.missing_keys[:] = [key for key in incompatible_keys.missing_keys if not satisfied(key)]


def _check_on_load(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """``load_state_dict`` pre-hook: refuse a state dict made on another backbone, then drop the identity keys."""
    check_backbone_identity(module, state_dict, prefix)
    for key in IDENTITY_KEYS:
        state_dict.pop(prefix + key, None)


def allow_delta_load(module: nn.Module) -> None:
    """Make ``module.load_state_dict`` take a delta's ``model`` entry, and only on the backbone it was trained on.

    - ``strict=True`` passes: missing keys that name *frozen* parameters or the backbone's buffers (they come
      from the pre-trained backbone) or other names of a shared parameter that was loaded (DVPT's shared modules)
      are not errors, so MONAI tools that load strictly (``ckpt_export --key_in_ckpt model``, ignite
      ``Checkpoint.load_objects``) accept a delta. Unexpected keys, missing trainable keys and shape mismatches
      still fail.
    - whatever ``strict`` (MONAI Label loads ``ckpt["model"]`` with ``strict=False``), a state dict whose
      :data:`FINGERPRINT_KEY` differs from the backbone's raises :class:`DeltaMismatchError` before anything is
      loaded, as does one without it that lacks frozen weights (:func:`check_backbone_identity`).

    ``module.state_dict()`` is unchanged (MONAI's keys plus the method's), so loaders that keep only the target's
    own keys (MONAI ``copy_model_state``, ``CheckpointLoader(strict_shape=False)``) drop the fingerprint: load a
    delta with :func:`load_delta` or the :class:`~monai_prompt.engine.PeftMeta` object there. Only load-state-dict
    hooks are used: TorchScript (``ckpt_export``) ignores them.
    """
    module.register_load_state_dict_pre_hook(_check_on_load)
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
        delta = read_checkpoint(delta)
    if not isinstance(delta, dict) or "peft" not in delta or "model" not in delta:
        raise DeltaMismatchError(f"{source}: not a monai_prompt delta (keys 'model' and 'peft' expected).")
    check_delta_meta(model, delta["peft"], source)
    load_trainable_state(model, delta["model"], source)


def save_delta(model: nn.Module, path: str | Path) -> Path:
    """Write :func:`delta_state_dict` atomically (temp file + rename): a crash never leaves half a file."""
    return atomic_write(path, lambda tmp: torch.save(delta_state_dict(model), tmp))
