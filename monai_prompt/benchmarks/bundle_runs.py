"""Measure what the bundle READMEs report: ``python -m monai_prompt.benchmarks.bundle_runs`` (about an hour on a CPU).

1. Trainable parameters and delta size of each bundle's default network (ViT-B/16 at the bundle's ``img_size``,
   3 classes; built, never run).
2. A demo run of each bundle on the demo set of ``make demo``: no ImageNet ViT ships in any installable package, so
   the backbone is the one ``make demo`` pre-trains (:func:`monai_prompt.runs.demo_task.pretrain`: the
   ``bundles/vit_pretraining`` MAE bundle on the training and unlabelled images, labels unused), then each bundle's
   own recipe tunes it. Data and pre-training are cached under ``--work`` as the demo caches them (``--work
   runs/demo`` reuses a finished ``make demo``). Each bundle trains and evaluates through
   :func:`~monai_prompt.runs.runner.run_bundle` in a process of its own, so its peak RSS is its own; train seconds
   per epoch, peak RSS and the test metrics are recorded.

The numbers go to ``monai_prompt/bundle_gen/measurements.json``; ``monai-prompt render-bundles`` then writes them into
the READMEs. ``--quick`` runs the same path in minutes (the tiny demo: a handful of images, a 2-block ViT, one epoch
each) and writes ``<work>/measurements.json`` instead.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import multiprocessing
import os
import platform
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from monai_prompt.bundle_gen.readme import MEASUREMENTS_FILES
from monai_prompt.bundle_gen.specs import BUNDLE_SPECS, BundleSpec
from monai_prompt.runs.bundles import bundles_folder
from monai_prompt.runs.demo_task import TINY_DEMO, DemoConfig, prepare_data, pretrain, pretrained_overrides
from monai_prompt.runs.progress import EpochProgress, attach_progress
from monai_prompt.runs.runner import train_and_evaluate

__all__ = ["default_network", "demo_overrides", "demo_run", "hardware", "parameter_counts"]

#: how the READMEs name the measuring command (Markdown).
COMMAND = "`python -m monai_prompt.benchmarks.bundle_runs`"
#: demo-run settings besides the backbone and the data (each bundle keeps its own optimiser recipe).
DEMO_RUN = {"batch_size": 32, "num_workers": 1, "cache_rate": 1.0}


def default_network(spec: BundleSpec, bundles: Path) -> torch.nn.Module:
    """The bundle's ``network_def`` with its defaults (``inference.json``; no pre-trained weights)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundles / spec.name / "configs" / "inference.json"))
    return parser.get_parsed_content("network_def")


def parameter_counts(spec: BundleSpec, bundles: Path, net: torch.nn.Module | None = None) -> dict[str, Any]:
    """Trainable count, % of the backbone and delta bytes of the bundle's default network (``net``: already built)."""
    from monai_prompt.peft import delta_state_dict, trainable_report

    net = default_network(spec, bundles) if net is None else net
    report = trainable_report(net)
    buffer = io.BytesIO()
    torch.save(delta_state_dict(net), buffer)
    return {
        "trainable": report["trainable"],
        "backbone": report["backbone"],
        "percent_of_backbone": report["percent_of_backbone"],
        "delta_bytes": buffer.getbuffer().nbytes,
    }


def demo_overrides(spec: BundleSpec, datalist: Path, backbone: dict[str, Any]) -> dict[str, Any]:
    """Overrides of a demo run: the backbone, the datalist and :data:`DEMO_RUN` (FPT: the side network at half the
    LPM's size)."""
    overrides = {**backbone, "dataset_dir": str(datalist.parent), "datalist_file": str(datalist), **DEMO_RUN}
    if spec.fpt:  # the pre-trained ViT is the frozen LPM; the side network sees half its size
        overrides["method_config#side_img_size"] = backbone["img_size"] // 2
    return overrides


