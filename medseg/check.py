"""`medseg check`: everything wrong with a dataset, found before training, in one table.

Every listed file is read once. Errors stop training (missing or unreadable files, grids that
disagree, bad label values, NaN/Inf voxels, duplicate cases); warnings deserve a look (empty
labels, spacing and orientation outliers, paths that leave the dataset folder). An error
makes the exit status 1 (with --strict, any row); a dataset description that cannot be read
at all raises MedsegError (2).
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from medseg.config import TrainConfig
from medseg.datasets import (
    LABEL_AS_CHANNEL,
    Case,
    Dataset,
    file_name_safe,
    id_past_a_gap,
    is_spare_label,
    label_id_problem,
    leaves_folder,
    list_dataset,
    listed_exists,
    listed_link,
    strip_image_suffix,
)
from medseg.errors import MedsegError
from medseg.io import (
    SHEAR_TOLERANCE_DEGREES,
    Geometry,
    Volume,
    grid_mismatch,
    header_note,
    label_grid_mismatch,
    orientation_unknown,
    read_geometry,
    read_label_map,
    read_volume,
    refuse_out_of_range,
    reorder_onto,
    shear_degrees,
    voxels_digest,
)
from medseg.plan import intensity_doubt, modality_hint, no_structure

SPACING_OUTLIER_FACTOR = 2.0
DEFAULT_FOLDS = TrainConfig().folds


@dataclass(frozen=True)
class Problem:
    severity: str  # "error" or "warning"
    case: str
    file: Path
    message: str


@dataclass(frozen=True)
class CheckReport:
    root: Path
    layout: str
    n_cases: int
    problems: tuple[Problem, ...]

    def exit_code(self, strict: bool = False) -> int:
        """1 when an error was found (or, `strict`, any problem), else 0: warnings alone do
        not stop `medseg check DATA && medseg train ...`, as training does not refuse them."""
        counted = self.problems if strict else [p for p in self.problems
                                                if p.severity == "error"]
        return 1 if counted else 0

    def format_table(self) -> str:
        """The problems as an aligned text table, then a summary line."""
        rows = [("severity", "case", "file", "problem")] + [
            (p.severity, p.case, _relative(p.file, self.root), p.message)
            for p in self.problems]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3]
                 for r in rows] if self.problems else []
        errors = sum(p.severity == "error" for p in self.problems)
        warnings = len(self.problems) - errors
        verdict = ("clean" if not self.problems
                   else f"{_count(errors, 'error')}, {_count(warnings, 'warning')}")
        lines.append(f"{self.root} ({self.layout} layout, {_count(self.n_cases, 'case')}): "
                     f"{verdict}")
        return "\n".join(lines)


@dataclass
class _CaseFacts:
    """What the dataset-wide checks need from one case."""

    case: Case
    geometry: Geometry | None = None
    digest: str | None = None  # of all the case's channels together; None if one is unread
    label_digest: str | None = None  # of its label; None without one, or if unread
    label_ids: frozenset[int] = frozenset()  # the values its label file holds


def check_dataset(path: str | Path, layout: str = "auto") -> CheckReport:
    """Read every file a dataset lists and report every problem found."""
    listing = list_dataset(path, layout)
    dataset = listing.dataset
    problems = [Problem("error", _name_of(file), file, reason)
                for file, reason in listing.clashes]
    problems += [Problem("error", _name_of(file), file, reason)
                 for file, reason in listing.orphans if not is_spare_label(file)]
    # a label without its image: training leaves it out, so it deserves a look, no more
    problems += [Problem("warning", _name_of(file), file, reason)
                 for file, reason in listing.orphans if is_spare_label(file)]
    if listing.count_mismatch:
        problems.append(Problem(listing.count_mismatch[0], "-", listing.description,
                                listing.count_mismatch[1]))
    problems += _too_few_cases(len(dataset.cases), listing.description or dataset.root)
    problem = label_id_problem(dataset.labels)
    if problem:
        problems.append(Problem("error", "-", listing.description or dataset.root,
                                f"label map ids: {problem}; training needs ids 0, 1, 2, ... "
                                f"without a gap"))
    facts = []
    for case in tqdm(dataset.cases, desc="check", unit="case", leave=False):
        found, case_facts = _check_case(case, dataset, listing.layout)
        problems += found
        facts.append(case_facts)
    if not dataset.labels:  # no label map: training takes the ids its label files hold
        problems += _gapped_label_ids(facts, listing.description or dataset.root)
    problems += _no_structure_anywhere(facts, dataset, listing.description or dataset.root)
    problems += _duplicates(facts)
    problems += _unnameable(dataset.cases)
    problems += _names_one_file_apart(dataset.cases)
    problems += _shared_labels(dataset.cases)
    problems += _labels_named_for_others(dataset.cases)
    problems += _outliers([f for f in facts if f.geometry is not None])
    problems += _fewer_than_folds(len(dataset.cases), listing.description or dataset.root)
    return CheckReport(dataset.root, listing.layout, len(dataset.cases), tuple(problems))


def _too_few_cases(count: int, where: Path) -> list[Problem]:
    """Training refuses a dataset of no case, and one of a single case (make_splits)."""
    if count == 0:
        return [Problem("error", "-", where, "the dataset lists no cases: training would "
                                             "refuse it")]
    if count == 1:
        return [Problem("error", "-", where, "the dataset lists 1 case: training would refuse "
                                             "it, its folds need at least 2 (one to train on, "
                                             "one to validate on)")]
    return []


def _fewer_than_folds(count: int, where: Path) -> list[Problem]:
    """Training refuses fewer cases than train.folds (make_splits), which check, reading no
    workflow, knows only as its default: a warning, as a workflow may set fewer."""
    if not 1 < count < DEFAULT_FOLDS:
        return []
    return [Problem("warning", "-", where,
                    f"the dataset lists {count} cases, fewer than the default {DEFAULT_FOLDS} "
                    f"folds: training refuses it unless train.folds is at most {count} (--set "
                    f"train.folds={count}) or train.splits_file gives the folds")]


def _check_case(case: Case, dataset: Dataset, layout: str) -> tuple[list[Problem], _CaseFacts]:
    problems: list[Problem] = []
    facts = _CaseFacts(case)

    def add(file: Path, message: str, severity: str = "error") -> None:
        problems.append(Problem(severity, case.name, file, message))

    files = [*case.images, *([case.label] if case.label else [])]
    geometries = _read_geometries(_existing_files(files, case, dataset.root, layout, add), add)
    facts.geometry = geometries.get(case.images[0])
    _check_grids(case, geometries, add)
    hint = modality_hint(len(dataset.modalities))
    by_file = {file: _check_image_voxels(file, modality, hint, add)
               for file, modality in zip(case.images, dataset.modalities, strict=True)
               if file in geometries}
    digests = list(by_file.values())
    if len(digests) == len(case.images) and all(digests):
        # the whole case: two cases may share one channel (an all-zero missing sequence)
        facts.digest = "+".join(digests)
    if case.label in geometries:
        facts.label_ids, facts.label_digest = _check_label_voxels(case.label, dataset, add,
                                                                  facts.geometry)
        if facts.label_ids - {0, dataset.ignore_label}:  # two blank volumes are no answer
            _channels_holding_the_label(by_file, facts.label_digest, add)
    return problems, facts


def _channels_holding_the_label(by_file: dict[Path, str | None], label_digest: str | None,
                                add) -> None:
    """An image channel with the label's voxels (a CSV column of a second rater's labels,
    the label file listed as a channel): the network would be given the answer to copy, and
    validation would score the copy."""
    for file, digest in by_file.items():
        if digest is not None and digest == label_digest:
            add(file, LABEL_AS_CHANNEL)


def _existing_files(files: list[Path], case: Case, root: Path, layout: str, add
                    ) -> list[Path]:
    for file in files:
        # training takes such a path; a CSV exists to list files anywhere
        if layout != "csv" and leaves_folder(file, root):
            add(file, "path leaves the dataset folder (moving or sharing the folder will "
                      "break it)", "warning")
    missing = [file for file in files if not listed_exists(file)]
    for file in missing:
        add(file, ("label missing" if file == case.label else "image missing")
            + (": a link to a file that is not there" if listed_link(file) else ""))
    return [file for file in files if file not in missing]


def _read_geometries(files: list[Path], add) -> dict[Path, Geometry]:
    geometries = {}
    for file in files:
        try:
            geometries[file] = read_geometry(file)
        except MedsegError as exc:
            add(file, _message(exc))
    return geometries


def _check_grids(case: Case, geometries: dict[Path, Geometry], add) -> None:
    """Every file on the first image's grid (a label may store it in another axis order),
    and no image whose orientation is unknown or whose axes are sheared."""
    first = case.images[0]
    reference = geometries.get(first)
    for file, geometry in geometries.items():
        note = header_note(geometry)
        # a label without orientation is read as its image is (the image's row says it);
        # a label whose qform and sform disagree shows elsewhere in ITK tools on its own
        if note and (file in case.images or not orientation_unknown(geometry)):
            add(file, note, "warning")
        if reference is None or file == first:
            continue
        on_grid = label_grid_mismatch if file == case.label else grid_mismatch
        mismatch = on_grid(geometry, reference)
        if mismatch:
            add(file, f"not on the grid of {first.name}: {mismatch}")
    if reference is not None and shear_degrees(reference) > SHEAR_TOLERANCE_DEGREES:
        add(first, f"voxel axes sheared by up to {shear_degrees(reference):.3g} "
                   f"degrees: training resamples it, but predict refuses such a "
                   f"scan, and evaluate such a reference", "warning")


def _check_image_voxels(file: Path, modality: str, hint: str, add) -> str | None:
    try:
        volume = read_volume(file, dtype=None)
    except MedsegError as exc:
        add(file, _message(exc))
        return None
    doubt = intensity_doubt(modality, float(volume.data.min()), float(volume.data.max()))
    if doubt:  # normalized as its modality, which it does not look like
        add(file, f"{doubt} (the channel is {modality}: {hint})", "warning")
    try:  # training and predict read images as float32
        refuse_out_of_range(volume.data, np.dtype(np.float32), file)
    except MedsegError as exc:
        add(file, _message(exc))
        return None  # no float32 copy to compare
    return voxels_digest(volume.data)  # as training's: a float32 copy of an int16 case is one


def _check_label_voxels(file: Path, dataset: Dataset, add, image: Geometry | None = None
                        ) -> tuple[frozenset[int], str | None]:
    """Label values outside the map (the 'ignore' id is in it), or an empty label; returns
    the values found and the label's digest (on `image`'s grid, when given)."""
    try:
        label = read_label_map(file)
    except MedsegError as exc:
        add(file, _message(exc))
        return frozenset(), None
    data = label.data
    values = set(np.unique(data).tolist())
    labels, ignore = dataset.labels, dataset.ignore_label
    known = set(labels) | {ignore} if labels else {v for v in values if v >= 0}
    unknown = sorted(values - known)
    if unknown:
        known_ids = sorted(labels) if labels else "(non-negative integers)"
        also = f" and 'ignore' {ignore}" if ignore is not None else ""
        add(file, f"label values {unknown[:10]} are not in the label map {known_ids}{also}")
    if not values - {0, ignore}:
        add(file, no_structure(values, ignore), "warning")
    return frozenset(values), _label_digest(label, image)


def _label_digest(label: Volume, image: Geometry | None) -> str:
    """The label's voxels as training pairs them with the image: on its grid (a copy stored
    in another axis order or direction is the same label)."""
    data = label.data
    if image is not None and grid_mismatch(label.geometry, image) is not None:
        reordered = reorder_onto(data, label.affine, image)
        data = data if reordered is None else reordered
    return voxels_digest(data)


def _no_structure_anywhere(facts: list[_CaseFacts], dataset: Dataset, where: Path
                           ) -> list[Problem]:
    """Every label read and none holding a structure voxel: each case's row is a warning,
    but training refuses the whole dataset (nothing to learn), as it refuses no case."""
    read = [f for f in facts if f.label_digest is not None]
    if not read or len(read) < len(facts) or any(f.label_ids - {0, dataset.ignore_label}
                                                 for f in read):
        return []
    return [Problem("error", "-", where, "no case's label has a voxel of any structure (all "
                                         "background): training would refuse it, nothing "
                                         "to learn")]


def _gapped_label_ids(facts: list[_CaseFacts], where: Path) -> list[Problem]:
    ids = [v for v in frozenset().union(*(f.label_ids for f in facts))
           if v >= 0]  # negatives have rows of their own
    problem = label_id_problem(ids)
    if not problem:
        return []
    past_gap = id_past_a_gap(ids)
    first = next((f.case for f in facts if past_gap in f.label_ids), None)
    if first is None:
        return [Problem("error", "-", where, f"label file ids: {problem}; training needs ids "
                                             f"0, 1, 2, ... without a gap")]
    return [Problem("error", first.name, first.label,
                    f"holds label id {past_gap}, past a gap in the label files' ids: "
                    f"{problem}; training needs ids 0, 1, 2, ... without a gap")]


def _duplicates(facts: list[_CaseFacts]) -> list[Problem]:
    problems = []
    first_by_name: dict[str, Case] = {}
    first_by_file: dict[Path, Case] = {}
    first_by_digest: dict[str, Case] = {}
    for fact in facts:
        case = fact.case
        image = case.images[0]
        if case.name in first_by_name:
            problems.append(Problem("error", case.name, image, "duplicate case name"))
        first_by_name.setdefault(case.name, case)
        for file in case.images:
            other = first_by_file.setdefault(file, case)
            if other is not case:
                problems.append(Problem("error", case.name, file,
                                        f"same file as case {other.name}"))
        if fact.digest is not None:
            other = first_by_digest.setdefault(fact.digest, fact)
            if other is not fact:
                problems.append(_same_image(fact, other))
    return problems


def _shared_labels(cases: tuple[Case, ...]) -> list[Problem]:
    """One label file listed for two cases of other images (a slip in a CSV or dataset.json
    row): training takes it as each one's label. Cases of the same image file have an
    error row of their own."""
    problems = []
    first: dict[Path, Case] = {}
    for case in cases:
        other = first.setdefault(case.label, case) if case.label is not None else case
        if other is not case and other.images != case.images:
            problems.append(Problem("warning", case.name, case.label,
                                    f"same label file as case {other.name}: training takes "
                                    f"it as the label of both"))
    return problems


def _labels_named_for_others(cases: tuple[Case, ...]) -> list[Problem]:
    """A label file named as another case's image, its own image named otherwise (two rows
    of a CSV or dataset.json whose labels were swapped): on grids of one size, nothing else
    tells, and each image would be trained on another's label. One label file listed for
    both cases is _shared_labels' warning."""
    by_stem = {stem: case for case in cases for stem in _image_stems(case.images[0])}
    problems = []
    for case in cases:
        if case.label is None:
            continue
        stem = strip_image_suffix(case.label.name)
        other = by_stem.get(stem)
        if (other is not None and other is not case and other.label != case.label
                and stem not in _image_stems(case.images[0])):  # a shared label: its own row
            problems.append(Problem("warning", case.name, case.label,
                                    f"named as the image of case {other.name} "
                                    f"({other.images[0].name}), but listed as the label of "
                                    f"{case.images[0].name}: labels swapped between rows?"))
    return problems


