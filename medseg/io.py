"""Reading volumes and writing masks with their geometry kept.

`read_volume` reads NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) and
DICOM series (a folder, or one DICOM file) into the file's own voxel order plus its
voxel-to-RAS affine; `write_mask` writes a label map onto the exact grid of a reference as
NIfTI, NRRD or MetaImage (a NIfTI reference's header, qform/sform codes included, is kept).
"""

from __future__ import annotations

import gzip
import hashlib
import traceback
import zlib
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.errors import MedsegError
from medseg.fileio import (
    atomic_path,
    folders_removed_on_failure,
    misnamed_format,
    refuse_unwritable_place,
)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
VOLUME_SUFFIXES = (".nii.gz", ".nii", *ITK_SUFFIXES)
WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
MAX_VOXELS = 2**31
LABEL_ROUNDING = 1e-3  # how far from a whole number a float label value may lie
MM_PER_UNIT = {"meter": 1000.0, "mm": 1.0, "micron": 1e-3}  # NIfTI spatial units; unknown: mm
SCANNER_CODE = 1  # NIfTI qform/sform code for scanner-based anatomical coordinates
# how far (mm, and direction cosines) two affines may differ on one voxel grid: absolute, as a
# relative tolerance would grow with the origin's distance from the scanner's centre
GRID_TOLERANCE_MM = 1e-3


