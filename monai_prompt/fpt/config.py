"""Hyper-parameters of FPT (MICCAI 2024) and FPT+ (TNNLS 2025), one dataclass with a named variant.

The two variants differ only in defaults (official configs ``configs/network/FPT.yaml`` and ``FPT+.yaml``):

========================  =========================  ==============================
field                     ``fpt``                    ``fptplus``
========================  =========================  ==============================
side_img_size             224 at a 512 px LPM input  128 at a 512 px LPM input
layers                    ``"all"`` (0..depth-1)     ``"last_half"`` (6..11 of 12)
prompt_reduction          8 (prompt dim D/8)         1 (prompt dim D)
prompt_norm               False                      True
prompt_proj               True (D/8 -> D)            False
========================  =========================  ==============================

The side input follows the LPM's: left ``None``, it is the variant's size at the papers' 512 px scaled to the LPM
input (:func:`default_side_img_size`), so a small LPM input never gets a larger side network.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = [
    "FPT_VARIANTS", "PAPER_LPM_IMG_SIZE", "PAPER_SIDE_IMG_SIZE", "TOKEN_IMPORTANCE", "FPTConfig",
    "default_side_img_size", "resolve_layers",
]

#: variant -> the defaults that distinguish it (the side input size: :data:`PAPER_SIDE_IMG_SIZE`).
FPT_VARIANTS: dict[str, dict] = {
    "fpt": {"layers": "all", "prompt_reduction": 8, "prompt_norm": False, "prompt_proj": True},
    "fptplus": {
        "layers": "last_half",
        "prompt_reduction": 1,
        "prompt_norm": True,
        "prompt_proj": False,
    },
}
#: the LPM input size of the papers' (official) configs.
PAPER_LPM_IMG_SIZE = 512
#: variant -> the side network's input size at :data:`PAPER_LPM_IMG_SIZE`.
PAPER_SIDE_IMG_SIZE = {"fpt": 224, "fptplus": 128}
#: ways to rank LPM tokens: mean attention received over all queries, or attention from the CLS query.
TOKEN_IMPORTANCE = ("global", "class_token")


@dataclass
class FPTConfig:
    """FPT / FPT+ configuration; fields left ``None`` take the variant's default.

    Args:
        variant: ``"fpt"`` or ``"fptplus"``.
        side_img_size: input size of the side network (one int, repeated over spatial dims), at most the LPM's;
            ``None``: :func:`default_side_img_size` of the LPM input (224 for FPT, 128 for FPT+ at 512 px).
        layers: LPM layers to tap, one per side block: ``"all"``, ``"last_half"`` or a strictly increasing list
            of 0-based block indices.
        num_prompts: fine-grained prompts per tapped layer.
        token_ratio: fraction of LPM tokens kept per head, ``int(N * token_ratio)``.
        token_importance: ``"global"`` (mean attention a token receives) or ``"class_token"`` (from CLS).
        side_reduction: side-network width is ``D / side_reduction``.
        prompt_reduction: prompt width is ``D / prompt_reduction``.
        prompt_norm: LayerNorm on the prompts before they query the LPM keys.
        prompt_proj: Linear from the prompt width to ``D`` before the cross-attention.
        fusion_dropout: dropout on the fused prompts.
    """

    variant: str = "fptplus"
    side_img_size: int | None = None
    layers: str | list[int] | None = None
    num_prompts: int = 16
    token_ratio: float = 0.2
    token_importance: str = "global"
    side_reduction: int = 8
    prompt_reduction: int | None = None
    prompt_norm: bool | None = None
    prompt_proj: bool | None = None
    fusion_dropout: float = 0.5

    def __post_init__(self) -> None:
        if self.variant not in FPT_VARIANTS:
            raise ValueError(f"unknown FPT variant {self.variant!r}; use one of {sorted(FPT_VARIANTS)}.")
        for name, value in FPT_VARIANTS[self.variant].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.token_importance not in TOKEN_IMPORTANCE:
            raise ValueError(f"token_importance {self.token_importance!r} is not one of {TOKEN_IMPORTANCE}.")
        if not 0.0 < self.token_ratio <= 1.0:
            raise ValueError(f"token_ratio {self.token_ratio} must be in (0, 1].")
        if not 0.0 <= self.fusion_dropout < 1.0:
            raise ValueError(f"fusion_dropout {self.fusion_dropout} must be in [0, 1).")
        for name in ("num_prompts", "side_reduction", "prompt_reduction", "side_img_size"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")

    @classmethod
    def from_dict(cls, variant: str, overrides: dict | None = None) -> FPTConfig:
        """``FPTConfig(variant, **overrides)`` with a clear error for unknown keys."""
        overrides = dict(overrides or {})
        valid = {f.name for f in fields(cls)} - {"variant"}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ValueError(f"unknown FPT config keys {unknown}; valid keys: {sorted(valid)}.")
        return cls(variant=variant, **overrides)


def default_side_img_size(variant: str, lpm_img_size: int, patch_size: int) -> int:
    """The side network's input size for an LPM input of ``lpm_img_size``: the variant's size at the papers' 512 px
    (:data:`PAPER_SIDE_IMG_SIZE`: 224 FPT, 128 FPT+) scaled by ``lpm_img_size / 512``, in whole patches (at least one,
    at most the LPM input).

    Args:
        variant: ``"fpt"`` or ``"fptplus"``.
        lpm_img_size: the LPM's input size (the smallest side of a non-square one).
        patch_size: the LPM's (and the side network's) patch size.
    """
    patches = round(PAPER_SIDE_IMG_SIZE[variant] * lpm_img_size / PAPER_LPM_IMG_SIZE / patch_size)
    return min(max(patches, 1) * patch_size, lpm_img_size)


def resolve_layers(layers: str | list[int], depth: int, candidates: list[int] | None = None) -> list[int]:
    """Tapped LPM block indices for an LPM of ``depth`` blocks.

    Args:
        layers: ``"all"`` (every candidate), ``"last_half"`` (the last ``len(candidates) // 2`` candidates, at least
            one: 6..11 for ViT-B, 12..23 for ViT-L) or a strictly increasing list of block indices.
        depth: number of LPM blocks.
        candidates: the blocks the keywords choose from (default: all ``depth``; the SAM encoder's global-attention
            blocks, the TinyViT's last stage).
    """
    candidates = list(range(depth)) if candidates is None else list(candidates)
    if layers == "all":
        return candidates
    if layers == "last_half":
        return candidates[len(candidates) - max(len(candidates) // 2, 1) :]
    if isinstance(layers, str):
        raise ValueError(f"layers {layers!r} is not 'all', 'last_half' or a list of block indices.")
    resolved = [int(i) for i in layers]
    if not resolved or any(i < 0 or i >= depth for i in resolved) or sorted(set(resolved)) != resolved:
        raise ValueError(f"layers {resolved} must be strictly increasing block indices in [0, {depth - 1}].")
    return resolved
