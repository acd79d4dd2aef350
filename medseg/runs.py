"""A training run's folder: starting it, resuming it, and continuing its folds.

`medseg train` and `medseg demo` come here once their arguments are parsed. A new run reads
the dataset, plans and splits it, writes the run folder (plan.json, fingerprint.json,
splits.json, folds.json, workflow.yaml) and trains each fold into it; `--resume` reads that
folder back, refuses a dataset changed since, and trains each fold on from its saved state.
One `medseg train` at a time holds a run folder. Parsing the command line, and turning
errors into messages and exit codes, stay in cli.py.

Heavy imports (torch, MONAI) stay inside the functions so that `medseg --help` is instant.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from medseg.config import Workflow, load_workflow, override_key
from medseg.errors import MedsegError

FOLDS_FILE = "folds.json"  # the folds `train` was asked for, which `--resume` continues
# what a resumed run may change: its budget, where its dataset lies, and where its cases are
# cached (memory and disk give the same patches, so the run goes on as it began)
RESUME_OVERRIDES = ("train.max_minutes", "dataset.path", "train.cache", "train.num_workers")


@contextlib.contextmanager
def one_trainer(run_dir: Path, ranks) -> Iterator[None]:
    """Refuse a second `medseg train` on a run folder that one is training: two would both
    write its checkpoints and metrics. The lock file lies beside the folder (a fresh run
    replaces the folder), and goes when the run ends. Rank 0 takes it; every rank of a
    torchrun run is refused with it, before any work."""
    from medseg.fileio import lock_beside

    refusal = MedsegError("another `medseg train` is training this run folder; wait for it "
                          "to end (or stop it) first", run_dir)
    # every rank, not rank 0 alone (which takes the lock): a path that cannot be resolved (a
    # link loop) then fails on each, not on rank 0 while the others wait for its answer
    run_dir.resolve()
    with contextlib.ExitStack() as held:
        locked = True
        if ranks.main:
            # `--out runs/x` in a fresh clone: the lock's folder is made now (and removed
            # again if the run leaves it empty), or a second trainer would not be refused
            try:
                held.enter_context(lock_beside(run_dir, "medseg-lock", refusal))
            except MedsegError:
                locked = False
        if not _main_rank_says(locked, ranks):
            raise refusal
        yield


def _main_rank_says(flag: bool, ranks) -> bool:
    """Rank 0's `flag` on every rank of a torchrun run (as is, in one process)."""
    if not ranks.distributed:
        return flag
    import torch
    import torch.distributed as dist

    from medseg.train import flag_from_main_rank

    device = (torch.device("cuda", ranks.local_rank) if torch.cuda.is_available()
              else torch.device("cpu"))
    said = flag_from_main_rank(flag, ranks, device)
    # every rank has the answer before any leaves: rank 0's broadcast may return before
    # rank 1 has read it, and a rank that ends its group then cuts the other's receive
    dist.barrier()
    return said