@dataclass(frozen=True, eq=False)
class Geometry:
    """Where a volume's voxels lie: spatial shape and voxel-to-RAS affine, plus the source's
    NIfTI header when it had one (so a mask written back keeps its qform/sform codes)."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    nifti_header: nib.Nifti1Header | None = None
    # what the reader of another format found doubtful about where the voxels lie
    orientation_note: str | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def origin(self) -> tuple[float, float, float]:
        """Centre of the first voxel, RAS mm."""
        return tuple(float(v) for v in self.affine[:3, 3])

    @property
    def direction(self) -> np.ndarray:
        """Unit vectors of the voxel axes (columns), RAS."""
        return self.affine[:3, :3] / np.linalg.norm(self.affine[:3, :3], axis=0)


# Neither nibabel's reading (which medseg and MONAI share) nor ITK's is more right: such a
# header has no orientation, and the tools disagree about the second voxel axis.
NO_ORIENTATION = ("its NIfTI header gives no orientation (qform and sform codes 0): medseg "
                  "reads it as nibabel and MONAI do (voxel axes towards left, anterior, "
                  "superior), ITK tools (SimpleITK, 3D Slicer, ITK-SNAP) with anterior and "
                  "posterior swapped; check which is right")


DIGEST_CHUNK_BYTES = 16 * 2**20


def voxels_digest(*arrays: np.ndarray) -> str:
    """SHA-256 of arrays' shapes and values as float32 (how training reads images), so that
    a case stored as int16 and its copy stored as float32 are one case: `check` and
    training find the same duplicates. The values go in one memory order whatever the
    array's own: Fortran, as nibabel reads a file (no copy there: reordering a CT costs
    seconds); a label read as floats or reordered onto its image comes in C order, and its
    integer copy was another case. Converted a slab at a time: no float32 copy of a CT."""
    digest = hashlib.sha256()
    for array in arrays:
        ordered = array.T  # a Fortran array's bytes in C order; a C array's gathered by slab
        digest.update(f"{array.shape}".encode())
        rows = max(1, DIGEST_CHUNK_BYTES // max(1, ordered[:1].size * 4))
        for start in range(0, ordered.shape[0], rows):
            slab = np.ascontiguousarray(ordered[start:start + rows], dtype=np.float32)
            digest.update(memoryview(slab).cast("B"))
    return digest.hexdigest()


def header_note(geometry: Geometry) -> str | None:
    """What a reader of this NIfTI header should be told before trusting where medseg puts
    it: no orientation at all, a qform and an sform that place the voxels differently, or an
    sform alone whose voxel size is not the header's pixdim (medseg, nibabel and MONAI read
    the sform; ITK tools may read the qform, or the sform's directions with pixdim's voxel
    size, so the scan and its mask would lie elsewhere there). None for any other header."""
    if geometry.orientation_note:
        return geometry.orientation_note
    if orientation_unknown(geometry):
        return NO_ORIENTATION
    header = geometry.nifti_header
    if header is None or int(header["sform_code"]) == 0:
        return None
    if int(header["qform_code"]) == 0:
        return _sform_pixdim_note(geometry, header)
    mm = _mm_per_unit(header)
    apart = _apart(header.get_qform() * mm, header.get_sform() * mm, geometry)
    if apart is None:
        return None
    return (f"its NIfTI qform and sform place the voxels up to {apart:.3g} mm apart (more "
            f"than half a voxel): medseg "
            f"reads the sform, as nibabel and MONAI do, ITK tools (SimpleITK, 3D Slicer, "
            f"ITK-SNAP) may read the qform; check which is right")


def _sform_pixdim_note(geometry: Geometry, header) -> str | None:
    """An sform without a qform whose axes are not pixdim long: ITK takes the sform's
    directions and origin with pixdim's voxel size (nibabel's set_sform leaves pixdim 1)."""
    mm = _mm_per_unit(header)
    sform = header.get_sform() * mm
    lengths = np.linalg.norm(sform[:3, :3], axis=0)
    pixdim = np.abs(np.asarray(header["pixdim"][1:4], dtype=float)) * float(mm[0, 0])
    if np.any(lengths <= 0) or np.any(~np.isfinite(pixdim)) or np.any(pixdim <= 0):
        return None
    itk_read = sform.copy()
    itk_read[:3, :3] = sform[:3, :3] / lengths * pixdim
    apart = _apart(itk_read, sform, geometry)
    if apart is None:
        return None
    return (f"its NIfTI sform gives voxels of {_mm(lengths)} mm but its pixdim says "
            f"{_mm(pixdim)} mm (no qform): medseg reads the sform, as nibabel and MONAI do, "
            f"ITK tools (SimpleITK, 3D Slicer, ITK-SNAP) may take pixdim's size, placing "
            f"voxels up to {apart:.3g} mm apart; check which is right")


def _mm_per_unit(header) -> np.ndarray:
    """A scale for a header's affines that puts their rotation-zoom and offset in mm (the
    bottom row stays 0 0 0 1)."""
    scale = np.ones((4, 1))
    scale[:3] = MM_PER_UNIT.get(spatial_unit(header), 1.0)
    return scale


def spatial_unit(header) -> str:
    """The spatial unit a NIfTI header's xyzt_units names ('unknown' for a code NIfTI does
    not define). Read from its three spatial bits alone: nibabel's get_xyzt_units raised
    KeyError on an undefined code in the time bits, which medseg does not use."""
    code = int(np.asarray(header["xyzt_units"])) % 8
    label = nib.nifti1.unit_codes.label.get(code, "unknown")
    return label if label in MM_PER_UNIT else "unknown"


def _apart(one: np.ndarray, other: np.ndarray, geometry: Geometry) -> float | None:
    """How far (mm) two affines place the grid's corner voxels, if more than half a voxel:
    the qform is a float32 quaternion and cannot shear, so on a large oblique scan it lies a
    few hundredths of a mm off the sform, which no viewer shows; half a voxel is a place."""
    corners = np.array([[0, 0, 0, 1]] + [[*(np.asarray(geometry.shape) - 1) * axis, 1]
                                         for axis in np.eye(3)], dtype=float).T
    apart = float(np.abs((one - other) @ corners).max())
    return apart if apart > 0.5 * min(geometry.spacing) else None


def _mm(values: np.ndarray) -> str:
    return " x ".join(f"{v:.4g}" for v in values)


def orientation_unknown(geometry: Geometry) -> bool:
    """A NIfTI header whose qform and sform codes are both 0 (ANALYZE-style)."""
    header = geometry.nifti_header
    return (header is not None and int(header["qform_code"]) == 0
            and int(header["sform_code"]) == 0)


def grid_mismatch(geometry: Geometry, reference: Geometry) -> str | None:
    """Why `geometry` is not `reference`'s voxel grid (the shape, or the affines beyond
    GRID_TOLERANCE_MM), or None when it is."""
    if tuple(geometry.shape) != tuple(reference.shape):
        return f"shape {tuple(geometry.shape)} differs from {tuple(reference.shape)}"
    worst = float(np.abs(geometry.affine - reference.affine).max())
    if worst > GRID_TOLERANCE_MM:
        return f"affines differ by up to {worst:.4g} mm (tolerance {GRID_TOLERANCE_MM} mm)"
    return None


def storage_reordering(geometry: Geometry, target: Geometry) -> np.ndarray | None:
    """The nibabel orientation transform that puts `geometry`'s voxels onto `target` when both
    grids hold the same voxel centres in another axis order or direction (one DICOM converter
    stores rows top-down, another bottom-up); None when they do not. From the headers alone."""
    orientations = nib.orientations
    start, end = (orientations.io_orientation(g.affine) for g in (geometry, target))
    if np.isnan(start).any() or np.isnan(end).any():
        # an axis with no direction (a corrupt entry dwarfs the others): ornt_transform
        # raised ValueError, a traceback in place of a case on another grid
        return None
    transform = orientations.ornt_transform(start, end)
    moved_shape = [0, 0, 0]
    for axis, size in zip(transform[:, 0].astype(int), geometry.shape, strict=True):
        moved_shape[axis] = size
    moved = Geometry(tuple(moved_shape),
                     geometry.affine @ orientations.inv_ornt_aff(transform, geometry.shape))
    return transform if grid_mismatch(moved, target) is None else None


def label_grid_mismatch(label: Geometry, image: Geometry) -> str | None:
    """Why a label is not on its image's grid (see grid_mismatch), or None when it is, or when
    it stores the same voxels in another axis order or direction (see storage_reordering):
    training reorders those onto the image's grid, as on_grid_of does."""
    mismatch = grid_mismatch(label, image)
    if mismatch is not None and storage_reordering(label, image) is not None:
        return None
    return mismatch


