"""`medseg convert-msd TASK OUT`: an MSD task written in nnU-Net v2's raw layout, one file
per channel (as nnU-Net's `nnUNetv2_convert_MSD_dataset`), so that a task whose images hold
several channels in one 4D file (BrainTumour, Prostate) can be trained.

Written here because neither MONAI nor nnU-Net (not a dependency) offers it as a function:
MONAI's DecathlonDataset reads the 4D files as they are. Each channel keeps its voxel values
and the file's header (qform/sform, codes and units): it is read and written with medseg's own
NIfTI reader and writer, as `medseg convert` does."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from medseg.datasets import (
    MsdTask,
    label_id_problem,
    label_names_from_json,
    read_msd_task,
    split_ignore_label,
    strip_image_suffix,
)
from medseg.errors import MedsegError
from medseg.fileio import (
    atomic_path,
    atomic_write_text,
    lock_beside,
    missing_folders,
    refuse_unwritable_place,
)
from medseg.io import (
    channel_count,
    compact_voxels,
    label_grid_mismatch,
    read_channels,
    read_geometry,
    read_label_map,
    read_volume,
    write_as_stored,
    write_volume,
)
from medseg.plan import check_label_values, no_structure, refuse_no_foreground
from medseg.stopping import raise_if_stopped, signals_held

ENDING = ".nii.gz"
TREE = ("imagesTr", "labelsTr", "imagesTs")
STAGING = ".convert-msd.part"  # inside an existing OUT: its one name there
# dataset.json keys copied as they are (nnU-Net v2 keeps these too)
KEPT_KEYS = ("name", "description", "reference", "licence", "release", "tensorImageSize")


@dataclass(frozen=True)
class Conversion:
    """What convert_msd wrote."""

    out: Path
    training: int
    test: int
    channels: int


def convert_msd(task_dir: Path, out: Path, jobs: int = 1) -> Conversion:
    """Write `out` (a new or empty folder) from the MSD task in `task_dir`: imagesTr/
    CASE_000K.nii.gz per channel K, labelsTr/CASE.nii.gz (copied byte for byte),
    imagesTs/CASE_000K.nii.gz, and a dataset.json with channel_names, labels (name -> id),
    numTraining and file_ending. The task's files are only read."""
    if jobs < 1:
        raise MedsegError(f"--jobs must be at least 1, got {jobs}")
    task_dir = Path(task_dir)
    if not (task_dir / "dataset.json").is_file():
        raise MedsegError("no dataset.json: give the MSD task folder (Task01_BrainTumour, ...)",
                          task_dir)
    task = read_msd_task(task_dir, converting=True)
    labels = _label_map(task)
    _refuse_out_in_task(out, task_dir)  # before the lock, written beside OUT
    busy = MedsegError("another `medseg convert-msd` is writing this folder; wait for it to "
                       "end (or stop it) first", out)
    # one conversion at a time: each removes the staging folders that killed ones left
    with lock_beside(out, "medseg-convert-msd-lock", busy):
        _refuse_unusable_out(out)
        return _convert(task, labels, out, jobs)


def _convert(task: MsdTask, labels: dict[int, str], out: Path, jobs: int) -> Conversion:
    """convert_msd's writing, into an `out` checked (and locked) already."""
    channels = len(task.channel_names)
    target = Path(os.path.abspath(out))
    # written under a hidden name and renamed at the end: a conversion killed at any point
    # (SIGKILL, power loss) leaves no half-converted OUT that looks like a dataset. Beside a
    # new OUT; inside an existing empty one (a mount point, a link, a folder whose parent is
    # not the user's), whose entries are then renamed into it, dataset.json last.
    inside = target.is_dir()
    staging = (target / STAGING if inside else
               target.parent / f"{_beside_prefix(target)}{secrets.token_hex(4)}")
    work = _work_items(task, staging, channels)
    _check_label_voxels(task, labels, jobs)
    made = missing_folders(target)
    try:
        staging.mkdir(parents=True)
        for folder in TREE:
            (staging / folder).mkdir()
        _run(work, jobs)
        atomic_write_text(staging / "dataset.json", json.dumps(
            _nnunet_description(task, _labels_by_name(labels)), indent=2,
            ensure_ascii=False) + "\n")
        _move_into_place(staging, target, inside)
    except BaseException:
        _undo(staging, made, target if inside else None)
        raise
    return Conversion(out, len(task.training), len(task.test), channels)


