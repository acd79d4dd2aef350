"""Single DICOM files: the header of each image frame (classic single-frame and enhanced
multi-frame files alike) and the decoding of pixel data, compressed transfer syntaxes
included (pydicom with its decoder plugins, SimpleITK's GDCM for what they lack)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from medseg.errors import MedsegError


@dataclass(frozen=True, eq=False)
class Frame:
    """One 2D image of a series: where it lies and how its stored values become modality
    values. `index` is the frame number inside a multi-frame file."""

    path: Path
    index: int | None
    series_uid: str
    description: str
    shape: tuple[int, int]  # rows, columns
    position: np.ndarray  # ImagePositionPatient, LPS mm
    orientation: np.ndarray  # ImageOrientationPatient: row cosines, then column cosines
    pixel_spacing: tuple[float, float]  # between rows, between columns (DICOM order)
    slope: float
    intercept: float
    stored_range: tuple[int, int]
    samples_per_pixel: int
    photometric: str  # PhotometricInterpretation
    thickness: float | None
    sop_uid: str = ""  # SOPInstanceUID: two files with one are copies of one image
    sop_class: str = ""  # SOPClassUID: CT Image Storage, Secondary Capture, ...

    @property
    def label(self) -> str:
        return f"{self.path.name}{frame_note(self.index)}"

    @property
    def integral_rescale(self) -> bool:
        return float(self.slope).is_integer() and float(self.intercept).is_integer()

    @property
    def value_range(self) -> tuple[float, float]:
        ends = [v * self.slope + self.intercept for v in self.stored_range]
        return min(ends), max(ends)


def frame_note(index: int | None) -> str:
    """" (frame K)", numbered from 1 as DICOM does, for a frame of a multi-frame file."""
    return "" if index is None else f" (frame {index + 1})"


def read_header(path: Path) -> Dataset:
    """The header of a DICOM file, pixel data left unread."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many types for broken files
        raise MedsegError(f"DICOM header cannot be read ({_one_line(exc)})", path) from exc


def frames_of(header: Dataset, path: Path) -> list[Frame]:
    """The image frames a file holds; none for files without an image or its geometry."""
    if "Rows" not in header or "Columns" not in header:
        sop_classes = _sop_classes(header)
        # nothing after the file meta: cut short within it or right after it (a whole file
        # without a SOP class but with a data set, a private object, is skipped below)
        if len(header) == 0 and (not sop_classes or _meta_cut_short(header, path)):
            raise MedsegError("DICOM file that ends in or right after its file meta (file "
                              "cut short?)", path)
        if any(_image_storage(uid) for uid in sop_classes):
            # an image whose header is cut short: dropping it would shorten the volume
            raise MedsegError("DICOM image header without Rows and Columns (file cut short?)",
                              path)
        return []  # a DICOMDIR, a structured report, a presentation state
    if is_not_an_image(header):
        # a DICOM SEG (medseg's own --dicom-seg output written into a subfolder of the
        # series, say) or an RT dose: pixel data and geometry, but no image of the series
        return []
    try:
        if "PerFrameFunctionalGroupsSequence" in header:
            return _enhanced_frames(header, path)
        if int(header.get("NumberOfFrames", 1) or 1) > 1:
            return []  # frames without per-frame positions cannot be placed in space
        if "ImagePositionPatient" not in header or "ImageOrientationPatient" not in header:
            return []
        return [_frame(header, header, path, None)]
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
        raise MedsegError(f"DICOM geometry cannot be read ({_one_line(exc)})", path) from exc


def _image_storage(sop_class: str) -> bool:
    """Whether a SOP class UID is an image storage class (CT, MR, ... Image Storage)."""
    with warnings.catch_warnings():  # pydicom's on a UID cut short ("1.2.")
        warnings.simplefilter("ignore")
        return "Image Storage" in pydicom.uid.UID(sop_class).name


# Segmentation, Label Map Segmentation, RT Dose: named, not inferred from pydicom's names,
# where Enhanced US Volume or Parametric Map Storage (an ADC map) also lack "Image Storage"
NOT_IMAGES = {"1.2.840.10008.5.1.4.1.1.66.4": "a DICOM SEG",
              "1.2.840.10008.5.1.4.1.1.66.7": "a DICOM label map SEG",
              "1.2.840.10008.5.1.4.1.1.481.2": "an RT dose"}


def is_not_an_image(header: Dataset) -> bool:
    """Whether the file is a segmentation or dose object (NOT_IMAGES), not an image."""
    return any(uid in NOT_IMAGES for uid in _sop_classes(header))


def _meta_cut_short(header: Dataset, path: Path) -> bool:
    """Whether the file ends before the end its file meta's group length gives: preamble and
    'DICM' (132 bytes), the group length element (12), then the rest of the group."""
    file_meta = getattr(header, "file_meta", None)
    length = file_meta.get("FileMetaInformationGroupLength") if file_meta is not None else None
    try:
        return length is not None and path.stat().st_size < 132 + 12 + int(length)
    except (OSError, TypeError, ValueError):
        return False