def reorder_onto(data: np.ndarray, affine: np.ndarray, target: Geometry) -> np.ndarray | None:
    """`data` transposed and flipped onto `target` when it holds the same voxels in another
    storage order (see storage_reordering); None when it does not. Exact, unlike a
    resampling."""
    transform = storage_reordering(Geometry(tuple(data.shape[:3]), affine), target)
    if transform is None:
        return None
    return np.ascontiguousarray(nib.orientations.apply_orientation(data, transform))


@dataclass(frozen=True, eq=False)
class Volume:
    """Voxel data (file voxel order) and where it lies."""

    data: np.ndarray
    geometry: Geometry
    path: Path

    @property
    def affine(self) -> np.ndarray:
        return self.geometry.affine

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.geometry.spacing

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return self.geometry.shape


def on_grid_of(volume: Volume, reference: Volume) -> Volume:
    """`volume` (a label) on `reference`'s grid: itself, or its voxels reordered onto it when
    it stores the same voxels in another axis order or direction; refused in one line
    otherwise."""
    mismatch = grid_mismatch(volume.geometry, reference.geometry)
    if mismatch is None:
        return volume
    reordered = reorder_onto(volume.data, volume.affine, reference.geometry)
    if reordered is None:
        raise MedsegError(f"not on the grid of {reference.path.name}: {mismatch}", volume.path)
    return Volume(reordered, Geometry(reference.geometry.shape, reference.affine), volume.path)


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def read_geometry(path: str | Path, series_uid: str | None = None,
                  resample_irregular: bool = False, channels: bool = False) -> Geometry:
    """The geometry of a volume from its header(s) alone, with every header check applied;
    with `channels`, a NIfTI of several volumes (MSD's 4D images) gives their grid."""
    path = Path(path)
    kind = _kind(path)
    if kind == "nifti":
        image = load_nifti(path, channels=channels)
        return Geometry(tuple(image.shape[:3]), nifti_affine_mm(image), image.header.copy())
    if kind == "itk":
        from medseg.itkio import orientation_note, read_itk_header

        shape, affine = read_itk_header(path)
        return Geometry(shape, affine, orientation_note=orientation_note(path))
    return _dicom_geometry(path, series_uid, resample_irregular)


def read_volume(path: str | Path, dtype: type | None = np.float32, series_uid: str | None = None,
                resample_irregular: bool = False, channel: int | None = None) -> Volume:
    """Read a volume's voxels and geometry. `dtype=None` keeps the stored type (modality
    values for DICOM). `series_uid` and `resample_irregular` apply to DICOM only. A NIfTI of
    several volumes (MSD's multi-channel scans, X x Y x Z x C) is refused unless `channel`
    picks one of them (see `channel_count`); any other file is its only channel."""
    path = Path(path)
    kind = _kind(path)
    with np.errstate(over="ignore"):  # a value beyond float32 is named below, not warned of
        if kind == "nifti":
            volume = _read_nifti(path, dtype, channel)
        elif kind == "itk":
            from medseg.itkio import orientation_note, read_itk

            data, affine = read_itk(path, dtype)
            volume = Volume(data, Geometry(tuple(data.shape[:3]), affine,
                                           orientation_note=orientation_note(path)), path)
        else:
            volume = _read_dicom(path, dtype, series_uid, resample_irregular)
    if volume.data.dtype.kind == "f" and not np.all(np.isfinite(volume.data)):
        if dtype is not None:  # finite as stored, and too large for `dtype`?
            refuse_out_of_range(read_volume(path, None, series_uid, resample_irregular,
                                            channel).data, np.dtype(dtype), path)
        raise MedsegError("voxel data contains NaN or Inf", path)
    return volume


def read_channels(path: str | Path, dtype: type | None = np.float32) -> list[Volume]:
    """Every volume of a NIfTI of several (MSD's 4D multi-channel images) in channel order,
    as `read_volume(path, dtype, channel=k)` gives each, read in one pass: a .nii.gz is
    decompressed once, not once per channel."""
    path = Path(path)
    image = load_nifti(path, channels=True)
    try:
        # a value beyond float32 is named below, not warned of (as `read_volume` does)
        with np.errstate(over="ignore"):
            if path.name.lower().endswith(".gz"):
                data = _gzip_voxels_checked(path, type(image), dtype)
            else:
                data = _voxels(image, dtype)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as exc:
        raise MedsegError(f"cannot read voxel data ({exc})", path) from exc
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        if dtype is not None:  # finite as stored, and too large for `dtype`?
            refuse_out_of_range(np.asarray(image.dataobj), np.dtype(dtype), path)
        raise MedsegError("voxel data contains NaN or Inf", path)
    shape = tuple(image.shape[:3])
    # the 4th and later axes as one, the first of them fastest (as `_channel_slicer` counts)
    volumes = data.reshape((*shape, -1), order="F") if data.ndim > 4 else \
        data.reshape((*shape, -1))
    geometry = Geometry(shape, nifti_affine_mm(image), image.header.copy())
    # views, not copies: each channel of the (Fortran-ordered) array is one contiguous block,
    # laid out as `read_volume` gives it; a copy would double the memory of a large file
    return [Volume(volumes[..., k], geometry, path) for k in range(volumes.shape[3])]


