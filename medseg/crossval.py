"""Cross-validation of trained runs, as nnU-Net's final validation and
`nnUNetv2_find_best_configuration` give it: each fold's held-out cases segmented by that
fold's network (or by the same fold of several runs: an ensemble) on their original grids,
scored against their labels, summed up per fold and over all, and the post-processing that
the scores support (nnU-Net's "keep the largest component" test, structure by structure).

Validation during training scores the network grid, every few epochs, without surface
metrics; this scores what `medseg predict` writes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medseg.archive import refuse_non_folder
from medseg.config import PredictConfig, Workflow, load_workflow
from medseg.datasets import Case, Dataset, file_name_safe, load_dataset, read_splits
from medseg.dicom import files_below
from medseg.errors import MedsegError
from medseg.evaluate import CaseScores, evaluate_pairs, load_pair
from medseg.fileio import (
    atomic_write_json,
    json_safe,
    lock_beside,
    refuse_unwritable_place,
    sha256_of_file,
)
from medseg.itkio import detached_data_files
from medseg.metrics import leave_out_ignored, score_case
from medseg.plan import Plan, load_plan
from medseg.postprocess import keep_largest_component
from medseg.predict import Predictor, load_predictor, predict_cases, predict_settings
from medseg.report import format_table, shown_name, summarize, write_reports
from medseg.report_html import change_digits
from medseg.runs import refuse_changed_labels
from medseg.stopping import raise_if_stopped

CROSSVAL_FOLDER = "crossval"
REQUEST_FILE = "crossval.json"  # what was asked: marks the folder as a cross-validation's
POSTPROCESSING_FILE = "postprocessing.json"
PREDICTIONS = "predictions"
GOING_ON = "but not scored"  # predict's note of a stop; crossval's own says how to go on
RESULT_FILES = ("summary.json", "scores.csv", "report.html", POSTPROCESSING_FILE)


@dataclass(frozen=True)
class CrossvalRequest:
    runs: tuple[Path, ...]
    out: Path
    folds: tuple[int, ...] | None = None  # None: the folds every run has trained
    dataset_path: str | None = None  # the dataset moved since training
    overrides: tuple[str, ...] = ()  # predict.KEY=VALUE over the first run's predict section
    tta: bool | None = None  # None: the run's predict.tta
    step: float | None = None
    device: str | None = None
    overwrite: bool = False
    tolerance_mm: float = 2.0
    jobs: int = 1
    resume: bool = False  # --continue: keep the masks an earlier run of the same request made


@dataclass(frozen=True)
class Standing:
    """What of an earlier cross-validation --continue keeps: the folds the same networks
    made, and in them the cases whose images hold what their masks were made from."""

    folds: frozenset[int] = frozenset()
    cases: frozenset[str] = frozenset()


@dataclass(frozen=True)
class HeldOut:
    """The cases to score: each fold's validation cases of the dataset."""

    plan: Plan
    folds: tuple[int, ...]
    cases_by_fold: dict[int, tuple[Case, ...]]
    dataset_root: Path

    def all_cases(self) -> list[Case]:
        return [case for fold in self.folds for case in self.cases_by_fold[fold]]


def default_out(runs: list[Path]) -> Path:
    """RUN_DIR/crossval for one run; an ensemble's results belong to none of its runs."""
    if len(runs) > 1:
        raise MedsegError("several runs (an ensemble) need --out DIR: their cross-validation "
                          "belongs to none of them")
    return runs[0] / CROSSVAL_FOLDER


