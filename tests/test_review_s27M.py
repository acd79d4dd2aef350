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
