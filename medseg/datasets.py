"""Case records from dataset layouts (MSD, nnU-Net v2 raw, folder pairs, CSV) and seeded folds.

`list_dataset` reads a dataset description and lists every case with the files it expects,
present or not (what `medseg check` reports on); `load_dataset` also requires every listed
file to exist (what training needs).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import re
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path

from medseg.errors import MedsegError
from medseg.fileio import read_user_text

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
LAYOUTS = ("msd", "nnunet", "folders", "csv")
CSV_NAME = "dataset.csv"
_OTHER_CSV_SEPARATORS = (";", "\t", "|")  # a header holding one was saved with another
# a channel's modality decides its normalization: CT and MR as medseg plans them, and
# nnU-Net's channel names that ask for none or for a fixed rescaling
MODALITIES = ("CT", "MR", "noNorm", "rescale_to_0_1", "rgb_to_0_1")
_NORMALIZING_NAMES = {m.casefold(): m for m in MODALITIES if m != "MR"}
CSV_RESERVED = ("case", "label")
# keys of an MSD or nnU-Net dataset.json other than its label table
DESCRIPTION_KEYS = {"training", "channel_names", "modality", "file_ending", "numTraining"}
_WHOLE_NUMBER = re.compile(r"-?[0-9]+")  # ASCII digits: "²".isdigit() is true, int("²") fails
_CHANNEL_NUMBER = re.compile(r"[0-9]+")  # no sign: int("-0") is channel 0 too
# nnU-Net's name for the label of voxels no one annotated (sparse labels): they are left out
# of the loss, of validation and of the scores, and no network output stands for them
IGNORE_NAME = "ignore"


@dataclass(frozen=True)
class Case:
    """One labelled (or unlabelled) case: one image per channel (a volume file or a DICOM
    series folder), at most one label file."""

    name: str
    images: tuple[Path, ...]
    label: Path | None = None

    def __post_init__(self) -> None:
        # one spelling of accented names: macOS writes 'café' decomposed (NFD), most other
        # tools composed (NFC); splits name cases the same way (read_splits)
        object.__setattr__(self, "name", unicodedata.normalize("NFC", self.name))


@dataclass(frozen=True)
class Dataset:
    """A collection of cases plus what it says about itself."""

    root: Path
    cases: tuple[Case, ...]
    labels: dict[int, str]  # the structures and background; never 'ignore'
    modalities: tuple[str, ...]  # one per channel: one of MODALITIES
    labels_from: Path | None = None  # the file that named the labels (dataset.json, ...)
    ignore_label: int | None = None  # the id of unannotated voxels (nnU-Net's 'ignore')

    def __post_init__(self) -> None:
        # a map that names 'ignore' (dataset.json, labels.json, a workflow's dataset.labels)
        # gives its id here and the structures to `labels`
        structures, ignore = split_ignore_label(self.labels)
        if ignore is not None:
            object.__setattr__(self, "labels", structures)
            object.__setattr__(self, "ignore_label", ignore)


@dataclass(frozen=True)
class Listing:
    """A dataset as its description lists it: cases whose files may be missing, and files
    found without a partner (an image without label, or the reverse), with the reason."""

    dataset: Dataset
    layout: str
    description: Path | None  # dataset.json or the CSV file; None for folder pairs
    orphans: tuple[tuple[Path, str], ...] = ()
    clashes: tuple[tuple[Path, str], ...] = ()  # two files of one case (`a.nii`, `a.nii.gz`)
    # the description's numTraining against the cases found: (severity, message) or None
    count_mismatch: tuple[str, str] | None = None


def load_dataset(
    path: str | Path, layout: str = "auto", modality: str = "auto",
    labels: dict[int, str] | None = None,
) -> Dataset:
    """Read a dataset description; every listed file must exist."""
    # a workflow's dataset.labels replaces the description's map, which need not be one
    # medseg can read (nnU-Net's regions or 'ignore', over label files of plain ids)
    listing = list_dataset(path, layout, read_labels=not labels)
    dataset = listing.dataset
    _require_files(listing)
    _refuse_repeated_names(listing)
    _refuse_label_as_image(listing)
    if labels:  # background may go unnamed in a workflow's dataset.labels
        dataset = Dataset(dataset.root, dataset.cases, {0: "background", **labels},
                          dataset.modalities)
    if modality != "auto":
        dataset = replace(dataset, modalities=tuple(modality for _ in dataset.modalities))
    if not dataset.cases:
        raise MedsegError("the dataset lists no training cases", dataset.root)
    return dataset


def list_dataset(path: str | Path, layout: str = "auto", read_labels: bool = True) -> Listing:
    """Read a dataset description without requiring its files to exist; a description that
    cannot be read (no folder, bad JSON or CSV, unknown layout) raises MedsegError. Without
    `read_labels` its label map is left unread (empty)."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        if layout not in ("auto", "csv"):
            raise MedsegError(f"a CSV file is the 'csv' layout, not '{layout}'", path)
        return _list_csv(path, read_labels)
    root = path.parent if path.is_file() and path.name == "dataset.json" else path
    if not root.is_dir():
        raise MedsegError("not a dataset folder, dataset.json or CSV file" if root.exists()
                          else "dataset folder not found", root)
    root = Path(os.path.abspath(root))
    layout = _detect_layout(root) if layout == "auto" else layout
    if layout == "msd":
        return _list_msd(root, read_labels)
    if layout == "nnunet":
        return _list_nnunet(root, read_labels)
    if layout == "folders":
        return _list_folder_pairs(root, read_labels)
    if layout == "csv":
        return _list_csv(root / CSV_NAME, read_labels)
    raise MedsegError(f"unknown dataset layout '{layout}' (expected one of "
                      f"{', '.join(LAYOUTS)} or auto)", root)


