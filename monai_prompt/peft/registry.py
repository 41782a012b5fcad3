"""Method registry and :func:`apply_method`: turn a MONAI ViT into a tuned one for a named method.

Each method lives in its own module (``monai_prompt/peft/<name>.py``) with a config dataclass and an
``apply`` function registered by :func:`register_method`. ``apply`` inserts the method's modules into the
ViT in place; :func:`apply_method` then freezes everything except what the method declares trainable.

The registry is the only list of methods: on the first :func:`method_names` or :func:`get_method` call,
:func:`import_package_modules` imports every module of this package, and the method modules register
themselves. A module is a method module because it registers a method; the core modules (this one, delta
checkpoints, merging, reports) register none, so no list of either has to be kept.

A method also declares the backbone families it works on (``families``: names of
:func:`monai_prompt.backbones.registry.family_names`, ``"vit"`` for PromptableViT, ``"tinyvit"`` for LiteMedSAM's
TinyViT); :func:`apply_method` refuses any other family at build time, saying what the method ``requires`` (token
methods: :data:`PLAIN_TOKENS`).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from monai_prompt.backbones.vit import PromptableViT

__all__ = [
    "PLAIN_TOKENS",
    "PEFTMethod",
    "apply_method",
    "check_family",
    "freeze_for",
    "get_method",
    "import_package_modules",
    "method_names",
    "register_method",
]

#: parameters no method ever trains (MONAI builds them but a ViT without cross-attention never uses them).
NEVER_TRAINED = re.compile(r"(^|\.)norm_cross_attn\.")
#: what a method registered for the ``"vit"`` family only needs (VPT, FPT), said when it is refused.
PLAIN_TOKENS = "a plain token sequence with a CLS/prefix slot (a MONAI ViT, PromptableViT)"

_REGISTRY: dict[str, PEFTMethod] = {}
#: packages whose modules :func:`import_package_modules` has imported.
_IMPORTED_PACKAGES: set[str] = set()


@dataclass(frozen=True)
class PEFTMethod:
    """A registered method.

    Attributes:
        name: registry name (``vpt``, ``lora``, ...).
        config_class: dataclass of the method's hyper-parameters.
        apply: ``apply(vit, config)`` inserts the method's modules into ``vit`` in place.
        trainable: regular expression over ViT parameter names that the method trains.
        module: the module that registered the method.
        families: backbone families (``family`` of the backbone class: ``"vit"``, ``"tinyvit"``) it supports.
        requires: what it needs from a backbone, for the error on an unsupported family.
    """

    name: str
    config_class: type
    apply: Callable[[PromptableViT, Any], None]
    trainable: str
    module: str
    families: tuple[str, ...] = ("vit",)
    requires: str = PLAIN_TOKENS

    def make_config(self, config: Any = None) -> Any:
        """The method's config from ``None`` (defaults), a dict of overrides or a config instance."""
        if config is None:
            return self.config_class()
        if isinstance(config, self.config_class):
            return config
        if not isinstance(config, dict):
            raise TypeError(f"config for method {self.name!r} must be a dict or {self.config_class.__name__}.")
        fields = {f.name for f in dataclasses.fields(self.config_class)}
        unknown = sorted(set(config) - fields)
        if unknown:
            raise ValueError(f"unknown {self.name!r} config keys {unknown}; valid keys: {sorted(fields)}.")
        return self.config_class(**config)


def register_method(
    name: str,
    config_class: type,
    trainable: str,
    families: Sequence[str] = ("vit",),
    requires: str = PLAIN_TOKENS,
) -> Callable:
    """Decorator registering ``apply(vit, config)`` as method ``name``; a method module declares itself with it.

    Args:
        name: registry name.
        config_class: dataclass of hyper-parameters (every field has a default).
        trainable: regex over ViT parameter names the method trains.
        families: backbone families ``apply`` works on (``"vit"``: PromptableViT, ``"tinyvit"``: TinyViT).
        requires: what the method needs that other families lack (default :data:`PLAIN_TOKENS`).

    Raises:
        ValueError: ``name`` is already registered (a method is declared once).
    """

    def wrap(apply: Callable[[PromptableViT, Any], None]) -> Callable[[PromptableViT, Any], None]:
        if name in _REGISTRY:
            raise ValueError(
                f"PEFT method {name!r} is registered twice: by {_REGISTRY[name].module} and by {apply.__module__}; "
                f"rename one of them."
            )
        _REGISTRY[name] = PEFTMethod(name, config_class, apply, trainable, apply.__module__, tuple(families), requires)
        return apply

    return wrap


