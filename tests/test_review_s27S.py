"""Session 27 (S): a researcher's own, messy data in each layout `medseg check` reads."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from helpers import SMALL_SHAPE, SMALL_SPACING

from medseg.check import check_dataset
from medseg.phantoms import make_phantom

FLIP_X = np.array([[-1, 0, 0, SMALL_SHAPE[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])


def _save(data: np.ndarray, affine: np.ndarray, path: Path, dtype=None) -> None:
    nib.save(nib.Nifti1Image(data, affine, dtype=dtype or data.dtype), path)


def _csv_dataset(root: Path, cases: int = 3) -> Path:
    """`cases` phantoms (CT, int16 image, uint8 label) listed in a dataset.csv."""
    rows = ["image,label"]
    for index in range(cases):
        phantom = make_phantom(index, shape=SMALL_SHAPE, spacing=SMALL_SPACING)
        _save(phantom.image.astype(np.int16), phantom.affine, root / f"c{index}.nii.gz")
        _save(phantom.label.astype(np.uint8), phantom.affine, root / f"c{index}_seg.nii.gz")
        rows.append(f"c{index}.nii.gz,c{index}_seg.nii.gz")
    (root / "dataset.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def _add_copy_of_case_0(root: Path, label: Path) -> None:
    """Case 0's image copied under another name, with `label` as its label."""
    (root / "copy.nii.gz").write_bytes((root / "c0.nii.gz").read_bytes())
    with open(root / "dataset.csv", "a", encoding="utf-8") as stream:
        stream.write(f"copy.nii.gz,{label.name}\n")


def _rows(root: Path, case: str) -> list[str]:
    return [f"{p.severity}: {p.message}" for p in check_dataset(root).problems
            if p.case == case]


def test_a_float_copy_of_a_label_is_a_duplicate_case_not_a_second_rater(tmp_path):
    # the same case twice, its label re-saved as float32 (read into another memory order
    # than the uint8 file): it was "same image voxels, with another label (two raters?)"
    root = _csv_dataset(tmp_path)
    label = nib.load(root / "c0_seg.nii.gz")
    _save(np.asanyarray(label.dataobj).astype(np.float32), label.affine,
          root / "copy_seg.nii.gz")
    _add_copy_of_case_0(root, root / "copy_seg.nii.gz")
    rows = _rows(root, "copy")
    assert any(r.startswith("error: same voxels as case c0 in every channel and the label")
               for r in rows), rows
    assert not any("two raters" in r for r in rows), rows


def test_a_label_stored_flipped_is_compared_on_the_image_grid(tmp_path):
    # the same label stored with its first axis reversed (and a header that says so):
    # training reorders it onto the image, where it is case 0's label voxel for voxel
    root = _csv_dataset(tmp_path)
    label = nib.load(root / "c0_seg.nii.gz")
    _save(np.asanyarray(label.dataobj)[::-1], label.affine @ FLIP_X, root / "copy_seg.nii.gz")
    _add_copy_of_case_0(root, root / "copy_seg.nii.gz")
    rows = _rows(root, "copy")
    assert any(r.startswith("error: same voxels as case c0 in every channel and the label")
               for r in rows), rows


def test_two_raters_labels_stay_a_warning(tmp_path):
    root = _csv_dataset(tmp_path)
    label = nib.load(root / "c0_seg.nii.gz")
    other = np.asanyarray(label.dataobj).copy()
    other[other == 1] = 0  # the second rater left a structure out
    _save(other.astype(np.float32), label.affine, root / "copy_seg.nii.gz")
    _add_copy_of_case_0(root, root / "copy_seg.nii.gz")
    rows = _rows(root, "copy")
    assert any(r.startswith("warning: same image voxels as case c0, with another label")
               for r in rows), rows
    assert not any(r.startswith("error") for r in rows), rows