def _image_stems(image: Path) -> set[str]:
    """An image's file name without extension, and without what may be nnU-Net's channel
    suffix (_0000) too: only in nnU-Net's layout is it one (AMOS's amos_0001 is a case)."""
    return {strip_image_suffix(image.name), _name_of(image)}


def _unnameable(cases: tuple[Case, ...]) -> list[Problem]:
    """Names (a CSV's case column, nnU-Net's 'dataset' keys) that training takes, but that
    crossval refuses, after the training, as the file name of a case's mask."""
    return [Problem("warning", case.name, case.images[0],
                    f"case name {case.name!r} cannot name a mask file (a path separator, '..' "
                    f"or a leading dot): crossval would refuse it; rename the case")
            for case in cases if not file_name_safe(case.name)]


def _names_one_file_apart(cases: tuple[Case, ...]) -> list[Problem]:
    """Names that differ only in letter case: one mask file (crossval's predictions,
    predict's masks) on macOS's and Windows' file systems, which ignore case; Linux keeps
    them apart. (Names are NFC already: NFC and NFD spellings are one name, a duplicate.)"""
    problems = []
    first: dict[str, str] = {}
    for case in cases:
        other = first.setdefault(unicodedata.normalize("NFC", case.name.lower()), case.name)
        if other != case.name:  # the same name has an error row of its own
            problems.append(Problem("warning", case.name, case.images[0],
                                    f"case names {other!r} and {case.name!r} differ only in "
                                    f"letter case: their masks (crossval's "
                                    f"predictions/NAME.nii.gz, predict's) are one file on "
                                    f"macOS and Windows; rename one"))
    return problems


