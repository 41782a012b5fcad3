"""The demo classification task, which ``monai-prompt demo`` runs and the bundle and accuracy benchmarks measure on:
its sizes (:class:`DemoConfig`, :data:`TINY_DEMO`), its data built once and reused (:func:`prepare_data`: the
MNI152 T1 tissue patches of :mod:`monai_prompt.data.demo`) and its encoder, MAE-pre-trained by the
``bundles/vit_pretraining`` bundle and cached by a fingerprint (:func:`pretrain`), with the overrides that give a
classification bundle that encoder (:func:`pretrained_overrides`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai_prompt.runs.bundles import find_bundle
from monai_prompt.runs.progress import EpochProgress, attach_progress

__all__ = [
    "DEMO_DVPT",
    "MONAI_LAYER_NORM_EPS",
    "TINY_DEMO",
    "DemoConfig",
    "prepare_data",
    "pretrain",
    "pretrained_overrides",
]

#: DVPT for a 64-token input on a CPU: 10 prompts (the paper's 50 would almost double the tokens), a module per block.
DEMO_DVPT = {"num_prompts": 10, "bottleneck": 16, "share": 1, "variant": "paper"}
#: LayerNorm epsilon of MONAI's ``MaskedAutoEncoderViT`` (``nn.LayerNorm`` default); the tuned ViT must match it.
MONAI_LAYER_NORM_EPS = 1e-5
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


def _encoder_shape(config: DemoConfig, bundles: str | os.PathLike | None) -> dict[str, Any]:
    """The encoder shape both bundles get: the pre-training bundle's defaults, replaced by ``config``'s."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(find_bundle("vit_pretraining", bundles) / "configs" / "train.json"))
    shape = {key: parser[key] for key in ("backbone", "backbone_overrides", "img_size", "in_channels", "spatial_dims")}
    if config.backbone_overrides is not None:
        shape["backbone_overrides"] = dict(config.backbone_overrides)
    return shape


def pretrained_overrides(
    config: DemoConfig, pretrained: Path | None, bundles: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Overrides that give a classification bundle the demo backbone: the encoder shape :func:`pretrain` trains,
    its checkpoint as ``pretrained`` (``None``: randomly initialised) and MONAI's LayerNorm epsilon.

    Args:
        config: demo sizes (``backbone_overrides``).
        pretrained: the MAE checkpoint :func:`pretrain` returns, or ``None``.
        bundles: the bundles folder (default: the package's).
    """
    return {
        **_encoder_shape(config, bundles),
        "pretrained": None if pretrained is None else str(pretrained),
        "layer_norm_eps": MONAI_LAYER_NORM_EPS,
    }


def pretrain(
    out_dir: str | Path,
    datalist: Path,
    config: DemoConfig = DemoConfig(),
    bundles: str | os.PathLike | None = None,
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
    from monai_prompt.runs.runner import run_bundle

    bundle, out_dir = find_bundle("vit_pretraining", bundles), Path(out_dir)
    overrides = {
        **_encoder_shape(config, bundles),
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


