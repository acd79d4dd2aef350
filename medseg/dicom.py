"""DICOM series folders: one series chosen by SeriesInstanceUID, slices ordered by their
position along the slice normal, rescaled to modality values, and checked for gantry tilt and
uneven spacing (refused unless resampling onto a regular grid is asked for).

Positions and directions are in the DICOM patient frame (LPS); the affine handed back maps
voxel indices (column, row, slice) to RAS millimetres, as NIfTI does.

Why not SimpleITK's ImageSeriesReader or MONAI's PydicomReader: both stack whatever slices
they are given, with the first gap as the spacing for all of them. A gantry tilt, a missing
slice or uneven gaps then yield a volume wrong in millimetres (ITK only warns); these
checks, series selection among several and enhanced multi-frame files need the per-slice
headers read here.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pydicom

from medseg.dicom_frames import (
    Frame,
    check_gdcm_rules,
    decode_file,
    frame_note,
    frames_of,
    is_not_an_image,
    read_header,
)
from medseg.errors import MedsegError
from medseg.io import VOLUME_SUFFIXES

MAX_VOXELS = 2**31
# MONOCHROME1 values are kept as stored (modality values); the inversion is for display only
GREYSCALE = ("MONOCHROME1", "MONOCHROME2")
RAW_IMAGE = "without the Part 10 header (no 'DICM' preamble), which medseg does not read"
RAW_IMAGE_REASON = (f"{RAW_IMAGE}: convert the series to Part 10 files (e.g. dcmconv +F) "
                    f"first")
UNPLACED_REASON = "without ImagePositionPatient or ImageOrientationPatient (no place in space)"
MULTIFRAME_REASON = "with several frames but no per-frame positions (no place in space)"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# A slice may lie this far from where a regular, untilted stack puts it (in mm): the larger of
# this and 1% of the median slice gap. Beyond it the series is tilted or unevenly spaced.
POSITION_TOLERANCE_MM = 0.05
# the commands that read a series can be check and train too, which have no such option
RESAMPLE_HINT = ("`medseg convert --resample-irregular` (or predict's --resample-irregular) "
                 "resamples it onto a regular grid")


@dataclass(frozen=True)
class SeriesInfo:
    """One series found in a folder."""

    uid: str
    description: str
    files: tuple[Path, ...]
    n_images: int


@dataclass(frozen=True)
class Stack:
    """The frames of one series in order along the slice normal, with its geometry in LPS."""

    frames: tuple[Frame, ...]
    row: np.ndarray  # direction of increasing column index
    column: np.ndarray  # direction of increasing row index
    normal: np.ndarray
    spacing: tuple[float, float]  # mm between columns, between rows
    depths: np.ndarray  # each frame's position along the normal, ascending

    @property
    def shape(self) -> tuple[int, int, int]:
        rows, columns = self.frames[0].shape
        return columns, rows, len(self.frames)


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file: 128-byte preamble, then 'DICM'."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def series_files_beside(path: Path) -> int:
    """How many other DICOM files in a DICOM file's folder (not below it) belong to its
    series: `medseg convert slice.dcm` reads that one file alone."""
    uid = _series_uid(path)
    if not uid:
        return 0
    try:
        siblings = [p for p in path.parent.iterdir() if p != path and p.is_file()]
    except OSError:
        return 0
    return sum(1 for p in siblings if is_dicom_file(p) and _series_uid(p) == uid)


def _series_uid(path: Path) -> str:
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=["SeriesInstanceUID"])
    except Exception:  # pydicom raises many kinds on a damaged file: no series to name
        return ""
    return str(header.get("SeriesInstanceUID", "") or "")


def list_series(path: str | Path) -> list[SeriesInfo]:
    """Every image series in a folder (searched recursively) or a single DICOM file."""
    groups, _ = _scan(Path(path))
    return [SeriesInfo(uid, _description(frames), tuple(dict.fromkeys(f.path for f in frames)),
                       len(frames)) for uid, frames in groups.items()]


def read_stack(path: str | Path, series_uid: str | None = None) -> Stack:
    """Headers only: the chosen series' frames, ordered and checked for consistency."""
    path = Path(path)
    groups, left_out = _scan(path)
    frames = _choose_series(groups, series_uid, path)
    if path.is_dir():
        _refuse_compressed_slices(frames)
    # a slice of this series (its SOP class and size) that is not read: the volume would
    # come out short; other images filed under the series (a secondary capture) are skipped
    kinds = {(frame.sop_class, *frame.shape) for frame in frames}
    unread = [u for u in left_out.get(frames[0].series_uid, [])
              if u.kind is None or u.kind in kinds]
    if unread:
        more = f" (and {len(unread) - 1} more image(s) of the series)" if len(unread) > 1 else ""
        raise MedsegError(f"DICOM image of the series {unread[0].reason}{more}; a volume "
                          f"without it would be short", unread[0].file)
    return _order(frames, path)


