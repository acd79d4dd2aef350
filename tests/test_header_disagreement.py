"""NIfTI headers that ITK tools and nibabel read differently: a qform with a negative voxel
spacing (nibabel makes it positive, ITK mirrors that axis) is refused, and a qform and an
sform that place the voxels apart are noted by check, predict and convert (medseg reads the
sform; ITK tools may read the qform). A small shear from rounded direction cosines is
accepted."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import SMALL_SPACING

from medseg.check import check_dataset
from medseg.cli import main
from medseg.errors import MedsegError
from medseg.io import Geometry, header_note, read_geometry, read_volume, refuse_sheared_axes

PIXDIM_1_OFFSET = 80  # bytes into a NIfTI-1 header: pixdim[1], the first voxel spacing


def with_negative_first_spacing(path: Path, qform_code: int, sform_code: int) -> Path:
    """An uncompressed NIfTI whose stored pixdim[1] is negative (nibabel would make it
    positive on save, so the bytes are patched)."""
    data = np.zeros((6, 7, 8), np.int16)
    affine = np.diag([1.4, 1.0, 2.0, 1.0])
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=qform_code)
    image.set_sform(affine, code=sform_code)
    nib.save(image, str(path))
    raw = bytearray(path.read_bytes())
    raw[PIXDIM_1_OFFSET:PIXDIM_1_OFFSET + 4] = struct.pack("<f", -1.4)
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("sform_code", [0, 1])
def test_a_qform_with_a_negative_spacing_is_refused_naming_the_file(tmp_path, sform_code):
    path = with_negative_first_spacing(tmp_path / "scan.nii", 1, sform_code)
    with pytest.raises(MedsegError, match=r"scan.nii: voxel spacing \(pixdim\) \[-1.4, 1.0, "
                                          r"2.0\] is negative: .*ITK tools .* mirror"):
        read_volume(path)


def test_a_negative_spacing_beside_an_sform_alone_is_refused_too(tmp_path):
    """nibabel reads the sform as it is, SimpleITK takes pixdim's sign and mirrors that axis
    (tests/test_review_s25c.py shows it): the mask would lie mirrored in ITK tools."""
    path = with_negative_first_spacing(tmp_path / "scan.nii", 0, 1)
    with pytest.raises(MedsegError, match=r"scan.nii: voxel spacing \(pixdim\) \[-1.4, 1.0, "
                                          r"2.0\] is negative: .* this sform .*ITK tools"):
        read_volume(path)


def apart(path: Path, data: np.ndarray, shift_mm: float, spacing=(1.0, 1.0, 2.0)) -> Path:
    """A scan whose sform lies `shift_mm` along x from its qform (both codes set)."""
    qform = np.diag([*spacing, 1.0])
    sform = qform.copy()
    sform[0, 3] = shift_mm
    image = nib.Nifti1Image(data, None)
    image.set_qform(qform, code=1)
    image.set_sform(sform, code=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def test_a_qform_and_sform_apart_are_noted_a_rounding_apart_is_not(tmp_path):
    data = np.zeros((6, 7, 8), np.int16)
    note = header_note(read_geometry(apart(tmp_path / "a.nii.gz", data, 10.0)))
    assert note is not None and "qform and sform place the voxels up to 10 mm apart" in note
    assert header_note(read_geometry(apart(tmp_path / "b.nii.gz", data, 0.4))) is None
    scaled = nib.Nifti1Image(data, None)  # the sform twice the qform's spacing
    scaled.set_qform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    scaled.set_sform(np.diag([2.0, 1.0, 1.0, 1.0]), code=1)
    nib.save(scaled, str(tmp_path / "c.nii.gz"))
    assert "up to 5 mm apart" in header_note(read_geometry(tmp_path / "c.nii.gz"))


def test_check_warns_of_it_and_convert_to_an_itk_format_notes_it(tmp_path, capsys):
    root = tmp_path / "ds"
    data = np.zeros((8, 8, 8), np.int16)
    data[2:5, 2:5, 2:5] = 1
    apart(root / "imagesTr" / "a.nii.gz", data.astype(np.float32) * 100, 10.0)
    apart(root / "labelsTr" / "a.nii.gz", data, 10.0)
    (root / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "x"}, "modality": {"0": "CT"},
        "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}]}),
        encoding="utf-8")
    flagged = [(p.severity, p.file.parent.name) for p in check_dataset(root).problems
               if "qform and sform" in p.message]
    assert flagged == [("warning", "imagesTr"), ("warning", "labelsTr")]
    assert main(["convert", str(root / "imagesTr" / "a.nii.gz"), str(tmp_path / "a.nrrd")]) == 0
    assert "a.nii.gz: its NIfTI qform and sform place the voxels" in capsys.readouterr().err


def test_predict_notes_it_and_the_mask_keeps_both_forms(trained_run, phantom_dataset,
                                                       tmp_path, capsys):
    source = nib.load(sorted((phantom_dataset / "imagesTs").glob("*.nii.gz"))[0])
    scan = apart(tmp_path / "in" / "scan.nii.gz", np.asarray(source.dataobj), 10.0,
                 SMALL_SPACING)
    assert main(["predict", "--model", str(trained_run), "--input", str(scan),
                 "--output", str(tmp_path / "out")]) == 0
    assert f"{scan}: its NIfTI qform and sform place the voxels" in capsys.readouterr().err
    mask, image = nib.load(tmp_path / "out" / "scan.nii.gz"), nib.load(scan)
    assert np.array_equal(mask.get_qform(), image.get_qform())
    assert np.array_equal(mask.get_sform(), image.get_sform())


def sheared_by(degrees: float) -> np.ndarray:
    affine = np.eye(4)
    affine[0, 1] = np.sin(np.deg2rad(degrees))  # the second voxel axis leans along the first
    return affine


def test_a_shear_from_cosines_rounded_to_three_decimals_is_accepted(tmp_path):
    """0.02 to 0.1 degrees: what DICOM writers that round cosines to 3 decimals make (a
    helper's trial had such a series refused as sheared, with no way to resample it)."""
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), sheared_by(0.1)),
             str(tmp_path / "a.nii.gz"))
    refuse_sheared_axes(read_geometry(tmp_path / "a.nii.gz"), tmp_path / "a.nii.gz", "why")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), sheared_by(0.5)),
             str(tmp_path / "b.nii.gz"))
    with pytest.raises(MedsegError, match=r"b.nii.gz: the voxel axes are sheared \(up to 0.50"):
        refuse_sheared_axes(read_geometry(tmp_path / "b.nii.gz"), tmp_path / "b.nii.gz", "why")