def channel_count(path: str | Path) -> int:
    """How many volumes a NIfTI holds along its 4th and later axes (MSD's channels, or a
    time axis); 1 for a 3D NIfTI and for any other file. From the header alone."""
    path = Path(path)
    if _kind(path) != "nifti":
        return 1
    return int(np.prod(load_nifti(path, channels=True).shape[3:], dtype=np.int64))


def refuse_out_of_range(data: np.ndarray, dtype: np.dtype, path: Path) -> None:
    """Refuse floating-point voxels beyond what `dtype` (float32, as training and predict
    read images) can hold: they would become infinite."""
    if (data.dtype.kind != "f" or dtype.kind != "f" or data.dtype.itemsize <= dtype.itemsize
            or not data.size):
        return  # only a wider float can hold what `dtype` cannot: no pass over the voxels
    largest = float(np.abs(data).max())
    if largest > float(np.finfo(dtype).max):
        raise MedsegError(f"voxel values up to {largest:.3g} are beyond {dtype.name}'s range "
                          f"(±{float(np.finfo(dtype).max):.3g})", path)


# DICOM writers that round direction cosines to 3 decimals shear the axes by up to 0.1
# degrees; 0.2 degrees changes a distance or volume in mm by under 0.4 %, and predict maps
# voxels by index, so the mask lies on the scan's grid whatever its shear
SHEAR_TOLERANCE_DEGREES = 0.2


def shear_degrees(geometry: Geometry) -> float:
    """How far (degrees) the voxel axes are from right angles to one another."""
    cosines = geometry.direction.T @ geometry.direction
    return float(np.degrees(np.arcsin(min(np.abs(cosines - np.eye(3)).max(), 1.0))))


def refuse_sheared_axes(geometry: Geometry, path: Path | None, why: str) -> None:
    """Refuse a grid whose voxel axes are not at right angles (any rotation is fine), saying
    `why` the command needs them to be."""
    worst = shear_degrees(geometry)
    if worst > SHEAR_TOLERANCE_DEGREES:
        raise MedsegError(f"the voxel axes are sheared (up to {worst:.2f} degrees off a right "
                          f"angle), {why}; resample it onto an orthogonal grid first", path)


def read_label_map(path: str | Path) -> Volume:
    """A label map as int32. Labels stored as floats must hold whole numbers: a probability
    map, or a mask resampled with linear interpolation, is refused instead of truncated."""
    volume = read_volume(path, dtype=None)
    return Volume(whole_label_values(volume.data, volume.path), volume.geometry, volume.path)


def whole_label_values(data: np.ndarray, path: Path, dtype: type = np.int32,
                       ids: Collection[int] | None = None) -> np.ndarray:
    """`data` (a label map read from `path`) as `dtype`, or a MedsegError naming the file:
    values a rounding error off whole numbers are those numbers; others are refused, as are
    values outside `ids` (a run's label map) or, without it, beyond int32."""
    if data.dtype.kind == "f":
        refuse_fractional_labels(data, path)
    if data.size:
        _refuse_values_beyond(data, ids, path)
    if data.dtype.kind != "f":
        return data.astype(dtype, copy=False)
    if data.dtype == dtype and data.flags.writeable and data.flags.owndata:
        return np.rint(data, out=data)  # an array read for this: rounded where it lies
    # rounded straight into the result: no full-size float64 temporaries
    return np.rint(data, out=np.empty(data.shape, dtype), casting="unsafe")


def _refuse_values_beyond(data: np.ndarray, ids: Collection[int] | None, path: Path) -> None:
    lowest, highest = data.min(), data.max()
    if ids is None:
        int32 = np.iinfo(np.int32)
        if lowest < int32.min or highest > int32.max:
            raise MedsegError(f"label values up to {highest:.0f} (or down to {lowest:.0f}) "
                              f"are beyond any label id", path)
    elif lowest < min(ids) or highest > max(ids):  # the values themselves only then
        unknown = sorted({int(np.rint(v)) for v in np.unique(data)} - set(ids))
        if unknown:
            raise MedsegError(f"label values {unknown[:10]} are not in the run's label map "
                              f"(ids {', '.join(map(str, sorted(ids)))})", path)