def train_run(workflow, run_dir: Path, folds: list[int], overwrite: bool,
               workflow_file: Path | None = None, given: frozenset[str] | None = None
               ) -> list:
    """dataset -> fingerprint -> plan -> splits -> train each fold; all saved in run_dir.
    With train.init, the plan keys that shape the network and that the workflow does not
    give (`given`: the keys its file and --set options give; None: take none) follow the
    source run's plan, and a source that does not fit the plan is refused before the run
    folder is written."""
    from medseg.config import save_workflow
    from medseg.fileio import atomic_write_json
    from medseg.plan import (
        save_fingerprint,
        save_plan,
    )
    from medseg.pretrained import keep_source_topology, note_other_modalities, refuse_unfit
    from medseg.train import current_ranks, train_fold

    # under torchrun every rank plans the same run from the same seed; rank 0 alone checks
    # and writes the run folder (the others never read it)
    main_rank = current_ranks().main
    # every rank: a refusal must stop them all before any work, not rank 0 alone
    workflow, init = _check_start(run_dir, workflow, overwrite, workflow_file, given,
                                  main_rank)
    workflow, dataset = _load_run_dataset(workflow)
    if overwrite:  # a CSV's or dataset.json's files may lie anywhere, the run folder too
        _refuse_inputs_inside(run_dir, workflow, None, dataset)  # before the dataset's line
    _report_run_dataset(workflow, dataset, main_rank)
    splits, fp, plan = plan_run(workflow, dataset, main_rank)
    if init is not None:
        plan = keep_source_topology(init, plan, quiet=not main_rank)
        refuse_unfit(init, plan)
        note_other_modalities(init, plan, quiet=not main_rank)
    _every_rank_here()  # each has checked the run folder before rank 0 writes it
    if main_rank:
        _replace_run_folder(run_dir)  # only now that the dataset has been read without error
        # plan.json first (what --overwrite recognizes a run folder by), workflow.yaml last
        # (what --resume does): a folder cut short in between is overwritten, not resumed
        save_plan(plan, run_dir / "plan.json")
        save_fingerprint(fp, run_dir / "fingerprint.json")
        atomic_write_json(run_dir / "splits.json", splits)
        atomic_write_json(run_dir / FOLDS_FILE, folds)  # what --resume continues
        save_workflow(workflow, run_dir / "workflow.yaml")
    results = []
    for k in folds:
        results.append(train_fold(workflow, dataset, plan, splits[k], run_dir / f"fold_{k}"))
        _report_fold(results[-1], workflow.train.epochs)
    return results


def read_run_dataset(workflow: Workflow, main_rank: bool = True) -> tuple[Workflow, object]:
    """The workflow's dataset, read, described in a line and checked; the workflow with the
    layout found (saved as found: a resume must read the dataset the same way)."""
    workflow, dataset = _load_run_dataset(workflow)
    _report_run_dataset(workflow, dataset, main_rank)
    return workflow, dataset


def _load_run_dataset(workflow: Workflow) -> tuple[Workflow, object]:
    """The workflow's dataset, read without a word (a check of its files can still refuse
    the run before any output), and the workflow with the layout found."""
    from medseg.datasets import list_dataset, load_dataset

    ds = workflow.dataset
    dataset = load_dataset(ds.path, ds.layout, ds.modality, ds.labels)
    if ds.layout == "auto":
        workflow = dataclasses.replace(workflow, dataset=dataclasses.replace(
            ds, layout=list_dataset(ds.path).layout))
    return workflow, dataset


def _report_run_dataset(workflow: Workflow, dataset, main_rank: bool) -> None:
    """The dataset's line (cases, labels, channels), a note on an 'ignore' spelt otherwise,
    and the check of the workflow's post-processing against the dataset's labels."""
    ignored = ("" if dataset.ignore_label is None else
               f" (id {dataset.ignore_label} 'ignore': left out of the loss and the scores)")
    print(f"dataset: {len(dataset.cases)} cases, labels {labels_in_brief(dataset.labels)}"
          f"{ignored}, modalities {list(dataset.modalities)}")
    if main_rank:
        note_ignore_spelt_otherwise(dataset.labels)
    # here, not after hours of training when predict would first read them (a dataset that
    # names no labels, folders or CSV without labels.json: once its label files are read)
    if dataset.labels:
        _check_postprocessing_of(workflow, dataset.labels)


def plan_run(workflow: Workflow, dataset, main_rank: bool = True) -> tuple[list, object, object]:
    """dataset -> splits, fingerprint, plan (printed in one line), as `train` makes them."""
    from medseg.datasets import make_splits
    from medseg.fileio import physical_memory
    from medseg.plan import fingerprint, make_plan, refuse_unaffordable_spacing

    if workflow.train.splits_file:
        splits = _splits_of_file(Path(workflow.train.splits_file), dataset)
    else:
        splits = make_splits([c.name for c in dataset.cases], workflow.train.folds,
                             workflow.train.split_seed, source=dataset.root)
    # sampled with a seed of its own, not train.seed: runs of other seeds on one dataset get
    # one plan (a CT's normalization is drawn from sampled voxels), as an ensemble needs
    fp = fingerprint(dataset, seed=0, progress=main_rank)
    if not dataset.labels:
        _check_postprocessing_of(workflow, fp.labels)
    plan = make_plan(fp, workflow.plan)
    refuse_unaffordable_spacing(fp, plan, physical_memory(), workflow.train.cache,
                                spacing_given=workflow.plan.target_spacing is not None)
    print(f"plan: spacing {plan.target_spacing}, patch {plan.patch_size}, batch "
          f"{plan.batch_size}, {len(plan.strides)} levels, filters {plan.filters}")
    return splits, fp, plan


