"""Pair predictions with references by file name and score every case and structure."""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import unicodedata
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from medseg.datasets import IMAGE_SUFFIXES, strip_image_suffix
from medseg.errors import MedsegError
from medseg.io import (
    Volume,
    grid_mismatch,
    header_note,
    orientation_unknown,
    read_label_map,
    refuse_sheared_axes,
    reorder_onto,
)
from medseg.metrics import (
    FAILED_SCORES,
    as_written,
    label_counts,
    label_values,
    leave_out_ignored,
    score_case,
    voxels_ml,
)
from medseg.stopping import interrupts_ignored_by_new_processes, raise_if_stopped

Pair = tuple[str, Path | None, Path]


@dataclass(frozen=True)
class CaseScores:
    """Scores of one case; `error` is set when the case could not be scored (a failure).

    `prediction` and `reference` are the files scored (for the report's pictures);
    `resampled` tells that the prediction was resampled onto the reference grid;
    `spacing` is the reference's voxel size in mm along its file axes (None when unknown);
    `unlisted` are the prediction's label ids that the label map does not name (not scored);
    `notes` what to doubt in either file's header (io.header_note: ITK tools would place it
    elsewhere), each led by "reference: " or "prediction: ".
    """

    case: str
    scores: dict[str, dict[str, float]]
    error: str | None = None
    prediction: Path | None = None
    reference: Path | None = None
    resampled: bool = False
    spacing: tuple[float, float, float] | None = None
    unlisted: tuple[int, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoadedPair:
    """A prediction and its reference as integer label maps on the reference grid."""

    prediction: np.ndarray
    reference: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    resampled: bool
    unlisted: tuple[int, ...] = ()
    notes: tuple[str, ...] = ()


def pair_cases(pred_dir: Path, ref_dir: Path) -> list[Pair]:
    """(case, prediction or None, reference) for every reference volume."""
    for folder in (pred_dir, ref_dir):
        if not folder.is_dir():
            raise MedsegError("not a folder (give the folder that holds the volumes)"
                              if folder.exists() else "folder not found", folder)
    if same_folder(pred_dir, ref_dir):
        raise MedsegError("is given as both the predictions and the references: each mask "
                          "would be scored against itself", pred_dir)
    predictions = volumes_by_case(pred_dir)
    references = volumes_by_case(ref_dir)
    if not references:
        raise MedsegError("no reference volumes found", ref_dir)
    if not predictions:
        raise MedsegError("no prediction volumes found", pred_dir)
    if not predictions.keys() & references.keys():  # each case a miss: the wrong folder
        raise MedsegError(f"no prediction has the name of a reference in {ref_dir} (cases "
                          f"are paired by file name: {min(predictions)} here, "
                          f"{min(references)} there)", pred_dir)
    return [(case, predictions.get(case), references[case]) for case in sorted(references)]


def same_folder(one: str | Path, other: str | Path) -> bool:
    """Whether two paths name one existing folder (however spelt: `.`, a link, `a/../a`)."""
    try:
        return Path(one).is_dir() and os.path.samefile(one, other)
    except OSError:  # one of them does not exist
        return False


def unpaired_predictions(pred_dir: Path, pairs: list[Pair]) -> list[str]:
    """Cases with a prediction but no reference: not scored, and worth a word."""
    return sorted(set(volumes_by_case(pred_dir)) - {case for case, _, _ in pairs})


def volumes_by_case(folder: Path) -> dict[str, Path]:
    """The volume files of a folder by case name (file name without its image suffix, in
    one spelling: see case_name); two files of one case (`a.nii.gz` and `a.nrrd`) are
    refused rather than one picked."""
    volumes: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        # hidden files: macOS "._x.nii.gz" companions, a writer's half-written ".x.part"
        if path.name.lower().endswith(IMAGE_SUFFIXES) and not path.name.startswith("."):
            case = case_name(strip_image_suffix(path.name))
            if case in volumes:
                raise MedsegError(f"{volumes[case].name} and {path.name} are both case "
                                  f"'{case}'; keep one", folder)
            volumes[case] = path
    return volumes


def case_name(name: str) -> str:
    """One spelling of an accented case name, as datasets and the report's scans match
    names: macOS writes 'café' decomposed (NFD), most other tools composed (NFC), and a
    prediction and its reference of two origins would not pair."""
    return unicodedata.normalize("NFC", name)


def infer_labels(pairs: list[Pair]) -> dict[int, str]:
    """Label ids seen in the references or the predictions, named label_K, for when no
    label map is given: a label only a prediction has is a false positive to score, not an
    unknown label. An unreadable prediction is left for its case to report as failed."""
    ids: set[int] = {0}
    for _, prediction, reference in pairs:
        values = label_values(read_label_map(reference).data)
        negative = sorted(v for v in values if v < 0)
        if negative:  # as training refuses them: labels are class numbers
            raise MedsegError(f"label values {negative} are negative: labels are class "
                              f"numbers 0, 1, 2, ... (or give --labels)", reference)
        ids |= values
        if prediction is not None:
            try:  # a negative value stays unknown, failing its case
                ids |= {v for v in label_values(read_label_map(prediction).data) if v >= 0}
            except MedsegError:
                pass
    return {k: ("background" if k == 0 else f"label_{k}") for k in sorted(ids)}


def evaluate_pairs(pairs: list[Pair], labels: dict[int, str], tolerance_mm: float = 2.0,
                   jobs: int = 1, resample: bool = False, ignore_label: int | None = None
                   ) -> list[CaseScores]:
    """Score every pair (in order); `jobs` > 1 scores cases in that many processes. The
    voxels a reference labels `ignore_label` are left out of every score."""
    if tolerance_mm < 0:
        raise MedsegError(f"the surface Dice tolerance must be >= 0 mm, got {tolerance_mm}")
    tasks = [(case, prediction, reference, labels, tolerance_mm, resample, ignore_label)
             for case, prediction, reference in pairs]
    jobs = max(1, min(int(jobs), len(tasks)))
    bar = tqdm(total=len(tasks), desc="evaluate", unit="case", dynamic_ncols=True)
    with bar:
        if jobs == 1:
            results = []
            for task in tasks:
                raise_if_stopped()
                results.append(evaluate_case(*task))
                bar.update(1)
            return results
        return _evaluate_parallel(tasks, jobs, bar)


def evaluate_case(case: str, prediction: Path | None, reference: Path, labels: dict[int, str],
                  tolerance_mm: float = 2.0, resample: bool = False,
                  ignore_label: int | None = None) -> CaseScores:
    """Scores of one case; a missing or unusable prediction is a failure, never an exception.
    An unreadable or unusable reference is the user's error (MedsegError): it is read and
    checked first, whatever its prediction, so that it is never scored as a failed case."""
    ref = read_reference(reference, labels, ignore_label)
    if prediction is None:
        return failed_case(case, labels, "no prediction for this case", reference=reference,
                           reference_read=ref)
    try:
        pair = load_pair(prediction, ref, labels, resample)
    except MedsegError as exc:
        return failed_case(case, labels, str(exc), prediction, reference, reference_read=ref)
    scores = score_case(*leave_out_ignored(pair.prediction, pair.reference, ignore_label),
                        labels, pair.spacing, tolerance_mm)
    return CaseScores(case, scores, None, prediction, reference, pair.resampled, pair.spacing,
                      pair.unlisted, pair.notes)


class Reference(NamedTuple):
    """A reference label map and its voxel count per label value."""

    volume: Volume
    voxels: dict[int, int]


def read_reference(reference: Path, labels: dict[int, str], ignore_label: int | None = None
                   ) -> Reference:
    """A reference label map on an orthogonal grid whose values are all in `labels` (or
    are `ignore_label`)."""
    ref = read_label_map(reference)
    # volumes (voxel count x spacing product) and surface distances (voxel index x spacing)
    refuse_sheared_axes(ref.geometry, reference, "so volumes and distances in mm would be "
                        "wrong")
    voxels = label_counts(ref.data)
    _refuse_unknown_labels(set(voxels) - {ignore_label}, labels, reference)
    return Reference(ref, voxels)


def load_pair(prediction: Path, reference: Path | Reference, labels: dict[int, str],
              resample: bool = False, ignore_label: int | None = None) -> LoadedPair:
    """Read both label maps (or the prediction, given `read_reference`'s); check (or with
    `resample`, make) a shared grid and known labels (the reference may hold
    `ignore_label`: the maps are returned as read, before `leave_out_ignored`). Prediction
    ids the map does not name are left unscored, as nnU-Net scores the listed labels only
    (one model's 104 structures against a reference of 5); a negative one fails the case."""
    if not isinstance(reference, Reference):
        reference = read_reference(reference, labels, ignore_label)
    ref = reference.volume
    pred = read_label_map(prediction)
    pred_data = pred.data.reshape(pred.spatial_shape)
    mismatch = grid_mismatch(pred.geometry, ref.geometry)
    if mismatch is not None:  # the same voxels in another storage order? (converters differ)
        reordered = reorder_onto(pred_data, pred.affine, ref.geometry)
        if reordered is not None:
            pred_data, mismatch = reordered, None
    resampled = mismatch is not None
    if resampled:
        _refuse_unplaced(pred, ref, mismatch)
        if not resample:
            raise MedsegError(f"not on the same grid as the reference ({mismatch}); "
                              f"`medseg evaluate --resample` resamples it by nearest "
                              f"neighbour{_same_shape_caution(pred, ref)}", prediction)
        pred_data = resample_nearest(pred_data, pred.affine, ref.spatial_shape, ref.affine)
    values = label_values(pred_data)
    _refuse_unknown_labels({v for v in values if v < 0}, labels, prediction)
    return LoadedPair(pred_data, ref.data.reshape(ref.spatial_shape), ref.affine, ref.spacing,
                      resampled, tuple(sorted(values - set(labels))), _header_notes(ref, pred))


def _header_notes(ref: Volume, pred: Volume) -> tuple[str, ...]:
    """What to doubt in either header, as predict says of its scans: a SimpleITK-based tool
    may place the reference, or the mask, elsewhere than medseg scored them."""
    notes = (("reference", header_note(ref.geometry)), ("prediction", header_note(pred.geometry)))
    return tuple(f"{which}: {note}" for which, note in notes if note)


def _same_shape_caution(pred: Volume, ref: Volume) -> str:
    """A mask of its reference's shape on another grid is mostly the reference's voxels under
    a header written wrongly (nibabel's Nifti1Image(mask, numpy.eye(4))): `--resample` would
    move them where that header says, and score the move."""
    if tuple(pred.spatial_shape) != tuple(ref.spatial_shape):
        return ""
    return (", as its header places it: a mask of the reference's shape whose header was "
            "written wrongly (an identity affine, say) would be moved, and scored as moved; "
            "write such a mask with its scan's header instead")


def _refuse_unplaced(pred: Volume, ref: Volume, mismatch: str) -> None:
    """A prediction on another grid is resampled by where both headers place the voxels:
    a header that gives no orientation (nibabel's `Nifti1Image(data, None)`) places them
    nowhere in particular, and `--resample` gave Dice 0 for a prediction on the very grid."""
    for volume, whose, mask in ((pred, "its", "the mask"),
                                (ref, f"the reference's ({ref.path})", "the reference")):
        if orientation_unknown(volume.geometry):
            raise MedsegError(f"not on the same grid as the reference ({mismatch}), and "
                              f"{whose} NIfTI header gives no orientation (qform and sform "
                              f"codes 0), so `--resample` cannot place it there either: "
                              f"write {mask} with its scan's header", pred.path)


def _refuse_unknown_labels(values: set[int], labels: dict[int, str], path: Path) -> None:
    unknown = sorted(values - set(labels))
    if unknown:
        raise MedsegError(f"label values {unknown} are not in the label map", path)


def resample_nearest(data: np.ndarray, affine: np.ndarray, shape: tuple[int, int, int],
                     target_affine: np.ndarray) -> np.ndarray:
    """Labels `data` (voxel-to-RAS `affine`) on the grid (`shape`, `target_affine`) by nearest
    neighbour; 0 outside `data`. Points in the outer half of a border voxel take its label
    (grid-constant): plain "constant" would give them 0 and shave the volume's edge."""
    voxel_to_voxel = np.linalg.inv(affine) @ target_affine
    return ndimage.affine_transform(data, voxel_to_voxel[:3, :3], offset=voxel_to_voxel[:3, 3],
                                    output_shape=tuple(shape), order=0, mode="grid-constant",
                                    cval=0)


def failed_case(case: str, labels: dict[int, str], error: str, prediction: Path | None = None,
                reference: Path | None = None, reference_read: Reference | None = None
                ) -> CaseScores:
    """A case that could not be scored. Each structure of its reference is missed: Dice, IoU
    and NSD 0, distances inf, the reference's volume, predicted volume NaN. A structure its
    reference lacks is scored as absent from both (NaN, out of the structure's `n`), as a
    correctly empty prediction would be: a 0 there would lower the mean of every structure
    that other cases have. Without the reference read, every structure is missed."""
    scores = {name: dict(FAILED_SCORES) for k, name in sorted(labels.items()) if k > 0}
    spacing = None
    if reference_read is not None:
        spacing = reference_read.volume.spacing
        for k, name in labels.items():
            if k > 0 and reference_read.voxels.get(k, 0) > 0:
                # as a scored case computes it: a float32 header's 0.7 mm gave 0.21608999 ml
                # here, 0.21609 ml for the same reference scored
                scores[name]["ref_ml"] = voxels_ml(reference_read.voxels[k],
                                                   as_written(spacing))
            elif k > 0:
                scores[name] = {**dict.fromkeys(FAILED_SCORES, math.nan), "ref_ml": 0.0}
    return CaseScores(case, scores, error, prediction, reference, spacing=spacing)


def _evaluate_parallel(tasks: list[tuple], jobs: int, bar: tqdm) -> list[CaseScores]:
    """Score the tasks in `jobs` processes. The workers ignore Ctrl-C (a terminal sends it to
    the whole process group): the main process alone stops, and ends them. Left to stop on
    their own, they printed tracebacks, and one could die holding the result queue's lock,
    so that the main process waited for it forever. A worker that dies (the OOM killer)
    breaks the pool, which raises rather than waits."""
    # spawn, not fork: the parent may hold torch/OpenMP threads that a fork would copy broken
    context = multiprocessing.get_context("spawn")
    results: list[CaseScores | None] = [None] * len(tasks)
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context)
    try:
        with interrupts_ignored_by_new_processes():  # the workers start at the first submit
            futures = {pool.submit(evaluate_case, *task): i for i, task in enumerate(tasks)}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            bar.update(1)
    except BaseException:  # a bad reference (MedsegError), Ctrl-C, SIGTERM, a dead worker
        _end_workers(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return [r for r in results if r is not None]


def _end_workers(pool: ProcessPoolExecutor) -> None:
    """Stop the workers now rather than after their current case (a large one takes
    seconds). The executor has no public call for it: its process table is read."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        with contextlib.suppress(Exception):
            process.terminate()
