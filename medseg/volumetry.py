"""Per-structure volumes and scan intensities of predicted masks (`medseg predict
--statistics`): a row per case and structure in statistics.csv, as TotalSegmentator's
`--statistics` gives for one CT, for a whole batch.

Written here rather than with MONAI's `LabelStats` analyzer, which holds the volume as a
torch tensor and a mask per label at once: on a 512 x 512 x 600 CT with 41 structures that is
gigabytes, while these sums run over slabs of slices in bounded memory."""

from __future__ import annotations

import csv
import io
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medseg.errors import MedsegError, one_line
from medseg.fileio import atomic_write_text
from medseg.io import Volume, on_grid_of, read_channels, read_label_map, read_volume
from medseg.metrics import as_written

STATISTICS_FILE = "statistics.csv"
COLUMNS = ("case", "label", "structure", "voxels", "volume_ml", "intensity_mean",
           "intensity_sd", "note")
SLAB_VOXELS = 2**24  # about 128 MB of float64 per temporary


@dataclass(frozen=True)
class CaseInputs:
    """A predicted case: its mask and the scan it was predicted from (channel 0's file), with
    every channel's file where the model takes several (one 4D NIfTI holds them all)."""

    case: str
    mask: Path
    scan: Path
    channel_files: tuple[Path, ...] = ()  # empty: `scan`


