"""DICOM series on synthetic files: ordering, rescaling, series choice, traps, codecs."""

import io
import os

import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicom_factory import (
    CT_INTERCEPT,
    axial_positions,
    enhanced_file,
    slice_dataset,
    write_series,
)
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless, RLELossless

from medseg.dicom import list_series
from medseg.errors import MedsegError
from medseg.io import convert_volume, read_volume

ROWS, COLUMNS, SLICES = 6, 5, 4
SPACING = (0.8, 0.7)  # DICOM PixelSpacing: between rows, between columns


def stored_values(seed=0, shape=(ROWS, COLUMNS, SLICES)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 3000, size=shape).astype(np.uint16)


def expected_affine(origin, step) -> np.ndarray:
    """Voxel (column, row, slice) -> RAS for an axial stack."""
    lps = np.diag([SPACING[1], SPACING[0], step, 1.0])
    lps[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def as_volume(stored: np.ndarray) -> np.ndarray:
    """(rows, columns, slices) stored values -> medseg voxel order, in HU."""
    return stored.transpose(1, 0, 2).astype(np.float32) + CT_INTERCEPT


def test_slices_ordered_by_position_not_file_name_or_instance_number(tmp_path):
    stored = stored_values()
    positions = axial_positions(SLICES)
    # file names and InstanceNumbers both run against the physical order
    write_series(tmp_path, stored, positions, names=["d.dcm", "a.dcm", "c.dcm", "b.dcm"],
                 instances=[3, 4, 1, 2], spacing=SPACING)
    volume = read_volume(tmp_path)
    np.testing.assert_array_equal(volume.data, as_volume(stored))
    np.testing.assert_allclose(volume.affine, expected_affine(positions[0], 2.5), atol=1e-9)


def test_rescale_slope_and_intercept_are_applied(tmp_path):
    stored = stored_values(1, (ROWS, COLUMNS, 1))
    write_series(tmp_path, stored, axial_positions(1), slope=0.5, intercept=-100.0)
    volume = read_volume(tmp_path, dtype=None)
    assert volume.data.dtype == np.float32  # a fractional slope gives real values
    np.testing.assert_allclose(volume.data[:, :, 0], stored[:, :, 0].T * 0.5 - 100.0)


@pytest.mark.parametrize("bits, dtype", [(12, np.int16), (16, np.int32)])
def test_native_type_holds_every_rescaled_value(tmp_path, bits, dtype):
    stored = stored_values(14) // 16
    write_series(tmp_path, stored, axial_positions(SLICES), bits_stored=bits)
    volume = read_volume(tmp_path, dtype=None)
    assert volume.data.dtype == dtype
    np.testing.assert_array_equal(volume.data, as_volume(stored))


def test_several_series_are_listed_and_one_can_be_chosen(tmp_path):
    write_series(tmp_path / "a", stored_values(2), axial_positions(SLICES),
                 series_uid="1.2.3.4.1", description="arterial")
    write_series(tmp_path / "b", stored_values(3, (ROWS, COLUMNS, 2)), axial_positions(2),
                 series_uid="1.2.3.4.2", description="venous")
    with pytest.raises(MedsegError) as caught:
        read_volume(tmp_path)
    message = str(caught.value)
    assert "2 DICOM series" in message and "--series" in message
    assert "1.2.3.4.1 'arterial' (4 images)" in message
    assert "1.2.3.4.2 'venous' (2 images)" in message
    assert "\n" not in message
    assert "each series is in its own folder" in message  # a batch: say how to give it
    chosen = read_volume(tmp_path, series_uid="1.2.3.4.2")
    assert chosen.spatial_shape == (COLUMNS, ROWS, 2)
    with pytest.raises(MedsegError, match="no series 9.9"):
        read_volume(tmp_path, series_uid="9.9")
    assert sorted(s.uid for s in list_series(tmp_path)) == ["1.2.3.4.1", "1.2.3.4.2"]
    # one series in the folder itself: FOLDER/* would give its files one by one
    write_series(tmp_path, stored_values(4), axial_positions(SLICES), series_uid="1.2.3.4.3")
    with pytest.raises(MedsegError, match="3 DICOM series") as caught:
        read_volume(tmp_path)
    assert "each series is in its own folder" not in str(caught.value)
    # a folder with one series is read as it is: --series picks among several
    only = read_volume(tmp_path / "a", series_uid="1.2.3.4.2")
    assert only.spatial_shape == (COLUMNS, ROWS, SLICES)


def test_two_series_in_one_folder_get_no_batch_hint(tmp_path):
    write_series(tmp_path, stored_values(2), axial_positions(SLICES), series_uid="1.2.3.4.1")
    write_series(tmp_path, stored_values(3, (ROWS, COLUMNS, 2)), axial_positions(2),
                 names=["X0.dcm", "X1.dcm"], series_uid="1.2.3.4.2")
    with pytest.raises(MedsegError, match="2 DICOM series") as caught:
        read_volume(tmp_path)
    assert "own folder" not in str(caught.value)


def test_gantry_tilt_is_refused_then_resampled_where_each_slice_belongs(tmp_path):
    stored = stored_values(4)
    # each slice shifted by exactly one row along +y: a tilt of atan(0.8 / 2.5)
    positions = axial_positions(SLICES, shift_per_slice=(0.0, SPACING[0]))
    write_series(tmp_path, stored, positions, spacing=SPACING)
    with pytest.raises(MedsegError) as caught:
        read_volume(tmp_path)
    assert "gantry tilt of 17.7 degrees" in str(caught.value)
    assert "--resample-irregular" in str(caught.value)
    volume = read_volume(tmp_path, resample_irregular=True)
    assert volume.spatial_shape == (COLUMNS, ROWS + SLICES - 1, SLICES)
    np.testing.assert_allclose(volume.affine, expected_affine(positions[0], 2.5), atol=1e-9)
    for k in range(SLICES):  # slice k lies k rows further along the grid's row axis
        np.testing.assert_allclose(volume.data[:, k:k + ROWS, k], as_volume(stored)[:, :, k],
                                   atol=1e-3)


def test_resampling_a_tilted_stack_stays_within_the_series_values(tmp_path):
    """Half-pixel shifts put the cubic spline between pixels, where it overshot sharp edges:
    -1072 HU from a series whose lowest value is -1024."""
    stored = stored_values(7)
    positions = axial_positions(SLICES, shift_per_slice=(0.0, SPACING[0] / 2))
    write_series(tmp_path, stored, positions, spacing=SPACING)
    volume = read_volume(tmp_path, resample_irregular=True)
    hu = as_volume(stored)
    assert hu.min() <= volume.data.min() and volume.data.max() <= hu.max()


def test_missing_slice_is_refused_then_resampled(tmp_path):
    stored = stored_values(5)
    positions = [[0.0, 0.0, z] for z in (0.0, 2.5, 5.0, 10.0)]
    write_series(tmp_path, stored, positions, spacing=SPACING)
    with pytest.raises(MedsegError) as caught:
        read_volume(tmp_path)
    message = str(caught.value)
    assert "gap of 5.00 mm between slices 3 and 4 of 4 (IM0002.dcm and IM0003.dcm" in message
    assert "median gap is 2.50 mm" in message and "--resample-irregular" in message
    volume = read_volume(tmp_path, resample_irregular=True)
    assert volume.spatial_shape == (COLUMNS, ROWS, 5)
    hu = as_volume(stored)
    for plane, k in ((0, 0), (1, 1), (2, 2), (4, 3)):
        np.testing.assert_allclose(volume.data[:, :, plane], hu[:, :, k], atol=1e-3)
    np.testing.assert_allclose(volume.data[:, :, 3], (hu[:, :, 2] + hu[:, :, 3]) / 2,
                               atol=1e-3)


def test_single_slice_is_a_one_slice_volume(tmp_path):
    stored = stored_values(6, (ROWS, COLUMNS, 1))
    paths = write_series(tmp_path, stored, axial_positions(1))
    for source in (tmp_path, paths[0]):  # the folder, or the file itself
        volume = read_volume(source)
        assert volume.spatial_shape == (COLUMNS, ROWS, 1)
        np.testing.assert_array_equal(volume.data, as_volume(stored))


def test_duplicate_positions_are_refused(tmp_path):
    write_series(tmp_path, stored_values(7, (ROWS, COLUMNS, 2)), [[0, 0, 0], [0, 0, 0]])
    with pytest.raises(MedsegError, match="same position .* several volumes"):
        read_volume(tmp_path)


def test_localizer_in_the_series_is_refused(tmp_path):
    write_series(tmp_path, stored_values(8, (ROWS, COLUMNS, 2)), axial_positions(2))
    write_series(tmp_path / "loc", stored_values(9, (ROWS, COLUMNS, 1)), [[0, 0, 0]],
                 orientation=(1, 0, 0, 0, 0, -1))
    with pytest.raises(MedsegError, match="differ in orientation"):
        read_volume(tmp_path)


def test_folder_without_dicom_images(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here", encoding="utf-8")
    (tmp_path / "junk.dcm").write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.raises(MedsegError, match="no DICOM image found"):
        read_volume(tmp_path)


def test_truncated_dicom_names_the_file(tmp_path):
    paths = write_series(tmp_path, stored_values(10), axial_positions(SLICES))
    raw = paths[2].read_bytes()
    paths[2].write_bytes(raw[: len(raw) - 20])
    with pytest.raises(MedsegError, match="IM0002.dcm"):
        read_volume(tmp_path)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless])
