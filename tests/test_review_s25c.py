"""Review s25c: reading volumes and writing masks back on their exact grid."""

from __future__ import annotations

import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dicom_factory import axial_positions, write_series

from medseg.errors import MedsegError
from medseg.io import read_geometry, read_volume

PIXDIM0_OFFSET = 76  # byte offset of pixdim[0] (qfac) in a NIfTI-1 header


def _qform_only_nifti(path, qfac: float, sform_code: int = 0):
    """A qform NIfTI (no sform unless `sform_code`) whose slice axis runs inferior (stored
    qfac -1), with pixdim[0] then overwritten by `qfac` as some writers leave it."""
    affine = np.diag([1.0, 2.0, -3.0, 1.0])
    affine[:3, 3] = [5.0, 6.0, 7.0]
    image = nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine if sform_code else None, code=sform_code)
    nib.save(image, path)
    raw = bytearray(path.read_bytes())
    raw[PIXDIM0_OFFSET:PIXDIM0_OFFSET + 4] = struct.pack("<f", qfac)
    path.write_bytes(bytes(raw))
    return path


def test_a_qfac_neither_1_nor_minus_1_that_itk_reads_mirrored_is_refused(tmp_path):
    """pixdim[0] = -2: nibabel reads the qform with qfac 1, ITK (nifticlib) with -1. The
    scan's slice axis lay mirrored in ITK tools, and the mask written back (qfac 1) did not:
    scan and mask disagreed there. Refused in one line, as a negative pixdim is."""
    import SimpleITK as sitk

    path = _qform_only_nifti(tmp_path / "odd_qfac.nii", -2.0)
    itk = sitk.ReadImage(str(path))
    itk_z = np.array(itk.GetDirection()).reshape(3, 3)[2, 2]
    nib_z = nib.load(path).affine[2, 2]
    assert np.sign(itk_z) != np.sign(nib_z)  # the two readers disagree: the trap is real
    for read in (read_volume, read_geometry):
        with pytest.raises(MedsegError, match=r"qfac \(pixdim\[0\]\) -2 is neither 1 nor -1"):
            read(path)


@pytest.mark.parametrize("qfac", [-1.0, 0.0, 1.0, 2.0])
def test_a_qfac_both_readers_agree_on_is_read(tmp_path, qfac):
    path = _qform_only_nifti(tmp_path / "qfac.nii", qfac)
    volume = read_volume(path)
    assert volume.affine[2, 2] == pytest.approx(-3.0 if qfac == -1 else 3.0)


def test_an_odd_qfac_beside_an_sform_is_read_by_the_sform(tmp_path):
    """With an sform, nibabel and ITK both place the voxels by it: not refused."""
    import SimpleITK as sitk

    path = _qform_only_nifti(tmp_path / "odd_qfac_sform.nii", -2.0, sform_code=1)
    volume = read_volume(path)
    assert volume.affine[2, 2] == pytest.approx(-3.0)
    assert np.array(sitk.ReadImage(str(path)).GetDirection()).reshape(3, 3)[2, 2] < 0


@pytest.mark.parametrize("pixdim", [(-1.0, 2.0, 3.0), (1.0, -2.0, 3.0), (1.0, 2.0, -3.0)])
def test_a_negative_pixdim_beside_an_sform_alone_is_refused(tmp_path, pixdim):
    """An sform without a qform and a negative pixdim: nibabel reads the sform as it is (and
    makes pixdim positive), SimpleITK takes pixdim's sign and mirrors that axis, and the mask
    written back (pixdim positive) did not lie mirrored there: scan and mask disagreed in
    ITK tools, without a note. Refused, as a negative pixdim beside a qform is."""
    import SimpleITK as sitk

    affine = np.diag([1.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = [5.0, 6.0, 7.0]
    image = nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), affine)
    image.set_qform(None, code=0)
    image.set_sform(affine, code=1)
    path = tmp_path / "negative_pixdim.nii"
    nib.save(image, path)
    raw = bytearray(path.read_bytes())
    raw[PIXDIM0_OFFSET + 4:PIXDIM0_OFFSET + 16] = struct.pack("<3f", *pixdim)
    path.write_bytes(bytes(raw))
    axis = int(np.argmin(pixdim))
    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    itk = sitk.ReadImage(str(path))
    itk_column = np.array(itk.GetDirection()).reshape(3, 3)[:, axis] * itk.GetSpacing()[axis]
    assert np.sign(itk_column[axis] * [-1, -1, 1][axis]) != np.sign(affine[axis, axis])
    for read in (read_volume, read_geometry):
        with pytest.raises(MedsegError, match=r"negative: .* read this sform"):
            read(path)


