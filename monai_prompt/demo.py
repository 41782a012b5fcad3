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
:func:`monai_prompt.engine.runner.run_bundle`), exactly as ``python -m monai.bundle run`` would run them with the same
overrides. :func:`pretrain` and :func:`pretrained_overrides` also give the bundle benchmarks
(:mod:`monai_prompt.benchmarks.bundle_runs`) their backbone.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import hashlib
import json
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from monai.bundle import ConfigWorkflow

__all__ = [
    "BUNDLES",
    "DEMO_DVPT",
    "TINY_DEMO",
    "DemoConfig",
    "EpochProgress",
    "attach_progress",
    "prepare_data",
    "pretrain",
    "pretrained_overrides",
    "read_metrics",
    "run_demo",
    "train_and_evaluate",
    "tune",
]

#: DVPT for a 64-token input on a CPU: 10 prompts (the paper's 50 would almost double the tokens), a module per block.
DEMO_DVPT = {"num_prompts": 10, "bottleneck": 16, "share": 1, "variant": "paper"}
#: LayerNorm epsilon of MONAI's ``MaskedAutoEncoderViT`` (``nn.LayerNorm`` default); the tuned ViT must match it.
MONAI_LAYER_NORM_EPS = 1e-5
#: the repository's bundles (the demo runs a checkout: ``pip install -e .``).
BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
_print = functools.partial(print, flush=True)


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo (the defaults are the measured ``make demo``; :data:`TINY_DEMO` is a smoke run).

    Attributes:
        train_per_class: labelled training patches per class.
        eval_per_class: validation and test patches per class.
        unlabeled: unlabelled patches for pre-training (with the training patches, labels unused).
        pretrain_epochs: MAE epochs.
        pretrain_batch_size: MAE batch size.
        tune_epochs: DVPT epochs.
        tune_batch_size: DVPT batch size.
        learning_rate: DVPT learning rate (AdamW, cosine).
        method_config: DVPT config.
        backbone_overrides: encoder shape; ``None`` keeps the pre-training bundle's (width 96, 4 blocks, patch 4).
    """

    train_per_class: int = 300
    eval_per_class: int = 75
    unlabeled: int = 3000
    pretrain_epochs: int = 20
    pretrain_batch_size: int = 64
    tune_epochs: int = 15
    tune_batch_size: int = 32
    learning_rate: float = 2e-3
    method_config: Mapping[str, Any] = field(default_factory=lambda: dict(DEMO_DVPT))
    backbone_overrides: Mapping[str, int] | None = None


#: a run of seconds: a handful of images, one epoch each, a 2-block ViT of width 32.
TINY_DEMO = DemoConfig(
    train_per_class=4,
    eval_per_class=2,
    unlabeled=8,
    pretrain_epochs=1,
    pretrain_batch_size=8,
    tune_epochs=1,
    tune_batch_size=4,
    method_config={"num_prompts": 2, "bottleneck": 4, "share": 1, "variant": "paper"},
    backbone_overrides={"hidden_size": 32, "num_layers": 2, "num_heads": 2, "mlp_dim": 64, "patch_size": 8},
)


class EpochProgress:
    """Print one line per epoch: mean training loss, validation metrics, seconds per epoch and the time left.

    Args:
        label: what is training (start of each line).
        validator: the engine whose metrics (e.g. ``val_accuracy``) to show, if any.
        print_fn: where lines go.
    """

    def __init__(self, label: str, validator=None, print_fn: Callable[[str], None] = _print) -> None:
        self.label = label
        self.validator = validator
        self.print_fn = print_fn
        self._start = 0.0
        self._first_epoch = 0
        self._losses: list[float] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)

    def _started(self, engine) -> None:
        self._start, self._first_epoch = time.monotonic(), engine.state.epoch

    def _iteration(self, engine) -> None:
        output = engine.state.output
        loss = (output[0] if isinstance(output, list) else output)["loss"]
        self._losses.append(loss.detach().item() if hasattr(loss, "detach") else float(loss))

    def _epoch(self, engine) -> None:
        done, total = engine.state.epoch, engine.state.max_epochs
        per_epoch = (time.monotonic() - self._start) / max(done - self._first_epoch, 1)
        mean_loss = sum(self._losses) / max(len(self._losses), 1)
        parts = [f"{self.label} epoch {done:>{len(str(total))}}/{total}", f"loss {mean_loss:.4f}"]
        self._losses.clear()
        if self.validator is not None:
            metrics = self.validator.state.metrics
            parts += ["val " + " ".join(f"{name.removeprefix('val_')} {value:.3f}" for name, value in metrics.items())]
        self.print_fn(f"  {'  '.join(parts)}  | {per_epoch:.1f} s/epoch, {_clock((total - done) * per_epoch)} left")


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m{seconds:02d}s"


class DemoSteps:
    """The numbered, timed steps of a demo run: each prints ``[i/n] title`` and records its seconds under a key.

    Args:
        total: the number of steps.
        print_fn: where lines go.
    """

    def __init__(self, total: int, print_fn: Callable[[str], None]) -> None:
        self.total, self.print_fn, self.done = total, print_fn, 0
        self.timings: dict[str, float] = {}
        self._start = time.monotonic()

    @contextlib.contextmanager
    def step(self, key: str, title: str) -> Iterator[None]:
        """Print the step's line, run the block and record its duration as ``timings[key]``."""
        self.done += 1
        self.print_fn(f"[{self.done}/{self.total}] {title}")
        start = time.monotonic()
        yield
        self.timings[key] = time.monotonic() - start

    def report(self, key: str, status: str, path: Path) -> None:
        """The indented line after a step: what it did (``built``, ``reused``, ...) to which file, in how long."""
        self.print_fn(f"  {status} {path} ({_clock(self.timings[key])})")

    def rounded(self) -> dict[str, float]:
        """Every step's seconds and ``total_s`` since the start, to 0.1 s."""
        return {key: round(value, 1) for key, value in
                {**self.timings, "total_s": time.monotonic() - self._start}.items()}


