"""Segment new volumes with a trained run: preprocess as the plan says, sliding window,
average folds, runs and mirrored copies, back to the input grid, argmax, write NIfTI.

Inputs are any volume `read_volume` reads (NIfTI, NRRD, MetaImage, DICOM series folders); the
mask lies on the input's exact grid (for DICOM, the series' grid in the same patient space)."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import itertools
import os
import re
import sys
import time
import traceback
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from medseg.archive import file_sha256, shown_as
from medseg.config import PredictConfig, load_workflow, override_key
from medseg.datasets import strip_image_suffix
from medseg.dicom import DICOM_SUFFIXES
from medseg.dicom_seg import SegSource, build_seg, seg_path, seg_source, write_seg
from medseg.errors import MedsegError, one_line, unwrap_transform_error
from medseg.fileio import hold_lock, names_fold_case, output_folder, physical_memory
from medseg.inference import (
    accumulation_dtype,
    accumulator_bytes,
    axis_maps,
    foreground_box,
    labels_on_input_grid,
    merged_planes,
    stream_probabilities,
    window_batch_size,
    window_count,
)
from medseg.io import (
    MAX_VOXELS,
    VOLUME_SUFFIXES,
    Geometry,
    Volume,
    channel_count,
    header_note,
    read_channels,
    read_volume,
    refuse_sheared_axes,
    write_mask,
)
from medseg.model import create_model, load_weights, weights_file_problem
from medseg.plan import Plan, intensity_doubt, load_plan, ras_grid
from medseg.postprocess import check_postprocess_labels, postprocess
from medseg.stopping import raise_if_stopped
from medseg.train import (
    BEST_WEIGHTS,
    TRAIN_STATE,
    SavedProgress,
    fold_folders,
    last_metrics_record,
    saved_progress,
    select_precision,
)
from medseg.transforms import IMAGE, case_dict, preprocessing

# what one bad case can raise (an unreadable or odd volume, a full disk, a scan too large for
# numpy's memory, as torch's is a RuntimeError): reported, and the batch goes on; anything
# else is a bug and stops it
CASE_ERRORS = (MedsegError, OSError, RuntimeError, ValueError, MemoryError)
CHANNEL_SUFFIX = re.compile(r"(.+)_([0-9]{4})")  # ASCII digits, as datasets reads them
# the next case is read during this one's sliding window only while this one needs less
READ_AHEAD_BYTES = 512 * 2**20
# peak process memory per network-grid voxel of one channel (measured 2026-11-22: 2.94 GB peak
# RSS for a 6.2e7-voxel grid, the hippocampus model; a 9.8e8-voxel grid was killed at 24 GB)
PREDICTION_BYTES_PER_VOXEL = 48
# peak per input voxel of one channel while it is read and resampled, with a margin
# (measured 2026-11-23: 1.59 GB for 512 x 512 x 400, 2.81 GB for 512 x 512 x 800, 15.2 and
# 13.4 bytes per voxel, at a 1.5 mm model's spacing)
PREPROCESSING_BYTES_PER_INPUT_VOXEL = 16
# cases of at least this many windows get a bar of their own (a whole-body CT at 1.5 mm with
# 96^3 windows at step 0.5 runs about 500)
WINDOW_BAR_MIN = 64
# voxels this many times finer or coarser than the plan's: a doubtful header, said in a note
SPACING_FAR_OFF = 8
# what the runs of an ensemble share: one preprocessing and one label map (runs of other
# patch sizes or mirror axes slide windows of their own over the same planes)
ENSEMBLE_PLAN_KEYS = ("target_spacing", "normalization", "in_channels", "modalities",
                      "num_classes", "labels", "ignore_label")


@dataclass(frozen=True)
class Predictor:
    """A plan and the networks that share it: the folds of one run, or those of several runs
    whose plans preprocess alike (an ensemble)."""

    plan: Plan
    models: tuple[torch.nn.Module, ...]
    folds: tuple[str, ...]
    device: torch.device
    # each model's share of the mean when the shares differ (runs of unlike fold counts each
    # weigh the same, as nnU-Net's ensembles of configurations do); empty: equal shares
    weights: tuple[float, ...] = ()
    # each model's run's plan where runs differ in patch size or mirror axes; empty: `plan`
    member_plans: tuple[Plan, ...] = ()

    def window_groups(self) -> list[tuple[Predictor, float]]:
        """The models by the window they slide (patch size, mirror axes), each group as a
        predictor of its own with its share of the ensemble's mean; one group (self, 1.0)
        when every model slides the plan's."""
        if not self.member_plans:
            return [(self, 1.0)]
        shares = self.weights or tuple(1 / len(self.models) for _ in self.models)
        groups: dict[tuple, list[int]] = {}
        for index, plan in enumerate(self.member_plans):
            key = (tuple(plan.patch_size), tuple(plan.mirror_axes))
            groups.setdefault(key, []).append(index)
        result = []
        for members in groups.values():
            share = sum(shares[i] for i in members)
            first = self.member_plans[members[0]]
            plan = dataclasses.replace(self.plan, patch_size=list(first.patch_size),
                                       mirror_axes=list(first.mirror_axes))
            result.append((Predictor(plan, tuple(self.models[i] for i in members),
                                     tuple(self.folds[i] for i in members), self.device,
                                     tuple(shares[i] / share for i in members)), share))
        return result


@dataclass(frozen=True)
class PredictionResult:
    input: Path
    output: Path | None
    seconds: float
    error: str | None = None
    skipped: bool = False
    exception: BaseException | None = field(default=None, repr=False, compare=False)
    channel_files: tuple[Path, ...] = ()  # every channel's file of a case written or kept


