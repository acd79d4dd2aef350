"""DICOM Segmentation (SEG) objects for masks predicted on a DICOM series, so that a PACS or
a DICOM viewer (OHIF, 3D Slicer, Horos) shows them on the very images they came from.

The object itself is built by highdicom, which knows the Segmentation IOD; what is done here
is what it cannot know: which source frame each slice of medseg's volume came from, and
whether the series carries the identifiers a SEG must point at.
"""

from __future__ import annotations

import contextlib
import logging
import re
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from medseg import __version__
from medseg.dicom import check_regular, is_irregular, read_stack
from medseg.errors import MedsegError, one_line
from medseg.fileio import atomic_path

SEG_SUFFIX = ".seg.dcm"
SEG_SERIES_NUMBER = 9901  # where viewers list it: after the scanner's own series
# a SEG must point at its source by these; a series without them cannot be referred to
_REQUIRED_UIDS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                  "FrameOfReferenceUID")
# type 2 attributes (present, may be empty) that anonymizers often drop and highdicom copies
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                 "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")


@dataclass(frozen=True)
class SegSource:
    """The headers of a series' source images, and for each slice of the volume (in the
    volume's order) the image it came from: (index into `images`, frame index or None)."""

    path: Path  # the series as given
    images: tuple[Dataset, ...]
    slices: tuple[tuple[int, int | None], ...]
    rows: int
    columns: int


def seg_source(path: Path, series_uid: str | None, resample_irregular: bool) -> SegSource:
    """The source of a DICOM SEG for the series medseg reads at `path`; refuses, in one line,
    a series a SEG cannot be placed on."""
    stack = read_stack(path, series_uid)
    if not resample_irregular:
        # the series' own problem first, as without --dicom-seg: a tilted series lacking a
        # FrameOfReferenceUID was refused for the UID, its tilt left for the next try
        check_regular(stack, path)
    elif is_irregular(stack):
        raise MedsegError("no DICOM SEG for a series resampled onto a regular grid "
                          "(--resample-irregular): its mask lies on new slices, not the "
                          "series' own", path)
    files = list(dict.fromkeys(frame.path for frame in stack.frames))
    if len(files) > 1 and any(frame.index is not None for frame in stack.frames):
        raise MedsegError("no DICOM SEG for a series spread over several multi-frame files",
                          path)
    # SliceThickness is type 2 in CT and MR images, type 1 in a SEG: the gap stands in
    gap = float(np.median(np.diff(stack.depths))) if len(stack.depths) > 1 else 1.0
    images = tuple(_seg_ready_header(file, gap) for file in files)
    place = {file: position for position, file in enumerate(files)}
    slices = tuple((place[frame.path], frame.index) for frame in stack.frames)
    rows, columns = stack.frames[0].shape
    return SegSource(path, images, slices, rows, columns)


def _seg_ready_header(file: Path, slice_gap: float) -> Dataset:
    """The image's header as highdicom needs it; the file itself is not touched."""
    header = pydicom.dcmread(file, stop_before_pixels=True)
    # some anonymizers blank these; the file meta keeps them
    if not header.get("SOPClassUID"):
        header.SOPClassUID = header.file_meta.get("MediaStorageSOPClassUID", "")
    if not str(header.get("SOPInstanceUID", "")).strip():
        header.SOPInstanceUID = header.file_meta.get("MediaStorageSOPInstanceUID", "")
    if "PerFrameFunctionalGroupsSequence" in header:
        _share_frame_geometry(header)
    elif header.get("SliceThickness") in (None, ""):
        header.SliceThickness = round(slice_gap, 6)
    missing = [k for k in _REQUIRED_UIDS if not str(header.get(k, "")).strip()]
    if missing:
        raise MedsegError(f"no DICOM SEG: the image has no {' or '.join(missing)} (removed by "
                          f"an anonymizer?), which a SEG must refer to", file)
    for keyword in _TYPE2_COPIED:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def _share_frame_geometry(header: Dataset) -> None:
    """highdicom takes a multi-frame image's orientation and pixel measures from its shared
    functional groups; a file that repeats them in every frame's groups instead (medseg's
    reader has checked that all frames agree) gets the first frame's as shared ones."""
    if "SharedFunctionalGroupsSequence" not in header:
        header.SharedFunctionalGroupsSequence = [Dataset()]
    shared = header.SharedFunctionalGroupsSequence[0]
    first = header.PerFrameFunctionalGroupsSequence[0]
    for keyword in ("PlaneOrientationSequence", "PixelMeasuresSequence"):
        if keyword not in shared and keyword in first:
            setattr(shared, keyword, getattr(first, keyword))