def cross_validate(request: CrossvalRequest) -> dict:
    """Predict, score and sum up; returns the summary (with its `crossval` section)."""
    if request.jobs < 1:  # evaluate_pairs would take it as 1, silently
        raise MedsegError(f"--jobs must be at least 1, got {request.jobs}")
    if not math.isfinite(request.tolerance_mm) or request.tolerance_mm < 0:
        raise MedsegError(f"--tolerance-mm must be a finite number >= 0, got "
                          f"{request.tolerance_mm}")  # before any prediction, not after
    if request.resume and request.overwrite:
        raise MedsegError("--continue keeps an earlier cross-validation's masks and --overwrite "
                          "redoes them: give one of them")
    held_out = _held_out_cases(request)
    # the masks are scored raw: the run's post-processing is what largest_component_test weighs
    config = dataclasses.replace(
        predict_settings(request.runs, request.overrides, request.tta, request.step),
        largest_component=[], min_component_ml={})
    # the weights' SHA-256 before any is read: weights a training replaces meanwhile then
    # differ from the record, and --continue segments their fold again (read first, the
    # record could name new ones for masks the old made)
    record = _request_record(request, held_out, config)
    # the first fold's networks read (and the runs' plans compared) before the folder is claimed
    loaded = {held_out.folds[0]: load_predictor(list(request.runs), [held_out.folds[0]],
                                                request.device,
                                                _recorded_weights(request, held_out, record))}
    busy = MedsegError("another `medseg crossval` is writing this folder; wait for it to "
                       "end (or stop it) first", request.out)
    with lock_beside(request.out, "medseg-crossval-lock", busy):
        earlier = _refuse_unusable_out(request, record)
        # the images' SHA-256 (as the weights') before any is read for segmenting, but after
        # the refusals: a refused command does not read the whole dataset first
        record = {**record, "images": _image_digests(held_out)}
        kept, record = _claim_out_folder(request, record, earlier)
        predictions = request.out / PREDICTIONS
        # before the record names this request's weights and images: a stop before a fold is
        # reached must not leave it masks of others that the next --continue would keep
        _remove_masks_to_redo(held_out, predictions, kept)
        atomic_write_json(request.out / REQUEST_FILE, record)
        return _segment_and_score_noting_a_stop(request, held_out, loaded, config, kept,
                                                record)


def _segment_and_score_noting_a_stop(request: CrossvalRequest, held_out: HeldOut,
                                     loaded: dict[int, Predictor], config: PredictConfig,
                                     kept: Standing, record: dict) -> dict:
    try:
        return _segment_and_score(request, held_out, loaded, config, kept, record)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM, segmenting, between folds or scoring
        again = "--continue in place of --overwrite" if request.overwrite else "--continue"
        tqdm.write(f"medseg: note: the cross-validation in {request.out} stopped before its "
                   f"scores were written; the masks written are kept: the same command with "
                   f"{again} segments the rest and scores them all", file=sys.stderr)
        raise


def _segment_and_score(request: CrossvalRequest, held_out: HeldOut,
                       loaded: dict[int, Predictor], config: PredictConfig,
                       kept: Standing, record: dict) -> dict:
    """The held-out cases segmented (in the `kept` folds, those without a mask), their masks'
    SHA-256 recorded, scored and summed up, and the results written; returns the summary."""
    predictions = request.out / PREDICTIONS
    failed = _predict_folds(request, held_out, predictions, loaded, config, kept,
                            _recorded_weights(request, held_out, record))
    # a mask changed after this (post-processed in place, another's copied over) is not this
    # request's: --continue segments its case again
    atomic_write_json(request.out / REQUEST_FILE, _with_masks(record, held_out, predictions,
                                                              failed))
    plan = held_out.plan
    pairs = [(case.name, _mask_or_none(predictions, case, failed), case.label)
             for case in held_out.all_cases()]
    results = evaluate_pairs(pairs, plan.labels, tolerance_mm=request.tolerance_mm,
                             jobs=request.jobs, ignore_label=plan.ignore_label)
    summary = summarize(results, request.tolerance_mm)
    summary["labels"] = {str(k): name for k, name in sorted(plan.labels.items())}
    postprocessing = largest_component_test(results, plan)
    summary["crossval"] = {"runs": [str(run.resolve()) for run in request.runs],
                           "folds": _fold_means(results, held_out),
                           "postprocessing": postprocessing}
    print(format_table(summary))
    _print_folds(summary["crossval"]["folds"])
    _print_postprocessing(postprocessing, plan)
    from medseg.report_scans import scans_of_inputs

    scans = scans_of_inputs({case.name: case.images[0] for case in held_out.all_cases()})
    write_reports(results, request.out, labels=plan.labels, tolerance_mm=request.tolerance_mm,
                  summary=summary, scans=scans)
    atomic_write_json(request.out / POSTPROCESSING_FILE, postprocessing)
    print(f"wrote {request.out / 'scores.csv'}, summary.json, report.html and "
          f"{POSTPROCESSING_FILE}; masks in {predictions}")
    return summary


