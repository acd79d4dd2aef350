"""The verbs: demo, plan, train, predict, evaluate, crossval, export, check, convert, convert-msd.

Only this module, runs.py and crossval.py wire the stages together: this one parses the
command line, runs the command, and turns its errors into one line and an exit code; runs.py
starts, resumes and continues a training run's folder; crossval.py predicts and scores a
run's held-out cases.

Heavy imports (torch, MONAI) stay inside the commands so that `--help` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import json
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from medseg import runs, stopping
from medseg.config import check_in_range, keys_given, load_workflow, override_key
from medseg.errors import MedsegError, one_line, unwrap_transform_error
from medseg.pretrained import close_archives
from medseg.stopping import Terminated

if TYPE_CHECKING:
    from medseg.config import Workflow
    from medseg.plan import Fingerprint, Plan
    from medseg.report_scans import Scans

DEMO_MARKER = ".medseg-demo"
EXIT_USER_ERROR = 2
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a process SIGTERM killed


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _tolerate_narrow_consoles()
    _quiet_libraries()
    parser = _parser()
    args = parser.parse_args(argv)
    # under torchrun, a user's mistake or Ctrl-C reaches every rank alike: rank 0 says it
    other_rank = int(os.environ.get("RANK", "0") or 0) != 0
    restore_signals = stopping.install()
    threads_before = set(threading.enumerate())
    finished = False
    try:
        code = int(args.handler(args) or 0)
        finished = True
        return code
    except MedsegError as exc:
        if args.debug:  # the traceback, and the same exit status as without --debug
            traceback.print_exc()
        return _user_error(exc, other_rank)
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM as Terminated
        _close_progress_bars()
        if not other_rank:
            print("medseg: stopped (SIGTERM)" if isinstance(stop, Terminated)
                  else "medseg: interrupted", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(stop, Terminated) else 130
    except Exception as exc:  # one line for the user; the traceback is behind --debug
        if args.debug:
            traceback.print_exc()
        return _unexpected_error(exc, other_rank)
    finally:
        if not finished:
            _let_pool_threads_finish(threads_before)
        close_archives()  # the model archives train.init unpacked: not kept past the command
        restore_signals()  # a program calling main() keeps its own handlers


def _user_error(exc: MedsegError, other_rank: bool) -> int:
    if not other_rank:
        print(f"medseg: error: {exc}", file=sys.stderr)
    _tell_torchrun(f"medseg: error: {exc}")
    return EXIT_USER_ERROR


def _unexpected_error(exc: Exception, other_rank: bool) -> int:
    """One line for an error that is not a MedsegError (unless a transform wrapped one)."""
    cause = unwrap_transform_error(exc)
    if isinstance(cause, MedsegError):
        return _user_error(cause, other_rank)
    rank = f" (rank {os.environ['RANK']})" if other_rank else ""
    delay_s = 0
    if _lost_another_process(cause):
        # its partner's failure, not this process's: torchrun's summary shows the
        # earliest error file, the partner's. Its "Root Cause" is the file of the earliest
        # whole second, the lowest rank on a tie: dated a second later, the partner's file
        # (written before this process lost it) wins
        line = (f"medseg: error{rank}: another process of this torchrun run failed (its "
                f"error is in torchrun's summary); this one lost its connection: "
                f"{one_line(str(cause))}")
        delay_s = 1
    else:
        line = (f"medseg: error{rank}: {type(cause).__name__}: {one_line(str(cause))} (rerun "
                f"with --debug for the traceback)")
    print(line, file=sys.stderr)
    _tell_torchrun(line, delay_s)
    return 1


def _close_progress_bars() -> None:
    """End the bars an interrupt left open (MONAI's caching bar, a bar whose generator was
    not exhausted), so that the stop's line starts a line of its own instead of following
    the bar's last draw."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        with contextlib.suppress(Exception):
            bar.close()


def _let_pool_threads_finish(existing: set[threading.Thread], timeout_s: float = 120.0
                             ) -> None:
    """Wait for the thread-pool workers this command started (MONAI CacheDataset fills its
    cache in a ThreadPool) to end their current task. A ThreadPool left by an interrupt or an
    error stops giving them work but does not join them, and a worker still inside torch when
    Python exits is unwound through C++ code that cannot be: the process aborts (exit 134)
    instead of exiting 130, 143 or 2. A caller's own pools (`existing`) are not waited for;
    a second Ctrl-C gives up waiting."""
    from multiprocessing.dummy import DummyProcess

    deadline = time.monotonic() + timeout_s
    try:
        for thread in threading.enumerate():
            if (isinstance(thread, DummyProcess) and thread not in existing
                    and thread.is_alive()):
                thread.join(max(0.0, deadline - time.monotonic()))
    except KeyboardInterrupt:
        pass


def _lost_another_process(exc: BaseException) -> bool:
    """A torchrun worker whose partner exited sees its collective fail on the broken
    connection: gloo's "Connection closed by peer" / "reset by peer", NCCL's "remote
    process exited". A timeout or a local backend error is this process's own."""
    if _world_size() <= 1:
        return False
    text = str(exc).lower()
    return any(sign in text for sign in ("closed by peer", "reset by peer",
                                         "remote process exited"))


