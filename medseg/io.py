"""Reading volumes and writing masks with their geometry kept.

`read_volume` gives the voxel array in the file's own voxel order plus its voxel-to-RAS
affine; `write_mask` writes a label map onto the exact grid (and NIfTI header) of a
reference image.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.errors import MedsegError
from medseg.fileio import atomic_path

NIFTI_SUFFIXES = (".nii", ".nii.gz")
MAX_VOXELS = 2**31


@dataclass(frozen=True)
class Volume:
    """Voxel data (file voxel order, channels last if any) and its voxel-to-RAS affine."""

    data: np.ndarray
    affine: np.ndarray
    path: Path

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape[:3])


def is_nifti(path: str | Path) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


def load_nifti(path: str | Path) -> nib.Nifti1Image:
    """Open a NIfTI header with checks; voxels are read lazily."""
    path = Path(path)
    if not path.is_file():
        raise MedsegError("file not found", path)
    if path.stat().st_size == 0:
        raise MedsegError("file is empty", path)
    try:
        image = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for broken headers
        raise MedsegError(f"not a readable NIfTI file ({exc})", path) from exc
    _check_header(image, path)
    _check_raw_spacing(path)
    return image


def read_volume(path: str | Path, dtype: type = np.float32) -> Volume:
    """Read a NIfTI volume's voxels and affine; other formats arrive with the readers issue."""
    path = Path(path)
    if not is_nifti(path):
        raise MedsegError("unsupported format (expected .nii or .nii.gz)", path)
    image = load_nifti(path)
    try:
        data = np.asarray(image.dataobj, dtype=dtype)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as exc:
        raise MedsegError(f"cannot read voxel data ({exc})", path) from exc
    if not np.all(np.isfinite(data)):
        raise MedsegError("voxel data contains NaN or Inf", path)
    return Volume(data=data, affine=image.affine.copy(), path=path)


def write_mask(mask: np.ndarray, reference: str | Path, path: str | Path) -> Path:
    """Write `mask` as NIfTI onto the reference image's grid, keeping its qform/sform codes."""
    reference_image = load_nifti(reference)
    expected = tuple(reference_image.shape[:3])
    if tuple(mask.shape) != expected:
        raise MedsegError(f"mask shape {mask.shape} does not match the input's {expected}",
                          reference)
    dtype = np.uint8 if mask.max(initial=0) < 256 else np.uint16
    header = reference_image.header.copy()
    header.set_data_dtype(dtype)
    header.set_slope_inter(1.0, 0.0)
    image = nib.Nifti1Image(mask.astype(dtype), None, header=header)
    image.set_qform(reference_image.get_qform(), code=int(reference_image.header["qform_code"]))
    image.set_sform(reference_image.get_sform(), code=int(reference_image.header["sform_code"]))
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
    return Path(path)


def _check_raw_spacing(path: Path) -> None:
    """nibabel quietly turns a zero pixdim into 1 on load; a zero or NaN spacing in the
    file is refused instead when the affine depends on it (no sform)."""
    with nib.openers.ImageOpener(str(path)) as handle:
        raw = nib.Nifti1Header.from_fileobj(handle, check=False)
    if int(raw["sform_code"]) > 0:
        return
    pixdim = np.asarray(raw["pixdim"][1:4], dtype=float)
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0):
        raise MedsegError(f"voxel spacing {pixdim.tolist()} is zero, negative or NaN", path)


def _check_header(image: nib.Nifti1Image, path: Path) -> None:
    shape = image.shape
    if len(shape) < 3 or (len(shape) > 3 and int(np.prod(shape[3:])) != 1):
        raise MedsegError(f"expected a 3D volume, got shape {shape}", path)
    if int(np.prod(shape, dtype=np.int64)) > MAX_VOXELS:
        raise MedsegError(f"header claims {shape} voxels, more than 2^31", path)
    affine = image.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise MedsegError("affine is singular or not finite (zero or NaN spacing)", path)