def regular_affine(stack: Stack, path: Path) -> np.ndarray:
    """Voxel -> RAS affine of a regular, untilted stack; refuses tilt and uneven spacing."""
    check_regular(stack, path)
    step = _slice_step(stack)
    lps = np.eye(4)
    lps[:3, 0] = stack.row * stack.spacing[0]
    lps[:3, 1] = stack.column * stack.spacing[1]
    lps[:3, 2] = stack.normal * step
    lps[:3, 3] = stack.frames[0].position
    return LPS_TO_RAS @ lps


def is_irregular(stack: Stack) -> bool:
    """Tilted or unevenly spaced: the slices do not lie on a regular straight grid."""
    return bool(tilt_problem(stack) or spacing_problem(stack))


def check_regular(stack: Stack, path: Path) -> None:
    """Refuse, in one line, a stack whose slices do not lie on a regular straight grid."""
    problems = [p for p in (tilt_problem(stack), spacing_problem(stack)) if p]
    if problems:
        raise MedsegError(f"{'; and '.join(problems)}; {RESAMPLE_HINT}", path)


def tilt_problem(stack: Stack) -> str | None:
    """Gantry tilt: slice origins shifted within the slice plane, off the normal line."""
    offsets = in_plane_offsets(stack)
    worst = float(np.max(np.linalg.norm(offsets, axis=1)))
    if worst <= _tolerance(stack):
        return None
    depth = stack.depths[-1] - stack.depths[0]
    angle = np.degrees(np.arctan2(np.linalg.norm(offsets[-1]), depth))
    return (f"gantry tilt of {angle:.1f} degrees: the slices are shifted along their planes "
            f"by up to {worst:.2f} mm instead of stacking along the slice normal")


def spacing_problem(stack: Stack) -> str | None:
    """Uneven spacing (missing slices, mixed thicknesses): names the first gap off the median
    along the normal, and how many more are. The worst one alone misled: where the spacing
    changes from 4 to 7 mm half-way, float noise picked one of the 7 mm gaps near the end, as
    if a slice were missing there."""
    if len(stack.frames) < 3:
        return None
    gaps = np.diff(stack.depths)
    typical = float(np.median(gaps))
    tolerance = _tolerance(stack)
    off = np.flatnonzero(np.abs(gaps - typical) > tolerance)
    if len(off):
        first = int(off[0])
        before, after = stack.frames[first], stack.frames[first + 1]
        more = (f"; {len(off) - 1} more of the {len(gaps)} gaps are off the median too, up to "
                f"{float(gaps[off[np.argmax(np.abs(gaps[off] - typical))]]):.2f} mm"
                if len(off) > 1 else "")
        return (f"uneven slice spacing: a gap of {gaps[first]:.2f} mm between slices "
                f"{first + 1} and {first + 2} of {len(gaps) + 1} ({before.label} and "
                f"{after.label}, at {stack.depths[first]:.2f} mm along the slice normal) where "
                f"the median gap is {typical:.2f} mm (tolerance {tolerance:.2f} mm){more}")
    drift = _grid_drift(stack)
    if drift > tolerance:
        return (f"uneven slice spacing: slices drift up to {drift:.2f} mm from a regular grid "
                f"(tolerance {tolerance:.2f} mm)")
    return None