def _world_size() -> int:
    """torchrun's process count (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _tell_torchrun(line: str, delay_s: int = 0) -> None:
    """A torchrun worker's error file is what torchrun's failure summary shows for the rank
    that failed first: a mistake only rank 1 meets (its share of the cases) is otherwise said
    by no one, since rank 0 alone prints and torchrun stops it when rank 1 exits. `delay_s`
    dates the record that much later."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not error_file:
        return
    # torch.distributed.elastic's error-file layout (ErrorHandler.record_exception's), with
    # the one line where it would put a traceback
    stamp = str(int(time.time()) + delay_s)
    record = {"message": {"message": line, "extraInfo": {"py_callstack": line + "\n",
                                                         "timestamp": stamp}}}
    with contextlib.suppress(OSError):
        Path(error_file).write_text(json.dumps(record), encoding="utf-8")


def _quiet_libraries() -> None:
    """nibabel logs what it mends in a header ("pixdim[1,2,3] should be non-zero") to the
    console, past medseg's own one-line messages about the same file."""
    import logging

    logging.getLogger("nibabel").setLevel(logging.ERROR)


def _tolerate_narrow_consoles() -> None:
    """A label name or path outside ASCII must not crash a run on an ASCII-locale console."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")


# ---------------------------------------------------------------- commands


def cmd_demo(args: argparse.Namespace) -> int:
    """Phantoms -> train -> predict the held-out cases -> evaluate."""
    from medseg.phantoms import write_phantom_dataset

    if _world_size() > 1:
        raise MedsegError("demo runs in one process: under torchrun, run `medseg train` "
                          "(then predict and evaluate in one process)")
    if not 0 <= args.seed < 2**32:  # NumPy's seed range
        raise MedsegError(f"--seed must be between 0 and {2**32 - 1}, got {args.seed}")
    _refuse_demo_dataset(args.overrides or [])
    out = Path(args.out)
    workflow_path = _demo_workflow_path()
    workflow = load_workflow(workflow_path, args.overrides)  # a bad --set before any work
    _refuse_demo_sources(workflow)
    _claim_demo_folder(out)
    started = time.monotonic()
    print(f"[1/4] writing 12 synthetic CT phantoms to {out / 'data'}")
    write_phantom_dataset(out / "data", n_train=8, n_test=4, seed=args.seed)
    print(f"[2/4] training with {workflow_path}")
    # set on the workflow, not as an override: YAML would read " #" in a path as a comment;
    # absolute, as load_workflow makes paths, so that a resume from elsewhere finds it
    data = os.path.abspath(out / "data")
    workflow = dataclasses.replace(
        workflow, dataset=dataclasses.replace(workflow.dataset, path=data))
    run_dir = out / "run"
    runs.train_run(workflow, run_dir, folds=[workflow.train.fold], overwrite=True)
    print(f"[3/4] segmenting the 4 held-out phantoms into {out / 'predictions'}")
    results = _predict([run_dir], [str(out / "data" / "imagesTs")], out / "predictions",
                       _PredictOptions(overwrite=True))
    _write_statistics(run_dir, results, out / "predictions", _PredictOptions())
    print(f"[4/4] scoring against {out / 'data' / 'labelsTs'}")
    from medseg.report_scans import scans_in_folder

    summary = _evaluate(out / "predictions", out / "data" / "labelsTs",
                        out / "data" / "dataset.json", out / "evaluation",
                        scans=scans_in_folder(out / "data" / "imagesTs"))
    print(f"report: {out / 'evaluation' / 'report.html'}")
    minutes = (time.monotonic() - started) / 60
    print(f"demo finished in {minutes:.1f} min; run folder {run_dir} "
          f"(use it as --model for medseg predict)")
    failed = any(r.error for r in results) or summary["failed_cases"]
    return 1 if failed else 0


def _refuse_demo_dataset(overrides: list[str]) -> None:
    given = [item for item in overrides if override_key(item).split(".")[0] == "dataset"]
    if given:
        raise MedsegError(f"--set {given[0]}: the demo writes and trains its own phantom "
                          f"dataset; to train on yours, run `medseg train`")


def _refuse_demo_sources(workflow: Workflow) -> None:
    """The demo trains its phantoms from scratch on splits of its own: train.init weights
    (whose network rarely fits the demo's plan) or a splits file (of another dataset's
    cases) are refused before any work, as a dataset is."""
    for key in ("init", "splits_file"):
        if getattr(workflow.train, key):
            raise MedsegError(f"--set train.{key}: the demo trains its own phantoms from "
                              f"scratch; to fine-tune, or to train on splits of your own, run "
                              f"`medseg train WORKFLOW --out RUN_DIR` with it")


def cmd_plan(args: argparse.Namespace) -> int:
    """fingerprint -> plan, printed (and saved with --out) without training."""
    from medseg.plan import describe_plan

    workflow = load_workflow(Path(args.workflow), args.overrides)
    if not workflow.dataset.path:
        raise MedsegError("dataset.path is not set", args.workflow)
    workflow = runs.folds_of_splits_file(workflow)
    out = Path(args.out) if args.out else None
    if out is not None:
        _check_plan_folder(out)
    init = None
    if workflow.train.init:  # as train plans it: the source's network keys, unless given
        from medseg.pretrained import adopt_source_network, resolve_init

        init = resolve_init(workflow.train.init)
        workflow = adopt_source_network(workflow, init,
                                        keys_given(Path(args.workflow), args.overrides))
    workflow, dataset = runs.read_run_dataset(workflow)
    splits, fp, plan = runs.plan_run(workflow, dataset)
    if init is not None:  # train would refuse it before any training
        from medseg.pretrained import keep_source_topology, refuse_unfit

        plan = keep_source_topology(init, plan)
        refuse_unfit(init, plan)
    print(describe_plan(plan, fp))
    if out is not None:
        _write_plan_folder(out, workflow, splits, fp, plan)
        print(f"wrote {out / 'plan.json'}, fingerprint.json, splits.json and workflow.yaml; "
              f"change the plan with --set plan.KEY=VALUE (medseg train takes the same)")
    return 0


def _write_plan_folder(out: Path, workflow: Workflow, splits: list[dict], fp: Fingerprint,
                       plan: Plan) -> None:
    """The four files as one set (the texts made first, then renamed together): a stop or a
    failure leaves an earlier plan's set whole, not a new plan.json beside old splits."""
    from medseg.config import workflow_yaml
    from medseg.fileio import atomic_write_texts, json_text
    from medseg.plan import fingerprint_json

    texts = {"plan.json": json_text(plan.to_json()),
             "fingerprint.json": json_text(fingerprint_json(fp)),
             "splits.json": json_text(splits),
             "workflow.yaml": workflow_yaml(workflow)}
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_texts({out / name: text for name, text in texts.items()})
    except OSError as exc:
        raise MedsegError(f"cannot write ({exc.strerror or exc})", exc.filename or out) from exc


