"""Import pre-trained ViT weights (HuggingFace transformers, timm, MONAI) into a MONAI ViT.

Files are read with ``safetensors`` or ``torch.load(weights_only=True)``; the layout is detected from the keys
and renamed to MONAI ViT's own keys. :func:`load_pretrained` then adapts the tensors to the target model: the
patch embedding to the target channels (RGB summed for 1 channel, as timm does) and, for a 3D target, inflated
from 2D kernels; the position embeddings by :func:`~monai_prompt.backbones.pos_embed.fit_pos_embed` (CLS
position folded into ``cls_token``, patch positions resized to the target grid).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from monai_prompt.backbones.pos_embed import fit_pos_embed, patch_grid
from monai_prompt.backbones.vit import BACKBONE_KEY, find_vit

__all__ = [
    "CheckpointError",
    "LoadReport",
    "convert_state_dict",
    "load_pretrained",
    "read_checkpoint",
]

logger = logging.getLogger(__name__)

#: nesting keys of training checkpoints (MONAI bundles, DINO, MAE, Lightning, ...).
_NESTING_KEYS = ("state_dict", "model", "network", "teacher", "module", "model_state_dict", "net")
#: a key that identifies each layout, by its suffix (anything before it is a prefix to strip).
_MARKERS = {
    "hf": "embeddings.patch_embeddings.projection.weight",
    "timm": "patch_embed.proj.weight",
    "monai": "patch_embedding.patch_embeddings.weight",
    "monai_perceptron": "patch_embedding.patch_embeddings.1.weight",
}
_TIMM_RENAMES = [
    (r"^patch_embed\.proj\.", "patch_embedding.patch_embeddings."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"blocks.\1.attn.out_proj."),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"blocks.\1.mlp.linear1."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"blocks.\1.mlp.linear2."),
]
_HF_RENAMES = [
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embedding.patch_embeddings."),
    (r"^embeddings\.cls_token$", "cls_token"),
    (
        r"^(?:encoder\.layer|layers)\.(\d+)\.(?:attention\.output\.dense|attention\.o_proj)\.",
        r"blocks.\1.attn.out_proj.",
    ),
    (r"^(?:encoder\.layer|layers)\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^(?:encoder\.layer|layers)\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^(?:encoder\.layer\.(\d+)\.intermediate\.dense|layers\.(\d+)\.mlp\.fc1)\.", r"blocks.\1\2.mlp.linear1."),
    (r"^(?:encoder\.layer\.(\d+)\.output\.dense|layers\.(\d+)\.mlp\.fc2)\.", r"blocks.\1\2.mlp.linear2."),
    (r"^layernorm\.", "norm."),
]
_HF_QKV = re.compile(
    r"^(?:encoder\.layer|layers)\.(\d+)\.attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)$"
)


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or converted; the message names the file, keys and shapes."""


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did.

    Attributes:
        path: the file or directory read.
        layout: detected layout (``hf``, ``timm``, ``monai`` or ``monai_perceptron``).
        loaded: MONAI keys that received weights.
        missing: backbone keys of the model the checkpoint did not provide.
        unexpected: checkpoint keys (original names) that were not used, e.g. heads or decoders.
        adapted: human-readable notes on position-embedding resizing and channel/kernel adaption.
    """

    path: str
    layout: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors from {self.path} ({self.layout} layout)"]
        lines += [f"  adapted: {note}" for note in self.adapted]
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        return "\n".join(lines)


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a weight file, or a HuggingFace model directory, into a flat tensor dict.

    Args:
        path: ``.safetensors``, ``.pth``/``.pt``/``.bin`` file, or a directory with ``model.safetensors`` or
            ``pytorch_model.bin`` (and optionally ``config.json``).

    Returns:
        the tensors and the HuggingFace ``config.json`` content (empty when there is none).
    """
    path = Path(path)
    config: dict = {}
    if path.is_dir():
        candidates = [path / n for n in ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise CheckpointError(f"{path}: directory holds none of {[c.name for c in candidates]}.")
        if (path / "config.json").is_file():
            config = json.loads((path / "config.json").read_text())
        path = found[0]
    elif not path.is_file():
        raise CheckpointError(f"{path}: no such file or directory.")
    elif (path.parent / "config.json").is_file() and path.name in ("model.safetensors", "pytorch_model.bin"):
        config = json.loads((path.parent / "config.json").read_text())
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path))
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors, zipfile and pickle raise many types for a damaged file
        raise CheckpointError(
            f"{path}: cannot be read as a weight file (truncated or not a checkpoint?): {err}"
        ) from err
    return _flatten(raw, path), config


