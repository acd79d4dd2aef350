import codecs
import gzip
import sys
import zlib

import nibabel as nib
import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.io import channel_count, read_volume, write_mask


def oblique_lps_affine() -> np.ndarray:
    angle = np.deg2rad(12)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                         [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1, -1, 1]) @ rotation @ np.diag([0.7, 0.9, 2.5])
    affine[:3, 3] = [10.0, -20.0, 5.0]
    return affine


def save(path, data, affine, qform_code=1, sform_code=1):
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=qform_code)
    image.set_sform(affine, code=sform_code)
    nib.save(image, path)
    return path


def test_write_mask_keeps_geometry_and_codes(tmp_path):
    affine = oblique_lps_affine()
    source = save(tmp_path / "in.nii.gz", np.zeros((8, 9, 10), np.float32), affine,
                  qform_code=1, sform_code=2)
    mask = np.random.default_rng(0).integers(0, 3, size=(8, 9, 10))
    out = write_mask(mask, source, tmp_path / "out.nii.gz")
    written = nib.load(out)
    assert written.shape == (8, 9, 10)
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)
    assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 2
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(written.dataobj), mask)
    assert [p.name for p in tmp_path.iterdir() if ".part" in p.name] == []


def test_write_mask_refuses_wrong_shape(tmp_path):
    source = save(tmp_path / "in.nii.gz", np.zeros((4, 4, 4), np.float32), np.eye(4))
    with pytest.raises(MedsegError, match="does not match the input"):
        write_mask(np.zeros((4, 4, 5)), source, tmp_path / "out.nii.gz")
    assert not (tmp_path / "out.nii.gz").exists()


def test_read_volume_spacing(tmp_path):
    path = save(tmp_path / "v.nii.gz", np.ones((3, 4, 5), np.int16), oblique_lps_affine())
    volume = read_volume(path)
    assert volume.spatial_shape == (3, 4, 5)
    assert volume.spacing == pytest.approx((0.7, 0.9, 2.5))


@pytest.mark.parametrize("content, message", [
    (b"", "file is empty"),
    (b"\x00" * 400, "not a readable NIfTI"),
])
def test_hostile_files(tmp_path, content, message):
    path = tmp_path / "bad.nii"
    path.write_bytes(content)
    with pytest.raises(MedsegError, match=message):
        read_volume(path)


def test_non_scalar_voxels_and_negative_dimensions_refused(tmp_path):
    rgb = np.zeros((4, 5, 6), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), tmp_path / "rgb.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6), np.complex64), np.eye(4)),
             tmp_path / "complex.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6), np.int16), np.eye(4)), tmp_path / "neg.nii")
    raw = bytearray((tmp_path / "neg.nii").read_bytes())
    raw[46:48] = np.int16(-27613).tobytes()  # dim[3] of the NIfTI-1 header
    (tmp_path / "neg.nii").write_bytes(bytes(raw))
    for name in ("rgb.nii.gz", "complex.nii.gz"):
        with pytest.raises(MedsegError, match=f"{name}: voxel type .* is not a plain number"):
            read_volume(tmp_path / name)
    with pytest.raises(MedsegError, match=r"neg.nii: header dimensions .* are negative"):
        read_volume(tmp_path / "neg.nii")


def test_truncated_compressed_metaimage_is_called_truncated(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    data = np.random.default_rng(8).integers(0, 3000, size=(60, 60, 60)).astype(np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(data), str(tmp_path / "whole.mha"),
                    useCompression=True)
    whole = (tmp_path / "whole.mha").read_bytes()
    (tmp_path / "cut.mha").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(MedsegError, match="cut.mha: cannot read voxel data: the compressed "
                                          "data is cut short"):
        read_volume(tmp_path / "cut.mha")


def test_metaimage_with_a_non_ascii_data_file_name_is_read(tmp_path):
    """ITK writes and reads the header's ElementDataFile as the file system's bytes (UTF-8):
    `patiënt.mhd` with `patiënt.raw` beside it is a whole MetaImage, not one whose data file
    is missing."""
    sitk = pytest.importorskip("SimpleITK")
    if codecs.lookup(sys.getfilesystemencoding()).name != "utf-8":
        pytest.skip(f"ITK writes the names as UTF-8, which this process's file system "
                    f"encoding ({sys.getfilesystemencoding()}, an ASCII locale) cannot read back")
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(6, 5, 4)
    sitk.WriteImage(sitk.GetImageFromArray(data), str(tmp_path / "patiënt ü.mhd"))
    assert (tmp_path / "patiënt ü.raw").is_file()
    volume = read_volume(tmp_path / "patiënt ü.mhd", dtype=None)
    np.testing.assert_array_equal(volume.data, data.transpose(2, 1, 0))


def test_truncated_gzip(tmp_path):
    good = save(tmp_path / "good.nii.gz", np.random.default_rng(0).random((40, 40, 40),
                np.float32), np.eye(4))
    raw = good.read_bytes()
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(MedsegError, match="bad.nii.gz"):
        read_volume(bad)


def test_nan_voxels_and_singular_affine(tmp_path):
    data = np.zeros((4, 4, 4), np.float32)
    data[1, 1, 1] = np.nan
    with pytest.raises(MedsegError, match="NaN"):
        read_volume(save(tmp_path / "nan.nii.gz", data, np.eye(4)))
    image = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), None)
    image.header["pixdim"][2] = 0.0  # zero spacing, no qform/sform to override it
    path = tmp_path / "flat.nii"
    nib.save(image, path)
    with pytest.raises(MedsegError, match="spacing .* is zero"):
        read_volume(path)