def _check_plan_folder(out: Path) -> None:
    """A new or empty folder, or one `medseg plan` wrote (its files are replaced); checked
    before the dataset is read."""
    from medseg.fileio import refuse_unwritable_place

    if out.exists() and not out.is_dir():
        raise MedsegError("output folder path is a file", out)
    ours = {"plan.json", "fingerprint.json", "splits.json", "workflow.yaml"}
    if out.is_dir():  # a plan's name given to a folder is no plan's file either
        others = sorted(p.name for p in out.iterdir()
                        if p.name not in ours or p.is_dir())
        if others:
            raise MedsegError(f"holds other files than a plan's ({', '.join(others[:3])}): "
                              f"choose a new or empty folder (a run folder is medseg "
                              f"train's)", out)
        held = sorted(p.name for p in out.iterdir())
        if held and "plan.json" not in held:  # plan.json is what a plan writes first
            raise MedsegError(f"holds {', '.join(held)} but no plan.json: no earlier medseg "
                              f"plan wrote it, and its files would be replaced; choose a new "
                              f"or empty folder", out)
    else:
        refuse_unwritable_place(out)


def cmd_train(args: argparse.Namespace) -> int:
    """One process, or one of several started by torchrun (DistributedDataParallel)."""
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0:
        # a restarted worker runs the same command again: `--out` is refused as existing,
        # and the restarted processes were seen to hang
        raise MedsegError("torchrun --max-restarts is not supported: a stopped run continues "
                          "with `medseg train --resume RUN_DIR`")
    if args.resume:
        if args.init:
            raise MedsegError("--init starts a new run from trained weights; --resume goes on "
                              "from the run's own checkpoint (it never loads its train.init "
                              "weights again): give one")
        if args.workflow or args.out:
            raise MedsegError("--resume takes the run folder alone (its saved workflow is used)")
        if args.overwrite:
            raise MedsegError("--resume continues a run and --overwrite starts it again: give "
                              "one (to start again: medseg train WORKFLOW --out RUN_DIR "
                              "--overwrite)")
        for override in args.overrides or []:
            if override_key(override) not in runs.RESUME_OVERRIDES:
                raise MedsegError(f"--resume continues the saved workflow: of its keys, --set "
                                  f"may only change {', '.join(runs.RESUME_OVERRIDES)}, not "
                                  f"'{override}'")
        job = functools.partial(runs.resume_run, Path(args.resume), args.fold, args.overrides)
    else:
        if not args.workflow or not args.out:
            raise MedsegError("train needs a WORKFLOW and --out RUN_DIR (or --resume RUN_DIR)")
        # --init SOURCE is train.init, over the workflow's and any --set of it
        overrides = [*args.overrides, *([f"train.init={args.init}"] if args.init else [])]
        workflow = load_workflow(Path(args.workflow), overrides)
        if not workflow.dataset.path:
            raise MedsegError("dataset.path is not set", args.workflow)
        workflow = runs.folds_of_splits_file(workflow)
        folds = runs.parse_folds(args.fold, workflow.train.folds, workflow.train.fold)
        job = functools.partial(runs.train_run, workflow, Path(args.out), folds,
                                overwrite=args.overwrite, workflow_file=Path(args.workflow),
                                given=keys_given(Path(args.workflow), overrides))
    from medseg.train import distributed_session

    run_dir = Path(args.resume or args.out)
    with distributed_session() as ranks, _stdout_of_main_rank_only(ranks.main), \
            runs.one_trainer(run_dir, ranks):
        job()
        print(f"to score each fold's held-out cases on their own grids: medseg crossval "
              f"{run_dir}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    folds = _parse_predict_folds(args.folds)
    check_in_range("predict.step", args.step, "--step")
    options = _PredictOptions(folds=folds, overwrite=args.overwrite, tta=args.tta,
                              step=args.step, device=args.device, series_uid=args.series,
                              resample_irregular=args.resample_irregular, shard=args.shard,
                              debug=args.debug, dicom_seg=args.dicom_seg,
                              overrides=tuple(args.overrides))
    if args.statistics:
        _check_statistics_without_shards(args.shard)
    if args.reference:
        _check_reference_without_shards(args.shard, args.output, args.reference)
        if not Path(args.reference).is_dir():  # before the batch, not after it
            raise MedsegError("reference folder not found", args.reference)
        _refuse_output_in_reference(args.output, args.reference)
    _refuse_repeated_archives(args.model)
    with contextlib.ExitStack() as archives:
        models = [_run_folder_of(Path(model), archives) for model in args.model]
        code = _predict_and_report(args, models, options)
    _wait_for_the_other_processes()
    return code


def _wait_for_the_other_processes() -> None:
    """Under torchrun, a process that has finished its share of the batch waits for the
    others before it exits: torchrun stops every process as soon as one exits with a failure
    (exit 1 when some of its cases failed), which cut the others' shares short. The wait
    runs in a thread, so that Ctrl-C and SIGTERM still stop this one at once."""
    if _world_size() <= 1 or "MASTER_ADDR" not in os.environ:
        return
    errors: list[BaseException] = []
    waiting = threading.Thread(target=_barrier_of_all_processes, args=(errors,), daemon=True)
    waiting.start()
    while waiting.is_alive():
        waiting.join(0.5)
    if errors:
        raise errors[0]


def _barrier_of_all_processes(errors: list[BaseException]) -> None:
    import datetime

    import torch.distributed as dist

    try:
        # one share may take hours longer than another: not the default 30 minutes
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=30))
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
    except Exception as exc:  # raised again in the main thread
        errors.append(exc)