def _bundle(name: str, bundles: Path) -> Path:
    folder = bundles / name
    if not (folder / "configs" / "train.json").is_file():
        raise FileNotFoundError(
            f"{folder}/configs/train.json not found: the demo runs the bundles of a repository checkout "
            f"(git clone, then pip install -e .), or pass bundles=<the bundles folder>."
        )
    return folder


def attach_progress(progress: EpochProgress, validator_id: str | None = None) -> Callable:
    """An ``attach`` hook for :func:`~monai_prompt.engine.runner.run_bundle` that attaches ``progress`` to
    ``train#trainer``.

    Args:
        progress: the progress lines.
        validator_id: the engine whose metrics the lines show (e.g. ``"validate#evaluator"``), if any.
    """

    def attach(workflow) -> None:
        if validator_id is not None:
            progress.validator = workflow.parser.get_parsed_content(validator_id)
        progress.attach(workflow.parser.get_parsed_content("train#trainer"))

    return attach


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def prepare_data(folder: str | Path, config: DemoConfig = DemoConfig()) -> tuple[Path, bool]:
    """Build the demo set in ``folder``, or reuse it when it was built with these sizes and every image is there.

    Returns:
        the datalist path and whether an existing build was reused.
    """
    from monai_prompt.data import build_demo_data, read_classification_datalist

    folder = Path(folder)
    settings = {
        "train_per_class": config.train_per_class,
        "eval_per_class": config.eval_per_class,
        "unlabeled": config.unlabeled,
    }
    stamp, datalist = folder / "build.json", folder / "datalist.json"
    if _read_json(stamp) == settings and datalist.is_file():
        try:
            if all(Path(item["image"]).is_file() for _, item in read_classification_datalist(datalist).all_items()):
                return datalist, True
        except ValueError:  # a damaged datalist: rebuild
            pass
    shutil.rmtree(folder, ignore_errors=True)
    build_demo_data(folder, **settings)
    stamp.write_text(json.dumps(settings))
    return datalist, False


def _encoder_shape(config: DemoConfig, bundles: Path) -> dict[str, Any]:
    """The encoder shape both bundles get: the pre-training bundle's defaults, replaced by ``config``'s."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(_bundle("vit_pretraining", bundles) / "configs" / "train.json"))
    shape = {key: parser[key] for key in ("backbone", "backbone_overrides", "img_size", "in_channels", "spatial_dims")}
    if config.backbone_overrides is not None:
        shape["backbone_overrides"] = dict(config.backbone_overrides)
    return shape


def pretrained_overrides(config: DemoConfig, pretrained: Path | None, bundles: str | Path = BUNDLES) -> dict[str, Any]:
    """Overrides that give a classification bundle the demo backbone: the encoder shape :func:`pretrain` trains,
    its checkpoint as ``pretrained`` (``None``: randomly initialised) and MONAI's LayerNorm epsilon.

    Args:
        config: demo sizes (``backbone_overrides``).
        pretrained: the MAE checkpoint :func:`pretrain` returns, or ``None``.
        bundles: the bundles folder.
    """
    return {
        **_encoder_shape(config, Path(bundles)),
        "pretrained": None if pretrained is None else str(pretrained),
        "layer_norm_eps": MONAI_LAYER_NORM_EPS,
    }


def train_and_evaluate(
    bundle: Path, out_dir: Path, overrides: Mapping[str, Any], epochs: int, verbose: bool = False,
    attach: Callable | None = None,
) -> tuple[ConfigWorkflow, dict[str, float]]:
    """Train a classification bundle into ``out_dir`` (its ``bundle_root``, emptied first), then evaluate the best
    delta on the test split (``train.json`` + ``evaluate.json``).

    Args:
        bundle: the bundle folder.
        out_dir: where checkpoints, metrics and (FPT) the feature cache go.
        overrides: config overrides for both runs.
        epochs: ``train#trainer#max_epochs``.
        verbose: show the bundle's own logs (else warnings and errors only).
        attach: ``attach`` hook of the training run (e.g. progress lines).

    Returns:
        the finished training workflow and the test metrics of ``eval/metrics.csv``.
    """
    from monai_prompt.engine.runner import run_bundle

    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    overrides = {**overrides, "bundle_root": str(out_dir)}
    train = run_bundle(bundle, ["train.json"], quiet=not verbose, attach=attach, **overrides,
                       **{"train#trainer#max_epochs": epochs})
    run_bundle(bundle, ["train.json", "evaluate.json"], "infer", quiet=not verbose, **overrides)
    return train, read_metrics(out_dir / "eval" / "metrics.csv")


def read_metrics(path: Path) -> dict[str, float]:
    """The ``name,value`` rows of an evaluation's ``metrics.csv``."""
    with open(path) as f:
        return {name: float(value) for name, value in csv.reader(f)}