def test_4d_volume_refused(tmp_path):
    path = save(tmp_path / "4d.nii.gz", np.zeros((4, 4, 4, 2), np.float32), np.eye(4))
    with pytest.raises(MedsegError, match="expected a 3D volume"):
        read_volume(path)


@pytest.mark.parametrize("name", ["4d.nii.gz", "4d.nii"])
def test_one_channel_of_a_multichannel_nifti_is_read_on_request(tmp_path, name):
    """MSD's multi-channel scans (X x Y x Z x C, or NIfTI's vector shape X x Y x Z x 1 x C):
    `channel` picks one volume, numbered as stored; a .nii.gz cut short past that channel is
    still refused (gzip's check reads the rest)."""
    rng = np.random.default_rng(0)
    data = rng.random((5, 4, 3, 3)).astype(np.float32)
    path = save(tmp_path / name, data, np.diag([2.0, 2.0, 3.0, 1.0]))
    assert channel_count(path) == 3
    for channel in range(3):
        volume = read_volume(path, channel=channel)
        assert volume.spatial_shape == (5, 4, 3) and volume.spacing == (2.0, 2.0, 3.0)
        np.testing.assert_array_equal(volume.data, data[..., channel])
    with pytest.raises(MedsegError, match=r"no channel 3: the file holds 3"):
        read_volume(path, channel=3)
    vector = save(tmp_path / "5d.nii.gz", data[:, :, :, None, :], np.eye(4))
    assert channel_count(vector) == 3
    np.testing.assert_array_equal(read_volume(vector, channel=2).data, data[..., 2])
    single = save(tmp_path / "time.nii.gz", data[..., :1], np.eye(4))  # one time point
    assert channel_count(single) == 1
    np.testing.assert_array_equal(read_volume(single, channel=0).data, data[..., 0])
    assert channel_count(save(tmp_path / "3d.nii.gz", data[..., 0], np.eye(4))) == 1
    if name.endswith(".gz"):
        cut = tmp_path / "cut.nii.gz"
        cut.write_bytes(path.read_bytes()[:-40])
        with pytest.raises(MedsegError, match="cannot read voxel data"):
            read_volume(cut, channel=0)


def test_empty_volume_refused(tmp_path):
    nifti = save(tmp_path / "empty.nii.gz", np.zeros((0, 4, 4), np.float32), np.eye(4))
    nrrd = tmp_path / "empty.nrrd"
    nrrd.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 4 0 4\n"
                     b"space: left-posterior-superior\nspace directions: (1,0,0) (0,1,0) (0,0,1)\n"
                     b"encoding: raw\nendian: little\n\n")
    for path in (nifti, nrrd):
        with pytest.raises(MedsegError, match=rf"{path.name}: .*(empty volume|not a readable)"):
            read_volume(path)


def test_atomic_outputs_get_the_usual_permissions(tmp_path):
    import os

    from medseg.fileio import atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~mask


def test_failed_atomic_write_leaves_nothing(tmp_path):
    from medseg.fileio import atomic_path

    with pytest.raises(RuntimeError), atomic_path(tmp_path / "out.nii.gz") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- formats and round trips

def ras_affine() -> np.ndarray:
    affine = np.diag([0.8, 0.9, 2.0, 1.0])
    affine[:3, 3] = [-30.0, 12.5, 7.0]
    return affine


def lps_affine() -> np.ndarray:
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ ras_affine()