def _refuse_repeated_archives(models: list[str]) -> None:
    """Each archive is unpacked into a folder of its own, where predict's check of runs
    named twice would no longer see one given twice."""
    from medseg.archive import is_archive

    seen: dict[str, str] = {}
    for model in (model for model in models if is_archive(Path(model))):
        key = os.path.realpath(model)
        if key in seen:  # named as given, as predict names a run folder given twice
            spelt = f" (also as {seen[key]})" if seen[key] != model else ""
            raise MedsegError(f"given twice to --model{spelt}: each run would count twice in "
                              f"the mean", model)
        seen[key] = model


def _run_folder_of(model: Path, archives: contextlib.ExitStack) -> Path:
    """A run folder as given, or a model archive of `medseg export` unpacked for the command."""
    from medseg.archive import is_archive, opened_model

    return archives.enter_context(opened_model(model)) if is_archive(model) else model


def _predict_and_report(args: argparse.Namespace, models: list[Path],
                        options: _PredictOptions) -> int:
    results = _predict(models, args.input, Path(args.output), options)
    failed = sum(1 for r in results if r.error)
    if failed and failed == len(results):
        return EXIT_USER_ERROR  # nothing could be done with the inputs given
    if args.statistics:
        _write_statistics(models[0], results, Path(args.output), options)
    if args.reference:
        from medseg.datasets import strip_image_suffix
        from medseg.predict import output_name

        # a case that failed now is not scored: its mask, if any, is an earlier run's
        batch = {strip_image_suffix(output_name(r.input)): r.input for r in results
                 if not r.error}
        summary = _evaluate_predictions(models[0], Path(args.output),
                                        Path(args.reference), batch, options)
        if summary["failed_cases"]:
            return 1
    return 1 if failed else 0


def _check_statistics_without_shards(shard: str | None) -> None:
    """statistics.csv covers the batch, which one shard has only part of."""
    from medseg.predict import parse_shard

    if parse_shard(shard)[1] > 1:
        raise MedsegError("--statistics writes one table for the whole batch, and this "
                          "process predicts one shard of it: once every shard has finished, "
                          "run the command again in one process (no --shard, no torchrun) "
                          "with --statistics; the masks written are kept, not redone")


def _write_statistics(model: Path, results: list, output: Path,
                      options: _PredictOptions) -> None:
    """OUTPUT/statistics.csv: volume and scan intensity of each structure of each case of
    this batch (those that failed now left out), with the model's label names."""
    from medseg.datasets import strip_image_suffix
    from medseg.plan import load_plan
    from medseg.predict import output_name
    from medseg.volumetry import STATISTICS_FILE, CaseInputs, write_statistics

    items = [CaseInputs(strip_image_suffix(output_name(r.input)), r.output, r.input,
                        r.channel_files) for r in results if not r.error and r.output is not None]
    target = output / STATISTICS_FILE
    plan = load_plan(model / "plan.json")
    count = write_statistics(items, plan.labels, target, options.series_uid,
                             options.resample_irregular, plan.in_channels)
    print(f"wrote {target} ({count} case(s))")


def _refuse_output_in_reference(output: str, reference: str) -> None:
    """Masks written into the references' folder would replace them (with --overwrite), or,
    kept as existing, score the references against themselves: Dice 1 without a word."""
    from medseg.evaluate import same_folder

    if same_folder(output, reference):
        raise MedsegError("--output is the --reference folder: the masks would replace the "
                          "references, or be scored as themselves; write them elsewhere",
                          output)