def in_plane_offsets(stack: Stack) -> np.ndarray:
    """Each frame's origin minus the first one's, with the part along the normal removed."""
    delta = np.array([f.position for f in stack.frames]) - stack.frames[0].position
    return delta - np.outer(delta @ stack.normal, stack.normal)


def read_pixels(stack: Stack, dtype: np.dtype) -> np.ndarray:
    """Modality values (RescaleSlope/Intercept applied) as (columns, rows, slices)."""
    columns, rows, n_slices = stack.shape
    data = np.empty((columns, rows, n_slices), dtype=dtype)
    for index, frame, values in _decoded_frames(stack):
        if values.shape != (rows, columns):
            raise MedsegError(f"pixel data has shape {values.shape}, expected "
                              f"{(rows, columns)}", frame.path)
        data[:, :, index] = _cast(values.T, dtype)
    return data


def native_dtype(stack: Stack) -> np.dtype:
    """The smallest integer type that holds every rescaled value, else float32."""
    if not all(f.integral_rescale for f in stack.frames):
        return np.dtype(np.float32)
    low = min(f.value_range[0] for f in stack.frames)
    high = max(f.value_range[1] for f in stack.frames)
    for candidate in (np.int16, np.uint16, np.int32):
        info = np.iinfo(candidate)
        if info.min <= low and high <= info.max:
            return np.dtype(candidate)
    return np.dtype(np.float32)


def _decoded_frames(stack: Stack) -> Iterator[tuple[int, Frame, np.ndarray]]:
    """(slice index, frame, rescaled 2D values), decoding each file once."""
    by_file: dict[Path, list[tuple[int, Frame]]] = {}
    for index, frame in enumerate(stack.frames):
        by_file.setdefault(frame.path, []).append((index, frame))
    for path, members in by_file.items():
        pixels, rescaled = decode_file(path)
        if rescaled:  # by GDCM
            check_gdcm_rules([frame for _, frame in members])
        for index, frame in members:
            values = pixels[frame.index or 0].astype(np.float64)
            if not rescaled:
                values = values * frame.slope + frame.intercept
            yield index, frame, values


