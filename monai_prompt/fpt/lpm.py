"""The frozen large pre-trained model (LPM) of FPT: an encoder that hands out its own keys and values.

:class:`FrozenLPM` is what every LPM shares (frozen, eval mode, releasable, fingerprinted, ``extract``);
:class:`LPMExtractor` is the plain ViT's. The SAM-family encoders' LPMs (windowed attention, no CLS) are in
:mod:`monai_prompt.fpt.grid_lpm`; :func:`build_lpm` builds the one of the family ``backbone`` names.

On a ViT, for every tapped block ``l`` it computes ``X = norm1(x_l)``, the block's frozen keys and values
``K_l, V_l = project_qkv(X)`` ([B, H, N, d_h], heads split) and the attention probabilities
``A_l = softmax(Q_l K_l^T / sqrt(d_h))``, then keeps per head the ``int(N * token_ratio)`` most important tokens
(:func:`select_important_tokens`). The blocks continue with the same probabilities, so nothing is computed
twice; blocks after the last tapped one are skipped (they cannot change the result). Everything runs under
``torch.no_grad``: no gradient ever reaches the LPM and no LPM activation is kept.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from monai_prompt.backbones.blocks import PromptBlock
from monai_prompt.backbones.pretrained import load_pretrained
from monai_prompt.backbones.registry import (
    BackboneFamily,
    BackboneRequest,
    build_backbone,
    get_family,
    plain_request,
    register_family,
)
from monai_prompt.backbones.vit import PromptableViT, TokenPrompter
from monai_prompt.fpt.config import FPT_VARIANTS, TOKEN_IMPORTANCE, resolve_layers
from monai_prompt.peft.delta import backbone_fingerprint
from monai_prompt.peft.registry import check_family

__all__ = ["FrozenLPM", "LPMExtractor", "build_lpm", "keep_top_tokens", "select_important_tokens"]

#: what FPT needs of an LPM (said when a family is refused).
LPM_FAMILIES_NEED = "the keys and values of its attention blocks (a ViT, the SAM ViT image encoder or the TinyViT)"


def select_important_tokens(
    probs: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, num_keep: int, importance: str = "global"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep, per sample and head, the ``num_keep`` keys/values with the highest importance score.

    Args:
        probs: attention probabilities [B, H, N, N] (rows are queries, columns keys).
        keys: [B, H, N, d_h].
        values: [B, H, N, d_h].
        num_keep: tokens kept per head.
        importance: ``"global"``: mean attention each key receives over all queries; ``"class_token"``:
            attention from the CLS query (token 0). The CLS token itself may be selected.

    Returns:
        selected keys and values, each [B, H, num_keep, d_h], in descending score order.
    """
    if importance == "class_token":
        score = probs[:, :, 0]
    else:
        score = probs.mean(dim=-2)
    return keep_top_tokens(score, keys, values, num_keep)


