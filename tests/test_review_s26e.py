"""Review of convert-msd and check (session 26e): regressions found."""

import json
import unicodedata
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import UTF8_FILE_NAMES, requires_shared

from medseg.cli import main

SHAPE = (8, 9, 10)
MAP = {"0": "background", "1": "organ"}


def _msd_task(root: Path, labels: list[np.ndarray], table: dict | None = None,
              names: list[str] | None = None) -> Path:
    """A one-channel MSD task, one case per label array (seeded random images), its cases
    named `names` (c0, c1, ... without)."""
    rng = np.random.default_rng(265)
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    training = []
    for index, label in enumerate(labels):
        name = names[index] if names else f"c{index}"
        image = rng.normal(size=SHAPE).astype(np.float32)
        nib.save(nib.Nifti1Image(image, np.eye(4)), root / "imagesTr" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), root / "labelsTr" / f"{name}.nii.gz")
        training.append({"image": f"./imagesTr/{name}.nii.gz",
                         "label": f"./labelsTr/{name}.nii.gz"})
    description = {"name": "X", "modality": {"0": "MRI"}, "labels": table or MAP,
                   "numTraining": len(labels), "training": training, "test": []}
    (root / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    return root


def _label(dtype=np.uint8, value=1) -> np.ndarray:
    label = np.zeros(SHAPE, dtype)
    label[2:5, 2:5, 2:5] = value
    return label


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize(("bad", "says"), [
    (_label(np.float32, 0.5), "non-integer values"),  # a linearly resampled mask
    (_label(np.uint8, 3), "label values [3] are not in"),  # an id the map does not name
    (_label(np.int8, -1), "label values [-1] are not in"),
])
def test_convert_msd_refuses_a_label_check_and_train_would_refuse(tmp_path, capsys, bad, says):
    """Such a label was copied as it was, exit 0, and `medseg check`/`train` of the
    converted dataset then refused it: now refused before anything is written."""
    task = _msd_task(tmp_path / "Task09_X", [_label(), _label(), bad])
    out = tmp_path / "out"
    assert main(["convert-msd", str(task), str(out)]) == 2
    err = _one_error(capsys)
    assert says in err and "c2.nii.gz" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["Task09_X"]


def test_convert_msd_takes_whole_float_labels(tmp_path):
    task = _msd_task(tmp_path / "Task09_X", [_label(np.float32, 1.0), _label()])
    assert main(["convert-msd", str(task), str(tmp_path / "out")]) == 0


def test_convert_msd_refuses_a_label_map_with_a_gap(tmp_path, capsys):
    task = _msd_task(tmp_path / "Task09_X", [_label(), _label()],
                     {"0": "background", "1": "organ", "3": "tumour"})
    assert main(["convert-msd", str(task), str(tmp_path / "out")]) == 2
    assert "2 missing from 0, 1, 3" in _one_error(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("table", [{"1": "organ"}, {"0": "Background", "1": "organ"}])
def test_convert_msd_writes_background_0_as_nnunet_requires(tmp_path, table):
    """An MSD map without "0" gave a dataset.json without "background": 0 (nnU-Net v2
    refuses it), as did one naming id 0 otherwise."""
    task = _msd_task(tmp_path / "Task09_X", [_label(), _label()], table)
    out = tmp_path / "out"
    assert main(["convert-msd", str(task), str(out)]) == 0
    written = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert written["labels"] == {"background": 0, "organ": 1}
    assert main(["check", str(out)]) == 0


def test_convert_msd_of_the_real_hippocampus_task_follows_nnunet(tmp_path):
    source = requires_shared("Task04_Hippocampus")
    out = tmp_path / "Dataset004_Hippocampus"
    assert main(["convert-msd", str(source), str(out), "--jobs", "2"]) == 0
    written = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert written["labels"] == {"background": 0, "Anterior": 1, "Posterior": 2}
    assert written["channel_names"] == {"0": "MRI"}
    assert written["file_ending"] == ".nii.gz"
    cases = sorted(p.name[:-len(".nii.gz")] for p in (out / "labelsTr").iterdir())
    assert written["numTraining"] == len(cases) == 200
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == \
        [f"{name}_0000.nii.gz" for name in cases]


def _rows(capsys) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines()
            if line.startswith(("warning", "error"))]


@pytest.mark.parametrize("cases", [2, 4])
def test_check_warns_of_fewer_cases_than_the_default_folds(tmp_path, capsys, cases):
    """`medseg check` said clean, and `medseg train` (5 folds by default) then refused the
    dataset at once."""
    task = _msd_task(tmp_path / "Task09_X", [_label() for _ in range(cases)])
    assert main(["check", str(task)]) == 0  # a warning: train.folds may fit it
    rows = _rows(capsys)
    assert len(rows) == 1 and rows[0].startswith("warning")
    assert f"lists {cases} cases, fewer than the default 5 folds" in rows[0]
    assert f"train.folds={cases}" in rows[0] and "train.splits_file" in rows[0]
    assert main(["check", str(task), "--strict"]) == 1


def test_check_says_nothing_of_folds_from_five_cases(tmp_path, capsys):
    task = _msd_task(tmp_path / "Task09_X", [_label() for _ in range(5)])
    assert main(["check", str(task)]) == 0
    assert _rows(capsys) == []


@pytest.mark.parametrize("names", [
    ["Case_a", "case_A", "c2", "c3", "c4"],
    pytest.param(["CAFE\u0301", "caf\u00e9", "c2", "c3", "c4"],  # NFD upper, NFC lower
                 marks=UTF8_FILE_NAMES),
])
def test_check_warns_of_case_names_one_mask_file_apart(tmp_path, capsys, names):
    """Names one file on macOS and Windows (case-insensitive file systems) gave one mask
    file for two cases there, without a word."""
    task = _msd_task(tmp_path / "Task09_X", [_label() for _ in names], names=names)
    assert main(["check", str(task)]) == 0  # Linux keeps them apart: no error
    rows = _rows(capsys)
    assert len(rows) == 1 and rows[0].startswith("warning"), rows
    first, second = (unicodedata.normalize("NFC", name) for name in names[:2])
    assert f"case names {first!r} and {second!r} differ only in letter case" in rows[0]


@UTF8_FILE_NAMES
def test_check_still_calls_nfc_and_nfd_spellings_one_name(tmp_path, capsys):
    names = ["caf\u00e9", "cafe\u0301", "c2", "c3", "c4"]
    task = _msd_task(tmp_path / "Task09_X", [_label() for _ in names], names=names)
    assert main(["check", str(task)]) == 1
    rows = _rows(capsys)
    assert len(rows) == 1 and "duplicate case name" in rows[0], rows