def _sop_classes(header: Dataset) -> list[str]:
    """The SOP classes (CT Image Storage, ...) the data set and its file meta name: the file
    meta's is all that is left of a file cut short early, and may be whole where the data
    set's is cut ("1.2.")."""
    file_meta = getattr(header, "file_meta", None)
    with warnings.catch_warnings():  # pydicom decodes a value when first used: "1.2." warns
        warnings.simplefilter("ignore")
        values = [str(source.get(keyword, "") or "").strip()
                  for source, keyword in ((header, "SOPClassUID"),
                                          (file_meta, "MediaStorageSOPClassUID"))
                  if source is not None]
    return [value for value in values if value]


def decode_file(path: Path) -> tuple[np.ndarray, bool]:
    """Pixel data as (frames, rows, columns), and whether it is already rescaled (GDCM
    applies RescaleSlope/Intercept itself)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = pydicom.dcmread(path)
    except Exception as exc:
        raise MedsegError(f"DICOM file cannot be read ({_one_line(exc)})", path) from exc
    pixel_keywords = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
    if not any(k in dataset for k in pixel_keywords) or "Rows" not in dataset \
            or "Columns" not in dataset:
        # pydicom reads a file cut short inside its pixel data as an empty dataset (a warning)
        raise MedsegError("DICOM file holds no readable pixel data (cut short?)", path)
    rows, columns = int(dataset.Rows), int(dataset.Columns)
    try:
        with warnings.catch_warnings():  # pydicom's warnings about odd headers: not errors
            warnings.simplefilter("ignore")
            pixels = dataset.pixel_array
    except Exception as exc:
        if not _compressed(dataset):  # broken data (cut short, ...): never decoded by guess
            raise MedsegError(f"pixel data cannot be decoded ({_one_line(exc)})", path) from exc
        return _decode_with_gdcm(path, dataset, exc).reshape(-1, rows, columns), True
    return np.asarray(pixels).reshape(-1, rows, columns), False


def _compressed(dataset: Dataset) -> bool:
    """Whether the pixel data is in a compressed (or unknown, private) transfer syntax, which
    GDCM may decode where pydicom's plugins cannot (JPEG Lossless process 14, 12-bit JPEG
    Extended); uncompressed data that pydicom cannot read is broken, not undecoded."""
    syntax = dataset.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        return False
    try:
        return not syntax.is_transfer_syntax or bool(syntax.is_compressed)
    except ValueError:  # a UID pydicom does not know
        return True


def check_gdcm_rules(frames: list[Frame]) -> None:
    """GDCM applies a file's rescale and inverts MONOCHROME1 by its own rules: refuse the
    frames of a GDCM-decoded file where those rules differ from medseg's (per-frame rescale
    of enhanced files; MONOCHROME1, kept as stored elsewhere)."""
    for frame in frames:
        if frame.photometric == "MONOCHROME1":
            raise MedsegError("MONOCHROME1 pixel data in a transfer syntax only GDCM decodes "
                              "here (GDCM would invert it); decompress the series first",
                              frame.path)
        if frame.index is not None and (frame.slope != 1.0 or frame.intercept != 0.0):
            raise MedsegError("enhanced multi-frame file with a rescale, in a transfer syntax "
                              "only GDCM decodes here (GDCM leaves per-frame rescales out); "
                              "decompress the series first", frame.path)


def _decode_with_gdcm(path: Path, dataset: Dataset, first_error: Exception) -> np.ndarray:
    import SimpleITK as sitk

    syntax = dataset.file_meta.get("TransferSyntaxUID", "unknown transfer syntax")
    try:
        reader = sitk.ImageFileReader()
        reader.SetImageIO("GDCMImageIO")
        reader.SetFileName(str(path))
        return sitk.GetArrayFromImage(reader.Execute())
    except Exception as exc:
        name = getattr(syntax, "name", str(syntax))
        raise MedsegError(f"pixel data ({name}) cannot be decoded: pydicom: "
                          f"{_one_line(first_error)}; GDCM: {_one_line(exc)}", path) from exc


def _frame(top: Dataset, geometry: Dataset, path: Path, index: int | None,
           rescale: Dataset | None = None, measures: Dataset | None = None) -> Frame:
    measures = measures if measures is not None else geometry
    rescale = rescale if rescale is not None else top
    spacing = [float(v) for v in measures.PixelSpacing]
    thickness = measures.get("SpacingBetweenSlices") or measures.get("SliceThickness")
    position = np.array([float(v) for v in geometry.ImagePositionPatient], dtype=float)
    orientation = np.array([float(v) for v in geometry.ImageOrientationPatient], dtype=float)
    _check_geometry(position, orientation, spacing, path, index)
    return Frame(
        path=path,
        index=index,
        series_uid=str(top.get("SeriesInstanceUID", "") or ""),
        description=str(top.get("SeriesDescription", "") or ""),
        shape=(int(top.Rows), int(top.Columns)),
        position=position,
        orientation=orientation,
        pixel_spacing=(spacing[0], spacing[1]),
        slope=_finite(rescale, "RescaleSlope", 1.0, path, index),
        intercept=_finite(rescale, "RescaleIntercept", 0.0, path, index),
        stored_range=_stored_range(top),
        samples_per_pixel=int(top.get("SamplesPerPixel", 1) or 1),
        photometric=str(top.get("PhotometricInterpretation", "MONOCHROME2") or "").strip(),
        thickness=float(thickness) if thickness else None,
        sop_uid=_sop_instance_uid(top),
        sop_class=str(top.get("SOPClassUID", "") or ""),
    )


def _sop_instance_uid(header: Dataset) -> str:
    """The image's SOPInstanceUID, from the file meta where an anonymizer blanked the data
    set's (TotalSegmentator's CT series): two copies of such a series were told apart as
    'several volumes at one position' (echoes, phases), not as copies."""
    uid = str(header.get("SOPInstanceUID", "") or "").strip()
    file_meta = getattr(header, "file_meta", None)
    if not uid and file_meta is not None:
        uid = str(file_meta.get("MediaStorageSOPInstanceUID", "") or "").strip()
    return uid


def _finite(dataset: Dataset, keyword: str, default: float, path: Path,
            index: int | None) -> float:
    value = float(dataset.get(keyword, default) or default)
    if not np.isfinite(value):
        raise MedsegError(f"{keyword} {value} is not a finite number{frame_note(index)}", path)
    return value


def _enhanced_frames(header: Dataset, path: Path) -> list[Frame]:
    shared = (header.SharedFunctionalGroupsSequence[0]
              if "SharedFunctionalGroupsSequence" in header else Dataset())
    groups = len(header.PerFrameFunctionalGroupsSequence)
    declared = int(header.get("NumberOfFrames", 1) or 1)
    if groups != declared:
        raise MedsegError(f"NumberOfFrames is {declared} but the file describes {groups} "
                          f"frames (PerFrameFunctionalGroupsSequence)", path)
    frames = []
    for index, group in enumerate(header.PerFrameFunctionalGroupsSequence):
        position = _functional(group, shared, "PlanePositionSequence")
        orientation = _functional(group, shared, "PlaneOrientationSequence")
        measures = _functional(group, shared, "PixelMeasuresSequence")
        if position is None or orientation is None or measures is None:
            return []
        geometry = Dataset()
        geometry.ImagePositionPatient = position.ImagePositionPatient
        geometry.ImageOrientationPatient = orientation.ImageOrientationPatient
        rescale = _functional(group, shared, "PixelValueTransformationSequence")
        frames.append(_frame(header, geometry, path, index, rescale, measures))
    return frames


def _functional(group: Dataset, shared: Dataset, keyword: str) -> Dataset | None:
    """A functional group macro from the frame's own groups, else from the shared ones."""
    for source in (group, shared):
        if keyword in source and len(source[keyword].value):
            return source[keyword].value[0]
    return None