def _cast(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        return np.rint(values).astype(dtype)
    return values.astype(dtype)


class _Unread(NamedTuple):
    """An image of a series that cannot be read into its volume, and why. `kind` (SOP class,
    rows, columns) tells a slice of the series from another image filed under its UID (a
    secondary capture, a dose report); None for an image that is surely a slice."""

    file: Path
    reason: str
    kind: tuple[str, int, int] | None


def _scan(path: Path) -> tuple[dict[str, list[Frame]], dict[str, list[_Unread]]]:
    """Frames with geometry, grouped by SeriesInstanceUID (files without an image are
    skipped), and, by SeriesInstanceUID, the images that cannot be read into a volume."""
    if not path.exists():
        raise MedsegError("not found", path)
    files = [path] if path.is_file() else files_below(path)
    groups: dict[str, list[Frame]] = {}
    unplaced: list[Path] = []  # DICOM files with no image that has a place in space
    multiframe: list[Path] = []  # classic multi-frame: one position for many frames
    left_out: dict[str, list[_Unread]] = {}
    not_dicom: list[Path] = []  # named or begun like DICOM files, yet not ones
    not_images: list[Path] = []  # segmentations and doses: pixel data, but no image
    for file in files:
        if not is_dicom_file(file):
            _refuse_unreadable_slice(file)
            _note_non_part10_file(file, left_out, not_dicom)
            continue
        header = read_header(file)
        frames = frames_of(header, file)
        if not frames and is_not_an_image(header):
            not_images.append(file)
        elif not frames:
            many = int(header.get("NumberOfFrames", 1) or 1) > 1
            (multiframe if many else unplaced).append(file)
            unread = _unread_image(header, file, many)
            if unread is not None:
                left_out.setdefault(unread[0], []).append(unread[1])
        for frame in frames:
            groups.setdefault(frame.series_uid, []).append(frame)
    if not groups:
        why = _why_no_image(unplaced, multiframe, left_out, not_dicom) + _not_images(not_images)
        raise _no_image_error(path, files, why)
    if not_dicom:
        # a slice cut short before its 'DICM' marker: left out, the volume would be a slice
        # short without a word where it lay at the end of the series
        raise MedsegError(f"not a DICOM file, though named or begun like one "
                          f"({not_dicom[0].stat().st_size} bytes: a slice cut short?); the "
                          f"series beside it may lack a slice: restore the file, or move it "
                          f"out of the folder if it is not part of the series", not_dicom[0])
    return groups, left_out


DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


def _refuse_compressed_slices(frames: list[Frame]) -> None:
    """A slice compressed as a file (IM0004.dcm.gz) beside the series' other slices: left
    out unsaid, the series was read a slice short (the last one: no gap to tell). Only in
    the series' own folders: another series compressed in a folder of its own is no slice
    of this one."""
    folders = sorted({frame.path.parent for frame in frames})
    packed = [file for folder in folders for file in sorted(folder.iterdir())
              if file.name.lower().endswith(COMPRESSED_SLICE_SUFFIXES)
              and not file.name.startswith(".")]
    if packed:
        more = f" (and {len(packed) - 1} more)" if len(packed) > 1 else ""
        raise MedsegError(f"a DICOM slice compressed as a file{more}, which medseg does not "
                          f"unpack; the series beside it would lack it: unpack it first "
                          f"(gunzip)", packed[0])


# the first tag of a data set without the preamble, or of its file meta (little endian)
RAW_DATA_SET_STARTS = (b"\x08\x00", b"\x02\x00")


def _note_non_part10_file(file: Path, left_out: dict[str, list[_Unread]],
                          not_dicom: list[Path]) -> None:
    """A file without the 'DICM' marker: an old raw DICOM image (left out of its series), a
    DICOM file cut short (`not_dicom`), or another file (skipped)."""
    uid = _raw_dicom_image_series(file)
    if uid is not None:
        left_out.setdefault(uid, []).append(_Unread(file, RAW_IMAGE_REASON, None))
    elif _like_a_dicom_file(file):
        not_dicom.append(file)


def _refuse_unreadable_slice(file: Path) -> None:
    """A file named like a slice (.dcm, .dicom, .ima, no suffix, or a UID's number for one)
    that cannot be opened (no read permission, a link that leads nowhere): left out unsaid,
    the volume would lack that slice, without a word where it lay at either end of the
    series."""
    try:
        with open(file, "rb"):
            pass
    except OSError as exc:
        suffix = file.suffix.lower()
        if suffix in DICOM_SUFFIXES or not suffix or suffix[1:].isdigit():
            why = (f"it links to {os.readlink(file)}, which does not exist: a share not "
                   f"mounted?" if file.is_symlink() and not file.exists()
                   else exc.strerror or exc)
            raise MedsegError(f"cannot be read ({why}); the series beside it "
                              f"would lack this slice: make it readable, or move it out of "
                              f"the folder if it is not part of the series", file) from exc


def _like_a_dicom_file(file: Path) -> bool:
    """A file that is not DICOM but looks like a slice cut short before its 'DICM' marker:
    named like a slice (.dcm, .dicom, .ima) and not a data set without the preamble (an old
    raw file, skipped), or with no suffix (IM0001) or a UID's number for one and beginning
    with a preamble's zeros. An empty file without a suffix (a CD's LOCKFILE) and notes are
    not slices."""
    try:
        with open(file, "rb") as handle:
            head = handle.read(128)
    except OSError:
        return False
    suffix = file.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return not head.startswith(RAW_DATA_SET_STARTS)
    if suffix and not suffix[1:].isdigit():
        return False
    return bool(head) and not head.strip(b"\0")


def _unread_image(header, file: Path, many: bool) -> tuple[str, _Unread] | None:
    """An image without a frame that can be placed, with its series UID; None for a file that
    is no image (a DICOMDIR, report or presentation state)."""
    if "Rows" not in header:
        return None
    uid = str(header.get("SeriesInstanceUID", "") or "")
    kind = (str(header.get("SOPClassUID", "") or ""), int(header.Rows),
            int(header.get("Columns", 0) or 0))
    return uid, _Unread(file, MULTIFRAME_REASON if many else UNPLACED_REASON, kind)


def _why_no_image(unplaced: list[Path], multiframe: list[Path],
                  left_out: dict[str, list[_Unread]], not_dicom: list[Path]) -> str:
    detail = (f"; {len(unplaced)} DICOM file(s) hold no image with ImagePositionPatient "
              f"and ImageOrientationPatient, e.g. {unplaced[0].name}" if unplaced else "")
    if multiframe:
        detail += (f"; {len(multiframe)} multi-frame file(s) without per-frame positions "
                   f"(their frames cannot be placed in space), e.g. {multiframe[0].name}")
    raw = [unread.file for unreads in left_out.values() for unread in unreads
           if unread.reason == RAW_IMAGE_REASON]
    if raw:
        detail += f"; {len(raw)} DICOM image(s) {RAW_IMAGE}, e.g. {raw[0].name}"
    if not_dicom:
        detail += (f"; {len(not_dicom)} file(s) named or begun like DICOM files are not "
                   f"DICOM (cut short?), e.g. {not_dicom[0].name}")
    return detail


def _no_image_error(path: Path, files: list[Path], why: str) -> MedsegError:
    if not files:
        return MedsegError("empty folder: no volume file or DICOM series in it", path)
    looked_at = f"{len(files)} file{'s' if len(files) > 1 else ''} looked at"
    return MedsegError(f"no DICOM image found ({looked_at}{why}"
                       f"{_volumes_below_hint(files, path)}{archives_hint(files)})", path)


ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".7z", ".rar")
# a slice compressed as a file (IM0001.dcm.gz, as some archives keep series): not opened
COMPRESSED_SLICE_SUFFIXES = tuple(f"{slice_suffix}{packed}" for slice_suffix in DICOM_SUFFIXES
                                  for packed in (".gz", ".bz2", ".xz"))


