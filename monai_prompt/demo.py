"""The main job (``monai-prompt demo``, ``make demo``): DVPT on a ViT pre-trained here, on real brain-MRI patches.

No pre-trained ViT can be downloaded in an offline install, so the demo makes one. Four steps, every output
under ``out_dir`` (``runs/demo``, git-ignored):

1. **data**: the demo set of :mod:`monai_prompt.data.demo` (32 x 32 MNI152 T1 patches, 3 tissue classes, split
   by axial slab, plus unlabelled patches of the training slabs), built once and reused while its build
   settings are unchanged and every file is present.
2. **pre-training**: the ``bundles/vit_pretraining`` bundle, MONAI's ``MaskedAutoEncoderViT`` trained
   self-supervised on the training and unlabelled images (labels unused). Skipped when its checkpoint exists
   for the same data, config and overrides (a fingerprint); an interrupted run resumes from its last epoch.
3. **tuning**: the ``bundles/dvpt_classification`` bundle, DVPT on the frozen pre-trained encoder
   (``pretrained`` override, MONAI LayerNorm eps); the best validation delta is kept.
4. **evaluation**: ``train.json`` + ``evaluate.json`` on the test split: accuracy, macro ROC AUC, macro F1 and
   quadratic-weighted kappa, next to the trainable-parameter report.

With ``compare_scratch``, steps 3-4 run again on a randomly initialised backbone, the baseline that shows
what the pre-training is worth. Both bundles run through MONAI's bundle API (``ConfigWorkflow``, by
:func:`monai_prompt.runs.runner.run_bundle`), exactly as ``python -m monai.bundle run`` would run them with the same
overrides. The task itself (sizes, data, pre-trained encoder) is :mod:`monai_prompt.runs.demo_task`, which the
benchmarks share; nothing imports this module.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monai_prompt.runs.bundles import find_bundle
from monai_prompt.runs.demo_task import DemoConfig, prepare_data, pretrain, pretrained_overrides
from monai_prompt.runs.progress import EpochProgress, RunSteps, attach_progress, format_timings
from monai_prompt.runs.runner import train_and_evaluate

__all__ = ["run_demo", "tune"]

_print = functools.partial(print, flush=True)

def tune(
    out_dir: str | Path,
    datalist: Path,
    pretrained: Path | None,
    config: DemoConfig = DemoConfig(),
    bundles: str | os.PathLike | None = None,
    verbose: bool = False,
    print_fn: Callable[[str], None] = _print,
) -> dict[str, Any]:
    """Train DVPT with the ``dvpt_classification`` bundle in ``out_dir``; evaluate its best delta on the test split.

    Args:
        out_dir: the run's ``bundle_root`` (emptied first).
        datalist: the demo datalist.
        pretrained: the MAE checkpoint, or ``None`` for a randomly initialised backbone.
        config: demo sizes.
        bundles: the bundles folder.
        verbose: show the bundles' own logs.
        print_fn: where progress lines go.

    Returns:
        ``{"metrics": {accuracy, auc, f1, kappa}, "trainable": ..., "backbone": ..., "percent_of_backbone": ...}``.
    """
    from monai_prompt.peft import trainable_report

    overrides = {
        **pretrained_overrides(config, pretrained, bundles),
        "dataset_dir": str(datalist.parent),
        "datalist_file": str(datalist),
        "method_config": dict(config.method_config),
        "learning_rate": config.learning_rate,
        "batch_size": config.tune_batch_size,
        "num_workers": 0,
        "cache_rate": 1.0,
    }
    progress = EpochProgress("DVPT", print_fn=print_fn)
    train, metrics = train_and_evaluate(find_bundle("dvpt_classification", bundles), Path(out_dir), overrides,
                                        config.tune_epochs, verbose, attach_progress(progress, "validate#evaluator"))
    report = trainable_report(train.parser.get_parsed_content("network"))
    return {"metrics": metrics, **{k: report[k] for k in ("trainable", "backbone", "percent_of_backbone")}}


def run_demo(
    out_dir: str | Path = "runs/demo",
    config: DemoConfig = DemoConfig(),
    compare_scratch: bool = False,
    bundles: str | os.PathLike | None = None,
    verbose: bool = False,
    print_fn: Callable[[str], None] = _print,
) -> dict[str, Any]:
    """The main job: data, pre-training (cached), DVPT tuning and evaluation; prints progress and a summary.

    Args:
        out_dir: output folder (``data/``, ``vit_pretraining/``, ``dvpt_pretrained/``, ``dvpt_scratch/``,
            ``results.json``).
        config: sizes (:class:`~monai_prompt.runs.demo_task.DemoConfig`;
            :data:`~monai_prompt.runs.demo_task.TINY_DEMO` for a smoke run).
        compare_scratch: also tune and evaluate DVPT on a randomly initialised backbone.
        bundles: the bundles folder (default: the package's, :func:`~monai_prompt.runs.bundles.bundles_folder`).
        verbose: show the bundles' own logs (MONAI/ignite INFO lines).
        print_fn: where lines go.

    Returns:
        the results written to ``results.json``: test metrics per backbone, trainable counts, step timings.
    """
    warnings.filterwarnings("ignore", message="torch.meshgrid")  # MONAI's sin-cos position embedding
    out_dir = Path(out_dir)
    steps = RunSteps(4 if compare_scratch else 3, print_fn)
    with steps.step("data_s", f"demo data (MNI152 T1 tissue patches) in {out_dir / 'data'}"):
        datalist, reused = prepare_data(out_dir / "data", config)
    steps.report("data_s", "reused" if reused else "built", datalist)
    with steps.step("pretraining_s", f"MAE pre-training of the ViT encoder (bundles/vit_pretraining, "
                                     f"{config.pretrain_epochs} epochs)"):
        checkpoint, status = pretrain(out_dir / "vit_pretraining", datalist, config, bundles, verbose, print_fn)
    steps.report("pretraining_s", status, checkpoint)

    results: dict[str, Any] = {"config": dataclasses.asdict(config), "backbones": {}}
    runs = [("pretrained", checkpoint)] + ([("scratch", None)] if compare_scratch else [])
    for name, pretrained in runs:
        what = "the MAE-pre-trained backbone" if pretrained else "a randomly initialised backbone (baseline)"
        with steps.step(f"dvpt_{name}_s", f"DVPT on {what} (bundles/dvpt_classification, {config.tune_epochs} "
                                          "epochs), then evaluation on the test split"):
            results["backbones"][name] = tune(out_dir / f"dvpt_{name}", datalist, pretrained, config, bundles,
                                              verbose, print_fn)
    results["timings"] = steps.rounded()
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print_fn(_summary(results, out_dir))
    return results


def _summary(results: dict[str, Any], out_dir: Path) -> str:
    """The closing table: test metrics per backbone, trainable parameters and timings."""
    labels = {"pretrained": "DVPT, MAE-pre-trained ViT", "scratch": "DVPT, random-init ViT"}
    lines = ["", "Test split (best-validation delta):",
             f"  {'':<26}{'accuracy':>10}{'macro AUC':>11}{'macro F1':>10}{'QWK':>8}{'ECE':>8}"]
    for name, run in results["backbones"].items():
        m = run["metrics"]
        lines.append(f"  {labels[name]:<26}{m['accuracy']:>10.3f}{m['auc']:>11.3f}{m['f1']:>10.3f}{m['kappa']:>8.3f}"
                     f"{m['ece']:>8.3f}")
    run = next(iter(results["backbones"].values()))
    lines.append(f"  trainable: {run['trainable']:,} parameters = {run['percent_of_backbone']:.2f}% of the "
                 f"{run['backbone']:,}-parameter backbone (DVPT modules, prompts and head)")
    lines.append("  time: " + format_timings(results["timings"]))
    lines.append(f"  outputs and results.json in {out_dir}")
    return "\n".join(lines)