def keep_top_tokens(
    score: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, num_keep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``num_keep`` keys/values of highest ``score`` per sample and head, in descending score order.

    Args:
        score: importance [B, H, N].
        keys: [B, H, N, d_h].
        values: [B, H, N, d_h].
        num_keep: tokens kept per head.
    """
    index = score.topk(num_keep, dim=-1).indices.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
    return keys.gather(-2, index), values.gather(-2, index)


class FrozenLPM:
    """What every FPT LPM adds to its encoder class (listed first among the bases): it stays frozen and in eval
    mode, can free its weights (:meth:`release`) and keep its fingerprints, and hands out :meth:`extract`.

    A subclass calls :meth:`init_lpm` once its encoder is built and implements ``_extract``. Attributes for the
    side network and the fusion: ``kv_width`` / ``kv_heads`` (width and heads of the tapped blocks) and
    :meth:`side_settings`.
    """

    def init_lpm(
        self, layers: list[int], token_ratio: float, token_importance: str, num_tokens: int, width: int, heads: int
    ) -> None:
        """Record the extraction settings, freeze the weights and switch to eval mode.

        Args:
            layers: the tapped blocks (resolved indices), kept as ``taps``.
            token_ratio: fraction of the ``num_tokens`` tokens kept per head.
            token_importance: one of :data:`~monai_prompt.fpt.config.TOKEN_IMPORTANCE`.
            num_tokens: tokens of a tapped block's attention, ``N``.
            width: width of the tapped blocks, ``D``.
            heads: attention heads of the tapped blocks, ``H``.
        """
        if token_importance not in TOKEN_IMPORTANCE:
            raise ValueError(f"token_importance {token_importance!r} is not one of {TOKEN_IMPORTANCE}.")
        self.taps = list(layers)
        self.last_layer = self.taps[-1]
        self.token_ratio = float(token_ratio)
        self.token_importance = token_importance
        self.num_keep = int(num_tokens * token_ratio)
        if self.num_keep < 1:
            raise ValueError(f"token_ratio {token_ratio} keeps no token of {num_tokens}; raise it.")
        self.kv_width = int(width)
        self.kv_heads = int(heads)
        self.requires_grad_(False)
        self.eval()
        self.released = False

    def side_settings(self) -> dict[str, Any]:
        """``in_channels``, ``patch_size``, ``spatial_dims`` and ``layer_norm_eps`` of the side ViT."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> FrozenLPM:
        """The LPM stays in eval mode whatever the parent network does."""
        return super().train(False)

    @torch.jit.unused
    def release(self) -> None:
        """Free the frozen weights (they move to the meta device) but keep what identifies them.

        :meth:`fingerprint` (what a preload cache must match) and the backbone fingerprint a delta is tied to
        (``recorded_fingerprint``, read by :func:`~monai_prompt.peft.delta.backbone_fingerprint`) are computed
        first and kept, as are the config and the parameter shapes (parameter counts). Afterwards device moves
        and casts leave the LPM alone and :meth:`extract` raises: for training from preloaded features only.
        """
        if self.released:
            return
        self.recorded_fingerprint = backbone_fingerprint(self)
        self.recorded_cache_fingerprint = self.fingerprint()
        self.to("meta")
        self.released = True

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> FrozenLPM:
        """``to``/``cuda``/``float``/... of a released LPM do nothing: it has no weights to move."""
        if getattr(self, "released", False):
            return self
        return super()._apply(fn, recurse)

    @property
    def feature_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one image's features: (2 for K/V, tapped layers, heads, kept tokens, head dim)."""
        return 2, len(self.taps), self.kv_heads, self.num_keep, self.kv_width // self.kv_heads

    def extraction_config(self) -> dict[str, Any]:
        """What, besides the weights, determines the features."""
        return {"layers": self.taps, "token_ratio": self.token_ratio, "token_importance": self.token_importance}

    @torch.jit.unused
    def fingerprint(self) -> str:
        """SHA-256 over the ViT architecture, its weights and :meth:`extraction_config` (cache validity)."""
        if self.released:
            return self.recorded_cache_fingerprint
        digest = hashlib.sha256(backbone_fingerprint(self).encode())
        digest.update(json.dumps(self.extraction_config(), sort_keys=True).encode())
        return digest.hexdigest()

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        """Selected keys and values of the tapped blocks, ``[B, 2, L, H, n, d_h]`` (index 0 keys, 1 values).

        Args:
            x: image at the LPM's input size, [B, C, *img_size].
        """
        if self.released:
            raise RuntimeError(
                "the FPT LPM's weights were released (FPTClassifier.release_lpm) for training from the preload cache; "
                "pass the cached features (network(image, fpt_kv)) or build a new FPTClassifier with pretrained= to "
                "run the LPM online."
            )
        if list(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"LPM input spatial size {list(x.shape[2:])} differs from the LPM size {self.img_size}; resize the "
                f"image (e.g. monai_prompt.data.classification_transforms) to the size the FPT model was built for."
            )
        with torch.no_grad():
            return self._extract(x)


class LPMExtractor(FrozenLPM, PromptableViT):
    """A frozen :class:`PromptableViT` (same state_dict keys) with :meth:`extract` for FPT's K/V features.

    Args:
        vit_config: the ``config`` of a :class:`PromptableViT` (``build_vit(...).config``).
        layers: tapped blocks: ``"all"``, ``"last_half"`` or strictly increasing indices.
        token_ratio: fraction of the ``N`` tokens kept per head.
        token_importance: ``"global"`` or ``"class_token"`` (see :func:`select_important_tokens`).
    """

    def __init__(
        self,
        vit_config: dict[str, Any],
        layers: str | list[int],
        token_ratio: float = 0.2,
        token_importance: str = "global",
    ) -> None:
        super().__init__(**vit_config)
        if token_importance == "class_token" and not vit_config.get("cls_token", True):
            raise ValueError("token_importance='class_token' needs an LPM with a CLS token (cls_token=True).")
        depth = len(self.blocks)
        tapped = resolve_layers(layers, depth)
        self.tapped = [i in tapped for i in range(depth)]
        self.init_lpm(tapped, token_ratio, token_importance, self.num_tokens, self.hidden_size, self.num_heads)

    def weight_device(self) -> torch.device:
        """The device of the weights (where :meth:`extract` runs)."""
        return self.norm.weight.device

    def side_settings(self) -> dict[str, Any]:
        """The side ViT takes the LPM's channels, patch size, spatial dims and LayerNorm epsilon (official)."""
        return {name: self.config[name] for name in ("in_channels", "patch_size", "spatial_dims", "layer_norm_eps")}

    @classmethod
    def from_vit(
        cls, vit: PromptableViT, layers: str | list[int], token_ratio: float = 0.2, token_importance: str = "global"
    ) -> LPMExtractor:
        """An extractor holding a copy of ``vit``'s weights and the file they came from (``vit`` must be a plain ViT,
        no PEFT method)."""
        if not isinstance(vit, PromptableViT):
            raise TypeError(f"the FPT LPM must be a PromptableViT (see build_vit), got {type(vit).__name__}.")
        method = getattr(vit, "peft_method", None)
        altered = [i for i, blk in enumerate(vit.blocks) if not isinstance(blk, PromptBlock) or blk.has_parallel]
        if method not in (None, *FPT_VARIANTS) or altered or type(vit.prompter) is not TokenPrompter:
            raise ValueError(
                f"the FPT LPM must be a plain pre-trained ViT, but it has PEFT method {method!r} / altered blocks "
                f"{altered}; pass the ViT before apply_method."
            )
        lpm = cls(vit.config, layers, token_ratio, token_importance)
        lpm.load_state_dict(vit.state_dict())
        if hasattr(vit, "pretrained_source"):  # what a delta's backbone identity names (monai_prompt.peft.delta)
            lpm.pretrained_source = vit.pretrained_source
        return lpm

    def _extract(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for index, blk in enumerate(self.blocks):
            if index <= self.last_layer:
                q, k, v = blk.attn.project_qkv(blk.norm1(x))
                if self.tapped[index]:
                    probs = (torch.einsum("bhxd,bhyd->bhxy", q, k) * blk.attn.scale).softmax(dim=-1)
                    k_sel, v_sel = select_important_tokens(probs, k, v, self.num_keep, self.token_importance)
                    keys.append(k_sel)
                    values.append(v_sel)
                    attended = torch.einsum("bhxy,bhyd->bhxd", probs, v)
                else:
                    attended = blk.attn.attend(q, k, v)
                if index < self.last_layer:
                    x = x + blk.ls1(blk.attn.out_proj(blk.attn.out_rearrange(attended)))
                    x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        return torch.stack((torch.stack(keys, dim=1), torch.stack(values, dim=1)), dim=1)


def build_lpm(backbone: str | nn.Module, pretrained: str | Path | None, request: BackboneRequest) -> FrozenLPM:
    """The LPM family's builder (see :func:`~monai_prompt.backbones.build_backbone`): the encoder that ``backbone``
    names, as a frozen LPM, its weights loaded: a ViT as :class:`LPMExtractor`, the SAM ViT image encoder and the
    TinyViT as :mod:`monai_prompt.fpt.grid_lpm`'s LPMs.

    A ViT preset's architecture is resolved on the meta device (no weights allocated or initialised twice);
    ``"auto"`` and a ready plain :class:`PromptableViT` are copied; a SAM-family encoder is built by its family
    (a ready one copied) and turned into its LPM in place.

    Args:
        backbone: a preset of the ViT, SAM or TinyViT family, ``"auto"`` or a ready plain encoder of one.
        pretrained: LPM weights, as the family loads them.
        request: the network's input and settings; ``method`` the FPT variant, ``options`` the LPM arguments
            ``layers``, ``token_ratio``, ``token_importance``.

    Raises:
        ValueError: ``backbone`` is of another family or carries a PEFT method, or the request is not
            :class:`~monai_prompt.nets.FPTClassifier`'s (no ``layers`` option).
    """
    from monai_prompt.fpt.grid_lpm import GRID_LPMS, grid_lpm_from  # it builds on this module

    if "layers" not in request.options:
        raise ValueError(
            f"method {request.method!r} is FPT, not a method inside a backbone: build it with "
            "monai_prompt.nets.FPTClassifier (a frozen LPM beside a small side network; bundles: fpt_classification, "
            "fptplus_classification)."
        )
    preset = isinstance(backbone, str) and backbone != "auto" and get_family("vit").is_preset(backbone)
    if preset:
        with torch.device("meta"):
            vit = build_backbone(backbone, None, **plain_request(request))
    else:
        vit = build_backbone(backbone, pretrained if isinstance(backbone, str) else None, **plain_request(request))
    check_family(request.method, (PromptableViT.family, *GRID_LPMS), LPM_FAMILIES_NEED, vit.family)
    if vit.family in GRID_LPMS:
        if isinstance(backbone, nn.Module):
            vit = copy.deepcopy(vit)
            if pretrained:
                get_family(vit.family).build(vit, pretrained, request)
        return grid_lpm_from(vit, **request.options)
    if preset:
        lpm = LPMExtractor(vit.config, **request.options)
    else:
        lpm = LPMExtractor.from_vit(vit, **request.options)
    if pretrained and backbone != "auto":
        load_pretrained(lpm, pretrained, request.strict, request.overrides.get("src_grid"))
    return lpm


register_family(
    BackboneFamily(
        name="lpm",
        build=build_lpm,
        tasks=("classification",),
        refusal=(
            "method {method!r} is a classification method: the FPT side network reads out a CLS token from a few "
            "selected tokens and gives no per-patch features for the UNETR decoder ({task}); use another method."
        ),
        methods=tuple(FPT_VARIANTS),
        module=__name__,
    )
)