def label_names_from_json(path: str | Path) -> dict[int, str]:
    """Label id -> name from an MSD or nnU-Net dataset.json, or a plain labels.json (0 is
    "background" unless the file names it)."""
    path = Path(path)
    data = _read_json(path)
    # a dataset description holds its table under "labels"; a labels.json is the table
    describes_dataset = isinstance(data, dict) and bool(DESCRIPTION_KEYS & set(data))
    table = data.get("labels", None if describes_dataset else data) \
        if isinstance(data, dict) else None
    if not isinstance(table, dict) or not table:
        raise MedsegError("no 'labels' mapping found", path)
    if any(isinstance(value, list | tuple) for value in table.values()):
        raise MedsegError("region-based labels (a name mapped to a list of ids, nnU-Net's "
                          "regions) are not supported: map each name to one id (or name the "
                          "ids in a workflow's dataset.labels)", path)
    odd_keys = [key for key in table if not _WHOLE_NUMBER.fullmatch(str(key))]
    if not odd_keys:
        pairs = [(int(key), name) for key, name in table.items()]
    elif len(odd_keys) < len(table) and not any(map(_an_id, table.values())):
        # an id -> name table (its values are names) with keys that are not ids
        raise MedsegError(f"label ids must be whole numbers; "
                          f"{', '.join(repr(key) for key in odd_keys)} is not", path)
    else:  # nnU-Net: name -> id
        pairs = [(_label_id(value, name, path), name) for name, value in table.items()]
    ids = [label for label, _ in pairs]
    repeated_ids = sorted({label for label in ids if ids.count(label) > 1})
    if repeated_ids:
        raise MedsegError(f"label ids must be unique; repeated: "
                          f"{', '.join(map(str, repeated_ids))}", path)
    not_text = [(label, name) for label, name in pairs if not isinstance(name, str)]
    if not_text:  # str() would name a structure "None", "True" or "{'name': 'liver'}"
        raise MedsegError(f"label names must be text; id {not_text[0][0]} is named "
                          f"{json.dumps(not_text[0][1])}", path)
    labels = {label: str(name) for label, name in pairs}
    problem = _background_problem(labels)
    labels = {0: "background", **labels}  # a labels.json may leave background unnamed
    problem = problem or label_name_problem(labels) or ignore_label_problem(labels)
    if problem:
        raise MedsegError(problem, path)
    return labels


def _background_problem(labels: dict[int, str]) -> str | None:
    """Training takes id 0 as background whatever its name: a map naming another id
    'background' would train and score that id as a structure, and 0's voxels as none."""
    misplaced = [k for k, name in labels.items()
                 if k != 0 and name.strip().casefold() == "background"]
    if not misplaced:
        return None
    return f"'background' must be label 0 (as nnU-Net requires), not {misplaced[0]}"


def split_ignore_label(labels: dict[int, str]) -> tuple[dict[int, str], int | None]:
    """The structures (with background) and the id named 'ignore' (None without one)."""
    ignore = next((k for k, name in labels.items() if name == IGNORE_NAME), None)
    if ignore is None:
        return labels, None
    return {k: name for k, name in labels.items() if k != ignore}, ignore


def ignore_label_problem(labels: dict[int, str]) -> str | None:
    """Why a map's 'ignore' label cannot be one (None when it can, or there is none):
    nnU-Net's rule, the id one past every structure's, keeps the network's classes 0..N-1."""
    structures, ignore = split_ignore_label(labels)
    if ignore is None:
        return None
    highest = max((k for k in structures if k > 0), default=None)
    if highest is None:
        return "the label map names 'ignore' but no structure"
    if ignore != highest + 1:
        return (f"'ignore' must be the id one past the structures' ({highest + 1}, as "
                f"nnU-Net requires), not {ignore}")
    return None


def _map_of(path: Path, read_labels: bool) -> dict[int, str]:
    return label_names_from_json(path) if read_labels else {}


def label_name_problem(labels: dict[int, str]) -> str | None:
    """Why these names cannot name the structures (None when they can): two ids of one name
    would be scored, validated and reported as one structure, an empty name as none."""
    names = [str(name).strip() for name in labels.values()]
    if "" in names:
        empty = sorted(k for k, name in labels.items() if not str(name).strip())
        return f"label names must not be empty (id {', '.join(map(str, empty))})"
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        return f"label names must be unique; repeated: {', '.join(repeated)}"
    return None


