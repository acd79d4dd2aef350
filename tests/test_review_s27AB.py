"""Review s27AB: `medseg convert` and `medseg convert-msd` as a clinical engineer uses them."""

import errno
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.io import convert_volume, read_volume


def _volume(path: Path) -> Path:
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.0, 1.0])), str(path))
    return path


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
def test_convert_stopped_mid_write_leaves_no_folders_it_made(tmp_path, monkeypatch, suffix):
    """Ctrl-C (or a full disk) while the output was written removed the temporary file but
    left the folders made for it (`OUTPUT` in a folder that did not exist). A full disk
    stands in for Ctrl-C here: pytest stops on a KeyboardInterrupt."""
    import medseg.io
    import medseg.itkio

    def stopped(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    source = _volume(tmp_path / "in.nii")
    monkeypatch.setattr(medseg.itkio, "write_itk", stopped)
    monkeypatch.setattr(medseg.io.nib, "save", stopped)
    with pytest.raises(MedsegError, match="No space left"):
        convert_volume(source, tmp_path / "new" / "deeper" / f"out{suffix}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.nii"]


@pytest.mark.parametrize("highest, dtype", [(3000, np.int16), (40000, np.int32)])
def test_convert_dicom_writes_the_smallest_type_that_holds_the_values(tmp_path, highest, dtype):
    """A CT stored as 16-bit integers with RescaleIntercept -1024 (HU -1024 to 1976) was
    written as int32, twice int16's size: its type was chosen for every value 16 bits could
    hold, not the values it holds (docs/cli.md: "in the smallest type that holds them")."""
    from dicom_factory import axial_positions, write_series

    stored = np.zeros((6, 5, 3), dtype=np.uint16)
    stored[1, 2, 1] = highest
    write_series(tmp_path / "ct", stored, axial_positions(3))
    for suffix in (".nii.gz", ".nrrd"):
        written = convert_volume(tmp_path / "ct", tmp_path / f"ct{suffix}")
        volume = read_volume(written, dtype=None)
        assert volume.data.dtype == dtype
        assert volume.data.min() == -1024 and volume.data.max() == highest - 1024


def test_convert_refuses_a_series_uid_that_one_dicom_file_is_not_of(tmp_path, capsys):
    """`--series` of another series with one DICOM file converted the file's own series
    without a word (a folder of one series was refused already)."""
    from dicom_factory import axial_positions, write_series

    from medseg.cli import main

    files = write_series(tmp_path / "ct", np.zeros((6, 5, 2), dtype=np.uint16),
                         axial_positions(2), series_uid="1.2.3.4")
    out = tmp_path / "out.nii.gz"
    assert main(["convert", str(files[0]), str(out), "--series", "9.9.9"]) == 2
    error = capsys.readouterr().err
    assert "no series 9.9.9" in error and "1.2.3.4" in error and str(files[0]) in error
    assert not out.exists()
    assert main(["convert", str(files[0]), str(out), "--series", "1.2.3.4"]) == 0
    assert out.exists()


def test_narrowing_never_widens_an_8_bit_series():
    # the narrowing took int16 first: an 8-bit series (uint8 as read) came out twice as wide
    import numpy as np

    from medseg.io import _narrowest_integers

    assert _narrowest_integers(np.array([0, 255], np.uint8)).dtype == np.uint8
    assert _narrowest_integers(np.array([-1024, 3000], np.int32)).dtype == np.int16
    assert _narrowest_integers(np.array([0, 60000], np.int32)).dtype == np.uint16
