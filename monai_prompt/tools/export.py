"""``monai-prompt export``: one self-contained file from a bundle's delta, with the method merged where possible.

The bundle's ``network_def`` is built from ``configs/inference.json`` (it loads the pre-trained backbone), the
delta is loaded on top (checked against method, config and backbone), and every mergeable layer (LoRA, SSF:
see :func:`~monai_prompt.peft.merge.merge_and_unload`) is folded into the backbone weights. If the merged
network then has exactly the state-dict keys of ``PromptClassifier(method="full")`` (as with LoRA, SSF and the
methods that add nothing: full, linear, BitFit), the export is that *plain* network, loadable without the
method's code; otherwise (prompts, adapters, DVPT, EPT, and FPT, which is never merged) it is the tuned network's
full state dict with the method's modules.

The exported network is checked against the tuned one on a random input before anything is written; files are
written atomically: ``models/model_full.pt`` (state dict) and ``models/model_full.ts`` (TorchScript).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser
from monai.networks.utils import convert_to_torchscript

from monai_prompt.backbones.registry import find_backbone
from monai_prompt.io import atomic_write
from monai_prompt.peft.delta import load_delta
from monai_prompt.peft.merge import merge_and_unload

__all__ = ["ExportReport", "export_bundle"]


@dataclass
class ExportReport:
    """What :func:`export_bundle` wrote.

    Attributes:
        method: the bundle's method.
        merged: the method was merged into a plain network.
        state_dict: path of the state dict.
        torchscript: path of the TorchScript file.
        max_abs_diff: largest logit difference between the exported and the tuned network on a random input.
    """

    method: str
    merged: bool
    state_dict: Path
    torchscript: Path
    max_abs_diff: float

    def __str__(self) -> str:
        kind = "merged into a plain network" if self.merged else "full state dict with the method's modules"
        return (
            f"{self.method}: {kind}; wrote {self.state_dict} and {self.torchscript} "
            f"(max |logit difference| vs the tuned network {self.max_abs_diff:.2e})"
        )


def _parser(bundle: Path, overrides: dict[str, Any]) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser.update({"bundle_root": str(bundle), **overrides})
    return parser


def export_bundle(
    bundle: str | os.PathLike,
    ckpt: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    merge: bool = True,
    overrides: dict[str, Any] | None = None,
    atol: float = 1e-4,
) -> ExportReport:
    """Export a bundle's delta as a full state dict and TorchScript.

    Args:
        bundle: the bundle folder.
        ckpt: the delta (default ``<bundle>/models/model.pt``); the network is built from the training record
            beside it (``training_config.json``), unless ``overrides`` give another ``ckpt_dir``.
        out_dir: output folder (default ``<bundle>/models``).
        merge: fold mergeable layers into the weights and export a plain network where the result is one.
        overrides: config overrides, e.g. ``{"pretrained": "vit.safetensors"}`` (as on the bundle command line).
        atol: largest logit difference accepted between the exported and the tuned network.

    Raises:
        FileNotFoundError: ``bundle`` is no bundle folder, or the delta is missing.
        DeltaMismatchError: the delta belongs to another method, config or backbone.
        RuntimeError: the exported network's logits differ from the tuned network's by more than ``atol``.
    """
    bundle = Path(bundle)
    overrides = dict(overrides or {})
    ckpt = Path(ckpt) if ckpt is not None else bundle / "models" / "model.pt"
    overrides.setdefault("ckpt_dir", str(ckpt.parent))  # where inference.json reads the training record
    out = Path(out_dir) if out_dir is not None else bundle / "models"
    if not (bundle / "configs" / "inference.json").is_file():
        raise FileNotFoundError(f"{bundle} is not a bundle folder: it has no configs/inference.json.")
    parser = _parser(bundle, overrides)
    method = parser.get_parsed_content("method")
    network = parser.get_parsed_content("network_def").eval()
    load_delta(network, ckpt)
    vit = find_backbone(network)
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(2, vit.config["in_channels"], *vit.img_size, generator=generator)
    with torch.no_grad():
        reference = network(example)
    exported, merged = network, False
    if merge and not hasattr(network, "lpm"):  # FPT's LPM and side network keep their modules
        merge_and_unload(network)
        # a plain network needs no pre-trained weights, except to read its architecture from them (backbone="auto")
        auto = parser.get_parsed_content("backbone", default=None) == "auto"
        weights = parser.get_parsed_content("pretrained") if auto else None
        # inference.json's network reads trained_method_config: the recorded config with method_config's changes
        no_method = {"method": "full", "method_config": {}, "trained_method_config": {}}
        plain_config = {**overrides, **no_method, "pretrained": weights}
        plain = _parser(bundle, plain_config).get_parsed_content("network_def").eval()
        state = network.state_dict()
        merged = state.keys() == plain.state_dict().keys()  # nothing left that a plain network lacks
        if merged:
            plain.load_state_dict(state, strict=True)
            exported = plain
    with torch.no_grad():
        difference = float((exported(example) - reference).abs().max())
    if difference > atol:
        raise RuntimeError(f"exported {method} network differs from the tuned one by {difference:.2e} > {atol}.")
    out.mkdir(parents=True, exist_ok=True)
    state_path, script_path = out / "model_full.pt", out / "model_full.ts"
    atomic_write(state_path, lambda tmp: torch.save(exported.state_dict(), tmp))
    meta = json.dumps(parser.get("_meta_", {})).encode()
    atomic_write(
        script_path,
        lambda tmp: convert_to_torchscript(
            exported, filename_or_obj=tmp, extra_files={"metadata.json": meta}, verify=True, inputs=[example]
        ),
    )
    return ExportReport(method, merged, state_path, script_path, difference)