def label_id_problem(ids) -> str | None:
    """Why training cannot take these label ids as its classes 0..N-1 (None when it can):
    a negative id, or a gap (BraTS's 0, 1, 2, 4 would train a class 3 no voxel has, and
    masks holding it). Works from the ids present, whatever their size."""
    present = sorted({int(i) for i in ids} | {0})
    negative = [i for i in present if i < 0]
    if negative:
        return f"{_ids_text(negative)} negative"
    gaps = [(a + 1, b - 1) for a, b in zip(present, present[1:], strict=False) if b > a + 1]
    if gaps:
        return f"{_ids_text(gaps)} missing from {_ids_text(present)}"
    return None


def id_past_a_gap(ids) -> int | None:
    """The id that makes label_id_problem object: the lowest negative one, else the lowest
    one above a gap (None when there is no problem)."""
    present = sorted({int(i) for i in ids} | {0})
    if present[0] < 0:
        return present[0]
    return next((b for a, b in zip(present, present[1:], strict=False) if b > a + 1), None)


def _ids_text(items: list, most: int = 12) -> str:
    """Ids, or (first, last) runs of ids, as text: at most `most` of them."""
    texts = [_run_text(*item) if isinstance(item, tuple) else str(item) for item in items]
    more = f", ... ({len(texts) - most} more)" if len(texts) > most else ""
    return ", ".join(texts[:most]) + more


def _run_text(first: int, last: int) -> str:
    if first == last:
        return str(first)
    return f"{first}, {last}" if last == first + 1 else f"{first}-{last}"


def _an_id(value: object) -> bool:
    """Whether a table value reads as a label id (nnU-Net's name -> id), not a name."""
    return (isinstance(value, int | float) and not isinstance(value, bool)) or (
        isinstance(value, str) and bool(_WHOLE_NUMBER.fullmatch(value.strip())))


def _label_id(value: object, name: str, path: Path) -> int:
    """An nnU-Net id: a whole number (2 or "2", not 1.9, true, NaN or "--1")."""
    if isinstance(value, str) and _WHOLE_NUMBER.fullmatch(value.strip()):
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    raise MedsegError(f"label ids must be integers; '{name}' is {value!r}", path)


def make_splits(case_names: list[str], n_folds: int = 5, seed: int = 0,
                source: str | Path | None = None) -> list[dict]:
    """K seeded folds, as nnU-Net's splits_final.json: [{'train': [...], 'val': [...]}].
    `source` (the dataset) is named in the refusal when there are too few cases."""
    if n_folds < 2:
        raise MedsegError(f"train.folds must be at least 2, got {n_folds}")
    refuse_too_few_cases(len(case_names), source)
    if len(case_names) < n_folds:
        raise MedsegError(f"{len(case_names)} labelled cases cannot make {n_folds} folds; "
                          f"set train.folds to at most {len(case_names)} (--set "
                          f"train.folds={len(case_names)})", source)
    names = sorted(case_names)
    random.Random(seed).shuffle(names)
    folds = [sorted(names[k::n_folds]) for k in range(n_folds)]
    return [
        {"train": sorted(n for j, f in enumerate(folds) if j != k for n in f), "val": folds[k]}
        for k in range(n_folds)
    ]


def refuse_too_few_cases(count: int, source: str | Path | None) -> None:
    """Training takes no dataset of fewer than 2 cases, whether its folds are seeded or
    given by a splits file (one of a single case could only validate on nothing)."""
    if count < 2:
        raise MedsegError(f"{count} labelled case(s): cross-validation needs at least 2",
                          source)


def read_splits(path: Path) -> list[dict]:
    """A run's splits.json (nnU-Net's splits_final.json shape), checked: a list of folds,
    each with a non-empty `train` and a `val` list of case names that share no case."""
    data = _read_json(path)
    if not isinstance(data, list) or not data:
        raise MedsegError('expected a list of folds [{"train": [...], "val": [...]}, ...]',
                          path)
    for number, fold in enumerate(data):
        if not (isinstance(fold, dict) and all(
                isinstance(fold.get(part), list)
                and all(isinstance(name, str) for name in fold[part])
                for part in ("train", "val"))):
            raise MedsegError(f"fold {number} needs 'train' and 'val' lists of case names", path)
        if not fold["train"]:
            raise MedsegError(f"fold {number} has no training case", path)
        for part in ("train", "val"):  # spelled as Case spells names
            fold[part] = [unicodedata.normalize("NFC", name) for name in fold[part]]
            repeated = sorted({name for name in fold[part] if fold[part].count(name) > 1})
            if repeated:  # trained on twice as often, or scored twice in the mean
                raise MedsegError(f"fold {number} lists case(s) {', '.join(repeated[:3])} "
                                  f"twice in '{part}'", path)
        shared = sorted(set(fold["train"]) & set(fold["val"]))
        if shared:
            raise MedsegError(f"fold {number} validates on its own training case(s) "
                              f"{', '.join(shared[:3])}", path)
    return data


def file_name_safe(name: str) -> bool:
    """Whether a case name can name a file of its own (crossval's predictions/NAME.nii.gz):
    no path separator, no leading dot ('..', a hidden file), not empty."""
    return bool(name) and not name.startswith(".") and not any(c in name for c in "/\\\0")


