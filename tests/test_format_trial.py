"""A format trial's findings (predict geometry across formats): files named as another
format, a MetaImage without a header, an sform whose voxel size is not pixdim's, a NRRD that
names no anatomical space, convert under a file."""

from __future__ import annotations

import gzip
import shutil

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from dicom_factory import axial_positions, write_series

from medseg.cli import main
from medseg.errors import MedsegError
from medseg.io import header_note, read_geometry, read_volume


def nifti(path, affine=None):
    nib.save(nib.Nifti1Image(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6),
                             np.eye(4) if affine is None else affine), path)
    return path


def nrrd(path, space_line: str | None):
    """A raw NRRD with a 2 x 2 x 2 short volume and the given `space:` line (None: none)."""
    lines = ["NRRD0004", "type: short", "dimension: 3"]
    if space_line is not None:
        lines.append(f"space: {space_line}")
        lines += ["sizes: 2 2 2", "space directions: (1,0,0) (0,2,0) (0,0,3)",
                  "space origin: (10,20,30)"]
    else:
        lines += ["sizes: 2 2 2", "spacings: 1 2 3"]
    lines += ["endian: little", "encoding: raw"]
    path.write_bytes(("\n".join(lines) + "\n\n").encode() + np.arange(8, dtype="<i2").tobytes())
    return path


@pytest.mark.parametrize(("make", "name", "says"), [
    (lambda p: nrrd(p, "left-posterior-superior"), "scan.nii.gz",
     "this is a NRRD file, not NIfTI: name it .nrrd"),
    (lambda p: nrrd(p, "left-posterior-superior"), "scan.nii",
     "this is a NRRD file, not NIfTI: name it .nrrd"),
    (lambda p: nifti(p.with_suffix(".nii")), "scan.mha",
     "this is a NIfTI file, not MetaImage: name it .nii"),
    (lambda p: nifti(p.with_suffix(".nii")), "scan.nrrd",
     "this is a NIfTI file, not NRRD: name it .nii"),
])
def test_a_file_named_as_another_format_is_named_for_what_it_is(tmp_path, make, name, says):
    """A NRRD named .nii.gz was told to drop the .gz, and then that NIfTI could not tell its
    type."""
    made = make(tmp_path / "made")
    shutil.move(made, tmp_path / name)
    with pytest.raises(MedsegError, match=f"{name}: {says}$"):
        read_volume(tmp_path / name)


def test_a_gzipped_nifti_named_mhd_and_a_dicom_slice_named_nii(tmp_path):
    nifti(tmp_path / "a.nii")
    (tmp_path / "a.mhd").write_bytes(gzip.compress((tmp_path / "a.nii").read_bytes()))
    with pytest.raises(MedsegError, match="gzip-compressed NIfTI file, not MetaImage: name it "
                                          r"\.nii\.gz"):
        read_volume(tmp_path / "a.mhd")
    (slice_path,) = write_series(tmp_path / "dcm", np.zeros((4, 4, 1), np.int16),
                                 axial_positions(1))
    shutil.copy(slice_path, tmp_path / "slice.nii")
    with pytest.raises(MedsegError, match=r"this is a DICOM file, not NIfTI: name it \.dcm or "
                                          "give the folder of its series"):
        read_volume(tmp_path / "slice.nii")


