"""The scans drawn under report.html's overlay montages.

Found by case name (`evaluate --images DIR`, or the inputs of `predict --reference`), read for
the montages' cases alone (three at most, one at a time), and windowed for viewing; of a
multi-channel scan (MSD's 4D NIfTI), its first channel. A scan that cannot be drawn is a note
on the page, never a failure of the evaluation.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np

from medseg.datasets import IMAGE_SUFFIXES, strip_image_suffix
from medseg.errors import MedsegError
from medseg.io import Geometry, channel_count, grid_mismatch, read_volume, storage_reordering
from medseg.plan import CT_AIR_BELOW

SHOWN_CHANNEL = 0  # of a file holding several channels (MSD's X x Y x Z x C NIfTI)
CHANNEL_0 = "_0000"  # nnU-Net's name for a case's first channel: case_0000.nii.gz
# a soft-tissue window (level 40 HU, width 400 HU): organs, vessels and fat told apart
CT_WINDOW = (40.0 - 200.0, 40.0 + 200.0)
PERCENTILES = (0.5, 99.5)  # the window of any other scan, within the structure's crop


@dataclass(frozen=True)
class Scans:
    """The scan files by name (file name without its image suffix), and where they are, for
    the notes. `series_uid` and `resample_irregular` read DICOM series as predict read them."""

    by_name: dict[str, tuple[Path, ...]] = field(default_factory=dict)
    where: str = "the scans given"
    series_uid: str | None = None
    resample_irregular: bool = False


class Underlay(NamedTuple):
    """A case's scan on its reference's grid (file voxel order), and whether its values are
    Hounsfield units (windowed as soft tissue) or not (windowed by percentiles); of a file
    of several `channels`, the first (SHOWN_CHANNEL)."""

    data: np.ndarray
    hounsfield: bool
    path: Path | None = None
    channels: int = 1


def scans_in_folder(folder: Path) -> Scans:
    """The volume files of `folder` (and its subfolders, as DICOM series) by name; refused in
    one line when it is no folder."""
    if not folder.is_dir():
        raise MedsegError("not a folder (give the folder that holds the scans)"
                          if folder.exists() else "folder not found", folder)
    by_name: dict[str, tuple[Path, ...]] = {}
    for path in sorted(folder.iterdir()):
        # hidden files: macOS "._x.nii.gz" companions, a writer's half-written ".x.part"
        if path.name.startswith("."):
            continue
        if path.is_dir() or path.name.lower().endswith(IMAGE_SUFFIXES):
            name = _name(strip_image_suffix(path.name))
            by_name[name] = (*by_name.get(name, ()), path)
    return Scans(by_name, f"{folder}")


def scans_of_inputs(inputs: dict[str, Path], series_uid: str | None = None,
                    resample_irregular: bool = False) -> Scans:
    """The scans a batch was predicted from (case -> its input, channel 0's file)."""
    return Scans({_name(case): (path,) for case, path in inputs.items()},
                 "this batch's inputs", series_uid, resample_irregular)


def scan_file(scans: Scans, case: str) -> Path:
    """The scan of `case`: named as the case, or as its nnU-Net channel 0 (`case_0000`)."""
    found = [*scans.by_name.get(_name(case), ()),
             *scans.by_name.get(_name(case + CHANNEL_0), ())]
    if not found:
        raise MedsegError(f"no scan named {case} or {case}{CHANNEL_0} in {scans.where}")
    if len(found) > 1:
        names = ", ".join(path.name for path in found)
        raise MedsegError(f"{len(found)} scans of case {case} in {scans.where} ({names}); "
                          f"keep one")
    return found[0]


def load_underlay(scans: Scans, case: str, reference: Geometry) -> Underlay:
    """The scan of `case` on the reference's grid, read once; a MedsegError naming the file
    when there is none, it cannot be read or it lies on another grid."""
    path = scan_file(scans, case)
    try:
        channels = channel_count(path)
        volume = read_volume(path, np.float32, scans.series_uid, scans.resample_irregular,
                             channel=SHOWN_CHANNEL)
    except MedsegError:
        raise
    except Exception as exc:  # a damaged header, a reader's own failure: a note only
        raise MedsegError(f"cannot read the scan ({type(exc).__name__}: {exc})", path) from exc
    data = volume.data
    mismatch = grid_mismatch(volume.geometry, reference)
    if mismatch is not None:  # the same voxels in another storage order? (converters differ)
        transform = storage_reordering(volume.geometry, reference)
        if transform is None:
            raise MedsegError(f"the scan is not on its reference's grid ({mismatch})", path)
        data = nib.orientations.apply_orientation(data, transform)  # a view, not a copy
    return Underlay(data, bool(data.size) and float(data.min()) <= CT_AIR_BELOW, path,
                    channels)


def viewing_window(crop: np.ndarray, hounsfield: bool) -> tuple[float, float]:
    """The values shown from black to white: a CT's soft-tissue window, else the
    PERCENTILES of the values in `crop` (the structure's zoomed box)."""
    if hounsfield:
        return CT_WINDOW
    low, high = (float(v) for v in np.percentile(crop, PERCENTILES))
    return (low, high) if high > low else (low, low + 1.0)


def grey_levels(crop: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """`crop` as 0-255 grey levels of the window."""
    low, high = window
    scaled = (crop - np.float32(low)) * np.float32(255.0 / (high - low))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def channel_text(underlay: Underlay) -> str:
    """Which channel of the scan is shown, in words ("" for a scan of one)."""
    if underlay.channels <= 1:
        return ""
    return f"channel {SHOWN_CHANNEL} of {underlay.channels}"


def window_text(hounsfield: bool) -> str:
    """The window of a CT (`hounsfield`) or of any other scan, in words."""
    if hounsfield:
        level, width = (CT_WINDOW[0] + CT_WINDOW[1]) / 2, CT_WINDOW[1] - CT_WINDOW[0]
        return f"soft-tissue window, level {level:g} HU, width {width:g} HU"
    return (f"window from the {PERCENTILES[0]:g}th to the {PERCENTILES[1]:g}th percentile of "
            f"the values around each structure")


def _name(text: str) -> str:
    """One spelling of accented names, as the datasets' names are matched."""
    return unicodedata.normalize("NFC", text)