def refuse_fractional_labels(data: np.ndarray, path: Path, slab_voxels: int = 2**22) -> None:
    """A scaled header (scl_slope 1.0000001) leaves whole numbers a rounding error off;
    anything further off is a probability map or a linearly resampled mask: refused. Checked
    a slab at a time, so a float64 CT label needs no full-size temporaries."""
    flat = data.reshape(-1)
    for start in range(0, flat.size, slab_voxels):
        slab = flat[start:start + slab_voxels]
        fractional = np.abs(slab - np.rint(slab)) > LABEL_ROUNDING
        if fractional.any():
            raise MedsegError(f"label has non-integer values (e.g. "
                              f"{float(slab[fractional][0]):.7g}); a label map holds whole "
                              f"numbers", path)


def write_mask(mask: np.ndarray, reference: Geometry | Volume | str | Path,
               path: str | Path) -> Path:
    """Write a label map onto the reference's grid as .nii.gz/.nii, .nrrd or .mha (by the
    path's extension), as uint8 (uint16 beyond 255 labels)."""
    geometry = _as_geometry(reference)
    if tuple(mask.shape) != tuple(geometry.shape):
        where = reference if isinstance(reference, str | Path) else path
        raise MedsegError(f"mask shape {mask.shape} does not match the input's "
                          f"{tuple(geometry.shape)}", where)
    dtype = np.uint8 if mask.max(initial=0) < 256 else np.uint16
    return write_volume(np.asarray(mask).astype(dtype), geometry, path, label_map=True)


def write_volume(data: np.ndarray, geometry: Geometry, path: str | Path,
                 label_map: bool = False, scaling: tuple[float, float] | None = None) -> Path:
    """Write voxels with the given geometry, atomically; the format follows the extension.
    A `label_map` in NIfTI says so (intent 'label') and drops the source's display window.
    `scaling` (NIfTI only: scl_slope, scl_inter) is written with `data` as they are, as
    `stored_integers` gives them."""
    path = Path(path)
    if not path.name.lower().endswith(WRITE_SUFFIXES):
        raise MedsegError(f"cannot write this format; use one of {', '.join(WRITE_SUFFIXES)}",
                          path)
    if scaling is not None and not is_nifti(path):
        raise ValueError(f"only NIfTI stores a scaling, not {path.name}")
    from medseg.itkio import itk_message, write_itk

    try:
        with atomic_path(path) as tmp:
            if is_nifti(path):
                nib.save(_nifti_image(data, geometry, label_map, scaling), str(tmp))
            else:
                write_itk(data, geometry.affine, tmp)
    except OSError as exc:  # a read-only folder, a full disk
        # the writer's open file lives on in the traceback's frames, and with it the disk
        # space of the deleted temporary: every later case of a batch found the disk full
        traceback.clear_frames(exc.__traceback__)
        raise MedsegError(f"cannot write ({exc.strerror or exc})", path) from exc
    except RuntimeError as exc:  # ITK's writers
        raise MedsegError(f"cannot write ({itk_message(exc)})", path) from exc
    return path


def convert_volume(input: str | Path, output: str | Path, series_uid: str | None = None,
                   resample_irregular: bool = False) -> Path:
    """Convert any readable volume (DICOM series included) to NIfTI, NRRD or MetaImage, by
    the output's extension; voxel values and geometry are kept."""
    output = Path(output)
    if not output.name.lower().endswith(WRITE_SUFFIXES):
        raise MedsegError(f"unknown output format; use one of {', '.join(WRITE_SUFFIXES)}",
                          output)
    if output.resolve() == Path(input).resolve():
        raise MedsegError("output would overwrite the input", output)
    if not output.exists() and not output.is_symlink():  # a path under a file, say
        refuse_unwritable_place(output)
    with folders_removed_on_failure(output.parent):  # Ctrl-C, a full disk
        volume = read_volume(input, dtype=None, series_uid=series_uid,
                             resample_irregular=resample_irregular)
        if _kind(Path(input)) == "dicom":
            volume = replace(volume, data=_narrowest_integers(volume.data))
        return write_as_stored(volume, output)


def _narrowest_integers(data: np.ndarray) -> np.ndarray:
    """A DICOM series' integers in the smallest type that holds the values it holds (its read
    type holds every value its BitsStored could: int32 for 16 bits and an intercept of -1024)."""
    if data.dtype.kind not in "iu" or not data.size:
        return data
    low, high = int(data.min()), int(data.max())
    for kind in (np.int16, np.uint16, np.int32):
        if np.dtype(kind).itemsize >= data.dtype.itemsize:
            return data  # never wider than read: an 8-bit series stays 8-bit
        if np.iinfo(kind).min <= low and high <= np.iinfo(kind).max:
            return data.astype(kind)
    return data


def write_as_stored(volume: Volume, path: Path) -> Path:
    """`volume` written as compactly as its file held it: integers scaled to whole numbers as
    those numbers (`compact_voxels`), other scaled integers, into a NIfTI, as stored with
    their scaling (`stored_integers`; not as float64, 4 times int16's size)."""
    data = compact_voxels(volume)
    stored = stored_integers(volume) if data.dtype.kind == "f" and is_nifti(path) else None
    if stored is None:
        return write_volume(data, volume.geometry, path)
    return write_volume(stored[0], volume.geometry, path, scaling=stored[1])


