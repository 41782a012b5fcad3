"""Small files the tests write and compare (PNG, NIfTI, datalists, SHA-256), and a free local port."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset as DicomDataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


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


def write_dicom(path: Path, rows: int = 20, cols: int = 30, series_uid: str | None = None, index: int = 0,
                orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)) -> None:
    """A minimal CT slice written with pydicom (16-bit, explicit VR little endian; ``orientation``: its
    ImageOrientationPatient, row then column direction, axial by default)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = DicomDataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.StudyInstanceUID = "CT", "anon", "1.2.3"
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, float(index)], list(orientation)
    ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 1.0
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.random.default_rng(index).integers(0, 4096, (rows, cols), dtype=np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_series(folder: Path, slices: int = 4) -> None:
    uid = generate_uid()
    for k in range(slices):
        write_dicom(folder / f"slice{k}.dcm", series_uid=uid, index=k)


def write_datalist(path: Path, splits: dict[str, list[tuple[Path, int]]], **extra) -> Path:
    content = {**extra, **{s: [{"image": str(p), "label": label} for p, label in items] for s, items in splits.items()}}
    path.write_text(json.dumps(content))
    return path


def free_port() -> int:
    """A local TCP port nothing listens on (a server may take it; a client finds it closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