@pytest.mark.parametrize("make_affine", [ras_affine, lps_affine, oblique_lps_affine])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_round_trip_keeps_geometry_exactly(tmp_path, make_affine, suffix):
    affine = make_affine()
    source = save(tmp_path / "in.nii.gz", np.zeros((7, 8, 9), np.float32), affine,
                  qform_code=2, sform_code=1)
    volume = read_volume(source)
    mask = np.random.default_rng(1).integers(0, 4, size=(7, 8, 9))
    written = read_volume(write_mask(mask, volume.geometry, tmp_path / f"mask{suffix}"),
                          dtype=None)
    np.testing.assert_array_equal(written.data, mask)
    np.testing.assert_allclose(written.affine, volume.affine, rtol=0, atol=1e-9)
    again = read_volume(write_mask(written.data, written.geometry, tmp_path / f"2{suffix}"),
                        dtype=None)
    np.testing.assert_array_equal(again.affine, written.affine)
    if suffix == ".nii.gz":
        header = nib.load(tmp_path / "2.nii.gz").header
        assert (int(header["qform_code"]), int(header["sform_code"])) == (2, 1)


def test_nrrd_and_mha_geometry_is_lps_converted_to_ras(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    data = np.random.default_rng(2).integers(0, 100, size=(4, 5, 6)).astype(np.int16)
    image = sitk.GetImageFromArray(data.transpose(2, 1, 0))  # ITK arrays are (k, j, i)
    image.SetSpacing((0.7, 0.9, 2.5))
    image.SetOrigin((10.0, -20.0, 5.0))
    lps = oblique_lps_affine()
    image.SetDirection((lps[:3, :3] / [0.7, 0.9, 2.5]).ravel().tolist())
    for suffix in (".nrrd", ".mha", ".mhd", ".nhdr"):
        sitk.WriteImage(image, str(tmp_path / f"v{suffix}"))
        volume = read_volume(tmp_path / f"v{suffix}", dtype=None)
        np.testing.assert_array_equal(volume.data, data)
        expected = lps.copy()
        expected[:3, 3] = [10.0, -20.0, 5.0]
        np.testing.assert_allclose(volume.affine, np.diag([-1, -1, 1, 1]) @ expected,
                                   atol=1e-9)


def test_slicer_nrrd_in_ras_space(tmp_path):
    """3D Slicer may write `space: right-anterior-superior`: the same world, other signs."""
    header = ("NRRD0004\ntype: short\ndimension: 3\nspace: right-anterior-superior\n"
              "sizes: 2 3 4\nspace directions: (0.5,0,0) (0,-0.6,0) (0,0,1.5)\n"
              "kinds: domain domain domain\nendian: little\nencoding: raw\n"
              "space origin: (10,20,30)\n\n")
    path = tmp_path / "slicer.nrrd"
    path.write_bytes(header.encode() + np.arange(24, dtype="<i2").tobytes(order="F"))
    volume = read_volume(path, dtype=None)
    expected = np.array([[0.5, 0, 0, 10], [0, -0.6, 0, 20], [0, 0, 1.5, 30], [0, 0, 0, 1]])
    np.testing.assert_allclose(volume.affine, expected, atol=1e-9)
    assert volume.data[1, 0, 0] == 1 and volume.data[0, 1, 0] == 2  # first index fastest


def test_convert_volume_between_formats(tmp_path):
    from medseg.io import convert_volume

    data = np.random.default_rng(3).normal(size=(5, 6, 7)).astype(np.float32)
    source = save(tmp_path / "in.nii.gz", data, oblique_lps_affine())
    nrrd = convert_volume(source, tmp_path / "out.nrrd")
    back = convert_volume(nrrd, tmp_path / "back.nii.gz")
    result = read_volume(back)
    np.testing.assert_array_equal(result.data, data)
    np.testing.assert_allclose(result.affine, read_volume(source).affine, atol=1e-6)
    with pytest.raises(MedsegError, match="unknown output format"):
        convert_volume(source, tmp_path / "out.png")
    with pytest.raises(MedsegError, match="overwrite the input"):
        convert_volume(source, source)
    blocker = tmp_path / "file"
    blocker.write_text("x", encoding="utf-8")
    for suffix in (".nii.gz", ".nrrd"):
        with pytest.raises(MedsegError, match=rf"file/out{suffix}: cannot make the output "
                                              rf"folder: .*file is not a folder"):
            convert_volume(source, blocker / f"out{suffix}")


@pytest.mark.parametrize("suffix", [".MHA", ".NRRD", ".NII.GZ"])
def test_upper_case_extensions_write_and_read_one_whole_file(tmp_path, suffix):
    """ITK picks its writer and reader by the extension's exact case: "D.MHA" was written
    as an empty file beside a hidden header and data pair, and could not be read back."""
    from medseg.io import convert_volume

    data = np.random.default_rng(4).integers(-50, 50, size=(5, 6, 7)).astype(np.int16)
    source = save(tmp_path / "in.nii.gz", data, oblique_lps_affine())
    written = convert_volume(source, tmp_path / f"D{suffix}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"D{suffix}", "in.nii.gz"]
    result = read_volume(written, dtype=None)
    np.testing.assert_array_equal(result.data, data)
    np.testing.assert_allclose(result.affine, read_volume(source).affine, atol=1e-6)


@pytest.mark.parametrize("suffix", [".Nii", ".Nii.Gz", ".nii.GZ"])
@pytest.mark.parametrize("nifti", [nib.Nifti1Image, nib.Nifti2Image])
def test_mixed_case_nifti_suffixes_are_read(tmp_path, suffix, nifti):
    """nibabel looked for scan.nii when asked for scan.Nii: "file not found" for a file
    that is there."""
    data = np.random.default_rng(5).integers(-50, 50, size=(5, 6, 7)).astype(np.int16)
    lower = tmp_path / f"scan{suffix.lower()}"
    nib.save(nifti(data, oblique_lps_affine()), lower)
    mixed = lower.rename(tmp_path / f"scan{suffix}")
    result = read_volume(mixed, dtype=None)
    np.testing.assert_array_equal(result.data, data)
    np.testing.assert_allclose(result.affine, oblique_lps_affine(), atol=1e-6)


def test_monai_loading_matches_nibabel_reader(tmp_path):
    """The load step gives the same tensor and affine for a NIfTI file (as MONAI's own
    NibabelReader does) and for the same volume stored as NRRD."""
    from monai import transforms as mt

    from medseg.io import convert_volume
    from medseg.reader import LoadVolumed

    data = np.random.default_rng(4).normal(size=(5, 6, 7)).astype(np.float32)
    source = save(tmp_path / "in.nii.gz", data, oblique_lps_affine())
    nrrd = convert_volume(source, tmp_path / "in.nrrd")
    tail = [mt.EnsureChannelFirstd("x"), mt.Orientationd("x", axcodes="RAS")]
    theirs = mt.Compose([mt.LoadImaged("x", reader="NibabelReader", image_only=True,
                                       dtype=np.float32), *tail])({"x": str(source)})["x"]
    for path in (source, nrrd):
        ours = mt.Compose([LoadVolumed("x"), *tail])({"x": str(path)})["x"]
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
        np.testing.assert_allclose(ours.affine.numpy(), theirs.affine.numpy(), atol=1e-6)
        for key in ("original_affine", "spatial_shape"):
            np.testing.assert_allclose(np.asarray(ours.meta[key]),
                                       np.asarray(theirs.meta[key]), atol=1e-6)


# ---------------------------------------------------------------- hostile input

def huge_nifti(path):
    header = nib.Nifti1Header()
    header.set_data_shape((2048, 2048, 1024))  # 2^32 voxels
    header.set_data_dtype(np.int16)
    with gzip.open(path, "wb") as handle:
        handle.write(header.binaryblock + b"\0" * 4 + b"\0" * 64)


HOSTILE = {
    "empty.nii.gz": b"",
    "empty.nrrd": b"",
    "empty.mha": b"",
    "random.nii.gz": np.random.default_rng(5).bytes(2000),
    "random.nrrd": np.random.default_rng(6).bytes(2000),
    "random.mha": np.random.default_rng(7).bytes(2000),
    "malformed.nrrd": b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4\nencoding: raw\n\n",
    "huge.mha": (b"ObjectType = Image\nNDims = 3\nDimSize = 2048 2048 1024\n"
                 b"ElementType = MET_SHORT\nCompressedData = True\nElementDataFile = LOCAL\n"
                 + zlib.compress(b"\0" * 1000)),
    "huge.nrrd": (b"NRRD0004\ntype: short\ndimension: 3\nsizes: 2048 2048 1024\n"
                  b"endian: little\nencoding: gzip\n\n" + gzip.compress(b"\0" * 1000)),
    "nan_spacing.nrrd": (b"NRRD0004\ntype: short\ndimension: 3\nsizes: 2 2 2\n"
                         b"space: left-posterior-superior\nspace directions: (nan,0,0) (0,1,0)"
                         b" (0,0,1)\nendian: little\nencoding: raw\n\n" + b"\0" * 16),
    "zero_spacing.mha": (b"ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\n"
                         b"ElementSpacing = 0 1 1\nElementType = MET_SHORT\n"
                         b"ElementDataFile = LOCAL\n" + b"\0" * 16),
    "truncated.mha": (b"ObjectType = Image\nNDims = 3\nDimSize = 20 20 20\n"
                      b"ElementType = MET_SHORT\nElementDataFile = LOCAL\n" + b"\0" * 100),
    "notes.txt": b"not an image",
}


@pytest.mark.parametrize("name", sorted(HOSTILE) + ["huge.nii.gz", "nodicom"])
def test_hostile_input_one_line_naming_the_file_nothing_written(tmp_path, name):
    from medseg.io import convert_volume

    path = tmp_path / name
    if name == "huge.nii.gz":
        huge_nifti(path)
    elif name == "nodicom":
        path.mkdir()
        (path / "readme.txt").write_text("no images", encoding="utf-8")
    else:
        path.write_bytes(HOSTILE[name])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(MedsegError) as caught:
        convert_volume(path, out / "converted.nii.gz")
    message = str(caught.value)
    assert name in message and "\n" not in message
    if name.startswith("truncated"):  # not "the header's data file is missing"
        assert "cut short" in message
    if name.startswith("huge"):
        assert "2^31" in message
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("sform_code", [2, 0])
def test_nifti2_is_read_and_its_mask_written_as_nifti2(tmp_path, sform_code):
    affine = oblique_lps_affine()
    image = nib.Nifti2Image(np.arange(60, dtype=np.int16).reshape(3, 4, 5), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine if sform_code else None, code=sform_code)
    nib.save(image, tmp_path / "scan.nii.gz")
    volume = read_volume(tmp_path / "scan.nii.gz")
    np.testing.assert_allclose(volume.affine, affine, atol=1e-5)
    write_mask(np.ones((3, 4, 5), np.uint8), volume, tmp_path / "mask.nii.gz")
    mask = nib.load(tmp_path / "mask.nii.gz")
    assert isinstance(mask, nib.Nifti2Image)
    np.testing.assert_allclose(mask.affine, affine, atol=1e-5)


def test_convert_keeps_scaled_integers_integer(tmp_path):
    from medseg.io import convert_volume

    stored = np.random.default_rng(9).integers(0, 4000, size=(5, 6, 7)).astype(np.uint16)
    image = nib.Nifti1Image(stored, np.eye(4))
    image.header.set_slope_inter(1.0, -1024.0)
    nib.save(image, tmp_path / "ct.nii.gz")
    for suffix in (".nii.gz", ".nrrd"):
        result = read_volume(convert_volume(tmp_path / "ct.nii.gz", tmp_path / f"hu{suffix}"),
                             dtype=None)
        assert result.data.dtype == np.int16
        np.testing.assert_array_equal(result.data, stored.astype(np.int32) - 1024)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_a_big_endian_nifti_converts_to_itk_formats(tmp_path, suffix):
    """SimpleITK refuses arrays of non-native byte order: 'dtype: >i2 is not supported'."""
    from medseg.io import convert_volume

    voxels = np.arange(6 * 5 * 4, dtype=">i2").reshape(6, 5, 4)
    header = nib.Nifti1Header(endianness=">")
    header.set_data_dtype(">i2")
    affine = np.diag([0.7, 1.1, 2.5, 1.0])
    nib.save(nib.Nifti1Image(voxels, affine, header=header), tmp_path / "big.nii")
    convert_volume(tmp_path / "big.nii", tmp_path / f"out{suffix}")
    converted = read_volume(tmp_path / f"out{suffix}")
    np.testing.assert_array_equal(converted.data, voxels.astype(np.int16))
    np.testing.assert_allclose(converted.affine, affine, atol=1e-6)


def test_a_failed_write_lets_go_of_its_file(tmp_path, monkeypatch):
    """A full disk: the writer's open file lived on in the error's traceback, holding the
    deleted temporary's space, so every later mask of a predict batch failed too."""
    import weakref

    import medseg.io

    opened = []

    def full_disk(image, filename):
        handle = open(filename, "wb")  # left open, as a failing writer leaves it
        handle.write(b"x" * 100)
        opened.append(weakref.ref(handle))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(medseg.io.nib, "save", full_disk)
    with pytest.raises(MedsegError, match="cannot write \\(No space left on device\\)") as err:
        medseg.io.write_volume(np.zeros((4, 4, 4), np.uint8),
                               medseg.io.Geometry((4, 4, 4), np.eye(4)),
                               tmp_path / "mask.nii.gz")
    assert err.value.__cause__ is not None
    assert opened[0]() is None, "the file is closed once the error is raised"
    assert list(tmp_path.iterdir()) == []
