import json

import nibabel as nib
import numpy as np
import pytest

from medseg.cli import main
from medseg.evaluate import evaluate_pairs, pair_cases
from medseg.report import format_table, write_reports

LABELS = {0: "background", 1: "a", 2: "b"}


def save(path, data, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.uint8), np.diag([2.0, 2.0, 3.0, 1.0])
                             if affine is None else affine), path)


@pytest.fixture()
def folders(tmp_path):
    reference = np.zeros((10, 10, 10), np.uint8)
    reference[2:6, 2:6, 2:6] = 1
    reference[6:9, 6:9, 6:9] = 2
    shifted = np.roll(reference, 1, axis=0)
    save(tmp_path / "ref" / "c1.nii.gz", reference)
    save(tmp_path / "ref" / "c2.nii.gz", reference)
    save(tmp_path / "ref" / "c3.nii.gz", reference)
    save(tmp_path / "pred" / "c1.nii.gz", reference)
    save(tmp_path / "pred" / "c2.nii.gz", shifted)
    return tmp_path


def test_missing_prediction_is_a_failure_not_dropped(folders):
    results = evaluate_pairs(pair_cases(folders / "pred", folders / "ref"), LABELS)
    assert [r.case for r in results] == ["c1", "c2", "c3"]
    assert results[0].scores["a"]["dice"] == 1.0
    assert results[1].scores["a"]["dice"] == pytest.approx(2 * 48 / 128)
    assert results[2].error and results[2].scores["a"]["dice"] == 0.0


def test_reports(folders, tmp_path):
    results = evaluate_pairs(pair_cases(folders / "pred", folders / "ref"), LABELS)
    summary = write_reports(results, tmp_path / "out")
    rows = (tmp_path / "out" / "scores.csv").read_text().splitlines()
    assert rows[0].startswith("case,structure,dice")
    assert len(rows) == 1 + 3 * 2
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["failed_cases"] == ["c3"]
    dice_a = saved["structures"]["a"]["dice"]
    assert dice_a["n"] == 3
    assert dice_a["mean"] == pytest.approx((1.0 + 0.75 + 0.0) / 3)
    assert "a " in format_table(summary) and "failed cases" in format_table(summary)


def test_grid_mismatch_is_reported(folders):
    save(folders / "pred" / "c3.nii.gz", np.zeros((10, 10, 10)), np.eye(4))
    results = evaluate_pairs(pair_cases(folders / "pred", folders / "ref"), LABELS)
    assert "not on the same grid" in results[2].error


def test_cli_uses_label_names(folders, tmp_path, capsys):
    labels = tmp_path / "dataset.json"
    labels.write_text(json.dumps({"labels": {"0": "background", "1": "Anterior",
                                             "2": "Posterior"}}))
    code = main(["evaluate", "--pred", str(folders / "pred"), "--ref", str(folders / "ref"),
                 "--labels", str(labels), "--out", str(tmp_path / "ev")])
    out = capsys.readouterr().out
    assert code == 1  # c3 has no prediction
    assert "Anterior" in out and "Posterior" in out
    assert (tmp_path / "ev" / "summary.json").is_file()