def test_a_nifti_named_against_its_compression_says_how_to_rename_it(tmp_path):
    image = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4))
    nib.save(image, str(tmp_path / "a.nii.gz"))
    (tmp_path / "a.nii.gz").rename(tmp_path / "gzipped.nii")
    with pytest.raises(MedsegError, match=r"gzipped.nii: gzip-compressed data in a file named "
                                          r"\.nii: rename it gzipped\.nii\.gz"):
        read_volume(tmp_path / "gzipped.nii")
    nib.save(image, str(tmp_path / "b.nii"))
    (tmp_path / "b.nii").rename(tmp_path / "plain.nii.gz")
    with pytest.raises(MedsegError, match=r"plain.nii.gz: not gzip-compressed, although named "
                                          r"\.gz"):
        read_volume(tmp_path / "plain.nii.gz")


def test_a_large_oblique_scan_written_by_nibabel_is_not_noted(tmp_path):
    """The float32 qform of a 512 x 512 x 300 oblique scan, or of one whose cosines were
    rounded to 3 decimals (a sheared sform the qform cannot hold), lies hundredths of a mm
    off the sform: a review found the note firing on such ordinary files."""
    rng = np.random.default_rng(0)
    for shear in (0.0, np.sin(np.deg2rad(0.05))):
        rotation, _ = np.linalg.qr(rng.standard_normal((3, 3)))
        linear = rotation @ np.array([[1.0, shear, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
        affine = np.eye(4)
        affine[:3, :3] = linear @ np.diag([0.7, 0.7, 1.5])
        affine[:3, 3] = [-180.0, -200.0, 900.0]
        image = nib.Nifti1Image(np.zeros((512, 512, 300), np.uint8), affine)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        header = image.header
        assert header_note(Geometry((512, 512, 300), image.affine, header)) is None