def _every_rank_here() -> None:
    """Under torchrun, a barrier. Every rank checks the run folder; a rank that came to
    check it after rank 0 had written its plan.json refused the new run as "run folder
    exists and is not empty", alone."""
    from medseg.train import current_ranks

    if current_ranks().distributed:
        import torch.distributed as dist

        dist.barrier()


def _check_start(run_dir: Path, workflow, overwrite: bool, workflow_file: Path | None,
                 given: frozenset[str] | None, main_rank: bool):
    """The checks before a new run reads its dataset: the run folder, and train.init's
    source (refused in one line when missing or unreadable). Returns the workflow, with the
    source's network keys where it leaves them unset, and the source (None without one)."""
    from medseg.pretrained import adopt_source_network, resolve_init

    _check_run_folder(run_dir, overwrite)
    init = resolve_init(workflow.train.init) if workflow.train.init else None
    if overwrite:
        _refuse_inputs_inside(run_dir, workflow, workflow_file, init=init)
    if init is not None:
        workflow = adopt_source_network(workflow, init, given, note=main_rank)
    return workflow, init


def _check_run_folder(run_dir: Path, overwrite: bool) -> None:
    from medseg.fileio import refuse_unwritable_place

    if run_dir.exists() and not run_dir.is_dir():
        raise MedsegError("run folder path is a file", run_dir)
    refuse_unwritable_place(run_dir)  # before the dataset is read, not after
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise MedsegError("run folder exists and is not empty; pass --overwrite to "
                              "replace it", run_dir)
        if not (run_dir / "plan.json").exists():
            raise MedsegError("refusing to overwrite a folder that is not a medseg run",
                              run_dir)


def _refuse_inputs_inside(run_dir: Path, workflow, workflow_file: Path | None,
                          dataset=None, init=None) -> None:
    """--overwrite deletes the whole run folder: a dataset, workflow, splits or train.init
    weights file kept in it, or a case file the dataset lists from there, would go with it
    (and training would then fail on the files it just deleted)."""
    if not run_dir.is_dir():
        return
    inside = run_dir.resolve()
    inputs = [("dataset.path", workflow.dataset.path),
              ("train.splits_file", workflow.train.splits_file),
              ("the workflow file", workflow_file),
              ("the train.init weights", init.file if init is not None else None)]
    for case in dataset.cases if dataset is not None else ():
        inputs += [(f"a file of case {case.name}", path)
                   for path in (*case.images, case.label) if path is not None]
    for what, path in inputs:
        if path and Path(path).resolve().is_relative_to(inside):
            raise MedsegError(f"--overwrite would delete {what} {path}, which lies inside the "
                              f"run folder: move it out first", run_dir)


def _replace_run_folder(run_dir: Path) -> None:
    if run_dir.is_symlink() and run_dir.is_dir():
        # --out LINK (a link to a folder on another disk): the link stays, and what it
        # leads to is emptied (rmtree refuses a link: 'Cannot call rmtree on a symbolic
        # link', after the dataset had been planned); links inside are removed, not followed
        for child in run_dir.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        return
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)