def _check_reference_without_shards(shard: str | None, output: str, reference: str) -> None:
    """--reference scores the whole output folder, which one shard has only part of."""
    from medseg.predict import parse_shard

    if parse_shard(shard)[1] > 1:
        raise MedsegError(f"--reference scores every case, and this process predicts one "
                          f"shard of them: once every shard has finished, run `medseg "
                          f"evaluate --pred {output} --ref {reference} --out "
                          f"{Path(output) / 'evaluation'}`")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from medseg.report_scans import scans_in_folder

    scans = scans_in_folder(Path(args.images)) if args.images else None  # before any scoring
    summary = _evaluate(Path(args.pred), Path(args.ref),
                        Path(args.labels) if args.labels else None,
                        Path(args.out) if args.out else None, tolerance_mm=args.tolerance_mm,
                        jobs=args.jobs, resample=args.resample, scans=scans)
    return 1 if summary["failed_cases"] else 0


def cmd_crossval(args: argparse.Namespace) -> int:
    from medseg.crossval import CrossvalRequest, cross_validate, default_out

    folds = _parse_predict_folds(args.folds)
    check_in_range("predict.step", args.step, "--step")
    runs_given = [Path(run) for run in args.runs]
    out = Path(args.out) if args.out else default_out(runs_given)
    summary = cross_validate(CrossvalRequest(
        tuple(runs_given), out, tuple(folds) if folds is not None else None, args.dataset,
        tuple(args.overrides), args.tta, args.step, args.device, args.overwrite,
        args.tolerance_mm, args.jobs, args.resume))
    return 1 if summary["failed_cases"] else 0


def cmd_export(args: argparse.Namespace) -> int:
    from medseg.archive import export_run

    folds = _parse_predict_folds(args.folds)
    exported = export_run(Path(args.run), Path(args.archive), folds, args.overwrite)
    print(f"wrote {exported.path} ({exported.size / 2**20:.1f} MB: "
          f"{', '.join(f'fold_{k}' for k in exported.folds)}); segment with it: medseg predict "
          f"--model {exported.path} --input ... --output ...")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from medseg.check import check_dataset

    report = check_dataset(Path(args.dataset), args.layout)
    print(report.format_table())
    return report.exit_code(args.strict)


def cmd_convert(args: argparse.Namespace) -> int:
    from medseg.io import convert_volume, header_note, is_nifti, read_geometry

    if args.series:
        _refuse_another_series(Path(args.input), args.series)
    written = convert_volume(Path(args.input), Path(args.output), args.series,
                             args.resample_irregular)
    print(f"wrote {written}")
    _note_one_file_of_a_series(Path(args.input))
    header_file = Path(args.input).suffix.lower() in (".nii", ".gz", ".nrrd", ".nhdr")
    note = header_note(read_geometry(args.input)) if header_file else None
    if note and not (is_nifti(args.input) and is_nifti(written)):
        print(f"medseg: note: {args.input}: {note}; {written.name} holds medseg's reading",
              file=sys.stderr)
    return 0


def _note_one_file_of_a_series(source: Path) -> None:
    """One DICOM file of a series folder is converted alone (a volume of its frames only)."""
    from medseg.dicom import is_dicom_file, series_files_beside

    if not source.is_file() or not is_dicom_file(source):
        return
    others = series_files_beside(source)
    if others:
        print(f"medseg: note: {source}: this file alone was converted; its folder holds "
              f"{others} more file(s) of its series: give the folder ({source.parent}) to "
              f"convert the whole series", file=sys.stderr)


def cmd_convert_msd(args: argparse.Namespace) -> int:
    from medseg.msd import convert_msd, print_conversion

    print_conversion(convert_msd(Path(args.task), Path(args.out), args.jobs))
    return 0


def _refuse_another_series(path: Path, series_uid: str) -> None:
    """A folder of one series (or one DICOM file) is read as it is whatever --series says
    (predict's batches mix such folders); convert reads one input, so a --series it does not
    hold is a mistake."""
    from medseg.dicom import is_dicom_file, list_series

    if not path.is_dir() and not (path.is_file() and is_dicom_file(path)):
        return
    series = list_series(path)
    held = "the folder holds one" if path.is_dir() else "the file is of another"
    if len(series) == 1 and series[0].uid != series_uid:
        raise MedsegError(f"no series {series_uid}; {held}, {series[0].uid} "
                          f"'{series[0].description}' ({series[0].n_images} images): leave "
                          f"out --series to convert it", path)


# ---------------------------------------------------------------- wiring


@dataclass(frozen=True)
class _PredictOptions:
    folds: list[int] | None = None
    overwrite: bool = False
    tta: bool | None = None  # None: the run's predict.tta
    step: float | None = None
    device: str | None = None
    series_uid: str | None = None
    resample_irregular: bool = False
    shard: str | None = None
    debug: bool = False  # each failed case's traceback
    dicom_seg: bool = False  # a DICOM SEG beside the mask of each DICOM series
    overrides: tuple[str, ...] = ()  # --set predict.KEY=VALUE