def archives_hint(files: list[Path]) -> str:
    """Archives (a PACS export as .zip) and compressed slices (IM0001.dcm.gz) are not
    opened: say so, rather than leave them out unsaid."""
    hints = []
    for suffixes, kind in ((ARCHIVE_SUFFIXES, "archive"),
                           (COMPRESSED_SLICE_SUFFIXES, "compressed DICOM file")):
        found = [f for f in files if f.name.lower().endswith(suffixes)]
        if found:
            hints.append(f"; {len(found)} {kind}(s), e.g. {found[0].name}: medseg does not "
                         f"open {kind}s, unpack them first")
    return "".join(hints)


def _not_images(files: list[Path]) -> str:
    if not files:
        return ""
    return (f"; {len(files)} DICOM file(s) that are no image (a segmentation or dose object, "
            f"such as medseg's own --dicom-seg output), e.g. {files[0].name}")


def _volumes_below_hint(files: list[Path], folder: Path) -> str:
    """Volume files in subfolders (one per patient) are read as such only when named: say
    so, rather than only that no DICOM image was found."""
    volumes = [f for f in files if f.name.lower().endswith(VOLUME_SUFFIXES)]
    if not volumes:
        return ""
    example = volumes[0]
    if example.parent == folder:  # convert, check and train take one volume file per image
        return f"; it holds volume file(s), e.g. {example.name}: give the file itself"
    name, count = Counter(f.name for f in volumes).most_common(1)[0]
    if count > 1:  # p1/scan.nii.gz, p2/scan.nii.gz: one mask name, refused as inputs
        return (f"; {len(volumes)} volume file(s) in its subfolders, e.g. "
                f"{example.relative_to(folder)}, {count} of them named {name}: masks are "
                f"named after their files, so give each file a name of its own (the "
                f"patient's) and then give them as inputs")
    suffix = next(s for s in VOLUME_SUFFIXES if example.name.lower().endswith(s))
    return (f"; {len(volumes)} volume file(s) in its subfolders, e.g. "
            f"{example.relative_to(folder)}: give them as inputs themselves "
            f"({folder}/*/*{suffix})")