def labels_in_brief(labels: dict[int, str] | None) -> str:
    """The label map for a line of the console: whole when short, else its size and ends
    (118 TotalSegmentator names made a line of 3000 characters)."""
    if not labels:
        return "from the label files"
    if len(labels) <= 8:
        return str(labels)
    items = list(labels.items())
    head = ", ".join(f"{k}: {v!r}" for k, v in items[:3])
    return f"{{{head}, ..., {items[-1][0]}: {items[-1][1]!r}}} ({len(labels)} ids)"


def note_ignore_spelt_otherwise(labels: dict[int, str]) -> None:
    """nnU-Net reads only 'ignore' as its unannotated label; 'Ignore' is a structure there
    and here, which is rarely what was meant."""
    from medseg.datasets import IGNORE_NAME

    for label_id, name in labels.items():
        if name.strip().casefold() == IGNORE_NAME and name != IGNORE_NAME:
            print(f"medseg: note: label {label_id} {name!r} is trained as a structure; "
                  f"unannotated voxels are nnU-Net's '{IGNORE_NAME}', in lower case",
                  file=sys.stderr)


def _check_postprocessing_of(workflow, labels: dict[int, str]) -> None:
    from medseg.postprocess import check_postprocess_labels

    check_postprocess_labels(workflow.predict.largest_component,
                             workflow.predict.min_component_ml, labels, "dataset's")


def folds_of_splits_file(workflow):
    """With `train.splits_file`, the number of folds is the file's, and `train.fold` must be
    one of them."""
    from medseg.datasets import read_splits

    path = workflow.train.splits_file
    if not path:
        return workflow
    n_folds = len(read_splits(Path(path)))
    if workflow.train.fold >= n_folds:
        raise MedsegError(f"'train.fold' is {workflow.train.fold}, but the file holds "
                          f"{n_folds} fold(s)", path)
    return dataclasses.replace(workflow, train=dataclasses.replace(workflow.train,
                                                                   folds=n_folds))


def _splits_of_file(path: Path, dataset) -> list[dict]:
    """One's own folds (`train.splits_file`); every case they name must be in the dataset."""
    from medseg.datasets import read_splits, refuse_too_few_cases

    refuse_too_few_cases(len(dataset.cases), dataset.root)
    splits = read_splits(path)
    unknown = _cases_not_in(dataset, splits)
    if unknown:
        raise MedsegError(f"names case(s) {unknown} that the dataset does not have", path)
    return splits


def parse_folds(text: str | None, n_folds: int, default: int) -> list[int]:
    if text is None:
        return [default]
    if text == "all":
        return list(range(n_folds))
    try:
        fold = int(text)
    except ValueError as exc:
        raise MedsegError(f"--fold must be an integer or 'all', got {text!r}") from exc
    if not 0 <= fold < n_folds:
        raise MedsegError(f"--fold {fold} is outside 0..{n_folds - 1}")
    return [fold]


def resume_run(run_dir: Path, fold_text: str | None, overrides: list[str] | None = None
                ) -> list:
    """Continue the fold(s) of a run from their last saved state (a fold never started is
    trained from the beginning). `overrides` may give each fold a new wall-clock budget;
    it is saved in the run's workflow.yaml."""
    from medseg.archive import refuse_non_folder
    from medseg.config import save_workflow
    from medseg.datasets import read_splits
    from medseg.fileio import atomic_write_json
    from medseg.plan import load_plan
    from medseg.train import current_ranks, refuse_memory_cache_beyond_memory

    refuse_non_folder(run_dir, "training state (it cannot be resumed)")
    if not (run_dir / "workflow.yaml").is_file():
        raise MedsegError("not a medseg run folder (no workflow.yaml)", run_dir)
    workflow = load_workflow(run_dir / "workflow.yaml", overrides)
    plan = load_plan(run_dir / "plan.json")
    splits_path = run_dir / "splits.json"
    if not splits_path.is_file():
        raise MedsegError("splits.json not found (is this a medseg run folder?)", splits_path)
    splits = read_splits(splits_path)
    dataset = _resumed_dataset(workflow, run_dir, overrides)
    requested = _requested_folds(run_dir, workflow.train.fold)
    if fold_text is None:
        folds = requested
    else:
        folds = parse_folds(fold_text, workflow.train.folds, workflow.train.fold)
    _refuse_changed_dataset(dataset, splits, folds, splits_path)
    refuse_changed_labels(dataset, plan, run_dir / "plan.json")
    _refuse_changed_channels(dataset, plan, run_dir / "plan.json")
    _refuse_other_scans(dataset, [splits[k] for k in folds], run_dir / "fingerprint.json")
    # decided before any training, so that every torchrun rank decides the same; every
    # state read before any caching or training: a damaged one of fold 2 is not found
    # after folds 0 and 1 have trained
    resumes = [_has_state(run_dir / f"fold_{fold}") for fold in folds]
    _check_fold_starts(run_dir, folds, resumes, workflow, plan)
    if workflow.train.cache == "memory" and _sets(overrides, "train.cache"):
        refuse_memory_cache_beyond_memory(run_dir, plan)  # before workflow.yaml saves it
    if current_ranks().main:  # only once the resume is known to go ahead
        if overrides:
            save_workflow(workflow, run_dir / "workflow.yaml")
        if not set(folds) <= set(requested):  # a later plain --resume continues these too
            atomic_write_json(run_dir / FOLDS_FILE, sorted(set(requested) | set(folds)))
    return _continue_folds(run_dir, folds, resumes, workflow, dataset, plan, splits)