def seg_path(mask_path: Path) -> Path:
    """`case.nii.gz` -> `case.seg.dcm`, beside it."""
    name = mask_path.name.removesuffix(".gz").removesuffix(".nii")
    return mask_path.with_name(name + SEG_SUFFIX)


def build_seg(mask: np.ndarray, source: SegSource, labels: dict[int, str]) -> Dataset:
    """A binary DICOM SEG of `mask` ((columns, rows, slices) on the series' own grid), one
    segment per foreground label id (segment number = label id)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if mask.shape != (source.columns, source.rows, len(source.slices)):
        raise MedsegError(f"no DICOM SEG: mask shape {mask.shape} is not the series' "
                          f"{(source.columns, source.rows, len(source.slices))}", source.path)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="medseg", family=codes.cid7162.ArtificialIntelligence, version=__version__)
    names = segment_labels(labels)
    images, frames = list(source.images), _source_frames(mask, source)
    empty = not mask.any()
    if empty and len(images) > 1:
        # highdicom keeps every frame of an all-empty mask (a SEG needs one): 42 segments x
        # 150 slices of blank frames took 195 MB; a blank frame per segment on the first
        # image says as much (each structure was looked for and not found)
        images, frames = images[:1], frames[:1]
    segments = [hd.seg.SegmentDescription(
        segment_number=label, segment_label=names[label],
        # medseg knows structures by name only: generic codes, the name says which
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.AnatomicalStructure,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm) for label in sorted(names)]
    if empty and len(source.images) == 1 and len(source.slices) > 1:
        # one multi-frame source: highdicom needs all of its frames, for each segment
        segments = segments[:1]
    _silence_highdicom()
    with _highdicom_refusal(source.path):
        seg = hd.seg.Segmentation(
            source_images=images, pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segments, series_instance_uid=hd.UID(),
            series_number=SEG_SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=1,
            manufacturer="medseg", manufacturer_model_name="medseg",
            software_versions=__version__, device_serial_number="none",
            series_description="medseg segmentation", omit_empty_frames=True)
    if not all(name.isascii() for name in names.values()):
        # the source's character set (often ISO_IR 100, Latin-1) turned other letters into
        # '?': UTF-8 holds every name
        seg.SpecificCharacterSet = "ISO_IR 192"
    return seg


def segment_labels(labels: dict[int, str]) -> dict[int, str]:
    """Each foreground label's SegmentLabel: a LO value (at most 64 characters, no control
    characters, no backslash, which would split it in two values), distinct from the others
    (two long names alike in their first 64 characters get their ids)."""
    names = {label: re.sub(r"[\x00-\x1f\x7f]", " ", name).replace("\\", "/").strip()
             for label, name in sorted(labels.items()) if label}
    cut = {label: name[:64] for label, name in names.items()}
    shared = {name for name in cut.values() if list(cut.values()).count(name) > 1}
    return {label: name if name not in shared else
            f"{names[label][:64 - len(f' ({label})')]} ({label})"
            for label, name in cut.items()}


def _source_frames(mask: np.ndarray, source: SegSource) -> np.ndarray:
    """The mask as highdicom takes it: one (rows, columns) frame per source image, or per
    frame of a single multi-frame image, in the source's own order."""
    multiframe = len(source.images) == 1 and source.slices[0][1] is not None
    count = int(source.images[0].NumberOfFrames) if multiframe else len(source.images)
    frames = np.zeros((count, source.rows, source.columns), dtype=mask.dtype)
    for k, (image, frame) in enumerate(source.slices):
        frames[frame if multiframe else image] = mask[:, :, k].T
    return frames


def write_seg(seg: Dataset, path: Path) -> None:
    try:
        with atomic_path(path) as temporary:
            seg.save_as(temporary, enforce_file_format=True)
    except OSError as exc:  # a full disk: pydicom folds the cause and a traceback into one
        cause = exc
        while cause.strerror is None and isinstance(cause.__cause__, OSError):
            cause = cause.__cause__
        traceback.clear_frames(exc.__traceback__)  # the open file would live on in them
        raise MedsegError(f"cannot write ({cause.strerror or one_line(str(cause))})",
                          path) from None


@contextlib.contextmanager
def _highdicom_refusal(path: Path) -> Iterator[None]:
    """What highdicom refuses in a source header (a missing attribute, a value out of its
    rules) in one line naming the series."""
    try:
        yield
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise MedsegError(f"no DICOM SEG: highdicom cannot build one on this series "
                          f"({one_line(str(exc))})", path) from exc


def _silence_highdicom() -> None:
    """highdicom logs and warns about what medseg has checked or cannot change (duplicate
    references, a one-part patient name in the source): medseg speaks for itself. Set for
    the process, not around each call: SEGs are built in a writer thread, and
    warnings.catch_warnings is not thread-safe."""
    logging.getLogger("highdicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"highdicom(\.|$)")
