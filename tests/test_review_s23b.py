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