def _predict(models: list[Path], inputs: list[str], output: Path,
             options: _PredictOptions) -> list:
    from medseg.predict import (
        collect_inputs,
        load_predictor,
        parse_shard,
        predict_paths,
        predict_settings,
        without_earlier_masks,
    )

    shard = parse_shard(options.shard)
    if output.exists() and not output.is_dir():
        raise MedsegError("output folder path is a file", output)
    paths = without_earlier_masks(collect_inputs(inputs), output)
    predictor = load_predictor(models, options.folds, options.device)
    config = predict_settings(models, options.overrides, options.tta, options.step)
    started = time.monotonic()
    results = predict_paths(predictor, paths, output, config, overwrite=options.overwrite,
                            series_uid=options.series_uid,
                            resample_irregular=options.resample_irregular, shard=shard,
                            dicom_seg=options.dicom_seg)
    done = [r for r in results if r.output and not r.skipped]
    skipped = [r for r in results if r.skipped]
    failed = [r for r in results if r.error]
    if options.debug:
        for result in failed:
            traceback.print_exception(result.exception)
    shard_note = f" (shard {shard[0]}/{shard[1]})" if shard[1] > 1 else ""
    print(f"predicted {len(done)} of {len(results)} cases{shard_note} with "
          f"{', '.join(predictor.folds)} in {time.monotonic() - started:.1f} s; "
          f"skipped {len(skipped)} existing (--overwrite to redo); failed {len(failed)}")
    if failed:
        _list_failures([r.input for r in failed], output)
    return results


def _list_failures(inputs: list[Path], output: Path) -> None:
    """The failed inputs once more at the end (their reasons lie among the progress lines of
    a long batch), and those whose mask in OUTPUT is an earlier run's: nothing in the folder
    tells a stale mask from a fresh one."""
    from medseg.predict import output_name

    def listed(paths: list) -> str:
        more = f" and {len(paths) - 5} more" if len(paths) > 5 else ""
        return ", ".join(str(p) for p in paths[:5]) + more

    print(f"failed: {listed(inputs)}", file=sys.stderr)
    stale = [output_name(path) for path in inputs
             if (output / output_name(path)).is_file()
             and (output / output_name(path)).stat().st_size > 0]  # an empty one is no mask
    if stale:
        print(f"medseg: note: {len(stale)} failed case(s) keep a mask in {output} from an "
              f"earlier run, not from this one: {listed(stale)}", file=sys.stderr)


def _evaluate(pred: Path, ref: Path, labels_path: Path | None, out: Path | None,
              tolerance_mm: float = 2.0, jobs: int = 1, resample: bool = False,
              scans: Scans | None = None) -> dict:
    from medseg.report import run_evaluation

    return run_evaluation(pred, ref, labels_path, out, tolerance_mm=tolerance_mm, jobs=jobs,
                          resample=resample, scans=scans)


def _evaluate_predictions(model: Path, output: Path, reference: Path, batch: dict[str, Path],
                          options: _PredictOptions) -> dict:
    """`medseg predict --reference`: score this batch's masks (its cases, each with its input
    scan, channel 0's file: masks of earlier runs in OUTPUT, or references of other cases,
    are left out) at once, with the model's label names, into OUTPUT/evaluation (the same
    code as `medseg evaluate`), the report's overlays drawn on the batch's own scans."""
    from medseg.plan import load_plan
    from medseg.report import run_evaluation
    from medseg.report_scans import scans_of_inputs

    plan = load_plan(model / "plan.json")
    scans = scans_of_inputs(batch, options.series_uid, options.resample_irregular)
    return run_evaluation(output, reference, None, output / "evaluation",
                          label_names=plan.labels, only_cases=set(batch),
                          ignore_label=plan.ignore_label, scans=scans)


def _demo_workflow_path() -> Path:
    """workflows/demo.yaml of the checkout, or the copy an installed wheel holds."""
    package = Path(__file__).resolve().parent
    for path in (package.parent / "workflows" / "demo.yaml",
                 package / "workflows" / "demo.yaml"):
        if path.is_file():
            return path
    raise MedsegError("the demo workflow is missing: reinstall medseg", path)


@contextlib.contextmanager
def _stdout_of_main_rank_only(main: bool) -> Iterator[None]:
    """Under torchrun, rank 0 alone reports; the other ranks' messages would repeat it."""
    if main:
        yield
        return
    with open(os.devnull, "w", encoding="utf-8") as sink, contextlib.redirect_stdout(sink):
        yield


def _parse_predict_folds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    if not text.strip():  # it meant every fold, as if --folds were not given
        raise MedsegError("--folds is empty (an unset shell variable?): give fold numbers, "
                          "or leave --folds out for every trained fold")
    try:
        return [int(part) for part in text.split(",")]
    except ValueError as exc:
        raise MedsegError(f"--folds takes comma-separated fold numbers, got {text!r}") from exc


def _claim_demo_folder(out: Path) -> None:
    """The demo replaces its own earlier output, and nothing else."""
    from medseg.fileio import refuse_unwritable_place

    if out.exists() and not out.is_dir():
        raise MedsegError("output folder path is a file", out)
    refuse_unwritable_place(out)
    if out.exists() and any(out.iterdir()):
        if not (out / DEMO_MARKER).exists():
            raise MedsegError("folder exists and was not made by `medseg demo`; choose "
                              "another --out", out)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text(json.dumps({"made_by": "medseg demo"}) + "\n", encoding="utf-8")


