"""FPT's LPM on the SAM-family encoders: SAM's ViT image encoder (SAM, MedSAM) and LiteMedSAM's TinyViT.

Both attend inside windows (SAM also over the whole grid in its global-attention blocks), add a position bias to
the logits and have no CLS token. The LPM keeps the encoder's own forward: the tapped blocks' attention is
swapped in place for a subclass whose ``attend(q, k, v, bias)`` (the families' seam, called with every window of
the block at once) computes the probabilities literally and also keeps the keys, the values and the attention
each key receives from the image's queries. The window layout (which grid token sits at which window slot, and
which slots are padding) is read off the encoder's own window partition, so the keys/values go back to the grid
in row-major order and the padded slots drop out.

Token importance without CLS (``token_importance="global"``, the official default): the mean attention a key
receives over all ``N`` real queries of the image, where a windowed attention gives zero outside a key's window,

    score_j = (1 / N) sum_{i real, window(i) = window(j)} A_ij        per sample and head,

i.e. FPT's column mean of the attention matrix with the windowed attention read as the block-sparse global matrix
it is (padding queries excluded, padding keys never kept). In a SAM global-attention block this is exactly the
ViT's rule. Then per head the ``int(N * token_ratio)`` highest keys/values are kept:
``[B, 2, L, H, n, d_h]``, the layout of :meth:`~monai_prompt.fpt.LPMExtractor.extract`.

Tapped blocks (``layers``): the keywords ``"all"`` (FPT) and ``"last_half"`` (FPT+) choose among SAM's
global-attention blocks (every block when it has none) and the TinyViT's last stage; explicit block indices
(into the encoder's ``blocks``) may name any blocks of one width, head count and grid (the fusion shares its
projections over the layers, as in the official code). See docs/methods.md.

The extraction scripts with ``torch.jit.script`` (``monai-prompt export``, MONAI's ``ckpt_export``): the capture
is a typed attribute of the attention, and a block is tapped where its attention has one (``hasattr``, which
TorchScript resolves when it compiles each block of the unrolled loop). The module has no ``from __future__ import
annotations``: TorchScript reads the capture's class annotations as types, not strings.
"""

import math
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_prompt.backbones.sam import RelPosAttention, SAMImageEncoder, window_partition
from monai_prompt.backbones.tinyvit import TinyViT, WindowAttention
from monai_prompt.fpt.config import resolve_layers
from monai_prompt.fpt.lpm import FrozenLPM, keep_top_tokens

__all__ = ["GRID_LPMS", "SAMLPM", "SAMLPMAttention", "TinyViTLPM", "TinyViTLPMAttention", "grid_lpm_from"]

#: the side network's patch size on the TinyViT (it has none; 16 is the ViT-B/16 LiteMedSAM was distilled from).
TINYVIT_SIDE_PATCH = 16


class _CapturingAttention:
    """What the LPM adds to a family's attention: ``attend`` also keeps ``(keys, values, received)`` in
    ``captured``, ``received`` [windows, heads, N_w] being the attention each key receives from the queries that
    ``query_mask`` ([windows, 1, N_w, 1], 1 for a real token; None: all) marks."""

    plain: type[nn.Module]
    captured: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # noqa: UP045
    query_mask: Optional[torch.Tensor]  # noqa: UP045

    @classmethod
    def convert(cls, attn: nn.Module) -> nn.Module:
        """Turn the plain family attention ``attn`` into this class in place (no parameter is added)."""
        if type(attn) is not cls.plain:
            raise ValueError(
                f"the FPT LPM taps a plain {cls.plain.__name__}, got {type(attn).__name__}: pass the encoder before "
                "apply_method."
            )
        attn.__class__ = cls
        attn.query_mask = None
        attn.captured = None
        return attn

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        probs = ((q @ k.transpose(-2, -1)) * self.scale + bias).softmax(dim=-1)
        mask = self.query_mask
        weighted = probs if mask is None else probs * mask
        self.captured = (k, v, weighted.sum(dim=-2))
        return probs @ v


class SAMLPMAttention(_CapturingAttention, RelPosAttention):
    """SAM's relative-position attention that keeps its keys, values and received attention."""

    plain = RelPosAttention


