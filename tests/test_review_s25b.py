"""Review of crossval's `arithmetic` record (commit a4ba2b5): a record without it is noted as
segmented again only once it is accepted, and a hand-edited one is named in a short line."""

import json
import shutil
from pathlib import Path

import pytest

from medseg.cli import main


@pytest.fixture
def done(two_fold_run, tmp_path) -> tuple[Path, Path]:
    """A run and the cross-validation of its fold 0."""
    run = tmp_path / "run"
    shutil.copytree(two_fold_run, run)
    out = tmp_path / "cv"
    assert main(["crossval", str(run), "--out", str(out), "--folds", "0"]) == 0
    return run, out


def _edit(out: Path, **changes) -> None:
    path = out / "crossval.json"
    record = json.loads(path.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            del record[key]
        else:
            record[key] = value
    path.write_text(json.dumps(record), encoding="utf-8")


def test_a_refused_record_without_its_precision_is_not_said_to_be_segmented_again(
        done, capsys):
    """The note "every case is segmented again" came before the refusal of other settings."""
    run, out = done
    _edit(out, arithmetic=None)
    capsys.readouterr()
    assert main(["crossval", str(run), "--out", str(out), "--folds", "0", "--continue",
                 "--step", "0.7"]) == 2
    err = capsys.readouterr().err
    assert "other predict settings" in err and "segmented again" not in err


def test_a_hand_edited_precision_is_named_in_a_short_line(done, capsys):
    """A dict's values went into the line whole (5000 characters), and a dict with one key
    more was named as this machine's own "cpu, autocast none"."""
    run, out = done
    for value, named in (({"device": "x" * 5000, "autocast": "none"}, '{"device": "xxx'),
                         ({"device": "cpu", "autocast": "none", "by": 1}, '"by": 1'),
                         (["cpu"], '["cpu"]')):
        _edit(out, arithmetic=value)
        capsys.readouterr()
        assert main(["crossval", str(run), "--out", str(out), "--folds", "0",
                     "--continue"]) == 2
        err = capsys.readouterr().err
        assert "another device or precision" in err and named in err
        assert len(err) < len(str(out)) + 300 and err.count("\n") == 1


def test_a_run_folder_path_in_a_link_loop_fails_on_every_rank_alike(tmp_path):
    """Rank 0 alone resolved the path (inside the lock): it failed there while the other
    ranks went on to wait for its answer."""
    from types import SimpleNamespace

    from medseg.runs import one_trainer

    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    other_rank = SimpleNamespace(main=False, distributed=True, local_rank=1)
    with pytest.raises(RuntimeError, match="[Ss]ymlink loop"), \
            one_trainer(tmp_path / "a" / "run", other_rank):
        pass
