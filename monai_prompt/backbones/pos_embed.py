"""Position embeddings of a pre-trained ViT fitted to another model's patch grid.

MONAI's ViT adds no position to CLS and holds one position per patch, while timm/HuggingFace checkpoints keep
leading slots (CLS, distillation) in front and were trained for another grid. :func:`fit_pos_embed` folds the
CLS slot into ``cls_token``, drops the other slots and resizes the patch positions with :func:`resize_pos_embed`:
one bicubic interpolation in 2D (as transformers' ViT, DINOv2 and CLIP ``interpolate_pos_encoding``), the same
cubic kernel axis by axis in 3D, and a 2D grid repeated along depth for a 3D model. ``antialias=True`` selects
PyTorch's antialiased bicubic (cubic coefficient -0.5 instead of -0.75, and a widened kernel when shrinking), which
transformers' ``Dinov2WithRegisters`` and timm's ``resample_abs_pos_embed`` use.

:func:`check_sincos_width` refuses, naming the setting, a width MONAI's fixed sin-cos position embedding cannot take.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets import ViT

__all__ = ["check_sincos_width", "fit_pos_embed", "patch_grid", "resize_pos_embed", "source_grid"]

logger = logging.getLogger(__name__)


def check_sincos_width(hidden_size: int, spatial_dims: int, within: str | None = None, num_heads: int = 1) -> None:
    """Refuse a token width that MONAI's fixed sin-cos position embedding (``pos_embed_type="sincos"``, e.g. both of
    ``MaskedAutoEncoderViT``'s) cannot take, before the network is built: it gives each spatial axis a sine and a
    cosine half, so the width must be a multiple of 4 in 2D and of 6 in 3D (MONAI's own ``AssertionError`` names
    neither the setting nor a width that works).

    Args:
        hidden_size: the width.
        spatial_dims: 2 or 3.
        within: the dict setting that holds the width as ``hidden_size``, for the error (``backbone_overrides``:
            ``--backbone_overrides#hidden_size``); None: ``--hidden_size``.
        num_heads: the attention heads, which must divide the width too (the widths suggested do).

    Raises:
        ValueError: naming the setting, its value and the nearest widths that work.
    """
    multiple = 2 * int(spatial_dims)
    if int(hidden_size) % multiple == 0:
        return
    setting = f"{within}#hidden_size" if within else "hidden_size"
    step = math.lcm(multiple, int(num_heads))
    lower = int(hidden_size) // step * step
    widths = " or ".join(str(width) for width in (lower, lower + step) if width > 0)
    raise ValueError(
        f"--{setting} {hidden_size}: a {spatial_dims}D sin-cos position embedding needs a width that is a multiple "
        f"of {multiple}{f' (and of num_heads {num_heads})' if step != multiple else ''}; give --{setting} {widths}."
    )


def _perfect_power(n: int, dims: int) -> int | None:
    """The integer ``r`` with ``r ** dims == n``, or None."""
    root = round(n ** (1.0 / dims))
    return root if root**dims == n else None


def patch_grid(vit: ViT) -> tuple[int, ...]:
    """Patch grid of a ViT: ``grid_size`` of a PromptableViT, else the square/cubic grid of a plain MONAI ViT.

    Args:
        vit: the target ViT.

    Raises:
        ValueError: a plain ViT whose number of patches is not a square/cubic number.
    """
    if hasattr(vit, "grid_size"):
        return tuple(vit.grid_size)
    n_patches = vit.patch_embedding.position_embeddings.shape[1]
    dims = vit.patch_embedding.patch_embeddings.weight.dim() - 2
    side = _perfect_power(n_patches, dims)
    if side is None:
        raise ValueError(f"cannot tell the patch grid of a {n_patches}-patch {type(vit).__name__}.")
    return (side,) * dims


def source_grid(
    n_tokens: int,
    dims: int,
    config: Mapping[str, Any] | None = None,
    n_prefix_hint: int = 1,
    dst_grid: Sequence[int] | None = None,
) -> tuple[int, tuple[int, ...]]:
    """Number of leading non-patch slots and the patch grid of a checkpoint's position embedding.

    In this order: the ``config`` grid; the target's grid ``dst_grid`` when ``n_tokens - n_prefix_hint`` is its
    patch count (a non-square checkpoint loaded at its own size, e.g. a MONAI UNETR at 32 x 48: 6 tokens, grid
    2 x 3, no resize); the square/cubic grid left after ``n_prefix_hint``, then 1, 0 and 2 leading slots.

    Args:
        n_tokens: tokens of the position embedding, leading slots included.
        dims: spatial dimensions of the checkpoint.
        config: HuggingFace ``config.json`` content; its ``image_size`` and ``patch_size`` give the grid.
        n_prefix_hint: leading slots expected (1 for a CLS slot, 0 for MONAI).
        dst_grid: the target model's patch grid, if known.

    Raises:
        ValueError: no ``config`` or target grid fits and the patch count is not a square/cubic number for any
            tried prefix.
    """
    config = config or {}
    if config.get("image_size") and config.get("patch_size"):
        size, patch = config["image_size"], config["patch_size"]
        size = size if isinstance(size, (list, tuple)) else [size] * dims
        patch = patch if isinstance(patch, (list, tuple)) else [patch] * dims
        grid = tuple(s // p for s, p in zip(size, patch))
        return n_tokens - math.prod(grid), grid
    if dst_grid is not None and len(dst_grid) == dims and n_tokens - n_prefix_hint == math.prod(dst_grid):
        return n_prefix_hint, tuple(int(g) for g in dst_grid)
    for n_prefix in dict.fromkeys((n_prefix_hint, 1, 0, 2)):
        side = _perfect_power(n_tokens - n_prefix, dims)
        if side:
            return n_prefix, (side,) * dims
    raise ValueError(
        f"position embedding of {n_tokens} tokens is not a square/cubic grid; pass src_grid=(...) with the patch "
        "grid it was trained for (in a network: backbone_overrides={'src_grid': (...)})."
    )


def _bicubic_axis(x: torch.Tensor, axis: int, size: int, antialias: bool = False) -> torch.Tensor:
    """Bicubic resize of one axis of a [C, *grid] tensor (other axes untouched)."""
    moved = x.movedim(axis, -1)
    shape = moved.shape
    flat = moved.reshape(1, shape[0], -1, shape[-1])
    out = F.interpolate(flat, size=(flat.shape[2], size), mode="bicubic", align_corners=False, antialias=antialias)
    return out.reshape(*shape[:-1], size).movedim(-1, axis)


def resize_pos_embed(
    pos: torch.Tensor, src_grid: Sequence[int], dst_grid: Sequence[int], antialias: bool = False
) -> torch.Tensor:
    """Resize patch position embeddings [1, prod(src_grid), D] to [1, prod(dst_grid), D].

    2D uses one bicubic interpolation in float32 (``align_corners=False`` at the output size, as transformers'
    ``interpolate_pos_encoding``); 3D applies the separable bicubic kernel axis by axis. A 2D source grid for a 3D
    target is treated as one slice and repeated along the first axis. Equal grids are returned unchanged.

    Args:
        pos: position embeddings without CLS slot.
        src_grid: the patch grid ``pos`` was trained for.
        dst_grid: the target patch grid.
        antialias: PyTorch's antialiased bicubic (transformers' Dinov2WithRegisters, timm).
    """
    src_grid, dst_grid = tuple(src_grid), tuple(dst_grid)
    if pos.shape[1] != math.prod(src_grid):
        raise ValueError(f"position embedding has {pos.shape[1]} tokens, grid {src_grid} needs {math.prod(src_grid)}.")
    if src_grid == dst_grid:
        return pos
    dim = pos.shape[-1]
    grid = pos[0].transpose(0, 1).reshape(dim, *src_grid).float()
    while grid.dim() - 1 < len(dst_grid):
        grid = grid.unsqueeze(1)
    if len(dst_grid) == 2:
        grid = F.interpolate(grid[None], size=dst_grid, mode="bicubic", align_corners=False, antialias=antialias)[0]
    else:
        for axis, size in enumerate(dst_grid, start=1):
            if grid.shape[axis] == 1:
                grid = grid.expand(*grid.shape[:axis], size, *grid.shape[axis + 1 :])
            elif grid.shape[axis] != size:
                grid = _bicubic_axis(grid, axis, size, antialias)
    return grid.reshape(dim, -1).transpose(0, 1)[None].to(pos.dtype)


def fit_pos_embed(
    pos: torch.Tensor,
    dst_grid: Sequence[int],
    cls_token: torch.Tensor | None = None,
    src_grid: Sequence[int] | None = None,
    src_dims: int = 2,
    config: Mapping[str, Any] | None = None,
    n_prefix_hint: int = 1,
    antialias: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """Fit a checkpoint's position embeddings [1, n_prefix + prod(src_grid), D] to a MONAI ViT's patch grid.

    The leading slots are dropped; the first one (CLS) is added to ``cls_token`` when one is given, since MONAI
    adds no position to CLS. The patch positions are resized with :func:`resize_pos_embed`.

    Args:
        pos: the checkpoint's position embeddings, leading (CLS, distillation) slots included.
        dst_grid: the target patch grid (see :func:`patch_grid`).
        cls_token: the checkpoint's CLS token [1, 1, D], or None to drop the CLS position.
        src_grid: the patch grid ``pos`` was trained for; inferred by :func:`source_grid` (which tries
            ``dst_grid`` first) when None.
        src_dims: spatial dimensions of the checkpoint, for :func:`source_grid`.
        config: HuggingFace ``config.json`` content, for :func:`source_grid`.
        n_prefix_hint: leading slots tried first by :func:`source_grid`.
        antialias: antialiased bicubic resizing (see :func:`resize_pos_embed`).

    Returns:
        the patch position embeddings [1, prod(dst_grid), D], the CLS token (with its position folded in, or
        ``cls_token`` unchanged) and notes on what was done.

    Raises:
        ValueError: the source grid cannot be inferred, or ``src_grid`` needs more tokens than ``pos`` has.
    """
    notes: list[str] = []
    if src_grid is None:
        n_prefix, src_grid = source_grid(pos.shape[1], src_dims, config, n_prefix_hint, dst_grid)
        if n_prefix < n_prefix_hint and not (config or {}).get("image_size"):
            note = (
                f"position embedding of {pos.shape[1]} tokens read as a {' x '.join(map(str, src_grid))} grid without "
                f"the CLS slot this layout usually has; if it was trained with one on a non-square grid (e.g. "
                f"{pos.shape[1] - 1} = h x w), pass src_grid=(h, w) (in a network: backbone_overrides="
                f"{{'src_grid': (h, w)}})"
            )
            logger.warning(note)
            notes.append(f"assumed: {note}")
    else:
        src_grid = tuple(src_grid)
        n_prefix = pos.shape[1] - math.prod(src_grid)
        if n_prefix < 0:
            raise ValueError(
                f"src_grid={src_grid} needs {math.prod(src_grid)} positions; the checkpoint has {pos.shape[1]}."
            )
    if n_prefix and cls_token is not None:
        cls_token = cls_token + pos[:, :1]
        notes.append("CLS position embedding folded into cls_token")
    resized = resize_pos_embed(pos[:, n_prefix:], src_grid, dst_grid, antialias)
    if tuple(src_grid) != tuple(dst_grid):
        how = " (antialiased bicubic)" if antialias else ""
        notes.append(f"position embeddings resized from grid {tuple(src_grid)} to {tuple(dst_grid)}{how}")
    return resized, cls_token, notes