def _stored_range(header: Dataset) -> tuple[int, int]:
    bits = int(header.get("BitsStored", header.get("BitsAllocated", 16)) or 16)
    if int(header.get("PixelRepresentation", 0) or 0) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _one_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _check_geometry(position: np.ndarray, orientation: np.ndarray, spacing: list[float],
                    path: Path, index: int | None) -> None:
    """Refuse what would place voxels nowhere or in a sheared space: non-finite positions,
    non-positive pixel spacing, direction cosines that are not two orthogonal unit vectors."""
    where = frame_note(index)
    if position.shape != (3,) or not np.isfinite(position).all():
        raise MedsegError(f"ImagePositionPatient {position.tolist()} is not three finite "
                          f"numbers{where}", path)
    if len(spacing) != 2 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise MedsegError(f"PixelSpacing {spacing} is not two finite numbers > 0{where}", path)
    if orientation.shape != (6,) or not np.isfinite(orientation).all():
        raise MedsegError(f"ImageOrientationPatient {orientation.tolist()} is not six finite "
                          f"numbers{where}", path)
    row, column = orientation[:3], orientation[3:]
    unit = abs(np.linalg.norm(row) - 1) <= 1e-3 and abs(np.linalg.norm(column) - 1) <= 1e-3
    if not unit or abs(float(row @ column)) > 1e-3:
        raise MedsegError(f"ImageOrientationPatient {orientation.tolist()} is not two "
                          f"orthogonal unit vectors{where}", path)
