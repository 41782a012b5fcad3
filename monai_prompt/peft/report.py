"""Trainable-parameter accounting: what a method trains, per module, against the frozen backbone."""

from __future__ import annotations

import re

import torch.nn as nn

from monai_prompt.backbones.registry import find_backbone
from monai_prompt.backbones.vit import backbone_key
from monai_prompt.peft.registry import NEVER_TRAINED

__all__ = ["backbone_parameter_count", "format_report", "trainable_report"]


def backbone_parameter_count(model: nn.Module) -> int:
    """Parameters of the pre-trained backbone itself: its own keys only (MONAI ViT or TinyViT), without method
    additions, heads or the unused ``norm_cross_attn`` LayerNorms."""
    vit = find_backbone(model)
    keys = backbone_key(vit)
    return sum(p.numel() for name, p in vit.named_parameters() if keys.match(name))


def trainable_report(model: nn.Module) -> dict:
    """Count what trains.

    Args:
        model: a tuned ViT or a network holding one (``PromptClassifier``).

    Returns:
        ``{"method", "trainable", "backbone", "total", "percent_of_backbone", "modules"}`` where ``modules``
        maps each trainable parameter name (block indices folded to ``*``) to its count. The percentage
        divides by the backbone alone (the convention of VPT, LoRA and V-PETL tables). The unused
        ``norm_cross_attn`` LayerNorms are counted nowhere.
    """
    modules: dict[str, int] = {}
    trainable = total = 0
    for name, param in model.named_parameters():
        if NEVER_TRAINED.search(name):
            continue
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
            group = re.sub(r"\.\d+\.", ".*.", name)
            modules[group] = modules.get(group, 0) + param.numel()
    backbone = backbone_parameter_count(model)
    return {
        "method": getattr(find_backbone(model), "peft_method", None),
        "trainable": trainable,
        "backbone": backbone,
        "total": total,
        "percent_of_backbone": 100.0 * trainable / backbone,
        "modules": modules,
    }


def format_report(report: dict) -> str:
    """A printable table of :func:`trainable_report`."""
    width = max([len(n) for n in report["modules"]] + [20])
    lines = [f"method: {report['method']}", f"{'trainable parameter':<{width}}  {'count':>12}"]
    lines += [f"{name:<{width}}  {count:>12,}" for name, count in report["modules"].items()]
    lines += [
        f"{'trainable':<{width}}  {report['trainable']:>12,}",
        f"{'backbone (pre-trained ViT)':<{width}}  {report['backbone']:>12,}",
        f"{'total in model':<{width}}  {report['total']:>12,}",
        f"trainable = {report['percent_of_backbone']:.3f}% of the backbone",
    ]
    return "\n".join(lines)
