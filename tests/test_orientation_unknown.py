"""A NIfTI header with qform and sform codes 0 gives no orientation: medseg (with nibabel and
MONAI) and ITK tools read its second voxel axis in opposite directions, and medseg says so
where it matters (check, predict, convert to an ITK format)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from helpers import SMALL_SPACING

from medseg.check import check_dataset
from medseg.cli import main
from medseg.io import NO_ORIENTATION, orientation_unknown, read_geometry


def unoriented(path: Path, data: np.ndarray, spacing=(2.0, 3.0, 4.0)) -> Path:
    image = nib.Nifti1Image(data, np.diag([*spacing, 1.0]))
    image.set_qform(None, code=0)
    image.set_sform(None, code=0)
    image.header["pixdim"][1:4] = spacing
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def test_itk_and_medseg_read_the_second_axis_of_such_a_header_oppositely(tmp_path):
    path = unoriented(tmp_path / "a.nii.gz", np.zeros((4, 5, 6), np.int16))
    geometry = read_geometry(path)
    assert orientation_unknown(geometry)
    ras_directions = np.sign(np.diag(geometry.affine)[:3])  # nibabel: left, anterior, superior
    itk = sitk.ReadImage(str(path))
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    itk_directions = np.sign(np.diag(lps_to_ras @ np.reshape(itk.GetDirection(), (3, 3))))
    assert ras_directions.tolist() == [-1, 1, 1]
    assert itk_directions.tolist() == [-1, -1, 1]  # anterior and posterior swapped
    assert "anterior and posterior swapped" in NO_ORIENTATION


def test_an_oriented_header_or_another_format_is_not_flagged(tmp_path):
    oriented = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.diag([2.0, 3.0, 4.0, 1.0]))
    nib.save(oriented, str(tmp_path / "b.nii.gz"))  # nibabel sets both codes from the affine
    assert not orientation_unknown(read_geometry(tmp_path / "b.nii.gz"))
    qform_only = nib.load(tmp_path / "b.nii.gz")
    qform_only.set_qform(qform_only.affine, code=1)
    qform_only.set_sform(None, code=0)
    nib.save(qform_only, str(tmp_path / "c.nii.gz"))
    assert not orientation_unknown(read_geometry(tmp_path / "c.nii.gz"))
    path = unoriented(tmp_path / "a.nii.gz", np.zeros((4, 5, 6), np.int16))
    assert main(["convert", str(path), str(tmp_path / "a.nrrd")]) == 0
    assert not orientation_unknown(read_geometry(tmp_path / "a.nrrd"))


def test_check_warns_about_an_image_without_orientation(tmp_path):
    root = tmp_path / "ds"
    data = np.zeros((8, 8, 8), np.int16)
    data[2:5, 2:5, 2:5] = 1
    unoriented(root / "imagesTr" / "a.nii.gz", data.astype(np.float32) * 100)
    unoriented(root / "labelsTr" / "a.nii.gz", data)
    (root / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "x"}, "modality": {"0": "CT"},
        "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}]}),
        encoding="utf-8")
    report = check_dataset(root)
    flagged = [(p.severity, p.file.parent.name, p.file.name) for p in report.problems
               if p.message == NO_ORIENTATION]
    # the image, not its label (the one case's other row: training needs two)
    assert flagged == [("warning", "imagesTr", "a.nii.gz")]


def test_convert_to_an_itk_format_notes_it_and_to_nifti_does_not(tmp_path, capsys):
    path = unoriented(tmp_path / "a.nii.gz", np.arange(120, dtype=np.int16).reshape(4, 5, 6))
    assert main(["convert", str(path), str(tmp_path / "a.mha")]) == 0
    err = capsys.readouterr().err
    assert "a.nii.gz: its NIfTI header gives no orientation" in err and "a.mha" in err
    assert main(["convert", str(path), str(tmp_path / "b.nii.gz")]) == 0
    assert "no orientation" not in capsys.readouterr().err
    assert orientation_unknown(read_geometry(tmp_path / "b.nii.gz"))  # the codes are kept


def test_predict_notes_it_and_the_mask_keeps_the_scans_header(trained_run, phantom_dataset,
                                                             tmp_path, capsys):
    source = nib.load(sorted((phantom_dataset / "imagesTs").glob("*.nii.gz"))[0])
    scan = unoriented(tmp_path / "in" / "scan.nii.gz", np.asarray(source.dataobj),
                      SMALL_SPACING)
    assert main(["predict", "--model", str(trained_run), "--input", str(scan),
                 "--output", str(tmp_path / "out")]) == 0
    assert f"{scan}: {NO_ORIENTATION}" in capsys.readouterr().err
    mask = nib.load(tmp_path / "out" / "scan.nii.gz")
    assert int(mask.header["qform_code"]) == 0 and int(mask.header["sform_code"]) == 0
    assert mask.shape == source.shape
    shutil.rmtree(tmp_path / "out")
