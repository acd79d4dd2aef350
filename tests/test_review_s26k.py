"""Session 26 (k): review of the day's model-archive, ensemble, convert-msd, check and
datasets changes."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

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


def test_crossval_of_an_ensemble_hashes_each_weights_file_once(trained_run, tmp_path,
                                                               monkeypatch):
    """crossval records each run's best weights' SHA-256 in crossval.json, and load_predictor
    then read each file again to refuse copies of one run: now it takes crossval's digests."""
    import shutil

    from safetensors.torch import load_file, save_file

    import medseg.archive
    import medseg.crossval
    import medseg.fileio

    other = shutil.copytree(trained_run, tmp_path / "other")
    weights = other / "fold_0" / "checkpoints" / "best.safetensors"
    tensors = load_file(weights)
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in tensors.items()},
              weights)
    hashed = []
    sha256_of_file = medseg.fileio.sha256_of_file

    def counted(path):
        hashed.append(Path(path).resolve())
        return sha256_of_file(path)

    for module in (medseg.crossval, medseg.archive):
        monkeypatch.setattr(module, "sha256_of_file", counted)
    assert main(["crossval", str(trained_run), str(other), "--out", str(tmp_path / "cv"),
                 "--folds", "0"]) == 0
    for run in (trained_run, other):
        best = (run / "fold_0" / "checkpoints" / "best.safetensors").resolve()
        assert hashed.count(best) == 1, hashed