def demo_run(spec: BundleSpec, bundles: Path, out_dir: Path, datalist: Path, backbone: dict[str, Any],
             epochs: int) -> dict[str, Any]:
    """Train ``spec``'s bundle into ``out_dir`` on the demo data and evaluate it on the test split.

    Run it in a fresh process: the peak RSS is the process's.

    Args:
        spec: the bundle.
        bundles: the bundles folder.
        out_dir: the run's ``bundle_root`` (emptied first).
        datalist: the demo datalist.
        backbone: :func:`~monai_prompt.runs.demo_task.pretrained_overrides` of the pre-trained demo backbone.
        epochs: training epochs.

    Returns:
        ``{"epochs", "seconds_per_epoch", "peak_rss_mb", "accuracy", "auc", "f1", "kappa"}``.
    """
    from ignite.engine import Events

    from monai_prompt.engine.handlers import peak_memory_mb

    overrides = demo_overrides(spec, datalist, backbone)
    seconds: list[float] = []
    peak: list[float] = []
    progress = attach_progress(EpochProgress(spec.method), "validate#evaluator")

    def attach(workflow) -> None:
        progress(workflow)
        trainer = workflow.parser.get_parsed_content("train#trainer")
        # ignite's own epoch time (the "Epoch[n] Complete. Time taken" log line): the epoch without its validation
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seconds.append(e.state.times["EPOCH_COMPLETED"]))
        trainer.add_event_handler(Events.COMPLETED, lambda e: peak.append(peak_memory_mb("cpu")))

    _, metrics = train_and_evaluate(bundles / spec.name, out_dir, overrides, epochs, attach=attach)
    return {"epochs": epochs, "seconds_per_epoch": sum(seconds) / len(seconds), "peak_rss_mb": peak[0], **metrics}


def _in_own_process(function: Callable, *args: Any) -> Any:
    """``function(*args)`` in a fresh (spawned) process."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def _pretraining_record(config: DemoConfig, backbone: dict[str, Any], minutes: float | None,
                        previous: dict[str, Any]) -> dict[str, Any]:
    """What the READMEs say about the backbone; a reused checkpoint keeps the time of the run that made it."""
    record = {
        "recipe": "through `bundles/vit_pretraining` (the `make demo` recipe)",
        "epochs": config.pretrain_epochs,
        "shape": {key: backbone[key] for key in ("backbone_overrides", "img_size", "in_channels")},
    }
    if minutes is None and all(previous.get(key) == value for key, value in record.items()):
        minutes = previous.get("minutes")
    return {**record, "minutes": minutes}


def hardware() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    cpu = f"{platform.machine()} CPU, {os.cpu_count()} cores (shared with other jobs)"
    return f"{cpu}, torch {torch.__version__}, {gpu}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="bundles (default: all)")
    parser.add_argument("--bundles", help="the bundles folder (default: the package's)")
    parser.add_argument("--work", default="runs/measure", help="scratch folder (demo data, pre-training, runs)")
    parser.add_argument("--epochs", type=int, default=8, help="demo training epochs per bundle")
    parser.add_argument("--no-demo", action="store_true", help="only count parameters")
    parser.add_argument("--quick", action="store_true",
                        help="check the whole path in minutes: tiny demo, one epoch; writes <work>/measurements.json")
    parser.add_argument("--output", help="where the numbers go (default: the READMEs' measurements.json)")
    args = parser.parse_args(argv)

    bundles, work = bundles_folder(args.bundles).absolute(), Path(args.work).absolute()
    config, epochs = (TINY_DEMO, 1) if args.quick else (DemoConfig(), args.epochs)
    committed = MEASUREMENTS_FILES["classification"]
    target = Path(args.output) if args.output else work / "measurements.json" if args.quick else committed
    measured = json.loads(target.read_text()) if target.is_file() else {}
    names = args.names or list(BUNDLE_SPECS)
    unknown = sorted(set(names) - set(BUNDLE_SPECS))
    if unknown:
        parser.error(f"unknown bundles {unknown}; known: {sorted(BUNDLE_SPECS)}")
    if not args.no_demo:
        datalist, _ = prepare_data(work / "data", config)
        start = time.monotonic()
        checkpoint, status = pretrain(work / "vit_pretraining", datalist, config, bundles)
        minutes = round((time.monotonic() - start) / 60, 1) if status == "trained" else None
        print(f"pre-training: {status} {checkpoint}", flush=True)
        backbone = pretrained_overrides(config, checkpoint, bundles)
        measured["pretraining"] = _pretraining_record(config, backbone, minutes, measured.get("pretraining", {}))
    for name in names:
        spec = BUNDLE_SPECS[name]
        entry = measured.setdefault("bundles", {}).setdefault(name, {})
        entry["parameters"] = parameter_counts(spec, bundles)
        if not args.no_demo:
            entry["demo_run"] = _in_own_process(demo_run, spec, bundles, work / "runs" / name, datalist, backbone,
                                                epochs)
        print(name, json.dumps(entry), flush=True)
        measured.update(command=COMMAND, date=datetime.date.today().isoformat(), hardware=hardware())
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(measured, indent=1) + "\n")


if __name__ == "__main__":
    main()
