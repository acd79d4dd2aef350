"""Session 26 (k): review of the day's model-archive, ensemble, convert-msd, check and
datasets changes."""
from __future__ import annotations

import tempfile

from helpers import REPO, TINY_TRAINING, as_sets

import medseg.pretrained
from medseg.cli import main


def test_an_init_archive_is_not_kept_unpacked_past_the_command(
        model_archive, phantom_dataset, tmp_path, monkeypatch):
    """train.init MODEL.zip is unpacked for one command and removed when it ends, not at the
    process's exit: a program running many commands (a notebook, the tests) kept one
    unpacked copy in the temporary folder per archive until it exited."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    assert main(["plan", str(REPO / "workflows" / "demo.yaml"),
                 *as_sets([f"dataset.path={phantom_dataset}", *TINY_TRAINING,
                           f"train.init={model_archive}"])]) == 0
    assert list(temporary.iterdir()) == []
    assert not medseg.pretrained._UNPACKED