def test_lossless_transfer_syntaxes(tmp_path, syntax):
    stored = stored_values(11, (64, 48, 1))  # big enough for JPEG 2000's resolution levels
    ds = slice_dataset(stored[:, :, 0], [0, 0, 0], spacing=SPACING, bits_stored=12)
    ds.compress(syntax)
    ds.save_as(tmp_path / "c.dcm", enforce_file_format=True)
    volume = read_volume(tmp_path)
    np.testing.assert_array_equal(volume.data, as_volume(stored))


def test_jpeg_lossless_through_gdcm(tmp_path):
    """pydicom has no decoder for JPEG Lossless (process 14) here: SimpleITK's GDCM does it,
    and applies the rescale itself."""
    sitk = pytest.importorskip("SimpleITK")
    pixels = (np.arange(ROWS * COLUMNS).reshape(ROWS, COLUMNS) * 37).astype(np.int16)
    image = sitk.GetImageFromArray(pixels)
    image.SetSpacing((SPACING[1], SPACING[0]))
    for tag, value in {"0020|0032": "-20\\-30\\40", "0020|0037": "1\\0\\0\\0\\1\\0",
                       "0008|0060": "CT", "0020|000e": "1.2.3.9"}.items():
        image.SetMetaData(tag, value)
    writer = sitk.ImageFileWriter()
    writer.SetImageIO("GDCMImageIO")
    writer.SetFileName(str(tmp_path / "j.dcm"))
    writer.KeepOriginalImageUIDOn()
    writer.SetUseCompression(True)
    writer.SetCompressor("JPEG")
    writer.Execute(image)
    volume = read_volume(tmp_path / "j.dcm", dtype=None)
    np.testing.assert_array_equal(volume.data[:, :, 0], pixels.T)
    np.testing.assert_allclose(volume.affine[:3, 3], [20.0, 30.0, 40.0])


