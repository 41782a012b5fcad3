"""Run FPT's frozen LPM once per image and store the selected keys/values (``monai-prompt preload``).

The images must come through the same deterministic LPM preprocessing as the training pipeline (load, channel
matching, intensity scaling, resize to the LPM size; no augmentation), because entries are keyed by the content
of that LPM input (:func:`~monai_prompt.fpt.cache.content_key`). Entries already present are skipped, so running
the preload again after an interruption computes only what is missing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from monai.data import DataLoader

from monai_prompt.fpt.cache import FPTFeatureCache, cache_identity, content_key

__all__ = ["PreloadReport", "preload_features"]

logger = logging.getLogger(__name__)


@dataclass
class PreloadReport:
    """What :func:`preload_features` did.

    Attributes:
        cache_dir: the cache directory.
        images: images read.
        computed: entries computed and written now.
        reused: images whose entry existed already (an earlier, interrupted run, or identical content).
        entries: entries in the cache afterwards.
        bytes_per_entry: size of one entry file on disk.
    """

    cache_dir: str
    images: int
    computed: int
    reused: int
    entries: int
    bytes_per_entry: int

    def __str__(self) -> str:
        size = self.entries * self.bytes_per_entry / 2**30
        return (
            f"FPT cache {self.cache_dir}: {self.images} images read, {self.computed} computed, {self.reused} already "
            f"cached; {self.entries} entries of {self.bytes_per_entry / 2**20:.2f} MiB ({size:.2f} GiB)"
        )


def preload_features(
    model: nn.Module,
    data: Sequence[Mapping[str, Any]] | torch.utils.data.Dataset,
    cache_dir: str | os.PathLike,
    image_key: str = "image",
    batch_size: int = 8,
    storage_dtype: str = "float32",
    num_workers: int = 0,
    overwrite: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> PreloadReport:
    """Compute the LPM features of every image of ``data`` not yet in the cache, on the LPM's device.

    Args:
        model: an :class:`~monai_prompt.nets.FPTClassifier` (or its ``lpm``) with the LPM weights loaded.
        data: items (or a dataset of items) holding the preprocessed LPM-size image [C, *img_size] under
            ``image_key``, e.g. ``monai.data.Dataset(datalist, Compose(classification_transforms(512)))``.
        cache_dir: cache directory (created, or resumed when it was made for the same model and dtype).
        image_key: key of the image.
        batch_size: images per LPM forward (lower it when the LPM runs out of memory; it does not change results
            beyond float rounding).
        storage_dtype: ``"float32"`` or ``"float16"`` (half the disk; see docs/methods.md#fpt).
        num_workers: data loader workers.
        overwrite: replace a cache in ``cache_dir`` made for another LPM, config or dtype.
        progress: called with ``(images done, images in all, what was computed and reused)`` before the first batch
            and after each, e.g. :class:`monai_prompt.engine.ProgressLog` (its lines give the time left).

    Returns:
        what was done, also logged (INFO) as one line.

    Example::

        >>> data = monai.data.Dataset(datalist, Compose(classification_transforms(512, in_channels=3)))
        >>> log = monai_prompt.engine.ProgressLog("FPT preload", unit="image")
        >>> report = preload_features(net, data, "cache/fptplus", storage_dtype="float16", progress=log)
    """
    identity = cache_identity(model)
    cache = FPTFeatureCache.create(cache_dir, identity, storage_dtype, overwrite)
    lpm = model.lpm if hasattr(model, "lpm") else model
    device = lpm.weight_device()
    loader = DataLoader(data, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    images = computed = reused = 0
    total = len(loader.dataset)
    if progress is not None:
        progress(images, total, "")
    for batch in loader:
        batch_images = batch[image_key]
        keys = [content_key(image) for image in batch_images]
        todo: dict[str, int] = {}
        for index, key in enumerate(keys):
            if key not in cache and key not in todo:
                todo[key] = index
        if todo:
            features = lpm.extract(batch_images[list(todo.values())].to(device))
            for key, feature in zip(todo, features):
                cache.save(key, feature)
        images += len(keys)
        computed += len(todo)
        reused += len(keys) - len(todo)
        if progress is not None:
            progress(images, total, f"{computed} computed, {reused} already cached")
    entry = cache.path(keys[0]) if images else None
    report = PreloadReport(
        cache_dir=str(cache_dir),
        images=images,
        computed=computed,
        reused=reused,
        entries=len(cache),
        bytes_per_entry=entry.stat().st_size if entry else 0,
    )
    logger.info(str(report))
    return report