class TinyViTLPMAttention(_CapturingAttention, WindowAttention):
    """TinyViT's window attention that keeps its keys, values and received attention."""

    plain = WindowAttention


def _to_grid(tensor: torch.Tensor, index: torch.Tensor, real: torch.Tensor, batch: int, tokens: int) -> torch.Tensor:
    """Windows' ``[windows, H, N_w, ...]`` back on the grid, ``[B, H, N, ...]`` (see :func:`_grid_features`)."""
    flat = tensor.transpose(1, 2).flatten(0, 1)[real]
    trailing = list(flat.shape[1:])
    out = flat.new_empty([batch * tokens] + trailing)  # one size list: a MetaTensor takes no varargs here
    out[index[real]] = flat
    return out.view([batch, tokens] + trailing).transpose(1, 2)


def _grid_features(
    captured: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],  # noqa: UP045
    slots: torch.Tensor,
    batch: int,
    tokens: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Windows' keys, values ([windows, H, N_w, d_h]) and received attention ([windows, H, N_w]) back on the
    grid, [B, H, N, ...] in row-major token order; ``slots`` [windows, N_w] holds each slot's ``b * N + token``
    (-1: padding)."""
    if captured is None:
        raise RuntimeError("the tapped attention captured nothing: it did not run.")
    index = slots.reshape(-1)
    real = index >= 0
    keys, values, received = captured
    return (
        _to_grid(keys, index, real, batch, tokens),
        _to_grid(values, index, real, batch, tokens),
        _to_grid(received, index, real, batch, tokens),
    )


class _GridLPM(FrozenLPM):
    """What the SAM and TinyViT LPMs share: the tapped blocks' attention swapped for a capturing one, and the
    extraction loop around the encoder's own blocks."""

    attention: type[_CapturingAttention]

    def init_grid_lpm(
        self, layers: str | list[int], token_ratio: float, token_importance: str, candidates: list[int]
    ) -> None:
        """Resolve ``layers`` (keywords among ``candidates``), check the tapped blocks share width, heads and grid,
        swap their attention and freeze."""
        if token_importance != "global":
            raise ValueError(
                f"token_importance {token_importance!r} needs a CLS token, which the {self.family!r} encoder has "
                "not; use 'global' (mean attention each token receives)."
            )
        blocks = list(self.blocks)
        tapped = resolve_layers(layers, len(blocks), candidates)
        shapes = {i: (blocks[i].hidden_size, blocks[i].attn.num_heads, self.block_grid(i)) for i in tapped}
        if len(set(shapes.values())) > 1:
            raise ValueError(
                f"FPT layers {tapped} of the {self.family!r} encoder differ in (width, heads, grid) {shapes}: the "
                "fusion shares its projections over the tapped layers; tap blocks of one stage (default: "
                f"{candidates})."
            )
        width, heads, grid = shapes[tapped[0]]
        for i in tapped:
            self.attention.convert(blocks[i].attn)
        self.init_lpm(tapped, token_ratio, token_importance, grid[0] * grid[1], width, heads)

    def weight_device(self) -> torch.device:
        """The device of the weights (where :meth:`extract` runs)."""
        return self.neck[0].weight.device

    def block_grid(self, index: int) -> tuple[int, int]:
        """The token grid ``(H, W)`` block ``index`` attends over at the LPM's input size."""
        raise NotImplementedError

    def window_slots(self, window_size: int, x: torch.Tensor) -> torch.Tensor:
        """Each attention slot's ``b * N + token`` (-1: padding), [windows, N_w], as a block with windows of
        ``window_size`` (0: global) partitions ``x`` ([B, H, W, C])."""
        raise NotImplementedError

    def tap_layout(self, window_size: int, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:  # noqa: UP045
        """The window slots (:meth:`window_slots`) of a tapped block's input ``x`` and its attention's
        ``query_mask`` (None when the windows tile the grid: no padding)."""
        slots = self.window_slots(window_size, x)
        height, width = x.shape[1], x.shape[2]
        if window_size > 0 and (height % window_size > 0 or width % window_size > 0):
            return slots, (slots >= 0).to(x.dtype)[:, None, :, None]
        return slots, None

    def select(
        self,
        captured: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],  # noqa: UP045
        slots: torch.Tensor,
        batch: int,
        tokens: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept keys and values ``[B, H, n, d_h]`` of a tapped attention's ``captured`` windows."""
        keys, values, received = _grid_features(captured, slots, batch, tokens)
        return keep_top_tokens(received / tokens, keys, values, self.num_keep)


class SAMLPM(_GridLPM, SAMImageEncoder):
    """A frozen :class:`~monai_prompt.backbones.SAMImageEncoder` (same state-dict keys) with ``extract``.

    Built by :func:`grid_lpm_from` from an encoder in place. ``layers`` keywords choose among the global-attention
    blocks (ViT-B: ``"all"`` 2, 5, 8, 11; ``"last_half"`` 8, 11).
    """

    attention = SAMLPMAttention

    def block_grid(self, index: int) -> tuple[int, int]:
        return tuple(self.grid_size)

    def window_slots(self, window_size: int, x: torch.Tensor) -> torch.Tensor:
        batch, height, width = x.shape[0], x.shape[1], x.shape[2]
        tags = torch.arange(1, batch * height * width + 1, device=x.device, dtype=torch.float64)
        tags = tags.view(batch, height, width, 1)
        if window_size > 0:
            tags = window_partition(tags, window_size)[0]
        return tags.reshape(tags.shape[0], -1).long() - 1

    def side_settings(self) -> dict[str, Any]:
        """The side ViT takes SAM's channels, patch size and LayerNorm epsilon (2D)."""
        config = self.config
        return {"in_channels": config["in_channels"], "patch_size": (config["patch_size"],) * 2,
                "spatial_dims": 2,
                "layer_norm_eps": config["layer_norm_eps"]}

    def _extract(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        batch, tokens = x.shape[0], x.shape[1] * x.shape[2]
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for index, block in enumerate(self.blocks):
            if index <= self.last_layer:
                if hasattr(block.attn, "captured"):  # tapped (TorchScript decides this per block when compiling)
                    slots, mask = self.tap_layout(block.window_size, x)
                    block.attn.query_mask = mask
                    x = block(x)
                    k, v = self.select(block.attn.captured, slots, batch, tokens)
                    block.attn.captured = None
                    block.attn.query_mask = None
                    keys.append(k)
                    values.append(v)
                else:
                    x = block(x)
        return torch.stack((torch.stack(keys, dim=1), torch.stack(values, dim=1)), dim=1)


class TinyViTLPM(_GridLPM, TinyViT):
    """A frozen :class:`~monai_prompt.backbones.TinyViT` (same state-dict keys) with ``extract``.

    Built by :func:`grid_lpm_from` from an encoder in place. Block indices count the attention blocks (``blocks``:
    LiteMedSAM's 10, 0-1 in stage 1, 2-7 in stage 2, 8-9 in stage 3); ``layers`` keywords choose among the last
    stage's (``"all"`` 8, 9; ``"last_half"`` 9).
    """

    attention = TinyViTLPMAttention

    def stage_grids(self) -> list[tuple[int, int]]:
        """The token grid of every stage at the LPM's input size (a stride-``s`` merge: ``ceil(side / s)``)."""
        side = self.img_size[0]
        grids = [(side, side)]
        for stride in self.config["merge_strides"]:
            side = math.ceil(side / stride)
            grids.append((side, side))
        return grids

    def block_stages(self) -> list[int]:
        """The stage of every attention block."""
        return [stage for stage, depth in enumerate(self.config["depths"]) if stage > 0 for _ in range(depth)]

    def block_grid(self, index: int) -> tuple[int, int]:
        return self.stage_grids()[self.block_stages()[index]]

    def window_slots(self, window_size: int, x: torch.Tensor) -> torch.Tensor:
        """TinyViT's layout (:meth:`~monai_prompt.backbones.tinyvit.WindowAttention.forward_map`): the map zero-padded
        at the bottom/right to whole windows, windows and their tokens in row-major order."""
        batch, height, width = x.shape[0], x.shape[1], x.shape[2]
        size = window_size
        rows, cols = math.ceil(height / size), math.ceil(width / size)
        tags = torch.arange(1, batch * height * width + 1, device=x.device).view(batch, height, width)
        tags = F.pad(tags, (0, cols * size - width, 0, rows * size - height))
        return tags.view(batch, rows, size, cols, size).permute(0, 1, 3, 2, 4).reshape(-1, size * size) - 1

    def side_settings(self) -> dict[str, Any]:
        """The side ViT takes the TinyViT's channels, patch 16 and LayerNorm epsilon (2D)."""
        eps = self.blocks[0].attn.norm.eps
        return {"in_channels": self.config["in_channels"], "patch_size": (TINYVIT_SIDE_PATCH,) * 2,
                "spatial_dims": 2,
                "layer_norm_eps": eps}

    def _extract(self, x: torch.Tensor) -> torch.Tensor:
        # the stages' own steps, block by block (TorchScript iterates no slice of ``layers``): the MBConv blocks on
        # the [B, C, H, W] map, the attention blocks on its [B, H, W, C] view, each stage's merge; nothing after the
        # last tapped block runs
        x = self.patch_embed(x)
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        index = 0  # of the next attention block
        for layer in self.layers:
            if index <= self.last_layer:
                for block in layer.blocks:
                    if not hasattr(block, "attn"):
                        x = block(x)
                    elif index <= self.last_layer:
                        grid = x.permute(0, 2, 3, 1)
                        if hasattr(block.attn, "captured"):  # tapped (TorchScript decides this per block)
                            batch, tokens = grid.shape[0], grid.shape[1] * grid.shape[2]
                            slots, mask = self.tap_layout(block.window_size, grid)
                            block.attn.query_mask = mask
                            grid = block(grid)
                            k, v = self.select(block.attn.captured, slots, batch, tokens)
                            block.attn.captured = None
                            block.attn.query_mask = None
                            keys.append(k)
                            values.append(v)
                        else:
                            grid = block(grid)
                        x = grid.permute(0, 3, 1, 2)
                        index += 1
                if layer.downsample is not None and index <= self.last_layer:
                    x = layer.downsample(x)
        return torch.stack((torch.stack(keys, dim=1), torch.stack(values, dim=1)), dim=1)


#: family -> its LPM class.
GRID_LPMS: dict[str, type[_GridLPM]] = {"sam": SAMLPM, "tinyvit": TinyViTLPM}


def _candidates(encoder: nn.Module) -> list[int]:
    """The blocks the ``layers`` keywords choose from: SAM's global-attention blocks (all when none), the TinyViT's
    last stage."""
    if isinstance(encoder, SAMImageEncoder):
        return list(encoder.config["global_attn_indexes"]) or list(range(len(encoder.blocks)))
    depths = encoder.config["depths"]
    start = sum(depths[1:-1])
    return list(range(start, start + depths[-1]))


def grid_lpm_from(
    encoder: nn.Module, layers: str | list[int], token_ratio: float = 0.2, token_importance: str = "global"
) -> _GridLPM:
    """Turn a plain SAM-family encoder (its weights loaded) into its frozen LPM, in place, and return it.

    Args:
        encoder: a :class:`~monai_prompt.backbones.SAMImageEncoder` or :class:`~monai_prompt.backbones.TinyViT`
            without a PEFT method.
        layers: ``"all"``, ``"last_half"`` (among the default candidates, see the module docstring) or block
            indices.
        token_ratio: fraction of a tapped block's ``N`` tokens kept per head.
        token_importance: ``"global"`` (the only one without CLS).

    Raises:
        ValueError: a PEFT method or parallel branch on the encoder, tapped blocks of different shapes, or
            ``token_importance="class_token"``.
    """
    altered = [i for i, block in enumerate(encoder.blocks) if getattr(block, "has_parallel", False)]
    if getattr(encoder, "peft_method", None) is not None or altered:
        raise ValueError(
            f"the FPT LPM must be a plain pre-trained {encoder.family!r} encoder, but it has PEFT method "
            f"{getattr(encoder, 'peft_method', None)!r} / parallel branches in blocks {altered}; pass it before "
            "apply_method."
        )
    candidates = _candidates(encoder)
    encoder.__class__ = GRID_LPMS[encoder.family]
    encoder.init_grid_lpm(layers, token_ratio, token_importance, candidates)
    return encoder