def _held_out_cases(request: CrossvalRequest) -> HeldOut:
    """Each asked fold's validation cases, checked before any work: the runs share their
    splits and plans, the dataset still holds the cases and their labels."""
    workflows = [_run_workflow(run) for run in request.runs]
    seen_runs: dict[Path, Path] = {}
    for run in request.runs:  # as load_predictor refuses it, but in crossval's words
        if run.resolve() in seen_runs:
            raise MedsegError(f"given twice (also as {seen_runs[run.resolve()]}): each run "
                              f"would count twice in the ensemble's mean", run)
        seen_runs[run.resolve()] = run
    splits = _shared_splits(request.runs)
    folds = _folds_to_score(request, len(splits))
    _note_fine_tuned(request.runs, workflows)
    plan = load_plan(request.runs[0] / "plan.json")
    dataset = _run_dataset(workflows[0], request.runs[0], request.dataset_path)
    refuse_changed_labels(dataset, plan, request.runs[0] / "plan.json")
    by_name = {case.name: case for case in dataset.cases}
    cases_by_fold: dict[int, tuple[Case, ...]] = {}
    seen: dict[str, int] = {}
    for fold in folds:
        names = splits[fold]["val"]
        _refuse_unusable_cases(names, by_name, fold, seen, dataset,
                               request.runs[0] / "splits.json")
        cases_by_fold[fold] = tuple(by_name[name] for name in names)
    return HeldOut(plan, folds, cases_by_fold, Path(dataset.root))


def _note_fine_tuned(runs: tuple[Path, ...], workflows: list[Workflow]) -> None:
    """A run fine-tuned (train.init) from weights trained on this dataset started every fold
    from a network that saw the folds' held-out cases: their scores are not those of cases
    it never saw."""
    for run, workflow in zip(runs, workflows, strict=True):
        if workflow.train.init:
            print(f"medseg: note: {run} was fine-tuned from {workflow.train.init} (train.init): "
                  f"where those weights were trained on cases of this dataset, a fold's "
                  f"held-out cases may be among them and score higher than unseen cases "
                  f"would", file=sys.stderr)


def _run_workflow(run: Path) -> Workflow:
    refuse_non_folder(run, "splits.json (it cannot be cross-validated)")
    if not (run / "workflow.yaml").is_file():
        raise MedsegError("not a medseg run folder (no workflow.yaml)", run)
    return load_workflow(run / "workflow.yaml")


def _shared_splits(runs: tuple[Path, ...]) -> list[dict]:
    """The first run's splits.json; an ensemble's runs must hold the same validation cases
    per fold, or a fold's network would score cases it was trained on."""
    paths = [run / "splits.json" for run in runs]
    for path in paths:
        if not path.is_file():
            raise MedsegError("splits.json not found (is this a medseg run folder?)", path)
    first = read_splits(paths[0])
    for path in paths[1:]:
        other = read_splits(path)
        if [sorted(f["val"]) for f in other] != [sorted(f["val"]) for f in first]:
            raise MedsegError(f"holds other folds than {paths[0]}: an ensemble's runs must "
                              f"share their splits (train them with the same "
                              f"train.splits_file or seed)", path)
    return first


def _folds_to_score(request: CrossvalRequest, n_splits: int) -> tuple[int, ...]:
    """The asked folds, or those with best weights in every run."""
    from medseg.train import BEST_WEIGHTS, fold_folders

    trained = [{k for k, p in fold_folders(run) if (p / "checkpoints" / BEST_WEIGHTS).is_file()}
               for run in request.runs]
    if request.folds is not None:
        beyond = [k for k in request.folds if k >= n_splits]
        if beyond:
            raise MedsegError(f"splits.json holds {n_splits} folds; fold {beyond[0]} was asked "
                              f"for", request.runs[0] / "splits.json")
        for run, folds in zip(request.runs, trained, strict=True):
            missing = sorted(set(request.folds) - folds)
            if missing:
                raise MedsegError(f"no trained weights for fold(s) {missing}", run)
        return tuple(sorted(set(request.folds)))
    common = set.intersection(*trained) & set(range(n_splits))
    if not common:
        raise MedsegError("no fold trained in every run given (each fold needs "
                          "fold_K/checkpoints/best.safetensors)" if len(request.runs) > 1
                          else "no trained fold (fold_K/checkpoints/best.safetensors)",
                          request.runs[0])
    untrained = n_splits - len(common)
    if untrained:
        print(f"medseg: note: {len(common)} of the {n_splits} folds are trained: "
              f"the cross-validation covers their held-out cases only", file=sys.stderr)
    return tuple(sorted(common))