def test_text_named_mha_is_one_line_without_itks_console_lines(tmp_path, capfd):
    """ITK's MetaImage library printed four lines of its own ('NDims required and not
    defined.', 'MET_Read Failed', ...) before medseg's, whose reason was a stale system error
    ('Resource temporarily unavailable') on some runs."""
    notes = tmp_path / "notes.mha"
    notes.write_text("hello\n", encoding="utf-8")
    assert main(["convert", str(notes), str(tmp_path / "o.nii.gz")]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [f"medseg: error: {notes}: not a readable MetaImage file (its header has "
                   f"no NDims)"]


def test_a_real_metaimage_still_reads(tmp_path):
    image = sitk.GetImageFromArray(np.arange(24, dtype=np.int16).reshape(2, 3, 4))
    image.SetSpacing((0.5, 1.0, 2.0))
    sitk.WriteImage(image, str(tmp_path / "ok.mha"), useCompression=True)
    assert read_volume(tmp_path / "ok.mha").data.shape == (4, 3, 2)


def test_an_sform_alone_whose_voxel_size_is_not_pixdim_is_noted(tmp_path):
    """nibabel's Nifti1Image(data, None).set_sform(A) leaves pixdim 1: ITK tools take the
    sform's directions with pixdim's voxel size, 166 mm off at the far corner of a phantom,
    and no command said so."""
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    image = nib.Nifti1Image(np.zeros((40, 40, 20), np.float32), None)
    image.set_sform(affine, code=2)
    nib.save(image, tmp_path / "sform_only.nii.gz")
    note = header_note(read_geometry(tmp_path / "sform_only.nii.gz"))
    assert note is not None and note.startswith(
        "its NIfTI sform gives voxels of 1.5 x 1.5 x 3 mm but its pixdim says 1 x 1 x 1 mm "
        "(no qform)")
    image.header["pixdim"][1:4] = [1.5, 1.5, 3.0]  # the same size: nothing to say
    nib.save(image, tmp_path / "agreeing.nii.gz")
    assert header_note(read_geometry(tmp_path / "agreeing.nii.gz")) is None


@pytest.mark.parametrize(("space", "noted"), [
    (None, "its NRRD header names no space"),
    ("scanner-xyz", "its NRRD space is 'scanner-xyz'"),
    ("3D-right-handed", "its NRRD space is '3D-right-handed'"),
    ("left-posterior-superior", None),
    ("RAS", None),
])
def test_a_nrrd_without_an_anatomical_space_is_noted(tmp_path, space, noted):
    """ITK reads such a NRRD as LPS, which the file does not say; NIfTI without orientation
    already had its note."""
    path = nrrd(tmp_path / "scan.nrrd", space)
    note = header_note(read_volume(path).geometry)
    assert (note is None) if noted is None else note.startswith(noted)
    assert (header_note(read_geometry(path)) is None) == (noted is None)


def test_convert_to_a_path_under_a_file_says_so(tmp_path, capsys):
    source = nifti(tmp_path / "a.nii.gz")
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    assert main(["convert", str(source), str(tmp_path / "afile" / "b.nii.gz")]) == 2
    assert "afile is not a folder" in capsys.readouterr().err


def metaimage(path, header_lines: list[str]):
    """A MetaImage of 2 x 3 x 4 shorts with these header lines before its data."""
    text = "\n".join(header_lines + ["DimSize = 2 3 4", "ElementType = MET_SHORT",
                                     "ElementDataFile = LOCAL"]) + "\n"
    path.write_bytes(text.encode() + np.arange(24, dtype="<i2").tobytes())
    return path


@pytest.mark.parametrize("lines", [
    ["ObjectType = Image", "NDims: 3"],
    ["ObjectType = Image", "NDims : 3"],
    ["ObjectType = Image"] + [f"Comment = {'x' * 200}"] * 400 + ["NDims = 3"],
])
def test_a_metaimage_header_as_itk_reads_it_is_not_refused(tmp_path, lines):
    """The header check wanted 'NDims =' in the first 64 KiB; ITK also takes ':' and a
    header past 64 KiB."""
    path = metaimage(tmp_path / "a.mha", lines)
    assert read_volume(path).data.shape == (2, 3, 4)


@pytest.mark.parametrize("space", ["right anterior superior", "RightAnteriorSuperior",
                                   "left posterior superior", "LPS", "right-anterior-superior"])
def test_nrrd_spaces_spelled_as_teem_reads_them_are_not_noted(tmp_path, space):
    path = nrrd(tmp_path / "scan.nrrd", space)
    assert header_note(read_volume(path).geometry) is None


def test_a_micron_nifti_is_compared_in_mm(tmp_path):
    """Distances in microns were compared with half a voxel in mm (and printed as mm)."""
    image = nib.Nifti1Image(np.zeros((200, 200, 100), np.float32), None)
    image.set_sform(np.diag([1500.0, 1500.0, 1500.0, 1.0]), code=2)
    image.header["pixdim"][1:4] = 1500.1
    image.header.set_xyzt_units("micron")
    nib.save(image, tmp_path / "microns.nii.gz")
    assert header_note(read_geometry(tmp_path / "microns.nii.gz")) is None  # 0.02 mm apart
    image.header["pixdim"][1:4] = 1000.0
    nib.save(image, tmp_path / "off.nii.gz")
    note = header_note(read_geometry(tmp_path / "off.nii.gz"))
    assert note is not None and "voxels of 1.5 x 1.5 x 1.5 mm but its pixdim says 1 x 1 x 1 mm" \
        in note


def test_convert_onto_a_dangling_link_replaces_the_link(tmp_path):
    source = nifti(tmp_path / "a.nii.gz")
    link = tmp_path / "link.nii.gz"
    link.symlink_to(tmp_path / "nowhere.nii.gz")
    assert main(["convert", str(source), str(link)]) == 0
    assert read_volume(link).data.shape == (4, 5, 6)