def _sets(overrides: list[str] | None, key: str) -> bool:
    """Whether the --set options give `key`."""
    return any(override_key(item) == key for item in overrides or [])


def _check_fold_starts(run_dir: Path, folds: list[int], resumes: list[bool], workflow,
                       plan) -> None:
    """What each fold goes on from: its training state, or (a fold that starts now) the
    weights of train.init, read again only then; a fold that starts now trains as the run's
    folds trained (a workflow.yaml edited since is refused)."""
    from medseg.train import check_course, check_resumable

    for fold, resume in zip(folds, resumes, strict=True):
        if resume:
            check_resumable(run_dir / f"fold_{fold}", plan, workflow)
    if not all(resumes):
        check_course(run_dir, workflow)
    if workflow.train.init and not all(resumes):
        from medseg.pretrained import refuse_unfit, resolve_init

        refuse_unfit(resolve_init(workflow.train.init), plan)


def _resumed_dataset(workflow: Workflow, run_dir: Path, overrides: list[str] | None):
    from medseg.datasets import load_dataset

    ds = workflow.dataset
    try:
        return load_dataset(ds.path, ds.layout, ds.modality, ds.labels)
    except MedsegError as exc:  # moved since: say where the path came from, and the way out
        given = _sets(overrides, "dataset.path")
        origin = ("the dataset.path given with --set" if given else
                  f"the dataset of {run_dir / 'workflow.yaml'}; if it has moved, "
                  f"--set dataset.path=NEW_PATH resumes from there")
        raise MedsegError(f"{exc} ({origin})") from exc


def _requested_folds(run_dir: Path, default_fold: int) -> list[int]:
    """The folds `medseg train` was asked for (all of them after `--fold all`, started or
    not); for a run folder from before folds.json, the folds with a saved state."""
    from medseg.train import TRAIN_STATE, fold_folders

    path = run_dir / FOLDS_FILE
    if path.is_file():
        try:
            folds = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise MedsegError(f"not valid JSON ({exc})", path) from exc
        if not (isinstance(folds, list) and folds
                and all(isinstance(k, int) and k >= 0 for k in folds)):
            raise MedsegError(f"expected a list of fold numbers, got {folds!r}", path)
        return folds
    started = [k for k, p in fold_folders(run_dir) if (p / "checkpoints" / TRAIN_STATE).is_file()]
    return started or [default_fold]


def _refuse_changed_dataset(dataset, splits: list, folds: list[int], splits_path: Path) -> None:
    """Resuming needs every case of the run's splits still in the dataset."""
    if any(k >= len(splits) for k in folds):
        raise MedsegError(f"holds {len(splits)} folds; fold {max(folds)} was asked for",
                          splits_path)
    missing = _cases_not_in(dataset, [splits[k] for k in folds])
    if missing:
        raise MedsegError(f"the dataset no longer has case(s) {missing} of these splits: "
                          f"resume on the dataset the run was trained on", splits_path)


