"""Regression tests for review s26j: convert-msd, check and dataset reading."""

import json

import nibabel as nib
import numpy as np
import pytest
from test_review_s26f import SHAPE, _msd_task

from medseg.cli import main
from medseg.datasets import load_dataset
from medseg.errors import MedsegError
from medseg.phantoms import write_phantom_dataset


def test_convert_msd_notes_a_training_label_with_no_structure(tmp_path, capsys):
    """One label all background (the other holds a structure): `medseg check` warns of it,
    convert-msd, which reads every label, passed it without a word. Now one note naming the
    task folder and the label, in check's words; the conversion goes on."""
    task = _msd_task(tmp_path / "Task09_X")
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.uint8), np.eye(4)),
             task / "labelsTr" / "c1.nii.gz")
    out = tmp_path / "out"
    assert main(["convert-msd", str(task), str(out)]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "note" in line]
    assert len(notes) == 1, notes
    assert str(task) in notes[0] and "1 of 2 training labels" in notes[0]
    assert "c1.nii.gz: label is empty (background only)" in notes[0]
    assert "c0.nii.gz" not in notes[0]
    assert (out / "labelsTr" / "c1.nii.gz").is_file()


@pytest.mark.parametrize("key", [" 0", "0 ", "\u0660", "\uff10", "+0"])
def test_a_channel_key_that_is_not_ascii_digits_is_refused(tmp_path, capsys, key):
    """int() reads " 0", "0 ", an Arabic-Indic or full-width zero and "+0" as 0: such a key
    was taken for channel 0. Refused in one line naming dataset.json and the key."""
    write_phantom_dataset(tmp_path, n_train=2, n_test=0, shape=(16, 16, 8))
    description = tmp_path / "dataset.json"
    data = json.loads(description.read_text(encoding="utf-8"))
    data["modality"] = {key: "MR"}
    before = json.dumps(data)
    description.write_text(before, encoding="utf-8")
    with pytest.raises(MedsegError, match="must map channel numbers") as caught:
        load_dataset(tmp_path)
    assert json.dumps(key) in str(caught.value) and str(description) in str(caught.value)
    assert description.read_text(encoding="utf-8") == before
    assert main(["check", str(tmp_path)]) != 0
    err = capsys.readouterr()
    assert json.dumps(key) in err.out + err.err
