"""Session 27 (S): a researcher's own, messy data in each layout `medseg check` reads."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import SMALL_SHAPE, SMALL_SPACING

from medseg.check import check_dataset
from medseg.datasets import load_dataset
from medseg.errors import MedsegError
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


def _with_channel(root: Path, cells: list[str]) -> None:
    """dataset.csv with one more column, `second`, of `cells`."""
    lines = (root / "dataset.csv").read_text(encoding="utf-8").splitlines()
    rows = [f"{lines[0]},second"] + [f"{line},{cell}" for line, cell in
                                     zip(lines[1:], cells, strict=True)]
    (root / "dataset.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")


def test_a_channel_column_of_the_label_files_is_refused(tmp_path):
    # `image,label,seg_rater2` with the label files in the last column: a second channel that
    # is the answer itself was trained on without a word
    root = _csv_dataset(tmp_path)
    _with_channel(root, [f"c{index}_seg.nii.gz" for index in range(3)])
    report = check_dataset(root)
    rows = [p for p in report.problems if "same voxels as the case's label" in p.message]
    assert [(p.severity, p.case, p.file.name) for p in rows] == [
        ("error", f"c{index}", f"c{index}_seg.nii.gz") for index in range(3)]
    assert report.exit_code() == 1
    with pytest.raises(MedsegError, match=r"case 'c0' lists its label c0_seg.nii.gz as an "
                                          r"image channel too"):
        load_dataset(root / "dataset.csv")


def test_a_copy_of_the_label_as_a_channel_is_found_by_check(tmp_path):
    root = _csv_dataset(tmp_path)
    for index in range(3):  # the labels saved again as floats, under other names
        label = nib.load(root / f"c{index}_seg.nii.gz")
        _save(np.asanyarray(label.dataobj).astype(np.float32), label.affine,
              root / f"c{index}_mask.nii.gz")
    _with_channel(root, [f"c{index}_mask.nii.gz" for index in range(3)])
    rows = [p for p in check_dataset(root).problems
            if "same voxels as the case's label" in p.message]
    assert [p.file.name for p in rows] == [f"c{index}_mask.nii.gz" for index in range(3)]


def test_a_real_second_channel_is_no_label(tmp_path):
    root = _csv_dataset(tmp_path)
    _with_channel(root, [f"c{index}.nii.gz" for index in range(3)])  # the image, twice
    assert not [p for p in check_dataset(root).problems if p.severity == "error"]
    assert len(load_dataset(root / "dataset.csv").cases[0].images) == 2


def test_labels_swapped_between_two_rows_are_named(tmp_path):
    # scans of one grid (resampled for a study): a swapped pair of labels fits each image
    # as well as its own, and was trained on without a word
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    grid = np.diag([*SMALL_SPACING, 1.0])
    for index in range(3):
        phantom = make_phantom(index, shape=SMALL_SHAPE, spacing=SMALL_SPACING)
        _save(phantom.image.astype(np.int16), grid, tmp_path / "images" / f"p{index}.nii.gz")
        _save(phantom.label, grid, tmp_path / "labels" / f"p{index}.nii.gz")
    rows = ["image,label", "images/p0.nii.gz,labels/p1.nii.gz",
            "images/p1.nii.gz,labels/p0.nii.gz", "images/p2.nii.gz,labels/p2.nii.gz"]
    (tmp_path / "dataset.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    swapped = [(p.case, p.file.name) for p in check_dataset(tmp_path / "dataset.csv").problems
               if "labels swapped between rows?" in p.message]
    assert swapped == [("p0", "p1.nii.gz"), ("p1", "p0.nii.gz")]


def test_labels_named_apart_from_their_images_are_no_swap(tmp_path):
    root = _csv_dataset(tmp_path)  # c0.nii.gz with c0_seg.nii.gz: no label named as an image
    assert not [p for p in check_dataset(root).problems if "swapped" in p.message]