def test_jpeg_baseline(tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    pixels = np.tile(np.linspace(0, 250, 16, dtype=np.uint8), (16, 1))
    buffer = io.BytesIO()
    image_module.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    ds = slice_dataset(pixels.astype(np.uint16), [0, 0, 0], intercept=0.0)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.save_as(tmp_path / "b.dcm", enforce_file_format=True)
    volume = read_volume(tmp_path)
    assert np.abs(volume.data[:, :, 0] - pixels.T).max() <= 6  # lossy, but close


def test_enhanced_multiframe(tmp_path):
    stored = stored_values(12)
    positions = axial_positions(SLICES)
    # frames stored in reverse physical order, each with its own rescale slope
    slopes = [1.0, 2.0, 1.0, 2.0]
    enhanced_file(tmp_path / "mf.dcm", stored[:, :, ::-1], positions[::-1], spacing=SPACING,
                  slopes=slopes)
    volume = read_volume(tmp_path)
    expected = stored.transpose(1, 0, 2).astype(np.float32) * np.array(
        slopes[::-1], dtype=np.float32) + CT_INTERCEPT
    np.testing.assert_array_equal(volume.data, expected)
    np.testing.assert_allclose(volume.affine, expected_affine(positions[0], 2.5), atol=1e-9)


def test_convert_dicom_to_nifti_and_nrrd(tmp_path):
    stored = stored_values(13)
    positions = axial_positions(SLICES)
    write_series(tmp_path / "dcm", stored, positions, spacing=SPACING, bits_stored=12)
    nifti = convert_volume(tmp_path / "dcm", tmp_path / "ct.nii.gz")
    image = nib.load(nifti)
    assert image.get_data_dtype() == np.int16
    assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 1
    np.testing.assert_allclose(image.affine, expected_affine(positions[0], 2.5), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(image.dataobj), as_volume(stored))
    nrrd = read_volume(convert_volume(tmp_path / "dcm", tmp_path / "ct.nrrd"))
    np.testing.assert_allclose(nrrd.affine, expected_affine(positions[0], 2.5), atol=1e-9)
    np.testing.assert_array_equal(nrrd.data, as_volume(stored))


def test_convert_of_a_one_series_folder_refuses_another_series_uid(tmp_path, capsys):
    """It converted the folder's one series whatever --series said (a UID copied from
    another folder's listing), without a word."""
    from medseg.cli import main

    write_series(tmp_path / "dcm", stored_values(13), axial_positions(SLICES))
    uid = list_series(tmp_path / "dcm")[0].uid
    assert main(["convert", str(tmp_path / "dcm"), str(tmp_path / "a.nii.gz"),
                 "--series", "1.2.3.999"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"medseg: error: {tmp_path / 'dcm'}: no series 1.2.3.999; the folder "
                          f"holds one, {uid} '")
    assert err.endswith("images): leave out --series to convert it")
    assert not (tmp_path / "a.nii.gz").exists()
    assert main(["convert", str(tmp_path / "dcm"), str(tmp_path / "a.nii.gz"),
                 "--series", uid]) == 0


@pytest.mark.parametrize(("change", "message"), [
    ({"spacing": (0.0, 0.7)}, "PixelSpacing [0.0, 0.7] is not two finite numbers > 0"),
    ({"orientation": (0, 0, 0, 0, 0, 0)}, "is not two orthogonal unit vectors"),
    ({"orientation": (1, 0, 0, 0.5, 0.866025, 0)}, "is not two orthogonal unit vectors"),
])
def test_impossible_geometry_is_refused_naming_the_tag(tmp_path, change, message):
    write_series(tmp_path, stored_values(), axial_positions(SLICES), **change)
    with pytest.raises(MedsegError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_volume(tmp_path)


def test_non_finite_position_is_refused(tmp_path):
    positions = axial_positions(SLICES)
    positions[1] = (float("nan"), 0.0, 0.0)
    write_series(tmp_path, stored_values(), positions)
    with pytest.raises(MedsegError, match="ImagePositionPatient .* is not three finite"):
        read_volume(tmp_path)


def test_a_slice_without_pixel_data_is_refused_naming_the_file(tmp_path):
    """As pydicom reads a file cut short inside compressed pixel data: header, no pixels."""
    import pydicom

    paths = write_series(tmp_path, stored_values(), axial_positions(SLICES))
    dataset = pydicom.dcmread(paths[2])
    del dataset.PixelData
    dataset.save_as(paths[2])
    with pytest.raises(MedsegError, match="IM0002.dcm: DICOM file holds no readable pixel"):
        read_volume(tmp_path)
    paths[1].write_bytes(paths[1].read_bytes()[:-20])  # cut short inside native pixel data
    with pytest.raises(MedsegError, match="IM0001.dcm"):
        read_volume(tmp_path)


def test_images_without_a_place_in_space_are_named(tmp_path):
    paths = write_series(tmp_path, stored_values(), axial_positions(SLICES))
    import pydicom

    for path in paths:
        dataset = pydicom.dcmread(path)
        del dataset.ImagePositionPatient
        dataset.save_as(path)
    with pytest.raises(MedsegError, match="4 DICOM file.* hold no image with "
                                          "ImagePositionPatient.*e.g. IM0000.dcm"):
        read_volume(tmp_path)


def _series(folder, n=3, **kwargs):
    stored = (np.arange(8 * 8 * n, dtype=np.uint16).reshape(8, 8, n) * 10 + 100)
    return write_series(folder, stored, axial_positions(n), **kwargs)


def _jpeg_lossless(path):
    """Re-encode a file's one frame as JPEG Lossless (a syntax pydicom cannot decode here)
    with SimpleITK's GDCM, header kept."""
    import SimpleITK as sitk

    dataset = pydicom.dcmread(path)
    encoded = path.with_suffix(".jpeg.dcm")
    writer = sitk.ImageFileWriter()
    writer.SetImageIO("GDCMImageIO")
    writer.SetFileName(str(encoded))
    writer.SetUseCompression(True)
    writer.SetCompressor("JPEG")
    writer.Execute(sitk.GetImageFromArray(
        np.frombuffer(dataset.PixelData, np.uint16).reshape(1, dataset.Rows, dataset.Columns)))
    compressed = pydicom.dcmread(encoded)
    encoded.unlink()
    dataset.PixelData = compressed.PixelData
    dataset["PixelData"].VR = "OB"
    dataset.file_meta.TransferSyntaxUID = compressed.file_meta.TransferSyntaxUID
    dataset.save_as(path, enforce_file_format=True)


def test_short_pixel_data_is_refused_not_filled(tmp_path):
    paths = _series(tmp_path / "s")
    dataset = pydicom.dcmread(paths[1])
    dataset.PixelData = dataset.PixelData[:80]  # 40 of 64 pixels
    dataset.save_as(paths[1])
    with pytest.raises(MedsegError, match=r"IM0001.dcm: pixel data cannot be decoded .*less"):
        read_volume(tmp_path / "s")


def test_a_colour_slice_anywhere_in_the_series_is_refused(tmp_path):
    paths = _series(tmp_path / "s")
    dataset = pydicom.dcmread(paths[1])
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 3, "RGB"
    dataset.PlanarConfiguration = 0
    dataset.BitsAllocated = dataset.BitsStored = 8
    dataset.HighBit = 7
    dataset.PixelData = (np.arange(8 * 8 * 3) % 256).astype(np.uint8).tobytes()
    dataset.save_as(paths[1])
    with pytest.raises(MedsegError, match=r"IM0001.dcm: colour images \(RGB"):
        read_volume(tmp_path / "s")


def test_frame_counts_that_disagree_are_refused(tmp_path):
    (tmp_path / "mf").mkdir()
    path = enhanced_file(tmp_path / "mf" / "mf.dcm", np.zeros((8, 8, 4), np.uint16),
                         axial_positions(4))
    dataset = pydicom.dcmread(path)
    del dataset.PerFrameFunctionalGroupsSequence[3]
    dataset.save_as(path)
    with pytest.raises(MedsegError, match="NumberOfFrames is 4 but the file describes 3"):
        read_volume(tmp_path / "mf")


def test_a_slice_cut_short_in_its_header_is_refused_not_dropped(tmp_path):
    paths = _series(tmp_path / "s", n=5)
    raw = paths[-1].read_bytes()
    paths[-1].write_bytes(raw[:raw.find(b"\x28\x00\x10\x00") - 2])  # cut before Rows
    with pytest.raises(MedsegError, match="IM0004.dcm: DICOM image header without Rows"):
        read_volume(tmp_path / "s")


def test_a_slice_without_the_part10_preamble_is_refused_not_dropped(tmp_path):
    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_dataset

    paths = _series(tmp_path / "s", n=5)
    dataset = pydicom.dcmread(paths[-1])
    del dataset.file_meta
    buffer = io.BytesIO()
    handle = DicomFileLike(buffer)
    handle.is_little_endian, handle.is_implicit_VR = True, True
    write_dataset(handle, dataset)
    paths[-1].write_bytes(buffer.getvalue())
    with pytest.raises(MedsegError,
                       match="IM0004.dcm: DICOM image of the series without the Part 10"):
        read_volume(tmp_path / "s")


def test_a_non_finite_rescale_is_refused_naming_the_tag(tmp_path):
    paths = _series(tmp_path / "s")
    dataset = pydicom.dcmread(paths[1])
    dataset.RescaleSlope = "1.25"
    dataset.save_as(paths[1])
    paths[1].write_bytes(paths[1].read_bytes().replace(b"1.25", b"NaN "))
    with pytest.raises(MedsegError, match="IM0001.dcm: RescaleSlope nan is not a finite"):
        read_volume(tmp_path / "s")


def test_a_classic_multiframe_file_is_named_as_such(tmp_path):
    stored = np.zeros((8, 8, 4), np.uint16)
    (tmp_path / "mf").mkdir()
    dataset = slice_dataset(stored[:, :, 0], [0.0, 0.0, 0.0])
    dataset.NumberOfFrames = 4
    dataset.PixelData = np.ascontiguousarray(np.moveaxis(stored, 2, 0)).tobytes()
    dataset.save_as(tmp_path / "mf" / "mf.dcm", enforce_file_format=True)
    with pytest.raises(MedsegError, match="multi-frame file.* without per-frame positions"):
        read_volume(tmp_path / "mf")


def test_gdcm_decodes_classic_jpeg_lossless_but_not_monochrome1(tmp_path):
    paths = _series(tmp_path / "s", intercept=0.0)
    plain = read_volume(tmp_path / "s", dtype=None).data.copy()
    for path in paths:
        _jpeg_lossless(path)
    assert np.array_equal(read_volume(tmp_path / "s", dtype=None).data, plain)
    for path in paths:
        dataset = pydicom.dcmread(path)
        dataset.PhotometricInterpretation = "MONOCHROME1"
        dataset.save_as(path)
    with pytest.raises(MedsegError, match="MONOCHROME1 pixel data .* only GDCM decodes"):
        read_volume(tmp_path / "s")


def test_the_localizer_is_named_even_when_it_sorts_first(tmp_path):
    _series(tmp_path / "s")
    write_series(tmp_path / "s", np.zeros((16, 16, 1), np.uint16), [[0.0, 0.0, 0.0]],
                 names=["A_LOC.dcm"], orientation=(1, 0, 0, 0, 0, -1))
    with pytest.raises(MedsegError, match=r"s/A_LOC.dcm: images differ in size"):
        read_volume(tmp_path / "s")


def test_a_slice_cut_short_before_its_position_is_refused_too(tmp_path):
    paths = _series(tmp_path / "s", n=5)
    raw = paths[-1].read_bytes()
    paths[-1].write_bytes(raw[:raw.find(b"\x20\x00\x32\x00")])  # cut before the position
    with pytest.raises(MedsegError, match="IM0004.dcm: DICOM image header without Rows"):
        read_volume(tmp_path / "s")


def test_a_preamble_less_image_of_another_series_does_not_block_this_one(tmp_path):
    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_dataset

    _series(tmp_path / "s", n=3)
    other = _series(tmp_path / "other", n=1, series_uid="1.2.3.999")[0]
    dataset = pydicom.dcmread(other)
    del dataset.file_meta
    buffer = io.BytesIO()
    handle = DicomFileLike(buffer)
    handle.is_little_endian, handle.is_implicit_VR = True, True
    write_dataset(handle, dataset)
    (tmp_path / "s" / "raw_other.dcm").write_bytes(buffer.getvalue())
    assert read_volume(tmp_path / "s").spatial_shape == (8, 8, 3)


def test_a_transfer_syntax_pydicom_does_not_know_is_tried_with_gdcm(tmp_path):
    paths = _series(tmp_path / "s", intercept=0.0)
    for path in paths:
        _jpeg_lossless(path)
        dataset = pydicom.dcmread(path)  # a private UID (GE has some), not a ValueError
        dataset.file_meta.TransferSyntaxUID = "1.2.840.113619.5.999"
        dataset.save_as(path, enforce_file_format=True)
    with pytest.raises(MedsegError, match=r"IM0000.dcm: pixel data .* pydicom: .*; GDCM: "):
        read_volume(tmp_path / "s")


@pytest.mark.parametrize("index, damage, reason", [
    (4, "ImagePositionPatient", "without ImagePositionPatient or ImageOrientationPatient"),
    (2, "ImageOrientationPatient", "without ImagePositionPatient or ImageOrientationPatient"),
    (0, "NumberOfFrames", "with several frames but no per-frame positions"),
])
def test_an_image_of_the_series_that_cannot_be_placed_is_refused_not_dropped(
        tmp_path, index, damage, reason):
    """Such an image was skipped once another gave the series: the volume came out a slice
    short with exit 0 (or the gap was blamed on uneven spacing between its neighbours)."""
    paths = _series(tmp_path / "s", n=5)
    dataset = pydicom.dcmread(paths[index])
    if damage == "NumberOfFrames":
        dataset.NumberOfFrames = 2
    else:
        delattr(dataset, damage)
    dataset.save_as(paths[index], enforce_file_format=True)
    with pytest.raises(MedsegError, match=f"IM000{index}.dcm: DICOM image of the series "
                                          f"{reason}"):
        read_volume(tmp_path / "s")


def test_two_copies_of_a_series_are_named_as_copies_and_hidden_folders_skipped(tmp_path):
    """Both copies gave "IM0000.dcm and IM0000.dcm lie at the same position ... several
    volumes (echoes, phases or time points)"; a copy in .Trash/ stopped the read the same way."""
    import shutil

    original = _series(tmp_path / "export" / "first", n=4)
    shutil.copytree(original[0].parent, tmp_path / "export" / "second")
    with pytest.raises(MedsegError, match=r"export: first/IM0000.dcm and second/IM0000.dcm are "
                                          r"copies of one image \(the same SOPInstanceUID\)"):
        read_volume(tmp_path / "export")
    shutil.rmtree(tmp_path / "export" / "second")
    shutil.copytree(original[0].parent, tmp_path / "export" / ".Trash" / "old")
    assert read_volume(tmp_path / "export").data.shape == (8, 8, 4)


@pytest.mark.parametrize("frames", [1, 2])
def test_a_secondary_capture_filed_under_the_series_is_skipped(tmp_path, frames):
    """A dose report or screenshot (another SOP class, no position) shares the series UID:
    it is not a slice, and must not stop the series being read."""
    from pydicom.uid import SecondaryCaptureImageStorage

    paths = _series(tmp_path / "s", n=4)
    capture = pydicom.dcmread(paths[0])
    del capture.ImagePositionPatient, capture.ImageOrientationPatient
    capture.SOPClassUID = SecondaryCaptureImageStorage
    capture.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    capture.SOPInstanceUID = capture.file_meta.MediaStorageSOPInstanceUID = "1.2.9.9"
    if frames > 1:
        capture.NumberOfFrames = frames
    capture.save_as(tmp_path / "s" / "dose_report.dcm", enforce_file_format=True)
    assert read_volume(tmp_path / "s").data.shape == (8, 8, 4)


def test_linked_subfolders_are_searched_once_each(tmp_path):
    """Path.rglob follows no linked folder: a series reached through a link was 'no DICOM
    image found'; a link back up must not loop."""
    stored = stored_values()
    write_series(tmp_path / "store" / "series", stored, axial_positions(SLICES),
                 spacing=SPACING)
    study = tmp_path / "study"
    study.mkdir()
    (study / "ct").symlink_to(tmp_path / "store" / "series", target_is_directory=True)
    (study / "loop").symlink_to(study, target_is_directory=True)
    volume = read_volume(study)
    np.testing.assert_array_equal(volume.data, as_volume(stored))


def _cut_points(path) -> dict[str, int]:
    """Lengths that cut a Part 10 file: right after 'DICM', inside its file meta, and inside
    the data set's SOPClassUID value (the file meta's still whole)."""
    data = path.read_bytes()
    meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")  # (0002,0000) group length
    sop_class = data.index(b"\x08\x00\x16\x00", meta_end)  # (0008,0016) SOPClassUID
    return {"after DICM": 132, "inside the file meta": 132 + 40,
            "inside SOPClassUID": sop_class + 8 + 3}


@pytest.mark.parametrize("where", ["after DICM", "inside the file meta", "inside SOPClassUID"])
def test_a_slice_cut_short_in_its_header_is_refused_not_left_out(tmp_path, where):
    import warnings

    paths = write_series(tmp_path, stored_values(), axial_positions(SLICES))
    paths[0].write_bytes(paths[0].read_bytes()[:_cut_points(paths[0])[where]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no pydicom warning on the value cut short either
        with pytest.raises(MedsegError, match="IM0000.dcm: DICOM .*file cut short"):
            read_volume(tmp_path)
        with pytest.raises(MedsegError, match="IM0000.dcm: DICOM .*file cut short"):
            read_volume(tmp_path, resample_irregular=True)


def test_an_empty_folder_and_volumes_in_subfolders_are_named_as_such(tmp_path):
    """Both read "no DICOM image found (0 files looked at)" / "(2 files looked at)": nothing
    said that the folder was empty, or that it held volume files one level down."""
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MedsegError, match="empty: empty folder: no volume file or DICOM series"):
        read_volume(empty)
    for patient in ("p1", "p2"):
        (tmp_path / "nested" / patient).mkdir(parents=True)
        (tmp_path / "nested" / patient / "scan.nii.gz").write_bytes(b"not read")
    with pytest.raises(MedsegError) as caught:
        read_volume(tmp_path / "nested")
    # the files' one name would give one mask name: 'nested/*/*.nii.gz' was refused next
    assert str(caught.value).endswith(
        f"no DICOM image found (2 files looked at; 2 volume file(s) in its subfolders, e.g. "
        f"p1{os.sep}scan.nii.gz, 2 of them named scan.nii.gz: masks are named after their "
        f"files, so give each file a name of its own (the patient's) and then give them as "
        f"inputs)")
    (tmp_path / "nested" / "p2" / "scan.nii.gz").rename(tmp_path / "nested" / "p2" / "p2.nii.gz")
    with pytest.raises(MedsegError) as caught:
        read_volume(tmp_path / "nested")
    assert str(caught.value).endswith(
        f"no DICOM image found (2 files looked at; 2 volume file(s) in its subfolders, e.g. "
        f"p1{os.sep}scan.nii.gz: give them as inputs themselves "
        f"({tmp_path / 'nested'}/*/*.nii.gz))")
    with pytest.raises(MedsegError) as caught:  # a volume in the folder itself (convert)
        read_volume(tmp_path / "nested" / "p1")
    assert str(caught.value).endswith("no DICOM image found (1 file looked at; it holds volume "
                                      "file(s), e.g. scan.nii.gz: give the file itself)")
