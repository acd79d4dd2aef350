"""Small synthetic DICOM series written with pydicom, for the tests (no binary fixtures)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CT_INTERCEPT = -1024.0


def slice_dataset(pixels: np.ndarray, position: Sequence[float],
                  orientation: Sequence[float] = AXIAL, spacing=(0.8, 0.7),
                  series_uid: str = "1.2.3.4", instance: int = 1, slope: float = 1.0,
                  intercept: float = CT_INTERCEPT, description: str = "synthetic CT",
                  bits_stored: int = 16) -> Dataset:
    """One CT slice; `pixels` is (rows, columns) of stored (unsigned 16-bit) values."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.StudyInstanceUID = "1.2.3"
    ds.FrameOfReferenceUID = "1.2.3.9"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesDescription = description
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    _set_pixels(ds, pixels)
    ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
    return ds


def write_series(folder: Path, stored: np.ndarray, positions: Sequence[Sequence[float]],
                 names: Sequence[str] | None = None, instances: Sequence[int] | None = None,
                 **kwargs) -> list[Path]:
    """`stored` is (rows, columns, slices); slice k goes to positions[k]."""
    folder.mkdir(parents=True, exist_ok=True)
    n = stored.shape[2]
    names = names or [f"IM{k:04d}.dcm" for k in range(n)]
    instances = instances or list(range(1, n + 1))
    paths = []
    for k in range(n):
        ds = slice_dataset(stored[:, :, k], positions[k], instance=instances[k], **kwargs)
        path = folder / names[k]
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def enhanced_file(path: Path, stored: np.ndarray, positions: Sequence[Sequence[float]],
                  orientation: Sequence[float] = AXIAL, spacing=(0.8, 0.7),
                  slopes: Sequence[float] | None = None) -> Path:
    """One enhanced multi-frame file: frame k of (rows, columns, frames) at positions[k]."""
    n = stored.shape[2]
    ds = slice_dataset(stored[:, :, 0], positions[0])
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                    "RescaleSlope", "RescaleIntercept"):
        delattr(ds, keyword)
    ds.NumberOfFrames = n
    shared = Dataset()
    shared.PlaneOrientationSequence = DicomSequence([_item(ImageOrientationPatient=list(
        orientation))])
    shared.PixelMeasuresSequence = DicomSequence([_item(PixelSpacing=list(spacing),
                                                        SliceThickness=1.0)])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    for k in range(n):
        group = Dataset()
        group.PlanePositionSequence = DicomSequence([_item(ImagePositionPatient=[
            float(v) for v in positions[k]])])
        slope = 1.0 if slopes is None else slopes[k]
        group.PixelValueTransformationSequence = DicomSequence([_item(
            RescaleSlope=slope, RescaleIntercept=CT_INTERCEPT, RescaleType="HU")])
        frames.append(group)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    _set_pixels(ds, np.moveaxis(stored, 2, 0))
    ds.save_as(path, enforce_file_format=True)
    return path


def axial_positions(n: int, step: float = 2.5, origin=(-20.0, -30.0, 40.0),
                    shift_per_slice=(0.0, 0.0)) -> list[list[float]]:
    """Positions of an axial stack; a per-slice in-plane shift makes a gantry tilt."""
    return [[origin[0] + k * shift_per_slice[0], origin[1] + k * shift_per_slice[1],
             origin[2] + k * step] for k in range(n)]


def _item(**values) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _set_pixels(ds: Dataset, pixels: np.ndarray) -> None:
    pixels = np.ascontiguousarray(pixels, dtype=np.uint16)
    ds.Rows, ds.Columns = int(pixels.shape[-2]), int(pixels.shape[-1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()


def write_volume_as_dicom(folder: Path, hu: np.ndarray, ras_affine: np.ndarray) -> list[Path]:
    """A (i, j, k) HU volume with a voxel -> RAS affine (orthogonal axes) as a CT series."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ras_affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    directions = lps[:3, :3] / spacing
    orientation = [*directions[:, 0], *directions[:, 1]]
    positions = [lps[:3, 3] + k * lps[:3, 2] for k in range(hu.shape[2])]
    stored = np.clip(np.rint(hu - CT_INTERCEPT), 0, 65535).astype(np.uint16)
    return write_series(folder, stored.transpose(1, 0, 2), positions, orientation=orientation,
                        spacing=(spacing[1], spacing[0]), bits_stored=12)
