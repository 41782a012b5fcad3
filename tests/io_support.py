"""Small files the tests write and compare (PNG, NIfTI, datalists, SHA-256), and a free local port."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (16, 16), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_nifti(path: Path, volume: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(volume.astype(np.float32), np.eye(4)), path)
    return path


def write_datalist(path: Path, splits: dict[str, list[tuple[Path, int]]], **extra) -> Path:
    content = {**extra, **{s: [{"image": str(p), "label": label} for p, label in items] for s, items in splits.items()}}
    path.write_text(json.dumps(content))
    return path


def free_port() -> int:
    """A local TCP port nothing listens on (a server may take it; a client finds it closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
