"""Session 27 (own work): duplicate cases found whatever memory order a volume is read into."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import SMALL_SHAPE, SMALL_SPACING

from medseg.datasets import load_dataset
from medseg.errors import MedsegError
from medseg.io import voxels_digest
from medseg.phantoms import make_phantom
from medseg.plan import fingerprint


def test_the_digest_of_the_same_voxels_does_not_depend_on_memory_order():
    values = np.random.default_rng(0).integers(0, 4, (7, 5, 3)).astype(np.uint8)
    assert voxels_digest(np.asfortranarray(values)) == voxels_digest(np.ascontiguousarray(values))
    assert voxels_digest(values) != voxels_digest(values.transpose(1, 0, 2).copy())


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    nib.save(nib.Nifti1Image(data, affine), path)


def _phantom_rows(root: Path, second_channel_is_label_of: int | None = None) -> list[str]:
    """A dataset.csv's rows for three phantoms (int16 CT, uint8 label); with
    `second_channel_is_label_of`, a further channel column, a float32 copy of the image but
    for that case, whose copy is of its label."""
    rows = ["image,label" + (",t2" if second_channel_is_label_of is not None else "")]
    for index in range(3):
        phantom = make_phantom(index, shape=SMALL_SHAPE, spacing=SMALL_SPACING)
        _save(phantom.image.astype(np.int16), phantom.affine, root / f"c{index}.nii.gz")
        _save(phantom.label.astype(np.uint8), phantom.affine, root / f"c{index}_seg.nii.gz")
        row = f"c{index}.nii.gz,c{index}_seg.nii.gz"
        if second_channel_is_label_of is not None:
            second = phantom.label if index == second_channel_is_label_of else phantom.image
            _save(second.astype(np.float32), phantom.affine, root / f"c{index}_t2.nii.gz")
            row += f",c{index}_t2.nii.gz"
        rows.append(row)
    return rows


def test_training_refuses_a_copy_whose_label_is_stored_as_floats(tmp_path):
    # the float32 copy of a uint8 label is read into C order, the original into nibabel's
    # Fortran order: the fingerprint took the two for two raters' labels and trained on both
    rows = _phantom_rows(tmp_path)
    label = nib.load(tmp_path / "c0_seg.nii.gz")
    _save(np.asanyarray(label.dataobj).astype(np.float32), label.affine,
          tmp_path / "copy_seg.nii.gz")
    (tmp_path / "copy.nii.gz").write_bytes((tmp_path / "c0.nii.gz").read_bytes())
    rows.append("copy.nii.gz,copy_seg.nii.gz")
    (tmp_path / "dataset.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(MedsegError, match="same voxels as case c0 in every channel"):
        fingerprint(load_dataset(tmp_path), progress=False)


def test_training_refuses_a_channel_holding_a_copy_of_the_label(tmp_path):
    # a CSV column of label files (a second rater's copy of the same voxels) was trained on
    # as a further channel: check reported it, training fed the network its answer
    rows = _phantom_rows(tmp_path, second_channel_is_label_of=1)
    (tmp_path / "dataset.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(MedsegError, match="same voxels as the case's label") as caught:
        fingerprint(load_dataset(tmp_path), progress=False)
    assert caught.value.path.name == "c1_t2.nii.gz"


def test_statistics_write_a_mean_that_is_float_noise_beside_its_spread_as_zero(tmp_path):
    # values of one structure that cancel out (a normalized MR around 0): its mean came out of
    # the sums as float noise and was written with 3 significant digits (5.55e-18)
    import csv

    from medseg.volumetry import CaseInputs, write_statistics

    mask = np.zeros((6, 5, 4), np.uint8)
    mask[1:5, 1:4, 1:3] = 1
    scan = np.zeros(mask.shape, np.float32)
    scan[mask == 1] = np.tile([0.1, 0.2, -0.3], 8)  # float32: their sum is -7e-9, not 0
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(mask, affine), tmp_path / "mask.nii.gz")
    nib.save(nib.Nifti1Image(scan, affine), tmp_path / "scan.nii.gz")
    target = tmp_path / "statistics.csv"
    item = CaseInputs("case", tmp_path / "mask.nii.gz", tmp_path / "scan.nii.gz")
    assert write_statistics([item], {0: "background", 1: "grey"}, target) == 1
    with open(target, encoding="utf-8", newline="") as f:
        row = next(csv.DictReader(f))
    assert row["intensity_mean"] in ("0.0", "0"), row
    assert float(row["intensity_sd"]) == pytest.approx(0.216, abs=0.001)
