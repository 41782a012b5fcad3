"""The frozen large pre-trained model (LPM) of FPT: a MONAI ViT that hands out its own keys and values.

For every tapped block ``l`` it computes ``X = norm1(x_l)``, the block's frozen keys and values
``K_l, V_l = project_qkv(X)`` ([B, H, N, d_h], heads split) and the attention probabilities
``A_l = softmax(Q_l K_l^T / sqrt(d_h))``, then keeps per head the ``int(N * token_ratio)`` most important tokens
(:func:`select_important_tokens`). The blocks continue with the same probabilities, so nothing is computed
twice; blocks after the last tapped one are skipped (they cannot change the result). Everything runs under
``torch.no_grad``: no gradient ever reaches the LPM and no LPM activation is kept.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from monai_prompt.backbones.blocks import PromptBlock
from monai_prompt.backbones.pretrained import load_pretrained
from monai_prompt.backbones.registry import (
    BackboneFamily,
    BackboneRequest,
    build_backbone,
    plain_request,
    register_family,
)
from monai_prompt.backbones.vit import PromptableViT, TokenPrompter
from monai_prompt.fpt.config import FPT_VARIANTS, TOKEN_IMPORTANCE, resolve_layers
from monai_prompt.peft.delta import backbone_fingerprint
from monai_prompt.peft.registry import PLAIN_TOKENS, check_family

__all__ = ["LPMExtractor", "build_lpm", "select_important_tokens"]


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
    index = score.topk(num_keep, dim=-1).indices.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
    return keys.gather(-2, index), values.gather(-2, index)


class LPMExtractor(PromptableViT):
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
        if token_importance not in TOKEN_IMPORTANCE:
            raise ValueError(f"token_importance {token_importance!r} is not one of {TOKEN_IMPORTANCE}.")
        if token_importance == "class_token" and not vit_config.get("cls_token", True):
            raise ValueError("token_importance='class_token' needs an LPM with a CLS token (cls_token=True).")
        depth = len(self.blocks)
        self.layers = resolve_layers(layers, depth)
        self.tapped = [i in self.layers for i in range(depth)]
        self.last_layer = self.layers[-1]
        self.token_ratio = float(token_ratio)
        self.token_importance = token_importance
        self.num_keep = int(self.num_tokens * token_ratio)
        if self.num_keep < 1:
            raise ValueError(f"token_ratio {token_ratio} keeps no token of {self.num_tokens}; raise it.")
        self.requires_grad_(False)
        self.eval()
        self.released = False

    @classmethod
    def from_vit(
        cls, vit: PromptableViT, layers: str | list[int], token_ratio: float = 0.2, token_importance: str = "global"
    ) -> LPMExtractor:
        """An extractor holding a copy of ``vit``'s weights (``vit`` must be a plain ViT, no PEFT method)."""
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
        return lpm

    def train(self, mode: bool = True) -> LPMExtractor:
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

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> LPMExtractor:
        """``to``/``cuda``/``float``/... of a released LPM do nothing: it has no weights to move."""
        if getattr(self, "released", False):
            return self
        return super()._apply(fn, recurse)

    @property
    def feature_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one image's features: (2 for K/V, tapped layers, heads, kept tokens, head dim)."""
        return 2, len(self.layers), self.num_heads, self.num_keep, self.hidden_size // self.num_heads

    def extraction_config(self) -> dict[str, Any]:
        """What, besides the weights, determines the features."""
        return {"layers": self.layers, "token_ratio": self.token_ratio, "token_importance": self.token_importance}

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


def build_lpm(backbone: str | PromptableViT, pretrained: str | Path | None, request: BackboneRequest) -> LPMExtractor:
    """The LPM family's builder (see :func:`~monai_prompt.backbones.build_backbone`): the ViT that ``backbone``
    names, as a frozen :class:`LPMExtractor`, its weights loaded.

    A preset's architecture is resolved on the meta device (no weights allocated or initialised twice); ``"auto"``
    and a ready plain :class:`PromptableViT` are copied.

    Args:
        backbone: a ViT preset, ``"auto"`` or a ready plain :class:`PromptableViT`.
        pretrained: LPM weights (:func:`~monai_prompt.backbones.load_pretrained`).
        request: the network's input and settings; ``method`` the FPT variant, ``options`` the
            :class:`LPMExtractor` arguments ``layers``, ``token_ratio``, ``token_importance``.

    Raises:
        ValueError: ``backbone`` is of another family (the LPM's keys and values are ViT tokens).
    """
    preset = isinstance(backbone, str) and backbone != "auto"
    if preset:
        with torch.device("meta"):
            vit = build_backbone(backbone, None, **plain_request(request))
    else:
        vit = build_backbone(backbone, pretrained if backbone == "auto" else None, **plain_request(request))
    check_family(request.method, (PromptableViT.family,), PLAIN_TOKENS, vit.family)
    if preset:
        lpm = LPMExtractor(vit.config, **request.options)
    else:
        lpm = LPMExtractor.from_vit(vit, **request.options)
    if pretrained and backbone != "auto":
        load_pretrained(lpm, pretrained, request.strict)
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