def pretrain(
    out_dir: str | Path,
    datalist: Path,
    config: DemoConfig = DemoConfig(),
    bundles: str | Path = BUNDLES,
    verbose: bool = False,
    print_fn: Callable[[str], None] = _print,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[Path, str]:
    """Run the ``vit_pretraining`` bundle into ``out_dir`` unless its checkpoint there is for the same inputs.

    The fingerprint covers the bundle's ``train.json``, the datalist and the overrides. A run of the same
    fingerprint that stopped early resumes from its newest ``checkpoint_epoch=<N>.pt``. ``overrides`` change the
    bundle's config further (e.g. the segmentation demo's ``img_size``, patch size and image list).

    Returns:
        the MAE checkpoint (``models/model.pt``) and what happened: ``"reused"``, ``"resumed"`` or ``"trained"``.
    """
    from monai_prompt.engine import latest_checkpoint
    from monai_prompt.engine.runner import run_bundle

    bundle, out_dir = _bundle("vit_pretraining", Path(bundles)), Path(out_dir)
    overrides = {
        **_encoder_shape(config, Path(bundles)),
        "dataset_dir": str(datalist.parent),
        "datalist_file": str(datalist),
        "batch_size": config.pretrain_batch_size,
        "train#trainer#max_epochs": config.pretrain_epochs,
        **(overrides or {}),
    }
    fingerprint = _fingerprint(_file_hash(bundle / "configs" / "train.json"), _file_hash(datalist), overrides)
    stamp, checkpoint = out_dir / "pretraining.json", out_dir / "models" / "model.pt"
    previous = _read_json(stamp)
    if previous.get("fingerprint") == fingerprint and previous.get("complete") and checkpoint.is_file():
        return checkpoint, "reused"
    try:
        resume = previous.get("fingerprint") == fingerprint and bool(latest_checkpoint(out_dir / "models"))
    except FileNotFoundError:
        resume = False
    if not resume:
        shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"fingerprint": fingerprint, "complete": False, "overrides": overrides}, indent=1))
    progress = EpochProgress("MAE", print_fn=print_fn)
    run_bundle(bundle, ["train.json"], quiet=not verbose, attach=attach_progress(progress), bundle_root=str(out_dir),
               resume=resume, **overrides)
    stamp.write_text(json.dumps({"fingerprint": fingerprint, "complete": True, "overrides": overrides}, indent=1))
    return checkpoint, "resumed" if resume else "trained"


def tune(
    out_dir: str | Path,
    datalist: Path,
    pretrained: Path | None,
    config: DemoConfig = DemoConfig(),
    bundles: str | Path = BUNDLES,
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
    train, metrics = train_and_evaluate(_bundle("dvpt_classification", Path(bundles)), Path(out_dir), overrides,
                                        config.tune_epochs, verbose, attach_progress(progress, "validate#evaluator"))
    report = trainable_report(train.parser.get_parsed_content("network"))
    return {"metrics": metrics, **{k: report[k] for k in ("trainable", "backbone", "percent_of_backbone")}}


def run_demo(
    out_dir: str | Path = "runs/demo",
    config: DemoConfig = DemoConfig(),
    compare_scratch: bool = False,
    bundles: str | Path = BUNDLES,
    verbose: bool = False,
    print_fn: Callable[[str], None] = _print,
) -> dict[str, Any]:
    """The main job: data, pre-training (cached), DVPT tuning and evaluation; prints progress and a summary.

    Args:
        out_dir: output folder (``data/``, ``vit_pretraining/``, ``dvpt_pretrained/``, ``dvpt_scratch/``,
            ``results.json``).
        config: sizes (:class:`DemoConfig`; :data:`TINY_DEMO` for a smoke run).
        compare_scratch: also tune and evaluate DVPT on a randomly initialised backbone.
        bundles: the bundles folder (default: the repository's).
        verbose: show the bundles' own logs (MONAI/ignite INFO lines).
        print_fn: where lines go.

    Returns:
        the results written to ``results.json``: test metrics per backbone, trainable counts, step timings.
    """
    warnings.filterwarnings("ignore", message="torch.meshgrid")  # MONAI's sin-cos position embedding
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")  # no GPU DICOM decoder: irrelevant here
    out_dir = Path(out_dir)
    steps = DemoSteps(4 if compare_scratch else 3, print_fn)
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
    t = results["timings"]
    lines.append("  time: " + ", ".join(f"{k.removesuffix('_s')} {_clock(v)}" for k, v in t.items()))
    lines.append(f"  outputs and results.json in {out_dir}")
    return "\n".join(lines)