def _move_into_place(staging: Path, target: Path, inside: bool) -> None:
    if not inside:
        try:
            os.rename(staging, target)
        except OSError as exc:  # made meanwhile, by something else
            raise MedsegError(f"cannot put the conversion in place ({exc.strerror or exc})",
                              target) from exc
        return
    with signals_held():  # four renames: not cut between them by Ctrl-C
        for name in (*TREE, "dataset.json"):
            os.replace(staging / name, target / name)
        staging.rmdir()


def _label_map(task: MsdTask) -> dict[int, str]:
    """The task's label map as `medseg check` and training read it (background 0 added when
    unnamed; ids that must run 0, 1, 2, ... without a gap), or a MedsegError."""
    labels = label_names_from_json(task.description)
    problem = label_id_problem(split_ignore_label(labels)[0])
    if problem:
        raise MedsegError(f"label map ids: {problem}; training needs ids 0, 1, 2, ... without "
                          f"a gap", task.description)
    return labels


def _labels_by_name(labels: dict[int, str]) -> dict[str, int]:
    """The label map as nnU-Net v2's: name -> id, id 0 named "background" (nnU-Net refuses a
    dataset.json without that key, whatever an MSD task called its id 0)."""
    return {("background" if label == 0 else name): label
            for label, name in sorted(labels.items())}


def _check_label_voxels(task: MsdTask, labels: dict[int, str], jobs: int) -> None:
    """Refuse a label that `medseg check` and training would refuse: values that are not
    whole numbers, or not in the label map (negative ones included); and a task none of
    whose labels holds a structure voxel. A label without one is noted (check warns of it).
    Every label's voxels are read, `jobs` at a time (gzip runs outside the GIL)."""
    structures, ignore = split_ignore_label(labels)

    def check(label: Path) -> set[int]:
        """The label's values; 'ignore' among them only where it holds no structure."""
        raise_if_stopped()
        volume = read_label_map(label)
        values = check_label_values(volume, structures, ignore)
        if ignore is not None and not values - {0} and (volume.data == ignore).any():
            values.add(ignore)
        return values

    found: set[int] = set()
    empty: list[str] = []
    files = [label for _, _, label in task.training]
    with ThreadPoolExecutor(jobs, "medseg-check") as pool:
        for label, values in zip(files, pool.map(check, files), strict=True):
            found |= values - {ignore}
            if not values - {0, ignore}:
                empty.append(f"{label.name}: {no_structure(values, ignore)}")
    if task.training:  # a task of test images only has nothing to train: not refused here
        refuse_no_foreground(found, task.description.parent)
    if empty:
        more = f"; and {len(empty) - 3} more" if len(empty) > 3 else ""
        print(f"medseg: note: {task.description.parent}: {len(empty)} of {len(files)} training "
              f"labels hold no structure voxel ({'; '.join(empty[:3])}{more}); converted as "
              f"they are", file=sys.stderr)


def _refuse_out_in_task(out: Path, task_dir: Path) -> None:
    """The task folder is only read: nothing is written in it, a lock or a staging folder's
    removal included."""
    resolved, task = out.resolve(), task_dir.resolve()
    if resolved == task or task in resolved.parents:
        raise MedsegError("output folder lies inside the task folder: give one beside it", out)


def _refuse_unusable_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise MedsegError("output folder path is a file", out)
    refuse_unwritable_place(out)  # under a file, a dangling link, a read-only folder
    for leftover in _leftovers(out):
        shutil.rmtree(leftover, ignore_errors=True)
    if out.is_dir() and any(out.iterdir()):
        raise MedsegError("output folder is not empty: give a new folder", out)


def _beside_prefix(target: Path) -> str:
    """The staging folder's name beside a new OUT, less its random part (8 hex digits)."""
    return f".{target.name}.part-"