def strip_image_suffix(name: str) -> str:
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def leaves_folder(path: Path, root: Path) -> bool:
    """True when a listed path points outside the dataset folder (`..` or absolute)."""
    return not Path(os.path.normpath(path)).is_relative_to(os.path.normpath(root))


def _require_files(listing: Listing) -> None:
    for case in listing.dataset.cases:
        for path in (*case.images, case.label):
            if path is not None and not listed_exists(path):
                where = listing.description or path
                link = " (a link to a file that is not there)" if listed_link(path) else ""
                raise MedsegError(f"listed in {where.name} but missing: {path}{link}"
                                  f"{_nnunet_v1_hint(listing, path)}", where)
    for path, reason in listing.clashes:
        raise MedsegError(reason, path)
    if listing.count_mismatch and listing.count_mismatch[0] == "error":
        raise MedsegError(listing.count_mismatch[1], listing.description)
    for path, reason in listing.orphans:
        if not is_spare_label(path):  # a spare label is only reported
            raise MedsegError(reason, path)


def is_spare_label(orphan: Path) -> bool:
    """Whether a file found without its partner is a label (no image to train on: left out)
    rather than an image (a label gone missing: refused)."""
    return orphan.parent.name not in ("images", "imagesTr")


# check's finding and training's refusal of a channel holding a copy of the label's voxels
LABEL_AS_CHANNEL = ("an image channel with the same voxels as the case's label: the network "
                    "would be given the answer; list label files in the label column only")


def _refuse_label_as_image(listing: Listing) -> None:
    """A case whose label file is one of its image channels too (a CSV column of label
    files, a link to it): the network would be given the answer to copy, and validation
    would score the copy. (`medseg check` also finds a copy of the label's voxels.)"""
    for case in listing.dataset.cases:
        for image in case.images:
            if case.label is not None and _same_file(image, case.label):
                raise MedsegError(f"case '{case.name}' lists its label {case.label.name} as an "
                                  f"image channel too ({image}): the network would be given the "
                                  f"answer; list label files as labels only",
                                  listing.description or image)


def _same_file(one: Path, other: Path) -> bool:
    try:
        return os.path.samefile(one, other)
    except OSError:  # a folder not listable, a name too long: not one file that can be told
        return False


def _nnunet_v1_hint(listing: Listing, missing: Path) -> str:
    if listing.layout == "msd" and listed_exists(_channel_0_file(missing)):
        return " (the files are named CASE_0000, as nnU-Net's: set dataset.layout: nnunet)"
    return ""


def _channel_0_file(image: Path) -> Path:
    """nnU-Net's name for channel 0 of a listed image: `case.nii.gz` -> `case_0000.nii.gz`
    (nnU-Net v1's dataset.json lists the first for files named as the second)."""
    stem = strip_image_suffix(image.name)
    return image.parent / f"{stem}_0000{image.name[len(stem):]}"


def _refuse_repeated_names(listing: Listing) -> None:
    """Two cases of one name would share a split entry: one would never be trained on, and a
    validation case could be a training case."""
    first: dict[str, Case] = {}
    for case in listing.dataset.cases:
        if case.name in first:
            raise MedsegError(f"cases {first[case.name].images[0]} and {case.images[0]} are "
                              f"both named '{case.name}'; case names must be unique (a CSV "
                              f"can name them in a 'case' column)", listing.description)
        first[case.name] = case


def _detect_layout(root: Path) -> str:
    description = root / "dataset.json"
    if description.is_file():
        data = _read_description(description)
        if "training" not in data:
            return "nnunet"
        return "nnunet" if _nnunet_v1_files(root, data["training"]) else "msd"
    folders = (root / "images").is_dir() and (root / "labels").is_dir()
    # a dataset.csv of cases says more than the folders do (channels, names); one of other
    # columns beside the folders (the patients' age and sex) is not a description
    if (root / CSV_NAME).is_file() and (not folders or _lists_cases(root / CSV_NAME)):
        return "csv"
    if folders:
        return "folders"
    raise MedsegError(f"no dataset.json, no images/ + labels/ folders and no {CSV_NAME}", root)


def _lists_cases(path: Path) -> bool:
    """Whether a CSV's header has the columns of the csv layout (image and label), separated
    by commas or by another separator (Excel's ';', which reading it as the dataset then
    refuses, saying so): passed over, the channels it lists were lost unsaid. Its rows are
    checked when it is read as the dataset; one that is not UTF-8 is refused when its first
    line, read byte for byte, names those columns (a table of the patients' age in Latin-1
    beside the folders is left to them)."""
    try:
        text = read_user_text(path)
    except MedsegError as exc:
        if not isinstance(exc.__cause__, UnicodeDecodeError):
            raise
        with open(path, "rb") as stream:
            first_line = stream.readline().decode("latin-1")
        if not _names_case_columns([first_line]):
            return False
        raise
    try:
        header = next(csv.reader(io.StringIO(text, newline="")), [])
    except csv.Error as exc:
        raise _unreadable_csv(exc, path) from exc
    return _names_case_columns(header)