def _run_dataset(workflow: Workflow, run: Path, dataset_path: str | None) -> Dataset:
    ds = workflow.dataset
    path = dataset_path if dataset_path is not None else ds.path
    try:
        return load_dataset(path, ds.layout, ds.modality, ds.labels)
    except MedsegError as exc:  # moved since: say where the path came from, and the way out
        origin = ("the --dataset given" if dataset_path is not None else
                  f"the dataset of {run / 'workflow.yaml'}; if it has moved, --dataset "
                  f"NEW_PATH scores it there")
        raise MedsegError(f"{exc} ({origin})") from exc


def _refuse_unusable_cases(names: list[str], by_name: dict[str, Case], fold: int,
                           seen: dict[str, int], dataset: Dataset, splits: Path | None = None
                           ) -> None:
    """Each case once, in the dataset, with a label to score against."""
    missing = [name for name in names if name not in by_name]
    if missing:
        raise MedsegError(f"fold {fold}'s validation case(s) {', '.join(missing[:3])} are not "
                          f"in the dataset (score the dataset the run was trained on)",
                          dataset.root)
    for name in names:
        if not file_name_safe(name):  # the mask is predictions/NAME.nii.gz
            raise MedsegError(f"case name {name!r} cannot name a mask file (a path separator, "
                              f"'..' or a leading dot): rename the case", dataset.root)
        if name in seen:
            raise MedsegError(f"case {name} is held out by fold {seen[name]} and fold {fold}: "
                              f"each case can be scored by one fold's network only; give "
                              f"--folds", splits)
        seen[name] = fold
        if by_name[name].label is None:
            raise MedsegError(f"validation case {name} has no label to score against",
                              dataset.root)


def _refuse_unusable_out(request: CrossvalRequest, record: dict) -> dict | None:
    """Refuse an --out that is not an empty (or new) folder, nor an earlier
    cross-validation's with --overwrite or --continue (any other folder's files are not ours
    to replace), and a --continue of another request. Returns the earlier record that
    --continue goes on from (None: none)."""
    out = request.out
    if out.exists() and not out.is_dir():
        raise MedsegError("output folder path is a file", out)
    refuse_unwritable_place(out)  # under a file, read-only: one line, not an OSError
    if not out.is_dir() or not any(out.iterdir()):
        return None
    if not (out / REQUEST_FILE).is_file():
        raise MedsegError(f"is not empty and holds no earlier cross-validation "
                          f"({REQUEST_FILE}): choose an empty --out", out)
    if not (request.overwrite or request.resume):
        raise MedsegError("holds an earlier cross-validation: --continue segments the cases it "
                          "has no mask of yet, --overwrite predicts and scores them all again",
                          out)
    return _earlier_record(out / REQUEST_FILE, record) if request.resume else None


def _claim_out_folder(request: CrossvalRequest, record: dict, earlier: dict | None
                      ) -> tuple[Standing, dict]:
    """The --out that `_refuse_unusable_out` let through made, or emptied of the earlier
    results (--overwrite: of its masks too). Returns the folds and cases whose earlier masks
    stand (--continue from `earlier`: the same networks made them from the same images)
    and the record to write (--continue: with the earlier one's folds this request leaves
    out)."""
    out = request.out
    if not out.is_dir() or not any(out.iterdir()):
        out.mkdir(parents=True, exist_ok=True)
        return Standing(), record
    kept, record = _going_on(out / REQUEST_FILE, record, earlier) if earlier is not None \
        else (Standing(), record)
    if request.overwrite and (out / PREDICTIONS).is_dir() \
            and not (out / PREDICTIONS).is_symlink():
        # a mask left of an earlier request would pass for one of this request's otherwise
        shutil.rmtree(out / PREDICTIONS)
    # the earlier results go now: one cut short would leave them beside the new request
    for name in RESULT_FILES:
        (out / name).unlink(missing_ok=True)
    return kept, record