def _leftovers(out: Path) -> list[Path]:
    """What conversions into `out` killed outright left: the staging folder inside an
    existing OUT, or those beside a new one (each killed try left a whole copy there)."""
    if out.is_dir():
        return [out / STAGING]
    target = Path(os.path.abspath(out))
    name = re.compile(re.escape(_beside_prefix(target)) + "[0-9a-f]{8}")
    try:
        return [p for p in target.parent.iterdir()
                if name.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    except OSError:  # no parent yet: nothing left there
        return []


def _work_items(task: MsdTask, out: Path, channels: int) -> list[tuple]:
    """(kind, case, source, target folder) per case, each image checked for its channel
    count and each label for its grid before anything is written."""
    items = []
    seen: set[str] = set()
    for name, image, label in task.training:
        if name in seen:  # its files would replace the first case's
            raise MedsegError(f"case name {name!r} is listed twice in 'training'", image)
        seen.add(name)
        _check_image(image, channels, task)
        _check_label(label, image)
        items.append(("image", name, image, out / "imagesTr", channels))
        items.append(("label", name, label, out / "labelsTr", channels))
    for image in task.test:
        name = strip_image_suffix(image.name)
        if name in seen:
            raise MedsegError(f"case name {name!r} is listed twice (training and test, or twice "
                              f"in one)", image)
        seen.add(name)
        _check_image(image, channels, task)
        items.append(("image", name, image, out / "imagesTs", channels))
    return items


def _check_image(image: Path, channels: int, task: MsdTask) -> None:
    if not image.is_file():
        raise MedsegError("listed in dataset.json but not found", image)
    found = channel_count(image)
    if found != channels:
        raise MedsegError(f"holds {found} volume(s), and dataset.json's 'modality' names "
                          f"{channels} channel(s) ({', '.join(task.channel_names)})", image)


def _check_label(label: Path, image: Path) -> None:
    if not label.is_file():
        raise MedsegError("listed in dataset.json but not found", label)
    if channel_count(label) != 1:
        raise MedsegError("a label map must hold one volume", label)
    label_grid, image_grid = read_geometry(label), read_geometry(image, channels=True)
    mismatch = label_grid_mismatch(label_grid, image_grid)
    if mismatch is not None:
        raise MedsegError(f"not on the grid of its image {image.name}: {mismatch}", label)


def _run(work: list[tuple], jobs: int) -> None:
    """Convert every item, `jobs` at a time (gzip runs outside the GIL: threads suffice)."""
    bar = tqdm(total=len(work), desc="convert", unit="file", dynamic_ncols=True)
    pool = ThreadPoolExecutor(jobs, "medseg-convert")
    try:
        for _ in pool.map(_convert_item, work):
            bar.update(1)
    finally:  # on an error or Ctrl-C, the items not started are dropped, not run
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()


def _convert_item(item: tuple) -> None:
    raise_if_stopped()
    kind, name, source, folder, channels = item
    if kind == "label":
        target = folder / f"{name}{ENDING}"
        if source.name.lower().endswith(ENDING):
            with atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)
        else:  # a .nii label: written compressed, as the layout's file_ending says
            write_volume(compact_voxels(read_volume(source, dtype=None)),
                         read_geometry(source), target, label_map=True)
        return
    volumes = read_channels(source, dtype=None) if channels > 1 else \
        [read_volume(source, dtype=None)]
    for channel, volume in enumerate(volumes):
        write_as_stored(volume, folder / f"{name}_{channel:04d}{ENDING}")


def _nnunet_description(task: MsdTask, labels: dict[str, int]) -> dict:
    description = {key: task.data[key] for key in KEPT_KEYS if key in task.data}
    description.update({
        "channel_names": {str(k): name for k, name in enumerate(task.channel_names)},
        "labels": labels,
        "numTraining": len(task.training),
        "file_ending": ENDING,
        # the task folder's name (as given: "." is named), not its path, which would name
        # the converting machine's folders wherever the dataset is shared
        "converted_from": Path(os.path.abspath(task.description)).parent.name,
    })
    return description


def _undo(staging: Path, made: list[Path], emptied: Path | None) -> None:
    """Nothing half-converted left: the staging folder removed, `emptied` (an OUT that
    existed empty, which a failed final rename may have reached) emptied again, and the
    folders this conversion made (OUT's parents) removed, those still empty."""
    shutil.rmtree(staging, ignore_errors=True)
    if emptied is not None and emptied.is_dir():
        _empty(emptied)
    for folder in made:
        with contextlib.suppress(OSError):  # not made after all, or something else put there
            folder.rmdir()


def _empty(folder: Path) -> None:
    for child in folder.iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def print_conversion(result: Conversion) -> None:
    print(f"wrote {result.out}: {result.training} training and {result.test} test case(s), "
          f"{result.channels} channel(s) each, in nnU-Net's layout; train on it with "
          f"dataset.path: {result.out}", file=sys.stdout)
