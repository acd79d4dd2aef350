"""Session 26 (k): review of the day's model-archive, ensemble, convert-msd, check and
datasets changes."""
from __future__ import annotations

import json
import tempfile

import pytest
from helpers import REPO, TINY_TRAINING, as_sets

import medseg.pretrained
from medseg.cli import main
from medseg.datasets import load_dataset
from medseg.errors import MedsegError
from medseg.phantoms import write_phantom_dataset


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


def test_a_channel_key_with_a_sign_is_refused(tmp_path):
    """int("-0") is 0: a modality key "-0" was taken for channel 0, though keys are refused
    unless they are a channel number in ASCII digits."""
    write_phantom_dataset(tmp_path, n_train=2, n_test=0, shape=(16, 16, 8))
    description = tmp_path / "dataset.json"
    data = json.loads(description.read_text(encoding="utf-8"))
    data["modality"] = {"-0": "MR"}
    description.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(MedsegError, match='must map channel numbers.*got key "-0"'):
        load_dataset(tmp_path)