def _request_record(request: CrossvalRequest, held_out: HeldOut, config: PredictConfig
                    ) -> dict:
    """What was asked, as crossval.json holds it; `weights`: per fold, the SHA-256 of each
    run's best weights, which tells --continue whether a fold's masks still stand (the
    images' are added by `_image_digests`)."""
    record = {
        "runs": [str(run.resolve()) for run in request.runs],
        "dataset": str(held_out.dataset_root.resolve()),
        "folds": list(held_out.folds),
        "cases": {str(k): [c.name for c in v] for k, v in held_out.cases_by_fold.items()},
        "predict": dataclasses.asdict(config),
        "arithmetic": _arithmetic(request.device, config.precision),
        "weights": {str(fold): [sha256_of_file(_best_weights(run, fold))
                                for run in request.runs] for fold in held_out.folds}}
    return json.loads(json.dumps(json_safe(record)))  # as read back: lists, not tuples


def _image_digests(held_out: HeldOut) -> dict[str, list[str | None]]:
    """Per case, its images' SHA-256 (`_image_digest`), which tell --continue whether a
    case's mask still stands: an image replaced during the run differs next time."""
    return {case.name: [_image_digest(image) for image in case.images]
            for case in held_out.all_cases()}


def _arithmetic(device: str | None, precision: str) -> dict:
    """Where and in which precision the masks are computed: `predict.precision` auto is
    bf16 on one machine and fp32 on another, whose masks differ at a few boundary voxels."""
    from medseg.predict import resolve_device
    from medseg.train import select_precision

    resolved = resolve_device(device)
    dtype = select_precision(precision, resolved)
    return {"device": resolved.type,
            "autocast": "none" if dtype is None else str(dtype).removeprefix("torch.")}


def _image_digest(image: Path) -> str | None:
    """A volume file's SHA-256 (its modification time says nothing of a copy that kept the
    old one: `cp -p`, `rsync -t`, a backup restored); a DICOM series folder's, or a detached
    header's (.mhd, .nhdr): the SHA-256 of the lines `DIGEST  PATH` of the files it is read
    from (the series' below the folder, hidden ones left out, in path order; the header's and
    its data file's, beside it). None for one that cannot be read (predict names it), or
    whose voxels are in a list or pattern of files."""
    try:
        if image.is_dir():
            # not a link that leads nowhere (no file is read from it)
            files, base = [file for file in files_below(image) if file.exists()], image
        else:
            data = detached_data_files(image)
            if not data:
                return None if data is None else sha256_of_file(image)
            files, base = [image, *data], image.parent
        lines = [sha256_of_file(file).encode() + b"  "
                 + os.fsencode(Path(os.path.relpath(file, base)).as_posix()) + b"\n"
                 for file in files]
    except (OSError, ValueError, MedsegError):
        return None
    return hashlib.sha256(b"".join(lines)).hexdigest()


def _with_masks(record: dict, held_out: HeldOut, predictions: Path, failed: set[str]
                ) -> dict:
    """`record` with `masks`: per case scored, its mask's SHA-256 (the earlier record's of
    the folds this request leaves out kept, and of the masks --continue kept, which
    `_going_on` hashed already)."""
    known = record.get("masks", {})
    masks = {case.name: predictions / f"{case.name}.nii.gz" for case in held_out.all_cases()
             if case.name not in failed and case.name not in known}
    digests = {name: sha256_of_file(mask) for name, mask in masks.items() if mask.is_file()}
    return {**record, "masks": {**known, **digests}}


def _mask_unchanged(mask: Path, recorded: object) -> bool:
    """A mask whose SHA-256 is the one recorded once it was scored, or none recorded (a
    cross-validation stopped before it scored); not a link, which `_remove_masks_to_redo`
    removes (its case then segmented again, its new mask hashed by `_with_masks`)."""
    if mask.is_symlink():
        return False
    if recorded is None:
        return True
    try:
        return sha256_of_file(mask) == recorded
    except OSError:  # no mask: nothing to keep
        return False


def _recorded_weights(request: CrossvalRequest, held_out: HeldOut, record: dict
                      ) -> dict[Path, str]:
    """Each asked fold's best weights with their SHA-256 as crossval.json records them:
    load_predictor's test for copies of one run need not read them again."""
    return {_best_weights(run, fold): digest for fold in held_out.folds
            for run, digest in zip(request.runs, record["weights"][str(fold)], strict=True)}


def _best_weights(run: Path, fold: int) -> Path:
    from medseg.train import BEST_WEIGHTS

    return run / f"fold_{fold}" / "checkpoints" / BEST_WEIGHTS


