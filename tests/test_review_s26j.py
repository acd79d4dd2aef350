"""Regression tests for review s26j: convert-msd, check and dataset reading."""

import nibabel as nib
import numpy as np
from test_review_s26f import SHAPE, _msd_task

from medseg.cli import main


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