def files_below(folder: Path) -> list[Path]:
    """Every file below `folder`, linked folders followed (each real folder once, so that a
    link back up does not loop; Path.rglob follows none). Hidden files and folders (macOS
    "._x", a ".Trash" with an old copy) are not the series."""
    seen: set[str] = set()
    found: list[Path] = []
    for root, dirs, files in os.walk(folder, followlinks=True, onerror=_refuse_unlistable):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(Path(root) / name for name in files if not name.startswith("."))
    # a link that leads nowhere (a slice on a share not mounted) is kept, for the scan to
    # refuse when it is named like a slice: left out, the series was read a slice short
    return sorted(p for p in found if p.is_file() or (p.is_symlink() and not p.exists()))


def _refuse_unlistable(exc: OSError) -> None:
    """A folder below the series folder that cannot be listed (no permission): os.walk
    skips it unsaid, and the series would lack the slices in it."""
    raise MedsegError(f"cannot list this folder ({exc.strerror or exc}); the DICOM files in it "
                      f"would be left out of the series", Path(exc.filename or "")) from exc


def _raw_dicom_image_series(path: Path) -> str | None:
    """The SeriesInstanceUID of a DICOM image without the Part 10 preamble (an old "raw" data
    set, which medseg does not read), else None."""
    try:
        with open(path, "rb") as handle:
            start = handle.read(2)
    except OSError:
        return None
    if start not in RAW_DATA_SET_STARTS:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # not DICOM after all
        return None
    if "Rows" in header and "ImagePositionPatient" in header:
        return str(header.get("SeriesInstanceUID", "") or "")
    return None


def _choose_series(groups: dict[str, list[Frame]], series_uid: str | None,
                   path: Path) -> list[Frame]:
    if series_uid is not None and len(groups) > 1:  # a one-series folder is read as it is
        if series_uid not in groups:
            raise MedsegError(f"no series {series_uid}; the folder holds {_listing(groups)}",
                              path)
        return groups[series_uid]
    if len(groups) > 1:
        raise MedsegError(f"the folder holds {len(groups)} DICOM series; choose one with "
                          f"--series UID (convert, predict) or keep one series per folder: "
                          f"{_listing(groups)}{_one_folder_each_hint(groups, path)}",
                          path)
    return next(iter(groups.values()))


def _one_folder_each_hint(groups: dict[str, list[Frame]], path: Path) -> str:
    """A folder (`path`) of series folders (one per patient) is a batch, not one series: say
    how to give it as one. Not when a series lies in `path` itself: FOLDER/* would then
    give its files one by one."""
    folders = [{frame.path.parent for frame in frames} for frames in groups.values()]
    separate = all(len(f) == 1 for f in folders) and len(set.union(*folders)) == len(groups)
    if separate and Path(path) not in set.union(*folders):
        return ("; each series is in its own folder: give one of those folders (convert), or "
                f"each as an input of its own to predict them all "
                f"(--input {_series_folders_pattern(sorted(set.union(*folders)))})")
    return ""


def _series_folders_pattern(folders: list[Path]) -> str:
    """The input that gives each series folder on its own: `COMMON/*`, COMMON being the
    deepest folder whose subfolders hold one series each (a CD's DICOM/PA0/ST0 of SE0, SE1,
    ... lies deeper than the folder given, where `FOLDER/*` gave the same folder of every
    series again), else the series folders themselves."""
    common = Path(os.path.commonpath(folders))
    heads = {folder.relative_to(common).parts[:1] for folder in folders}
    if len(heads) == len(folders) and () not in heads:
        return f"{common}/*"
    return " ".join(str(folder) for folder in folders)


def _listing(groups: dict[str, list[Frame]]) -> str:
    return "; ".join(f"{uid or '(no SeriesInstanceUID)'} '{_description(frames)}' "
                     f"({len(frames)} images)" for uid, frames in groups.items())


def _description(frames: list[Frame]) -> str:
    return frames[0].description