def _same_image(fact: _CaseFacts, other: _CaseFacts) -> Problem:
    """Two cases with the same image voxels: a duplicate (training refuses it), or, with
    another label, one scan annotated twice (several raters)."""
    case = fact.case
    if (fact.label_digest is None) != (other.label_digest is None):  # one label unread
        return Problem("warning", case.name, case.images[0],
                       f"same image voxels as case {other.case.name} (a duplicate, or one scan "
                       f"annotated twice: the labels could not both be read to tell)")
    if fact.label_digest == other.label_digest:
        return Problem("error", case.name, case.images[0],
                       f"same voxels as case {other.case.name} in every channel and the label "
                       f"(duplicate case)")
    return Problem("warning", case.name, case.images[0],
                   f"same image voxels as case {other.case.name}, with another label (two "
                   f"raters?): keep them in one fold (train.splits_file), or one may be "
                   f"trained on and the other validated on")


def _outliers(facts: list[_CaseFacts]) -> list[Problem]:
    """Spacing beyond a factor 2 of the dataset median on some axis (R, A, S order), and
    orientations other than the one most cases share (none when no orientation is shared by
    more than half: orientations that vary by design, which training reorients anyway)."""
    if len(facts) < 3:
        return []
    spacings = np.array([_ras_spacing(f.geometry) for f in facts])
    median = np.median(spacings, axis=0)
    codes = ["".join(nib.aff2axcodes(f.geometry.affine)) for f in facts]
    usual, count = Counter(codes).most_common(1)[0]
    if 2 * count <= len(codes):
        usual = None
    problems = []
    for fact, spacing, code in zip(facts, spacings, codes, strict=True):
        ratio = spacing / median
        if np.any(ratio > SPACING_OUTLIER_FACTOR) or np.any(ratio < 1 / SPACING_OUTLIER_FACTOR):
            problems.append(Problem(
                "warning", fact.case.name, fact.case.images[0],
                f"spacing {_mm(spacing)} mm is an outlier: dataset median {_mm(median)} mm "
                f"(beyond a factor {SPACING_OUTLIER_FACTOR:g})"))
        if usual is not None and code != usual:
            problems.append(Problem("warning", fact.case.name, fact.case.images[0],
                                    f"orientation {code} differs from the usual {usual}"))
    return problems


def _ras_spacing(geometry: Geometry) -> list[float]:
    order = nib.orientations.io_orientation(geometry.affine)[:, 0].astype(int)
    ras = [0.0, 0.0, 0.0]
    for voxel_axis, world_axis in enumerate(order):
        ras[world_axis] = geometry.spacing[voxel_axis]
    return ras


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _mm(values) -> str:
    return "(" + ", ".join(f"{v:.3g}" for v in values) + ")"


def _message(exc: MedsegError) -> str:
    """The error without its path prefix (the table names the file)."""
    text = str(exc)
    prefix = f"{exc.path}: " if exc.path is not None else ""
    return text[len(prefix):] if prefix and text.startswith(prefix) else text


def _name_of(file: Path) -> str:
    """Case name of an orphan file (an nnU-Net channel suffix _0000 dropped)."""
    name = strip_image_suffix(file.name)
    channel = name[-4:]
    return name[:-5] if len(name) > 5 and name[-5] == "_" and channel.isascii() \
        and channel.isdigit() else name


def _relative(file: Path, root: Path) -> str:
    try:
        return str(file.relative_to(root))
    except ValueError:
        return str(file)