def compact_voxels(volume: Volume) -> np.ndarray:
    """Integers stored with a NIfTI scl_slope/inter come out of nibabel as float64: when the
    scaled values are whole numbers (HU from uint16 and an intercept of -1024), the smallest
    integer type that holds them keeps the converted file a quarter of that size."""
    header = volume.geometry.nifti_header
    data = volume.data
    if header is None or header.get_data_dtype().kind not in "iu" or data.dtype.kind != "f":
        return data
    if not np.array_equal(data, np.round(data)):
        return data
    low, high = float(data.min()), float(data.max())
    for kind in (np.int16, np.int32):
        if np.iinfo(kind).min <= low and high <= np.iinfo(kind).max:
            return data.astype(kind)
    return data


def stored_integers(volume: Volume) -> tuple[np.ndarray, tuple[float, float]] | None:
    """The integers a NIfTI stores for `volume.data`, and its scl_slope and scl_inter, when
    the file holds integers scaled to values that are not all whole (whole ones are
    `compact_voxels`'s): written back with this scaling, a copy keeps the stored type's size
    (nibabel reads them as float64, 4 times int16's) and reads as the same values. None
    otherwise. The integers are recovered from the values, and checked to give them again."""
    header = volume.geometry.nifti_header
    stored = None if header is None else header.get_data_dtype()
    if stored is None or stored.kind not in "iu" or volume.data.dtype.kind != "f":
        return None
    proxy = load_nifti(volume.path, channels=True).dataobj  # nibabel moves the scaling here
    slope, inter = float(proxy.slope), float(proxy.inter)
    if slope == 0 or not volume.data.size:
        return None
    raw = volume.data - inter  # one float64 copy, worked on in place
    raw /= slope
    np.rint(raw, out=raw)
    if raw.min() < np.iinfo(stored).min or raw.max() > np.iinfo(stored).max:
        return None
    raw = raw.astype(stored.newbyteorder("="))
    scaled = nib.volumeutils.apply_read_scaling(raw, slope, inter)
    return (raw, (slope, inter)) if np.array_equal(scaled, volume.data) else None


def load_nifti(path: str | Path, channels: bool = False) -> nib.Nifti1Image:
    """Open a NIfTI header with checks; voxels are read lazily. A file of several volumes
    (4th and later axes longer than 1) is refused unless `channels`."""
    path = Path(path)
    refuse_missing_or_empty(path)
    try:
        image = _open_nifti(path)
    except Exception as exc:  # nibabel raises many types for broken headers
        why = (misnamed_format(path, "NIfTI") or _compression_misnamed(path)
               or f"not a readable NIfTI file ({exc})")
        raise MedsegError(why, path) from exc
    _check_header(image, path, channels)
    _check_raw_spacing(path, type(image.header))
    return image


def _compression_misnamed(path: Path) -> str | None:
    """A NIfTI whose name and compression disagree (nibabel's own message says only that it
    cannot tell the file's type, or that it is not a gzip file)."""
    with open(path, "rb") as stream:
        gzipped = stream.read(2) == b"\x1f\x8b"
    named_gz = path.name.lower().endswith(".gz")
    if gzipped and not named_gz:
        return f"gzip-compressed data in a file named {path.suffix}: rename it {path.name}.gz"
    if named_gz and not gzipped:
        return "not gzip-compressed, although named .gz: rename it without the .gz"
    return None


def _open_nifti(path: Path) -> nib.Nifti1Image:
    if path.name.endswith(NIFTI_SUFFIXES) or path.name.endswith((".NII", ".NII.GZ")):
        return nib.load(str(path))
    # nibabel looks for scan.nii where the name is scan.Nii (it maps a mixed-case suffix to
    # one case): name the file itself in a file map, of the class its header size says
    with nib.openers.ImageOpener(str(path)) as stream:
        sizeof_hdr = stream.read(4)
    nifti2 = 540 in (int.from_bytes(sizeof_hdr, "little"), int.from_bytes(sizeof_hdr, "big"))
    klass = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    holder = nib.FileHolder(filename=str(path))
    return klass.from_file_map({"image": holder, "header": holder})


def nifti_affine_mm(image: nib.Nifti1Image) -> np.ndarray:
    """The voxel-to-RAS affine in millimetres: a header whose xyzt_units say metres or
    microns has its affine in those units (nibabel leaves it as stored). A mask written back
    keeps the source header, so it stays in the file's own units."""
    affine = image.affine.copy()
    affine[:3, :] *= MM_PER_UNIT.get(spatial_unit(image.header), 1.0)
    return affine


def refuse_missing_or_empty(path: Path) -> None:
    """Refuse a path that is not a regular file with content; a pipe or a device is never
    opened (reading a pipe would wait for a writer, a device would never end)."""
    if not path.is_file():
        if path.exists():
            raise MedsegError("not a regular file (a pipe, socket or device)", path)
        raise MedsegError("file not found", path)
    if path.stat().st_size == 0:
        raise MedsegError("file is empty", path)