def _order(frames: list[Frame], path: Path) -> Stack:
    """Order by position along the normal (never by file name or InstanceNumber)."""
    first = _typical_frame(frames)  # what the odd one out (a localizer) is compared with
    for frame in frames:  # a colour image anywhere in the series, not only the first
        if frame.samples_per_pixel != 1 or frame.photometric not in GREYSCALE:
            raise MedsegError(f"colour images ({frame.photometric or 'no'} photometric "
                              f"interpretation, {frame.samples_per_pixel} samples per pixel) "
                              f"are not supported{frame_note(frame.index)}", frame.path)
    for frame in frames:
        if frame.shape != first.shape:
            raise MedsegError(f"images differ in size ({frame.shape} against {first.shape} "
                              f"in {first.label}); the series is not one volume", frame.path)
        if not np.allclose(frame.orientation, first.orientation, atol=1e-4):
            raise MedsegError(f"images differ in orientation from {first.label} (a localizer "
                              f"or several stacks in one series?)", frame.path)
        if not np.allclose(frame.pixel_spacing, first.pixel_spacing, rtol=1e-4):
            raise MedsegError(f"pixel spacing {frame.pixel_spacing} differs from "
                              f"{first.pixel_spacing} in {first.label}", frame.path)
    row, column = first.orientation[:3], first.orientation[3:]
    row, column = row / np.linalg.norm(row), column / np.linalg.norm(column)
    normal = np.cross(row, column)
    normal /= np.linalg.norm(normal)
    depths = np.array([f.position @ normal for f in frames])
    order = np.argsort(depths, kind="stable")
    ordered = tuple(frames[i] for i in order)
    depths = depths[order]
    _refuse_duplicates(ordered, depths, path)
    _refuse_too_many_voxels(ordered, path)
    spacing = (float(first.pixel_spacing[1]), float(first.pixel_spacing[0]))
    return Stack(ordered, row, column, normal, spacing, depths)


def _typical_frame(frames: list[Frame]) -> Frame:
    """A frame of the most common size, orientation and pixel spacing in the series."""
    def key(frame: Frame) -> tuple:
        return (frame.shape, tuple(np.round(frame.orientation, 3)),
                tuple(np.round(frame.pixel_spacing, 3)))

    common = Counter(map(key, frames)).most_common(1)[0][0]
    return next(f for f in frames if key(f) == common)


def _refuse_duplicates(frames: tuple[Frame, ...], depths: np.ndarray, path: Path) -> None:
    gaps = np.diff(depths)
    if len(gaps) and gaps.min() < 1e-3:
        k = int(np.argmin(gaps))
        first, second = frames[k], frames[k + 1]
        names = (_where(first, path), _where(second, path))
        if first.sop_uid and first.sop_uid == second.sop_uid and first.index == second.index:
            raise MedsegError(f"{names[0]} and {names[1]} are copies of one image (the same "
                              f"SOPInstanceUID): keep one copy of the series in the folder",
                              path)
        raise MedsegError(f"{names[0]} and {names[1]} lie at the same position "
                          f"({depths[k]:.2f} mm along the slice normal): the series holds "
                          f"several volumes (echoes, phases or time points)", path)


def _where(frame: Frame, path: Path) -> str:
    """A frame's file relative to the folder given (two copies may share a file name)."""
    if path.is_dir() and frame.path.is_relative_to(path):
        return f"{frame.path.relative_to(path)}{frame_note(frame.index)}"
    return frame.label


def _refuse_too_many_voxels(frames: tuple[Frame, ...], path: Path) -> None:
    rows, columns = frames[0].shape
    if rows * columns * len(frames) > MAX_VOXELS:
        raise MedsegError(f"series of {len(frames)} images of {rows}x{columns} has more than "
                          f"2^31 voxels", path)


def _slice_step(stack: Stack) -> float:
    if len(stack.frames) > 1:
        return float((stack.depths[-1] - stack.depths[0]) / (len(stack.frames) - 1))
    return stack.frames[0].thickness or 1.0


def _grid_drift(stack: Stack) -> float:
    """Largest distance along the normal between a slice and its regular-grid position."""
    n = len(stack.depths)
    grid = stack.depths[0] + np.arange(n) * _slice_step(stack)
    return float(np.max(np.abs(stack.depths - grid)))


def _tolerance(stack: Stack) -> float:
    gaps = np.diff(stack.depths)
    typical = float(np.median(gaps)) if len(gaps) else 0.0
    return max(POSITION_TOLERANCE_MM, 0.01 * typical)