def _versions() -> str:
    """medseg's version and those of the libraries that decide its results (a bug report
    needs them), read from the installed packages' metadata without importing them."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for package in ("medseg", "torch", "monai", "nibabel", "pydicom", "SimpleITK",
                    "highdicom"):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            found.append(f"{package} (not installed)")
    return ", ".join(found)


class _PrintVersions(argparse.Action):
    """--version: the versions on one line, whatever the terminal's width (argparse's own
    version action wraps its text to it, splitting a bug report's line)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the versions of medseg and the libraries behind its "
                              "results, and exit")

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(_versions())
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medseg", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action=_PrintVersions)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    dicom = argparse.ArgumentParser(add_help=False)
    dicom.add_argument("--series", default=None, metavar="UID",
                       help="SeriesInstanceUID to read from DICOM folders that hold several "
                       "series (a folder with one series is read as it is)")
    dicom.add_argument("--resample-irregular", action="store_true",
                       help="resample a tilted or unevenly spaced DICOM series onto a regular "
                            "grid instead of refusing it")
    windows = _window_options()
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", parents=[common],
                          help="train, segment and score synthetic CT phantoms")
    demo.add_argument("--out", default="medseg_demo", type=_path_text,
                      help="output folder (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0,
                      help="the phantoms' seed, 0 to 2^32 - 1 (default: %(default)s)")
    demo.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="KEY=VALUE", help="override a workflow key, e.g. train.epochs=5")
    demo.set_defaults(handler=cmd_demo)

    plan = sub.add_parser("plan", parents=[common],
                          help="fingerprint a dataset and print the plan train would use")
    plan.add_argument("workflow", type=_path_text, help="workflow YAML file")
    plan.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="KEY=VALUE", help="override a workflow key (repeatable), as "
                      "for train")
    plan.add_argument("--out", default=None, type=_path_text,
                      help="also write plan.json, fingerprint.json, splits.json and "
                           "workflow.yaml into this folder")
    plan.set_defaults(handler=cmd_plan)

    train = sub.add_parser("train", parents=[common], help="train on a labelled dataset")
    train.add_argument("workflow", nargs="?", type=_path_text, help="workflow YAML file")
    train.add_argument("--out", type=_path_text, help="run folder to create")
    train.add_argument("--resume", metavar="RUN_DIR", type=_path_text,
                       help="continue a run from its last checkpoint (weights, optimizer, "
                            "scheduler and epoch; random streams drawn again from the seed "
                            "and epoch)")
    train.add_argument("--fold", default=None, help="fold index, or 'all' (default: "
                       "train.fold of the workflow)")
    train.add_argument("--init", metavar="SOURCE", type=_path_text,
                       help="fine-tune: start from the weights of a trained run (RUN_DIR: its "
                            "fold_0's best; RUN_DIR/fold_K; a model archive of medseg export; or "
                            "a .safetensors file), all but "
                            "the segmentation heads; sets train.init")
    train.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="override a workflow key (repeatable); "
                       "with --resume only train.max_minutes (a new budget), "
                       "dataset.path (a moved dataset), train.cache and "
                       "train.num_workers")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run")
    train.set_defaults(handler=cmd_train)

    predict = sub.add_parser("predict", parents=[common, dicom, windows],
                             help="segment new volumes")
    predict.add_argument("--model", required=True, nargs="+", type=_path_text,
                         help="run folder made by medseg train, or a model .zip of medseg "
                              "export; several: an ensemble (the mean of their "
                              "probabilities, each run weighing the same)")
    predict.add_argument("--input", required=True, nargs="+", type=_path_text,
                         help="files or folders")
    predict.add_argument("--output", required=True, type=_path_text, help="folder for the masks")
    predict.add_argument("--folds", default=None, help="comma-separated folds (default: all "
                         "trained)")
    predict.add_argument("--overwrite", action="store_true", help="redo existing outputs")
    predict.add_argument("--dicom-seg", action="store_true",
                         help="for each DICOM series input, also write CASE.seg.dcm: a DICOM "
                              "Segmentation on the series' own images")
    predict.add_argument("--shard", default=None, metavar="I/N",
                         help="predict every N-th case from the I-th (0-based), so that N "
                              "processes share a batch; under torchrun, RANK/WORLD_SIZE")
    predict.add_argument("--statistics", action="store_true",
                         help="also write OUTPUT/statistics.csv: each structure's volume (ml) "
                              "and the scan's mean and sd inside it, per case")
    predict.add_argument("--reference", default=None, metavar="DIR", type=_path_text,
                         help="folder of reference masks: score the predictions at once "
                              "into OUTPUT/evaluation")
    predict.set_defaults(handler=cmd_predict)

    crossval = sub.add_parser("crossval", parents=[common, windows],
                              help="segment and score each fold's held-out cases")
    crossval.add_argument("runs", nargs="+", metavar="RUN_DIR", type=_path_text,
                          help="run folder made by medseg train; several: an ensemble "
                               "(their splits must agree)")
    crossval.add_argument("--out", default=None, type=_path_text,
                          help="folder for the masks and scores (default: RUN_DIR/crossval; "
                               "needed for an ensemble)")
    crossval.add_argument("--folds", default=None,
                          help="comma-separated folds (default: those trained in every run)")
    crossval.add_argument("--dataset", default=None, metavar="PATH", type=_path_text,
                          help="the run's dataset where it lies now (default: the workflow's "
                               "dataset.path)")
    crossval.add_argument("--tolerance-mm", type=float, default=2.0,
                          help="surface Dice tolerance in mm (default: %(default)s)")
    crossval.add_argument("--jobs", type=int, default=1,
                          help="cases scored in parallel processes (default: %(default)s)")
    crossval.add_argument("--overwrite", action="store_true",
                          help="predict and score an earlier cross-validation's folder again")
    crossval.add_argument("--continue", dest="resume", action="store_true",
                          help="go on with an earlier cross-validation of the same runs and "
                               "settings: segment only the cases it has no mask of (a fold "
                               "whose weights changed is segmented again), then score all")
    crossval.set_defaults(handler=cmd_crossval)

    evaluate = sub.add_parser("evaluate", parents=[common], help="score masks against labels")
    evaluate.add_argument("--pred", required=True, type=_path_text,
                          help="folder of predicted masks")
    evaluate.add_argument("--ref", required=True, type=_path_text, help="folder of reference masks")
    evaluate.add_argument("--labels", default=None, type=_path_text,
                          help="dataset.json or labels.json")
    evaluate.add_argument("--out", default=None, type=_path_text,
                          help="folder for scores.csv, summary.json and report.html")
    evaluate.add_argument("--tolerance-mm", type=float, default=2.0,
                          help="surface Dice tolerance in mm (default: %(default)s)")
    evaluate.add_argument("--jobs", type=int, default=1,
                          help="cases scored in parallel processes (default: %(default)s)")
    evaluate.add_argument("--resample", action="store_true",
                          help="resample a prediction that is not on its reference's grid "
                               "(nearest neighbour) instead of failing the case")
    evaluate.add_argument("--images", default=None, metavar="DIR", type=_path_text,
                          help="folder of the scans (CASE or CASE_0000), drawn under the "
                               "report's overlays")
    evaluate.set_defaults(handler=cmd_evaluate)

    export = sub.add_parser("export", parents=[common],
                            help="pack a trained run into one zip file for another site")
    export.add_argument("run", metavar="RUN_DIR", type=_path_text,
                        help="run folder made by medseg train")
    export.add_argument("archive", metavar="MODEL_ZIP", type=_path_text,
                        help="the .zip file to write")
    export.add_argument("--folds", default=None,
                        help="comma-separated folds (default: every trained fold)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing archive")
    export.set_defaults(handler=cmd_export)

    check = sub.add_parser("check", parents=[common],
                           help="report every problem of a dataset before training")
    check.add_argument("dataset", type=_path_text,
                       help="dataset folder, its dataset.json, or a CSV file")
    check.add_argument("--layout", default="auto",
                       choices=["auto", "msd", "nnunet", "folders", "csv"],
                       help="the dataset's layout, as dataset.layout of a workflow "
                            "(default: %(default)s, found as training finds it)")
    check.add_argument("--strict", action="store_true",
                       help="exit 1 on warnings too (without it, on errors only)")
    check.set_defaults(handler=cmd_check)

    convert = sub.add_parser("convert", parents=[common, dicom],
                             help="convert a scan to NIfTI, NRRD or MHA")
    convert.add_argument("input", type=_path_text, help="volume file, DICOM file or DICOM folder")
    convert.add_argument("output", type=_path_text,
                         help="output file: .nii.gz, .nii, .nrrd or .mha")
    convert.set_defaults(handler=cmd_convert)

    convert_msd = sub.add_parser("convert-msd", parents=[common],
                                 help="write an MSD task in nnU-Net's layout, one file per "
                                      "channel")
    convert_msd.add_argument("task", type=_path_text,
                             help="MSD task folder (holding dataset.json, imagesTr, labelsTr)")
    convert_msd.add_argument("out", type=_path_text, help="new (or empty) folder to write")
    convert_msd.add_argument("--jobs", type=int, default=1,
                             help="files written in parallel threads (default: %(default)s)")
    convert_msd.set_defaults(handler=cmd_convert_msd)
    return parser