def test_a_nrrd_in_bzip2_encoding_is_not_called_truncated(tmp_path):
    """NrrdIO here has no bzip2: the file is whole, its encoding unread. The message said
    'truncated or corrupt file', sending the user to look for damage that is not there."""
    import bz2

    data = np.arange(24, dtype=np.int16)
    path = tmp_path / "scan.nrrd"
    path.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 3 2\nencoding: bzip2\n"
                     b"endian: little\n\n" + bz2.compress(data.tobytes()))
    with pytest.raises(MedsegError, match=r"scan.nrrd: cannot read voxel data: its NRRD "
                                          r"encoding is not one ITK reads here") as caught:
        read_volume(path)
    assert "truncated" not in str(caught.value)


@pytest.mark.parametrize("field, why", [
    ("DimSize = 4 3", r"its DimSize has 2 value\(s\) where NDims 3 needs 3"),
    ("ElementSpacing = 1 1", r"its ElementSpacing has 2 value\(s\) where NDims 3 needs 3"),
    ("Offset = 1 2", r"its Offset has 2 value\(s\) where NDims 3 needs 3"),
    ("TransformMatrix = 1 0 0 0 1 0", r"its TransformMatrix has 6 value\(s\) where NDims 3 "
                                      r"needs 9"),
    ("DimSize = a b c", r"its DimSize 'a b c' is not 3 numbers"),
])
def test_a_metaimage_field_too_short_for_its_ndims_is_named(tmp_path, capfd, field, why):
    """MetaIO printed three lines of its own parse errors to the console, and the one-line
    message said only 'File cannot be read'."""
    lines = ["NDims = 3", "DimSize = 4 3 2", "ElementType = MET_SHORT"]
    key = field.split(" = ")[0]
    lines = [line for line in lines if not line.startswith(key)] + [field]
    path = tmp_path / "scan.mha"
    path.write_bytes(("\n".join([*lines, "ElementDataFile = LOCAL"]) + "\n").encode()
                     + bytes(48))
    with pytest.raises(MedsegError, match=rf"scan.mha: not a readable MetaImage file \({why}\)"):
        read_volume(path)
    assert "MetaImage" not in capfd.readouterr().err  # nothing of MetaIO's own


def test_a_metaimage_with_enough_values_per_field_is_read(tmp_path):
    header = ("NDims = 3\nDimSize = 4.0 3 2\nElementSpacing = 1.5 2 3e0\nOffset = 1 2 3\n"
              "TransformMatrix = 0 1 0 1 0 0 0 0 1\nElementType = MET_SHORT\n"
              "ElementDataFile = LOCAL\n")
    path = tmp_path / "scan.mha"
    path.write_bytes(header.encode() + bytes(48))
    volume = read_volume(path)
    assert volume.spatial_shape == (4, 3, 2)
    assert volume.spacing == pytest.approx((1.5, 2.0, 3.0))


def test_a_metaimage_with_colon_separated_fields_is_read_not_called_cut_short(tmp_path):
    """MetaIO takes 'key: value' as 'key = value'; the data check looked for
    'ElementDataFile =' alone, took the whole file for the header, and refused a whole file
    as '0 bytes where the header's size needs 48 (cut short)'."""
    import SimpleITK as sitk

    header = ("ObjectType: Image\nNDims: 3\nDimSize: 2 3 4\nElementSpacing: 1 2 3\n"
              "ElementType: MET_SHORT\nElementDataFile: LOCAL\n")
    path = tmp_path / "scan.mha"
    path.write_bytes(header.encode() + np.arange(24, dtype="<i2").tobytes())
    volume = read_volume(path, dtype=None)
    itk = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).transpose(2, 1, 0)
    np.testing.assert_array_equal(volume.data, itk)
    assert volume.spacing == pytest.approx((1.0, 2.0, 3.0))


