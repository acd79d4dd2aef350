"""Review of training under torchrun: failures on one rank only (session 27Y)."""

from __future__ import annotations

import time

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