def _cases_not_in(dataset, folds: list[dict]) -> str:
    """The case names of `folds` (train and val) that the dataset lacks, the first three
    named ('' when none)."""
    names = {case.name for case in dataset.cases}
    missing = sorted({n for fold in folds for part in ("train", "val") for n in fold[part]}
                     - names)
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    return f"{', '.join(missing[:3])}{more}" if missing else ""


def refuse_changed_labels(dataset, plan, plan_path: Path) -> None:
    """The network's outputs are the plan's labels: a dataset relabelled since (or given
    other dataset.labels) cannot continue that training."""
    from medseg.datasets import IGNORE_NAME

    if plan.ignore_label is None and IGNORE_NAME in plan.labels.values():
        # before medseg read nnU-Net's 'ignore', a workflow could name a class so
        label_id = _id_named(plan.labels, IGNORE_NAME)
        raise MedsegError(f"this run trained id {label_id}, named 'ignore', as a structure; "
                          f"medseg now reads that name as nnU-Net's unannotated label: to "
                          f"resume, give id {label_id} another name in 'dataset.labels'",
                          plan_path)
    if dataset.labels and set(dataset.labels) != set(plan.labels):
        raise MedsegError(f"the dataset's label ids {sorted(dataset.labels)} differ from the "
                          f"run's {sorted(plan.labels)}: resume on the dataset the run was "
                          f"trained on", plan_path)
    if dataset.ignore_label != plan.ignore_label:
        raise MedsegError(f"the dataset's 'ignore' label is {_ignore_text(dataset)}, the "
                          f"run's {_ignore_text(plan)}: resume on the dataset the run was "
                          f"trained on", plan_path)


def _id_named(labels: dict[int, str], name: str) -> int:
    return next(k for k, label_name in labels.items() if label_name == name)


def _ignore_text(labelled) -> str:
    return "none" if labelled.ignore_label is None else f"id {labelled.ignore_label}"


def _refuse_other_scans(dataset, folds: list[dict], fingerprint_path: Path) -> None:
    """Cases are found again by name: another collection named alike (case_001, ...) would
    go on training the run without a word. Each case of `folds` is checked, from its header
    alone, against the grid the fingerprint recorded for it (runs from before the
    fingerprint named its cases are not checked)."""
    from medseg.io import read_geometry
    from medseg.plan import ras_grid

    recorded = _recorded_grids(fingerprint_path)
    names = {n for fold in folds for part in ("train", "val") for n in fold[part]}
    for case in dataset.cases:
        if case.name not in names or case.name not in recorded:
            continue
        shape, spacing = ras_grid(read_geometry(case.images[0]))
        old_shape, old_spacing = recorded[case.name]
        if list(shape) != list(old_shape) or not all(
                math.isclose(a, b, rel_tol=1e-4) for a, b in zip(spacing, old_spacing,
                                                                  strict=True)):
            raise MedsegError(f"case '{case.name}' is {_grid_text(shape, spacing)} now, but "
                              f"was {_grid_text(old_shape, old_spacing)} when the run was "
                              f"planned: resume on the dataset the run was trained on",
                              case.images[0])