def test_a_slice_that_cannot_be_opened_is_named_not_left_out(tmp_path, monkeypatch):
    """A slice without read permission (a PACS export copied as another user) failed the
    'DICM' check quietly and was skipped: the series was read a slice short, without a word
    when it lay at an end of the series. Named in one line instead."""
    import builtins

    import medseg.dicom

    stored = np.arange(4 * 5 * 4, dtype=np.uint16).reshape(4, 5, 4)
    paths = write_series(tmp_path / "series", stored, axial_positions(4))
    locked = paths[-1]

    def guarded_open(file, *args, **kwargs):
        if Path(file) == locked:
            raise PermissionError(13, "Permission denied", str(file))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(medseg.dicom, "open", guarded_open, raising=False)
    with pytest.raises(MedsegError, match=r"IM0003.dcm: cannot be read \(Permission denied\); "
                                          r"the series beside it would lack this slice"):
        read_volume(tmp_path / "series")


def test_an_unreadable_file_not_named_like_a_slice_is_left_out(tmp_path, monkeypatch):
    import builtins

    import medseg.dicom

    stored = np.arange(4 * 5 * 3, dtype=np.uint16).reshape(4, 5, 3)
    write_series(tmp_path / "series", stored, axial_positions(3))
    notes = tmp_path / "series" / "notes.txt"
    notes.write_text("x", encoding="utf-8")

    def guarded_open(file, *args, **kwargs):
        if Path(file) == notes:
            raise PermissionError(13, "Permission denied", str(file))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(medseg.dicom, "open", guarded_open, raising=False)
    assert read_volume(tmp_path / "series").spatial_shape == (5, 4, 3)


def test_a_subfolder_that_cannot_be_listed_is_named_not_left_out(tmp_path, monkeypatch):
    """os.walk skipped a subfolder it could not list (no permission): the slices in it were
    left out of the series without a word."""
    import os

    stored = np.arange(4 * 5 * 4, dtype=np.uint16).reshape(4, 5, 4)
    positions = axial_positions(4)
    write_series(tmp_path / "series" / "a", stored[:, :, :2], positions[:2])
    write_series(tmp_path / "series" / "b", stored[:, :, 2:], positions[2:],
                 names=["IM0002.dcm", "IM0003.dcm"])
    locked = tmp_path / "series" / "b"
    scandir = os.scandir

    def guarded_scandir(path="."):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", guarded_scandir)
    with pytest.raises(MedsegError, match=r"series/b: cannot list this folder \(Permission "
                                          r"denied\); the DICOM files in it would be left out"):
        read_volume(tmp_path / "series")


def test_converting_one_file_of_a_series_says_the_folder_holds_the_rest(tmp_path, capsys):
    """`medseg convert IM0000.dcm` wrote a one-slice volume without a word."""
    from dicom_factory import axial_positions, write_series

    from medseg.cli import main

    stored = np.arange(8 * 8 * 4, dtype=np.uint16).reshape(8, 8, 4) + 100
    paths = write_series(tmp_path / "series", stored, axial_positions(4))
    assert main(["convert", str(paths[0]), str(tmp_path / "one.nii.gz")]) == 0
    err = capsys.readouterr().err
    assert "3 more file(s) of its series" in err and str(tmp_path / "series") in err
    assert main(["convert", str(tmp_path / "series"), str(tmp_path / "all.nii.gz")]) == 0
    assert "more file(s)" not in capsys.readouterr().err


def test_predict_notes_dicom_files_of_one_series_given_alone(tmp_path, capsys):
    from dicom_factory import axial_positions, write_series

    from medseg.predict import _note_dicom_files_given_one_by_one

    stored = np.arange(8 * 8 * 4, dtype=np.uint16).reshape(8, 8, 4) + 100
    paths = write_series(tmp_path / "series", stored, axial_positions(4))
    _note_dicom_files_given_one_by_one([paths[0]])
    assert "is read alone; its folder holds 3 more file(s)" in capsys.readouterr().err
    _note_dicom_files_given_one_by_one(paths[:2])
    assert "2 DICOM files of" in capsys.readouterr().err
