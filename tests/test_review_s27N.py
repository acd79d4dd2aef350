"""Review s27N: metrics and evaluation checked against MONAI's metrics and their conventions."""

import nibabel as nib
import numpy as np
import pytest

from medseg.evaluate import evaluate_case

LABELS = {0: "background", 1: "a"}


def save(path, data, affine):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.uint8), affine), path)


def test_a_failed_case_gives_the_reference_volume_a_scored_case_gives(tmp_path):
    """A float32 header's 0.7 mm reads 0.699999988: a failed case's ref_ml was computed with
    it (0.21608999 ml) where a scored case of the same reference rounds the spacing first
    (0.21609 ml), so one reference's volume changed with its prediction's fate."""
    reference = np.zeros((20, 20, 8), np.uint8)
    reference[5:12, 5:12, 2:5] = 1  # 147 voxels of 0.7 x 0.7 x 3 mm: 0.21609 ml
    affine = np.diag([0.7, 0.7, 3.0, 1.0])
    save(tmp_path / "ref.nii.gz", reference, affine)
    save(tmp_path / "pred.nii.gz", reference, affine)
    scored = evaluate_case("c", tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz", LABELS)
    failed = evaluate_case("c", None, tmp_path / "ref.nii.gz", LABELS)
    assert failed.error and not scored.error
    assert scored.scores["a"]["ref_ml"] == pytest.approx(0.21609, rel=1e-12)
    assert failed.scores["a"]["ref_ml"] == scored.scores["a"]["ref_ml"]
