"""Review s26b: dataset descriptions, check and splits."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from medseg.check import check_dataset
from medseg.cli import main
from medseg.datasets import load_dataset, make_splits
from medseg.errors import MedsegError


def _folder_pairs(root, n_cases: int):
    """n_cases image/label pairs in images/ and labels/, each label a cube of label 1."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for number in range(n_cases):
        label = np.zeros((10, 10, 10), np.uint8)
        label[3:6, 3:6, 3 + number % 3:6] = 1
        image = rng.normal(size=label.shape).astype(np.float32)
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / "images" / f"c{number}.nii.gz"))
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(root / "labels" / f"c{number}.nii.gz"))
    return root


def test_check_errs_on_a_dataset_of_one_case_as_training_refuses_it(tmp_path, capsys):
    """Training cannot make folds of one case; check called such a dataset clean (exit 0),
    and `medseg check DATA && medseg train ...` failed at the train."""
    root = _folder_pairs(tmp_path / "d", 1)
    with pytest.raises(MedsegError, match="1 labelled case"):
        make_splits([case.name for case in load_dataset(root).cases], 2, source=root)
    report = check_dataset(root)
    errors = [p for p in report.problems if p.severity == "error"]
    assert [p.message for p in errors] == [
        "the dataset lists 1 case: training would refuse it, its folds need at least 2 (one "
        "to train on, one to validate on)"], report.format_table()
    assert report.exit_code() == 1
    assert main(["check", str(root)]) == 1
    assert "(folders layout, 1 case): 1 error, 0 warnings" in capsys.readouterr().out
