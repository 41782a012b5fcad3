"""Measure what the bundle READMEs report, into ``measurements.json``: ``python -m monai_prompt.bundle_gen.measure``.

1. Trainable parameters and delta size of each bundle's default network (ViT-B/16 at the bundle's ``img_size``,
   3 classes; built, never run).
2. A demo run of each bundle through ``python -m monai.bundle run`` on the demo data (``monai-prompt demo-data``):
   no ImageNet ViT ships in any installable package, so the backbone is a small ViT pre-trained here with MONAI's
   ``MaskedAutoEncoderViT`` (self-supervised, on the training and unlabeled images only, without labels), then
   tuned by each method; train time per epoch, peak RSS and test metrics (``evaluate.json``) are recorded.

Then ``monai-prompt render-bundles`` writes the numbers into the READMEs.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from monai_prompt.bundle_gen.specs import BUNDLE_SPECS, BundleSpec

__all__ = ["demo_run", "parameter_counts", "pretrain_mae"]

#: the demo backbone: width 64, 4 blocks, 4 heads, patch 8 at 32 x 32 (16 patches); MONAI LayerNorm eps.
DEMO_BACKBONE = {"hidden_size": 64, "num_layers": 4, "num_heads": 4, "mlp_dim": 256, "patch_size": 8}
DEMO_IMG_SIZE = 32


def parameter_counts(spec: BundleSpec, bundles: Path) -> dict[str, Any]:
    """Trainable count, % of the backbone and delta bytes of the bundle's default network."""
    from monai.bundle import ConfigParser

    from monai_prompt.peft import delta_state_dict, trainable_report

    parser = ConfigParser()
    parser.read_config(str(bundles / spec.name / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def")
    report = trainable_report(net)
    buffer = io.BytesIO()
    torch.save(delta_state_dict(net), buffer)
    return {
        "trainable": report["trainable"],
        "backbone": report["backbone"],
        "percent_of_backbone": report["percent_of_backbone"],
        "delta_bytes": buffer.getbuffer().nbytes,
    }


def pretrain_mae(data_dir: Path, out: Path, epochs: int = 40, seed: int = 0) -> Path:
    """Pre-train :data:`DEMO_BACKBONE` as a MONAI ``MaskedAutoEncoderViT`` on the demo's training and unlabeled
    images (labels unused; validation and test slabs never seen) and save its state dict to ``out``."""
    from einops import rearrange
    from monai.networks.nets import MaskedAutoEncoderViT
    from monai.transforms import Compose

    from monai_prompt.data import classification_transforms, read_datalist

    torch.manual_seed(seed)
    datalist = read_datalist(data_dir / "datalist.json")
    items = [{"image": item["image"]} for split in ("training", "unlabeled") for item in datalist[split]]
    load = Compose(classification_transforms(DEMO_IMG_SIZE, 2, 3))
    images = torch.stack([load(item)["image"].as_tensor() for item in items])  # loaded once: [N, 3, 32, 32]
    batch_size = 64
    patch = DEMO_BACKBONE["patch_size"]
    mae = MaskedAutoEncoderViT(
        in_channels=3, img_size=DEMO_IMG_SIZE, patch_size=patch, hidden_size=DEMO_BACKBONE["hidden_size"],
        mlp_dim=DEMO_BACKBONE["mlp_dim"], num_layers=DEMO_BACKBONE["num_layers"],
        num_heads=DEMO_BACKBONE["num_heads"], masking_ratio=0.5, decoder_hidden_size=64, decoder_mlp_dim=256,
        decoder_num_layers=2, decoder_num_heads=4, spatial_dims=2, qkv_bias=True,
    )
    optimizer = torch.optim.AdamW(mae.parameters(), lr=1.5e-3, weight_decay=0.05)
    steps = -(-len(images) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1.5e-3, total_steps=epochs * steps)
    for epoch in range(epochs):
        total = 0.0
        for index in torch.randperm(len(images)).split(batch_size):
            image = images[index]
            flip = torch.rand(len(image)) < 0.5
            image = torch.where(flip[:, None, None, None], image.flip(-2), image)  # the bundles' RandFlip axis
            target = rearrange(image, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch, p2=patch)
            pred, mask = mae(image)
            loss = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item()
        print(f"MAE epoch {epoch + 1}/{epochs}: masked-patch MSE {total / steps:.4f}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(mae.state_dict(), out)
    return out


def _overrides(spec: BundleSpec, data_dir: Path, backbone: Path, epochs: int) -> list[str]:
    overrides: dict[str, Any] = {
        "dataset_dir": str(data_dir),
        "pretrained": str(backbone),
        "backbone": "vit_tiny",
        "backbone_overrides": DEMO_BACKBONE,
        "img_size": DEMO_IMG_SIZE,
        "layer_norm_eps": 1e-5,
        "batch_size": 32,
        "num_workers": 1,
        "cache_rate": 1.0,
        "train#trainer#max_epochs": epochs,
    }
    if spec.fpt:
        overrides["method_config#side_img_size"] = DEMO_IMG_SIZE // 2
    return [item for key, value in overrides.items() for item in (f"--{key}", repr(value))]


def demo_run(spec: BundleSpec, bundles: Path, work: Path, data_dir: Path, backbone: Path, epochs: int) -> dict:
    """Train and evaluate a copy of the bundle on the demo data through ``python -m monai.bundle run``."""
    bundle = work / "bundles" / spec.name
    shutil.rmtree(bundle, ignore_errors=True)
    shutil.copytree(bundles / spec.name, bundle)
    args = _overrides(spec, data_dir, backbone, epochs)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    train = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json", *args],
        cwd=bundle, env=env, capture_output=True, text=True, check=True,
    ).stdout
    subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "['configs/train.json','configs/evaluate.json']",
         *args], cwd=bundle, env=env, capture_output=True, text=True, check=True,
    )
    seconds = [
        int(h) * 3600 + int(m) * 60 + float(s)
        for h, m, s in re.findall(r"SupervisedTrainer - INFO - Epoch\[\d+\] Complete\. Time taken: (\d+):(\d+):([\d.]+)",
                                  train)
    ]
    peak = max(float(v) for v in re.findall(r"peak_rss_mb: ([\d.]+)", train))
    with open(bundle / "eval" / "metrics.csv") as f:
        metrics = {row[0]: float(row[1]) for row in csv.reader(f)}
    return {"epochs": epochs, "seconds_per_epoch": sum(seconds) / len(seconds), "peak_rss_mb": peak, **metrics}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="bundles (default: all)")
    parser.add_argument("--bundles", default="bundles", help="the bundles folder")
    parser.add_argument("--work", default="runs/measure", help="scratch folder (demo data, backbone, bundle copies)")
    parser.add_argument("--epochs", type=int, default=8, help="demo training epochs per bundle")
    parser.add_argument("--mae-epochs", type=int, default=40, help="MAE pre-training epochs")
    parser.add_argument("--no-demo", action="store_true", help="only count parameters")
    args = parser.parse_args(argv)
    from monai_prompt.data import build_demo_data

    bundles, work = Path(args.bundles), Path(args.work).absolute()
    target = Path(__file__).with_name("measurements.json")
    measured = json.loads(target.read_text())
    names = args.names or list(BUNDLE_SPECS)
    data_dir, backbone = work / "demo_data", work / "mae_vit.pt"
    if not args.no_demo:
        if not (data_dir / "datalist.json").is_file():
            build_demo_data(data_dir)
        if not backbone.is_file():
            start = time.monotonic()
            pretrain_mae(data_dir, backbone, args.mae_epochs)
            measured["mae_minutes"] = round((time.monotonic() - start) / 60, 1)
    for name in names:
        spec = BUNDLE_SPECS[name]
        entry = measured.setdefault("bundles", {}).setdefault(name, {})
        entry["parameters"] = parameter_counts(spec, bundles)
        if not args.no_demo:
            entry["demo_run"] = demo_run(spec, bundles, work, data_dir, backbone, args.epochs)
        print(name, json.dumps(entry), flush=True)
        measured.update(
            date=datetime.date.today().isoformat(),
            hardware=f"{platform.machine()} CPU, {os.cpu_count()} cores (shared with other jobs), torch "
            f"{torch.__version__}, no GPU",
        )
        target.write_text(json.dumps(measured, indent=1) + "\n")


if __name__ == "__main__":
    main()
