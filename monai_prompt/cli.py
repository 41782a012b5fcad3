"""``monai-prompt`` command line: demo, info."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> None:
    """Build a tiny prompt-tuned ViT, print its trainable-parameter report and run training steps."""
    import torch

    from monai_prompt.nets import PromptClassifier
    from monai_prompt.peft import format_report, trainable_report

    torch.manual_seed(0)
    net = PromptClassifier(
        num_classes=3,
        method=args.method,
        backbone="vit_tiny",
        img_size=64,
        backbone_overrides={"num_layers": 4},
    )
    print(format_report(trainable_report(net)))
    images, labels = torch.randn(8, 3, 64, 64), torch.randint(0, 3, (8,))
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    for step in range(args.steps):
        loss = torch.nn.functional.cross_entropy(net(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step + 1}/{args.steps}: loss {loss.item():.4f}")


def _info(args: argparse.Namespace) -> None:
    """List PEFT methods and ViT presets."""
    from monai_prompt.backbones import VIT_PRESETS
    from monai_prompt.peft import method_names

    print("methods:", ", ".join(method_names()))
    for name, preset in VIT_PRESETS.items():
        print(f"{name}: {preset} (patch 16; add _p<N> for another patch size)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monai-prompt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the main job on embedded demo data")
    demo.add_argument("--method", default="linear", help="PEFT method (default: linear)")
    demo.add_argument("--steps", type=int, default=1, help="training steps")
    demo.set_defaults(func=_demo)
    info = sub.add_parser("info", help="list methods and backbone presets")
    info.set_defaults(func=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
