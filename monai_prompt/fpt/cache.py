"""On-disk store of FPT's LPM features, keyed by image content and tied to one LPM and extraction config.

Layout of a cache directory::

    <root>/manifest.json                    format, storage dtype, feature shape, LPM config, extraction config
                                            and the fingerprint (SHA-256 of LPM weights + extraction config)
    <root>/kv/<k[:2]>/<k>.safetensors       one image: tensor "kv" [2, L, H, n, d_h] (keys, values) in the
                                            storage dtype; metadata repeats format and fingerprint

``k`` is :func:`content_key` of the LPM input tensor (SHA-256 of its float32 values and shape), never a file
name: two files with one stem stay distinct, identical images share one entry, and a change of preprocessing
gives new keys (a reported miss, not stale features). Every file is written to a temporary name and renamed,
so a crash leaves whole entries only, and a preload that is run again continues where it stopped. Opening a
cache made by other LPM weights or another extraction config raises :class:`FPTCacheError` naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from monai_prompt.backbones.registry import find_backbone
from monai_prompt.fpt.lpm import FrozenLPM
from monai_prompt.io import atomic_write

__all__ = ["CACHE_FORMAT", "STORAGE_DTYPES", "FPTCacheError", "FPTFeatureCache", "cache_identity", "content_key"]

CACHE_FORMAT = "monai_prompt.fpt_cache/1"
#: storage dtype names -> torch dtypes (fp16 halves the disk use; see docs/methods.md#fpt for its effect).
STORAGE_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}
_MANIFEST = "manifest.json"


class FPTCacheError(RuntimeError):
    """A preload cache is missing, incomplete, damaged or made for another LPM/config; the message says how
    to fix it."""


def content_key(image: torch.Tensor) -> str:
    """SHA-256 of an LPM input image ([C, *spatial]): its float32 values and shape, on the CPU.

    A MONAI ``MetaTensor``'s metadata (file name, affine) is ignored: only the pixels the LPM sees count.
    """
    values = image.detach().as_subclass(torch.Tensor).to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(json.dumps(list(values.shape)).encode())
    digest.update(values.numpy().tobytes())
    return digest.hexdigest()


def cache_identity(model: nn.Module) -> dict[str, Any]:
    """What a cache must match for ``model`` (an :class:`~monai_prompt.nets.FPTClassifier` or its LPM).

    Returns:
        ``{"fingerprint", "lpm", "extraction", "feature_shape"}``: the fingerprint over the LPM weights and
        extraction config, and the readable parts used to explain a mismatch.
    """
    lpm = find_backbone(model)
    if not isinstance(lpm, FrozenLPM):
        raise TypeError(f"{type(model).__name__} has no FPT LPM; pass an FPTClassifier or its .lpm.")
    return {
        "fingerprint": lpm.fingerprint(),
        "lpm": dict(lpm.config),
        "extraction": lpm.extraction_config(),
        "feature_shape": list(lpm.feature_shape),
    }


class FPTFeatureCache:
    """Open a cache directory for one model (use :meth:`create` to start or resume writing one).

    Args:
        root: the cache directory.
        identity: :func:`cache_identity` of the model that will read the features.

    Raises:
        FPTCacheError: no manifest, or a manifest for other LPM weights or extraction config.
    """

    def __init__(self, root: str | os.PathLike, identity: dict[str, Any]) -> None:
        self.root = Path(root)
        self.identity = identity
        manifest_path = self.root / _MANIFEST
        if not manifest_path.is_file():
            raise FPTCacheError(
                f"{self.root} is not an FPT feature cache (no {_MANIFEST}); create it with `monai-prompt preload` "
                f"or monai_prompt.fpt.preload_features."
            )
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != CACHE_FORMAT:
            raise FPTCacheError(f"{manifest_path}: format {self.manifest.get('format')!r}, expected {CACHE_FORMAT!r}.")
        self._check_identity()
        self.storage_dtype = STORAGE_DTYPES[self.manifest["storage_dtype"]]

    def _check_identity(self) -> None:
        if self.manifest["fingerprint"] == self.identity["fingerprint"]:
            return
        diffs = [
            f"{part} {name}: {self.manifest[part].get(name)!r} in the cache vs {self.identity[part].get(name)!r} here"
            for part in ("lpm", "extraction")
            for name in sorted(set(self.manifest[part]) | set(self.identity[part]))
            if self.manifest[part].get(name) != self.identity[part].get(name)
        ]
        reason = "; ".join(diffs) or "the LPM weights differ (same architecture and extraction config)"
        raise FPTCacheError(
            f"stale FPT cache {self.root}: it was made for another LPM or FPT config ({reason}). Its features "
            f"would not match this model; preload again into a new cache directory (a bundle's --fpt_cache_dir, "
            f"monai-prompt preload --cache-dir), or replace it (monai-prompt preload --overwrite; a bundle: delete it)."
        )

    @classmethod
    def create(
        cls, root: str | os.PathLike, identity: dict[str, Any], storage_dtype: str = "float32", overwrite: bool = False
    ) -> FPTFeatureCache:
        """Start a cache, or resume one made for the same model and storage dtype.

        Args:
            root: the cache directory (created if absent; must be empty or an FPT cache).
            identity: :func:`cache_identity` of the model.
            storage_dtype: ``"float32"`` or ``"float16"`` (``"fp32"``/``"fp16"``).
            overwrite: delete an existing FPT cache in ``root`` that was made for another model or dtype.
        """
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype {storage_dtype!r} is not one of {sorted(STORAGE_DTYPES)}.")
        dtype_name = str(STORAGE_DTYPES[storage_dtype]).removeprefix("torch.")
        root = Path(root)
        manifest_path = root / _MANIFEST
        if manifest_path.is_file():
            try:
                cache = cls(root, identity)
                if cache.manifest["storage_dtype"] != dtype_name:
                    raise FPTCacheError(
                        f"FPT cache {root} stores {cache.manifest['storage_dtype']}, not {dtype_name}; use another "
                        f"directory (a bundle's --fpt_cache_dir, monai-prompt preload --cache-dir), or replace it "
                        f"(monai-prompt preload --overwrite; a bundle: delete it)."
                    )
                return cache
            except FPTCacheError:
                if not overwrite:
                    raise
            shutil.rmtree(root / "kv", ignore_errors=True)
        elif root.exists() and any(root.iterdir()):
            raise FPTCacheError(f"{root} is neither empty nor an FPT feature cache; choose a new cache directory.")
        root.mkdir(parents=True, exist_ok=True)
        manifest = {"format": CACHE_FORMAT, "storage_dtype": dtype_name, **identity}
        atomic_write(manifest_path, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2)))
        return cls(root, identity)

    def path(self, key: str) -> Path:
        """File of the entry ``key``."""
        return self.root / "kv" / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def __len__(self) -> int:
        return sum(1 for _ in (self.root / "kv").glob("*/*.safetensors"))

    def save(self, key: str, features: torch.Tensor) -> None:
        """Store one image's features [2, L, H, n, d_h] (converted to the storage dtype) atomically."""
        if list(features.shape) != self.identity["feature_shape"]:
            shape = self.identity["feature_shape"]
            raise ValueError(f"features of shape {list(features.shape)}; this cache holds {shape}.")
        stored = features.detach().to("cpu", self.storage_dtype).contiguous()
        if not torch.isfinite(stored).all():
            raise FPTCacheError(
                f"LPM features of {key[:16]}... are not finite in {self.manifest['storage_dtype']} (largest magnitude "
                f"{features.abs().max().item():.3g}); preload with storage_dtype='float32'."
            )
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"kv": stored}
        metadata = {"format": CACHE_FORMAT, "fingerprint": self.identity["fingerprint"]}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    def load(self, key: str, source: str = "image") -> torch.Tensor:
        """Features [2, L, H, n, d_h] (storage dtype) of the image with content key ``key``.

        Args:
            key: :func:`content_key` of the LPM input.
            source: what the image is (its file name), for error messages.
        """
        path = self.path(key)
        if not path.is_file():
            raise FPTCacheError(
                f"{source} (content key {key[:16]}...) is not in the FPT cache {self.root}: preload every split with "
                f"the same LPM preprocessing as the training pipeline (`monai-prompt preload`); a changed resize, "
                f"intensity scaling or channel handling changes the key."
            )
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                features = handle.get_tensor("kv")
        except Exception as err:  # safetensors raises several types for a damaged file
            raise FPTCacheError(f"{path}: damaged cache entry ({err}); delete it and run the preload again.") from err
        expected = self.identity["feature_shape"]
        if metadata.get("fingerprint") != self.identity["fingerprint"] or list(features.shape) != expected:
            raise FPTCacheError(
                f"{path}: entry made for another LPM/config was copied into this cache; delete it and preload again."
            )
        return features
