"""Ctrl-C and SIGTERM end a command once, cleanly, whatever the process is doing: a stop
that Python dropped inside a finalizer is raised again at the next step, evaluation's worker
processes leave the stop to the main process, and files that belong together are renamed
with the stop held back (findings of an interruption trial)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import REPO, TINY_TRAINING, as_sets

from medseg.cli import main


def test_a_ctrl_c_that_python_drops_in_a_finalizer_still_stops_training(
        tmp_path, phantom_dataset, monkeypatch, capsys):
    """A DataLoader worker's queue, or logging, was releasing a lock when Ctrl-C came: Python
    printed "Exception ignored in ... KeyboardInterrupt" and training ran on to its end."""
    import medseg.train as train_module

    reseed = train_module._reseed

    class Finalized:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)  # its KeyboardInterrupt is raised in here

    def reseed_and_drop_a_ctrl_c(*args, **kwargs) -> None:
        reseed(*args, **kwargs)
        Finalized()

    monkeypatch.setattr(train_module, "_reseed", reseed_and_drop_a_ctrl_c)
    dropped = []  # what Python prints as "Exception ignored in ..."
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: dropped.append(
        unraisable.exc_type))
    run = tmp_path / "run"
    code = main(["train", str(REPO / "workflows" / "demo.yaml"), "--out", str(run),
                 *as_sets([f"dataset.path={phantom_dataset}", *TINY_TRAINING,
                           "train.num_workers=0", "train.epochs=3"])])
    err = capsys.readouterr().err
    assert dropped  # Python dropped it, as in the trial
    assert code == 130
    assert err.rstrip().endswith("medseg: interrupted")
    assert not (run / "fold_0" / "metrics.jsonl").is_file() or len(
        (run / "fold_0" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()) < 3


def write_cases(folder: Path, count: int, shift: int, shape=(200, 200, 200)) -> None:
    """Two nested balls per case; `shift` moves them, so that scoring has surfaces to
    compare."""
    folder.mkdir(parents=True)
    grid = np.indices(shape).astype(np.float32)
    for k in range(count):
        centre = np.array(shape) / 2 + k + shift
        distance = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(axis=0))
        mask = ((distance < 70).astype(np.uint8) + (distance < 30 + k)).astype(np.uint8)
        nib.save(nib.Nifti1Image(mask, np.eye(4)), str(folder / f"case{k}.nii.gz"))


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_ends_parallel_evaluation_at_once(tmp_path):
    """A terminal sends Ctrl-C to every process of the group: the workers printed tracebacks,
    and one could die holding the result queue's lock, so that evaluate never returned."""
    write_cases(tmp_path / "ref", 12, shift=0)
    write_cases(tmp_path / "pred", 12, shift=3)
    process = subprocess.Popen(
        [sys.executable, "-m", "medseg.cli", "evaluate", "--pred", str(tmp_path / "pred"),
         "--ref", str(tmp_path / "ref"), "--out", str(tmp_path / "evaluation"), "--jobs", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
        errors="replace", start_new_session=True)
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(
        lambda: process.stderr.read(1), "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while "1/12" not in "".join(chunks) and time.monotonic() < deadline:
        time.sleep(0.05)  # until the workers have scored a case and are busy with more
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        pytest.fail("evaluate hung after Ctrl-C")
    reader.join(10)
    err = "".join(chunks)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.rstrip().endswith("medseg: interrupted")
    assert not (tmp_path / "evaluation").exists()  # made by evaluate, left empty


def test_files_written_together_are_renamed_with_the_stop_held_back(tmp_path, monkeypatch):
    """A Ctrl-C between the renames of scores.csv and summary.json left the new scores beside
    the old summary and report."""
    from medseg import stopping
    from medseg.fileio import atomic_write_texts

    files = {tmp_path / name: f"old {name}" for name in ("a.csv", "b.json", "c.html")}
    for path, text in files.items():
        path.write_text(text, encoding="utf-8")
    replace = os.replace
    calls = []

    def replace_and_interrupt(source, target) -> None:
        replace(source, target)
        calls.append(target)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # between the first rename and the second

    monkeypatch.setattr(os, "replace", replace_and_interrupt)
    restore = stopping.install()
    # another thread running (a progress bar's, a pool's): the kernel may hand it the signal
    waiting = threading.Event()
    bystander = threading.Thread(target=waiting.wait, daemon=True)
    bystander.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            atomic_write_texts({path: f"new {path.name}" for path in files})
    finally:
        waiting.set()
        restore()
    assert [path.read_text(encoding="utf-8") for path in files] == [
        f"new {path.name}" for path in files]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.json", "c.html"]


@pytest.mark.slow
def test_a_second_predict_into_the_same_folder_is_refused(tmp_path, trained_run,
                                                          phantom_dataset, capsys):
    """It took the first one's half-written masks for stale leftovers and deleted them, and
    wrote its own (another model's) beside or over them."""
    from medseg.predict import PREDICT_LOCK, _one_predictor

    inputs = phantom_dataset / "imagesTs"
    output = tmp_path / "masks"
    output.mkdir()
    with _one_predictor(output, (0, 1)):  # a first predict at work
        code = main(["predict", "--model", str(trained_run), "--input", str(inputs),
                     "--output", str(output)])
        assert code == 2
        assert (f"{output}: another `medseg predict` is writing into this folder; wait for it "
                f"to end, or choose another --output") in capsys.readouterr().err
        assert not list(output.glob("*.nii.gz"))
    with _one_predictor(output, (0, 2)):  # shards of one batch share the folder
        assert main(["predict", "--model", str(trained_run), "--input", str(inputs),
                     "--output", str(output), "--shard", "1/2"]) == 0
        assert main(["predict", "--model", str(trained_run), "--input", str(inputs),
                     "--output", str(output), "--shard", "0/2"]) == 2
    assert len(list(output.glob("*.nii.gz"))) == 1  # shard 1/2's case
    assert not list(output.glob(f"{PREDICT_LOCK}*"))  # the lock files go with the runs


def test_a_signal_the_process_was_started_ignoring_stays_ignored():
    """`cmd &` from a script starts it ignoring SIGINT; install() made Ctrl-C stop it."""
    from medseg import stopping

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        restore = stopping.install()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL  # handled as before
        restore()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_reports_are_not_renamed_at_all_when_one_cannot_be(tmp_path):
    """report.html a folder: scores.csv and summary.json were replaced, then the error named
    the output folder."""
    from medseg.errors import MedsegError
    from medseg.report import write_reports

    (tmp_path / "scores.csv").write_text("old", encoding="utf-8")
    (tmp_path / "report.html").mkdir()
    with pytest.raises(MedsegError, match=r"report\.html: cannot write \(Is a directory\)"):
        write_reports([], tmp_path)
    assert (tmp_path / "scores.csv").read_text(encoding="utf-8") == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "scores.csv"]


@pytest.mark.slow
def test_predict_goes_on_without_a_lock_where_the_filesystem_has_none(
        tmp_path, trained_run, phantom_dataset, monkeypatch):
    import errno
    import fcntl

    def no_locks(handle, mode) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert main(["predict", "--model", str(trained_run), "--input",
                 str(phantom_dataset / "imagesTs"), "--output", str(tmp_path / "masks")]) == 0
    assert len(list((tmp_path / "masks").glob("*.nii.gz"))) == 2
    assert not list((tmp_path / "masks").glob(".medseg-predict.lock*"))


RACE_SCRIPT = """
import os, signal
from medseg import stopping
signal.signal(signal.SIGCHLD, lambda *a: None)  # torch's DataLoader handler stands in
stopping.install()
both = {signal.SIGTERM, signal.SIGCHLD}
signal.pthread_sigmask(signal.SIG_BLOCK, both)
os.kill(os.getpid(), signal.SIGCHLD)
os.kill(os.getpid(), signal.SIGTERM)
try:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, both)
    sum(range(1000))
except stopping.Terminated:
    sum(range(1000))  # the pending SIGCHLD is handled here
    print("stopped")
"""


def test_a_worker_ending_with_the_sigterm_adds_nothing_to_the_stop(tmp_path):
    """A process group's SIGTERM ends the DataLoader workers too: their SIGCHLD, pending
    when the SIGTERM handler set SIGCHLD to SIG_DFL, was printed by Python as "OSError:
    Signal 17 ignored due to race condition" with a traceback, over the stop's one line."""
    script = tmp_path / "race.py"
    script.write_text(RACE_SCRIPT, encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert done.stdout.strip() == "stopped"
    assert done.stderr == ""