def _flatten(raw: object, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap training checkpoints (``{"state_dict": ...}`` and similar) down to the tensor dict."""
    while isinstance(raw, dict) and not any(isinstance(v, torch.Tensor) for v in raw.values()):
        nested = [k for k in _NESTING_KEYS if isinstance(raw.get(k), dict)]
        if not nested:
            raise CheckpointError(f"{path}: no tensors found; top-level keys are {sorted(raw)[:20]}.")
        raw = raw[nested[0]]
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: holds a {type(raw).__name__}, not a state dict.")
    return {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}


def _detect(state: dict[str, torch.Tensor], path: str) -> tuple[str, str]:
    """Layout name and key prefix (e.g. ``vit.``, ``module.``, ``backbone.``) of a state dict."""
    for layout, marker in _MARKERS.items():
        hits = [k[: -len(marker)] for k in state if k.endswith(marker) and (k == marker or k[-len(marker) - 1] == ".")]
        if hits:
            return layout, min(hits, key=len)
    raise CheckpointError(
        f"{path}: not a ViT checkpoint in a known layout (HuggingFace, timm or MONAI): no key ends with "
        f"any of {list(_MARKERS.values())}; first keys: {sorted(state)[:8]}."
    )


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        new, count = re.subn(pattern, repl, key)
        if count:
            return new
    return key


def convert_state_dict(
    state: dict[str, torch.Tensor], path: str = "<state_dict>"
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]], str]:
    """Rename a HuggingFace/timm/MONAI ViT state dict to MONAI ViT keys (shapes untouched).

    ``patch_embedding.position_embeddings`` keeps the source's extra (CLS/distillation) slots at the front;
    :func:`load_pretrained` folds and resizes it for the target.

    Returns:
        the renamed tensors, a map from each MONAI key to its source keys, and the layout name.
    """
    layout, prefix = _detect(state, path)
    state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    out: dict[str, torch.Tensor] = {}
    source: dict[str, list[str]] = {}
    if layout == "hf":
        qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            match = _HF_QKV.match(key)
            if match:
                block, name, short, kind = match.groups()
                qkv.setdefault((block, kind), {})[(name or short)[0]] = value
                source.setdefault(f"blocks.{block}.attn.qkv.{kind}", []).append(prefix + key)
                continue
            new = "patch_embedding.position_embeddings" if key == "embeddings.position_embeddings" else key
            new = _rename(new, _HF_RENAMES)
            out[new], source[new] = value, [prefix + key]
        for (block, kind), parts in qkv.items():
            if set(parts) != {"q", "k", "v"}:
                raise CheckpointError(f"{path}: block {block} has attention {kind} for {sorted(parts)} only.")
            out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    else:
        final_norm = _mae_final_norm(state)
        for key, value in state.items():
            new = re.sub(rf"^blocks\.{final_norm}\.", "norm.", key) if final_norm is not None else key
            if layout == "timm":
                new = {"pos_embed": "patch_embedding.position_embeddings"}.get(key, _rename(key, _TIMM_RENAMES))
            out[new], source[new] = value, [prefix + key]
    return out, source, layout


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


def load_pretrained(
    model: torch.nn.Module,
    path: str | Path,
    strict: bool = True,
    src_grid: tuple[int, ...] | None = None,
) -> LoadReport:
    """Load pre-trained ViT weights of any supported layout into a MONAI ViT (in place).

    Args:
        model: a MONAI ViT (e.g. from :func:`~monai_prompt.backbones.build_vit`), or a network holding one
            as ``backbone``/``vit`` (PromptClassifier, UNETR). Load before applying a PEFT method.
        path: HuggingFace model directory or weight file, timm or MONAI ``.safetensors``/``.pth``/``.bin``.
        strict: raise if any backbone weight of ``model`` is missing from the file. Unused checkpoint keys
            (heads, decoders) are only reported.
        src_grid: patch grid of the checkpoint's position embeddings when it is not square/cubic and the
            file has no ``config.json``.

    Returns:
        a :class:`LoadReport` (also logged).

    Raises:
        CheckpointError: unreadable file, unknown layout or a shape that cannot be adapted (the message names
            the file, key and both shapes).
    """
    vit = find_vit(model)
    tensors, config = read_checkpoint(path)
    converted, source, layout = convert_state_dict(tensors, str(path))
    report = LoadReport(path=str(path), layout=layout)
    if config and "layer_norm_eps" in config:
        eps = vit.norm.eps
        if not math.isclose(config["layer_norm_eps"], eps, rel_tol=1e-3):
            logger.warning(f"{path}: checkpoint LayerNorm eps {config['layer_norm_eps']} but the model uses {eps}.")
    target = vit.state_dict()
    patch_key, pos_key = "patch_embedding.patch_embeddings.weight", "patch_embedding.position_embeddings"
    if layout == "monai_perceptron":
        weight = converted.pop("patch_embedding.patch_embeddings.1.weight")
        converted[patch_key] = _perceptron_to_conv(weight, target[patch_key])
        converted["patch_embedding.patch_embeddings.bias"] = converted.pop("patch_embedding.patch_embeddings.1.bias")
        source[patch_key] = source.pop("patch_embedding.patch_embeddings.1.weight")
        source["patch_embedding.patch_embeddings.bias"] = source.pop("patch_embedding.patch_embeddings.1.bias")
    src_dims = converted[patch_key].dim() - 2
    if patch_key in target:
        converted[patch_key] = _adapt_patch_weight(converted[patch_key], target[patch_key], report.adapted)
    if pos_key in converted and pos_key in target:
        try:
            converted[pos_key], cls_token, notes = fit_pos_embed(
                converted[pos_key],
                patch_grid(vit),
                cls_token=converted.get("cls_token") if "cls_token" in target else None,
                src_grid=src_grid,
                src_dims=src_dims,
                config=config,
                n_prefix_hint=0 if layout.startswith("monai") else 1,
            )
        except ValueError as err:
            raise CheckpointError(f"{path}: {err}") from err
        if cls_token is not None:
            converted["cls_token"] = cls_token
        report.adapted += notes
    state = {}
    for key, value in converted.items():
        if key not in target or not BACKBONE_KEY.match(key):
            continue
        if value.shape != target[key].shape:
            raise CheckpointError(
                f"{path}: key {source.get(key, [key])[0]!r} (MONAI {key!r}) has shape {tuple(value.shape)} but the "
                f"model expects {tuple(target[key].shape)}; the checkpoint is for another width/depth/patch size."
            )
        state[key] = value.to(target[key].dtype)
    vit.load_state_dict(state, strict=False)
    report.loaded = sorted(state)
    report.missing = sorted(k for k in target if BACKBONE_KEY.match(k) and k not in state)
    used = {src for key in state for src in source.get(key, ())}
    report.unexpected = sorted(k for k in tensors if k not in used and "norm_cross_attn" not in k)
    logger.info(str(report))
    if strict and report.missing:
        raise CheckpointError(
            f"{path}: the checkpoint lacks {len(report.missing)} backbone weights of the model: {report.missing[:10]}"
            f"; pass strict=False to load the rest."
        )
    return report
