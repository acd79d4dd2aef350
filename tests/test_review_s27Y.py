"""Review of training under torchrun: failures on one rank only (session 27Y)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from helpers import REPO, TINY_TRAINING, as_sets

import medseg.cli
from medseg.cli import main


def _fail_on_rank(tmp_path, monkeypatch, rank: int, error: Exception) -> str:
    """main() on `rank` of two, its command raising `error`; the error file it leaves."""
    error_file = tmp_path / f"error_{rank}.json"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))

    def fails(_args):
        raise error

    monkeypatch.setattr(medseg.cli, "cmd_check", fails)
    assert main(["check", str(tmp_path)]) == 1
    return str(error_file)


def test_torchruns_root_cause_is_the_failed_rank_not_the_one_that_lost_it(
        tmp_path, monkeypatch, capsys):
    """Rank 1 failed and rank 0's collective lost it within the same second (nearly always):
    torchrun's "Root Cause" (the earliest error file by whole seconds, the lowest rank on a
    tie) showed rank 0's "another process ... failed ... lost its connection" instead of
    rank 1's error, which the docs promise there."""
    from torch.distributed.elastic.multiprocessing.errors import (
        ChildFailedError,
        ProcessFailure,
    )

    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.25)
    failed = _fail_on_rank(tmp_path, monkeypatch, 1, ValueError("a bug"))
    lost = _fail_on_rank(tmp_path, monkeypatch, 0, RuntimeError(
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
        "[127.0.0.1]:29500"))
    monkeypatch.undo()
    capsys.readouterr()
    failures = {rank: ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=1,
                                     error_file=path)
                for rank, path in ((0, lost), (1, failed))}
    rank, failure = ChildFailedError("medseg", failures).get_first_failure()
    assert rank == 1
    assert "ValueError: a bug" in failure.message["message"]


def test_a_failed_case_on_one_process_does_not_stop_the_others_shares(
        trained_run, phantom_dataset, tmp_path):
    """torchrun stops every process once one exits with a failure: rank 1, whose cases all
    failed (exit 2), cut rank 0's share of the batch short ("medseg: stopped (SIGTERM)"),
    where the docs say that a failed case fails alone and the batch goes on."""
    scans = tmp_path / "scans"
    scans.mkdir()
    good = sorted((phantom_dataset / "imagesTr").glob("*.nii.gz"))
    for i in range(40):  # sorted by name: rank 0 gets the even cases, rank 1 the odd
        case = scans / f"c{i:02d}.nii.gz"
        if i % 2:
            case.write_bytes(b"not a volume")
        else:
            shutil.copyfile(good[i % len(good)], case)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        ["timeout", "120", sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
         "2", "--standalone", "-m", "medseg.cli", "predict", "--model", str(trained_run),
         "--input", str(scans), "--output", str(out)],
        capture_output=True, encoding="utf-8", errors="replace", cwd=REPO, env=env,
        timeout=150)
    assert done.returncode == 1, done.stderr[-2000:]  # torchrun's: a process failed
    assert "stopped (SIGTERM)" not in done.stderr
    assert "predicted 20 of 20 cases (shard 0/2)" in done.stdout
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [
        f"c{i:02d}.nii.gz" for i in range(0, 40, 2)]


SLOW_RANK_1 = '''
import os, sys, time
from pathlib import Path
import medseg.runs
from medseg.cli import run

checks = medseg.runs._check_run_folder

def late(run_dir, overwrite):
    # rank 1 comes to its check once rank 0 has written the run (or after 5 s)
    deadline = time.monotonic() + 5
    while not (Path(run_dir) / "plan.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return checks(run_dir, overwrite)

if os.environ["RANK"] == "1":
    medseg.runs._check_run_folder = late
sys.argv[0] = "medseg"
run()
'''


def test_a_rank_that_checks_the_run_folder_late_does_not_refuse_the_new_run(
        tmp_path, phantom_dataset):
    """Every rank checks the run folder; rank 0 then wrote it without waiting for the
    others, so a rank slower to come to its check (another node, a loaded machine) found
    rank 0's plan.json and refused the fresh run as "run folder exists and is not empty"."""
    script = tmp_path / "slow_rank_1.py"
    script.write_text(SLOW_RANK_1, encoding="utf-8")
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        ["timeout", "120", sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
         "2", "--standalone", str(script), "train", str(REPO / "workflows" / "demo.yaml"),
         "--out", str(run),
         *as_sets([f"dataset.path={phantom_dataset}", *TINY_TRAINING, "train.epochs=1"])],
        capture_output=True, encoding="utf-8", errors="replace", cwd=REPO, env=env,
        timeout=150)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "run folder exists" not in done.stderr
    assert (run / "fold_0" / "checkpoints" / "last_state.pt").is_file()