def _kind(path: Path) -> str:
    """'nifti', 'itk' or 'dicom'; refuses what is missing, empty or of unknown format."""
    if path.is_dir():
        return "dicom"
    refuse_missing_or_empty(path)
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(ITK_SUFFIXES):
        return "itk"
    from medseg.dicom import is_dicom_file

    if is_dicom_file(path):
        return "dicom"
    raise MedsegError(f"unsupported format (expected {', '.join(VOLUME_SUFFIXES)}, a DICOM "
                      f"file or a DICOM folder)", path)


def _read_nifti(path: Path, dtype: type | None, channel: int | None = None) -> Volume:
    image = load_nifti(path, channels=channel is not None)
    pick = None if channel is None or len(image.shape) == 3 else _channel_slicer(
        image.shape, channel, path)
    try:
        if path.name.lower().endswith(".gz"):
            data = _gzip_voxels_checked(path, type(image), dtype, pick)
        else:
            data = _voxels(image, dtype, pick)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as exc:
        raise MedsegError(f"cannot read voxel data ({exc})", path) from exc
    data = data.reshape(image.shape[:3])  # a 4D file holding a single volume
    return Volume(data, Geometry(tuple(image.shape[:3]), nifti_affine_mm(image),
                                 image.header.copy()), path)


def _channel_slicer(shape: tuple[int, ...], channel: int, path: Path) -> tuple:
    """The index of volume `channel` of a NIfTI's 4th and later axes, numbered as stored
    (the first of these axes fastest)."""
    count = int(np.prod(shape[3:], dtype=np.int64))
    if not 0 <= channel < count:
        raise MedsegError(f"no channel {channel}: the file holds {count} (shape {shape})", path)
    extra = np.unravel_index(channel, shape[3:], order="F")
    return (slice(None),) * 3 + tuple(int(i) for i in extra)


def _voxels(image: nib.Nifti1Image, dtype: type | None, pick: tuple | None = None
            ) -> np.ndarray:
    """The voxels, or those of `pick` alone (read from the file without the others)."""
    source = image.dataobj if pick is None else image.dataobj[pick]
    return np.asarray(source) if dtype is None else np.asarray(source, dtype=dtype)


def _gzip_voxels_checked(path: Path, image_class: type[nib.Nifti1Image], dtype: type | None,
                         pick: tuple | None = None) -> np.ndarray:
    """The voxels of a .nii.gz, with gzip's CRC and length checked: nibabel reads the stream
    only as far as the voxels go, and gzip checks the trailer at the end of the stream
    alone, so a damaged file (a flipped bit, a copy cut short by its last bytes) would
    otherwise be read without a word. One pass: the rest of the stream is read after the
    voxels."""
    with gzip.open(path, "rb") as stream:
        holder = nib.FileHolder(filename=str(path), fileobj=stream)
        image = image_class.from_file_map({"image": holder, "header": holder}, mmap=False)
        data = _voxels(image, dtype, pick)
        try:
            while stream.read(1 << 20):  # extensions or padding after the voxels, rarely any
                pass
        except gzip.BadGzipFile as exc:
            # bytes after the whole (CRC-checked) stream that start no other one: ignored,
            # as `gzip -t` does
            if not str(exc).startswith("Not a gzipped file"):
                raise
    return data


def _dicom_geometry(path: Path, series_uid: str | None, resample_irregular: bool) -> Geometry:
    from medseg.dicom import is_irregular, read_stack, regular_affine
    from medseg.dicom_resample import regular_grid

    stack = read_stack(path, series_uid)
    if resample_irregular and is_irregular(stack):
        grid = regular_grid(stack, path)
        return Geometry(grid.shape, grid.affine)
    return Geometry(stack.shape, regular_affine(stack, path))


def _read_dicom(path: Path, dtype: type | None, series_uid: str | None,
                resample_irregular: bool) -> Volume:
    from medseg.dicom import is_irregular, native_dtype, read_pixels, read_stack, regular_affine
    from medseg.dicom_resample import resample_stack

    stack = read_stack(path, series_uid)
    target = np.dtype(dtype) if dtype is not None else native_dtype(stack)
    if resample_irregular and is_irregular(stack):
        data, grid = resample_stack(stack, path, target)
        return Volume(data, Geometry(grid.shape, grid.affine), path)
    affine = regular_affine(stack, path)  # refuses tilt and uneven spacing before decoding
    return Volume(read_pixels(stack, target), Geometry(stack.shape, affine), path)


def _as_geometry(reference: Geometry | Volume | str | Path) -> Geometry:
    if isinstance(reference, Geometry):
        return reference
    if isinstance(reference, Volume):
        return reference.geometry
    return read_geometry(reference)


