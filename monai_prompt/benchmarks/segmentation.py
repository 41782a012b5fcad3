"""Measure what the segmentation bundle READMEs report: ``python -m monai_prompt.benchmarks.segmentation``.

1. Trainable parameters (encoder and decoder) and delta size of each segmentation bundle's default network
   (ViT-B/16 encoder, 224 x 224 in 2D and 96^3 in 3D, 4 classes, feature size 16; built, never run): a few minutes.
2. ``--demo RESULTS``: the numbers of a finished ``monai-prompt demo --task segmentation`` (its ``results.json``)
   for the README of the bundle it tuned (and ``docs/segmentation.md``).

The numbers go to ``monai_prompt/bundle_gen/segmentation_measurements.json``; ``monai-prompt render-bundles`` then
writes them into the READMEs.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path
from typing import Any

from monai_prompt.benchmarks.bundle_runs import default_network, hardware, parameter_counts
from monai_prompt.bundle_gen.readme import MEASUREMENTS_FILES
from monai_prompt.bundle_gen.specs import SEGMENTATION_SPECS, BundleSpec
from monai_prompt.runs.bundles import bundles_folder

__all__ = ["demo_record", "segmentation_counts"]

#: how the READMEs name the demo command (Markdown).
DEMO_COMMAND = "monai-prompt demo --task segmentation --compare-scratch"


def segmentation_counts(spec: BundleSpec, bundles: Path) -> dict[str, Any]:
    """:func:`~monai_prompt.benchmarks.bundle_runs.parameter_counts` of the bundle's default network, with the
    encoder's trainable parameters and the decoder's (``PromptUNETR.parameter_report``)."""
    net = default_network(spec, bundles)
    report = net.parameter_report()
    return {**parameter_counts(spec, bundles, net), "encoder_trainable": report["encoder_trainable"],
            "decoder": report["decoder"]}


def demo_record(results: dict[str, Any], date: str) -> dict[str, Any]:
    """What the README of the tuned bundle says about a demo run (``results``: the demo's ``results.json``)."""
    config = results["config"]
    runs = {
        ("MAE-pre-trained, " + config["method"]) if label == "pretrained" else "random init, full (from scratch)": {
            key: run[key] for key in ("metrics", "seconds_per_epoch", "trainable", "encoder_trainable", "decoder")
        }
        for label, run in results["runs"].items()
    }
    return {
        "bundle": results["runs"]["pretrained"]["bundle"],
        "labels": config["labels"],
        "classes": results["classes"],
        "date": date,
        "hardware": hardware(),
        "command": DEMO_COMMAND,
        "encoder": config["encoder"],
        "pretrain_epochs": config["pretrain_epochs"],
        "epochs": config["tune_epochs"],
        "roi": " x ".join([str(results["runs"]["pretrained"]["img_size"])] * 2),
        "feature_size": config["feature_size"],
        "test_images": results["test_images"],
        "hd95_unit": results.get("hd95_unit", "pixels (2 mm)"),  # a demo before segmentation 0.1.10: pixels
        "runs": runs,
        "timings": results["timings"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundles", help="the bundles folder (default: the package's)")
    parser.add_argument("--demo", help="results.json of a finished `monai-prompt demo --task segmentation` run")
    parser.add_argument("--no-counts", action="store_true", help="keep the recorded parameter counts")
    parser.add_argument("--output", default=str(MEASUREMENTS_FILES["segmentation"]), help="where the numbers go")
    args = parser.parse_args(argv)

    target, today = Path(args.output), datetime.date.today().isoformat()
    measured = json.loads(target.read_text()) if target.is_file() else {}
    if not args.no_counts:
        for name, spec in SEGMENTATION_SPECS.items():
            measured.setdefault("parameters", {})[name] = segmentation_counts(spec, bundles_folder(args.bundles))
            print(name, json.dumps(measured["parameters"][name]), flush=True)
        measured["date"] = today
    if args.demo:
        measured["demo"] = demo_record(json.loads(Path(args.demo).read_text()), today)
    target.write_text(json.dumps(measured, indent=1) + "\n")


if __name__ == "__main__":
    main()