def _window_options() -> argparse.ArgumentParser:
    """How predict and crossval run the networks: over the run's predict section."""
    windows = argparse.ArgumentParser(add_help=False)
    windows.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                         help="average over mirrored copies, or not (default: the run's "
                              "predict.tta)")
    windows.add_argument("--step", type=float, default=None,
                         help="window step as a fraction of the patch (default: the run's "
                              "predict.step)")
    windows.add_argument("--device", default=None,
                         help="cpu, cuda or cuda:N (default: cuda if found)")
    windows.add_argument("--set", dest="overrides", action="append", default=[],
                         metavar="predict.KEY=VALUE",
                         help="override a key of the run's predict section (repeatable), e.g. "
                              "predict.largest_component=[1,2]")
    return windows


def _path_text(text: str) -> str:
    """A path argument: an empty one (`--output ""`, an unset shell variable) would mean the
    current folder, not what the user meant."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path (an unset shell variable?)")
    return text


def _exit(code: int) -> None:
    """End the process with `code`. A torchrun worker (WORLD_SIZE > 1) skips the
    interpreter's teardown once its output is flushed: with the gloo process group already
    destroyed, that teardown now and then ended a finished run in "terminate called without
    an active exception" (SIGABRT), and torchrun then failed the whole run."""
    if _world_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code in (130, EXIT_TERMINATED):
        # stopped: a second Ctrl-C while the interpreter joins pool threads at exit
        # (concurrent.futures' atexit hook) printed "Exception ignored in: <module
        # 'threading'> ... KeyboardInterrupt" after "medseg: interrupted"
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)


def run() -> None:
    """The `medseg` console script and `python -m medseg`: main's exit code, by `_exit`."""
    _exit(main())


if __name__ == "__main__":
    run()
