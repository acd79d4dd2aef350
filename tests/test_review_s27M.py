"""Review s27M: the report side (statistics.csv, report.html) as a radiology researcher
reads it."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest

from medseg.volumetry import CaseInputs, write_statistics

LABELS = {0: "background", 1: "tumour", 2: "lesion"}


def _write(path, data, spacing):
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, 1.0])), path)
    return path


def test_statistics_keep_small_intensities_and_volumes(tmp_path):
    """An ADC map in mm^2/s (values near 0.001) had every mean and sd written 0.0 (rounded
    to the 2 decimals of HU), and a lesion of 3 voxels of 0.125 mm^3 a volume of 0.0 ml."""
    rng = np.random.default_rng(27)
    mask = np.zeros((10, 9, 8), np.uint8)
    mask[2:7, 2:7, 2:6] = 1
    mask[8, 1, 1:4] = 2  # 3 voxels: 0.000375 ml
    adc = rng.normal(0.0011, 0.0002, mask.shape).astype(np.float32)
    item = CaseInputs("adc", _write(tmp_path / "mask.nii.gz", mask, (0.5, 0.5, 0.5)),
                      _write(tmp_path / "adc.nii.gz", adc, (0.5, 0.5, 0.5)))
    target = tmp_path / "statistics.csv"
    assert write_statistics([item], LABELS, target) == 1
    with open(target, encoding="utf-8", newline="") as f:
        rows = {row["structure"]: row for row in csv.DictReader(f)}
    tumour = adc[mask == 1].astype(np.float64)
    assert float(rows["tumour"]["intensity_mean"]) == pytest.approx(tumour.mean(), rel=0.01)
    assert float(rows["tumour"]["intensity_sd"]) == pytest.approx(tumour.std(), rel=0.01)
    assert float(rows["lesion"]["volume_ml"]) == pytest.approx(0.000375)
    assert float(rows["tumour"]["volume_ml"]) == pytest.approx(100 * 0.125 / 1000)


def _scores(dice: float, ref_ml: float) -> dict[str, float]:
    return {"dice": dice, "iou": dice, "hd95_mm": 1.0, "hd_mm": 1.0, "assd_mm": 1.0,
            "nsd": dice, "ref_ml": ref_ml, "pred_ml": ref_ml, "diff_ml": 0.0}


def _between(page: str, start: str, end: str) -> str:
    return page[page.index(start):page.index(end, page.index(start))]


def test_crossval_tables_leave_out_structures_absent_from_every_case():
    """A crossval with a label map of more structures than the dataset holds (TotalSegmentator's
    117 for a 41-structure CT) gave the fold table a column and the largest-component table a
    row of dashes for each absent one, which the summary table and the console leave out."""
    from medseg.evaluate import CaseScores
    from medseg.report import summarize
    from medseg.report_html import render_report

    nan = float("nan")
    absent = {"dice": nan, "iou": nan, "hd95_mm": nan, "hd_mm": nan, "assd_mm": nan,
              "nsd": nan, "ref_ml": 0.0, "pred_ml": 0.0, "diff_ml": 0.0}
    results = [CaseScores(f"c{i}", {"liver": _scores(0.9 - i / 10, 1500.0),
                                    "rib_left_1": absent}) for i in range(2)]
    summary = summarize(results, 2.0)
    assert summary["absent_structures"] == ["rib_left_1"]
    summary["crossval"] = {
        "folds": {"0": {"cases": 2, "failed_cases": [], "mean_dice": summary["mean_dice"],
                        "dice": {name: stats["dice"]["mean"]
                                 for name, stats in summary["structures"].items()}}},
        "postprocessing": {"structures": {
            "liver": {"id": 1, "dice": 0.85, "dice_largest_component": 0.86, "apply": True},
            "rib_left_1": {"id": 2, "dice": nan, "dice_largest_component": nan,
                           "apply": False}}}}
    page = render_report(results, summary, None)
    tables = _between(page, 'id="folds"', 'class="conv"')
    assert "liver" in tables
    assert "rib_left_1" not in tables


def test_a_second_false_positive_of_a_structure_the_reference_lacks_shows():
    """Where the reference lacks a structure, the views go through the prediction's largest
    cross-sections; a second predicted blob off those slices was drawn in no view (stray
    islands were filled only where the reference held the structure)."""
    import io

    from PIL import Image

    from medseg.evaluate import LoadedPair
    from medseg.report_figures import (
        GAP,
        HEADER_H,
        ISLAND_RGB,
        MONTAGE_DENSITY,
        TILE,
        TITLE_H,
        montage_png,
    )

    reference = np.zeros((40, 40, 40), np.uint8)
    prediction = reference.copy()
    prediction[24:34, 24:34, 24:34] = 1  # high R, A and S: the upper left of every view
    prediction[2:5, 2:5, 2:5] = 1  # low R, A and S: the lower right, in no drawn slice
    pair = LoadedPair(prediction, reference, np.eye(4), (1.0, 1.0, 1.0), False)
    png = montage_png(pair, {0: "background", 1: "a"}, {}, "false positives")
    picture = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    d = MONTAGE_DENSITY
    for view in range(3):
        top, left = (HEADER_H + TITLE_H) * d, view * (TILE + GAP) * d
        tile = picture[top:top + TILE * d:d, left:left + TILE * d:d]
        rows, cols = np.nonzero((tile == ISLAND_RGB).all(axis=-1))
        lower_right = (rows > TILE / 2) & (cols > TILE / 2)
        assert lower_right.sum() > 20, view