def import_package_modules(package: str = __package__) -> None:
    """Import every module of ``package`` once, so that its method modules register their methods.

    Args:
        package: a package name (default this one, ``monai_prompt.peft``).
    """
    if package in _IMPORTED_PACKAGES:
        return
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__, prefix=f"{package}."):
        importlib.import_module(info.name)
    _IMPORTED_PACKAGES.add(package)


def method_names() -> list[str]:
    """All method names that can be applied."""
    import_package_modules()
    return sorted(_REGISTRY)


def get_method(name: str) -> PEFTMethod:
    """The registered method ``name`` (the method modules are imported on first use)."""
    if name not in _REGISTRY:
        import_package_modules()
    if name not in _REGISTRY:
        raise ValueError(f"unknown PEFT method {name!r}; available: {method_names()}.")
    return _REGISTRY[name]


def check_family(method: str, families: Sequence[str], requires: str, family: str) -> None:
    """Raise a ``ValueError`` naming the method, the backbone family and why, if ``family`` is not in ``families``.

    Args:
        method: the method's name.
        families: the families it supports.
        requires: what it needs from a backbone.
        family: the backbone's family.
    """
    if family not in families:
        supported = [name for name in method_names() if family in _REGISTRY[name].families]
        raise ValueError(
            f"PEFT method {method!r} does not support the {family!r} backbone family: it needs {requires}, which a "
            f"{family!r} backbone does not have. Methods for {family!r}: {supported}."
        )


def freeze_for(model: nn.Module, trainable: str) -> None:
    """Set ``requires_grad`` so that exactly the parameters whose names match ``trainable`` train."""
    pattern = re.compile(trainable)
    for name, param in model.named_parameters():
        param.requires_grad_(bool(pattern.search(name)) and not NEVER_TRAINED.search(name))


def apply_method(vit: nn.Module, method: str, config: Any = None) -> nn.Module:
    """Insert ``method`` into ``vit`` (in place) and freeze all but what it trains.

    Load pre-trained weights first; the backbone keeps MONAI ViT's own state_dict keys, the method adds
    its own. The method name and config are recorded on the model (``peft_method``, ``peft_config``) for
    :func:`~monai_prompt.peft.delta.delta_state_dict`.

    Args:
        vit: a :class:`~monai_prompt.backbones.PromptableViT` or a :class:`~monai_prompt.backbones.TinyViT`.
        method: a name from :func:`method_names` that supports the backbone's ``family``.
        config: ``None`` for the defaults, a dict of overrides or the method's config dataclass.

    Raises:
        ValueError: the method does not support the backbone's family (the message says why).

    Example::

        >>> vit = build_vit("vit_base")
        >>> apply_method(vit, "lora", {"rank": 8})
    """
    family = getattr(vit, "family", None)
    if family is None:
        raise TypeError(
            f"apply_method needs a backbone of a registered family (monai_prompt.backbones.build_backbone, e.g. a "
            f"PromptableViT or a TinyViT), got {type(vit).__name__}."
        )
    if getattr(vit, "peft_method", None) is not None:
        raise ValueError(f"this ViT already has method {vit.peft_method!r}; build a fresh one for {method!r}.")
    spec = get_method(method)
    check_family(method, spec.families, spec.requires, family)
    cfg = spec.make_config(config)
    spec.apply(vit, cfg)
    freeze_for(vit, spec.trainable)
    vit.peft_method = method
    vit.peft_config = dataclasses.asdict(cfg)
    return vit