def structure_sums(mask: np.ndarray, scan: np.ndarray | None, classes: int
                   ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Voxel count, intensity mean and standard deviation of each label id below
    `classes` (ids at or above it are not counted), over slabs of the last axis: two passes,
    the second summing squared deviations from each label's mean, which keeps the variance
    exact for CT values in the thousands."""
    counts = np.zeros(classes, np.int64)
    sums = np.zeros(classes, np.float64)
    for labels, values in _slabs(mask, scan, classes):
        counts += np.bincount(labels, minlength=classes)[:classes]
        if values is not None:
            sums += np.bincount(labels, weights=values, minlength=classes)[:classes]
    if scan is None:
        return counts, None, None
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts
    squares = np.zeros(classes, np.float64)
    for labels, values in _slabs(mask, scan, classes):
        deviations = values - means[labels]
        squares += np.bincount(labels, weights=deviations * deviations,
                               minlength=classes)[:classes]
    with np.errstate(invalid="ignore", divide="ignore"):
        sds = np.sqrt(squares / counts)
    return counts, means, sds


def _slabs(mask: np.ndarray, scan: np.ndarray | None, classes: int):
    """(label ids, values) of slabs of whole slices, ids outside 0..classes-1 left out."""
    per_slice = max(1, math.prod(mask.shape[:-1]))
    depth = max(1, SLAB_VOXELS // per_slice)
    for start in range(0, mask.shape[-1], depth):
        labels = np.ascontiguousarray(mask[..., start:start + depth]).ravel()
        values = (None if scan is None
                  else np.asarray(scan[..., start:start + depth], np.float64).ravel())
        inside = (labels >= 0) & (labels < classes)
        if not inside.all():
            labels = labels[inside]
            values = None if values is None else values[inside]
        yield labels.astype(np.intp, copy=False), values


def case_rows(item: CaseInputs, labels: dict[int, str], series_uid: str | None = None,
              resample_irregular: bool = False, channels: int = 1) -> list[dict]:
    """A row per structure of `labels` (background left out) for one case, with the mean and
    sd of each of the model's `channels` (channel 0 as `intensity_mean`, channel K as
    `intensity_mean_K`); a channel's are left empty, with a note, when its scan cannot be
    read or lies elsewhere."""
    mask = read_label_map(item.mask)
    data = mask.data.reshape(mask.spatial_shape)
    classes = max(labels) + 1
    counts = np.zeros(classes, np.int64)
    measures: list[tuple[np.ndarray | None, np.ndarray | None]] = []
    notes: list[str | None] = []
    for scan, note in _channel_scans(item, mask, series_uid, resample_irregular, channels):
        counts, means, sds = structure_sums(data, scan, classes)
        measures.append((means, sds))
        notes.append(note)
        del scan  # one channel's voxels in memory at a time (a 4D file's are read at once)
    voxel_ml = math.prod(as_written(mask.geometry.spacing)) / 1000.0
    rows = []
    for label_id, name in sorted(labels.items()):
        if label_id == 0:
            continue
        voxels = int(counts[label_id])
        row = {"case": item.case, "label": label_id, "structure": name,
               "voxels": voxels, "volume_ml": _rounded(voxels * voxel_ml, 3)}
        for channel, (means, sds) in enumerate(measures):
            measured = means is not None and voxels > 0
            suffix = f"_{channel}" if channel else ""
            mean, sd = (float(means[label_id]), float(sds[label_id])) if measured else ("", "")
            if measured:
                mean, sd = _intensity_rounded(mean, sd)
            row[f"intensity_mean{suffix}"], row[f"intensity_sd{suffix}"] = mean, sd
        rows.append({**row, "note": _case_note(notes)})
    return rows


def _rounded(value: float, decimals: int) -> float:
    """`value` to `decimals` decimals, or to 3 significant digits where that needs more: an
    ADC map in mm^2/s (0.0008) or a normalized MR read 0.0 at HU's 2 decimals, and a lesion
    of a few 0.5 mm voxels 0.0 ml at 3."""
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, max(decimals, 2 - math.floor(math.log10(abs(value)))))


def _intensity_rounded(mean: float, sd: float) -> tuple[float, float]:
    """Mean and sd to 2 decimals, or to 3 significant digits of the larger of the two where
    that needs more (an ADC map in mm^2/s): a mean that is float noise beside its spread
    (values around 0 in a normalized MR, 5.6e-18) is 0.0, not written as a figure."""
    scale = max(abs(mean), sd)
    if scale == 0 or not math.isfinite(scale):
        return mean, sd
    decimals = max(2, 2 - math.floor(math.log10(scale)))
    return round(mean, decimals) + 0.0, round(sd, decimals)  # + 0.0: no "-0.0"


def _case_note(notes: list[str | None]) -> str:
    """Why channels were not measured: once when every channel has the same reason (one 4D
    file that cannot be read), else each with its channel."""
    if len(set(notes)) == 1:
        return notes[0] or ""
    return "; ".join(f"channel {channel}: {note}" for channel, note in enumerate(notes) if note)


def _channel_scans(item: CaseInputs, mask: Volume, series_uid: str | None,
                   resample_irregular: bool, channels: int):
    """(voxels on the mask's grid or None, why not) per channel, one channel at a time."""
    files = item.channel_files or (item.scan,)
    if channels > 1 and len(files) == 1:  # one 4D NIfTI of every channel, read in one pass
        try:
            volumes = read_channels(files[0], np.float32)
        except (MedsegError, OSError, RuntimeError, ValueError) as exc:
            volumes = [f"scan not read: {one_line(str(exc))}"] * channels
        if len(volumes) != channels:
            volumes = [f"scan not measured: it holds {len(volumes)} volumes, the model "
                       f"takes {channels}"] * channels
        while volumes:
            volume = volumes.pop(0)
            yield (None, volume) if isinstance(volume, str) else _on_mask_grid(volume, mask)
        return
    for path in files[:channels]:
        # no name here keeps a channel's voxels while the next one is read
        yield _read_on_mask_grid(path, mask, series_uid, resample_irregular)


def _read_on_mask_grid(path: Path, mask: Volume, series_uid: str | None,
                       resample_irregular: bool) -> tuple[np.ndarray | None, str | None]:
    try:
        scan = read_volume(path, np.float32, series_uid, resample_irregular)
    except (MedsegError, OSError, RuntimeError, ValueError) as exc:
        return None, f"scan not read: {one_line(str(exc))}"
    return _on_mask_grid(scan, mask)


def _on_mask_grid(scan: Volume, mask: Volume) -> tuple[np.ndarray | None, str | None]:
    """The scan's voxels on the mask's grid (the same voxels stored in another axis order
    are reordered, as converters differ), or None and why not."""
    if scan.data.size != math.prod(scan.spatial_shape):
        return None, f"scan not measured: it holds {scan.data.shape} values, not one volume"
    try:
        return on_grid_of(scan, mask).data.reshape(mask.spatial_shape), None
    except MedsegError as exc:
        return None, f"scan not measured: {exc}"


def write_statistics(items: list[CaseInputs], labels: dict[int, str], target: Path,
                     series_uid: str | None = None, resample_irregular: bool = False,
                     channels: int = 1) -> int:
    """statistics.csv for `items`, written whole under a temporary name; returns the number
    of cases measured (a mask that cannot be read is left out, with a note)."""
    rows: list[dict] = []
    measured = 0
    for item in tqdm(items, desc="statistics", unit="case", dynamic_ncols=True,
                     disable=len(items) < 2):
        try:
            case = case_rows(item, labels, series_uid, resample_irregular, channels)
        except (MedsegError, OSError, RuntimeError, ValueError) as exc:
            tqdm.write(f"medseg: note: {item.mask}: no statistics ({one_line(str(exc))})",
                       file=sys.stderr)
            continue
        rows.extend(case)
        measured += 1
        if case and case[0]["note"]:
            what = "volumes only" if channels == 1 else "not every channel measured"
            tqdm.write(f"medseg: note: {item.case}: {what}, {case[0]['note']}",
                       file=sys.stderr)
    atomic_write_text(target, statistics_csv(rows, channels))
    return measured


def statistics_csv(rows: list[dict], channels: int = 1) -> str:
    """The table; a model of several channels adds intensity_mean_K and intensity_sd_K for
    each further channel K, before `note`."""
    more = [f"intensity_{kind}_{k}" for k in range(1, channels) for kind in ("mean", "sd")]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*COLUMNS[:-1], *more, COLUMNS[-1]],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
