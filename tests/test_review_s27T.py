"""Review s27T: regressions found in the day's changes (check, DICOM, train --resume)."""
from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dicom_factory import write_series
from helpers import SMALL_SHAPE, SMALL_SPACING

from medseg.check import check_dataset
from medseg.dicom import list_series
from medseg.errors import MedsegError
from medseg.io import read_volume
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


def _study_with_a_gzipped_series(root: Path) -> tuple[np.ndarray, Path]:
    """SE1: a plain series (UID 1.2.3.1); SE2: another series, every slice gzipped."""
    stored = np.random.default_rng(6).integers(0, 3000, (6, 5, 3)).astype(np.uint16)
    positions = [[0.0, 0.0, 2.5 * k] for k in range(3)]
    write_series(root / "SE1", stored, positions, series_uid="1.2.3.1")
    for path in write_series(root / "SE2", stored, positions, series_uid="1.2.3.2"):
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    return stored, root


def test_a_gzipped_series_in_a_folder_of_its_own_leaves_the_plain_one_readable(tmp_path):
    # formats.md: a compressed slice *beside a series' other slices* is refused; one of
    # another series' folder was refused too, listing the study's series included
    stored, study = _study_with_a_gzipped_series(tmp_path)
    assert [info.uid for info in list_series(study)] == ["1.2.3.1"]
    columns_rows_slices = stored.transpose(1, 0, 2).shape
    assert read_volume(study / "SE1").data.shape == columns_rows_slices
    assert read_volume(study).data.shape == columns_rows_slices


def test_a_gzipped_slice_beside_the_series_is_still_refused(tmp_path):
    stored, study = _study_with_a_gzipped_series(tmp_path)
    packed = study / "SE1" / "IM0002.dcm"
    packed.with_name(packed.name + ".gz").write_bytes(gzip.compress(packed.read_bytes()))
    packed.unlink()
    with pytest.raises(MedsegError) as caught:
        read_volume(study)
    assert str(caught.value).startswith(f"{packed}.gz: a DICOM slice compressed as a file")


def test_a_dangling_link_beside_a_series_leaves_crossval_its_digest(tmp_path):
    # files_below keeps links that lead nowhere since s27O (for the reader to refuse one
    # named like a slice); a harmless one (notes.txt on a share not mounted) made the
    # series' digest None, and crossval --continue segmented its case again every time
    from medseg import crossval

    series = tmp_path / "series"
    series.mkdir()
    (series / "a.dcm").write_bytes(b"slice a")
    digest = crossval._image_digest(series)
    (series / "notes.txt").symlink_to(tmp_path / "share" / "notes.txt")
    assert crossval._image_digest(series) == digest is not None
