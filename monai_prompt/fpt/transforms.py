"""``LoadFPTFeaturesd``: feed FPT training from the preload cache inside a MONAI transform chain.

Place it after the deterministic LPM preprocessing (the chain the preload used) and before the side-network
augmentations; the item then carries the cached features under ``fpt_kv``, and a train loader yields
``{"image": side input, "fpt_kv": [B, 2, L, H, n, d_h], "label": ...}``. The network is called as
``network(image, fpt_kv)`` (e.g. ``monai.engines.PrepareBatchExtraInput(extra_keys="fpt_kv")``).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from typing import Any

import torch.nn as nn
from monai.config import KeysCollection
from monai.transforms import MapTransform

from monai_prompt.fpt.cache import FPTFeatureCache, cache_identity, content_key

__all__ = ["LoadFPTFeaturesd"]


class LoadFPTFeaturesd(MapTransform):
    """Look up the cached LPM features of the item's LPM-size image by its content key.

    The cache is checked against ``network`` when the transform is built (a stale cache fails at once, with the
    reason); only the cache path and the network's small identity record are kept, so the transform pickles
    cheaply into data-loader workers.

    Args:
        keys: key of the LPM-size image (exactly as the preload saw it).
        cache_dir: the preload cache.
        network: the :class:`~monai_prompt.nets.FPTClassifier` that will be trained (its LPM weights loaded).
        output_key: key the features are stored under.
        drop_image: remove the image key afterwards (when it was a copy made only for the lookup, e.g. by
            ``CopyItemsd`` before side augmentations of the original).
        allow_missing_keys: skip items without the key.

    Example::

        Compose([*classification_transforms(512, in_channels=3),
                 LoadFPTFeaturesd("image", "cache/fptplus", network=net),
                 RandFlipd("image", prob=0.5, spatial_axis=1), Resized("image", (128, 128))])
    """

    def __init__(
        self,
        keys: KeysCollection,
        cache_dir: str | os.PathLike,
        network: nn.Module,
        output_key: str = "fpt_kv",
        drop_image: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"LoadFPTFeaturesd reads one image key, got {self.keys}.")
        self.cache = FPTFeatureCache(cache_dir, cache_identity(network))
        self.output_key = output_key
        self.drop_image = drop_image

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            source = str(getattr(image, "meta", {}).get("filename_or_obj", key))
            d[self.output_key] = self.cache.load(content_key(image), source)
            if self.drop_image:
                del d[key]
        return d
