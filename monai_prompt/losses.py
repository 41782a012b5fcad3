"""Masked-autoencoder (MAE) pre-training loss for MONAI's ``MaskedAutoEncoderViT`` under ``SupervisedTrainer``.

MONAI ships the network (``monai.networks.nets.MaskedAutoEncoderViT``: ``forward(image)`` returns the decoder's
per-patch reconstruction ``[B, N, prod(patch) * C]`` and the mask ``[B, N]``, 1 where a patch was hidden from
the encoder) but not the loss, so it is written here, after He et al. 2022 ("Masked Autoencoders Are Scalable
Vision Learners", https://arxiv.org/abs/2111.06377) and their official ``forward_loss``: the mean squared error
between the reconstruction and the image's patches, averaged over the hidden patches only, with each target
patch normalised by its own mean and variance (``norm_pix``, the paper's default for better features).

``SupervisedTrainer`` calls ``loss_function(network(image), target)``, so the bundle copies the image to the
target (``CopyItemsd(keys="image", names="label")``) and :class:`MaskedPatchLoss` takes the network's tuple.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.data import MetaTensor
from monai.utils import ensure_tuple_rep

__all__ = ["MaskedPatchLoss", "patchify"]


def patchify(image: torch.Tensor, patch_size: Sequence[int] | int) -> torch.Tensor:
    """Cut ``[B, C, *spatial]`` into non-overlapping patches ``[B, N, prod(patch_size) * C]``.

    Patches are in the order of MONAI's ``PatchEmbeddingBlock`` tokens (the patch grid flattened row-major, as the
    convolution's ``flatten(2)``); the values of a patch are ordered ``(p1, ..., pn, c)``, as in the official MAE.

    Args:
        image: a batch of 2D ``[B, C, H, W]`` or 3D ``[B, C, D, H, W]`` images.
        patch_size: patch side, one int or one per spatial dim; must divide the image size.
    """
    spatial_dims = image.ndim - 2
    patch = ensure_tuple_rep(patch_size, spatial_dims)
    size = tuple(image.shape[2:])
    if any(s % p for s, p in zip(size, patch)):
        raise ValueError(f"image size {size} is not divisible by patch_size {patch}; resize the image or the patch.")
    grid = [s // p for s, p in zip(size, patch)]
    interleaved = [n for g, p in zip(grid, patch) for n in (g, p)]
    x = image.reshape(image.shape[0], image.shape[1], *interleaved)
    grid_axes = [2 + 2 * i for i in range(spatial_dims)]
    patch_axes = [3 + 2 * i for i in range(spatial_dims)]
    x = x.permute(0, *grid_axes, *patch_axes, 1)
    return x.reshape(image.shape[0], math.prod(grid), math.prod(patch) * image.shape[1])


class MaskedPatchLoss(nn.Module):
    """MAE loss: mean squared error on the masked patches of ``MaskedAutoEncoderViT``'s reconstruction.

    ``loss = sum_n mask_n * mean_j (pred_nj - t_nj)^2 / sum_n mask_n`` over the batch, where ``t`` are the image's
    patches (:func:`patchify`), each normalised to zero mean and unit variance when ``norm_pix`` is set
    (``(t - mean) / sqrt(var + eps)``, unbiased variance, as the official code).

    Args:
        patch_size: the network's patch size (one int or one per spatial dim).
        norm_pix: normalise every target patch by its own mean and variance.
        eps: added to the variance.

    Example::

        "loss": {"_target_": "monai_prompt.losses.MaskedPatchLoss", "patch_size": 4}
    """

    def __init__(self, patch_size: Sequence[int] | int, norm_pix: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.norm_pix = norm_pix
        self.eps = eps

    def forward(self, output: Sequence[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        """
        Args:
            output: ``(pred [B, N, prod(patch) * C], mask [B, N])`` as ``MaskedAutoEncoderViT`` returns them.
            image: the input images ``[B, C, *spatial]`` (the trainer's target).
        """
        if not isinstance(output, (tuple, list)) or len(output) != 2:
            raise TypeError(
                f"MaskedPatchLoss needs the (reconstruction, mask) pair MaskedAutoEncoderViT returns, got "
                f"{type(output).__name__}; use it with monai.networks.nets.MaskedAutoEncoderViT."
            )
        pred, mask, image = (t.as_tensor() if isinstance(t, MetaTensor) else t for t in (*output, image))
        target = patchify(image, self.patch_size)
        if pred.shape != target.shape:
            raise ValueError(
                f"reconstruction {tuple(pred.shape)} does not match the image's patches {tuple(target.shape)}: "
                f"patch_size={self.patch_size} or the channel count differs from the network's."
            )
        if self.norm_pix:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + self.eps).sqrt()
        dtype = torch.promote_types(pred.dtype, torch.float32)  # fp16/bf16 reconstructions (AMP) in float32
        per_patch = ((pred.to(dtype) - target.to(dtype)) ** 2).mean(dim=-1)
        mask = mask.to(per_patch.dtype)
        return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)