def resolve_device(device: str | None) -> torch.device:
    """`cpu`, `cuda` or `cuda:N` (None: CUDA when available, under torchrun the GPU of
    LOCAL_RANK), refused in one line when this torch cannot run it."""
    if device is None:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and not (index.isascii() and index.isdigit())):
        raise MedsegError(f"--device takes cpu, cuda or cuda:N, got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise MedsegError(f"--device {device}: this torch sees no CUDA GPU (torch "
                          f"{torch.__version__}); use --device cpu")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise MedsegError(f"--device {device}: only {torch.cuda.device_count()} CUDA GPU(s)")
    return torch.device(device)


def load_predictor(run_dirs: str | Path | Sequence[str | Path], folds: list[int] | None = None,
                   device: str | None = None, digests: Mapping[Path, str] | None = None
                   ) -> Predictor:
    """Read plan.json and the best weights of the chosen folds (all trained folds by default)
    of one run folder, or of several: their plans must preprocess alike and predict the same
    labels, and each run weighs the same in the mean whatever its number of folds. `digests`:
    weights files' SHA-256 known already (crossval's record), not read again."""
    torch_device = resolve_device(device)
    runs = [Path(run_dirs)] if isinstance(run_dirs, str | Path) else [Path(p) for p in run_dirs]
    _refuse_repeated_runs(runs)
    members = [_trained_folds(run_dir, folds) for run_dir in runs]
    plan = members[0][0]
    for run_dir, (other, _) in zip(runs[1:], members[1:], strict=True):
        _refuse_unlike_plan(runs[0], plan, run_dir, other)
    if len(runs) > 1:
        _refuse_copied_runs(runs, [fold_dirs for _, fold_dirs in members], digests or {})
    models, names, weights, plans = [], [], [], []
    for run_dir, (run_plan, fold_dirs) in zip(runs, members, strict=True):
        named = [p.name if len(runs) == 1 else f"{shown_as(run_dir)}/{p.name}"
                 for p in fold_dirs]
        _note_unfinished_folds(run_dir, fold_dirs, named)
        for fold_dir, name in zip(fold_dirs, named, strict=True):
            model = _fold_weights(run_plan, fold_dir)
            models.append(model.to(torch_device, memory_format=torch.channels_last_3d).eval())
            names.append(name)
            weights.append(1 / (len(runs) * len(fold_dirs)))
            plans.append(run_plan)
    equal_shares = len({len(fold_dirs) for _, fold_dirs in members}) == 1
    one_window = len({(tuple(p.patch_size), tuple(p.mirror_axes)) for p in plans}) == 1
    return Predictor(plan, tuple(models), tuple(names), torch_device,
                     () if equal_shares else tuple(weights),
                     () if one_window else tuple(plans))


def predict_settings(runs: Sequence[Path], overrides: Sequence[str] = (),
                     tta: bool | None = None, step: float | None = None) -> PredictConfig:
    """The first run's predict section (window step, TTA, precision, post-processing) with
    the command line's over it: `overrides` (`--set predict.KEY=VALUE`), `tta`, `step`. A
    further run whose section differs in a key not given gets a note, since its own is not
    used."""
    for item in overrides:
        if override_key(item).split(".")[0] != "predict":
            raise MedsegError(f"--set {item}: only keys of the predict section can be set "
                              f"here (the rest is the trained run's)")
    config = load_workflow(Path(runs[0]) / "workflow.yaml", list(overrides)).predict
    given = {override_key(item).partition(".")[2] for item in overrides}
    given |= {name for name, value in (("tta", tta), ("step", step)) if value is not None}
    for run in runs[1:]:
        other = load_workflow(Path(run) / "workflow.yaml").predict
        differing = [f.name for f in dataclasses.fields(config) if f.name not in given
                     and getattr(config, f.name) != getattr(other, f.name)]
        if differing:
            keys = ", ".join(f"predict.{name}" for name in differing)
            print(f"medseg: note: {shown_as(run)} sets {keys} otherwise than "
                  f"{shown_as(runs[0])}: the ensemble uses the first run's predict settings",
                  file=sys.stderr)
    return dataclasses.replace(config, tta=config.tta if tta is None else tta,
                               step=config.step if step is None else step)


def _trained_folds(run_dir: Path, folds: list[int] | None) -> tuple[Plan, list[Path]]:
    """A run folder's plan and the folds of it to predict with."""
    if not run_dir.exists():
        raise MedsegError("model folder not found (give the run folder `medseg train --out` "
                          "wrote)", run_dir)
    if not run_dir.is_dir():
        raise MedsegError("not a folder: --model takes the run folder (the one holding "
                          "plan.json), not a file in it", run_dir)
    plan = load_plan(run_dir / "plan.json")
    fold_dirs = [p for _, p in fold_folders(run_dir)
                 if (p / "checkpoints" / BEST_WEIGHTS).is_file()]
    if folds is not None:
        wanted = {f"fold_{k}" for k in folds}
        missing = wanted - {p.name for p in fold_dirs}
        if missing:
            raise MedsegError(f"no trained weights for {', '.join(sorted(missing))}", run_dir)
        fold_dirs = [p for p in fold_dirs if p.name in wanted]
    if not fold_dirs:
        raise MedsegError("no trained fold with checkpoints/best.safetensors", run_dir)
    return plan, fold_dirs


def _refuse_repeated_runs(runs: list[Path]) -> None:
    """The same run twice would count twice in the mean: a slip, not a choice."""
    seen: dict[Path, Path] = {}
    for run_dir in runs:
        key = run_dir.resolve()
        if key in seen:
            spelt = f" (also as {seen[key]})" if str(seen[key]) != str(run_dir) else ""
            raise MedsegError(f"given twice to --model{spelt}: each run would count twice "
                              f"in the ensemble's mean", run_dir)
        seen[key] = run_dir


def _refuse_copied_runs(runs: list[Path], fold_dirs: list[list[Path]],
                        known: Mapping[Path, str]) -> None:
    """Two copies of one run (a run folder copied, an archive under two names, a run and its
    archive) are told apart from runs by their weights: the same weights in two runs would
    count twice in the ensemble's mean."""
    seen: dict[str, tuple[Path, Path]] = {}
    for run_dir, folds in zip(runs, fold_dirs, strict=True):
        for fold_dir in folds:
            weights = fold_dir / "checkpoints" / BEST_WEIGHTS
            digest = known.get(weights) or file_sha256(weights)
            first = seen.setdefault(digest, (run_dir, fold_dir))
            if first[0] != run_dir:
                raise MedsegError(f"{fold_dir.name}'s best weights are those of "
                                  f"{shown_as(first[0])}'s {first[1].name} (the same SHA-256): "
                                  f"copies of one run, which would count twice in the "
                                  f"ensemble's mean; give one of them", run_dir)


def _refuse_unlike_plan(first_dir: Path, first: Plan, run_dir: Path, plan: Plan) -> None:
    """The runs of an ensemble share one preprocessing of each case and one sliding window
    (the mean is taken window by window, so memory stays bounded): what shapes the networks'
    input and output must agree; widths, depths and network kinds may differ."""
    for key in ENSEMBLE_PLAN_KEYS:
        mine, theirs = getattr(first, key), getattr(plan, key)
        if key == "target_spacing":
            alike = np.allclose(mine, theirs, rtol=1e-6, atol=1e-9)
        else:
            alike = mine == theirs
        if not alike:
            raise MedsegError(f"plan.json's {key} is {_brief(theirs)}, {first_dir}'s is "
                              f"{_brief(mine)}: the runs of an ensemble must preprocess "
                              f"alike and predict the same labels (train them on one dataset "
                              f"with the same plan keys)", run_dir)


def _brief(value: object, width: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _fold_weights(plan: Plan, fold_dir: Path) -> torch.nn.Module:
    """The fold's network with its best weights; a file cut short says how to write it again
    (the training state keeps a copy)."""
    path = fold_dir / "checkpoints" / BEST_WEIGHTS
    problem = weights_file_problem(path)
    if problem and (fold_dir / "checkpoints" / TRAIN_STATE).is_file():
        raise MedsegError(f"not readable ({problem}): `medseg train "
                          f"--resume {fold_dir.parent}` writes it again from the training "
                          f"state (and trains on a fold that has not finished)", path)
    return load_weights(create_model(plan), path)


def _note_unfinished_folds(run_dir: Path, fold_dirs: list[Path], names: list[str]) -> None:
    """A fold interrupted (or still training) has best weights too, from fewer epochs than
    planned: say so, since nnU-Net would use finished folds only. A fold stopped by its
    train.max_minutes budget is finished."""
    try:
        cfg = load_workflow(run_dir / "workflow.yaml").train
    except MedsegError:  # a model folder shipped without its workflow: no note, no refusal
        return
    for fold_dir, name in zip(fold_dirs, names, strict=True):
        last = None  # the last metrics.jsonl record, when needed
        if (fold_dir / "checkpoints" / TRAIN_STATE).is_file():
            progress = saved_progress(fold_dir)
            finished = progress is not None and progress.epochs_done >= cfg.epochs
        elif (fold_dir / "metrics.jsonl").is_file():  # stopped before its first state
            progress, last = None, last_metrics_record(fold_dir / "metrics.jsonl")
            finished = int(last.get("epoch", -1)) + 1 >= cfg.epochs
        else:
            continue  # shipped without its training state or metrics: nothing tells
        if not finished and not _budget_stop(fold_dir, cfg, progress, last):
            tqdm.write(f"medseg: note: {name} has not finished its {cfg.epochs} "
                       f"epochs (interrupted, or still training); its best weights so far are "
                       f"used (--folds chooses the folds)", file=sys.stderr)


def _budget_stop(fold_dir: Path, cfg, progress: SavedProgress | None,
                 last: dict | None = None) -> bool:
    """Whether the fold's last session ended at its budget: its state says so; a state from
    before that was recorded (or unreadable) is judged by its clock (which, across resumed
    sessions, counts more than the last session's budget)."""
    if progress is not None and progress.budget_stop is not None:
        return progress.budget_stop
    # the budget stop is decided after the epoch's record: allow that epoch's time
    if last is None:
        last = last_metrics_record(fold_dir / "metrics.jsonl")
    elapsed = last.get("elapsed_seconds", 0.0) + last.get("epoch_seconds", 0.0)
    return bool(cfg.max_minutes and elapsed >= cfg.max_minutes * 60)


def without_earlier_masks(paths: list[Path], output: Path) -> list[Path]:
    """The inputs less those in the output folder that are masks of the other inputs, with
    a note: a shell pattern (`--input scans/* --output scans/pred`) takes the folder in once
    an earlier run made it, and its masks, read as scans, were refused as clashing names,
    so the same command could not go on. Scans of their own there are left for the refusal
    that names them."""
    if not output.is_dir():
        return paths
    if len(paths) > 1:  # as a batch stopped before its first mask left it: no series
        paths = [p for p in paths if not _empty_output_folder(p, output)]
    inside = [p for p in paths if p.parent.is_dir() and os.path.samefile(p.parent, output)]
    others = [p for p in paths if p not in inside]
    masks = {output_name(p) for p in others}
    if not inside or not others or any(p.name not in masks or not _label_map_file(p)
                                       for p in inside):
        return paths
    tqdm.write(f"medseg: note: {len(inside)} input(s) in {output} ({inside[0].name}, ...) are "
               f"the --output folder's masks of the other inputs, not scans: left out",
               file=sys.stderr)
    return others


def _empty_output_folder(path: Path, output: Path) -> bool:
    """Whether an input is the output folder holding no file but hidden ones (a lock, a mask
    being written): collect_inputs takes it for a DICOM series, refused as the output's."""
    return path.is_dir() and os.path.samefile(path, output) \
        and all(child.name.startswith(".") for child in path.iterdir())


def _label_map_file(path: Path) -> bool:
    """Whether a file's NIfTI header says label map (intent 'label', as medseg writes its
    masks): a scan named as another input's mask (two sites' `case1.nii.gz`, the output
    folder one of them) is not left out, to be skipped as done or replaced (--overwrite).
    An empty file (a copy cut short, a full disk) is no scan either: predicted again."""
    import nibabel as nib

    try:
        return path.stat().st_size == 0 or nib.load(str(path)).header.get_intent()[0] == "label"
    except Exception:  # not NIfTI, unreadable: no mask of medseg's
        return False


def collect_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files as given; a folder of volume files expands to them (sorted; hidden files such as
    macOS `._x.nii.gz` left out), any other folder is one DICOM series input. A file named
    twice (itself and through its folder) counts once; two links to one file are two inputs."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            # a link to nowhere (a share not mounted), a pipe or a device named like a scan
            # is a case that fails naming it, not a file silently left out
            found = sorted(p for p in item.iterdir()
                           if not p.is_dir() and not p.name.startswith(".")
                           and p.name.lower().endswith(VOLUME_SUFFIXES))
            if found:
                _note_skipped_subfolders(item)
                _note_skipped_dicom_files(item)
                _note_skipped_archives(item)
            paths.extend(found or [item])
        elif item.exists():  # a pipe or a device fails as a case, naming what it is
            paths.append(item)
        else:
            raise MedsegError("input not found", item)
    unique: dict[Path, Path] = {}
    for path in paths:
        # by the name in its (real) folder, not the file it leads to: two links to one scan
        # (an nnU-Net folder of links, one file as two channels) are two inputs
        unique.setdefault(Path(os.path.realpath(path.parent)) / path.name, path)
    _note_dicom_files_given_one_by_one(list(unique.values()))
    return list(unique.values())


def _note_dicom_files_given_one_by_one(paths: list[Path]) -> None:
    """`--input series/*.dcm` makes every slice a volume of its own: say how to give a series."""
    from medseg.dicom import is_dicom_file, series_files_beside

    files_by_folder: dict[Path, list[Path]] = {}
    for path in paths:
        if path.is_file() and not path.name.lower().endswith(VOLUME_SUFFIXES) \
                and is_dicom_file(path):
            files_by_folder.setdefault(path.parent, []).append(path)
    for folder, files in files_by_folder.items():
        if len(files) > 1:
            tqdm.write(f"medseg: note: {len(files)} DICOM files of {folder} are each read as "
                       f"a volume of their own; to read them as one series, give the folder "
                       f"({folder}) as the input", file=sys.stderr)
        elif others := series_files_beside(files[0]):
            tqdm.write(f"medseg: note: {files[0]} is read alone; its folder holds {others} "
                       f"more file(s) of its series: give the folder ({folder}) to read the "
                       f"whole series", file=sys.stderr)


def _note_skipped_subfolders(folder: Path) -> None:
    """A folder of volume files is a batch of those files; its subfolders (a DICOM series
    among them?) are not read, and the user should hear of it."""
    subfolders = sorted(p.name for p in folder.iterdir()
                        if p.is_dir() and not p.name.startswith("."))
    if subfolders:
        more = f" and {len(subfolders) - 3} more" if len(subfolders) > 3 else ""
        tqdm.write(f"medseg: note: {folder} holds volume files, so its subfolders are not "
                   f"read ({', '.join(subfolders[:3])}{more}); give a DICOM series folder as "
                   f"an input of its own", file=sys.stderr)


def _note_skipped_archives(folder: Path) -> None:
    """A folder of volume files is a batch of those files; a .zip beside them is not opened."""
    from medseg.dicom import archives_hint

    hint = archives_hint([p for p in sorted(folder.iterdir())
                          if p.is_file() and not p.name.startswith(".")])
    if hint:
        tqdm.write(f"medseg: note: {folder} holds{hint[1:]}", file=sys.stderr)


def _note_skipped_dicom_files(folder: Path) -> None:
    """A folder of volume files that also holds DICOM files (a mask written into a series
    folder?) is a batch of the volume files: the DICOM files are not read."""
    from medseg.dicom import is_dicom_file

    dicom = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")
             and not p.name.lower().endswith(VOLUME_SUFFIXES) and is_dicom_file(p)]
    if dicom:
        tqdm.write(f"medseg: note: {folder} holds volume files, so its {len(dicom)} DICOM "
                   f"file(s) ({dicom[0].name}, ...) are not read; give a DICOM series a "
                   f"folder of its own", file=sys.stderr)


def output_name(path: Path) -> str:
    """`case_0000.nii.gz` (nnU-Net channel 0) and `case.nii.gz` both give `case.nii.gz`; a
    DICOM folder `case/` or file `case.dcm` (`.dicom`, `.ima`) gives `case.nii.gz` (`.`
    names the folder it is)."""
    stem = strip_image_suffix(Path(os.path.abspath(path)).name)
    dicom_suffix = next((s for s in DICOM_SUFFIXES if stem.lower().endswith(s)), None)
    if dicom_suffix:
        stem = stem[: -len(dicom_suffix)]
    if stem.endswith("_0000"):
        stem = stem[: -len("_0000")]
    return f"{stem}.nii.gz"


def group_channels(paths: list[Path], channels: int,
                   incomplete: list[tuple[Path, MedsegError]] | None = None
                   ) -> list[tuple[Path, ...]]:
    """One tuple of channel files per case. With several channels, files follow nnU-Net's
    naming (`CASE_0000.nii.gz`, `CASE_0001.nii.gz`, ...) and every case needs all of them:
    a case that lacks one, or has one beyond the model's, is refused, or with `incomplete`
    left out and listed there (its first file and why) for the batch to report. A NIfTI
    named otherwise that holds as many volumes as the model's channels (MSD's 4D images) is
    a case of its own."""
    if channels == 1:
        _note_further_channels(paths)
        return [(path,) for path in paths]
    cases: dict[str, dict[int, Path]] = {}
    packed = []  # MSD's way: one 4D NIfTI holding every channel
    for path in paths:
        match = CHANNEL_SUFFIX.fullmatch(strip_image_suffix(path.name))
        if match is None:
            try:
                packed.append(_packed_case(path, channels))
            except MedsegError as problem:
                if incomplete is None:
                    raise
                incomplete.append((path, problem))  # this case fails; the batch goes on
            continue
        case, channel = match.group(1), int(match.group(2))
        files_of_case = cases.setdefault(case, {})
        if channel in files_of_case:
            raise MedsegError(f"{files_of_case[channel]} and {path} are both channel {channel} "
                              f"of case '{case}'")
        files_of_case[channel] = path
    grouped = []
    for case, files in sorted(cases.items()):
        problem = _channel_problem(case, files, channels)
        if problem is None:
            grouped.append(tuple(files[k] for k in range(channels)))
        elif incomplete is None:
            raise problem
        else:
            incomplete.append((files[min(files)], problem))
    return grouped + packed


def _packed_case(path: Path, channels: int) -> tuple[Path]:
    """A file not named CASE_000K, for a model of several channels: one 4D NIfTI holding
    them all, or refused in one line saying what it holds."""
    held = channel_count(path) if path.is_file() else 1
    if held == channels:
        return (path,)
    holds = f"it holds {held} volumes; " if held > 1 else ""
    raise MedsegError(f"the model takes {channels} channels: {holds}name the files CASE_0000 "
                      f"... CASE_{channels - 1:04d}, or give one 4D NIfTI of {channels} volumes "
                      f"per case", path)


def _channel_problem(case: str, files: dict[int, Path], channels: int) -> MedsegError | None:
    for channel, path in sorted(files.items()):
        if channel >= channels:
            return MedsegError(f"channel {channel} of case '{case}' is beyond the model's "
                               f"{channels} channels", path)
    missing = sorted(set(range(channels)) - set(files))
    if missing:
        return MedsegError(f"case '{case}' lacks channel(s) {missing} of {channels}",
                           files[min(files)])
    return None


def _note_further_channels(paths: list[Path]) -> None:
    """`CASE_0001` beside `CASE_0000` is a second channel by nnU-Net's naming, which a model
    of one channel does not take: it is predicted as a case of its own (a name such as
    `patient_0001` alone is just a name)."""
    names = {strip_image_suffix(path.name) for path in paths}
    for path in paths:
        match = CHANNEL_SUFFIX.fullmatch(strip_image_suffix(path.name))
        if match and match.group(2) != "0000" and f"{match.group(1)}_0000" in names:
            tqdm.write(f"medseg: note: {path.name} looks like channel {int(match.group(2))} "
                       f"of case '{match.group(1)}' (nnU-Net's naming), but the model takes one "
                       f"channel: it is predicted as a case of its own", file=sys.stderr)


@dataclass
class PreparedCase:
    """A case ready for the network: its preprocessed image and the grids to map back to."""

    image: torch.Tensor  # (channels, X, Y, Z) on the network grid
    network_affine: np.ndarray
    geometry: Geometry  # the (first) input volume's grid: the mask is written on it
    seg_source: SegSource | None = None  # the DICOM images a SEG of the mask refers to


def prepare_case(plan: Plan, volume: Volume | Path | list[Volume | Path],
                 series_uid: str | None = None, resample_irregular: bool = False
                 ) -> PreparedCase:
    """Read (if given paths) and preprocess one case as training did; only the preprocessed
    image is kept, not the input voxels."""
    channels = volume if isinstance(volume, list) else [volume]
    if len(channels) == 1 and plan.in_channels > 1 and isinstance(channels[0], Path) \
            and channel_count(channels[0]) == plan.in_channels:  # one 4D NIfTI, as MSD's
        channels = read_channels(channels[0], np.float32)
    if len(channels) != plan.in_channels:
        first = channels[0].path if isinstance(channels[0], Volume) else channels[0]
        raise MedsegError(f"the model expects {plan.in_channels} channel(s), got "
                          f"{len(channels)}", first)
    channels = [c if isinstance(c, Volume) else read_volume(c, np.float32, series_uid,
                                                            resample_irregular)
                for c in channels]
    _note_unlike_training(channels, plan)
    geometry = channels[0].geometry
    note = header_note(geometry)  # where the scan lies is open to doubt: say so
    if note:
        tqdm.write(f"medseg: note: {channels[0].path}: {note}", file=sys.stderr)
    refuse_sheared_axes(geometry, channels[0].path, "and the mask goes back onto the input "
                        "grid by permuting, flipping and scaling axes")
    _refuse_beyond_memory(geometry, plan, channels[0].path)
    _note_spacing_far_off(geometry, plan, channels[0].path)
    image = preprocessing(plan, with_label=False)(case_dict(channels))[IMAGE]
    return PreparedCase(image.as_tensor(), image.affine.numpy().astype(np.float64), geometry)


def _note_spacing_far_off(geometry: Geometry, plan: Plan, path: Path | None) -> None:
    """A voxel size many times finer or coarser than the model's (a header in cm or in m, or
    0.01 mm voxels) is resampled all the same, into a few voxels or a huge grid: say so.
    Compared finest to finest and coarsest to coarsest, whatever the file's axis order."""
    spacing, target = sorted(geometry.spacing), sorted(plan.target_spacing)
    if spacing[0] * SPACING_FAR_OFF >= target[0] and spacing[-1] <= target[-1] * SPACING_FAR_OFF:
        return
    where = f"{path}: " if path else ""
    shown = ", ".join(f"{s:.3g}" for s in ras_grid(geometry)[1])  # R, A, S as the plan's
    planned = ", ".join(f"{s:.3g}" for s in plan.target_spacing)
    tqdm.write(f"medseg: note: {where}its voxel spacing ({shown} mm) is more than "
               f"{SPACING_FAR_OFF} times finer or coarser than the model's ({planned} mm): is "
               f"the header right (one in cm or m reads 10 or 1000 times off)?", file=sys.stderr)


def _note_unlike_training(channels: list[Volume], plan: Plan) -> None:
    """An MR given to a CT model (or the reverse, or a blank image) is segmented all the
    same, into nonsense: say why the masks may be so."""
    for volume, modality in zip(channels, plan.modalities, strict=True):
        doubt = intensity_doubt(modality, float(volume.data.min()), float(volume.data.max()))
        if doubt:
            where = f"{volume.path}: " if volume.path else ""
            tqdm.write(f"medseg: note: {where}{doubt} (the model was trained on {modality})",
                       file=sys.stderr)


def _refuse_beyond_memory(geometry: Geometry, plan: Plan, path: Path | None) -> None:
    """Refuse, in one line and before preprocessing, a case that would need more than this
    machine's memory: a header whose spacing is far off (25 mm for 1 mm, say) makes
    resampling to the plan's spacing allocate tens of GB, and a huge scan at a coarse
    model's spacing peaks while it is resampled (13 to 15 bytes per input voxel)."""
    extent = np.prod(np.asarray(geometry.shape, float) * np.asarray(geometry.spacing))
    voxels = float(extent / np.prod(plan.target_spacing))
    needed = voxels * PREDICTION_BYTES_PER_VOXEL * plan.in_channels
    input_voxels = float(np.prod(geometry.shape))
    reading = input_voxels * PREPROCESSING_BYTES_PER_INPUT_VOXEL * plan.in_channels
    memory = physical_memory()
    if voxels > MAX_VOXELS or (memory is not None and needed > memory and needed >= reading):
        spacing = ", ".join(f"{s:g}" for s in geometry.spacing)
        raise MedsegError(f"at the model's spacing this volume would have {voxels:.3g} voxels "
                          f"(about {needed / 2**30:.0f} GB to predict; this machine has "
                          f"{(memory or 0) / 2**30:.0f} GB): is its voxel spacing ({spacing} mm) "
                          f"right?", path)
    if memory is not None and reading > memory:
        raise MedsegError(f"this volume's {input_voxels:.3g} voxels need about "
                          f"{reading / 2**30:.0f} GB to preprocess; this machine has "
                          f"{memory / 2**30:.0f} GB: crop or downsample it first, or predict "
                          f"on a machine with more memory", path)


def predict_volume(predictor: Predictor, volume: Volume | Path | list[Volume | Path],
                   config: PredictConfig) -> np.ndarray:
    """Label map of one case (a read volume, a path, or one of either per channel), on the
    grid of its (first) input volume, as uint8 (uint16 beyond 256 classes)."""
    return predict_prepared(predictor, prepare_case(predictor.plan, volume), config)


def predict_prepared(predictor: Predictor, case: PreparedCase,
                     config: PredictConfig) -> np.ndarray:
    """Sliding window over the foreground box, back to the input grid plane by plane. Memory
    stays bounded (see `medseg.inference`): probabilities a window deep, never a
    classes x volume array."""
    plan = predictor.plan
    maps = axis_maps(case.geometry.affine, case.network_affine, case.geometry.shape)
    groups = predictor.window_groups()
    box = _prediction_box(case.image, _widest_window(plan, groups), config)
    region = case.image[(slice(None), *box)]
    if region.numel() == 0:
        return np.zeros(case.geometry.shape, np.uint8 if plan.num_classes <= 256 else np.uint16)
    shape = tuple(region.shape[1:])
    windows = sum(window_count(shape, tuple(g.plan.patch_size), config.step) for g, _ in groups)
    with _window_bar(windows) as bar:
        streams = [_group_planes(group, region, config, bar) for group, _ in groups]
        planes = streams[0] if len(streams) == 1 else \
            merged_planes(streams, [share for _, share in groups])
        return labels_on_input_grid(planes, tuple(case.image.shape[1:]), box,
                                    plan.num_classes, maps, tuple(case.geometry.shape))


def _group_planes(predictor: Predictor, region: torch.Tensor, config: PredictConfig,
                  bar: tqdm | None) -> Iterator[tuple[int, torch.Tensor]]:
    """The probability planes of one window group over the region."""
    plan, patch = predictor.plan, tuple(predictor.plan.patch_size)
    return stream_probabilities(
        lambda batch: _window_probabilities(predictor, batch, config), region,
        plan.num_classes, patch, config.step,
        window_batch_size(config.sw_batch_size, plan.num_classes, patch),
        accumulation_dtype(plan.num_classes, tuple(region.shape[1:]), patch),
        on_windows=bar.update if bar is not None else None)


def _widest_window(plan: Plan, groups: list[tuple[Predictor, float]]) -> Plan:
    """The plan with the largest patch of every group along each axis: the region the
    windows cover must hold a window of each."""
    widest = [max(sizes) for sizes in zip(*(g.plan.patch_size for g, _ in groups),
                                           strict=True)]
    return dataclasses.replace(plan, patch_size=widest)


@contextlib.contextmanager
def _window_bar(windows: int) -> Iterator[tqdm | None]:
    """A second bar, under the per-case one, for a case of many windows (a large CT takes
    minutes on a CPU, with the case bar standing still); gone once the case is done."""
    if windows < WINDOW_BAR_MIN:
        yield None
        return
    bar = tqdm(total=windows, desc="  windows", unit="window", leave=False,
               dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


def predict_paths(predictor: Predictor, inputs: list[Path], output_dir: Path,
                  config: PredictConfig, overwrite: bool = False, series_uid: str | None = None,
                  resample_irregular: bool = False, shard: tuple[int, int] = (0, 1),
                  dicom_seg: bool = False) -> list[PredictionResult]:
    """Predict each input, writing `<case>.nii.gz` in output_dir (and, with `dicom_seg`,
    `<case>.seg.dcm` for a DICOM input); a failing case is reported and the batch goes on.
    `series_uid` and `resample_irregular` apply to DICOM inputs.
    `shard=(i, n)` takes every n-th case from the i-th, so n processes write each case once.

    The batch streams: the next case is read and preprocessed in a background thread while
    the network runs (unless the running case is large: two large CTs never overlap), and
    each mask is post-processed and written in another."""
    index, count = shard
    incomplete: list[tuple[Path, MedsegError]] = []  # a case without all its channels
    cases = sorted(group_channels(inputs, predictor.plan.in_channels, incomplete),
                   key=lambda files: str(files[0]))
    named = [(output_name(files[0]), files) for files in cases]
    _refuse_clashing_outputs(named, output_dir)
    _refuse_writing_onto_inputs(named, output_dir)
    # shared out by mask name, so that processes given the same files in any order, or spelt
    # otherwise (`/data/b` in one, `b` in another), share them out alike
    mine = set(sorted(name for name, _ in named)[index::count])
    named = [(name, files) for name, files in named if name in mine]
    incomplete = sorted(incomplete, key=lambda item: _shard_order(item[0]))[index::count]
    if dicom_seg:
        _note_inputs_without_seg(named)
    results = _predict_named(predictor, named, output_dir, config, overwrite, shard,
                             partial(_read_case, predictor.plan, series_uid=series_uid,
                                     resample_irregular=resample_irregular,
                                     dicom_seg=dicom_seg), dicom_seg)
    failed = [_failure(path, time.monotonic(), problem) for path, problem in incomplete]
    return results + failed


def _shard_order(path: Path) -> tuple[str, str]:
    """A case's place in the batch: by its mask's name (which no two cases share), the same
    whatever folder spelling the input was given with."""
    return output_name(path), path.name


GOING_ON = "and the same command goes on with the rest"
# with --overwrite the same command starts over, and without it the cases not reached would
# keep an earlier run's masks as finished ones
OVERWRITE_GOING_ON = ("but the same command (--overwrite) predicts every case again; without "
                      "--overwrite it goes on with the rest, yet a case not reached that has "
                      "a mask from an earlier run keeps it, skipped as done")


def predict_cases(predictor: Predictor, cases: Sequence[tuple[str, tuple[Path, ...]]],
                  output_dir: Path, config: PredictConfig, overwrite: bool = False,
                  going_on: str = GOING_ON) -> list[PredictionResult]:
    """Predict dataset cases, (name, channel files) each, into `output_dir/<name>.nii.gz`:
    named by the case, not by its first file (a CSV dataset's scans may all be `ct.nii.gz`
    in folders of their own). Streams as `predict_paths` does; `going_on`: what the note of
    a stopped batch says after "the masks written are kept"."""
    named = [(f"{name}.nii.gz", tuple(files)) for name, files in cases]
    _refuse_clashing_outputs(named, output_dir)
    _refuse_writing_onto_inputs(named, output_dir)
    read = partial(_read_case, predictor.plan, series_uid=None, resample_irregular=False,
                   dicom_seg=False)
    return _predict_named(predictor, named, output_dir, config, overwrite, (0, 1), read, False,
                          going_on)


def _predict_named(predictor: Predictor, named: list[tuple[str, tuple[Path, ...]]],
                   output_dir: Path, config: PredictConfig, overwrite: bool,
                   shard: tuple[int, int], read, dicom_seg: bool, going_on: str = GOING_ON
                   ) -> list[PredictionResult]:
    """The masks of `named` (mask file name, channel files) written into output_dir."""
    check_postprocess_labels(config.largest_component, config.min_component_ml,
                             predictor.plan.labels, "model's")
    if config.tta and not any(g.plan.mirror_axes for g, _ in predictor.window_groups()):
        tqdm.write("medseg: note: --tta has nothing to average: the model was trained without "
                   "mirroring (plan.mirror_axes is empty)", file=sys.stderr)
    # not with shards: another process may be about to write into the folder
    with output_folder(output_dir, remove_if_empty=shard[1] == 1), \
            _one_predictor(output_dir, shard):
        results, todo = _outputs_to_write(named, output_dir, overwrite, dicom_seg)
        bar = tqdm(total=len(named), initial=len(named) - len(todo), desc="predict",
                   unit="case", dynamic_ncols=True)
        finished = [0]  # cases of `todo` done (a mask on disk, or failed)

        def advance() -> None:
            finished[0] += 1
            bar.update(1)

        try:
            _predict_streaming(predictor, todo, read, config, results, advance)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: what is kept, and how to go on
            bar.close()
            tqdm.write(f"medseg: note: stopped after {finished[0]} of the {len(todo)} case(s) "
                       f"to do; the masks written are kept, "
                       f"{OVERWRITE_GOING_ON if overwrite else going_on}", file=sys.stderr)
            raise
        bar.close()
    for result in results:  # the streaming loop's frame, in each traceback, has ended now
        _drop_frame_locals(result.exception if result is not None else None)
    return [r for r in results if r is not None]


PREDICT_LOCK = ".medseg-predict.lock"


@contextlib.contextmanager
def _one_predictor(output_dir: Path, shard: tuple[int, int]) -> Iterator[None]:
    """Refuse a second `medseg predict` writing into the same folder: it took the first one's
    half-written masks for stale leftovers and deleted them, and wrote its own (another
    model's, say) beside or over the first one's. Shards of one batch (`--shard I/N`,
    torchrun) share the folder; the same shard twice does not. The lock files are hidden,
    so no command takes them for masks, and go when the run ends."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        yield
        return
    index, count = shard
    folder_lock = output_dir / PREDICT_LOCK
    with contextlib.ExitStack() as held:
        # called last, once this process's own locks are gone
        held.callback(_remove_if_unused, folder_lock)
        busy = "another `medseg predict` is writing into this folder"
        hold_lock(held, folder_lock, fcntl.LOCK_SH if count > 1 else fcntl.LOCK_EX,
                  MedsegError(f"{busy}; wait for it to end, or choose another --output",
                              output_dir))
        if count > 1:
            hold_lock(held, output_dir / f"{PREDICT_LOCK}.{index}-of-{count}", fcntl.LOCK_EX,
                      MedsegError(f"{busy} as shard {index}/{count}; wait for it to end, or "
                                  f"choose another --output", output_dir), remove=True)
        yield


def _remove_if_unused(path: Path) -> None:
    """Remove the folder's lock file unless another shard still holds it (the last shard to
    end removes it); where the filesystem has no locks, remove it all the same."""
    import fcntl

    with contextlib.ExitStack() as probe, contextlib.suppress(MedsegError):
        if not hold_lock(probe, path, fcntl.LOCK_EX, MedsegError("held"), remove=True):
            path.unlink(missing_ok=True)


def _outputs_to_write(named: list[tuple[str, tuple[Path, ...]]], output_dir: Path,
                      overwrite: bool, dicom_seg: bool = False
                      ) -> tuple[list[PredictionResult | None], list]:
    """Per case (mask name, files), its result where it is settled already (a mask kept, a
    folder in the way) and else a place in the work to do: (position, files, target)."""
    results: list[PredictionResult | None] = [None] * len(named)
    todo = []
    for position, (name, files) in enumerate(named):
        target = output_dir / name
        outputs = [target, seg_path(target)] if dicom_seg and _is_dicom_input(files[0]) \
            else [target]
        for output in outputs:
            _remove_partial_outputs(output)
        in_the_way = next((o for o in outputs if o.exists() and not o.is_file()), None)
        if in_the_way is not None:  # not a mask an earlier run wrote
            results[position] = _failure(files[0], time.monotonic(), MedsegError(
                "a folder (not a mask) lies where this case's mask goes", in_the_way))
        elif not overwrite and all(_finished_output(o) for o in outputs):
            results[position] = PredictionResult(files[0], target, 0.0, skipped=True,
                                                 channel_files=tuple(files))
        else:
            todo.append((position, files, target))
    return results, todo


def _finished_output(path: Path) -> bool:
    """Whether an existing output is a whole file: an empty one (a copy cut short, a full
    disk) is none, nor a mask cut short (a process of a version that wrote in place, killed
    while writing): medseg's own are written whole under another name first."""
    if not path.exists() or path.stat().st_size == 0:
        return False
    if path.name.lower().endswith((".nii", ".nii.gz")):
        problem = _cut_short_nifti(path)
        if problem:
            tqdm.write(f"medseg: note: {path}: {problem}; it is predicted again",
                       file=sys.stderr)
            return False
    return True


def _cut_short_nifti(path: Path) -> str | None:
    """Why a NIfTI mask is not whole, from its header and its size (for .nii.gz the gzip
    trailer's, which holds the length modulo 2^32): not its voxels, so a rerun over hundreds
    of cases stays quick."""
    import nibabel as nib

    try:
        image = nib.load(str(path))
        expected = image.dataobj.offset + int(np.prod(image.shape)) * \
            image.get_data_dtype().itemsize
    except Exception as exc:  # nibabel raises many types for a damaged header
        return f"not a readable NIfTI file ({one_line(str(exc))})"
    if not path.name.lower().endswith(".gz"):
        return None if path.stat().st_size >= expected else "cut short"
    with open(path, "rb") as stream:
        stream.seek(-4, os.SEEK_END)
        stored = int.from_bytes(stream.read(4), "little")
    return None if stored == expected % 2**32 else _gzip_cut_short(path, expected)


def _gzip_cut_short(path: Path, expected: int) -> str | None:
    """The trailer's length is the last gzip member's: a whole file of several members
    (bgzip, `cat a.gz b.gz`), with zero padding or bytes after the voxels (as a .nii may
    have) fails it too, so only reading the stream through tells (rarely needed)."""
    import gzip
    import zlib

    length = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(2**24):
                length += len(chunk)
    except (OSError, EOFError, zlib.error):
        return "cut short (its gzip stream is incomplete)"
    return None if length >= expected else "cut short"


def _read_case(plan: Plan, files: list[Path], series_uid: str | None,
               resample_irregular: bool, dicom_seg: bool) -> PreparedCase:
    """prepare_case, and for a DICOM series whose mask is to be a SEG too, the images the
    SEG refers to (a series it cannot refer to is refused before any prediction)."""
    source = (seg_source(files[0], series_uid, resample_irregular)
              if dicom_seg and _is_dicom_input(files[0]) else None)
    case = prepare_case(plan, list(files), series_uid=series_uid,
                        resample_irregular=resample_irregular)
    case.seg_source = source
    return case


def _is_dicom_input(path: Path) -> bool:
    return _dicom_folder(path) is not None


def _note_inputs_without_seg(named: list[tuple[str, tuple[Path, ...]]]) -> None:
    volumes = [files[0] for _, files in named if not _is_dicom_input(files[0])]
    if volumes:
        tqdm.write(f"medseg: note: --dicom-seg: {len(volumes)} input(s) are volume files, "
                   f"not DICOM series ({volumes[0].name}, ...): they get a NIfTI mask only",
                   file=sys.stderr)


def _predict_streaming(predictor: Predictor, todo: list, read, config: PredictConfig,
                       results: list[PredictionResult | None],
                       advance: Callable[[], None]) -> None:
    """Predict the cases of `todo` into `results`: the next case is read in one thread
    while the network runs, each mask is written in another; `advance` is called as each
    case is done (its mask on disk, or failed)."""
    with ThreadPoolExecutor(1, "medseg-read") as reader, \
            ThreadPoolExecutor(1, "medseg-write") as writer:
        upcoming = reader.submit(read, list(todo[0][1])) if todo else None
        writes = []
        for number, (position, files, target) in enumerate(todo):
            raise_if_stopped()
            started = time.monotonic()
            current = upcoming
            following = list(todo[number + 1][1]) if number + 1 < len(todo) else None
            upcoming = None
            try:
                case = current.result()
                del current  # the future would keep the image alive
                if following is not None and _read_ahead_fits(case, predictor):
                    upcoming = reader.submit(read, following)
                mask = predict_prepared(predictor, case, config)
                # the previous mask is written before this one is queued: when writing (gzip)
                # is slower than predicting, masks do not pile up in memory
                wait([w[-1] for w in writes])
                future = writer.submit(_finish_mask, mask, case.geometry, target, config,
                                       case.seg_source, predictor.plan.labels)
                future.add_done_callback(lambda _: advance())  # as each mask is on disk
                # a failed write's frames hold its mask until the batch ends: not with a full
                # disk failing every one
                future.add_done_callback(lambda done: _drop_frame_locals(
                    None if done.cancelled() else done.exception()))
                writes.append((position, tuple(files), target, started, future))
                del case, mask
            except CASE_ERRORS as exc:
                results[position] = _failure(files[0], started, exc)
                advance()
            if upcoming is None and following is not None:
                upcoming = reader.submit(read, following)
        for position, files, target, started, future in writes:
            try:
                written_at = future.result()
                results[position] = PredictionResult(files[0], target, written_at - started,
                                                     channel_files=files)
            except CASE_ERRORS as exc:
                results[position] = _failure(files[0], started, exc)


def _refuse_clashing_outputs(named: list[tuple[str, tuple[Path, ...]]],
                             output_dir: Path) -> None:
    """Two inputs whose masks would have one name (`a.nii.gz` and `b/a.nrrd`; `A.nii.gz`
    and `a.nii.gz` where the output folder's file system folds case): the second would
    replace the first, or be skipped as done, so refuse before any work."""
    def folded(name: str) -> str:  # such file systems also take both spellings of 'é' as one
        # lower(), not casefold(): their folding maps one letter to one ('ß' stays 'ß')
        return unicodedata.normalize("NFC", name).lower()

    names = [name for name, _ in named]
    # the probe file only where two names fold to one
    fold = len({folded(name) for name in names}) < len(set(names)) \
        and names_fold_case(output_dir)
    first_with: dict[str, tuple[str, Path]] = {}
    for name, files in named:
        key = folded(name) if fold else name
        if key in first_with:
            first_name, first = first_with[key]
            written = name if first_name == name else (
                f"{first_name} and {name}, one file on this file system")
            raise MedsegError(f"inputs {first} and {files[0]} would both be written as "
                              f"{written}; {_clash_advice(first, files[0])}")
        first_with[key] = (name, files[0])


def _clash_advice(first: Path, second: Path) -> str:
    """How to give two inputs of one mask name. Series folders named alike (PATIENT/CT) can
    be given by their parent folders, which are searched through and name the masks."""
    # as given, `CT` (the current folder's) has a parent without a name
    parents = [Path(os.path.abspath(path)).parent.name for path in (first, second)]
    if first.is_dir() and second.is_dir() and all(parents) and parents[0] != parents[1]:
        return (f"give their parent folders instead ({parents[0]}, {parents[1]}, ...): a "
                f"DICOM folder is searched through its subfolders, and the mask is named "
                f"after the folder given")
    return "give them names of their own, or predict them into different --output folders"


def _refuse_writing_onto_inputs(named: list[tuple[str, tuple[Path, ...]]],
                                output_dir: Path) -> None:
    """A mask named as its scan (`case.nii.gz`) in the scan's folder would replace it (with
    --overwrite) or be taken for a finished output: refuse before any work."""
    outputs = {(output_dir / name).resolve() for name, _ in named}
    for path in (path for _, files in named for path in files):
        if path.resolve() in outputs:
            raise MedsegError(f"--output {output_dir} would write a mask over this input; "
                              f"choose another output folder", path)
        # the folder it is listed in and, for a link, the folder of the file it leads to
        folders = {path.parent.resolve(), path.resolve().parent}
        if output_dir.resolve() in folders and path.is_file() \
                and path.name.lower().endswith(VOLUME_SUFFIXES):
            # `case_0000.nii.gz` gets `case.nii.gz` beside it, a scan to the next run
            raise MedsegError(f"--output {output_dir} is this scan's own folder, where its "
                              f"mask would be read as another scan next time; choose "
                              f"another output folder", path)
        if output_dir.resolve() == _dicom_folder(path):
            # the next run would take the folder for one of volume files: the mask its scan
            raise MedsegError(f"--output {output_dir} is this DICOM series' folder, where a "
                              f"mask would be read as the input next time; choose another "
                              f"output folder", path)


def _dicom_folder(path: Path) -> Path | None:
    """The folder of a DICOM input: the series folder itself, or a DICOM file's folder."""
    if path.is_dir():
        return path.resolve()
    if not path.name.lower().endswith(VOLUME_SUFFIXES):
        return path.resolve().parent
    return None


def _read_ahead_fits(case: PreparedCase, predictor: Predictor) -> bool:
    """Whether the next case may be read while this one runs: only when this one's network
    image, probability buffer (see `stream_probabilities`) and float32 input grid are
    small, so that two large CTs never overlap (reading one peaks near its float32 voxels x
    3; a coarse network grid alone would let a 512 x 512 x 600 CT read ahead)."""
    shape, plan = tuple(case.image.shape[1:]), predictor.plan
    buffer = 0
    for group, _ in predictor.window_groups():  # a buffer per window group
        patch = tuple(group.plan.patch_size)
        buffer += accumulator_bytes(plan.num_classes, shape, patch,
                                    accumulation_dtype(plan.num_classes, shape, patch))
    input_grid = int(np.prod(case.geometry.shape)) * 4
    return case.image.numel() * case.image.element_size() + buffer + input_grid \
        <= READ_AHEAD_BYTES


def _finish_mask(mask: np.ndarray, geometry: Geometry, target: Path, config: PredictConfig,
                 source: SegSource | None = None, labels: dict[int, str] | None = None
                 ) -> float:
    """Post-process and write a mask (and its DICOM SEG when `source` is given); returns
    when it was written (time.monotonic)."""
    mask = postprocess(mask, geometry.spacing, config.largest_component,
                       config.min_component_ml)
    seg = build_seg(mask, source, labels or {}) if source is not None else None
    write_mask(mask, geometry, target)
    if seg is not None:
        try:
            write_seg(seg, seg_path(target))
        except BaseException:
            # a case is done when both are written; an older SEG (--overwrite) is not this
            # mask's
            target.unlink(missing_ok=True)
            seg_path(target).unlink(missing_ok=True)
            raise
    return time.monotonic()


def _failure(path: Path, started: float, exc: BaseException) -> PredictionResult:
    """One line naming the case (the error's own file when it has one)."""
    _drop_frame_locals(exc)
    exc = unwrap_transform_error(exc)
    named = isinstance(exc, MedsegError) and exc.path is not None
    message = str(exc) if named else one_line(f"{path}: {exc}")
    tqdm.write(f"medseg: error: {message}", file=sys.stderr)
    return PredictionResult(path, None, time.monotonic() - started, message, exception=exc)


def _drop_frame_locals(exc: BaseException | None) -> None:
    """The result keeps the exception (for --debug's traceback), and its frames would keep
    every array of the failed prediction (the image, probability buffers on the GPU) until
    the batch ends: a case that failed for want of memory made the next ones fail too. The
    traceback keeps its lines; its frames lose their locals (one still running keeps them:
    cleared again once the batch is done)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


def _remove_partial_outputs(target: Path) -> None:
    """Temporary files of this output left by a process that was killed while writing it
    (each case belongs to one shard, so no other process is writing them)."""
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.part*"):
        stale.unlink(missing_ok=True)


def parse_shard(text: str | None) -> tuple[int, int]:
    """'I/N' (0 <= I < N); without it, torchrun's RANK/WORLD_SIZE when set, else (0, 1)."""
    if text is None:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError as exc:
        raise MedsegError(f"--shard must look like I/N, got {text!r}") from exc
    if count < 1 or not 0 <= index < count:
        raise MedsegError(f"--shard {text}: need 0 <= I < N")
    return index, count


def _prediction_box(image: torch.Tensor, plan: Plan, config: PredictConfig
                    ) -> tuple[slice, ...]:
    """The region the windows cover: the foreground box (outside the body for CT, outside the
    nonzero region for MR, where preprocessing leaves every voxel at one value), or all."""
    whole = tuple(slice(0, s) for s in image.shape[1:])
    if not config.crop_foreground:
        return whole
    floors = []
    for norm in plan.normalization:
        if norm["scheme"] == "ct":
            floors.append((norm["clip"][0] - norm["mean"]) / norm["std"])
        elif norm["scheme"] == "zscore_nonzero":
            floors.append(0.0)
        else:
            return whole
    return foreground_box(image, tuple(plan.patch_size),
                          torch.tensor(floors, dtype=image.dtype))


def _window_probabilities(predictor: Predictor, batch: torch.Tensor,
                          config: PredictConfig) -> torch.Tensor:
    """Mean softmax of a batch of windows over the folds (of each run, runs weighing the
    same) and, with TTA, over the mirrored copies of each window along the plan's mirror axes
    (8 for all three; nnU-Net mirrors per window, too)."""
    flips = _mirror_combinations(predictor.plan.mirror_axes) if config.tta else [()]
    autocast_dtype = select_precision(config.precision, predictor.device)
    batch = batch.to(predictor.device).contiguous(memory_format=torch.channels_last_3d)
    total = None
    with torch.no_grad(), torch.autocast(
            predictor.device.type, dtype=autocast_dtype or torch.float32,
            enabled=autocast_dtype is not None):
        for index, model in enumerate(predictor.models):
            for axes in flips:
                probabilities = _softmax_(model(torch.flip(batch, axes) if axes else batch))
                probabilities = torch.flip(probabilities, axes) if axes else probabilities
                if predictor.weights:
                    probabilities.mul_(predictor.weights[index])
                total = probabilities if total is None else total.add_(probabilities)
    copies = len(flips) * (1 if predictor.weights else len(predictor.models))
    return (total if copies == 1 else total.div_(copies)).cpu()


def _mirror_combinations(axes: list[int]) -> list[tuple[int, ...]]:
    """Every subset of the mirror axes, as dimensions of a (B, C, X, Y, Z) batch."""
    dims = [axis + 2 for axis in axes]
    return [combo for size in range(len(dims) + 1)
            for combo in itertools.combinations(dims, size)]


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over classes in place (for many classes the scores of a window batch are
    hundreds of MB; torch.softmax would hold a second copy)."""
    logits = logits.float()
    logits.sub_(logits.amax(dim=1, keepdim=True)).exp_()
    return logits.div_(logits.sum(dim=1, keepdim=True))