def _going_on(path: Path, record: dict, earlier: dict) -> tuple[Standing, dict]:
    """The folds whose masks the `earlier` cross-validation (its record at `path`, accepted
    by `_earlier_record`) made with the same runs, dataset, predict settings, cases and
    weights, in them the cases whose images (and masks, where recorded) are the same, and
    the record with the earlier one's folds that this request leaves out."""
    weights, cases, images, masks = (_dict_or_empty(earlier.get(key))
                                     for key in ("weights", "cases", "images", "masks"))
    folds = set()
    for fold in record["folds"]:
        key = str(fold)
        if weights.get(key) == record["weights"][key] and cases.get(key) == record["cases"][key]:
            folds.add(fold)
        elif key in weights:
            print(f"medseg: note: fold {fold}'s weights or cases changed since the earlier "
                  f"cross-validation: its cases are segmented again", file=sys.stderr)
    predictions = path.parent / PREDICTIONS
    unchanged = {name for fold in folds for name in record["cases"][str(fold)]
                 if None not in record["images"][name]
                 and images.get(name) == record["images"][name]
                 and _mask_unchanged(predictions / f"{name}.nii.gz", masks.get(name))}
    record = _with_left_out_folds(record, weights, cases, images, masks)
    # kept: a stop before this request scores must not leave them unrecorded
    ours = {name: masks[name] for name in sorted(unchanged) if isinstance(masks.get(name), str)}
    return (Standing(frozenset(folds), frozenset(unchanged)),
            {**record, "masks": {**record.get("masks", {}), **ours}})


def _earlier_record(path: Path, record: dict) -> dict:
    """The earlier crossval.json, refused if it is another request's; one of an older
    medseg, which does not say all that made its masks, with none of its folds kept."""
    earlier = _read_record(path)
    if "dataset" not in earlier:  # medseg before --continue: no dataset, no weights
        earlier = {**earlier, "dataset": record["dataset"], "weights": {}}
    unsaid = [words for key, words in (("arithmetic", "on which device and in which precision"),
                                       ("images", "from which image contents"))
              if key not in earlier]  # medseg before they were recorded
    if unsaid:
        earlier = {"arithmetic": record["arithmetic"], **earlier, "weights": {}}
    _refuse_another_request(path, earlier, record)
    if unsaid:  # once the record is accepted: a refused one segments nothing
        print(f"medseg: note: {path} does not say {' nor '.join(unsaid)} its masks were made: "
              f"every case is segmented again", file=sys.stderr)
    return earlier


