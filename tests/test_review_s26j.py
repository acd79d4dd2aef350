"""Regression tests for review s26j: convert-msd, check and dataset reading."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_review_s26f import SHAPE, _msd_task

from medseg.cli import main
from medseg.datasets import list_dataset, load_dataset
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


def _folders_beside(root: Path, csv_text: str | bytes) -> Path:
    for folder in ("images", "t2", "labels"):
        (root / folder).mkdir(parents=True)
        (root / folder / "c0.nii.gz").write_bytes(b"x")
    if isinstance(csv_text, bytes):
        (root / "dataset.csv").write_bytes(csv_text)
    else:
        (root / "dataset.csv").write_text(csv_text, encoding="utf-8")
    return root


@pytest.mark.parametrize("separator", [";", "\t", "|"])
def test_auto_refuses_a_dataset_csv_of_cases_beside_folders_saved_with_another_separator(
        tmp_path, separator):
    """layout auto passed a dataset.csv of cases whose header is ';'-separated (Excel's) over
    for the images/ + labels/ folders: its further channel (t2) was lost unsaid. Now it is
    read as the dataset and refused with the CSV's own message."""
    header = separator.join(["image", "t2", "label"])
    cells = separator.join(["images/c0.nii.gz", "t2/c0.nii.gz", "labels/c0.nii.gz"])
    root = _folders_beside(tmp_path, f"{header}\n{cells}\n")
    with pytest.raises(MedsegError, match="save it as comma-separated") as caught:
        list_dataset(root)
    assert str(root / "dataset.csv") in str(caught.value)
    assert f"its header is separated by {separator!r}" in str(caught.value)


def test_auto_refuses_a_dataset_csv_beside_folders_that_is_not_text(tmp_path):
    """A dataset.csv of cases that is not UTF-8 was passed over for the folders unsaid; now
    refused with the CSV's own message."""
    root = _folders_beside(tmp_path, "image,t2,label\n\xe9,t2/c0.nii.gz,x\n".encode("latin-1"))
    with pytest.raises(MedsegError, match="dataset.csv: not UTF-8 text"):
        list_dataset(root)


def test_auto_still_reads_folders_beside_a_dataset_csv_of_other_columns(tmp_path):
    """The patients' data beside the folders (documented) is still no description, whatever
    its separator."""
    for text in ("case;age;sex\nc0;61;F\n", "case,age,sex\nc0,61,F\n"):
        root = _folders_beside(tmp_path / str(len(text) + text.count(";")), text)
        assert list_dataset(root).layout == "folders"


def test_auto_reads_folders_beside_a_latin1_table_of_other_columns(tmp_path):
    """A table of the patients' data saved in Latin-1 (Excel's default in Western Europe)
    beside the folders is no case list: the folders are read, as beside a UTF-8 one."""
    root = _folders_beside(tmp_path, "case;\xe2ge;sexe\nc0;61;F\n".encode("latin-1"))
    assert list_dataset(root).layout == "folders"
