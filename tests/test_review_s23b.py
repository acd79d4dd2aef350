"""Review of io.read_channels, predict's packed cases, the archive's sizes and `medseg plan`
(session 23b)."""

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.io import read_channels


def test_read_channels_names_a_value_beyond_float32_without_a_warning(tmp_path: Path):
    data = np.ones((4, 4, 4, 2))
    data[1, 1, 1, 1] = 1e300
    path = tmp_path / "big.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning would be a second line on stderr
        with pytest.raises(MedsegError, match="beyond float32"):
            read_channels(path, np.float32)


def test_read_channels_holds_the_voxels_once(tmp_path: Path):
    """The channels are the file's array, not a copy of it: a BrainTumour-sized case of
    four channels would otherwise need twice its float32 size at once."""
    import tracemalloc

    data = np.random.default_rng(0).integers(-3000, 3000, (48, 48, 48, 4)).astype(np.int16)
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    tracemalloc.start()
    try:
        volumes = read_channels(path, np.float32)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.75 * data.size * 4
    for k, volume in enumerate(volumes):
        np.testing.assert_array_equal(volume.data, data[..., k])
