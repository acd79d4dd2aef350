import nibabel as nib
import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.io import read_volume, write_mask


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
