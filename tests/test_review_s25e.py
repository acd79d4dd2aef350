"""Review s25e: evaluate's failures on odd NIfTI headers are one-line messages (or a failed
case), never a traceback."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import UTF8_FILE_NAMES

from medseg.errors import MedsegError
from medseg.evaluate import evaluate_case
from medseg.io import read_label_map

LABELS = {0: "background", 1: "x"}
AFFINE = np.diag([0.8, 0.8, 3.0, 1.0])


def _mask() -> np.ndarray:
    mask = np.zeros((8, 8, 4), np.uint8)
    mask[2:5, 2:5, 1:3] = 1
    return mask


def _save(path, affine=AFFINE, xyzt_units: int | None = None):
    image = nib.Nifti1Image(_mask(), affine)
    if xyzt_units is not None:
        image.header["xyzt_units"] = xyzt_units
    nib.save(image, str(path))
    return path


@pytest.mark.parametrize("units", [2 | 0x38, 2 | 0xC0, 5, 7 | 0x40])
def test_a_header_with_an_undefined_units_code_is_read_in_mm(tmp_path, units):
    # nibabel's get_xyzt_units raises KeyError on a time (or spatial) code it does not
    # know; only the spatial code matters here, and an unknown one reads as mm
    volume = read_label_map(_save(tmp_path / "a.nii.gz", xyzt_units=units))
    assert volume.spacing == pytest.approx((0.8, 0.8, 3.0))


def test_a_prediction_with_an_undefined_time_code_is_scored(tmp_path):
    reference = _save(tmp_path / "r.nii.gz")
    prediction = _save(tmp_path / "p.nii.gz", xyzt_units=2 | 0xC0)
    result = evaluate_case("a", prediction, reference, LABELS)
    assert result.error is None
    assert result.scores["x"]["dice"] == 1.0


def test_a_prediction_with_an_ill_conditioned_affine_fails_its_case(tmp_path):
    # io_orientation finds no direction for an axis dwarfed by another (a corrupt sform
    # entry of 1e25 mm): nibabel's ornt_transform raised ValueError, which ended the whole
    # evaluation with a traceback
    reference = _save(tmp_path / "r.nii.gz")
    prediction = tmp_path / "p.nii.gz"
    image = nib.Nifti1Image(_mask(), AFFINE)
    corrupt = AFFINE.copy()
    corrupt[2, 1] = 1e25
    image.set_qform(None, code=0)
    image.set_sform(corrupt, code=2)
    nib.save(image, str(prediction))
    try:
        result = evaluate_case("a", prediction, reference, LABELS)
    except MedsegError:
        return  # refused in one line, naming the file: also fine
    assert result.error is not None
    assert result.scores["x"]["dice"] == 0.0


CAFE = tuple(unicodedata.normalize(form, "café") for form in ("NFC", "NFD"))


def _masks(tmp_path: Path, predicted: tuple[str, ...], referenced: tuple[str, ...]
           ) -> tuple[Path, Path]:
    """Folders of prediction and reference masks of these case names."""
    folders = tmp_path / "pred", tmp_path / "ref"
    for folder, names in zip(folders, (predicted, referenced), strict=True):
        folder.mkdir()
        for name in names:
            _save(folder / f"{name}.nii.gz")
    return folders


@UTF8_FILE_NAMES
def test_an_accented_case_name_pairs_whether_composed_or_decomposed(tmp_path):
    # macOS writes 'café' decomposed (NFD), most tools composed (NFC); datasets and the
    # report's scans match names in one spelling, evaluate paired by the bytes: the case
    # was a failure ("no prediction") and its prediction "without a reference"
    from medseg.evaluate import pair_cases, unpaired_predictions

    nfc, nfd = CAFE
    pred_dir, ref_dir = _masks(tmp_path, ("plain", nfc), ("plain", nfd))
    pairs = pair_cases(pred_dir, ref_dir)
    assert all(prediction is not None for _, prediction, _ in pairs)
    assert unpaired_predictions(pred_dir, pairs) == []


@UTF8_FILE_NAMES
def test_predict_reference_batch_of_a_decomposed_name_is_scored(tmp_path):
    # predict --reference names its batch by the input files' names, as they are spelled
    from medseg.report import run_evaluation

    nfc, nfd = CAFE
    pred_dir, ref_dir = _masks(tmp_path, (nfd,), (nfc,))
    summary = run_evaluation(pred_dir, ref_dir, None, None, label_names=dict(LABELS),
                             only_cases={nfd})
    assert summary["n_cases"] == 1 and not summary["failed_cases"]
    assert summary["mean_dice"] == 1.0
