"""Fold mergeable methods into the frozen weights: :class:`MergeableLayer` and :func:`merge_and_unload`.

A method whose update is a re-parameterisation of a plain module (LoRA's low-rank update of a linear, SSF's
per-channel affine after a linear, LayerNorm or convolution) says so on its own layer, as HuggingFace ``peft``'s
tuner layers do: the layer subclasses :class:`MergeableLayer`, and its :meth:`~MergeableLayer.merge` folds the
update into ``weight``/``bias`` and turns the layer back into the plain module it was made from.
:func:`merge_and_unload` does this for every such layer of a model, whatever the method.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

__all__ = ["MergeableLayer", "merge_and_unload"]


class MergeableLayer:
    """Mixin of a layer made by swapping the class of a plain ``base_class`` module (keeping ``weight``/``bias``)
    whose update can be folded back into those weights.

    Subclasses set ``base_class`` and ``added_attributes`` (everything the method added to the plain module:
    parameters, sub-modules and plain attributes, like ``peft``'s ``adapter_layer_names``/``other_param_names``)
    and implement :meth:`fold`.
    """

    #: the plain module class this layer was made from (``nn.Linear``, ``nn.LayerNorm``, ...).
    base_class: ClassVar[type[nn.Module]]
    #: attribute names the method added to the plain module; :meth:`merge` removes them.
    added_attributes: ClassVar[tuple[str, ...]] = ()

    def fold(self) -> None:
        """Add the method's update to the plain module's own ``weight``/``bias`` (called without grad)."""
        raise NotImplementedError(f"{type(self).__name__} must implement fold().")

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Fold the update into the weights and turn this layer into a plain ``base_class`` module in place.

        Returns:
            the same object, now a ``base_class`` instance with only the plain module's parameters and keys.
        """
        self.fold()
        for name in self.added_attributes:
            delattr(self, name)
        self.__class__ = self.base_class
        return self


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every :class:`MergeableLayer` of ``model`` (see :meth:`MergeableLayer.merge`) and return ``model``.

    Layers of methods that cannot be merged (prompts, adapters, ...) stay; a model without mergeable layers is
    left unchanged, and merging twice is the same as merging once. The merged weights are no longer the
    pre-trained ones, so merge for export/inference, after the delta was saved.

    Args:
        model: a tuned ViT or a network holding one.
    """
    for module in list(model.modules()):
        if isinstance(module, MergeableLayer):
            module.merge()
    return model
