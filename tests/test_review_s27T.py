"""Review s27T: regressions found in the day's changes (check, DICOM, train --resume)."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from helpers import SMALL_SHAPE, SMALL_SPACING

from medseg.check import check_dataset
from medseg.phantoms import make_phantom


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    nib.save(nib.Nifti1Image(data, affine), path)


def _swapped_csv(root: Path, names: list[str]) -> Path:
    """Cases of one grid listed in a dataset.csv, the first two rows' labels swapped."""
    (root / "images").mkdir()
    (root / "labels").mkdir()
    grid = np.diag([*SMALL_SPACING, 1.0])
    for index, name in enumerate(names):
        phantom = make_phantom(index, shape=SMALL_SHAPE, spacing=SMALL_SPACING)
        _save(phantom.image.astype(np.int16), grid, root / "images" / f"{name}.nii.gz")
        _save(phantom.label, grid, root / "labels" / f"{name}.nii.gz")
    labels = [names[1], names[0], *names[2:]]
    rows = ["image,label", *(f"images/{name}.nii.gz,labels/{label}.nii.gz"
                             for name, label in zip(names, labels, strict=True))]
    (root / "dataset.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root / "dataset.csv"


def test_swapped_labels_of_cases_numbered_in_four_digits_are_named(tmp_path):
    # AMOS names its cases amos_0001, ...: the image stems lost their '_0001' as if it were
    # nnU-Net's channel suffix, every case became 'amos', and no swap was ever found
    csv = _swapped_csv(tmp_path, ["amos_0001", "amos_0002", "amos_0003"])
    swapped = [(p.case, p.file.name) for p in check_dataset(csv).problems
               if "labels swapped between rows?" in p.message]
    assert swapped == [("amos_0001", "amos_0002.nii.gz"), ("amos_0002", "amos_0001.nii.gz")]