def _recorded_grids(path: Path) -> dict[str, tuple[list, list]]:
    """Case name -> (shape, spacing) in R, A, S order, from the run's fingerprint.json; empty
    when it names no cases (or cannot be read: the cache's estimates go without it too)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {name: (shape, spacing) for name, shape, spacing
                in zip(data["cases"], data["shapes"], data["spacings"], strict=True)}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _grid_text(shape: list, spacing: list) -> str:
    return (f"{' x '.join(str(int(v)) for v in shape)} voxels of "
            f"{' x '.join(f'{float(v):.4g}' for v in spacing)} mm")


def _refuse_changed_channels(dataset, plan, plan_path: Path) -> None:
    """The network's inputs are the plan's channels, each normalized as its modality (the
    plan's normalization goes on as it began). A run planned before nnU-Net's noNorm,
    rescale_to_0_1 and rgb_to_0_1 were told apart read them as MR: still the same channels."""
    def same(ours: str, planned: str) -> bool:
        return ours == planned or (planned == "MR" and ours != "CT")

    if len(dataset.modalities) != len(plan.modalities) or not all(
            same(ours, planned) for ours, planned in zip(dataset.modalities, plan.modalities,
                                                         strict=True)):
        raise MedsegError(f"the dataset's channels {list(dataset.modalities)} differ from the "
                          f"run's {list(plan.modalities)}: resume on the dataset the run was "
                          f"trained on", plan_path)


def _has_state(fold_dir: Path) -> bool:
    """Whether the fold has a training state to resume from. A fold without one starts from
    the beginning only if it never got past its first epoch (killed before its first state
    was written): a state deleted later would otherwise restart a trained fold without a
    word, and overwrite its checkpoints."""
    from medseg.train import TRAIN_STATE, last_epoch_recorded

    state = fold_dir / "checkpoints" / TRAIN_STATE
    if state.is_file():
        return True
    epoch = last_epoch_recorded(fold_dir / "metrics.jsonl")
    if epoch is not None and epoch >= 1:
        raise MedsegError(f"has no training state, but metrics.jsonl records {epoch + 1} "
                          f"epochs: restore the state file, or train the fold again with "
                          f"`medseg train ... --overwrite`", state)
    return False


def _continue_folds(run_dir: Path, folds: list[int], resumes: list[bool], workflow: Workflow,
                    dataset, plan, splits: list) -> list:
    """Train each fold on from its saved state (where `resumes` says it has one), from the
    beginning where it has none."""
    from medseg.train import (
        BEST_WEIGHTS,
        current_ranks,
        finished_fold,
        restore_best_weights,
        train_fold,
    )

    results = []
    for fold, resume in zip(folds, resumes, strict=True):
        fold_dir = run_dir / f"fold_{fold}"
        finished = finished_fold(fold_dir, workflow.train.epochs) if resume else None
        if finished is not None:
            problem = restore_best_weights(fold_dir) if current_ranks().main else None
            if problem:
                was = "was missing" if problem == "missing" else f"was {problem}"
                print(f"{fold_dir.name}: checkpoints/{BEST_WEIGHTS} {was}; written again from "
                      f"the saved weights")
            print(f"{fold_dir.name}: finished already; nothing to resume")
            results.append(finished)
        else:
            print(f"{fold_dir.name}: {'resuming' if resume else 'starting'}")
            results.append(train_fold(workflow, dataset, plan, splits[fold], fold_dir,
                                      resume=resume))
        _report_fold(results[-1], workflow.train.epochs)
    return results


def _report_fold(result, planned_epochs: int) -> None:
    """A fold's closing line, printed as soon as it ends (other ranks' stdout is silenced)."""
    dice = "n/a" if result.best_mean_dice is None else f"{result.best_mean_dice:.4f}"
    ran = f"{result.epochs_run} of {_epochs(planned_epochs)}"
    if result.epochs_run < planned_epochs:
        from medseg.train import current_ranks

        processes = current_ranks().world_size
        launcher = (f"torchrun --nproc_per_node {processes} -m medseg.cli" if processes > 1
                    else "medseg")  # as many processes, or the curve changes course
        ran += (f", stopped by train.max_minutes ({launcher} train --resume "
                f"{result.fold_dir.parent} continues)")
    # counted, not numbered: metrics.jsonl numbers epochs from 0
    print(f"{result.fold_dir.name}: best mean Dice {dice}, reached after "
          f"{_epochs(result.best_epoch + 1)}; {ran}; {result.seconds / 60:.1f} min")


def _epochs(count: int) -> str:
    return f"{count} epoch{'' if count == 1 else 's'}"