def _nifti_image(data: np.ndarray, geometry: Geometry, label_map: bool,
                 scaling: tuple[float, float] | None = None) -> nib.Nifti1Image:
    """A NIfTI image on the geometry's grid: the source header when there is one (codes
    kept), otherwise qform and sform set to the affine with the scanner code."""
    image = _nifti_on_grid(data, geometry, label_map)
    if scaling is not None:  # set once the image is made (nibabel resets it then): kept
        image.header.set_slope_inter(*scaling)
    return image


def _nifti_on_grid(data: np.ndarray, geometry: Geometry, label_map: bool) -> nib.Nifti1Image:
    if geometry.nifti_header is None:
        image = nib.Nifti1Image(data, geometry.affine)
        image.set_qform(geometry.affine, code=SCANNER_CODE)
        image.set_sform(geometry.affine, code=SCANNER_CODE)
        image.header.set_xyzt_units("mm")
        if label_map:
            image.header.set_intent("label")
        return image
    source = geometry.nifti_header
    header = source.copy()
    header.set_data_dtype(data.dtype)
    header.set_slope_inter(1.0, 0.0)
    if label_map:  # the scan's display window would make viewers show the labels black
        header["cal_min"], header["cal_max"] = 0, 0
        header["descrip"] = b""
        header.set_intent("label")
    image_class = nib.Nifti2Image if isinstance(source, nib.Nifti2Header) else nib.Nifti1Image
    image = image_class(data, None, header=header)
    image.set_qform(source.get_qform(), code=int(source["qform_code"]))
    image.set_sform(source.get_sform(), code=int(source["sform_code"]))
    return image


def _check_raw_spacing(path: Path, header_class: type[nib.Nifti1Header]) -> None:
    """nibabel quietly turns a zero pixdim into 1, and a negative one positive, on load: a
    negative spacing with a qform or an sform (ITK keeps its sign), and a zero or NaN one
    when the affine depends on it (no sform), are refused instead. `header_class` is the
    loaded image's (NIfTI-1 or NIfTI-2: their layouts differ)."""
    with nib.openers.ImageOpener(str(path)) as handle:
        raw = header_class.from_fileobj(handle, check=False)
    pixdim = np.asarray(raw["pixdim"][1:4], dtype=float)
    xform = "qform" if int(raw["qform_code"]) > 0 else \
        "sform" if int(raw["sform_code"]) > 0 else None
    if xform and np.any(pixdim < 0):
        # nibabel loads the qform with the spacing's absolute value, and the sform alone; ITK
        # either with pixdim's sign: the scan would lie mirrored in one of them, and so would
        # its mask
        stored = [float(f"{v:.6g}") for v in pixdim]
        read = "with the spacing made positive" if xform == "qform" else "as stored"
        raise MedsegError(f"voxel spacing (pixdim) {stored} is negative: nibabel and "
                          f"MONAI read this {xform} {read}, ITK tools (SimpleITK, 3D Slicer) "
                          f"mirror that axis; fix the header", path)
    _check_raw_qfac(raw, path)
    if int(raw["sform_code"]) > 0:
        return
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0):
        raise MedsegError(f"voxel spacing {pixdim.tolist()} is zero, negative or NaN", path)


def _check_raw_qfac(raw: nib.Nifti1Header, path: Path) -> None:
    """A qform, read without an sform, whose qfac (pixdim[0]) is negative but not -1: nibabel
    takes any value but -1 as 1 on load, ITK (nifticlib) any negative one as -1, so the slice
    axis lies mirrored in one of them, and a mask written back (qfac 1) with it. With an
    sform, both place the voxels by it (header_note names a qform that disagrees)."""
    qfac = float(raw["pixdim"][0])
    if int(raw["qform_code"]) > 0 and int(raw["sform_code"]) == 0 and qfac < 0 and qfac != -1:
        raise MedsegError(f"qfac (pixdim[0]) {qfac:.6g} is neither 1 nor -1: nibabel and "
                          f"MONAI read this qform with qfac 1, ITK tools (SimpleITK, 3D "
                          f"Slicer) with -1, mirroring the slice axis; fix the header", path)


def _check_header(image: nib.Nifti1Image, path: Path, channels: bool = False) -> None:
    shape = image.shape
    if len(shape) < 3 or (len(shape) > 3 and int(np.prod(shape[3:])) != 1 and not channels):
        raise MedsegError(f"expected a 3D volume, got shape {shape}", path)
    if min(shape) < 0:
        raise MedsegError(f"header dimensions {shape} are negative: a corrupt header", path)
    stored = image.get_data_dtype()
    if stored.kind not in "biuf":  # numpy would drop an imaginary part or fail on RGB fields
        raise MedsegError(f"voxel type {stored} is not a plain number per voxel (RGB, complex "
                          "or structured); medseg reads grey-value volumes", path)
    if 0 in shape[:3]:
        raise MedsegError(f"empty volume: shape {shape} has no voxels", path)
    if int(np.prod(shape, dtype=np.int64)) > MAX_VOXELS:
        raise MedsegError(f"header claims {shape} voxels, more than 2^31", path)
    affine = image.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise MedsegError("affine is singular or not finite (zero or NaN spacing)", path)