def _dict_or_empty(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _refuse_another_request(path: Path, earlier: dict, record: dict) -> None:
    for key, what in (("runs", "other runs"), ("dataset", "another dataset"),
                      ("predict", "other predict settings"),
                      ("arithmetic", "another device or precision "
                                     f"({_in_words(earlier['arithmetic'])})")):
        if earlier.get(key) != record[key]:
            raise MedsegError(f"was made with {what}: --continue goes on with the same ones "
                              f"only; --overwrite predicts and scores it all again", path)


def _in_words(arithmetic: object) -> str:
    """The earlier record's device and precision in a few words; a record edited by hand
    (other keys or types, a long text): whatever it holds, as JSON, cut to 80 characters."""
    if isinstance(arithmetic, dict) and arithmetic.keys() == {"device", "autocast"} \
            and all(isinstance(v, str) and len(v) <= 30 for v in arithmetic.values()):
        return f"{arithmetic['device']}, autocast {arithmetic['autocast']}"
    try:
        text = json.dumps(arithmetic, ensure_ascii=False)
    except (RecursionError, ValueError):  # nested as deep as the reader allows
        return f"a {type(arithmetic).__name__} nested too deep"
    return text if len(text) <= 80 else f"{text[:77]}..."


def _read_record(path: Path) -> dict:
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # not UTF-8, not JSON, nested deep
        raise MedsegError(f"cannot be read ({exc}): --overwrite predicts and scores it all "
                          f"again", path) from exc
    if not isinstance(earlier, dict):
        raise MedsegError("is not a cross-validation's record: --overwrite predicts and scores "
                          "it all again", path)
    return earlier


def _with_left_out_folds(record: dict, weights: dict, cases: dict, images: dict, masks: dict
                         ) -> dict:
    """`record`, its `cases`, `weights`, `images` and `masks` also holding the earlier record's
    entries of the folds this request leaves out (`--folds 0` after all folds): their masks
    stay in predictions/ for a later --continue of them. Not a fold one of whose cases this
    request segments (its mask is then this request's), nor an entry of other types."""
    ours = {name for names in record["cases"].values() for name in names}
    left_out = {key: (cases[key], weights[key]) for key in cases
                if _fold_key(key) and key not in record["cases"] and key in weights
                and _strings(cases[key]) and _strings(weights[key])
                and not ours & set(cases[key])}
    if not left_out:
        return record
    theirs = [name for names, _ in left_out.values() for name in names]
    their_images = {name: images[name] for name in theirs if _strings(images.get(name))}
    their_masks = {name: masks[name] for name in theirs if isinstance(masks.get(name), str)}
    return {**record,
            "masks": their_masks,
            "cases": _by_fold({**record["cases"], **{k: v[0] for k, v in left_out.items()}}),
            "weights": _by_fold({**record["weights"],
                                 **{k: v[1] for k, v in left_out.items()}}),
            "images": {**record["images"], **their_images}}


def _fold_key(key: str) -> bool:
    return key.isdecimal() and str(int(key)) == key


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _by_fold(entries: dict[str, list]) -> dict[str, list]:
    return dict(sorted(entries.items(), key=lambda item: int(item[0])))


def _predict_folds(request: CrossvalRequest, held_out: HeldOut, predictions: Path,
                   loaded: dict[int, Predictor], config: PredictConfig, kept: Standing,
                   weights: dict[Path, str]) -> set[str]:
    """Each fold's held-out cases by that fold's network(s) (`loaded`: those read already,
    taken out as used, so that no one keeps them), masks written raw (without the run's
    post-processing, which `largest_component_test` weighs); in the `kept` folds, only the
    cases without a mask; `weights`: the best weights' SHA-256 as recorded. The names that
    failed."""
    failed: set[str] = set()
    for fold in held_out.folds:
        raise_if_stopped()
        cases = _cases_to_segment(fold, held_out.cases_by_fold[fold], predictions,
                                  fold in kept.folds)
        predictor = loaded.pop(fold, None)  # the previous fold's networks freed
        if not cases:
            continue
        if predictor is None:
            predictor = load_predictor(list(request.runs), [fold], request.device, weights)
        results = predict_cases(predictor, [(c.name, c.images) for c in cases], predictions,
                                config, going_on=GOING_ON)
        failed |= {case.name for case, result in zip(cases, results, strict=True)
                   if result.error}
        del predictor
    return failed


def _remove_masks_to_redo(held_out: HeldOut, predictions: Path, kept: Standing) -> None:
    """The masks of the cases not kept (of folds not kept, whose images differ from those the
    masks were made from, or whose masks changed: a case failing now must not be scored on
    one), and in every
    fold a mask that is a link: medseg writes none, so it leads to another's file."""
    for fold in held_out.folds:
        changed = 0
        for case in held_out.cases_by_fold[fold]:
            mask = predictions / f"{case.name}.nii.gz"
            if mask.is_symlink():
                mask.unlink()
            elif case.name not in kept.cases and mask.is_file():
                changed += fold in kept.folds
                mask.unlink()
        if changed:
            print(f"medseg: note: fold {fold}: {changed} case(s) whose images are not those "
                  f"their masks were made from, or whose masks changed since, are segmented "
                  f"again", file=sys.stderr)


def _cases_to_segment(fold: int, cases: tuple[Case, ...], predictions: Path, kept: bool
                      ) -> list[Case]:
    """A kept fold's cases without a finished mask; another fold's cases all (their earlier
    masks are gone, as are those of a kept fold's cases whose images changed:
    `_remove_masks_to_redo`)."""
    if kept:
        todo = [c for c in cases if not _finished(predictions / f"{c.name}.nii.gz")]
        done = len(cases) - len(todo)
        if done:
            print(f"fold {fold}: {done} of its {len(cases)} held-out case(s) segmented already"
                  f"{f', segmenting the other {len(todo)}' if todo else ''}")
            return todo
    print(f"fold {fold}: segmenting its {len(cases)} held-out case(s)")
    return list(cases)


def _finished(mask: Path) -> bool:
    """A non-empty mask (predict writes one whole under another name first)."""
    try:
        made = mask.stat()
    except OSError:
        return False
    return stat.S_ISREG(made.st_mode) and made.st_size > 0


def _mask_or_none(predictions: Path, case: Case, failed: set[str]) -> Path | None:
    """A failed case's mask is none, even if an earlier cross-validation left one."""
    return None if case.name in failed else predictions / f"{case.name}.nii.gz"


def _fold_means(results: list[CaseScores], held_out: HeldOut) -> dict[str, dict]:
    """Per fold: its case count and the mean Dice per structure and over them."""
    by_case = {r.case: r for r in results}
    folds = {}
    for fold in held_out.folds:
        fold_results = [by_case[c.name] for c in held_out.cases_by_fold[fold]]
        summary = summarize(fold_results)
        folds[str(fold)] = {
            "cases": len(fold_results),
            "failed_cases": summary["failed_cases"],
            "mean_dice": summary["mean_dice"],
            "dice": {name: stats["dice"]["mean"]
                     for name, stats in summary["structures"].items()},
        }
    return folds


def largest_component_test(results: list[CaseScores], plan: Plan) -> dict:
    """nnU-Net's post-processing choice: per structure, whether keeping only its largest
    26-connected component raises its mean Dice over the held-out cases (strictly, as
    nnU-Net decides). Cases that failed are left out of both means."""
    ids = {name: label for label, name in plan.labels.items() if label > 0}
    before: dict[str, list[float]] = {name: [] for name in ids}
    after: dict[str, list[float]] = {name: [] for name in ids}
    scored = [r for r in results if not r.error]
    for result in tqdm(scored, desc="largest component", unit="case", dynamic_ncols=True):
        raise_if_stopped()
        pair = load_pair(result.prediction, result.reference, plan.labels, resample=False,
                         ignore_label=plan.ignore_label)
        # as predict keeps it: the largest component of the whole mask, unannotated voxels
        # included; the scores then leave those out
        kept = keep_largest_component(pair.prediction, sorted(ids.values()))
        kept, reference = leave_out_ignored(kept, pair.reference, plan.ignore_label)
        scores = score_case(kept, reference, plan.labels, pair.spacing, surface=False)
        for name in ids:
            before[name].append(result.scores[name]["dice"])
            after[name].append(scores[name]["dice"])
    structures = {}
    for name, label in ids.items():
        mean_before, mean_after = _finite_mean(before[name]), _finite_mean(after[name])
        structures[name] = {"id": label, "dice": mean_before,
                            "dice_largest_component": mean_after,
                            "apply": bool(mean_after > mean_before)}
    return {"largest_component": [s["id"] for s in structures.values() if s["apply"]],
            "cases": len(scored), "structures": structures}


def _finite_mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _print_folds(folds: dict[str, dict]) -> None:
    for fold, entry in folds.items():
        dice = ", ".join(f"{shown_name(name)} {value:.4f}" for name, value in entry["dice"].items()
                         if math.isfinite(value))
        print(f"fold {fold} ({entry['cases']} cases): mean Dice {entry['mean_dice']:.4f}"
              f"{f' ({dice})' if dice else ''}")


def _postprocessing_line(name: str, structure: dict) -> str:
    """A structure's mean Dice raw -> kept, with the decimals that tell the two apart."""
    before, after = structure["dice"], structure["dice_largest_component"]
    digits = change_digits(before, after)
    raises = " (raises it)" if structure["apply"] else ""
    return f"  {shown_name(name)}: {before:.{digits}f} -> {after:.{digits}f}{raises}"


def _print_postprocessing(result: dict, plan: Plan) -> None:
    """What keeping the largest component does to each structure, and how to use it."""
    lines = [_postprocessing_line(name, s) for name, s in result["structures"].items()
             if math.isfinite(s["dice"])]
    if not lines:
        return
    print("keeping only the largest component (mean Dice, raw -> kept):")
    print("\n".join(lines))
    chosen = result["largest_component"]
    if chosen:
        print(f"to use it: medseg predict ... --set predict.largest_component="
              f"{json.dumps(chosen).replace(' ', '')}")
    else:
        print("it raises no structure's Dice: predict without it (medseg predict ... --set "
              "predict.largest_component=[] where the run's workflow keeps it)")