def _names_case_columns(header: list[str]) -> bool:
    split = f"[{re.escape(',' + ''.join(_OTHER_CSV_SEPARATORS))}]"
    names = {name.strip() for cell in header for name in re.split(split, cell)}
    return {"image", "label"} <= names


def _nnunet_v1_files(root: Path, entries: object) -> bool:
    """Whether an MSD-style `training` list names files that exist only as nnU-Net v1's
    `_0000` channel files."""
    if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
        return False
    listed = entries[0].get("image")
    if not isinstance(listed, str):
        return False
    image = Path(os.path.normpath(root / listed))
    return not listed_exists(image) and listed_exists(_channel_0_file(image))


def _read_json(path: Path) -> object:
    if not path.is_file():
        raise MedsegError("a folder, not a JSON file" if path.is_dir() else "file not found",
                          path)
    try:
        return json.loads(read_user_text(path), object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise MedsegError(f"not valid JSON ({exc})", path) from exc
    except _RepeatedKey as exc:
        raise MedsegError(str(exc), path) from exc


def _read_description(path: Path) -> dict:
    """A dataset.json, which is one JSON object."""
    data = _read_json(path)
    if not isinstance(data, dict):
        raise MedsegError(f"a dataset description must be one JSON object {{...}}, got "
                          f"{type(data).__name__ if data is not None else 'null'}", path)
    return data


class _RepeatedKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json keeps only the last value of a key written twice in one object, silently."""
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise _RepeatedKey(f"key '{repeated[0]}' appears twice in one object")
    return dict(pairs)


def _modality_name(text: str) -> str:
    """nnU-Net's channel names that choose a normalization (in any case); any other name
    (MRI, T2, FLAIR, zscore, ...) is a z-scored MR channel."""
    return _NORMALIZING_NAMES.get(str(text).strip().casefold(), "MR")


def _listed(root: Path, entry: object, description: Path) -> Path:
    """A path as listed in a description: relative to the dataset folder, normalized without
    following links (so that `medseg check` sees where it really points)."""
    if not isinstance(entry, str) or not entry.strip():
        raise MedsegError(f"expected a file path, got {entry!r}", description)
    return Path(os.path.normpath(root / entry.strip()))


@dataclass(frozen=True)
class MsdTask:
    """An MSD task's dataset.json as listed: (case, image, label) per training entry, the
    test images, and the channel names in channel order (MSD's 'modality')."""

    description: Path
    data: dict
    training: tuple[tuple[str, Path, Path], ...]
    test: tuple[Path, ...]
    channel_names: tuple[str, ...]


def read_msd_task(root: Path, converting: bool = False) -> MsdTask:
    """Parse an MSD task's dataset.json; listed files are not checked here. `converting`:
    for convert-msd, whose way out for an nnU-Net dataset is not a workflow key."""
    description = root / "dataset.json"
    data = _read_description(description)
    entries = data.get("training")
    if not isinstance(entries, list):
        way_out = ("it is in nnU-Net's layout already: nothing to convert, train on it as it "
                   "is" if converting else "set dataset.layout to nnunet or auto")
        hint = f" (an nnU-Net dataset? {way_out})" if "channel_names" in data else ""
        raise MedsegError(f"'training' must be a list of {{image, label}}{hint}", description)
    training = []
    for entry in entries:
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise MedsegError(f"training entry {entry!r} needs 'image' and 'label'", description)
        image = _listed(root, entry["image"], description)
        training.append((strip_image_suffix(image.name), image,
                         _listed(root, entry["label"], description)))
    # null is a writer's "no test set" (Python's None): MSD's own files write []
    test = data.get("test", [])
    test = [] if test is None else test
    if not isinstance(test, list):
        raise MedsegError("'test' must be a list of image paths", description)
    modality = data.get("modality", {"0": "MR"})
    if not isinstance(modality, dict):
        raise MedsegError("'modality' must map channel numbers to names", description)
    names = tuple(_channel_name(modality, k, "modality", description)
                  for k in _channel_numbers(modality, "modality", description))
    # MONAI's datalists (load_decathlon_datalist) write a test entry as {"image": path}
    test = [entry["image"] if isinstance(entry, dict) and "image" in entry else entry
            for entry in test]
    return MsdTask(description, data, tuple(training),
                   tuple(_listed(root, entry, description) for entry in test), names)


def _list_msd(root: Path, read_labels: bool = True) -> Listing:
    task = read_msd_task(root)
    description = task.description
    cases = [Case(name, (image,), label) for name, image, label in task.training]
    modalities = tuple(_modality_name(name) for name in task.channel_names)
    if len(modalities) > 1:
        raise MedsegError(f"'modality' lists {len(modalities)} channels, which MSD stores "
                          f"together in 4D images: write the task in nnU-Net's layout, one "
                          f"file per channel, with `medseg convert-msd {root} NEW_FOLDER`, and "
                          f"train on that", description)
    dataset = Dataset(root, tuple(cases), _map_of(description, read_labels), modalities,
                      description)
    # MSD's own tools never check it, and a trimmed 'training' list is a dataset too
    mismatch = _count_mismatch(task.data, len(cases), "'training' lists")
    return Listing(dataset, "msd", description,
                   count_mismatch=("warning", mismatch) if mismatch else None)


def _list_nnunet(root: Path, read_labels: bool = True) -> Listing:
    description = root / "dataset.json"
    data = _read_description(description)
    # nnU-Net v1's 'modality' only without v2's key: an empty channel_names is no channel
    key = "channel_names" if "channel_names" in data else "modality"
    channels = data.get(key)
    if key not in data:
        raise MedsegError(f"'channel_names' is missing{_folder_pairs_hint(root)}", description)
    if not isinstance(channels, dict):
        raise MedsegError(f"'{key}' must map channel numbers (\"0\", \"1\", ...) to "
                          f"names", description)
    ending = data.get("file_ending", ".nii.gz")
    if not isinstance(ending, str):
        raise MedsegError(f"'file_ending' must be text such as \".nii.gz\", not "
                          f"{json.dumps(ending)}", description)
    if not ending.startswith("."):
        raise MedsegError(f"'file_ending' must start with a dot ('.{ending}'), not {ending!r}",
                          description)
    channel_ids = _channel_numbers(channels, key, description)
    modalities = tuple(_modality_name(_channel_name(channels, k, key, description))
                       for k in channel_ids)
    if "dataset" in data:  # nnU-Net v2's own list of each case's files, used instead of a scan
        cases = _nnunet_listed_cases(data["dataset"], root, len(channel_ids), description)
        dataset = Dataset(root, cases, _map_of(description, read_labels), modalities,
                          description)
        mismatch = _count_mismatch(data, len(cases), "'dataset' lists")
        return Listing(dataset, "nnunet", description,
                       count_mismatch=("error", mismatch) if mismatch else None)
    _refuse_unmatched_ending(root / "labelsTr", ending, description)
    cases = []
    for label in _visible(sorted((root / "labelsTr").glob(f"*{ending}"))):
        name = label.name[: -len(ending)]
        images = tuple(root / "imagesTr" / f"{name}_{int(k):04d}{ending}" for k in channel_ids)
        cases.append(Case(name, images, label))
    orphans = _nnunet_strays(root / "imagesTr", ending, {c.name for c in cases},
                             [int(k) for k in channel_ids])
    dataset = Dataset(root, tuple(cases), _map_of(description, read_labels), modalities,
                      description)
    # nnU-Net refuses it too: a case whose files lost their file_ending would drop out
    mismatch = _count_mismatch(data, len(cases), f"labelsTr holds {ending} labels for")
    orphans += _off_ending(root / "labelsTr", ending)
    return Listing(dataset, "nnunet", description, orphans,
                   count_mismatch=("error", mismatch) if mismatch else None)


def _folder_pairs_hint(root: Path) -> str:
    """A dataset.json of other content (a name, a description) beside images/ and labels/
    made `auto` read the folder as nnU-Net's."""
    if (root / "images").is_dir() and (root / "labels").is_dir() \
            and not (root / "imagesTr").is_dir():
        return (" (images/ and labels/ beside it: a folder-pairs dataset? set dataset.layout "
                "to folders, or give check --layout folders)")
    return ""


def _nnunet_listed_cases(listed, root: Path, channels: int, description: Path
                         ) -> tuple[Case, ...]:
    """The cases of dataset.json's 'dataset' entry ({case: {"images": [...], "label": ...}}),
    paths relative to the dataset folder unless absolute, environment variables expanded, as
    nnU-Net v2 reads them."""
    if not isinstance(listed, dict):
        raise MedsegError("'dataset' must map case names to {\"images\": [...], \"label\": "
                          "...}", description)
    cases = []
    for name, entry in sorted(listed.items()):
        images = entry.get("images") if isinstance(entry, dict) else None
        label = entry.get("label") if isinstance(entry, dict) else None
        if not (isinstance(images, list) and all(isinstance(i, str) for i in images)
                and isinstance(label, str)):
            raise MedsegError(f"'dataset' entry {name!r} needs \"images\" (a list of paths) and "
                              f"\"label\" (a path)", description)
        if not all(path.strip() for path in (*images, label)):  # the dataset folder itself
            raise MedsegError(f"'dataset' entry {name!r} gives an empty path", description)
        if len(images) != channels:
            raise MedsegError(f"'dataset' entry {name!r} lists {len(images)} image(s) for "
                              f"{channels} channel(s) of channel_names", description)
        cases.append(Case(str(name), tuple(_listed_path(root, i) for i in images),
                          _listed_path(root, label)))
    return tuple(cases)


def _listed_path(root: Path, text: str) -> Path:
    expanded = Path(os.path.expandvars(text))
    return expanded if expanded.is_absolute() else root / expanded


def _count_mismatch(data: dict, found: int, where: str) -> str | None:
    """Why dataset.json's numTraining does not count the cases found, or None."""
    if "numTraining" not in data:
        return None
    stated = data["numTraining"]
    if isinstance(stated, bool) or not isinstance(stated, int):
        return f"'numTraining' must be a whole number, not {json.dumps(stated)}"
    if stated != found:
        return f"'numTraining' is {stated}, but {where} {found} cases"
    return None


def _off_ending(folder: Path, ending: str) -> tuple[tuple[Path, str], ...]:
    """Volume files of a folder named with another ending than dataset.json's file_ending:
    no case reads them."""
    if not folder.is_dir():
        return ()
    return tuple((path, f"not of dataset.json's file_ending {ending!r}, so no case reads it")
                 for path in _visible(sorted(folder.iterdir()))
                 if path.name.lower().endswith(IMAGE_SUFFIXES) and not path.name.endswith(ending))


def _nnunet_strays(images_folder: Path, ending: str, labelled: set[str],
                   channels: list[int]) -> tuple[tuple[Path, str], ...]:
    """Files of imagesTr that no case reads: an image without a label, a channel that
    channel_names does not list (training would use fewer channels than the files hold), or
    a name not of nnU-Net's CASE_XXXX form."""
    strays = []
    listed = ", ".join(f"{c:04d}" for c in channels)
    strays += _off_ending(images_folder, ending)
    for image in _visible(sorted(images_folder.glob(f"*{ending}"))):
        stem = image.name[: -len(ending)]
        case, _, channel = stem.rpartition("_")
        if not (case and len(channel) == 4 and channel.isascii() and channel.isdigit()):
            strays.append((image, f"not named CASE_XXXX{ending} (XXXX: the channel number), "
                                  f"so no case reads it"))
        elif case not in labelled:
            strays.append((image, f"image without a label in labelsTr (expected "
                                  f"{case}{ending})"))
        elif int(channel) not in channels:
            strays.append((image, f"channel {channel} is not in dataset.json's channel_names "
                                  f"({listed}): add it there, or move the file out"))
    return tuple(strays)


def _visible(paths: list[Path]) -> list[Path]:
    """Without hidden files: macOS's `._case.nii.gz` resource forks are not cases."""
    return [path for path in paths if not path.name.startswith(".")]


def _refuse_unmatched_ending(labels_folder: Path, ending: str, description: Path) -> None:
    """Label files there, but none with dataset.json's file_ending: say so, rather than list
    a dataset of no cases."""
    if not labels_folder.is_dir() or any(labels_folder.glob(f"*{ending}")):
        return
    others = _visible(sorted(p for p in labels_folder.iterdir()
                             if p.name.lower().endswith(IMAGE_SUFFIXES)))
    if others:
        raise MedsegError(f"'file_ending' is {ending!r}, but {labels_folder.name} holds "
                          f"{others[0].name} and no {ending} file", description)


def _channel_numbers(channels: dict, key: str, description: Path) -> list[str]:
    """The keys of a channel table ("0", "1", ...) in channel order."""
    if not channels:
        raise MedsegError(f"'{key}' names no channel: map \"0\" to the first channel's "
                          f"modality", description)
    odd = [k for k in channels if not _CHANNEL_NUMBER.fullmatch(str(k))]
    if odd:  # int() reads " 0", "-0" and "٠" (an Arabic-Indic zero) as channel 0
        raise MedsegError(f"'{key}' must map channel numbers (\"0\", \"1\", ...) to names, "
                          f"got key {json.dumps(str(odd[0]))}", description)
    numbers = sorted(channels, key=int)
    if [int(k) for k in numbers] != list(range(len(numbers))):  # predict reads _0000.._000N
        raise MedsegError(f"'{key}' must number its channels 0, 1, ... without a gap, got "
                          f"{', '.join(numbers)}", description)
    return numbers


def _channel_name(channels: dict, number: str, key: str, description: Path) -> str:
    """A channel's name as text: str() would read null as the name 'None', which chooses
    MR's normalization unsaid (nnU-Net cannot read such a name at all)."""
    name = channels[number]
    if not isinstance(name, str) or not name.strip():
        raise MedsegError(f"'{key}' gives channel \"{number}\" {json.dumps(name)}, not a "
                          f"name: name its modality, such as \"CT\" or \"MR\"", description)
    return name


def _list_folder_pairs(root: Path, read_labels: bool = True) -> Listing:
    images, image_clashes = _volumes_by_name(root / "images")
    labels, label_clashes = _volumes_by_name(root / "labels")
    cases = [Case(name, (image,), labels[name]) for name, image in images.items()
             if name in labels]
    orphans = [(image, f"no label with the same name in {root / 'labels'}")
               for name, image in images.items() if name not in labels]
    orphans += [(label, f"no image with the same name in {root / 'images'}")
                for name, label in labels.items() if name not in images]
    labels_json = root / "labels.json"
    label_map = _map_of(labels_json, read_labels) if labels_json.is_file() else {}
    return Listing(Dataset(root, tuple(cases), label_map, ("MR",),
                           labels_json if label_map else None), "folders", None,
                   tuple(orphans), tuple(image_clashes + label_clashes))


def _volumes_by_name(folder: Path) -> tuple[dict[str, Path], list[tuple[Path, str]]]:
    """Name -> volume file (or DICOM series subfolder), sorted by name; and the files that
    are a case already found (`a.nii` beside `a.nii.gz`), with the reason."""
    if not folder.is_dir():
        raise MedsegError("folder not found: the folders layout needs images/ and labels/ "
                          "side by side", folder)
    found: dict[str, Path] = {}
    clashes = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir() or path.name.lower().endswith(IMAGE_SUFFIXES):
            # one spelling of accented names (as Case's), or an image and its label would
            # not pair
            name = unicodedata.normalize("NFC", strip_image_suffix(path.name))
            if name in found:
                clashes.append((path, f"{found[name].name} and {path.name} are both case "
                                      f"'{name}'; keep one"))
            else:
                found[name] = path
    return found, clashes


def _list_csv(path: Path, read_labels: bool = True) -> Listing:
    """`image,label` columns (an optional `case` column names the case); every further
    column is one more image channel, in column order. Paths are relative to the CSV."""
    root = Path(os.path.abspath(path.parent))
    rows, columns = _read_csv(path)
    channels = ["image"] + [c for c in columns if c not in ("image", *CSV_RESERVED)]
    cases = []
    for number, row in enumerate(rows, start=2):
        images = tuple(_cell_path(root, path, row, number, c) for c in channels)
        label = _cell_path(root, path, row, number, "label")
        name = (row.get("case") or "").strip() or strip_image_suffix(images[0].name)
        cases.append(Case(name, images, label))
    _refuse_columns_of_no_file(channels[1:], cases, path)
    labels_json = root / "labels.json"
    label_map = _map_of(labels_json, read_labels) if labels_json.is_file() else {}
    dataset = Dataset(root, tuple(cases), label_map, tuple("MR" for _ in channels),
                      labels_json if label_map else None)
    return Listing(dataset, "csv", path)


def _refuse_columns_of_no_file(extra_channels: list[str], cases: list[Case], path: Path
                               ) -> None:
    """A further column (a 'note', a 'site') is an image channel; one whose cells name no
    file at all is not meant as one, and would be reported as an image missing per case
    (not said when the first channel's files are gone too: the dataset has moved, nor when
    a cell names an image file: a channel whose files are all missing, which `medseg check`
    lists per case and training names)."""
    if not any(listed_exists(case.images[0]) for case in cases):
        return
    for index, column in enumerate(extra_channels, start=1):
        cells = [case.images[index] for case in cases]
        if any(listed_exists(cell) or cell.name.lower().endswith(IMAGE_SUFFIXES) for cell in cells):
            continue
        raise MedsegError(f"no cell of column '{column}' names an existing file (such as "
                          f"'{cells[0].name}'; every column but case, image and label is one "
                          f"more image channel: notes belong in another file)", path)


def listed_exists(path: Path) -> bool:
    """Whether a listed file exists; a path with a name too long for a file is none."""
    return os.path.exists(path)  # Path.exists raises on a name of over 255 bytes


def listed_link(path: Path) -> bool:
    """Whether a listed path is a symbolic link (as listed_exists: no OSError)."""
    return os.path.islink(path)


def _read_csv(path: Path) -> tuple[list[dict[str, str]], list[str]]:
    if not path.is_file():
        raise MedsegError("file not found", path)
    text = read_user_text(path)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = [c.strip() for c in (reader.fieldnames or [])]
        rows = []
        for row in reader:
            extra = [cell for cell in row.get(None) or [] if cell.strip()]
            if extra:  # DictReader files them under None, and they would be dropped unsaid
                raise MedsegError(f"line {reader.line_num} has more cells than the header "
                                  f"names ({extra[0]!r} has no column; a header name "
                                  f"missing?)", path)
            rows.append({(k or "").strip(): (v or "").strip() if isinstance(v, str) else ""
                         for k, v in row.items() if k is not None})
    except csv.Error as exc:
        raise _unreadable_csv(exc, path) from exc
    unnamed = [number for number, column in enumerate(columns, start=1) if not column]
    if unnamed:
        raise MedsegError(f"column {unnamed[0]} of the header has no name (a comma too many?)",
                          path)
    repeated = sorted({column for column in columns if columns.count(column) > 1})
    if repeated:  # DictReader would keep the last of them and drop the others unsaid
        raise MedsegError(f"column '{repeated[0]}' appears twice in the header", path)
    missing = [c for c in ("image", "label") if c not in columns]
    if missing:
        raise MedsegError(f"CSV needs the columns image and label; missing "
                          f"{', '.join(missing)} (found {', '.join(columns) or 'none'})"
                          f"{_separator_hint(columns)}", path)
    return rows, columns


def _unreadable_csv(exc: csv.Error, path: Path) -> MedsegError:
    return MedsegError(f"not a readable CSV file ({exc})", path)


def _separator_hint(columns: list[str]) -> str:
    """A header read as one column holding another separator (Excel writes ';' where the
    decimal mark is a comma): say so, rather than only list the columns missing."""
    separator = next((s for s in _OTHER_CSV_SEPARATORS if any(s in c for c in columns)), None)
    if separator is None:
        return ""
    return (f": its header is separated by {separator!r}, and a CSV's columns by commas "
            f"(save it as comma-separated)")


def _cell_path(root: Path, path: Path, row: dict[str, str], number: int, column: str) -> Path:
    """The file a cell names; an empty cell stands for a missing file named after its row
    and column, so that it is reported like any other missing file."""
    if row.get(column):
        return _listed(root, row[column], path)
    return root / f"<empty '{column}' cell in row {number}>"
